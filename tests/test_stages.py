"""The stages' losses inside train.OptimizerStep, on real prepared data, against plain full-logits computations.

Each check is what a stage can get wrong: which tokens count, how micro-batches and padding weigh, and
that the chunked machinery computes the plain formula (torch's log_softmax over the full logits here)."""

import math
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import chat_tasks
from config import Config
from dataloaders import ChatDataLoader, PairDataLoader
from distributed import DistInfo
from load_dpo_dataset import prepare_dpo_dataset
from load_instruct_dataset import ChatSource, prepare_instruct_dataset
from model import ModelArgs, Transformer
from reference_weights import o1_random_
from stages import Distillation, DPOStage, Setting, SFTStage
from train import OptimizerStep

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CPU = DistInfo(0, 0, 1, torch.device("cpu"))
SEQ = 64


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    """A few hundred conversations and pairs of the embedded default, prepared by the project's own scripts."""
    root = tmp_path_factory.mktemp("stage-data")
    examples = chat_tasks.generate(150)
    rows = {"chat": chat_tasks.chat_rows(examples), "pairs": chat_tasks.preference_rows(examples)}
    files = {}
    for name, items in rows.items():
        files[name] = root / f"{name}.jsonl"
        files[name].write_text("".join(__import__("json").dumps(r) + "\n" for r in items))
    prepare_instruct_dataset([ChatSource(files=[str(files["chat"])])], root / "instruct", max_seq_len=SEQ,
                             val_fraction=0.1, show_progress=False)
    prepare_dpo_dataset([ChatSource(files=[str(files["pairs"])])], root / "dpo", max_seq_len=SEQ, val_fraction=0.1,
                        show_progress=False)
    return {"instruct": root / "instruct", "dpo": root / "dpo"}


def tiny_model(tok, seed: int = 0, dim: int = 32) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(ModelArgs(dim=dim, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=tok.n_words, multiple_of=32,
                                  max_seq_len=SEQ))
    return o1_random_(model).train()


def config(data: dict, **overrides) -> Config:
    return Config(training_precision="fp32", grad_clip=0.0, max_seq_len=SEQ, max_batch_size=2, instruct_data_dir=str(data["instruct"]),
                  dpo_data_dir=str(data["dpo"]), **overrides)


def step_with_sgd(model, stage, batches, cfg) -> dict[str, torch.Tensor]:
    """OptimizerStep with plain SGD at lr 1 and no clipping: the update is minus the gradient it used."""
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    stop = types.SimpleNamespace(requested=False)
    metrics, _ = OptimizerStep(model, stage, optimizer, torch.amp.GradScaler("cpu", enabled=False), cfg, CPU)(
        batches, 1.0, stop)
    grads = {n: before[n] - p.detach() for n, p in model.named_parameters() if p.requires_grad}
    return metrics, grads


def reference_grads(model, loss_fn) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss_fn().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


def assert_close(got: dict, expected: dict, tol: float = 1e-5):
    assert got.keys() == expected.keys()
    for name in got:
        scale = expected[name].abs().max().item() + 1e-12
        assert (got[name] - expected[name]).abs().max().item() <= tol * scale, name


def chat_loader(data, tok, batch_size=2, packing=True, split="train") -> ChatDataLoader:
    return ChatDataLoader(str(data["instruct"]), split, batch_size, SEQ, packing=packing, shuffle=False,
                          tokenizer_identity=tok.identity(), vocab_size=tok.n_words)


def sft(data, tok, **cfg) -> SFTStage:
    return SFTStage(Setting(config(data, **cfg), CPU, 2, tok, tok.n_words))


def full_logits_ce(model, batch, reduction="sum") -> torch.Tensor:
    """Independent of the chunked loss: torch's cross-entropy on the full logits of the plain forward."""
    kwargs = SFTStage.inputs(None, batch)  # positions and the document mask of packed rows
    logits, _ = model(batch["tokens"], **kwargs)
    return F.cross_entropy(logits.flatten(0, 1).float(), batch["targets"].flatten(), ignore_index=-100,
                           reduction=reduction)


