"""HellaSwag scoring against independent references: transformers' LlamaForCausalLM for the
per-ending log-likelihoods, hand computation for the accuracies and the text preprocessing.

A tiny random model with Llama 3's real vocabulary (the real tokenizer is used), a fixture in the
official jsonl schema written here, no network.
"""

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from checkpoint import save_checkpoint
from hellaswag_utils import (
    HELLASWAG_LINES,
    Example,
    HellaSwagDataError,
    ending_lengths,
    evaluate,
    load_examples,
    main,
    predictions,
    score_examples,
)
from hf_convert import to_hf
from model import ModelArgs, Transformer
from reference_weights import o1_random_
from tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[1]
ARGS = ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128256, multiple_of=32, max_seq_len=256,
                 tie_word_embeddings=True)


def item(activity, ctx_a, ctx_b, endings, label):
    """A record in the official schema (fields the scorer ignores included)."""
    return {"ind": 0, "activity_label": activity, "ctx_a": ctx_a, "ctx_b": ctx_b, "ctx": f"{ctx_a} {ctx_b}".strip(),
            "split": "val", "split_type": "indomain", "label": label, "endings": endings, "source_id": "fixture"}


# Endings differ in tokens per character (long words, single letters, numbers) so the three
# accuracies choose differently; the labels then make the three scores differ.
ITEMS = [
    item("Roof shingle removal", "A man is sitting on a roof.", "he",
         ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.",
          "is holding a rubik's cube.", "starts pulling up roofing on a roof."], 1),
    item("Home and Garden", "[header] How to clean gutters [title] Set up a ladder. [step] Lean it against the wall.",
         "then", ["climb up.", "scoop out the leaves, twigs and dirt by hand.", "a b c d e f g",
                  "extraordinarily meticulous craftsmanship"], "2"),  # the HF copy's text label
    item("Playing piano", "A woman sits at a piano.", "she",
         ["plays.", "1 2 3 4 5 6 7 8", "performs magnificent compositions effortlessly",
          "walks to the kitchen and makes a sandwich."], 2),
    item("Shaving", "A boy puts shaving cream on his face.", "the boy",
         ["shaves his face with a razor.", "x y z", "enthusiastically photographs neighbourhood architecture",
          "eats it."], 3),
    item("Malformed", "Only three endings here.", "so", ["one.", "two.", "three."], 0),
    item("Sailing", "A crew hoists a sail on a boat.", "the boat",
         ["sails away across the bay.", "sinks.", "q r s t u v", "circumnavigates unfathomably"], 2),
    item("Malformed", "The label is out of range.", "it", ["a.", "b.", "c.", "d."], 7),
    item("Baking", "A chef cracks eggs into a bowl.", "she",
         ["whisks them.", "bakes a cake for an hour in the oven.", "9 8 7 6 5", "caramelizes"], 3),
    item("Running", "People run down a road.", "they",
         ["cross the finish line.", "stop.", "m n o p", "congratulate themselves wholeheartedly"], 3),
]
N_VALID = 7  # odd, so two ranks get unequal shares


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer()


@pytest.fixture(scope="module")
def fixture_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("hellaswag") / "val.jsonl"
    path.write_text("".join(json.dumps(i) + "\n" for i in ITEMS))
    return path


@pytest.fixture(scope="module")
def examples(fixture_path) -> list[Example]:
    return load_examples(fixture_path)[0]


@pytest.fixture(scope="module")
def model() -> Transformer:
    """O(1) random weights: the default init's near-uniform logits would hide mistakes."""
    torch.manual_seed(0)
    return o1_random_(Transformer(ARGS))


# ---- the independent reference: transformers' Llama on the same weights -------------------------
@pytest.fixture(scope="module")
def reference(model, tok, examples) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-ending log-likelihood sums and token counts (N, 4): each ending run alone, unpadded,
    through HF's model, as BOS + context tokens followed by the separately encoded " " + ending."""
    hf = to_hf(model)
    sums, counts = torch.zeros(len(examples), 4, dtype=torch.float64), torch.zeros(len(examples), 4)
    with torch.no_grad():
        for i, ex in enumerate(examples):
            context = tok.encode(ex.context, bos=True, eos=False)
            for j, ending in enumerate(ex.endings):
                ending_ids = tok.encode(" " + ending, bos=False, eos=False)
                logprobs = hf(torch.tensor([context + ending_ids])).logits[0].float().log_softmax(-1)
                for k, token in enumerate(ending_ids):
                    sums[i, j] += logprobs[len(context) + k - 1, token].item()
                counts[i, j] = len(ending_ids)
    return sums, counts


