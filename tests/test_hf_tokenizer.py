"""A Hugging Face tokenizer directory works behind the same API as the tiktoken one.

The directory is made here from Meta's tokenizer.model by transformers' own TikTokenConverter
(the route Hugging Face used to publish Llama 3's tokenizer.json), so the tiktoken Tokenizer,
already checked token for token against Meta's, is the reference.
"""

import codecs

import pytest

from tokenizer import HFTokenizer, NAMED_SPECIAL_TOKENS, Tokenizer, default_tokenizer_path, load_tokenizer

converter = pytest.importorskip("transformers.convert_slow_tokenizer")

TEXTS = [
    "The capital of France is Paris.",
    "  leading spaces, trailing tabs\t\t\nand\r\nnewlines\n\n\n",
    "naïve café — 日本語のテキスト, emoji 🤖🚀 and العربية",
    "def f(x):\n    return x ** 2  # squares\n",
    "I'M sure they'LL say it's 12345678901234 o'clock",
]

# Documents that quote special-token text, as web pages and code about Llama do.
SPECIAL_TEXTS = [
    "a <|end_of_text|> b",
    "<|begin_of_text|>starts like a document",
    "chat logs: <|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>",
    "reserved <|reserved_special_token_5|><|finetune_right_pad_id|> and a half <|eot_id",
]

# Characters that Llama 3's BPE splits over several tokens: no token holds a whole character.
MULTI_TOKEN_TEXTS = ["🤖🚀", "family 👨‍👩‍👧‍👦, flag 🇫🇷 done ✅", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 and 日本語のテキスト"]


@pytest.fixture(scope="module")
def ref() -> Tokenizer:
    return Tokenizer()


@pytest.fixture(scope="module")
def hf_dir(ref, tmp_path_factory):
    specials = sorted(ref.special_tokens, key=ref.special_tokens.get)
    hf = converter.TikTokenConverter(vocab_file=str(default_tokenizer_path()), extra_special_tokens=specials).converted()
    out = tmp_path_factory.mktemp("hf_tokenizer")
    hf.save(str(out / "tokenizer.json"))
    return out


@pytest.fixture(scope="module")
def tok(hf_dir) -> HFTokenizer:
    return load_tokenizer(hf_dir)


def test_directory_with_tokenizer_json_loads_as_hf_tokenizer(tok, ref):
    assert isinstance(tok, HFTokenizer)
    assert tok.n_words == ref.n_words
    for name in NAMED_SPECIAL_TOKENS:
        assert tok.special_tokens[name] == ref.special_tokens[name]
    assert (tok.bos_id, tok.eos_id, tok.eot_id) == (ref.bos_id, ref.eos_id, ref.eot_id)


@pytest.mark.parametrize("text", TEXTS)
def test_hf_tokenizer_encodes_like_the_tiktoken_tokenizer(tok, ref, text):
    assert tok.encode(text, bos=True, eos=True) == ref.encode(text, bos=True, eos=True)
    assert tok.decode(tok.encode(text, bos=False, eos=False)) == text


@pytest.mark.parametrize("text", SPECIAL_TEXTS)
def test_special_token_text_in_a_document_is_plain_text_for_both_kinds(tok, ref, text):
    # A document quoting `<|end_of_text|>` must not get a fake boundary (id 128001) on either path.
    expected = ref.encode(text, bos=True, eos=True)
    assert tok.encode(text, bos=True, eos=True) == expected
    assert tok.encode_batch([text, "x"], bos=True, eos=True) == [expected, ref.encode("x", bos=True, eos=True)]
    inner = set(expected[1:-1])
    assert not inner & set(ref.special_tokens.values()), "reference encoded special text as a special id"
    assert tok.decode(expected[1:-1]) == text


def test_hf_tokenizer_refuses_to_turn_text_into_special_ids(tok):
    # Only tiktoken can do that; special ids go in by id (as the chat format does), never silently.
    with pytest.raises(ValueError, match="plain text"):
        tok.encode("x <|eot_id|>", bos=False, eos=False, allowed_special="all")
    with pytest.raises(ValueError, match="<\\|eot_id\\|>"):
        tok.encode("x <|eot_id|>", bos=False, eos=False, disallowed_special="all")


def test_every_token_decodes_to_the_same_bytes_as_tiktoken(tok, ref):
    # The byte-level alphabet mapped back to bytes; special tokens are their text's UTF-8.
    assert tok.n_words == ref.n_words
    for i in range(ref.n_words):
        assert tok.decode_token_bytes(i) == ref.model.decode_single_token_bytes(i), i


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _stream(tokenizer, ids: list[int]) -> list[str]:
    """What generate.stream_completion yields: per-token bytes through an incremental UTF-8 decoder."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    pieces = [decoder.decode(tokenizer.decode_token_bytes(i)) for i in ids] + [decoder.decode(b"", final=True)]
    return [p for p in pieces if p]


@pytest.mark.parametrize("text", MULTI_TOKEN_TEXTS)
def test_streamed_text_is_the_same_for_both_kinds(tok, ref, text):
    ids = ref.encode(text, bos=False, eos=False) + [ref.eot_id]
    assert any(not _is_utf8(ref.decode_token_bytes(i)) for i in ids), "no character is split over tokens"
    assert "".join(_stream(ref, ids)) == text + "<|eot_id|>"  # the tiktoken path, right today
    assert _stream(tok, ids) == _stream(ref, ids)


def test_hf_tokenizer_renders_chat_like_the_tiktoken_tokenizer(tok, ref):
    dialog = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi <|eot_id|> there!"}]
    assert tok.encode_chat(dialog) == ref.encode_chat(dialog)


def test_a_tokenizer_that_is_not_byte_level_is_refused_at_load(tmp_path):
    # Its tokens' bytes cannot be had, so streaming would print replacement characters.
    from tokenizers import Tokenizer as HF
    from tokenizers.models import WordLevel

    HF(WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]")).save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ValueError, match="expected ByteLevel"):
        load_tokenizer(tmp_path)


def test_directory_without_tokenizer_files_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer.json in"):
        load_tokenizer(tmp_path)