# ---- SFT ------------------------------------------------------------------------------------------------------
def test_sft_data_trains_each_assistant_answer_and_its_eot_and_nothing_else(data, tok):
    batch = chat_loader(data, tok).next_batch()
    x, y, doc = batch["tokens"][0], batch["targets"][0], batch["document_ids"][0]
    for d in range(int(doc.max()) + 1):
        ids, targets = x[doc == d].tolist(), y[doc == d].tolist()
        text = tok.decode(ids)
        answer = text.rsplit("<|end_header_id|>\n\n", 1)[1]  # the final assistant turn, as rendered
        trained = [t for t in targets if t != -100]
        assert trained[-1] == tok.eot_id  # the turn's <|eot_id|> is a target: the model learns to stop
        assert tok.decode(trained).endswith(answer + "<|eot_id|>")
        assert "user" not in tok.decode(trained) and "<|start_header_id|>" not in tok.decode(trained)
    assert (y[doc < 0] == -100).all()  # padding is never trained


def test_masked_positions_get_no_gradient_and_trained_ones_do(data, tok):
    model = tiny_model(tok)
    batch = chat_loader(data, tok).next_batch()
    kept = {}

    def head(h, weight):
        h.retain_grad()
        kept["h"] = h
        from losses import chunked_cross_entropy
        return chunked_cross_entropy(h.flatten(0, 1), weight, batch["targets"].flatten(), reduction="sum")

    model(batch["tokens"], head=head, **SFTStage.inputs(None, batch)).backward()
    row_grad = kept["h"].grad.abs().sum(-1)  # (B, T)
    masked = batch["targets"] == -100
    assert (row_grad[masked] == 0).all() and (row_grad[~masked] > 0).all()


def test_a_packed_row_gives_the_losses_and_gradients_of_its_conversations_run_alone(data, tok):
    loader = chat_loader(data, tok, batch_size=1)
    batch = loader.next_batch()
    docs = batch["document_ids"][0]
    assert docs.max() >= 2  # at least three conversations share the row
    model = tiny_model(tok)
    stage = sft(data, tok)
    packed_loss = lambda: stage.loss(model, batch)[0]

    def one_by_one():
        total = 0
        for d in range(int(docs.max()) + 1):
            alone = {"tokens": batch["tokens"][:, docs == d], "targets": batch["targets"][:, docs == d]}
            total = total + full_logits_ce(model, alone)  # plain causal attention, positions from 0
        return total

    assert abs(packed_loss().item() - one_by_one().item()) <= 1e-5 * one_by_one().item()
    assert_close(reference_grads(model, packed_loss), reference_grads(model, one_by_one))


@pytest.mark.parametrize("packing", [True, False])
def test_uneven_micro_batches_weigh_as_one_big_batch_of_trained_tokens(data, tok, packing):
    """The step's gradient is the mean over every trained token of all micro-batches (not a mean of
    per-micro-batch means), checked against torch's cross-entropy over the concatenated batch."""
    loader = chat_loader(data, tok, batch_size=2, packing=packing)
    batches = [loader.next_batch(), loader.next_batch(), loader.next_batch()]
    batches[1]["targets"][:, : SEQ // 2] = -100  # fewer trained tokens in one micro-batch
    counts = [int((b["targets"] != -100).sum()) for b in batches]
    assert len(set(counts)) > 1
    model = tiny_model(tok)
    expected = reference_grads(model, lambda: sum(full_logits_ce(model, b) for b in batches) / sum(counts))
    metrics, got = step_with_sgd(model, sft(data, tok, packing=packing), batches, config(data))
    assert_close(got, expected)
    assert metrics["units"] == sum(counts)


def test_a_step_whose_batches_train_nothing_has_a_finite_loss_and_changes_nothing(data, tok):
    batch = chat_loader(data, tok).next_batch()
    batch["targets"][:] = -100
    model = tiny_model(tok)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)  # decay alone would move them
    step = OptimizerStep(model, sft(data, tok), optimizer, torch.amp.GradScaler("cpu", enabled=False), config(data), CPU)
    metrics, _ = step([batch], 1e-2, types.SimpleNamespace(requested=False))
    assert metrics["loss"] == 0.0 and math.isfinite(metrics["grad_norm"])
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())


