"""serve.py as a real server process on a free localhost port, with the official `openai` package as the
client. References: generate.py (a subprocess for a one-turn chat, its functions for plain prompts,
longer conversations and seeded sampling), Meta's ChatFormat and tokenizer (llama-models) for the token counts, and
transformers' LlamaModel for the embeddings."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch
from llama_models.datatypes import RawMessage
from llama_models.llama3.chat_format import ChatFormat
from llama_models.llama3.tokenizer import Tokenizer as MetaTokenizer

from checkpoint import load_model
from generate import pick_dtype, stream_completion, stream_ids
from serve import main as serve_main, warn_if_exposed
from serve_helpers import CONTEXT, ROOT, Server, tiny_checkpoint
from tokenizer import Tokenizer

pytestmark = pytest.mark.e2e

KEY = "test-key-123"
QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("serve") / "tiny.pt")


@pytest.fixture(scope="module")
def generate_py_runs(checkpoint) -> dict[str, subprocess.Popen]:
    """generate.py's own answer to one chat turn, started beside the server."""
    return {"chat": generate_py(checkpoint, "--chat", "--prompt", QUESTION, "--max_new_tokens", "24")}


@pytest.fixture(scope="module")
def server(checkpoint, generate_py_runs, tmp_path_factory):
    s = Server(checkpoint, tmp_path_factory.mktemp("log") / "server.log", "--max_tokens_limit", "1020",
               "--max_body_bytes", "20000", env={"SERVE_API_KEY": KEY})
    yield s.wait_ready()
    s.stop()


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def reference(checkpoint):
    """The checkpoint as generate.py loads it (same dtype rule), and Meta's tokenizer and chat format."""
    model = load_model(checkpoint, dtype=pick_dtype("auto", torch.device("cpu")))
    meta = MetaTokenizer.get_instance()
    return model, Tokenizer(), meta, ChatFormat(meta)


def generate_py(checkpoint: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(ROOT / "generate.py"), "--checkpoint", str(checkpoint), "--quiet",
                             "--temperature", "0", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONIOENCODING": "utf-8"})


@pytest.fixture(scope="module")
def generate_py_answers(generate_py_runs) -> dict[str, str]:
    answers = {}
    for name, proc in generate_py_runs.items():
        out, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, err.decode()
        answers[name] = out.decode("utf-8").removesuffix("\n")  # bytes: text mode would rewrite '\r'
    return answers


def meta_chat_tokens(chat: ChatFormat, messages: list[dict]) -> list[int]:
    return chat.encode_dialog_prompt([RawMessage(role=m["role"], content=m["content"]) for m in messages]).tokens


def greedy(reference, messages: list[dict], n: int) -> str:
    model, tok, _, _ = reference
    return "".join(stream_ids(model, tok, tok.encode_chat(messages), n, temperature=0.0))


def streamed_chat(client, messages, **kw) -> tuple[str, str, list]:
    text, finish, chunks = "", None, []
    for chunk in client.chat.completions.create(model="tiny", messages=messages, stream=True, **kw):
        chunks.append(chunk)
        for choice in chunk.choices:
            text += choice.delta.content or ""
            finish = choice.finish_reason or finish
    return text, finish, chunks


# ---- answers --------------------------------------------------------------------------------------------
def test_chat_at_temperature_0_is_what_generate_py_chat_gives_streamed_or_not(client, generate_py_answers, reference):
    messages = [{"role": "user", "content": QUESTION}]
    expected = generate_py_answers["chat"]
    whole = client.chat.completions.create(model="tiny", messages=messages, temperature=0, max_tokens=24)
    text, finish, chunks = streamed_chat(client, messages, temperature=0, max_tokens=24,
                                         stream_options={"include_usage": True})
    assert whole.choices[0].message.content == expected and text == expected
    assert whole.choices[0].finish_reason == finish == "length"
    assert whole.choices[0].message.role == "assistant" and whole.object == "chat.completion"
    prompt_tokens = len(meta_chat_tokens(reference[3], messages))
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens, whole.usage.total_tokens) == \
        (prompt_tokens, 24, prompt_tokens + 24)
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump(include={"prompt_tokens", "completion_tokens"}) \
        == {"prompt_tokens": prompt_tokens, "completion_tokens": 24}
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) > 1  # it did stream


def test_completions_at_temperature_0_are_what_generate_py_gives_streamed_or_not(client, reference):
    model, tok, _, _ = reference
    expected = "".join(stream_completion(model, tok, "The capital of France", 20, chat=False, temperature=0.0))
    whole = client.completions.create(model="tiny", prompt="The capital of France", temperature=0, max_tokens=20)
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="tiny", prompt="The capital of France", temperature=0, max_tokens=20, stream=True) if c.choices)
    assert whole.choices[0].text == streamed == expected
    assert whole.usage.prompt_tokens == len(reference[2].encode("The capital of France", bos=True, eos=False))
    assert whole.usage.completion_tokens == 20 and whole.choices[0].finish_reason == "length"


