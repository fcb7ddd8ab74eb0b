"""train.validate() on real prepared data: the validation loss is the mean over every trained unit of all its
micro-batches (tokens for SFT, pairs for DPO), checked against plain full-logits computations."""


import pytest
import torch
import torch.nn.functional as F

from config import Config
from dataloaders import ChatDataLoader
from distributed import DistInfo
from model import ModelArgs, Transformer
from reference_weights import o1_random_
from stages import Setting, SFTStage
from train import validate
from prep_helpers import prepare_chat_tasks

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CPU = DistInfo(0, 0, 1, torch.device("cpu"))
SEQ = 64


@pytest.fixture(scope="module")
def instruct_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("validation-data")
    return prepare_chat_tasks(root, 60, SEQ, 0.1)[0]


def loader(data, tok) -> ChatDataLoader:
    # one conversation per row: micro-batches of very different numbers of trained tokens
    return ChatDataLoader(str(data), "train", 2, SEQ, packing=False, shuffle=False,
                          tokenizer_identity=tok.identity(), vocab_size=tok.n_words)


def test_validation_loss_is_the_mean_over_every_trained_token_of_uneven_micro_batches(instruct_data, tok):
    torch.manual_seed(0)
    model = o1_random_(Transformer(ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=tok.n_words,
                                             multiple_of=32, max_seq_len=SEQ))).train()
    cfg = Config(training_precision="fp32", max_seq_len=SEQ, max_batch_size=2, validation_steps=3,
                 instruct_data_dir=str(instruct_data), packing=False)
    stage = SFTStage(Setting(cfg, CPU, 2, tok, tok.n_words))
    val_loader = loader(instruct_data, tok)
    val_loader.next_batch()  # validation starts from the first batch wherever the loader stands

    batches = [b for b, _ in zip(loader(instruct_data, tok), range(3))]  # the same micro-batches, read afresh
    counts = [int((b["targets"] != -100).sum()) for b in batches]
    assert len(set(counts)) == 3  # uneven: a mean of per-micro-batch means would differ
    with torch.no_grad():
        total = sum(F.cross_entropy(model(b["tokens"])[0].flatten(0, 1).float(), b["targets"].flatten(),
                                    ignore_index=-100, reduction="sum") for b in batches)
    figures = validate(model, stage, val_loader, cfg, CPU)
    assert figures["val_loss"] == pytest.approx(total.item() / sum(counts), rel=1e-5)
    assert model.training  # back in training mode afterwards
