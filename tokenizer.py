"""The Llama 3 tokenizer: Meta's BPE ranks and split pattern on tiktoken, plus the chat format.

No network is ever needed: by default `tokenizer.model` is read from the `llama-models`
package, where Meta publishes it. A Hugging Face tokenizer directory (`tokenizer.json`)
can be used instead through `load_tokenizer`.
"""

from __future__ import annotations

import base64
import hashlib
import re
from pathlib import Path
from typing import Iterator, Sequence

import tiktoken

# Meta's pre-tokenizer regex for Llama 3 (identical to cl100k's apart from digit grouping).
PAT_STR = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
NUM_RESERVED_SPECIAL_TOKENS = 256
NAMED_SPECIAL_TOKENS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|step_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
    "<|image|>",
]

# tiktoken panics on very long inputs and is quadratic on long runs without a split point
# (github.com/openai/tiktoken/issues/195). Meta cuts text at these limits; we cut at the same
# places so token ids stay identical to Meta's.
TIKTOKEN_MAX_ENCODE_CHARS = 400_000
MAX_NO_WHITESPACES_CHARS = 25_000
# The lookbehinds let a match start only where a run starts, keeping the scan linear.
_LONG_RUN = re.compile(r"(?<!\s)\s{%d}|(?<!\S)\S{%d}" % (MAX_NO_WHITESPACES_CHARS + 1, MAX_NO_WHITESPACES_CHARS + 1))


def default_tokenizer_path() -> Path:
    """Meta's Llama 3 `tokenizer.model`, as shipped inside the `llama-models` PyPI package."""
    try:
        import llama_models
    except ImportError as e:
        raise FileNotFoundError(
            "no TOKENIZER_PATH set and the llama-models package is not installed; "
            "run `pip install llama-models` or set TOKENIZER_PATH to a Llama 3 tokenizer.model"
        ) from e
    return Path(llama_models.__file__).parent / "llama3" / "tokenizer.model"


def load_bpe_ranks(path: Path) -> dict[bytes, int]:
    """Parse a tiktoken BPE file: one `base64(token) rank` pair per line."""
    ranks = {}
    with open(path, "rb") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token)] = int(rank)
            except ValueError as e:
                raise ValueError(f"{path}: line {line_no} is not '<base64 token> <rank>': {line[:80]!r}") from e
    return ranks


def _split_long_runs(s: str, max_run: int) -> Iterator[str]:
    """Cut `s` so no piece holds more than `max_run` consecutive whitespace or non-whitespace chars.

    Same cut points as Meta's reference tokenizer; only called when such a run exists.
    """
    run_len = 0
    run_is_space = s[0].isspace() if s else False
    start = 0
    for i, ch in enumerate(s):
        is_space = ch.isspace()
        if run_is_space ^ is_space:
            run_len = 1
            run_is_space = is_space
        else:
            run_len += 1
            if run_len > max_run:
                yield s[start:i]
                start = i
                run_len = 1
    yield s[start:]


def needs_cutting(text: str) -> bool:
    """Whether `text` must be cut into pieces before tiktoken sees it (Meta's rule, see `_safe_pieces`):
    otherwise one plain tiktoken call encodes it. A run longer than MAX_NO_WHITESPACES_CHARS needs a
    text at least that long, so most texts skip the scan."""
    return len(text) > TIKTOKEN_MAX_ENCODE_CHARS or (
        len(text) > MAX_NO_WHITESPACES_CHARS and _LONG_RUN.search(text) is not None)


def _safe_pieces(s: str) -> list[str]:
    pieces = []
    for i in range(0, len(s), TIKTOKEN_MAX_ENCODE_CHARS):
        chunk = s[i : i + TIKTOKEN_MAX_ENCODE_CHARS]
        if _LONG_RUN.search(chunk):
            pieces.extend(_split_long_runs(chunk, MAX_NO_WHITESPACES_CHARS))
        else:
            pieces.append(chunk)
    return pieces


