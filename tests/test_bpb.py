"""Bits per byte: train.validate()'s `val_bpb` and the manifest's bytes per token, against hand computations
(full logits through F.cross_entropy; bytes counted by decoding the target tokens to text and encoding it as
UTF-8; special tokens left out of both sums, as nanochat's evaluate_bpb leaves them out)."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from config import Config
from dataloaders import ChatDataLoader, PretrainDataLoader
from distributed import DistInfo
from load_pretrain_dataset import prepare_pretrain_dataset
from data_sources import Source
from model import ModelArgs, Transformer
from reference_weights import o1_random_
from stages import Distillation, Setting, SFTStage, Stage
from train import validate
from prep_helpers import prepare_chat_tasks

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CPU = DistInfo(0, 0, 1, torch.device("cpu"))
SEQ = 48
TEXTS = ["The café's naïve Straße: 日本語 and привет, mixed with code: def f(x):\n    return x ** 2  # squares",
         "Numbers 1234567 and 3.14159; whitespace   runs\t\tand\n\n\nnewlines.",
         "Ünïcödé everywhere — “quotes”, ‘more’, and ellipses… with résumé, façade, jalapeño.",
         "plain ascii text about the python interpreter and its standard library modules " * 3]


@pytest.fixture(scope="module")
def pretrain_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("bpb-pretrain")
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS * 3), encoding="utf-8")
    report = prepare_pretrain_dataset([Source(files=[str(corpus)])], root / "data", val_fraction=0.0,
                                      num_workers=0, show_progress=False)
    return root / "data", report["manifest"]


def tiny_model(tok, dim=32, seed=0) -> Transformer:
    torch.manual_seed(seed)
    return o1_random_(Transformer(ModelArgs(dim=dim, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=tok.n_words,
                                            multiple_of=32, max_seq_len=SEQ))).train()


def text_bytes_by_decoding(tok, targets: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(which targets are text, UTF-8 bytes of that text): maximal runs of non-special targets decoded to text."""
    special = set(tok.special_tokens.values())
    ids = targets.flatten().tolist()
    is_text = torch.tensor([t != -100 and t not in special for t in ids])
    total, run = 0, []
    for t, text in zip(ids + [-1], is_text.tolist() + [False]):
        if text:
            run.append(t)
        elif run:
            decoded = tok.decode(run)
            assert "\ufffd" not in decoded  # runs break at character boundaries, so the count is exact
            total, run = total + len(decoded.encode("utf-8")), []
    return is_text, total


def hand_bpb(model, tok, batches) -> float:
    nats, nbytes = 0.0, 0
    with torch.no_grad():
        for b in batches:
            logits = model(b["tokens"])[0].flatten(0, 1).float()
            losses = F.cross_entropy(logits, b["targets"].flatten(), ignore_index=-100, reduction="none")
            is_text, count = text_bytes_by_decoding(tok, b["targets"])
            nats += losses[is_text].sum().item()
            nbytes += count
    return nats / math.log(2) / nbytes


def pretrain_loader(data, tok) -> PretrainDataLoader:
    return PretrainDataLoader(str(data), "train", 2, SEQ, shuffle=False, tokenizer_identity=tok.identity(),
                              vocab_size=tok.n_words)


def test_val_bpb_of_pretraining_is_the_text_targets_loss_in_bits_over_their_utf8_bytes(pretrain_data, tok):
    data, _ = pretrain_data
    model = tiny_model(tok)
    cfg = Config(training_precision="fp32", max_seq_len=SEQ, max_batch_size=2, validation_steps=3,
                 pretrain_data_dir=str(data))
    batches = [b for b, _ in zip(pretrain_loader(data, tok), range(3))]
    targets = torch.cat([b["targets"].flatten() for b in batches]).tolist()
    assert tok.eos_id in targets and tok.bos_id in targets  # document boundaries inside: specials are left out
    figures = validate(model, Stage(Setting(cfg, CPU, 2, tok, tok.n_words)), pretrain_loader(data, tok), cfg, CPU)
    assert figures["val_bpb"] == pytest.approx(hand_bpb(model, tok, batches), rel=1e-5)
    # the loss itself is still the mean over every target, the specials included
    with torch.no_grad():
        total = sum(F.cross_entropy(model(b["tokens"])[0].flatten(0, 1), b["targets"].flatten(), reduction="sum")
                    for b in batches)
    assert figures["val_loss"] == pytest.approx(total.item() / sum(b["targets"].numel() for b in batches), rel=1e-5)


