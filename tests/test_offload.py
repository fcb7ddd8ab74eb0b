"""offload.py: training with the weights streamed from disk block by block equals training in memory (plain
Transformer, torch.optim.AdamW, clip_grad_norm_), for LoRA and for full fine-tuning, with adapter dropout on,
two micro-batches and clipping active; the store is identified by content; memory stays flat with depth."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import checkpoint
import offload
import random_model
from lora import LoRASettings, apply_lora
from losses import IGNORE_INDEX, chunked_cross_entropy
from model import ModelArgs, Transformer, document_attention_mask

ROOT = Path(__file__).resolve().parents[1]
LR, MAX_NORM, WEIGHT_DECAY, STEPS = 1e-2, 0.05, 0.1, 3


def tiny_args(**kw) -> ModelArgs:
    return ModelArgs(**{**dict(dim=64, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=256, multiple_of=32,
                               max_seq_len=64), **kw})


def micro_batches(seed: int = 0) -> list[list[dict]]:
    """STEPS steps of 2 micro-batches: packed rows (two documents each), some targets ignored."""
    g = torch.Generator().manual_seed(seed)
    steps = []
    for _ in range(STEPS):
        step = []
        for _ in range(2):
            tokens = torch.randint(0, 256, (2, 16), generator=g)
            targets = torch.randint(0, 256, (2, 16), generator=g)
            targets[:, :3] = IGNORE_INDEX
            docs = torch.tensor([[0] * 10 + [1] * 6, [0] * 5 + [1] * 11])
            positions = torch.cat([torch.arange(10), torch.arange(6)]).expand(2, 16)
            step.append(dict(tokens=tokens, targets=targets, docs=docs, positions=positions))
        steps.append(step)
    return steps


def stage_loss(model, batch: dict) -> torch.Tensor:
    """As stages.SFTStage.loss calls the model: a summed cross-entropy head, packed rows' positions and mask."""
    targets = batch["targets"].flatten()
    head = lambda h, w: chunked_cross_entropy(h.flatten(0, 1), w, targets, reduction="sum")  # noqa: E731
    return model(batch["tokens"], head=head, positions=batch["positions"],
                 attn_mask=document_attention_mask(batch["docs"]))