class Tokenizer:
    """Llama 3 tokenizer with Meta's API: `encode(s, bos=, eos=)`, `decode(ids)`, special-token ids."""

    def __init__(self, model_path: str | Path | None = None):
        path = Path(model_path) if model_path else default_tokenizer_path()
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {path} (expected a Llama 3 tokenizer.model)")
        self.path = path
        ranks = load_bpe_ranks(path)
        n_base = len(ranks)
        reserved = [
            f"<|reserved_special_token_{2 + i}|>"
            for i in range(NUM_RESERVED_SPECIAL_TOKENS - len(NAMED_SPECIAL_TOKENS))
        ]
        self.special_tokens = {tok: n_base + i for i, tok in enumerate(NAMED_SPECIAL_TOKENS + reserved)}
        self.model = tiktoken.Encoding(
            name=path.name, pat_str=PAT_STR, mergeable_ranks=ranks, special_tokens=self.special_tokens
        )
        self.n_words = n_base + len(self.special_tokens)
        self.bos_id = self.special_tokens["<|begin_of_text|>"]
        self.eos_id = self.special_tokens["<|end_of_text|>"]
        self.eot_id = self.special_tokens["<|eot_id|>"]
        self.eom_id = self.special_tokens["<|eom_id|>"]
        self.pad_id = self.special_tokens["<|finetune_right_pad_id|>"]
        self.stop_tokens = [self.eos_id, self.eom_id, self.eot_id]
        self._sha256 = hashlib.sha256(path.read_bytes()).hexdigest()

    @property
    def vocab_size(self) -> int:
        return self.n_words

    def identity(self) -> dict:
        """What a token shard must agree with: the same ids mean the same text."""
        return {"kind": "tiktoken", "name": self.path.name, "sha256": self._sha256, "n_words": self.n_words}

    def encode(
        self,
        s: str,
        *,
        bos: bool,
        eos: bool,
        allowed_special: set[str] | str = frozenset(),
        disallowed_special: set[str] | str = (),
    ) -> list[int]:
        """Encode text. By default special-token text is encoded as plain text, as Meta's does;
        pass `allowed_special="all"` to turn `<|eot_id|>`-like text into the special ids."""
        if not isinstance(s, str):
            raise TypeError(f"Tokenizer.encode expects str, got {type(s).__name__}")
        ids: list[int] = [self.bos_id] if bos else []
        for piece in _safe_pieces(s):
            ids.extend(
                self.model.encode(piece, allowed_special=allowed_special, disallowed_special=disallowed_special)
            )
        if eos:
            ids.append(self.eos_id)
        return ids

    def encode_batch(self, texts: Sequence[str], *, bos: bool, eos: bool, num_threads: int = 8) -> list[list[int]]:
        """Encode many texts as plain text; short ones go through tiktoken's threaded batch path."""
        fast = [i for i, t in enumerate(texts) if not needs_cutting(t)]
        out: list[list[int] | None] = [None] * len(texts)
        for i, ids in zip(fast, self.model.encode_ordinary_batch([texts[i] for i in fast], num_threads=num_threads)):
            out[i] = ids
        for i, t in enumerate(texts):
            if out[i] is None:
                out[i] = self.encode(t, bos=False, eos=False)
        prefix = [self.bos_id] if bos else []
        suffix = [self.eos_id] if eos else []
        return [prefix + ids + suffix if (bos or eos) else ids for ids in out]

    def decode(self, ids: Sequence[int]) -> str:
        return self.model.decode(list(ids))

    def decode_token_bytes(self, token_id: int) -> bytes:
        """Raw bytes of one token: streaming output must join bytes, not per-token strings."""
        return self.model.decode_single_token_bytes(token_id)

    # ---- chat format -------------------------------------------------------------------
    def encode_header(self, role: str) -> list[int]:
        role = "ipython" if role == "tool" else role
        return [
            self.special_tokens["<|start_header_id|>"],
            *self.encode(role, bos=False, eos=False),
            self.special_tokens["<|end_header_id|>"],
            *self.encode("\n\n", bos=False, eos=False),
        ]

    def encode_message(self, message: dict) -> list[int]:
        """`<|start_header_id|>role<|end_header_id|>\\n\\n` + content + `<|eot_id|>`."""
        role, content = message.get("role"), message.get("content")
        if role not in ("system", "user", "assistant", "tool", "ipython") or not isinstance(content, str):
            raise ValueError(f"chat message must be {{'role': system|user|assistant|tool, 'content': str}}, got {message!r}")
        return self.encode_header(role) + self.encode(content, bos=False, eos=False) + [self.eot_id]

    def encode_chat(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> list[int]:
        """Render a dialog in Llama 3's chat format, ending with the assistant header by default."""
        ids = [self.bos_id]
        for message in messages:
            ids.extend(self.encode_message(message))
        if add_generation_prompt:
            ids.extend(self.encode_header("assistant"))
        return ids


def _byte_level_alphabet() -> dict[str, int]:
    """Byte-level BPE's stand-in characters (GPT-2's `bytes_to_unicode`), inverted: char -> byte.

    A `tokenizer.json` stores each token as text in which every byte is one printable character:
    bytes that are printable Latin-1 stand for themselves, the other 68 are shifted to U+0100..U+0143.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = [b for b in range(256) if b not in printable]
    return {chr(b): b for b in printable} | {chr(256 + n): b for n, b in enumerate(shifted)}


_BYTE_OF_CHAR = _byte_level_alphabet()


class HFTokenizer:
    """A Hugging Face `tokenizer.json` from a local directory, behind the same small API.

    Needs the `tokenizers` package (installed with `transformers`). Only byte-level BPE (Llama 3's
    kind) is accepted, since streaming needs each token's bytes. Text is always encoded as plain
    text, as the tiktoken path does: special tokens enter by id only (BOS/EOS framing, chat format).
    Chat rendering uses the Llama 3 format, so it is only meaningful for Llama-3-compatible vocabularies.
    """

    def __init__(self, directory: str | Path):
        try:
            from tokenizers import Tokenizer as _HF
            from tokenizers import decoders
        except ImportError as e:
            raise ImportError("a Hugging Face tokenizer directory needs `pip install tokenizers`") from e
        directory = Path(directory)
        file = directory / "tokenizer.json"
        if not file.is_file():
            raise FileNotFoundError(f"no tokenizer.json in {directory}")
        self.path = file
        self.model = _HF.from_file(str(file))
        if not isinstance(self.model.decoder, decoders.ByteLevel):
            raise ValueError(f"{file}: decoder is {type(self.model.decoder).__name__}, expected ByteLevel "
                             "(a byte-level BPE tokenizer such as Llama 3's)")
        # Without this, `<|end_of_text|>` written inside a document would become id 128001.
        self.model.encode_special_tokens = True
        # Added tokens are stored as their text, not in the byte-level alphabet.
        self._added_bytes = {i: t.content.encode("utf-8") for i, t in self.model.get_added_tokens_decoder().items()}
        vocab = self.model.get_vocab(with_added_tokens=True)
        self.special_tokens = {t: i for t, i in vocab.items() if t.startswith("<|") and t.endswith("|>")}
        self.n_words = max(vocab.values()) + 1
        get = self.special_tokens.get
        self.bos_id = get("<|begin_of_text|>", -1)
        self.eos_id = get("<|end_of_text|>", -1)
        self.eot_id = get("<|eot_id|>", -1)
        self.eom_id = get("<|eom_id|>", -1)
        self.pad_id = get("<|finetune_right_pad_id|>", -1)
        self.stop_tokens = [t for t in (self.eos_id, self.eom_id, self.eot_id) if t >= 0]
        self._sha256 = hashlib.sha256(file.read_bytes()).hexdigest()

    vocab_size = Tokenizer.vocab_size

    def identity(self) -> dict:
        return {"kind": "huggingface", "name": self.path.parent.name, "sha256": self._sha256, "n_words": self.n_words}

    def encode(
        self,
        s: str,
        *,
        bos: bool,
        eos: bool,
        allowed_special: set[str] | str = frozenset(),
        disallowed_special: set[str] | str = (),
    ) -> list[int]:
        """Encode text as plain text (special-token text included), like `Tokenizer.encode`'s default.
        `disallowed_special` raises on such text, as tiktoken does; `allowed_special` is refused."""
        if not isinstance(s, str):
            raise TypeError(f"HFTokenizer.encode expects str, got {type(s).__name__}")
        if allowed_special:
            raise ValueError("HFTokenizer encodes text as plain text only; add special tokens by id")
        banned = self.special_tokens if disallowed_special == "all" else disallowed_special
        found = [t for t in banned if t in s]
        if found:
            raise ValueError(f"text contains disallowed special token text {found[0]}")
        ids = self.model.encode(s, add_special_tokens=False).ids
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def encode_batch(self, texts: Sequence[str], *, bos: bool, eos: bool, num_threads: int = 8) -> list[list[int]]:
        return [self.encode(t, bos=bos, eos=eos) for t in texts]

    def decode(self, ids: Sequence[int]) -> str:
        return self.model.decode(list(ids), skip_special_tokens=False)

    def decode_token_bytes(self, token_id: int) -> bytes:
        """Raw bytes of one token (a piece of a UTF-8 character, possibly): decoding a lone token
        to text would turn such pieces into replacement characters."""
        if token_id in self._added_bytes:
            return self._added_bytes[token_id]
        piece = self.model.id_to_token(token_id)
        if piece is None:
            raise ValueError(f"token id {token_id} is not in {self.path} ({self.n_words} ids)")
        return bytes(_BYTE_OF_CHAR[ch] for ch in piece)

    encode_header = Tokenizer.encode_header
    encode_message = Tokenizer.encode_message
    encode_chat = Tokenizer.encode_chat


def token_byte_lengths(tokenizer: Tokenizer | HFTokenizer) -> list[int]:
    """UTF-8 bytes of text each id stands for, by id (n_words,): a special token stands for no text and
    counts 0, as nanochat's `token_bytes` table counts it (bits per byte leaves such tokens out). Ids the
    vocabulary leaves unassigned count 0 too."""
    special = set(tokenizer.special_tokens.values())
    lengths = []
    for token_id in range(tokenizer.n_words):
        try:
            lengths.append(0 if token_id in special else len(tokenizer.decode_token_bytes(token_id)))
        except (KeyError, ValueError):
            lengths.append(0)
    return lengths


def load_tokenizer(path: str | Path | None = None) -> Tokenizer | HFTokenizer:
    """A `tokenizer.model` file (tiktoken) or a directory holding a Hugging Face `tokenizer.json`."""
    if path and Path(path).is_dir():
        if (Path(path) / "tokenizer.model").is_file():
            return Tokenizer(Path(path) / "tokenizer.model")
        return HFTokenizer(path)
    return Tokenizer(path)