# ---- DPO ------------------------------------------------------------------------------------------------------
def pair_loader(data, tok, batch_size=2) -> PairDataLoader:
    return PairDataLoader(str(data["dpo"]), "train", batch_size, SEQ, shuffle=False,
                          tokenizer_identity=tok.identity(), vocab_size=tok.n_words)


def dpo_stage(data, tok, model, reference_seed: int = 0, **cfg) -> DPOStage:
    """The reference is tiny_model(seed=reference_seed); the caller names it the same whatever its seed, as
    train.py names every start from scratch: the stage must tell the weights apart by their content."""
    stage = DPOStage(Setting(config(data, **cfg), CPU, 2, tok, tok.n_words,
                             starting_weights=lambda: tiny_model(tok, seed=reference_seed)))
    stage.loaders()
    stage.setup(model)
    return stage


def naive_logps(model, batch) -> torch.Tensor:
    """Summed response log-probs from the full logits and torch's log_softmax."""
    logits, _ = model(batch["tokens"])
    logp = logits.float().log_softmax(-1)
    targets = batch["targets"]
    picked = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * (targets != -100)).sum(-1)


def test_dpo_with_the_policy_as_its_own_reference_costs_log_2_and_rewards_nothing(data, tok):
    model = tiny_model(tok)
    stage = dpo_stage(data, tok, model)
    batch = pair_loader(data, tok).next_batch()
    with torch.no_grad():
        loss, extras = stage.loss(model, batch)
    pairs = batch["pair_index"].numel()
    assert loss.item() == pytest.approx(pairs * math.log(2), abs=1e-6)
    assert extras["reward_chosen"].item() == extras["reward_rejected"].item() == 0.0


def test_dpo_scores_only_response_tokens_as_plain_log_softmax_does(data, tok):
    model = tiny_model(tok)
    stage = dpo_stage(data, tok, model)
    batch = pair_loader(data, tok).next_batch()
    B = batch["pair_index"].numel()
    with torch.no_grad():
        _, extras = stage.loss(model, batch)
        expected = naive_logps(model, batch)
    assert extras["logps_chosen"].item() == pytest.approx(expected[:B].sum().item(), rel=1e-5)
    assert extras["logps_rejected"].item() == pytest.approx(expected[B:].sum().item(), rel=1e-5)
    # prompts and padding: never targets, hence no gradient at their positions
    kept = {}
    from stages import sequence_logps

    def head(h, weight):
        h.retain_grad()
        kept["h"] = h
        return sequence_logps(batch["targets"])(h, weight)

    model(batch["tokens"], head=head).sum().backward()
    scored = batch["targets"] != -100
    assert (kept["h"].grad.abs().sum(-1)[~scored] == 0).all() and (kept["h"].grad.abs().sum(-1)[scored] > 0).all()


def test_dpo_micro_batches_weigh_as_one_big_batch_of_pairs(data, tok):
    loader = pair_loader(data, tok, batch_size=1)
    small = [loader.next_batch() for _ in range(3)]
    model = tiny_model(tok, seed=1)  # the policy has moved away from the reference (seed 0)
    stage = dpo_stage(data, tok, model)
    beta = stage.cfg.dpo_beta

    def independent_mean_loss():
        losses = []
        for batch in small:
            policy = naive_logps(model, batch)
            with torch.no_grad():
                reference = naive_logps(stage.reference, batch)
            margin = beta * ((policy[0] - reference[0]) - (policy[1] - reference[1]))
            losses.append(-F.logsigmoid(margin))
        return torch.stack(losses).mean()

    expected, expected_loss = reference_grads(model, independent_mean_loss), independent_mean_loss().item()
    metrics, got = step_with_sgd(model, stage, small, stage.cfg)
    assert_close(got, expected, tol=1e-4)
    assert metrics["units"] == 3 and metrics["loss"] == pytest.approx(expected_loss, rel=1e-4)