def hand_accuracies(examples, sums, counts) -> dict[str, float]:
    """Argmax of sums; of sums / characters of the ending (lm-evaluation-harness's len(choice));
    of sums / ending tokens. Plain Python, first index on ties."""
    def argmax(values):
        return max(range(len(values)), key=lambda j: (values[j], -j))

    right = {"acc": 0, "acc_norm": 0, "acc_norm_tokens": 0}
    for ex, s, c in zip(examples, sums.tolist(), counts.tolist()):
        right["acc"] += argmax(s) == ex.label
        right["acc_norm"] += argmax([s[j] / len(ex.endings[j]) for j in range(4)]) == ex.label
        right["acc_norm_tokens"] += argmax([s[j] / c[j] for j in range(4)]) == ex.label
    return {k: v / len(examples) for k, v in right.items()}


# ---- data ----------------------------------------------------------------------------------------
def test_context_and_endings_are_preprocessed_like_lm_eval_harness(examples):
    # Worked by hand from harness's preprocess(activity_label + ": " + ctx_a + " " + ctx_b.capitalize()).
    wikihow = examples[1]
    assert wikihow.context == "Home and Garden: How to clean gutters. Set up a ladder. Lean it against the wall. Then"
    assert examples[0].context == "Roof shingle removal: A man is sitting on a roof. He"
    assert examples[3].context == "Shaving: A boy puts shaving cream on his face. The boy"
    assert wikihow.endings[1] == "scoop out the leaves, twigs and dirt by hand."  # no leading space kept
    assert wikihow.label == 2


def test_malformed_items_are_skipped_and_counted(fixture_path):
    examples, skipped = load_examples(fixture_path)
    assert (len(examples), skipped) == (N_VALID, 2)  # three endings; label 7
    assert [e.context.split(":")[0] for e in examples] == [i["activity_label"] for i in ITEMS
                                                           if i["activity_label"] != "Malformed"]
    # The limit counts well-formed items; malformed ones met on the way are still reported.
    limited, skipped = load_examples(fixture_path, limit=5)
    assert [e.context for e in limited] == [e.context for e in examples[:5]] and skipped == 1


# ---- scores --------------------------------------------------------------------------------------
def test_ending_logliks_match_hf_llama(model, tok, examples, reference):
    sums, counts = score_examples(model, tok, examples, batch_size=3)
    ref_sums, ref_counts = reference
    assert ref_sums.std() > 1.0, "reference scores too alike for the comparison to mean anything"
    assert torch.equal(counts.double(), ref_counts.double())
    assert (sums - ref_sums).abs().max().item() <= 1e-4


def test_batch_size_does_not_change_scores(model, tok, examples):
    one, counts_one = score_examples(model, tok, examples, batch_size=1)
    for batch_size in (3, 8):
        sums, counts = score_examples(model, tok, examples, batch_size=batch_size)
        assert torch.equal(counts, counts_one)
        # Different padded shapes may reorder float32 sums inside the matmuls; nothing more.
        assert (sums - one).abs().max().item() <= 1e-5, batch_size


def test_padding_next_to_a_much_longer_example_does_not_change_a_score(model, tok, examples):
    short = examples[2]
    long = Example(context=" ".join(["The quick brown fox jumps over the lazy dog."] * 10), label=0,
                   endings=("runs.", "sleeps under a tree.", "barks.", "jumps again over every dog."))
    assert len(tok.encode(long.context, bos=True, eos=False)) > 5 * len(tok.encode(short.context, bos=True, eos=False))
    alone, _ = score_examples(model, tok, [short], batch_size=1)
    for batch in ([short, long], [long, short]):
        together, _ = score_examples(model, tok, batch, batch_size=2)
        row = batch.index(short)
        assert (together[row] - alone[0]).abs().max().item() <= 1e-5