def test_a_conversation_with_a_system_prompt_continues_as_generate_py_continues_it(client, reference):
    messages = [{"role": "system", "content": "You answer in one word."},
                {"role": "user", "content": "Name a colour."},
                {"role": "assistant", "content": "Blue."},
                {"role": "user", "content": "And another?"}]
    whole = client.chat.completions.create(model="tiny", messages=messages, temperature=0, max_tokens=30)
    assert whole.choices[0].message.content == greedy(reference, messages, 30)
    assert whole.usage.prompt_tokens == len(meta_chat_tokens(reference[3], messages))


def test_eight_concurrent_streams_each_get_their_solo_greedy_answer(client, server, reference):
    conversations = [[{"role": "user", "content": f"Question {i}: " + "tell me more " * (2 * i)}] for i in range(8)]
    solo = [greedy(reference, c, 40) for c in conversations]
    answers, spans = [None] * 8, [None] * 8
    start = threading.Barrier(8)

    def ask(i: int) -> None:
        start.wait()
        began = time.monotonic()
        answers[i] = streamed_chat(client, conversations[i], temperature=0, max_tokens=40)[0]
        spans[i] = (began, time.monotonic())

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert answers == solo
    assert max(b for b, _ in spans) < min(e for _, e in spans)  # all eight were open at once
    assert server.health()["peak_batch"] >= 4


def test_stop_strings_cut_the_answer_before_them_and_finish_with_stop(client, reference):
    messages = [{"role": "user", "content": QUESTION}]
    free = greedy(reference, messages, 24)
    stop = free[6:9]
    cut = free[:free.index(stop)]
    whole = client.chat.completions.create(model="tiny", messages=messages, temperature=0, max_tokens=24, stop=[stop])
    text, finish, _ = streamed_chat(client, messages, temperature=0, max_tokens=24, stop=stop)
    assert whole.choices[0].message.content == text == cut
    assert whole.choices[0].finish_reason == finish == "stop"


def test_seeded_sampling_draws_what_generate_py_draws_with_that_seed_for_each_of_n_choices(client, reference):
    model, tok, _, _ = reference
    messages = [{"role": "user", "content": QUESTION}]
    whole = client.chat.completions.create(model="tiny", messages=messages, temperature=1.0, top_p=0.9, seed=7, n=3,
                                           max_tokens=16)
    expected = ["".join(stream_ids(model, tok, tok.encode_chat(messages), 16, temperature=1.0, top_p=0.9,
                                   seed=7 + k)) for k in range(3)]
    assert [c.message.content for c in whole.choices] == expected
    assert len(set(expected)) > 1 and whole.usage.completion_tokens == 3 * 16


def test_embeddings_are_the_mean_of_transformers_final_hidden_states(client, checkpoint):
    from hf_convert import to_hf

    texts = ["The capital of France", "Paris is a city"]
    hf = to_hf(load_model(checkpoint, dtype=torch.float32)).eval()
    tok = Tokenizer()
    with torch.no_grad():
        expected = [hf.model(torch.tensor([tok.encode(t, bos=True, eos=False)])).last_hidden_state[0].mean(0)
                    for t in texts]
    got = client.embeddings.create(model="tiny", input=texts)  # the client asks for base64 and decodes it
    floats = client.embeddings.create(model="tiny", input=texts[0], encoding_format="float")
    assert [d.index for d in got.data] == [0, 1]
    assert got.usage.prompt_tokens == sum(len(tok.encode(t, bos=True, eos=False)) for t in texts)
    for d, e in zip(got.data, expected):
        v = torch.tensor(d.embedding)
        # the server holds bf16 weights on a CPU with native bf16: its states round to ~1e-2
        assert torch.nn.functional.cosine_similarity(v, e, dim=0) > 0.999
        assert (v - e).abs().max() < 0.05 * e.abs().max()
    assert floats.data[0].embedding == got.data[0].embedding


def test_models_tokenize_and_detokenize_agree_with_meta_tokenizer(client, server, reference):
    meta, chat = reference[2], reference[3]
    assert [m.id for m in client.models.list()] == [server.health()["model"]]
    auth = {"Authorization": f"Bearer {KEY}"}
    text = "Hello, world! Grüße 👋"
    got = httpx.post(f"{server.url}/tokenize", json={"prompt": text}, headers=auth).json()
    assert got["tokens"] == meta.encode(text, bos=True, eos=False) and got["count"] == len(got["tokens"])
    messages = [{"role": "user", "content": text}]
    assert httpx.post(f"{server.url}/tokenize", json={"messages": messages}, headers=auth).json()["tokens"] == \
        meta_chat_tokens(chat, messages)
    back = httpx.post(f"{server.url}/detokenize", json={"tokens": got["tokens"]}, headers=auth).json()
    assert back["prompt"] == meta.decode(got["tokens"])