def test_ipo_through_the_stage_averages_each_response_over_its_own_length(data, tok):
    """IPO divides each log-ratio by its own response's length: on pairs whose chosen and rejected responses
    differ in length, a stage that swapped the two lengths would give another loss."""
    loader = pair_loader(data, tok)
    sizes = loader.data.lengths  # sequence 2p is pair p's chosen one, 2p + 1 its rejected one
    batch = loader.batch_of(np.array([p for p in loader.fitting_pairs if sizes[2 * p] != sizes[2 * p + 1]][:4]))
    B = batch["pair_index"].numel()
    lengths = (batch["targets"] != -100).sum(-1).double()
    assert B == 4 and (lengths[:B] != lengths[B:]).all()
    model = tiny_model(tok, seed=1)
    stage = dpo_stage(data, tok, model, dpo_loss="ipo", dpo_beta=0.5)
    with torch.no_grad():
        loss, _ = stage.loss(model, batch)
        ratios = naive_logps(model, batch).double() - naive_logps(stage.reference, batch).double()  # (2B,)

    def ipo(chosen_lengths, rejected_lengths):
        delta = ratios[:B] / chosen_lengths - ratios[B:] / rejected_lengths
        return ((delta - 1 / (2 * 0.5)) ** 2).sum().item()

    assert loss.item() == pytest.approx(ipo(lengths[:B], lengths[B:]), rel=1e-5)
    assert ipo(lengths[:B], lengths[B:]) != pytest.approx(ipo(lengths[B:], lengths[:B]), rel=1e-3)


def test_precomputed_reference_gives_the_live_references_losses(data, tok):
    model = tiny_model(tok, seed=1)
    live = dpo_stage(data, tok, model)
    stored = dpo_stage(data, tok, model, dpo_precompute_reference=True)
    assert list((Path(data["dpo"]) / "reference_logps").glob("*.npy"))  # kept beside the data
    for loader in (live.train_loader, live.val_loader):
        batch = loader.next_batch()
        with torch.no_grad():
            a, b = live.loss(model, batch), stored.loss(model, batch)
        assert a[0].item() == pytest.approx(b[0].item(), rel=1e-5, abs=1e-6)


def prepare_pairs(root: Path, rows: list, **kw) -> Path:
    (root / "pairs.jsonl").write_text("".join(__import__("json").dumps(r) + "\n" for r in rows))
    prepare_dpo_dataset([ChatSource(files=[str(root / "pairs.jsonl")])], root / "dpo", max_seq_len=SEQ,
                        val_fraction=0.1, show_progress=False, **kw)
    return root / "dpo"


def swapped(rows: list) -> list:
    return [{**r, "chosen": r["rejected"], "rejected": r["chosen"]} for r in rows]


def loss_per_pair_with_the_policy_as_reference(data, tok, reference_seed: int = 0) -> tuple[float, float]:
    """(loss, |chosen reward|) per pair of a precomputing stage whose policy is its own reference: log 2 and 0
    when the table holds this reference's log-probs of these pairs."""
    model = tiny_model(tok, seed=reference_seed)
    stage = dpo_stage(data, tok, model, reference_seed=reference_seed, dpo_precompute_reference=True)
    batch = stage.train_loader.next_batch()
    with torch.no_grad():
        loss, extras = stage.loss(model, batch)
    pairs = batch["pair_index"].numel()
    return loss.item() / pairs, abs(extras["reward_chosen"].item()) / pairs


