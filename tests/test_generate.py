"""Generation: greedy decoding equals transformers' `generate` on the same weights (the CPU's reordered
decode kernels that generate.py's entry points switch on are tested in test_speedups.py)."""

from contextlib import nullcontext

import pytest
import torch

from generate import chat_loop, generate_tokens, show_prompt
from hf_convert import to_hf
from model import ModelArgs, Transformer
from reference_weights import o1_random_
from speedups import reordered_linears

ARGS = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=300, multiple_of=32, max_seq_len=64)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def build(dtype: torch.dtype = torch.float32, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return o1_random_(Transformer(ARGS)).to(dtype).eval()


def prompt(n: int = 12) -> list[int]:
    return torch.randint(0, ARGS.vocab_size, (n,), generator=torch.Generator().manual_seed(3)).tolist()


@pytest.mark.parametrize("kernels", [nullcontext, reordered_linears], ids=["plain", "reordered_linears"])
def test_greedy_tokens_equal_transformers_generate(kernels):
    """Plain, and with the CPU kernels generate.py's main switches on."""
    model = build()
    ids = prompt()
    with kernels(model):
        ours = list(generate_tokens(model, ids, max_new_tokens=40, stop_ids=[]))
    hf = to_hf(model).eval()
    x = torch.tensor([ids])
    out = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=40, min_new_tokens=40, do_sample=False,
                      pad_token_id=0)
    assert ours == out[0, len(ids):].tolist()


def test_stop_token_ends_generation_and_is_not_yielded():
    model = build()
    free = list(generate_tokens(model, prompt(), max_new_tokens=20, stop_ids=[]))
    stopped = list(generate_tokens(model, prompt(), max_new_tokens=20, stop_ids=[free[5]]))
    assert stopped == free[:free.index(free[5])]


def test_prefill_logits_to_keep_is_the_last_row_of_full_logits():
    model = build()
    x = torch.tensor([prompt(20)])
    with torch.no_grad():
        full, _ = model(x)
        last, _ = model(x, logits_to_keep=1)
    assert last.shape == (1, 1, ARGS.vocab_size)
    assert (last[0, 0] - full[0, -1]).abs().max().item() <= 1e-5  # M=1 and M=20 GEMMs may round apart


def test_prompt_is_shown_before_the_completion_dimmed_on_a_terminal():
    import io

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    plain, terminal = io.StringIO(), Terminal()
    show_prompt("The capital of", plain)
    show_prompt("The capital of", terminal)
    assert plain.getvalue() == "The capital of\n---\n"
    assert terminal.getvalue() == "\033[2mThe capital of\033[0m"


def test_interactive_chat_keeps_the_history_resets_it_and_leaves_on_ctrl_d():
    """Each turn's prompt is the whole conversation so far in the chat format; /reset forgets it."""
    import argparse
    import io

    from tokenizer import Tokenizer

    tok = Tokenizer()
    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=tok.n_words, multiple_of=32,
                                  max_seq_len=128)).eval()
    prompts = []
    original = tok.encode_chat
    tok.encode_chat = lambda messages, **kw: prompts.append([dict(m) for m in messages]) or original(messages, **kw)
    lines = iter(["hello", "and then?", "/reset", "again"])

    def read(_):
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    args = argparse.Namespace(max_new_tokens=3, temperature=0.0, top_k=0, top_p=1.0, seed=None)
    out = io.StringIO()
    chat_loop(model, tok, args, read=read, out=out)
    first_answer = prompts[1][1]
    assert [m["role"] for m in prompts[0]] == ["user"] and prompts[0][0]["content"] == "hello"
    assert [m["content"] for m in prompts[1]] == ["hello", first_answer["content"], "and then?"]
    assert first_answer["role"] == "assistant"
    assert prompts[2] == [{"role": "user", "content": "again"}]  # forgotten after /reset
    assert "(history cleared)" in out.getvalue()


@pytest.mark.e2e
def test_generate_refuses_a_tokenizer_other_than_the_checkpoints_with_one_line(tmp_path):
    """The recorded tokenizer file is gone and Meta's default differs from it: no silent substitution."""
    import subprocess
    import sys
    from pathlib import Path

    from checkpoint import save_checkpoint
    from tokenizer import Tokenizer, default_tokenizer_path

    lines = default_tokenizer_path().read_text().splitlines()
    altered = tmp_path / "altered.model"
    altered.write_text("\n".join(lines[:-1]) + "\n")  # one rank fewer: another tokenizer
    tok = Tokenizer(altered)
    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=128256, multiple_of=32,
                                  max_seq_len=32))
    ckpt = tmp_path / "model.pt"
    save_checkpoint(ckpt, model, tokenizer=tok.identity(), tokenizer_path=str(altered))
    altered.unlink()
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, str(root / "generate.py"), "--checkpoint", str(ckpt), "--prompt", "Hi"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert str(altered) in out.stderr and "no longer there" in out.stderr and "--tokenizer" in out.stderr


def test_generate_cli_reads_an_adapter_checkpoint_merged_onto_its_base_in_memory(tmp_path, capsys):
    """As PEFT users do: no merged copy on disk. The reference is transformers' greedy decoding of the model the
    adapters merge to."""
    import generate
    from lora_helpers import adapter_checkpoint_for
    from tokenizer import Tokenizer

    tok = Tokenizer()
    torch.manual_seed(0)
    model = o1_random_(Transformer(ModelArgs(dim=32, n_layers=2, n_heads=2, n_kv_heads=1, vocab_size=tok.n_words,
                                             multiple_of=32, max_seq_len=64))).eval()
    adapters = adapter_checkpoint_for(model, tmp_path, tokenizer=tok.identity(), tokenizer_path=str(tok.path))
    ids = tok.encode("The capital of France is", bos=True, eos=False)
    x = torch.tensor([ids])
    out = to_hf(model).generate(x, attention_mask=torch.ones_like(x), max_new_tokens=8, min_new_tokens=8,
                                do_sample=False, pad_token_id=0)
    expected = tok.decode(out[0, len(ids):].tolist())
    assert generate.main(["--checkpoint", str(adapters), "--prompt", "The capital of France is", "--temperature", "0",
                          "--max_new_tokens", "8", "--quiet", "--device", "cpu", "--dtype", "fp32"]) == 0
    assert capsys.readouterr().out == expected + "\n"