def run_steps(model, step_fn, seed: int = 5, autocast: bool = False) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Losses and grad norms of STEPS optimizer steps; the loss divided by the step's trained tokens. `autocast`:
    each forward under bf16 autocast, as train.py runs it (only the forward: autocast's cast of a trained weight is
    cached until the region ends, so a region spanning an update would compute with the old weights)."""
    torch.manual_seed(seed)  # the adapters' dropout masks
    model.train()
    losses, norms = [], []
    for step in micro_batches():
        count = sum((b["targets"] != IGNORE_INDEX).sum() for b in step)
        total = torch.zeros(())
        for batch in step:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                loss = stage_loss(model, batch) / count
            loss.backward()
            total += loss.detach()
        losses.append(total)
        norms.append(step_fn())
    return losses, norms


def in_memory_step(model):
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": WEIGHT_DECAY},
                                   {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}], lr=LR)

    def step():
        norm = torch.nn.utils.clip_grad_norm_(params, MAX_NORM)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return norm
    return step


def adapters(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if ".lora_" in n}


LORA = LoRASettings(rank=4, alpha=8.0, dropout=0.3)


def lora_pair(tmp_path, args: ModelArgs, train_base: bool):
    """The same model twice: in memory, and streamed from a store written from it; equal adapters on both."""
    torch.manual_seed(0)
    reference = Transformer(args)
    store = offload.write_store_from_model(tmp_path / "store", reference)
    torch.manual_seed(1)
    apply_lora(reference, LORA)
    streamed = offload.open_streamed(store, train_base=train_base)
    torch.manual_seed(1)
    apply_lora(streamed, LORA)
    offload.materialize_adapters(streamed)
    return reference, streamed


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), (name, (a[name] - b[name]).abs().max().item())


# ---- training equals training in memory -------------------------------------------------------------------------
def test_lora_training_streamed_equals_in_memory_with_dropout_accumulation_and_clipping(tmp_path):
    reference, streamed = lora_pair(tmp_path, tiny_args(), train_base=False)
    assert_same(adapters(reference), adapters(streamed))
    assert all(p.is_meta for n, p in streamed.named_parameters() if ".lora_" not in n)  # nothing else in memory

    ref_losses, ref_norms = run_steps(reference, in_memory_step(reference))
    losses, norms = run_steps(streamed, in_memory_step(streamed))  # the usual optimizer and clip_grad_norm_
    assert all(n > MAX_NORM for n in ref_norms)  # clipping scaled every step
    assert torch.equal(torch.stack(losses), torch.stack(ref_losses))
    assert torch.equal(torch.stack(norms), torch.stack(ref_norms))
    assert_same(adapters(reference), adapters(streamed))

    _, other = lora_pair(tmp_path / "other", tiny_args(), train_base=False)
    run_steps(other, in_memory_step(other), seed=6)  # other dropout masks: other adapters, so masks mattered
    assert not torch.equal(adapters(other)["layers.0.attention.wq.lora_a.weight"],
                           adapters(streamed)["layers.0.attention.wq.lora_a.weight"])


def test_a_streamed_model_trims_the_heap_after_each_block_whose_activations_it_freed(tmp_path):
    reference, streamed = lora_pair(tmp_path, tiny_args(), train_base=False)
    trims = []
    streamed.trim_heap = lambda: trims.append(1)
    tokens = torch.randint(0, 256, (1, 16))
    with torch.no_grad():
        streamed(tokens)
    assert len(trims) == 3  # evaluation and decoding: each of the 3 blocks
    _, loss = streamed(tokens, tokens, return_logits=False)
    assert len(trims) == 3 + 3  # the forward keeping only block inputs
    loss.backward()
    assert len(trims) == 3 + 3 + 3  # the recompute and backward
    trims.clear()
    streamed.keep_activations = True  # OFFLOAD_ACTIVATIONS=all: nothing freed until the backward ends
    _, loss = streamed(tokens, tokens, return_logits=False)
    loss.backward()
    assert trims == []


def test_the_recompute_replays_the_forwards_dropout_masks_instead_of_drawing_new_ones(tmp_path):
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountDraws(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.draws = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.draws += func.overloadpacket is torch.ops.aten.bernoulli_
            return func(*args, **(kwargs or {}))

    reference, streamed = lora_pair(tmp_path, tiny_args(), train_base=False)
    batch = micro_batches()[0][0]
    counts = []
    for model in (reference, streamed):
        model.train()
        with CountDraws() as forward:
            loss = stage_loss(model, batch)
        with CountDraws() as backward:
            loss.backward()
        counts.append((forward.draws, backward.draws))
    adapted_linears = 7 * tiny_args().n_layers
    assert counts == [(adapted_linears, 0), (adapted_linears, 0)]  # the in-memory draws, and none again


def test_keeping_every_activation_streams_only_the_weights_and_trains_lora_as_in_memory(tmp_path, monkeypatch):
    """OFFLOAD_ACTIVATIONS=all: no block runs again in the backward; the weights autograd saved are read back from
    the store, also when two forwards (a DPO pair) share one backward."""
    from model import TransformerBlock

    reference, streamed = lora_pair(tmp_path, tiny_args(n_layers=5), train_base=False)
    streamed.keep_activations = True
    ref_losses, ref_norms = run_steps(reference, in_memory_step(reference))
    losses, norms = run_steps(streamed, in_memory_step(streamed))
    assert torch.equal(torch.stack(losses), torch.stack(ref_losses))
    assert torch.equal(torch.stack(norms), torch.stack(ref_norms))
    assert_same(adapters(reference), adapters(streamed))

    calls, real_forward = [], TransformerBlock.forward
    monkeypatch.setattr(TransformerBlock, "forward", lambda self, *a, **k: (calls.append(1), real_forward(self, *a, **k))[1])
    reads, real_read = [], streamed._read_block
    monkeypatch.setattr(streamed, "_read_block", lambda i: (reads.append(i), real_read(i))[1])
    pair = micro_batches(seed=3)[0]
    grads = []
    for model in (reference, streamed):
        torch.manual_seed(11)  # the same dropout masks for both
        loss = stage_loss(model, pair[0]) + 0.5 * stage_loss(model, pair[1])
        calls.clear(), reads.clear()
        loss.backward()
        assert not calls  # nothing recomputed
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        model.zero_grad(set_to_none=True)
    assert_same(*grads)
    assert sorted(reads) == sorted([2, 1, 0] + [4, 3, 2, 1, 0])  # each block read back once per forward it served
    # (the two the last forward left in memory, 4 and 3, are not read again)


def test_block_inputs_kept_on_disk_train_as_in_memory_and_leave_no_file_behind(tmp_path, monkeypatch):
    reference, streamed = lora_pair(tmp_path, tiny_args(), train_base=False)
    streamed.activation_dir = tmp_path / "activations"
    streamed.activation_dir.mkdir()
    saved, real_save = [], offload.save_file
    monkeypatch.setattr(offload, "save_file", lambda tensors, path, durable=True: (saved.append(path),
                                                                                   real_save(tensors, path, durable)))
    ref_losses, _ = run_steps(reference, in_memory_step(reference))
    losses, _ = run_steps(streamed, in_memory_step(streamed))
    assert len(saved) == STEPS * 2 * tiny_args().n_layers  # every block's input of every micro-batch went to disk
    assert torch.equal(torch.stack(losses), torch.stack(ref_losses))
    assert_same(adapters(reference), adapters(streamed))
    assert not list(streamed.activation_dir.iterdir())  # each read back once by its backward, then deleted


@pytest.mark.parametrize("tied, keep, autocast", [(False, False, False), (True, False, False), (True, True, False),
                                                   (False, True, True)],
                         ids=["untied", "tied", "tied-activations-kept", "activations-kept-bf16-autocast"])
def test_full_fine_tuning_streamed_equals_in_memory_adamw_with_clipping(tmp_path, tied, keep, autocast):
    """Every weight trains (base and adapters, so dropout is on): the base's gradients and AdamW state live in
    the store, and clip_and_step makes the update torch.optim.AdamW + clip_grad_norm_ make in memory. `keep`:
    every activation kept instead of recomputed (under bf16 autocast the saved bf16 weight casts too)."""
    reference, streamed = lora_pair(tmp_path, tiny_args(tie_word_embeddings=tied, n_layers=3 + 2 * keep),
                                    train_base=True)
    streamed.keep_activations = keep
    resolved, resolve = [], streamed._unpack_saved  # the weights the backward read back from the store
    streamed._unpack_saved = lambda saved: (resolved.append(saved), resolve(saved))[1]
    for p in reference.parameters():
        p.requires_grad_(True)
    ref_losses, ref_norms = run_steps(reference, in_memory_step(reference), autocast=autocast)
    settings = offload.AdamWSettings(weight_decay=WEIGHT_DECAY)
    losses, norms = run_steps(streamed, lambda: streamed.clip_and_step(LR, MAX_NORM, settings), autocast=autocast)

    assert all(n > MAX_NORM for n in ref_norms)
    assert torch.equal(torch.stack(losses), torch.stack(ref_losses))
    assert torch.equal(torch.stack(norms), torch.stack(ref_norms))
    expected = {n: t for n, t in reference.state_dict().items() if ".lora_" not in n}
    if tied:
        del expected["output.weight"]
    assert_same(expected, streamed.stored_state_dict())
    assert_same(adapters(reference), adapters(streamed))
    tokens = {(name, cast) for name, cast, *_ in (t[1:] for t in resolved if not isinstance(t, torch.Tensor))}
    matrices = {n for n, t in expected.items() if n.startswith("layers.") and t.dim() == 2}
    vectors = {n for n in expected if n.startswith("layers.")} - matrices
    # no block weight (nor, under autocast, its bf16 cast) was held by autograd between forward and backward
    assert tokens == (set() if not keep else {(n, autocast) for n in matrices} | {(n, False) for n in vectors})
    # Gradient files are scratch overwritten in place each step (the equal later steps show nothing of an
    # earlier step's gradients survives): one fp32 gradient per stored weight on disk, however many steps ran.
    grad_files = list((tmp_path / "store" / "grads").iterdir())
    assert sorted(f.stem for f in grad_files) == sorted(streamed.store.units)
    stored_numel = sum(t.numel() for t in expected.values())
    assert 4 * stored_numel <= sum(f.stat().st_size for f in grad_files) < 4 * stored_numel + 4096 * len(grad_files)
    # Updated in place and not re-hashed, the store no longer vouches for its content, so it is never reused.
    assert not offload.BlockStore.open(tmp_path / "store", verify=False).pristine
    with pytest.raises(offload.OffloadError, match="trained in place"):
        offload.BlockStore.open(tmp_path / "store")


# ---- the store -----------------------------------------------------------------------------------------------------
def test_a_writable_mapping_updates_the_file_in_place_as_the_safetensors_package_reads_it(tmp_path):
    """The store's gradient and AdamW files are updated through writable mappings (no rewrite per step)."""
    from safetensors.torch import load_file as reference_load

    import safetensors_io

    path = tmp_path / "adamw.safetensors"
    safetensors_io.save_file({"step": torch.tensor(3.0), "exp_avg": torch.arange(6.0).view(2, 3)}, path)
    size, inode = path.stat().st_size, path.stat().st_ino
    mapped = safetensors_io.load_file(path, writable=True)
    mapped["step"] += 1
    mapped["exp_avg"].mul_(0.5)
    del mapped
    got = reference_load(path)
    assert got["step"].item() == 4.0 and torch.equal(got["exp_avg"], torch.arange(6.0).view(2, 3) * 0.5)
    assert (path.stat().st_size, path.stat().st_ino) == (size, inode)  # the same file, not a new one