def test_acc_norm_divides_by_characters_and_acc_norm_tokens_by_tokens():
    # Hand numbers: ending 0 wins on the sum, ending 1 per character, ending 2 per token; dividing
    # by one character more (the separating space) would pick ending 0 instead of 1.
    loglik = torch.tensor([[-1.0, -1.9, -3.0, -40.0]], dtype=torch.float64)
    n_chars = torch.tensor([[1.0, 2.0, 2.0, 40.0]], dtype=torch.float64)  # -1.0, -0.95, -1.5, -1.0
    n_tokens = torch.tensor([[1, 1, 6, 8]])  # -1.0, -1.9, -0.5, -5.0
    chosen = predictions(loglik, n_tokens, n_chars)
    assert (chosen["acc"].item(), chosen["acc_norm"].item(), chosen["acc_norm_tokens"].item()) == (0, 1, 2)
    # Lengths are lm-evaluation-harness's len(choice): characters, not bytes, no leading space.
    example = Example(context="c", endings=("café.", "naïve idea", "ok", "🙂"), label=0)
    assert ending_lengths(example) == [5, 10, 2, 1]


def test_accuracies_match_hand_computation_from_reference_logliks(model, tok, examples, reference):
    expected = hand_accuracies(examples, *reference)
    assert len(set(expected.values())) == 3, f"fixture does not tell the three rules apart: {expected}"
    model.train()  # as train.py hands it over
    try:
        result = evaluate(model, tok, examples, batch_size=3)
        assert model.training, "evaluate must give back the mode it was handed"
    finally:
        model.eval()
    assert result["n"] == N_VALID
    for key, value in expected.items():
        assert result[key] == pytest.approx(value, abs=1e-12), key


# ---- ranks ---------------------------------------------------------------------------------------
def test_rank_shares_are_disjoint_and_add_up_to_the_single_process_counts(model, tok, examples):
    # Without a process group the all-reduce is a no-op, so each call reports its own share.
    single = evaluate(model, tok, examples, batch_size=2)
    shares = [evaluate(model, tok, examples, batch_size=2, rank=r, world_size=2) for r in (0, 1)]
    assert [s["n"] for s in shares] == [4, 3]
    for key in ("acc", "acc_norm", "acc_norm_tokens"):
        assert sum(round(s[key] * s["n"]) for s in shares) == round(single[key] * single["n"]), key


def _printed_result(text: str) -> dict:
    match = re.search(r"hellaswag \| (\d+) examples \((\d+) skipped\) \| acc ([\d.]+) \| acc_norm ([\d.]+) \| "
                      r"acc_norm_tokens ([\d.]+) \| [\d.]+ examples/s", text)
    assert match, text
    n, skipped, acc, acc_norm, acc_norm_tokens = match.groups()
    return {"n": int(n), "skipped": int(skipped), "acc": float(acc), "acc_norm": float(acc_norm),
            "acc_norm_tokens": float(acc_norm_tokens)}


def _assert_printed_matches_hand(printed: dict, expected: dict):
    assert printed["n"] == N_VALID and printed["skipped"] == 2
    for key, value in expected.items():
        assert printed[key] == pytest.approx(value, abs=5e-5), key  # printed with 4 decimals


@pytest.fixture(scope="module")
def project_checkpoint(model, tok, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "step_000001.pt"
    save_checkpoint(path, model, tokenizer_path=str(tok.path))
    return path


def test_two_torchrun_ranks_print_the_single_process_result(project_checkpoint, fixture_path, examples, reference):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(ROOT / "hellaswag_utils.py"), "--checkpoint", str(project_checkpoint), "--path", str(fixture_path),
         "--device", "cpu", "--batch_size", "2"],
        capture_output=True, text=True, env=env, timeout=180)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stdout.count("hellaswag |") == 1, "only rank 0 reports"
    _assert_printed_matches_hand(_printed_result(result.stdout), hand_accuracies(examples, *reference))


