"""ORPO and SimPO, the reference-free preference stages, against TRL's own loss code on real prepared pairs.

TRL computes from full logits (its get_batch_logps over the model's (rows, T, vocab) output); the stages run
the chunked output layer, so each comparison also pins the chunked log-probabilities to the plain ones."""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from config import Config
from dataloaders import PairDataLoader
from distributed import DistInfo
from model import ModelArgs, Transformer
from prep_helpers import prepare_chat_tasks
from reference_weights import o1_random_
from stages import STAGES, Pairs, Setting

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CPU = DistInfo(0, 0, 1, torch.device("cpu"))
SEQ = 64


@pytest.fixture(scope="module")
def dpo_data(tmp_path_factory):
    _, pairs = prepare_chat_tasks(tmp_path_factory.mktemp("pref"), 120, SEQ, 0.1, pairs=True)
    return pairs


def tiny_model(tok, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=tok.n_words,
                                  multiple_of=32, max_seq_len=SEQ))
    return o1_random_(model).train()


def stage_of(name: str, dpo_data, tok, **cfg):
    config = Config(training_stage=name, training_precision="fp32", max_seq_len=SEQ, max_batch_size=4,
                    dpo_data_dir=str(dpo_data), instruct_eval_examples=0, **cfg)
    return STAGES[name](Setting(config, CPU, 4, tok, tok.n_words))


def batch_of(dpo_data, tok, pairs: int) -> dict:
    loader = PairDataLoader(str(dpo_data), "train", pairs, SEQ, shuffle=False, tokenizer_identity=tok.identity(),
                            vocab_size=tok.n_words)
    return loader.next_batch()


