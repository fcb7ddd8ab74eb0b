"""LoRA (lora.py): adapters checked against Hugging Face PEFT on the transformers export of the same
model, plus the properties the trainer relies on (exact start, frozen base, on/off switch, merge,
adapter checkpoints and their base hash, DDP / FSDP2 / compile / autocast / activation checkpointing).

Every test uses alpha != rank, so a wrong scale shows.
"""

import copy
import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import lora
from checkpoint import load_model, read_checkpoint, save_checkpoint
from hf_convert import permute_for_rotate_half, to_hf
from lora import (LoRAError, LoRASettings, adapter_checkpoint_fields, adapters_disabled, apply_lora,
                  base_fingerprint, check_settings_match, count_parameters, load_adapter_checkpoint,
                  load_lora_state_dict, lora_state_dict, merge_lora, parse_target_modules)
from model import IGNORE_INDEX, ModelArgs, Transformer
from reference_weights import o1_random_

ROOT = Path(__file__).resolve().parents[1]
ARGS = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=300, multiple_of=32, max_seq_len=64)
SETTINGS = LoRASettings(rank=4, alpha=12.0, dropout=0.0)  # scale 3, not 1 or 2
PARENTS = {"wq": "attention", "wk": "attention", "wv": "attention", "wo": "attention",
           "w1": "feed_forward", "w2": "feed_forward", "w3": "feed_forward"}