def test_re_prepared_pairs_get_their_own_reference_table_even_where_the_old_one_survives(data, tok, tmp_path):
    """Chosen and rejected swapped: the same shard names and counts, other content."""
    rows = list(chat_tasks.preference_rows(chat_tasks.generate(40)))
    run = {"instruct": data["instruct"], "dpo": prepare_pairs(tmp_path, rows)}
    assert loss_per_pair_with_the_policy_as_reference(run, tok) == pytest.approx((math.log(2), 0), abs=1e-6)
    cache = run["dpo"] / "reference_logps"
    old_tables = {p.name: p.read_bytes() for p in cache.glob("*.npy")}
    assert len(old_tables) == 1

    prepare_pairs(tmp_path, swapped(rows), overwrite=True)
    assert not cache.exists()  # --overwrite takes the tables of the old pairs with them
    cache.mkdir()
    for name, table in old_tables.items():  # and were one left behind, it would not be used
        (cache / name).write_bytes(table)
    assert loss_per_pair_with_the_policy_as_reference(run, tok) == pytest.approx((math.log(2), 0), abs=1e-6)


def pairs_run(data, tmp_path) -> dict:
    return {"instruct": data["instruct"],
            "dpo": prepare_pairs(tmp_path, list(chat_tasks.preference_rows(chat_tasks.generate(40))))}


def test_a_reference_of_other_weights_on_the_same_pairs_gets_its_own_table(data, tok, tmp_path):
    run = pairs_run(data, tmp_path)
    for seed in (0, 2):
        assert loss_per_pair_with_the_policy_as_reference(run, tok, seed) == pytest.approx((math.log(2), 0), abs=1e-6)
    assert len(list((run["dpo"] / "reference_logps").glob("*.npy"))) == 2


def test_the_same_reference_on_the_same_pairs_reuses_its_table(data, tok, tmp_path, monkeypatch):
    """What the table is for: a second run (a resumed one) computes nothing."""
    run = pairs_run(data, tmp_path)
    model = tiny_model(tok)
    first = dpo_stage(run, tok, model, dpo_precompute_reference=True).table
    monkeypatch.setattr(Transformer, "forward", lambda *a, **k: pytest.fail("the reference ran again"))
    again = dpo_stage(run, tok, model, dpo_precompute_reference=True).table
    assert torch.equal(first, again)


@pytest.mark.e2e
def test_train_py_on_re_prepared_pairs_starts_at_log_2(data, tok, tmp_path):
    """As a user meets it: load_dpo_dataset.py, a DPO run with a precomputed reference, the pairs prepared again
    with chosen and rejected swapped (--overwrite), another run: its first step is log 2 again, not the old
    table's loss against the new pairs."""
    from checkpoint import save_checkpoint
    from prep_helpers import run_script
    from trainer_runs import step_metric, train, write_env

    start = tmp_path / "start.pt"
    save_checkpoint(start, tiny_model(tok, dim=64), stage="sft", step=10, tokenizer=tok.identity(),
                    tokenizer_path=str(tok.path))
    rows = list(chat_tasks.preference_rows(chat_tasks.generate(40)))
    for name, pairs in (("first", rows), ("swapped", swapped(rows))):
        (tmp_path / f"{name}.jsonl").write_text("".join(__import__("json").dumps(r) + "\n" for r in pairs))
        prepared = run_script("load_dpo_dataset.py", tmp_path, "--files", str(tmp_path / f"{name}.jsonl"), "--out_dir",
                              str(tmp_path / "dpo"), "--max_seq_len", str(SEQ), "--val_fraction", "0.1", "--overwrite")
        assert prepared.returncode == 0, prepared.stderr
        env = write_env(tmp_path / f"{name}.env", tmp_path / "no-pretrain-data", tmp_path / name, TRAINING_STAGE="dpo",
                        DPO_DATA_DIR=str(tmp_path / "dpo"), DPO_PRECOMPUTE_REFERENCE="true", MAX_SEQ_LEN=str(SEQ),
                        MAX_STEPS="1", WARMUP_STEPS="1", VALIDATION_STEPS="1", INSTRUCT_EVAL_EXAMPLES="0")
        train(env, "--instruct_checkpoint", str(start))
        assert step_metric(tmp_path / name)[1] == pytest.approx(math.log(2), abs=1e-5), name
        assert step_metric(tmp_path / name, "reward_margin")[1] == pytest.approx(0, abs=1e-5), name