def test_a_bf16_store_upcast_block_by_block_gives_the_in_memory_fp32_logits(tmp_path):
    torch.manual_seed(0)
    model = Transformer(tiny_args()).to(torch.bfloat16)
    store = offload.write_store_from_model(tmp_path / "store", model)
    assert load_dtypes(tmp_path / "store") == {"BF16"}  # stored as it came
    streamed = offload.open_streamed(store, compute_dtype=torch.float32).eval()
    tokens = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, _ = model.float()(tokens)
        logits, _ = streamed(tokens)
    assert logits.dtype == torch.float32 and torch.equal(logits, expected)


def streamed_lora_trains_as_in_memory_under_bf16_autocast(reference: Transformer, store) -> offload.StreamedTransformer:
    """The same adapters on `reference` (in memory) and on the store's streamed model, a few steps of each under
    bf16 autocast: bit-equal losses, gradient norms and adapters. Returns the streamed model."""
    torch.manual_seed(1)
    apply_lora(reference, LORA)
    streamed = offload.open_streamed(store, autocast_dtype=torch.bfloat16)
    torch.manual_seed(1)
    apply_lora(streamed, LORA)
    offload.materialize_adapters(streamed)
    ref_losses, ref_norms = run_steps(reference, in_memory_step(reference), autocast=True)
    losses, norms = run_steps(streamed, in_memory_step(streamed), autocast=True)
    assert torch.equal(torch.stack(losses), torch.stack(ref_losses))
    assert torch.equal(torch.stack(norms), torch.stack(ref_norms))
    assert_same(adapters(reference), adapters(streamed))
    return streamed