def trl_labels_and_logits(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """The full logits and labels as TRL's get_batch_logps takes them: labels one position ahead of the
    logits that predict them (TRL shifts both by one), -100 off the responses."""
    logits, _ = model(batch["tokens"])
    labels = torch.cat([torch.full_like(batch["targets"][:, :1], -100), batch["targets"]], dim=1)
    return torch.cat([logits.float(), torch.zeros_like(logits[:, :1]).float()], dim=1), labels


def trl_self(**attrs) -> SimpleNamespace:
    return SimpleNamespace(accelerator=SimpleNamespace(device=torch.device("cpu")), **attrs)


def test_orpo_odds_ratio_term_equals_trls_on_the_same_log_probabilities(dpo_data, tok):
    from trl.experimental.orpo import ORPOTrainer

    model, lam = tiny_model(tok, seed=3), 0.25
    stage = stage_of("orpo", dpo_data, tok, orpo_lambda=lam)
    batch = batch_of(dpo_data, tok, pairs=4)
    B = batch["pair_index"].numel()
    with torch.no_grad():
        logits, labels = trl_labels_and_logits(model, batch)
        mean_logps = ORPOTrainer.get_batch_logps(logits, labels, average_log_prob=True)
        trl_losses, *_ = ORPOTrainer.odds_ratio_loss(trl_self(beta=lam), mean_logps[:B], mean_logps[B:])
        loss, extras = stage.loss(model, batch)
    # the stage's per-pair loss is nll - lambda * log sigmoid(log odds); TRL's losses are lambda * log sigmoid(...)
    nll = -mean_logps[:B]
    assert loss.item() == pytest.approx((nll - trl_losses).sum().item(), rel=1e-5)
    assert extras["nll_chosen"].item() == pytest.approx(nll.sum().item(), rel=1e-5)
    assert extras["reward_chosen"].item() == pytest.approx(lam * mean_logps[:B].sum().item(), rel=1e-5)


def test_orpo_likelihood_term_is_the_chosen_responses_cross_entropy(dpo_data, tok):
    """One pair: the loss is F.cross_entropy over the chosen response's tokens (the paper's L_SFT, what the SFT
    stage trains; TRL's ORPOTrainer also counts the prompt's tokens) minus lambda log sigmoid(log odds)."""
    model, lam = tiny_model(tok, seed=4), 0.1
    stage = stage_of("orpo", dpo_data, tok, orpo_lambda=lam)
    batch = batch_of(dpo_data, tok, pairs=1)
    with torch.no_grad():
        logits, _ = model(batch["tokens"])
        nll = F.cross_entropy(logits[0].float(), batch["targets"][0], ignore_index=-100)
        mean = [-F.cross_entropy(logits[i].float(), batch["targets"][i], ignore_index=-100) for i in (0, 1)]
        odds = [m - torch.log(1 - torch.exp(m)) for m in mean]  # log(P / (1 - P)), the textbook form
        expected = nll - lam * F.logsigmoid(odds[0] - odds[1])
        loss, _ = stage.loss(model, batch)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_orpo_log1mexp_is_accurate_where_the_naive_form_cancels():
    from stages import ORPOStage

    x = torch.tensor([-1e-7, -1e-3, -0.5, -0.7, -5.0, -50.0], dtype=torch.float64)
    exact = torch.log(-torch.expm1(x))  # float64: the reference
    got = ORPOStage.log1mexp(x.float()).double()
    assert torch.allclose(got, exact, rtol=1e-6)
    assert not torch.allclose(torch.log1p(-torch.exp(x.float())).double()[:1], exact[:1], rtol=1e-3)


@pytest.mark.parametrize("beta,gamma", [(2.0, 1.0), (0.5, 0.0)])
def test_simpo_loss_equals_trls_cpo_simpo_on_the_same_log_probabilities(dpo_data, tok, beta, gamma):
    from trl.experimental.cpo import CPOTrainer

    model = tiny_model(tok, seed=5)
    stage = stage_of("simpo", dpo_data, tok, simpo_beta=beta, simpo_gamma=gamma)
    batch = batch_of(dpo_data, tok, pairs=4)
    B = batch["pair_index"].numel()
    logits, labels = trl_labels_and_logits(model, batch)
    mean_logps = CPOTrainer.get_batch_logps(logits, labels, average_log_prob=True)
    trl = trl_self(beta=beta, simpo_gamma=gamma, label_smoothing=0.0, loss_type="simpo", alpha=0.0)
    trl_losses, trl_chosen, trl_rejected = CPOTrainer.cpo_loss(trl, mean_logps[:B], mean_logps[B:])
    trl_loss = trl_losses.mean()  # + cpo_alpha * nll, with cpo_alpha = 0 for SimPO
    expected_grads = torch.autograd.grad(trl_loss, list(model.parameters()))

    loss, extras = stage.loss(model, batch)
    assert (loss / B).item() == pytest.approx(trl_loss.item(), rel=1e-5)
    assert extras["reward_margin"].item() == pytest.approx((trl_chosen - trl_rejected).sum().item(), rel=1e-5, abs=1e-6)
    assert extras["accuracy"].item() == (trl_chosen > trl_rejected).sum().item()
    grads = torch.autograd.grad(loss / B, list(model.parameters()))
    for got, expected in zip(grads, expected_grads):
        assert torch.allclose(got, expected, rtol=1e-4, atol=1e-7)


def test_a_pairs_loss_does_not_depend_on_its_batch_mates(dpo_data, tok):
    """Summed per-pair losses: pairs split over micro-batches or ranks weigh as one batch (the loop divides
    by the global pair count)."""
    model = tiny_model(tok, seed=6)
    together = batch_of(dpo_data, tok, pairs=2)
    loader = PairDataLoader(str(dpo_data), "train", 1, SEQ, shuffle=False, tokenizer_identity=tok.identity(),
                            vocab_size=tok.n_words)
    apart = [loader.next_batch(), loader.next_batch()]
    for name in ("orpo", "simpo"):
        stage = stage_of(name, dpo_data, tok)
        with torch.no_grad():
            both = stage.loss(model, together)[0]
            each = sum(stage.loss(model, b)[0] for b in apart)
        assert both.item() == pytest.approx(each.item(), rel=1e-6), name


def test_pairs_mean_log_probabilities_divide_by_each_answers_own_tokens():
    pairs = Pairs(torch.tensor([-6.0, -2.0]), torch.tensor([-9.0, -1.0]), torch.tensor([3, 4]), torch.tensor([3, 1]))
    chosen, rejected = pairs.mean_logps()
    assert chosen.tolist() == [-2.0, -0.5] and rejected.tolist() == [-3.0, -1.0]


# ---- through train.py --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pair_runs(tmp_path_factory):
    """Pairs prepared by the project's scripts and a tiny 1-process run of each reference-free stage with LoRA,
    for the runs below to compare with."""
    from trainer_runs import make_token_data

    root = tmp_path_factory.mktemp("pref-runs")
    instruct, pairs = prepare_chat_tasks(root, 200, SEQ, 0.1, exact_answers=True, pairs=True)
    keys = dict(INSTRUCT_DATA_DIR=str(instruct), DPO_DATA_DIR=str(pairs), MAX_SEQ_LEN=str(SEQ), MAX_STEPS="4",
                TOTAL_BATCH_SIZE=str(2 * 2 * SEQ), VALIDATE_EVERY_X_STEPS="2", SAVE_EVERY_X_STEPS="2",
                INSTRUCT_EVAL_EXAMPLES="4", LORA_ENABLED="true", LORA_RANK="4", LORA_DROPOUT="0.0")
    return root, make_token_data(root / "tokens"), keys


@pytest.mark.e2e
@pytest.mark.parametrize("stage,parallelism", [("orpo", "ddp"), ("simpo", "fsdp")])
def test_a_reference_free_stage_resumes_bit_exactly_and_two_ranks_equal_one(pair_runs, stage, parallelism):
    from trainer_runs import close_runs, cut_at, same_run, step_metric, train, write_env

    root, tokens, keys = pair_runs
    run = lambda name, *args: train(  # noqa: E731
        write_env(root / f"{stage}-{name}.env", tokens, root / f"{stage}-{name}", TRAINING_STAGE=stage, **keys), *args)
    whole = root / f"{stage}-whole"
    result = run("whole")
    assert f"stage: {stage} + LoRA" in result.stdout and "pref acc" in result.stdout
    assert set(step_metric(whole)) == {1, 2, 3, 4} and step_metric(whole, "val_exact_match")

    # the whole run continued from its step-2 checkpoint (a box stopped there would repeat its first two steps)
    boxed = root / f"{stage}-boxed"
    resumed = run("boxed", "--checkpoint", str(cut_at(whole, 2, boxed)))
    assert f"resuming {stage} from" in resumed.stdout
    same_run(whole, boxed)

    # 2 ranks x 1 micro-batch = 1 process x 2 micro-batches: the same pairs, the same step
    two = root / f"{stage}-two"
    train(write_env(root / f"{stage}-two.env", tokens, two, TRAINING_STAGE=stage, PARALLELISM=parallelism, **keys),
          torchrun=2)
    close_runs(whole, two)
