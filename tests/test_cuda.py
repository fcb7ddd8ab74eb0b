"""The CUDA paths, each a few seconds on a GPU and skipped without one: logits against transformers in fp32
and bf16, the attention kernel SDPA picks for the training shapes of the 1b preset, every stage's optimizer
steps equal to the same steps on the CPU, fp16 loss scaling, torch.compile, two NCCL ranks, resume, FSDP2.

TEST_CUDA_DEVICE=cpu runs the same tests on the CPU, where those that can only mean something on CUDA skip:
a rehearsal of the tests' own logic (bench_gpu.sh --dry-run runs it) before GPU time is spent on them."""

import copy
import os
import types
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import get_model_state_dict
from torch.distributed.fsdp import fully_shard
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import ProfilerActivity, profile

from config import Config
from distributed import DistInfo
from hf_convert import to_hf
from model import PRESETS as MODEL_PRESETS
from model import ModelArgs, Transformer, document_attention_mask
from reference_weights import o1_random_
from stages import Distillation, Setting, build_stage
from test_stage_runs import SEQ, data  # noqa: F401  (data is a fixture)
from tokenizer import Tokenizer
from train import FULL_STATE, OptimizerStep, build_model, build_optimizer, lr_at, to_device
from trainer_runs import close_runs, make_token_data, same_run, train, write_env

DEVICE = torch.device(os.environ.get("TEST_CUDA_DEVICE", "cuda"))
CPU = torch.device("cpu")
ON_CUDA = DEVICE.type == "cuda"

pytestmark = [pytest.mark.skipif(ON_CUDA and not torch.cuda.is_available(), reason="no CUDA device"),
              pytest.mark.usefixtures("one_torch_thread")]
cuda_only = pytest.mark.skipif(not ON_CUDA, reason="a CUDA kernel's behaviour: nothing to check on the CPU")

ARGS = ModelArgs(dim=128, n_layers=2, n_heads=8, n_kv_heads=2, vocab_size=512, multiple_of=32, max_seq_len=256,
                 use_scaled_rope=True, rope_original_max_seq_len=64, rope_scale_factor=4.0)


def tokens(shape: tuple[int, ...], vocab: int, seed: int) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


# ---- logits ----------------------------------------------------------------------------------------------------
def logits_of(model: torch.nn.Module, x: torch.Tensor, precision: str) -> torch.Tensor:
    """Logits as training computes them: float32 weights, bf16 autocast where asked."""
    autocast = torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    with torch.no_grad(), autocast:
        out = model(x)
    return (out[0] if isinstance(out, tuple) else out.logits).float()


def test_fp32_logits_on_the_device_match_transformers():
    torch.manual_seed(0)
    ours = o1_random_(Transformer(ARGS)).to(DEVICE)
    hf = to_hf(ours, attn_implementation="sdpa").to(DEVICE).eval()
    x = tokens((2, 200), ARGS.vocab_size, seed=1).to(DEVICE)  # past rope_original_max_seq_len: every band
    ref = logits_of(hf, x, "fp32")
    assert ref.std() > 0.5, "reference logits too small for the tolerance to mean anything"
    assert (logits_of(ours, x, "fp32") - ref).abs().max().item() <= 1e-4


def test_bf16_autocast_logits_are_as_close_to_float32_as_transformers_bf16_logits():
    """bf16 rounds differently in each implementation, so the two cannot agree to float32 precision; what must
    hold is that ours loses no more than transformers does: the mean error against HF's float32 logits."""
    torch.manual_seed(0)
    ours = o1_random_(Transformer(ARGS)).to(DEVICE)
    hf = to_hf(ours, attn_implementation="sdpa").to(DEVICE).eval()
    x = tokens((2, 200), ARGS.vocab_size, seed=1).to(DEVICE)
    exact = logits_of(hf, x, "fp32")
    ours_error = (logits_of(ours, x, "bf16") - exact).abs().mean().item()
    hf_error = (logits_of(hf, x, "bf16") - exact).abs().mean().item()
    assert hf_error > 0, "the bf16 path did not run in bf16"
    assert ours_error <= 1.25 * hf_error, (ours_error, hf_error)