def test_under_bf16_autocast_a_bf16_store_is_held_in_bf16_and_lora_trains_as_in_memory(tmp_path):
    """Autocast casts every weight to bf16 for its product anyway, and a norm's bf16 weight promotes exactly:
    holding a bf16 store's blocks in bf16 (half an fp32 copy's memory) changes no number."""
    torch.manual_seed(0)
    reference = Transformer(tiny_args()).to(torch.bfloat16)
    store = offload.write_store_from_model(tmp_path / "store", reference)
    reference.float()  # in memory: the weights upcast, as starting weights are loaded
    streamed = streamed_lora_trains_as_in_memory_under_bf16_autocast(reference, store)
    streamed.load_outer()
    assert streamed.output.weight.dtype == torch.bfloat16  # held as stored, not upcast
    assert {t.dtype for buffers in streamed._block_buffers for t in buffers.values()} == {torch.bfloat16}


def test_under_bf16_autocast_a_frozen_fp32_stores_matrices_arrive_in_bf16_and_lora_trains_as_in_memory(tmp_path):
    """Autocast casts each linear weight to bf16 for every product; casting it once as the block is read gives the
    same numbers. The norms' vectors stay float32 (a norm multiplies in float32)."""
    torch.manual_seed(0)
    reference = Transformer(tiny_args())
    store = offload.write_store_from_model(tmp_path / "store", reference)
    streamed = streamed_lora_trains_as_in_memory_under_bf16_autocast(reference, store)
    held = {name: t.dtype for name, t in streamed._block_buffers[0].items()}
    assert {d for n, d in held.items() if n.endswith("norm.weight")} == {torch.float32}
    assert {d for n, d in held.items() if not n.endswith("norm.weight")} == {torch.bfloat16}