# ---- distillation ------------------------------------------------------------------------------------------
def distilled(data, tok, teacher, **cfg) -> Distillation:
    setting = Setting(config(data, is_model_distillation=True, teacher_model_checkpoint="t", **cfg), CPU, 2, tok,
                      tok.n_words)
    return Distillation(SFTStage(setting), teacher.eval().requires_grad_(False))


def test_distillation_from_an_identical_teacher_leaves_only_the_weighted_ce(data, tok):
    model = tiny_model(tok)
    stage = distilled(data, tok, tiny_model(tok), distillation_alpha=0.3)
    batch = chat_loader(data, tok).next_batch()
    with torch.no_grad():
        total, extras = stage.loss(model, batch)
        ce = full_logits_ce(model, batch)
    assert extras["kd"].abs().item() <= 1e-4 * extras["ce"].item()
    assert extras["ce"].item() == pytest.approx(ce.item(), rel=1e-5)
    assert total.item() == pytest.approx(0.7 * ce.item(), rel=1e-4)


def test_distillation_micro_batches_weigh_as_one_big_batch_of_trained_tokens(data, tok):
    loader = chat_loader(data, tok, batch_size=1)
    batches = [loader.next_batch() for _ in range(3)]
    batches[2]["targets"][:, :20] = -100
    teacher = tiny_model(tok, seed=5, dim=64)  # a bigger teacher
    model = tiny_model(tok)
    T, alpha = 2.0, 0.5
    stage = distilled(data, tok, teacher, distillation_alpha=alpha, distillation_temperature=T)
    inputs = lambda b: SFTStage.inputs(None, b)

    def independent():
        total, count = 0, 0
        for b in batches:
            mask = b["targets"] != -100
            student = model(b["tokens"], **inputs(b))[0][mask].float()
            with torch.no_grad():
                teacher_logits = teacher(b["tokens"], **inputs(b))[0][mask].float()
            ce = F.cross_entropy(student, b["targets"][mask], reduction="sum")
            kl = F.kl_div(F.log_softmax(student / T, -1), F.log_softmax(teacher_logits / T, -1), log_target=True,
                          reduction="sum")  # KL(teacher || student)
            total, count = total + (1 - alpha) * ce + alpha * T * T * kl, count + mask.sum()
        return total / count

    expected, expected_loss = reference_grads(model, independent), independent().item()
    metrics, got = step_with_sgd(model, stage, batches, stage.cfg)
    assert_close(got, expected, tol=1e-4)
    assert metrics["loss"] == pytest.approx(expected_loss, rel=1e-4)


def test_a_teacher_padded_past_the_tokenizer_is_sliced_and_a_smaller_one_refused(data, tok):
    from dataloaders import DataError
    from stages import check_teacher

    teacher = tiny_model(tok, seed=5)
    padded = Transformer(ModelArgs(**{**teacher.args.__dict__, "vocab_size": tok.n_words + 64}))
    with torch.no_grad():
        padded.load_state_dict({k: torch.cat([v, torch.randn(64, v.shape[1])]) if v.shape[0] == tok.n_words else v
                                for k, v in teacher.state_dict().items()})
    check_teacher(padded, tok.n_words, tok, "padded.pt")  # accepted
    batch = chat_loader(data, tok).next_batch()
    model = tiny_model(tok)
    with torch.no_grad():
        a = distilled(data, tok, teacher).loss(model, batch)[0]
        b = distilled(data, tok, padded).loss(model, batch)[0]
    assert a.item() == pytest.approx(b.item(), rel=1e-6)  # the padding rows never enter the softmax
    small = Transformer(ModelArgs(**{**teacher.args.__dict__, "vocab_size": 32000}))
    with pytest.raises(DataError, match=r"^TEACHER_MODEL_CHECKPOINT=small\.pt: its vocabulary has 32000 tokens, "
                                        r"fewer than the student's 128256; teacher and student must share"):
        check_teacher(small, tok.n_words, tok, "small.pt")