def test_the_chat_page_is_served_at_the_root(server):
    page = httpx.get(f"{server.url}/")
    assert page.status_code == 200 and page.text == (ROOT / "chat.html").read_text(encoding="utf-8")
    assert "connect-src 'self'" in page.headers["content-security-policy"]


# ---- bad input -------------------------------------------------------------------------------------------
LONG = "word " * 1100  # over 1024 tokens
BAD = {
    "malformed JSON": ('{"messages": [', 400, None, "not valid JSON"),
    "wrong type": ({"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, 400, "temperature",
                   "valid number"),
    "unknown role": ({"messages": [{"role": "robot", "content": "hi"}]}, 400, "messages[0].role", "'user'"),
    "content not text": ({"messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content", "string"),
    "no messages": ({"temperature": 0}, 400, "messages", "required"),
    "last turn not the user's": ({"messages": [{"role": "user", "content": "hi"},
                                               {"role": "assistant", "content": "x"}]}, 400, "messages",
                                 "end with a user turn"),
    "prompt longer than the context": ({"messages": [{"role": "user", "content": LONG}]}, 400, "messages", "context"),
    "max_tokens beyond the context": ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1015}, 400,
                                      "max_tokens", "at most 1013"),
    "max_tokens over the server's limit": ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1021}, 400,
                                           "max_tokens", "--max_tokens_limit"),
    "n over max_batch": ({"messages": [{"role": "user", "content": "hi"}], "n": 9}, 400, "n", "--max_batch"),
    "unsupported field": ({"messages": [{"role": "user", "content": "hi"}], "logprobs": True}, 400, "logprobs",
                          "not supported"),
    "too many stop strings": ({"messages": [{"role": "user", "content": "hi"}], "stop": list("abcde")}, 400, "stop",
                              "up to 4"),
    "body over the size limit": ({"messages": [{"role": "user", "content": "x" * 30000}]}, 413, None,
                                 "--max_body_bytes"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_gets_its_status_and_an_openai_error_naming_it(server, case):
    body, status, param, words = BAD[case]
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    kw = {"content": body} if isinstance(body, str) else {"json": body}
    r = httpx.post(f"{server.url}/v1/chat/completions", headers=headers, timeout=30, **kw)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param and words in error["message"], error


def test_the_openai_client_raises_its_error_with_the_servers_message(client):
    with pytest.raises(openai.BadRequestError, match="end with a user turn"):
        client.chat.completions.create(model="tiny", messages=[{"role": "system", "content": "hi"}])


def test_a_wrong_or_missing_api_key_gets_401(server):
    wrong = openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError, match="API key"):
        wrong.models.list()
    for path in ("/v1/models", "/v1/chat/completions", "/tokenize"):
        r = httpx.request("GET" if path == "/v1/models" else "POST", f"{server.url}{path}", json={})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{server.url}/health").status_code == 200


def test_another_host_than_loopback_is_announced_loudly(capsys):
    warn_if_exposed("127.0.0.1", 8000, keyed=False)
    assert capsys.readouterr().err == ""
    warn_if_exposed("0.0.0.0", 8000, keyed=False)
    assert "WARNING: listening on 0.0.0.0:8000" in capsys.readouterr().err


def test_a_checkpoint_that_is_not_there_ends_with_one_line(tmp_path, capsys):
    assert serve_main(["--checkpoint", str(tmp_path / "none.pt")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "none.pt" in err and "no such file" in err


# ---- a dropped stream, and stopping (last: it stops the server) --------------------------------------------
def test_a_dropped_stream_frees_its_place_at_once(client, server):
    c, single = client, server
    steps_before = single.health()["decode_steps"]
    stream = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Go on"}], temperature=0,
                                       max_tokens=1000, stream=True)
    assert next(iter(stream)) is not None and next(iter(stream)) is not None
    stream.close()
    for _ in range(200):
        if single.health()["active"] == 0:
            break
        time.sleep(0.01)
    assert single.health()["active"] == 0
    began = time.monotonic()
    answer = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=5)
    assert answer.choices[0].finish_reason == "length" and time.monotonic() - began < 10
    assert single.health()["decode_steps"] - steps_before < 500  # the dropped one did not run on to 1000


def test_sigterm_ends_open_streams_and_stops_the_server_cleanly(client, server):
    c, single = client, server
    stream = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Go on"}], temperature=0,
                                       max_tokens=1000, stream=True)
    chunks = iter(stream)
    next(chunks)
    single.proc.send_signal(signal.SIGTERM)
    with pytest.raises(openai.APIError, match="shutting down"):
        for _ in chunks:
            pass
    assert single.proc.wait(timeout=30) == 0
    log = single.log.read_text()
    assert "SIGTERM: stopping" in log and log.rstrip().endswith("stopped")
