"""HellaSwag scoring against independent references: lm-evaluation-harness's own hellaswag task and
request construction (`TemplateLM._encode_pair`) for what is scored, transformers' LlamaForCausalLM
for the per-ending log-likelihoods, the harness's `process_results` for acc and acc_norm, hand
computation for acc_norm_tokens and the text preprocessing.

A tiny random model with Llama 3's real vocabulary (the real tokenizer is used), a fixture in the
official jsonl schema written here, no network: the harness's task is built from its installed
hellaswag.yaml with the fixture as its dataset.
"""

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.task import ConfigurableTask
from lm_eval.tasks._yaml_loader import load_yaml

from checkpoint import save_checkpoint
from hellaswag_utils import (
    HELLASWAG_LINES,
    Example,
    HellaSwagDataError,
    encode_example,
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
         ["cross the finish line.", "stop.", "m n o p", "congratulate themselves wholeheartedly"], 2),
    # WikiHow contexts ending in a marker, which cleaning turns into a trailing space; endings that
    # begin with a marker (so with a space once cleaned) or hold characters of several bytes. On the
    # first, acc_norm picks ending 0 with the harness's requests and ending 3 with the space left in
    # the context.
    item("Car care", "[header] How to wash a car [title] Rinse the car. [step]", "",
         ["[substeps] Use a hose to wet it.", "Dry it — naïve café, 日本語 ✓", "[title] Wax it.", "Park it."], 0),
    item("Dress", "[header] How to tie a tie", "[title]",
         ["Cross the wide end over the narrow end.", "🙂🙂 tie it.", "Ça va très bien, merci.",
          "[step] Pull it tight."], 0),
]
N_VALID = 9  # odd, so two ranks get unequal shares
VALID_ITEMS = [i for i in ITEMS if i["activity_label"] != "Malformed"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


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


# ---- the independent reference: the harness's requests, scored by transformers' Llama ------------
class HarnessLM(TemplateLM):
    """The harness's own request path (`loglikelihood` -> `_encode_pair`) with our tokenizer plugged in,
    BOS in front as HFLM does for Llama 3 (its tokenizer adds <|begin_of_text|> by default), scored
    by HF's model one request at a time, unpadded."""

    def __init__(self, tok: Tokenizer, hf_model):
        super().__init__()
        self.tok, self.hf_model, self.encoded = tok, hf_model, []

    @property
    def eot_token_id(self) -> int:
        return self.tok.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.tok.bos_id

    def tok_encode(self, string: str, add_special_tokens=None, **kwargs) -> list[int]:
        return self.tok.encode(string, bos=add_special_tokens is not False, eos=False)

    @torch.no_grad()
    def _loglikelihood_tokens(self, requests, **kwargs) -> list[tuple[float, bool]]:
        results = []
        for _, context, continuation in requests:
            self.encoded.append((context, continuation))
            logprobs = self.hf_model(torch.tensor([context + continuation])).logits[0].float().log_softmax(-1)
            picked = [logprobs[len(context) + k - 1, token].item() for k, token in enumerate(continuation)]
            results.append((sum(picked), False))
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        raise NotImplementedError

    def generate_until(self, requests, disable_tqdm: bool = False):
        raise NotImplementedError


@pytest.fixture(scope="module")
def harness_task() -> ConfigurableTask:
    """The installed hellaswag task (its yaml, process_docs, delimiter), reading the fixture's items."""
    import lm_eval.tasks

    config = load_yaml(Path(lm_eval.tasks.__file__).parent / "hellaswag" / "hellaswag.yaml")
    records = [{**i, "label": str(i["label"])} for i in VALID_ITEMS]  # one type per column, as on the hub
    data = datasets.DatasetDict({split: datasets.Dataset.from_list(records) for split in ("train", "validation")})
    return ConfigurableTask(config={**config, "custom_dataset": lambda **_: data})


@pytest.fixture(scope="module")
def reference(model, tok, harness_task) -> dict:
    """Per-ending log-likelihood sums and token counts (N, 4), the (context, continuation) token
    lists per ending, and acc and acc_norm: requests, tokens and metrics from the harness's own
    code, log-likelihoods from HF's model."""
    lm = HarnessLM(tok, to_hf(model))
    docs = list(harness_task.validation_docs())
    sums, counts, metrics = [], [], []
    for doc in docs:
        context = harness_task.fewshot_context(doc, num_fewshot=0)
        instances = harness_task.construct_requests(doc, context, metadata=("hellaswag", 0, 1))
        results = lm.loglikelihood(instances, disable_tqdm=True)
        sums.append([ll for ll, _ in results])
        counts.append([len(cont) for _, cont in lm.encoded[-len(results):]])
        metrics.append(harness_task.process_results(doc, results))
    return {"sums": torch.tensor(sums, dtype=torch.float64), "counts": torch.tensor(counts),
            "pairs": [lm.encoded[i : i + 4] for i in range(0, len(lm.encoded), 4)], "docs": docs,
            "acc": sum(m["acc"] for m in metrics) / len(docs),
            "acc_norm": sum(m["acc_norm"] for m in metrics) / len(docs)}


def expected_accuracies(reference) -> dict[str, float]:
    """acc and acc_norm as the harness reports them; acc_norm_tokens by hand from the reference sums
    (argmax of sum / ending tokens, first index on ties)."""
    def argmax(values):
        return max(range(len(values)), key=lambda j: (values[j], -j))

    labels = [int(doc["gold"]) for doc in reference["docs"]]
    per_token = [argmax([s / c for s, c in zip(srow, crow)])
                 for srow, crow in zip(reference["sums"].tolist(), reference["counts"].tolist())]
    right = sum(p == label for p, label in zip(per_token, labels))
    return {"acc": reference["acc"], "acc_norm": reference["acc_norm"], "acc_norm_tokens": right / len(labels)}


# ---- data ----------------------------------------------------------------------------------------
def test_context_and_endings_are_preprocessed_like_lm_eval_harness(examples):
    # Worked by hand from harness's preprocess(activity_label + ": " + ctx_a + " " + ctx_b.capitalize()).
    wikihow = examples[1]
    assert wikihow.context == "Home and Garden: How to clean gutters. Set up a ladder. Lean it against the wall. Then"
    assert examples[0].context == "Roof shingle removal: A man is sitting on a roof. He"
    assert examples[3].context == "Shaving: A boy puts shaving cream on his face. The boy"
    assert wikihow.endings[1] == "scoop out the leaves, twigs and dirt by hand."  # no leading space kept
    assert wikihow.label == 2


def test_context_and_endings_equal_the_harness_docs(examples, harness_task):
    docs = list(harness_task.validation_docs())
    assert [(e.context, list(e.endings), e.label) for e in examples] == [
        (d["query"], d["choices"], int(d["gold"])) for d in docs]
    # The fixture exercises what the harness treats specially.
    assert sum(e.context != e.context.rstrip() for e in examples) == 2
    assert any(ending.startswith(" ") for e in examples for ending in e.endings)
    assert any(len(ending) != len(ending.encode("utf-8")) for e in examples for ending in e.endings)


def test_malformed_items_are_skipped_and_counted(fixture_path):
    examples, skipped = load_examples(fixture_path)
    assert (len(examples), skipped) == (N_VALID, 2)  # three endings; label 7
    assert [e.context.split(":")[0] for e in examples] == [i["activity_label"] for i in ITEMS
                                                           if i["activity_label"] != "Malformed"]
    # The limit counts well-formed items; malformed ones met on the way are still reported.
    limited, skipped = load_examples(fixture_path, limit=5)
    assert [e.context for e in limited] == [e.context for e in examples[:5]] and skipped == 1


# ---- scores --------------------------------------------------------------------------------------
def test_each_ending_is_tokenized_as_the_harness_builds_its_request(tok, examples, reference):
    # Trailing whitespace of a context moves into the continuation, whose tokens come from the
    # encoding of context + continuation joined; BOS starts the context.
    for example, pairs in zip(examples, reference["pairs"]):
        assert encode_example(tok, example) == pairs, example.context


def test_ending_logliks_match_the_harness_requests_through_hf_llama(model, tok, examples, reference):
    sums, counts = score_examples(model, tok, examples, batch_size=3)
    assert reference["sums"].std() > 1.0, "reference scores too alike for the comparison to mean anything"
    assert torch.equal(counts, reference["counts"])
    assert (sums - reference["sums"]).abs().max().item() <= 1e-4


def test_batch_size_does_not_change_scores(model, tok, examples):
    one, counts_one = score_examples(model, tok, examples, batch_size=1)
    sums, counts = score_examples(model, tok, examples, batch_size=4)  # 4, 4 and 1 examples: padded rows
    assert torch.equal(counts, counts_one)
    # Different padded shapes may reorder float32 sums inside the matmuls; nothing more.
    assert (sums - one).abs().max().item() <= 1e-5


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


def test_accuracies_match_the_harness_metrics(model, tok, examples, reference):
    expected = expected_accuracies(reference)
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
    assert [s["n"] for s in shares] == [5, 4]
    for key in ("acc", "acc_norm", "acc_norm_tokens"):
        assert sum(round(s[key] * s["n"]) for s in shares) == round(single[key] * single["n"]), key


def _printed_result(text: str) -> dict:
    match = re.search(r"hellaswag \| (\d+) examples \((\d+) skipped\) \| acc ([\d.]+) \| acc_norm ([\d.]+) \| "
                      r"acc_norm_tokens ([\d.]+) \| [\d.]+ examples/s", text)
    assert match, text
    n, skipped, acc, acc_norm, acc_norm_tokens = match.groups()
    return {"n": int(n), "skipped": int(skipped), "acc": float(acc), "acc_norm": float(acc_norm),
            "acc_norm_tokens": float(acc_norm_tokens)}


def _assert_printed_matches(printed: dict, expected: dict):
    assert printed["n"] == N_VALID and printed["skipped"] == 2
    for key, value in expected.items():
        assert printed[key] == pytest.approx(value, abs=5e-5), key  # printed with 4 decimals


@pytest.fixture(scope="module")
def project_checkpoint(model, tok, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "step_000001.pt"
    save_checkpoint(path, model, tokenizer_path=str(tok.path))
    return path


@pytest.mark.e2e
def test_two_torchrun_ranks_print_the_single_process_result(project_checkpoint, fixture_path, examples, reference):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(ROOT / "hellaswag_utils.py"), "--checkpoint", str(project_checkpoint), "--path", str(fixture_path),
         "--device", "cpu", "--batch_size", "2"],
        capture_output=True, text=True, env=env, timeout=180)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stdout.count("hellaswag |") == 1, "only rank 0 reports"
    _assert_printed_matches(_printed_result(result.stdout), expected_accuracies(reference))


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


@pytest.mark.parametrize("form", ["project checkpoint", "meta directory", "LoRA adapter checkpoint"])
def test_cli_prints_the_harness_accuracies(form, model, tok, project_checkpoint, fixture_path, examples,
                                                 reference, tmp_path, capsys):
    """Adapters are merged onto their base in memory; together they are `model` (tests/lora_helpers.py)."""
    from lora_helpers import adapter_checkpoint_for

    path = {"project checkpoint": lambda: project_checkpoint,
            "meta directory": lambda: _meta_dir(model, tok, tmp_path / "meta"),
            "LoRA adapter checkpoint": lambda: adapter_checkpoint_for(model, tmp_path, tokenizer_path=str(tok.path))
            }[form]()
    code = main(["--checkpoint", str(path), "--path", str(fixture_path), "--device", "cpu", "--dtype", "fp32",
                 "--batch_size", "4"])
    out = capsys.readouterr().out
    assert code == 0
    _assert_printed_matches(_printed_result(out), expected_accuracies(reference))


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