HF_NAMES = {"wq": "self_attn.q_proj", "wk": "self_attn.k_proj", "wv": "self_attn.v_proj", "wo": "self_attn.o_proj",
            "w1": "mlp.gate_proj", "w2": "mlp.down_proj", "w3": "mlp.up_proj"}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def base_model(args: ModelArgs = ARGS, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return o1_random_(Transformer(args))


def adapted(settings: LoRASettings = SETTINGS, args: ModelArgs = ARGS) -> tuple[Transformer, Transformer]:
    """(base copy, adapted model) with random B, so the update is far from zero."""
    base = base_model(args)
    model = copy.deepcopy(base)
    apply_lora(model, settings)
    with torch.no_grad():
        for _, m in lora.lora_modules(model):
            m.lora_b.weight.normal_(0.0, 0.1)
    return base, model


def ids(shape: tuple[int, ...], seed: int, vocab: int = ARGS.vocab_size) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def logits(model, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)[0]


def adapter_names(args: ModelArgs = ARGS) -> set[str]:
    return {f"layers.{i}.{PARENTS[t]}.{t}.lora_{ab}.weight" for i in range(args.n_layers) for t in PARENTS
            for ab in "ab"}


# ---- settings -----------------------------------------------------------------------------------------
def test_target_modules_parse_both_the_comma_list_and_the_original_projects_list():
    assert parse_target_modules("wq,wk,wv,wo,w1,w2,w3") == ["wq", "wk", "wv", "wo", "w1", "w2", "w3"]
    assert parse_target_modules('["wq", "wv"]') == ["wq", "wv"]
    assert parse_target_modules(" w2 , wq ") == ["wq", "w2"]


@pytest.mark.parametrize("text", ["wq,q_proj", '["output"]', ""])
def test_unknown_target_stops_with_one_line_listing_valid_names(text):
    with pytest.raises(LoRAError) as e:
        parse_target_modules(text)
    assert "\n" not in str(e.value) and "wq, wk, wv, wo, w1, w2, w3" in str(e.value)


def test_target_matching_nothing_in_the_model_stops_with_one_line():
    with pytest.raises(LoRAError) as e:
        apply_lora(Transformer(ModelArgs(**{**ARGS.__dict__, "n_layers": 0})), SETTINGS)
    assert "\n" not in str(e.value) and "match no linear layer" in str(e.value) and "wq, wk" in str(e.value)


def test_settings_round_trip_through_a_dict_and_come_from_the_config(tmp_path):
    from config import load_config

    (tmp_path / "empty.env").write_text("")
    cfg = load_config(str(tmp_path / "empty.env"), {"LORA_RANK": "8", "LORA_ALPHA": "4", "LORA_DROPOUT": "0.1",
                             "LORA_TARGET_MODULES": '["wq", "w3"]'})
    settings = LoRASettings.from_config(cfg)
    assert settings == LoRASettings(rank=8, alpha=4.0, dropout=0.1, targets=("wq", "w3"))
    assert settings.scale == 0.5 and LoRASettings.from_dict(settings.to_dict()) == settings


def test_changed_rank_or_alpha_against_a_checkpoint_stops_with_one_line_naming_both_values():
    saved = SETTINGS.to_dict()
    check_settings_match(saved, LoRASettings(rank=4, alpha=12.0, dropout=0.3))  # dropout may change
    with pytest.raises(LoRAError) as e:
        check_settings_match(saved, LoRASettings(rank=8, alpha=16.0, dropout=0.0))
    msg = str(e.value)
    assert "\n" not in msg and "LORA_RANK 4 in the checkpoint, 8 now" in msg
    assert "LORA_ALPHA 12.0 in the checkpoint, 16.0 now" in msg


# ---- the adapted model ----------------------------------------------------------------------------------
def test_wrapped_model_equals_the_base_model_exactly_at_initialisation():
    base = base_model()
    model = copy.deepcopy(base)
    names = apply_lora(model, LoRASettings(rank=4, alpha=12.0, dropout=0.5))
    assert len(names) == 7 * ARGS.n_layers
    assert model.layers[0].attention.wq.weight is not None and "layers.0.attention.wq.weight" in model.state_dict()
    model.train()  # dropout on the adapter input must not touch the base path either
    x = ids((2, 16), seed=1)
    assert torch.equal(model(x)[0], base(x)[0])


def test_wrapping_keeps_the_base_weight_tensor_itself():
    model = base_model()
    weight = model.layers[1].feed_forward.w2.weight
    apply_lora(model, SETTINGS)
    assert model.layers[1].feed_forward.w2.weight is weight


def test_only_adapter_parameters_train_and_the_count_is_r_times_in_plus_out():
    _, model = adapted()
    model.train()
    x, y = ids((2, 16), seed=1), ids((2, 16), seed=2)
    model(x, y, loss_reduction="sum", return_logits=False)[1].backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == adapter_names()
    for name, p in model.named_parameters():
        if name in trainable:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name
    hd, hidden, dim, r = ARGS.head_dim, ARGS.ffn_hidden_dim, ARGS.dim, SETTINGS.rank
    per_layer = r * ((dim + ARGS.n_heads * hd) * 2 + (dim + ARGS.n_kv_heads * hd) * 2 + 3 * (dim + hidden))
    base_total = sum(p.numel() for p in base_model().parameters())
    assert count_parameters(model) == (ARGS.n_layers * per_layer, base_total + ARGS.n_layers * per_layer)


def test_merged_and_unmerged_models_give_the_same_logits():
    base, model = adapted()
    x = ids((2, 16), seed=3)
    unmerged = logits(model, x)
    assert (unmerged - logits(base, x)).abs().max() > 0.1  # the adapters do change the output
    merged = merge_lora(model)
    assert not lora.lora_modules(merged) and type(merged.layers[0].attention.wq) is torch.nn.Linear
    assert set(merged.state_dict()) == set(base.state_dict())
    assert (logits(merged, x) - unmerged).abs().max() <= 1e-5


def test_adapters_off_equal_the_base_model_and_back_on_restore_the_adapted_output():
    base, model = adapted(LoRASettings(rank=4, alpha=12.0, dropout=0.5))
    x = ids((2, 16), seed=4)
    model.eval()
    on = logits(model, x)
    model.train()  # off means no dropout either
    with adapters_disabled(model):
        assert torch.equal(model(x)[0], base(x)[0])
    model.eval()
    assert torch.equal(logits(model, x), on) and not torch.equal(on, logits(base, x))


# ---- the independent reference: Hugging Face PEFT --------------------------------------------------------
@pytest.mark.parametrize("dropout", [0.0, 0.25])
def test_logits_and_adapter_gradients_equal_peft_on_the_transformers_export(dropout):
    """With dropout, the same seed draws the same masks in both (adapters are called in the same order):
    equal outputs show that dropout reaches the adapter input only, as in PEFT."""
    peft = pytest.importorskip("peft")
    base, model = adapted(LoRASettings(rank=4, alpha=12.0, dropout=dropout))
    hf = peft.get_peft_model(to_hf(base), peft.LoraConfig(r=4, lora_alpha=12.0, lora_dropout=dropout,
                                                          target_modules=list(HF_NAMES.values())))
    # hf_convert reorders wq/wk rows for rotate-half: W_hf = W[perm], so B_hf = B[perm], A_hf = A.
    perms = {t: permute_for_rotate_half(torch.arange(ARGS.dim // ARGS.n_heads * n, dtype=torch.float)[:, None], n)
             .squeeze(1).long() for t, n in (("wq", ARGS.n_heads), ("wk", ARGS.n_kv_heads))}
    pairs = [(model.get_submodule(f"layers.{i}.{PARENTS[target]}.{target}"),
              hf.base_model.model.model.layers[i].get_submodule(hf_name), target)
             for i in range(ARGS.n_layers) for target, hf_name in HF_NAMES.items()]
    with torch.no_grad():
        for ours, theirs, target in pairs:
            b = ours.lora_b.weight
            theirs.lora_A["default"].weight.copy_(ours.lora_a.weight)
            theirs.lora_B["default"].weight.copy_(b[perms[target]] if target in perms else b)

    model.train(), hf.train()
    x, y = ids((2, 24), seed=5), ids((2, 24), seed=6)
    y[0, :7] = IGNORE_INDEX
    torch.manual_seed(3)
    hf_logits = hf(input_ids=x).logits
    F.cross_entropy(hf_logits.flatten(0, 1), y.flatten(), ignore_index=IGNORE_INDEX, reduction="sum").backward()
    torch.manual_seed(3)
    our_logits = model(x)[0]
    torch.manual_seed(3)
    model(x, y, loss_reduction="sum", return_logits=False)[1].backward()  # the trainer's chunked loss
    assert (our_logits - hf_logits).abs().max() <= 1e-5

    for ours, theirs, target in pairs:
        grad_a, grad_b = theirs.lora_A["default"].weight.grad, theirs.lora_B["default"].weight.grad
        if target in perms:  # undo the row reordering: B[perm] = B_hf  =>  grad_B[perm] = grad_B_hf
            grad_b = torch.empty_like(grad_b).index_copy_(0, perms[target], grad_b)
        for mine, ref in ((ours.lora_a.weight.grad, grad_a), (ours.lora_b.weight.grad, grad_b)):
            assert (mine - ref).abs().max() <= 1e-5 * ref.abs().max(), target


# ---- adapter checkpoints -------------------------------------------------------------------------------------
def save_base(path: Path, model: Transformer, **extra) -> Path:
    save_checkpoint(path, model, **extra)
    return path


def test_adapter_checkpoint_is_a_small_fraction_of_a_full_one(tmp_path):
    args = ModelArgs(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, multiple_of=32, max_seq_len=64)
    settings = LoRASettings(rank=2, alpha=6.0, dropout=0.0)
    base, model = adapted(settings, args)
    full = save_base(tmp_path / "full.pt", base)
    save_checkpoint(tmp_path / "adapters.pt", model, **adapter_checkpoint_fields(model, settings, full))
    ckpt = read_checkpoint(tmp_path / "adapters.pt")
    assert set(ckpt["model"]) == adapter_names(args) and ckpt["lora"] == settings.to_dict()
    assert ckpt["base"]["sha256"] == hashlib.sha256(full.read_bytes()).hexdigest()
    assert (tmp_path / "adapters.pt").stat().st_size < 0.1 * full.stat().st_size


def test_adapter_checkpoint_loads_back_to_the_same_adapted_model_from_a_moved_base(tmp_path):
    base, model = adapted()
    path = save_base(tmp_path / "base.pt", base)
    save_checkpoint(tmp_path / "adapters.pt", model, **adapter_checkpoint_fields(model, SETTINGS, path))
    moved = shutil.copy(path, tmp_path / "moved.pt")
    path.unlink()
    x = ids((2, 16), seed=7)
    assert torch.equal(logits(load_adapter_checkpoint(tmp_path / "adapters.pt", base=moved), x), logits(model, x))


def test_adapter_checkpoint_without_a_base_file_holds_every_weight(tmp_path):
    _, model = adapted()
    save_checkpoint(tmp_path / "scratch.pt", model, **adapter_checkpoint_fields(model, SETTINGS, None))
    ckpt = read_checkpoint(tmp_path / "scratch.pt")
    assert ckpt["base"] is None and set(ckpt["model"]) == set(model.state_dict())
    x = ids((2, 16), seed=8)
    assert torch.equal(logits(load_adapter_checkpoint(tmp_path / "scratch.pt"), x), logits(model, x))


def test_base_whose_content_changed_is_refused_with_one_line_naming_the_file(tmp_path):
    base, model = adapted()
    path = save_base(tmp_path / "base.pt", base)
    save_checkpoint(tmp_path / "adapters.pt", model, **adapter_checkpoint_fields(model, SETTINGS, path))
    with torch.no_grad():
        base.norm.weight.add_(1e-3)
    save_base(path, base)
    with pytest.raises(LoRAError) as e:
        load_adapter_checkpoint(tmp_path / "adapters.pt")
    assert "\n" not in str(e.value) and str(path) in str(e.value) and "changed" in str(e.value)


def test_base_fingerprint_of_a_directory_is_sha256sum_over_its_weight_files_and_names_a_changed_one(tmp_path):
    meta = tmp_path / "meta"
    meta.mkdir()
    (meta / "params.json").write_text("{}")
    for i in range(2):
        torch.save({"w": torch.full((4,), float(i))}, meta / f"consolidated.0{i}.pth")
    (meta / "tokenizer.model").write_text("not weights")
    if shutil.which("sha256sum"):  # coreutils as the reference
        listing = subprocess.run(["sha256sum", "consolidated.00.pth", "consolidated.01.pth"], cwd=meta,
                                 capture_output=True, check=True).stdout
    else:
        listing = "".join(f"{hashlib.sha256((meta / n).read_bytes()).hexdigest()}  {n}\n"
                          for n in ("consolidated.00.pth", "consolidated.01.pth")).encode()
    assert base_fingerprint(meta) == hashlib.sha256(listing).hexdigest()
    recorded = lora.base_reference(meta)
    (meta / "tokenizer.model").write_text("other")  # not a weight file: no effect
    assert lora.verify_base(recorded) == meta
    torch.save({"w": torch.full((4,), 9.0)}, meta / "consolidated.01.pth")
    with pytest.raises(LoRAError) as e:
        lora.verify_base(recorded)
    assert "\n" not in str(e.value) and "consolidated.01.pth" in str(e.value) and "consolidated.00" not in str(e.value)


def test_base_fingerprint_of_a_hugging_face_directory_hashes_its_safetensors(tmp_path):
    to_hf(base_model()).save_pretrained(tmp_path / "hf")
    files = sorted((tmp_path / "hf").glob("*.safetensors"))
    listing = "".join(f"{hashlib.sha256(f.read_bytes()).hexdigest()}  {f.name}\n" for f in files)
    assert files and base_fingerprint(tmp_path / "hf") == hashlib.sha256(listing.encode()).hexdigest()



def test_a_lora_run_started_from_adapters_resumes_merges_and_loads_with_both_updates_merged(tmp_path):
    """SFT with adapters, then DPO with adapters on it (the README's pipeline shape), through train.py's own
    start-up functions. The DPO run's base is the SFT adapters, recorded by content hash (and they record
    theirs): resume, merge and load_model all rebuild base + SFT update + DPO update, computed here by hand."""
    import train
    from config import load_config
    from tokenizer import Tokenizer

    tok = Tokenizer()
    args = ModelArgs(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=tok.n_words, multiple_of=32,
                     max_seq_len=64)
    base, sft = adapted(args=args)
    named = dict(tokenizer=tok.identity(), tokenizer_path=str(tok.path))
    base_path, sft_path, dpo_path = save_base(tmp_path / "base.pt", base, **named), tmp_path / "sft.pt", tmp_path / "dpo.pt"
    save_checkpoint(sft_path, sft, **adapter_checkpoint_fields(sft, SETTINGS, base_path), stage="sft", step=4, **named)
    (tmp_path / "dpo.env").write_text("TRAINING_STAGE=dpo\nLORA_ENABLED=true\nLORA_RANK=4\nLORA_ALPHA=12\n"
                                      "LORA_DROPOUT=0\nMAX_SEQ_LEN=64\n")
    cfg = load_config(str(tmp_path / "dpo.env"))
    settings, cpu = LoRASettings.from_config(cfg), torch.device("cpu")
    start = train.Start.from_args(train.parse_args(["--instruct_checkpoint", str(sft_path)]), cfg)
    initial = train.initial_model(cfg, start, tok, tok.n_words, cpu, settings)
    with torch.no_grad():  # "trained": the DPO adapters move away from zero
        for _, m in lora.lora_modules(initial.model):
            m.lora_b.weight.normal_(0.0, 0.1, generator=torch.Generator().manual_seed(1))
    # as train.save_training_checkpoint writes it
    save_checkpoint(dpo_path, initial.model, **adapter_checkpoint_fields(initial.model, settings, initial.init),
                    stage="dpo", step=1, init=initial.init, **named)
    assert read_checkpoint(dpo_path)["base"]["sha256"] == hashlib.sha256(sft_path.read_bytes()).hexdigest()

    expected = {k: v.clone() for k, v in base.state_dict().items()}
    for path in (sft_path, dpo_path):  # W + 3 B A per adapter checkpoint, in order
        state = read_checkpoint(path)["model"]
        for key in [k for k in state if k.endswith(".lora_a.weight")]:
            stem = key.removesuffix(".lora_a.weight")
            expected[stem + ".weight"] += 3.0 * state[stem + ".lora_b.weight"] @ state[key]
    x = ids((2, 16), seed=20, vocab=args.vocab_size)
    base.load_state_dict(expected)
    want = logits(base, x)

    resume = train.Start.from_args(train.parse_args(["--dpo_checkpoint", str(dpo_path)]), cfg)
    assert resume.resume
    resumed = train.resumed_model(cfg, resume, tok, tok.n_words, cpu, settings).model
    assert lora.main(["merge", "--checkpoint", str(dpo_path), "--out", str(tmp_path / "merged.pt")]) == 0
    for model in (resumed.eval(), load_model(tmp_path / "merged.pt"), load_model(dpo_path)):
        assert (logits(model, x) - want).abs().max() <= 1e-5

# ---- merge CLI ----------------------------------------------------------------------------------------------
@pytest.mark.e2e
def test_merge_cli_writes_a_plain_checkpoint_that_load_model_reads_with_the_adapted_logits(tmp_path):
    from tokenizer import load_tokenizer

    tok = load_tokenizer()
    base, model = adapted()
    path = save_base(tmp_path / "base.pt", base)
    save_checkpoint(tmp_path / "adapters.pt", model, **adapter_checkpoint_fields(model, SETTINGS, path),
                    tokenizer=tok.identity(), tokenizer_path=str(tok.path))
    out = tmp_path / "merged.pt"
    run = subprocess.run([sys.executable, str(ROOT / "lora.py"), "merge", "--checkpoint", str(tmp_path / "adapters.pt"),
                          "--out", str(out)], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    merged = load_model(out)
    x = ids((2, 16), seed=9)
    assert (logits(merged, x) - logits(model, x)).abs().max() <= 1e-5
    ckpt = read_checkpoint(out)
    assert "lora" not in ckpt and ckpt["tokenizer"] == tok.identity() and ckpt["tokenizer_path"] == str(tok.path)


def test_merge_cli_errors_are_one_line_and_exit_2(tmp_path, capsys):
    assert lora.main(["merge", "--checkpoint", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "m.pt")]) == 2
    plain = save_base(tmp_path / "plain.pt", base_model())
    assert lora.main(["merge", "--checkpoint", str(plain), "--out", str(tmp_path / "m.pt")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2 and "missing.pt" in lines[0] and "not an adapter checkpoint" in lines[1]



def test_merge_refuses_an_existing_out_unless_overwrite_and_never_writes_over_its_own_inputs(tmp_path, capsys):
    base, model = adapted()
    path = save_base(tmp_path / "base.pt", base)
    adapters = tmp_path / "adapters.pt"
    save_checkpoint(adapters, model, **adapter_checkpoint_fields(model, SETTINGS, path))
    inputs = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in (path, adapters)}
    existing = tmp_path / "merged.pt"
    existing.write_bytes(b"someone's file")
    merge = ["merge", "--checkpoint", str(adapters), "--out"]
    assert lora.main([*merge, str(existing)]) == 2 and existing.read_bytes() == b"someone's file"
    for target in (path, adapters, tmp_path / "." / "base.pt"):  # with --overwrite too, however spelled
        assert lora.main([*merge, str(target), "--overwrite"]) == 2
    assert {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in inputs} == inputs
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 4 and "--overwrite" in lines[0] and all("reads" in line for line in lines[1:])
    assert lora.main([*merge, str(existing), "--overwrite"]) == 0
    x = ids((2, 16), seed=9)
    assert (logits(load_model(existing), x) - logits(model, x)).abs().max() <= 1e-5


@pytest.mark.parametrize("stage, flag", [("sft", "--instruct_checkpoint"), ("pretrain", "--pretrain_checkpoint")])
def test_a_merged_checkpoint_keeps_its_stage_and_starts_every_stage_as_weights_only(tmp_path, stage, flag):
    import train
    from config import load_config

    base, model = adapted()
    adapters = tmp_path / "adapters.pt"
    save_checkpoint(adapters, model, **adapter_checkpoint_fields(model, SETTINGS, save_base(tmp_path / "base.pt", base)),
                    stage=stage, step=4)  # as train.py writes a LoRA run's checkpoint
    assert lora.main(["merge", "--checkpoint", str(adapters), "--out", str(tmp_path / "merged.pt")]) == 0
    assert read_checkpoint(tmp_path / "merged.pt")["stage"] == stage
    (tmp_path / "empty.env").write_text("")
    for running in ("pretrain", "sft", "dpo"):
        cfg = load_config(str(tmp_path / "empty.env"), {"TRAINING_STAGE": running})
        start = train.Start.from_args(train.parse_args([flag, str(tmp_path / "merged.pt")]), cfg)
        assert start.path == str(tmp_path / "merged.pt") and not start.resume, running  # no training state to resume

# ---- training setups -------------------------------------------------------------------------------------------
def loss_and_adapter_grads(model, x, y) -> tuple[torch.Tensor, dict]:
    loss = model(x, y, loss_reduction="sum", return_logits=False)[1]
    loss.backward()
    bare = lora.unwrap(model)
    grads = {n: p.grad.clone() for n, p in bare.named_parameters() if p.requires_grad}
    bare.zero_grad(set_to_none=True)
    return loss.detach(), grads


def test_activation_checkpointing_gives_the_same_loss_and_gradients_dropout_included():
    _, model = adapted(LoRASettings(rank=4, alpha=12.0, dropout=0.3))
    model.train()
    x, y = ids((2, 16), seed=10), ids((2, 16), seed=11)
    torch.manual_seed(1)
    plain = loss_and_adapter_grads(model, x, y)
    model.activation_checkpointing = True
    torch.manual_seed(1)
    recomputed = loss_and_adapter_grads(model, x, y)
    assert torch.equal(plain[0], recomputed[0])
    for name, g in plain[1].items():
        assert torch.allclose(g, recomputed[1][name], rtol=0, atol=1e-6), name


def test_bf16_autocast_trains_float32_adapters_close_to_float32():
    _, model = adapted()
    model.train()
    x, y = ids((1, 8), seed=12), ids((1, 8), seed=13)
    loss32, grads32 = loss_and_adapter_grads(model, x, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss16, grads16 = loss_and_adapter_grads(model, x, y)
    assert loss16.item() == pytest.approx(loss32.item(), rel=2e-2)
    for name, g in grads16.items():
        assert g.dtype == torch.float32 and torch.isfinite(g).all(), name
    cos = F.cosine_similarity(torch.cat([g.flatten() for g in grads16.values()]),
                              torch.cat([g.flatten() for g in grads32.values()]), dim=0)
    assert cos > 0.99


@pytest.mark.e2e  # torch.compile: seconds
def test_compiled_forward_equals_eager_with_adapters_on_and_off():
    base, model = adapted(args=ModelArgs(**{**ARGS.__dict__, "n_layers": 1}))
    model.eval()
    x = ids((2, 16), seed=14)
    # What LoRA must survive is the capture: one full graph through the adapters, and a guard on the switch
    # that recompiles. aot_eager captures as inductor does but runs the graph eagerly; inductor's own code
    # (50 s for these two graphs on a 2-core AVX2 CPU) is checked against transformers in test_compile.
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    assert torch.allclose(logits(compiled, x), logits(model, x), rtol=0, atol=1e-5)
    with adapters_disabled(compiled):  # the switch reaches through the compile wrapper (one recompile)
        assert torch.allclose(logits(compiled, x), logits(base, x), rtol=0, atol=1e-5)
    assert set(lora_state_dict(compiled)) == adapter_names(model.args)  # names without `_orig_mod.`


@pytest.fixture
def one_rank_group(tmp_path):
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_ddp_without_find_unused_parameters_reduces_the_adapter_gradients(one_rank_group):
    from torch.nn.parallel import DistributedDataParallel as DDP

    _, model = adapted()
    reference = copy.deepcopy(model).train()
    ddp = DDP(model.train())  # find_unused_parameters=False: every adapter must take part
    x, y = ids((2, 16), seed=15), ids((2, 16), seed=16)
    for _ in range(2):  # an unused parameter would fail the second step's reduction
        loss, grads = loss_and_adapter_grads(ddp, x, y)
    ref_loss, ref_grads = loss_and_adapter_grads(reference, x, y)
    assert torch.allclose(loss, ref_loss) and set(grads) == adapter_names()
    for name, g in grads.items():
        assert torch.allclose(g, ref_grads[name], rtol=0, atol=1e-5), name
    assert set(lora_state_dict(ddp)) == adapter_names()  # names without `module.`


def test_fsdp2_shards_frozen_and_trainable_parameters_together_and_only_adapters_get_gradients(one_rank_group):
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    _, model = adapted()
    reference = copy.deepcopy(model).train()
    counts = count_parameters(model)
    for layer in model.layers:
        fully_shard(layer)
    fully_shard(model)
    model.train()
    assert count_parameters(model) == counts  # DTensors count at their full size
    x, y = ids((2, 16), seed=17), ids((2, 16), seed=18)
    loss = model(x, y, loss_reduction="sum", return_logits=False)[1]
    loss.backward()
    ref_loss, ref_grads = loss_and_adapter_grads(reference, x, y)
    assert torch.allclose(loss.detach(), ref_loss)
    for name, p in model.named_parameters():
        assert isinstance(p, DTensor)
        if name in adapter_names():
            assert torch.allclose(p.grad.full_tensor(), ref_grads[name], rtol=0, atol=1e-5), name
        else:
            assert p.grad is None, name
    state = lora_state_dict(model)  # gathered to plain tensors
    assert set(state) == adapter_names() and not isinstance(next(iter(state.values())), DTensor)
    load_lora_state_dict(model, {k: v + 1 for k, v in state.items()})
    assert torch.equal(lora_state_dict(model)["layers.0.attention.wq.lora_b.weight"],
                       state["layers.0.attention.wq.lora_b.weight"] + 1)