# ---- command line --------------------------------------------------------------------------------
def _meta_dir(model: Transformer, tok: Tokenizer, root: Path) -> Path:
    """Meta's layout: params.json + consolidated.00.pth (tied: no output.weight) + tokenizer.model."""
    root.mkdir()
    a = model.args
    (root / "params.json").write_text(json.dumps({"dim": a.dim, "n_layers": a.n_layers, "n_heads": a.n_heads,
                                                  "n_kv_heads": a.n_kv_heads, "vocab_size": a.vocab_size,
                                                  "multiple_of": a.multiple_of, "norm_eps": a.norm_eps,
                                                  "rope_theta": a.rope_theta, "use_scaled_rope": False}))
    state = {k: v for k, v in model.state_dict().items() if k != "output.weight"}
    torch.save(state, root / "consolidated.00.pth")
    (root / "tokenizer.model").symlink_to(tok.path)
    return root


@pytest.mark.parametrize("form", ["project checkpoint", "meta directory"])
def test_cli_prints_the_hand_computed_accuracies(form, model, tok, project_checkpoint, fixture_path, examples,
                                                 reference, tmp_path, capsys):
    path = project_checkpoint if form == "project checkpoint" else _meta_dir(model, tok, tmp_path / "meta")
    code = main(["--checkpoint", str(path), "--path", str(fixture_path), "--device", "cpu", "--dtype", "fp32",
                 "--batch_size", "4"])
    out = capsys.readouterr().out
    assert code == 0
    _assert_printed_matches_hand(_printed_result(out), hand_accuracies(examples, *reference))


def test_cli_limit_scores_only_the_first_items(project_checkpoint, fixture_path, capsys):
    assert main(["--checkpoint", str(project_checkpoint), "--path", str(fixture_path), "--limit", "2",
                 "--device", "cpu"]) == 0
    assert "hellaswag | 2 examples" in capsys.readouterr().out


def test_cli_reports_a_missing_file_as_one_error_line(project_checkpoint, tmp_path, capsys):
    code = main(["--checkpoint", str(project_checkpoint), "--path", str(tmp_path / "nope.jsonl"), "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1 and "nope.jsonl" in err


# ---- the official file: offline message, download, cache, verification --------------------------
def test_offline_without_local_file_says_where_to_get_and_put_it(tmp_path):
    url = "http://127.0.0.1:9/x"  # discard port: refused at once, nothing leaves the machine
    with pytest.raises(HellaSwagDataError) as info:
        load_examples(None, cache_dir=tmp_path / "cache", url=url)
    message = str(info.value)
    assert "\n" not in message and "offline" in message
    assert url in message and str(tmp_path / "cache" / "hellaswag_val.jsonl") in message
    assert "HELLASWAG_PATH" in message
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


def _official_sized_file(path: Path, lines: int) -> Path:
    record = json.dumps(item("Fake", "A cat sits.", "it", ["purrs.", "naps.", "eats.", "leaves."], 1))
    path.write_text((record + "\n") * lines)
    return path


def test_download_is_cached_and_later_loads_are_verified(tmp_path):
    source = _official_sized_file(tmp_path / "served.jsonl", HELLASWAG_LINES)
    cache = tmp_path / "cache"
    examples, skipped = load_examples(None, limit=3, cache_dir=cache, url=source.as_uri())  # file://, no network
    assert (len(examples), skipped) == (3, 0)
    cached = cache / "hellaswag_val.jsonl"
    assert cached.read_bytes() == source.read_bytes()
    assert (cache / "hellaswag_val.jsonl.sha256").read_text().strip() == hashlib.sha256(source.read_bytes()).hexdigest()
    assert [p.name for p in cache.iterdir() if p.name.startswith(".")] == []  # no temporary left behind

    # Cached: a later load needs no network.
    assert len(load_examples(None, cache_dir=cache, url="http://127.0.0.1:9/x")[0]) == HELLASWAG_LINES
    # Changed on disk with the same line count: refused.
    cached.write_text(cached.read_text().replace("purrs", "hisses", 1))
    with pytest.raises(HellaSwagDataError, match="sha256"):
        load_examples(None, cache_dir=cache, url=source.as_uri())


def test_truncated_download_is_rejected_and_not_cached(tmp_path):
    source = _official_sized_file(tmp_path / "served.jsonl", HELLASWAG_LINES - 1)
    with pytest.raises(HellaSwagDataError, match=f"expected the official validation split's {HELLASWAG_LINES}"):
        load_examples(None, cache_dir=tmp_path / "cache", url=source.as_uri())
    assert not (tmp_path / "cache" / "hellaswag_val.jsonl").exists()