def load_dtypes(directory: Path) -> set[str]:
    from safetensors_io import read_header

    return {e["dtype"] for f in (directory / "weights").iterdir() for e in read_header(f)[0].values()}


def test_stores_from_meta_and_hf_directories_hold_what_the_loaders_load(tmp_path):
    for fmt in ("meta", "hf"):
        random_model.write_random_model(tmp_path / fmt, "tiny", fmt, torch.float32, seed=2)
        store = offload.write_store_from_checkpoint(tmp_path / f"store-{fmt}", tmp_path / fmt)
        streamed = offload.open_streamed(store)
        assert_same(checkpoint.load_model(tmp_path / fmt).state_dict(), streamed.stored_state_dict())
        assert [p.name for p in sorted((tmp_path / f"store-{fmt}" / "weights").iterdir())] == \
            ["layers.0.safetensors", "layers.1.safetensors", "norm.safetensors", "output.safetensors",
             "tok_embeddings.safetensors"]


def test_a_store_is_identified_by_its_content_and_a_changed_file_is_refused(tmp_path):
    torch.manual_seed(0)
    model = Transformer(tiny_args())
    a = offload.write_store_from_model(tmp_path / "a", model)
    b = offload.write_store_from_model(tmp_path / "b", model)
    with torch.no_grad():
        model.layers[1].ffn_norm.weight[0] += 1
    c = offload.write_store_from_model(tmp_path / "c", model)
    assert a.content_sha256 == b.content_sha256 != c.content_sha256
    assert offload.BlockStore.open(tmp_path / "a").content_sha256 == a.content_sha256

    # the same names, another model's block: same size, other bytes
    block = Path("weights") / "layers.1.safetensors"
    shutil.copyfile(tmp_path / "c" / block, tmp_path / "a" / block)
    with pytest.raises(offload.OffloadError, match=r"layers\.1\.safetensors: its content differs") as e:
        offload.BlockStore.open(tmp_path / "a")
    assert "\n" not in str(e.value)
    with pytest.raises(offload.OffloadError, match="already holds an offload store"):
        offload.write_store_from_model(tmp_path / "b", model)