def test_val_bpb_of_distillation_is_the_students_own_cross_entropy_per_byte(pretrain_data, tok):
    data, _ = pretrain_data
    student, teacher = tiny_model(tok, seed=1), tiny_model(tok, dim=64, seed=2).eval()
    cfg = Config(training_precision="fp32", max_seq_len=SEQ, max_batch_size=2, validation_steps=2,
                 pretrain_data_dir=str(data), distillation_alpha=0.5, distillation_temperature=2.0)
    stage = Distillation(Stage(Setting(cfg, CPU, 2, tok, tok.n_words)), teacher)
    batches = [b for b, _ in zip(pretrain_loader(data, tok), range(2))]
    figures = validate(student, stage, pretrain_loader(data, tok), cfg, CPU)
    assert figures["val_bpb"] == pytest.approx(hand_bpb(student, tok, batches), rel=1e-5)
    assert figures["val_loss"] != pytest.approx(figures["val_ce"], rel=1e-3)  # bpb follows ce, not the mixed loss


@pytest.fixture(scope="module")
def instruct_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("bpb-instruct")
    return prepare_chat_tasks(root, 40, SEQ, 0.1)[0]


def test_val_bpb_of_sft_covers_the_trained_answers_without_their_eot(instruct_data, tok):
    def loader():  # one conversation per row: micro-batches of different numbers of trained tokens
        return ChatDataLoader(str(instruct_data), "train", 2, SEQ, packing=False, shuffle=False,
                              tokenizer_identity=tok.identity(), vocab_size=tok.n_words)
    model = tiny_model(tok)
    cfg = Config(training_precision="fp32", max_seq_len=SEQ, max_batch_size=2, validation_steps=3,
                 instruct_data_dir=str(instruct_data), packing=False)
    batches = [b for b, _ in zip(loader(), range(3))]
    assert any(tok.eot_id in b["targets"].flatten().tolist() for b in batches)
    figures = validate(model, SFTStage(Setting(cfg, CPU, 2, tok, tok.n_words)), loader(), cfg, CPU)
    assert figures["val_bpb"] == pytest.approx(hand_bpb(model, tok, batches), rel=1e-5)


def test_the_manifest_records_each_splits_utf8_bytes_and_bytes_per_token(tmp_path, tok):
    corpus = tmp_path / "corpus.jsonl"
    documents = [f"{t} (document {i})" for i, t in enumerate(TEXTS * 10)]
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in documents), encoding="utf-8")
    manifest = prepare_pretrain_dataset([Source(files=[str(corpus)])], tmp_path / "data", val_fraction=0.3,
                                        shard_size=200, num_workers=0, show_progress=False)["manifest"]
    splits = manifest["splits"]
    assert splits["val"]["num_tokens"] > 0 and len(splits["train"]["shards"]) > 1
    assert sum(s["num_bytes"] for s in splits.values()) == sum(len(d.encode("utf-8")) for d in documents)
    for entry in splits.values():
        tokens = np.concatenate([np.load(tmp_path / "data" / s["file"]) for s in entry["shards"]])
        text = tok.decode([t for t in tokens.tolist() if t not in (tok.bos_id, tok.eos_id)])
        assert entry["num_bytes"] == len(text.encode("utf-8"))
        assert entry["bytes_per_token"] == pytest.approx(entry["num_bytes"] / entry["num_tokens"], abs=1e-4)


def test_hellaswag_gold_bpb_is_the_right_endings_loss_in_bits_over_their_utf8_bytes(tok):
    from hellaswag_utils import Example, evaluate

    examples = [Example("Cooking: She cracks the eggs into a bowl and", ("whisks them.", "sings loudly.",
                                                                          "drives away.", "reads a café menu."), 3),
                Example("Running: The runner ties his shoes. ", ("He starts to run — fast.", "He sleeps.",
                                                                 "He eats 12 apples.", "He swims."), 0)]
    model = tiny_model(tok).eval()
    nats, nbytes = 0.0, 0
    with torch.no_grad():
        for ex in examples:
            context = ex.context.rstrip()
            prefix = tok.encode(context, bos=True, eos=False)
            whole = tok.encode(ex.context + " " + ex.endings[ex.label], bos=True, eos=False)
            logprobs = model(torch.tensor([whole]))[0][0].float().log_softmax(-1)
            nats -= sum(logprobs[i - 1, whole[i]].item() for i in range(len(prefix), len(whole)))
            nbytes += len(tok.decode(whole[len(prefix):]).encode("utf-8"))
    result = evaluate(model, tok, examples, batch_size=2)
    assert result["gold_bpb"] == pytest.approx(nats / math.log(2) / nbytes, rel=1e-6)