# ---- the attention kernel ---------------------------------------------------------------------------------------
SDPA_KERNELS = {  # the forward op of each SDPA backend, as the profiler names it
    "aten::_scaled_dot_product_flash_attention": "flash",
    "aten::_scaled_dot_product_flash_attention_for_cpu": "flash (cpu)",
    "aten::_scaled_dot_product_efficient_attention": "memory-efficient",
    "aten::_scaled_dot_product_cudnn_attention": "cudnn",
    "aten::_scaled_dot_product_attention_math": "math",
}
# The training shapes of the 1b preset: its attention (dim 2048, 32 query and 8 kv heads of 64) at T=2048; one
# block is enough, the vocabulary is irrelevant. The CPU rehearsal runs a short sequence.
ATTENTION_1B = ModelArgs(**{**MODEL_PRESETS["llama3.2-1b"], "n_layers": 1}, vocab_size=512, max_seq_len=2048)
T_1B = 2048 if ON_CUDA else 128


def forward_backward(model: Transformer, precision: str, packed: bool) -> None:
    x = tokens((1, T_1B), ATTENTION_1B.vocab_size, seed=1).to(DEVICE)
    kwargs = {}
    if packed:  # SFT rows: documents of 300 tokens, each attending only to itself, positions restarting
        documents = (torch.arange(T_1B, device=DEVICE) // 300)[None]
        kwargs = {"attn_mask": document_attention_mask(documents), "positions": torch.arange(T_1B, device=DEVICE) % 300}
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        model(x, **kwargs)[0].float().square().mean().backward()


def kernels_picked(run) -> set[str]:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
    return {SDPA_KERNELS[e.key] for e in prof.key_averages() if e.key in SDPA_KERNELS}


@pytest.mark.parametrize("packed", [False, True], ids=["pretrain_rows", "packed_sft_rows"])
@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_training_attention_at_the_1b_shape_never_falls_back_to_the_math_kernel(precision, packed):
    """The math kernel materialises float32 (B, H, T, T) scores: 512 MB per block at T=2048. SDPA falls back to it
    silently; restricted to the fused kernels it must still run, forward and backward."""
    torch.manual_seed(0)
    model = Transformer(ATTENTION_1B).to(DEVICE).train()
    picked = kernels_picked(lambda: forward_backward(model, precision, packed))
    assert picked and "math" not in picked, picked
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
        forward_backward(model, precision, packed)


@cuda_only
def test_generation_prefill_at_the_1b_shape_uses_a_fused_kernel():
    torch.manual_seed(0)
    model = Transformer(ATTENTION_1B).to(DEVICE).to(torch.bfloat16).eval()
    model.setup_cache(batch_size=1, max_seq_len=T_1B)
    prompt = tokens((1, T_1B // 2), ATTENTION_1B.vocab_size, seed=1).to(DEVICE)
    with torch.no_grad():
        first = kernels_picked(lambda: model(prompt, start_pos=0, logits_to_keep=1))  # a prompt: causal, no mask
        chunk = kernels_picked(lambda: model(prompt, start_pos=T_1B // 2, logits_to_keep=1))  # after it: a mask
    model.clear_cache()
    assert first and "math" not in first and chunk and "math" not in chunk, (first, chunk)


# ---- every stage's optimizer steps: device against CPU ------------------------------------------------------------
STAGE_CONFIGS = {"pretrain": {}, "sft": {"training_stage": "sft"}, "dpo": {"training_stage": "dpo"},
                 "distill": {}}


def stage_config(data: dict, stage: str, **overrides) -> Config:
    settings = dict(training_precision="fp32", dim=64, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=32,
                    max_seq_len=SEQ, max_batch_size=2, warmup_steps=2, max_steps=4, instruct_eval_examples=0,
                    pretrain_data_dir=str(data["pretrain"]), instruct_data_dir=str(data["instruct"]),
                    dpo_data_dir=str(data["dpo"]))
    return Config(**{**settings, **STAGE_CONFIGS[stage], **overrides})


def initial_models(tok: Tokenizer, cfg: Config) -> tuple[Transformer, Transformer]:
    """(student, teacher) built on the CPU: a seed gives other weights on another device's generator."""
    student = build_model(cfg, tok.n_words, CPU)
    torch.manual_seed(99)
    teacher = Transformer(ModelArgs(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=tok.n_words,
                                    multiple_of=32, max_seq_len=SEQ)).eval().requires_grad_(False)
    return student, teacher


def train_steps(stage_name: str, cfg: Config, tok: Tokenizer, device: torch.device, steps: int = 3,
                compile: bool = False, shard: bool = False,
                scaler: torch.amp.GradScaler | None = None) -> tuple[list, Transformer]:
    """train.py's loop in miniature on `device`, from the CPU-built initial weights: the per-step metrics and
    the trained model. Two micro-batches per step (accumulation). `shard`: FSDP2 as train.parallelize lays it
    out (every block, then the root), in the one-rank group that must exist."""
    student, teacher = initial_models(tok, cfg)
    model = copy.deepcopy(student).to(device)
    d = DistInfo(0, 0, 1, device)
    setting = Setting(cfg, d, 4, tok, tok.n_words, starting_weights=lambda: copy.deepcopy(student).to(device))
    stage = build_stage(setting)
    if stage_name == "distill":
        stage = Distillation(stage, teacher.to(device))
    loader, _ = stage.loaders()
    stage.setup(model)
    if shard:
        for layer in model.layers:
            fully_shard(layer)
        fully_shard(model)
    optimizer = build_optimizer(model, cfg, device)
    scaler = scaler or torch.amp.GradScaler(device.type, enabled=False)
    step_model = torch.compile(model) if compile else model
    stop = types.SimpleNamespace(requested=False)
    metrics = []
    for step in range(steps):
        batches = [to_device(b, device) for b in loader.next_step()]
        metrics.append(OptimizerStep(step_model, stage, optimizer, scaler, cfg, d)(batches, lr_at(step, cfg), stop)[0])
    return metrics, model


def assert_same_training(got: tuple[list, Transformer], expected: tuple[list, Transformer], tol: float = 1e-4):
    (got_metrics, got_model), (metrics, model) = got, expected
    for key in ("loss", "grad_norm"):
        a, b = [m[key] for m in got_metrics], [m[key] for m in metrics]
        assert all(abs(x - y) <= tol * max(1.0, abs(y)) for x, y in zip(a, b)), (key, a, b)
    assert metrics[-1]["loss"] != metrics[0]["loss"]  # it trained: the comparison is not of three copies
    theirs = dict(model.named_parameters())
    worst = max((p.detach().cpu() - theirs[n].detach().cpu()).abs().max().item() for n, p in got_model.named_parameters())
    assert worst <= tol, worst


@pytest.mark.parametrize("stage", list(STAGE_CONFIGS))
def test_a_stage_trains_on_the_device_as_on_the_cpu(stage, data, tok):
    cfg = stage_config(data, stage)
    assert_same_training(train_steps(stage, cfg, tok, DEVICE), train_steps(stage, cfg, tok, CPU))


def test_compiled_training_steps_equal_eager_ones(data, tok):
    cfg = stage_config(data, "pretrain")  # fixed shapes: one graph (SFT's trained rows vary, and recompile)
    assert_same_training(train_steps("pretrain", cfg, tok, DEVICE, compile=True),
                         train_steps("pretrain", cfg, tok, DEVICE))


def test_fp16_loss_scaling_skips_a_non_finite_step_and_recovers(data, tok):
    """A scale of 2^40 overflows float16 gradients: the step must leave the weights as they were and cut the scale
    (here by 2^30, to 1024); at that scale the steps must then train as float32 steps do, gradients unscaled."""
    cfg = stage_config(data, "pretrain", training_precision="fp16")
    scaler = torch.amp.GradScaler(DEVICE.type, init_scale=2.0**40, backoff_factor=2.0**-30)
    skipped, model = train_steps("pretrain", cfg, tok, DEVICE, steps=1, scaler=scaler)
    initial = build_model(cfg, tok.n_words, CPU)
    assert all(torch.equal(p.detach().cpu(), q) for p, q in zip(model.parameters(), initial.parameters()))
    assert not torch.isfinite(torch.tensor(skipped[0]["grad_norm"])) and scaler.get_scale() == 1024.0

    fp16, _ = train_steps("pretrain", cfg, tok, DEVICE, scaler=torch.amp.GradScaler(DEVICE.type, init_scale=1024.0))
    fp32, _ = train_steps("pretrain", stage_config(data, "pretrain"), tok, DEVICE)
    for key, tol in (("loss", 1e-2), ("grad_norm", 5e-2)):  # to float16's precision
        assert all(abs(a[key] - b[key]) <= tol * b[key] for a, b in zip(fp16, fp32)), (key, fp16, fp32)


@pytest.fixture
def one_rank(tmp_path):
    """A one-rank process group of the device's backend, in this process (train.py shards only from 2 ranks)."""
    device_id = torch.device("cuda", torch.cuda.current_device()) if ON_CUDA else None  # NCCL binds an index
    dist.init_process_group("nccl" if ON_CUDA else "gloo", store=dist.FileStore(str(tmp_path / "store"), 1),
                            rank=0, world_size=1, device_id=device_id)
    yield
    import gc

    gc.collect()  # FSDP's hooks go before their group does
    dist.destroy_process_group()


def test_fsdp2_sharded_steps_equal_unsharded_ones_and_gather_the_full_weights(data, tok, one_rank):
    cfg = stage_config(data, "pretrain")
    metrics, sharded = train_steps("pretrain", cfg, tok, DEVICE, shard=True)
    gathered = Transformer(sharded.args)
    gathered.load_state_dict(get_model_state_dict(sharded, options=FULL_STATE))  # what a checkpoint holds
    assert_same_training((metrics, gathered), train_steps("pretrain", cfg, tok, DEVICE))


# ---- train.py on the device: resume, two ranks ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def token_data(tmp_path_factory) -> Path:
    return make_token_data(tmp_path_factory.mktemp("data"))


def run_on_device(tmp_path: Path, token_data: Path, name: str, *args: str, torchrun: int = 0, **overrides) -> Path:
    env = write_env(tmp_path / f"{name}.env", token_data, tmp_path / name, DEVICE=DEVICE.type, **overrides)
    train(env, *args, torchrun=torchrun)
    return tmp_path / name


@pytest.mark.e2e
def test_a_resumed_bf16_run_on_the_device_equals_the_uninterrupted_run_bit_for_bit(tmp_path, token_data):
    straight = run_on_device(tmp_path, token_data, "straight", TRAINING_PRECISION="bf16")
    boxed = run_on_device(tmp_path, token_data, "boxed", "--stop-step", "3", TRAINING_PRECISION="bf16")
    run_on_device(tmp_path, token_data, "boxed", "--pretrain_checkpoint", str(boxed / "checkpoints" / "step_000003.pt"),
                  TRAINING_PRECISION="bf16")
    try:
        same_run(straight, boxed)
    except AssertionError:
        # Tell a resume bug from a device that does not repeat itself (atomics in some backward kernels).
        again = run_on_device(tmp_path, token_data, "again", TRAINING_PRECISION="bf16")
        try:
            same_run(straight, again)
            repeats = "two uninterrupted runs agree bit for bit, so the resume lost state"
        except AssertionError:
            repeats = "two uninterrupted runs differ too: the device's kernels are not deterministic"
        pytest.fail(f"the resumed run differs from the uninterrupted one; {repeats}")


@pytest.mark.e2e
@pytest.mark.skipif(not ON_CUDA or torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_two_nccl_ranks_equal_one_process_with_twice_the_accumulation(tmp_path, token_data):
    one = run_on_device(tmp_path, token_data, "one")
    two = run_on_device(tmp_path, token_data, "two", torchrun=2)
    close_runs(one, two)