def test_dpo_sft_weight_adds_the_chosen_responses_mean_negative_log_likelihood(data, tok):
    model = tiny_model(tok, seed=1)
    plain, rpo = dpo_stage(data, tok, model), dpo_stage(data, tok, model, dpo_sft_weight=0.7)
    batch = pair_loader(data, tok).next_batch()
    B = batch["pair_index"].numel()
    with torch.no_grad():
        base, _ = plain.loss(model, batch)
        total, extras = rpo.loss(model, batch)
        chosen = naive_logps(model, batch)[:B]
    lengths = (batch["targets"][:B] != -100).sum(-1)
    expected_nll = (-chosen / lengths).sum()
    assert extras["nll_chosen"].item() == pytest.approx(expected_nll.item(), rel=1e-5)
    assert total.item() == pytest.approx(base.item() + 0.7 * expected_nll.item(), rel=1e-5)


def naive_token_logps(model, batch) -> torch.Tensor:
    """(rows, T) log-probs of each target token from the full logits, 0 where there is none."""
    logp = model(batch["tokens"])[0].float().log_softmax(-1)
    targets = batch["targets"]
    return logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1) * (targets != -100)


def test_dpo_sft_weight_is_trls_sft_term_on_each_pair_alone_averaged_over_pairs(data, tok):
    """RPO's term as the RPO paper defines it, each pair's chosen negative log-likelihood over its own length,
    so it weighs as the DPO term does however pairs split into micro-batches and ranks. TRL's "sft" loss type
    averages over all chosen tokens of the batch it is given instead: the same on a batch of one pair, not
    on pairs whose chosen answers differ in length."""
    from trl_reference import trl_dpo_loss

    loader = pair_loader(data, tok)
    model = tiny_model(tok, seed=1)
    # two pairs where the two averages differ: chosen answers of unequal lengths and unequal per-token likelihoods
    candidates = loader.batch_of(loader.fitting_pairs[:40])
    C = len(candidates["pair_index"])
    trained = candidates["targets"][:C] != -100
    with torch.no_grad():  # only to choose the pairs: the stage's chunked head is cheaper than 80 rows of logits
        mean_nll = -model(candidates["tokens"], head=DPOStage.head(candidates))[:C] / trained.sum(-1)
    lengths = trained.sum(-1)
    short = [i for i in range(C) if lengths[i] == lengths.min()]
    long = [i for i in range(C) if lengths[i] == lengths.max()]
    a, b = max(((i, j) for i in short for j in long), key=lambda ij: abs(mean_nll[ij[0]] - mean_nll[ij[1]]))
    batch = loader.batch_of(loader.fitting_pairs[[a, b]])
    stage = dpo_stage(data, tok, model, dpo_sft_weight=0.7, dpo_beta=0.3)
    with torch.no_grad():
        loss, _ = stage.loss(model, batch)
        per_token = naive_token_logps(model, batch).double()  # (4, T): chosen rows, then rejected
        reference = naive_logps(stage.reference, batch).double()
    mask = torch.cat([torch.zeros(4, 1), (batch["targets"] != -100).float()], dim=1)  # TRL's, prompt column first

    def trl(rows: list[int]) -> float:
        B = len(rows) // 2
        return trl_dpo_loss(["sigmoid", "sft"], [1.0, 0.7], 0.3, per_token[rows], mask[rows],
                            reference[rows[:B]], reference[rows[B:]])[0]

    per_pair = [trl([0, 2]), trl([1, 3])]
    assert loss.item() / 2 == pytest.approx(sum(per_pair) / 2, rel=1e-5)
    assert abs(trl([0, 1, 2, 3]) - sum(per_pair) / 2) > 0.1  # TRL's token mean over the batch