def test_too_little_disk_space_is_refused_with_the_numbers_before_anything_is_written(tmp_path):
    torch.manual_seed(0)
    model = Transformer(tiny_args())
    free = shutil.disk_usage(tmp_path).free
    with pytest.raises(offload.OffloadError, match=r"needs \d+\.\d\d GB, only \d+\.\d\d GB free") as e:
        offload.write_store(tmp_path / "s", model.args, offload.model_units(model), needed_bytes=free + 10**12)
    assert "\n" not in str(e.value)
    assert not list((tmp_path / "s" / "weights").iterdir())
    # the estimate write_store_from_model checks is the weights' bytes
    store = offload.write_store_from_model(tmp_path / "t", model)
    written = sum(f.stat().st_size for f in (tmp_path / "t" / "weights").iterdir())
    expected = sum(t.numel() * 4 for n, t in model.state_dict().items())
    assert expected <= written <= expected + 4096 * len(store.units)
    assert json.loads((tmp_path / "t" / "manifest.json").read_text())["model_args"]["n_layers"] == 3


# ---- memory --------------------------------------------------------------------------------------------------------
# The child's own peak resident memory. Not getrusage's ru_maxrss: Linux carries the parent's high-water mark over
# fork and exec into it, so every child of this (large) test process would report at least the parent's peak;
# VmHWM belongs to the child's own address space.
PEAK_SCRIPT = """
import sys, torch
sys.path.insert(0, sys.argv[1])
import offload
from lora import LoRASettings, apply_lora
from model import ModelArgs, Transformer
torch.set_num_threads(1)
mode, where, n_layers = sys.argv[2], sys.argv[3], int(sys.argv[4])
if mode == "streamed":
    model = offload.open_streamed(offload.BlockStore.open(where, verify=False))
    apply_lora(model, LoRASettings(rank=4))
    offload.materialize_adapters(model)
else:
    model = Transformer(ModelArgs(dim=512, n_layers=n_layers, n_heads=8, vocab_size=512, max_seq_len=64))
    apply_lora(model, LoRASettings(rank=4))
tokens = torch.randint(0, 512, (1, 64))
_, loss = model(tokens, tokens, return_logits=False)
loss.backward()
print(next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:")))
"""


@pytest.mark.e2e
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads Linux's VmHWM")
def test_peak_memory_of_a_streamed_step_stays_flat_with_depth_while_in_memory_grows(tmp_path):
    def peak(mode: str, n_layers: int) -> int:
        where = tmp_path / f"store{n_layers}"
        if mode == "streamed" and not where.exists():
            torch.manual_seed(0)
            model = Transformer(ModelArgs(dim=512, n_layers=n_layers, n_heads=8, vocab_size=512, max_seq_len=64))
            offload.write_store_from_model(where, model)
            del model
        out = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(ROOT), mode, str(where), str(n_layers)],
                             capture_output=True, text=True, check=True, env={"OMP_NUM_THREADS": "1", "PATH": ""})
        return int(out.stdout.split()[-1]) * 1024  # kB

    block_bytes = 4 * (4 * 512 * 512 + 3 * 512 * 1536)  # fp32 wq wk wv wo + w1 w2 w3 (ffn 1536)
    streamed = {n: peak("streamed", n) for n in (2, 16)}
    in_memory = {n: peak("in_memory", n) for n in (2, 16)}
    print({"streamed": streamed, "in_memory": in_memory})
    assert streamed[16] <= 1.3 * streamed[2], streamed
    assert in_memory[16] - in_memory[2] >= 10 * block_bytes, in_memory  # 14 more blocks held
    # what streaming adds with depth (each block's saved input, allocator slack) is a fraction of those blocks
    assert streamed[16] - streamed[2] < 0.25 * (in_memory[16] - in_memory[2]), (streamed, in_memory)
