"""A Hugging Face tokenizer directory works behind the same API as the tiktoken one.

The directory is made here from Meta's tokenizer.model by transformers' own TikTokenConverter
(the route Hugging Face used to publish Llama 3's tokenizer.json), so the tiktoken Tokenizer,
already checked token for token against Meta's, is the reference.
"""

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


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    tiktoken_tok = Tokenizer()
    specials = sorted(tiktoken_tok.special_tokens, key=tiktoken_tok.special_tokens.get)
    hf = converter.TikTokenConverter(vocab_file=str(default_tokenizer_path()), extra_special_tokens=specials).converted()
    out = tmp_path_factory.mktemp("hf_tokenizer")
    hf.save(str(out / "tokenizer.json"))
    return out


def test_directory_with_tokenizer_json_loads_as_hf_tokenizer(hf_dir):
    tok = load_tokenizer(hf_dir)
    assert isinstance(tok, HFTokenizer)
    ref = Tokenizer()
    assert tok.n_words == ref.n_words
    for name in NAMED_SPECIAL_TOKENS:
        assert tok.special_tokens[name] == ref.special_tokens[name]
    assert (tok.bos_id, tok.eos_id, tok.eot_id) == (ref.bos_id, ref.eos_id, ref.eot_id)


@pytest.mark.parametrize("text", TEXTS)
def test_hf_tokenizer_encodes_like_the_tiktoken_tokenizer(hf_dir, text):
    tok, ref = load_tokenizer(hf_dir), Tokenizer()
    assert tok.encode(text, bos=True, eos=True) == ref.encode(text, bos=True, eos=True)
    assert tok.decode(tok.encode(text, bos=False, eos=False)) == text


def test_hf_tokenizer_renders_chat_like_the_tiktoken_tokenizer(hf_dir):
    dialog = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there!"}]
    assert load_tokenizer(hf_dir).encode_chat(dialog) == Tokenizer().encode_chat(dialog)


def test_directory_without_tokenizer_files_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer.json in"):
        load_tokenizer(tmp_path)
