"""Serve a model over HTTP with OpenAI's API, and a chat page for the browser.

    python serve.py --checkpoint runs/sft/checkpoints/step_001000.pt     # http://127.0.0.1:8000/
    python serve.py --checkpoint PATH --port 0                          # any free port (printed)
    python serve.py --checkpoint PATH --host 0.0.0.0 --api_key KEY      # other machines, with a key

Endpoints, in OpenAI's schema: POST /v1/chat/completions, POST /v1/completions, GET /v1/models,
POST /v1/embeddings (mean of the final hidden states); POST /tokenize, POST /detokenize, GET /health;
the chat page (chat.html) at /. Chat messages are rendered in Llama 3's chat format exactly as SFT
renders them, tokens are sampled as generate.py samples them, and requests that arrive while others
decode join their batch (batching.py): a greedy answer is the same alone or in company.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import codecs
import ipaddress
import json
import os
import secrets
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any, AsyncIterator, Literal, Optional, Sequence as Seq

import torch
import uvicorn
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.sse import EventSourceResponse, format_sse_event
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException

from batching import BatchEngine, EngineStopped, Sampling, Sequence
from generate import checked_tokenizer, load_model, pick_device, pick_dtype, rope_scaling_note
from checkpoint import CheckpointError
from speedups import reordered_linears

PAGE = Path(__file__).resolve().parent / "chat.html"


# ---- errors -----------------------------------------------------------------------------------------------
class APIError(Exception):
    """An error answered as OpenAI answers one: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: Optional[str] = None,
                 type: str = "invalid_request_error", code: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


def validation_error(errors: Seq[dict]) -> APIError:
    """Pydantic's first complaint as one line naming the field, what was wrong and what is expected."""
    e = errors[0]
    loc = [p for p in e["loc"] if p != "body"]
    if e["type"] == "json_invalid":
        where = f" at character {loc[0]}" if loc else ""
        return APIError(400, f"the request body is not valid JSON ({e.get('ctx', {}).get('error', e['msg'])}{where})")
    param = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".") or None
    if e["type"] == "missing":
        return APIError(400, f"{param} is required", param)
    message = e["msg"].removeprefix("Value error, ")
    got = json.dumps(e.get("input"))[:80] if e.get("input") is not None and e["type"] != "model_type" else None
    if param is None:
        return APIError(400, f"the request body: {message}")
    return APIError(400, f"{param}: {message}" + (f" (got {got})" if got else ""), param)


# ---- request bodies ---------------------------------------------------------------------------------------
# OpenAI fields this server does not implement: refused when set, so that nobody is silently ignored.
UNSUPPORTED = ("logprobs", "top_logprobs", "logit_bias", "frequency_penalty", "presence_penalty", "tools",
               "tool_choice", "functions", "function_call", "response_format", "echo", "best_of", "suffix",
               "dimensions")


class Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")  # unknown fields (user, metadata, ...) pass

    def refuse_unsupported(self) -> None:
        for name in UNSUPPORTED:
            value = (self.model_extra or {}).get(name)
            if value in (None, False, 0, [], {}, {"type": "text"}):
                continue
            raise APIError(400, f"{name} is not supported by this server", name)


class Message(Body):
    role: Literal["system", "user", "assistant"]
    content: Any

    @field_validator("content")
    @classmethod
    def plain_text(cls, content: Any) -> str:
        """A string, or OpenAI's list of {"type": "text", "text": ...} parts (joined)."""
        if isinstance(content, str):
            return content
        if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                             and isinstance(p.get("text"), str) for p in content):
            return "".join(p["text"] for p in content)
        raise ValueError('expected a string or a list of {"type": "text", "text": "..."} parts')


class StreamOptions(Body):
    include_usage: bool = False


class Generation(Body):
    model: Optional[str] = None
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)  # not OpenAI's, but common (vLLM); 0 = off
    ignore_eos: bool = False  # not OpenAI's either (vLLM's): decode max_tokens through stop tokens
    max_tokens: Optional[int] = Field(None, ge=1)
    stop: Any = Field(None, validate_default=True)
    seed: Optional[int] = None
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None

    @field_validator("stop")
    @classmethod
    def stop_strings(cls, stop: Any) -> list[str]:
        stops = [stop] if isinstance(stop, str) else [] if stop is None else stop
        if not isinstance(stops, list) or len(stops) > 4 or not all(isinstance(s, str) and s for s in stops):
            raise ValueError("expected a non-empty string or a list of up to 4 of them")
        return stops


class ChatRequest(Generation):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)


class CompletionRequest(Generation):
    prompt: Any
    max_tokens: Optional[int] = Field(16, ge=1)  # OpenAI's default for completions


class EmbeddingRequest(Body):
    model: Optional[str] = None
    input: Any
    encoding_format: Literal["float", "base64"] = "float"


class TokenizeRequest(Body):
    prompt: Optional[str] = None
    messages: Optional[list[Message]] = None
    add_special_tokens: bool = True  # <|begin_of_text|> before a prompt
    add_generation_prompt: bool = True  # the assistant header after messages


class DetokenizeRequest(Body):
    tokens: list[int]


# ---- text of one choice ----------------------------------------------------------------------------------
class ChoiceText:
    """One choice's text as its tokens arrive: bytes decoded incrementally (a character split across
    tokens comes out whole, as generate.py prints it), cut before the first stop string, and the end held
    back while it could be the start of one."""

    def __init__(self, tokenizer, stops: list[str]):
        self.tokenizer, self.stops = tokenizer, stops
        self.longest = max((len(s) for s in stops), default=0)
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.text = ""
        self.sent = 0
        self.stopped = False

    def add(self, token: int) -> str:
        self.text += self.decoder.decode(self.tokenizer.decode_token_bytes(token))
        return self._release(final=False)

    def close(self) -> str:
        if not self.stopped:
            self.text += self.decoder.decode(b"", final=True)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        if self.stopped:
            return ""
        hits = [i for s in self.stops if (i := self.text.find(s, max(0, self.sent - self.longest))) >= 0]
        if hits:
            self.text, self.stopped = self.text[:min(hits)], True
            end = len(self.text)
        else:
            end = len(self.text) if final else max(self.sent, len(self.text) - self._held_back())
        piece, self.sent = self.text[self.sent:end], end
        return piece

    def _held_back(self) -> int:
        tail = self.text[self.sent:]
        for k in range(min(len(tail), self.longest - 1), 0, -1):
            if any(s.startswith(tail[-k:]) for s in self.stops):
                return k
        return 0


# ---- one request's sequences --------------------------------------------------------------------------
class Run:
    """A request's choices as engine sequences, their events brought onto this event loop."""

    def __init__(self, engine: BatchEngine, tokenizer, prompts: list[list[int]], sampling: list[Sampling],
                 stops: list[str]):
        self.engine = engine
        self.loop = asyncio.get_running_loop()
        self.events: asyncio.Queue = asyncio.Queue()
        self.seqs = [Sequence(p, s, self._deliver(i)) for i, (p, s) in enumerate(zip(prompts, sampling))]
        self.texts = [ChoiceText(tokenizer, stops) for _ in self.seqs]
        self.finish: list[Optional[str]] = [None] * len(self.seqs)
        self.prompt_tokens = 0  # the request's prompts, each counted once however many choices it has
        self.completion_tokens = 0

    def _deliver(self, i: int):
        def on_event(kind: str, value: Any) -> None:
            try:
                self.loop.call_soon_threadsafe(self.events.put_nowait, (i, kind, value))
            except RuntimeError:  # the event loop has closed (the server is stopping): nobody is listening
                pass
        return on_event

    def start(self) -> None:
        try:
            self.engine.submit(self.seqs)
        except EngineStopped as e:
            raise APIError(503, str(e), type="server_error") from None
        except OverflowError as e:
            raise APIError(503, f"the server is busy: {e}", type="server_error", code="overloaded") from None

    def cancel(self) -> None:
        for seq in self.seqs:
            seq.cancel()

    async def pieces(self) -> AsyncIterator[tuple[int, str, Optional[str]]]:
        """(choice, text piece, finish_reason or None) as tokens arrive; cancels what is left on exit."""
        try:
            while None in self.finish:
                i, kind, value = await self.events.get()
                if self.finish[i] is not None:
                    continue  # a token decoded after a stop string was found
                if kind == "error":
                    raise APIError(503 if "shutting down" in value else 500, value, type="server_error")
                if kind == "token":
                    self.completion_tokens += 1
                    piece = self.texts[i].add(value)
                    if self.texts[i].stopped:
                        self.seqs[i].cancel()
                        self.finish[i] = "stop"
                    if piece or self.finish[i]:
                        yield i, piece, self.finish[i]
                else:
                    self.finish[i] = value
                    yield i, self.texts[i].close(), value
        finally:
            self.cancel()

    def usage(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}


async def collect(run: Run, request: Request) -> None:
    """Run to the end; a client that goes away first cancels it."""
    async def consume():
        async for _ in run.pieces():
            pass

    task = asyncio.ensure_future(consume())
    try:
        while not (await asyncio.wait({task}, timeout=0.25))[0]:
            if await request.is_disconnected():
                task.cancel()
                raise APIError(499, "the client went away")
        task.result()
    finally:
        task.cancel()


def sse(events: AsyncIterator[Any], run: Run) -> EventSourceResponse:
    """Server-sent events of JSON objects (FastAPI's encoder), ending with `data: [DONE]`; an error
    after the stream began becomes an error event, as OpenAI sends one."""
    async def body():
        try:
            async for event in events:
                yield format_sse_event(data_str=json.dumps(event, ensure_ascii=False))
        except APIError as e:
            yield format_sse_event(data_str=json.dumps(e.body()))
        yield format_sse_event(data_str="[DONE]")

    # background: also when the client went away before the stream's first event
    return EventSourceResponse(body(), headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                               background=BackgroundTask(run.cancel))


# ---- the service ------------------------------------------------------------------------------------------
class Service:
    def __init__(self, model, tokenizer, engine: BatchEngine, args: argparse.Namespace, api_key: Optional[str]):
        self.model, self.tokenizer, self.engine = model, tokenizer, engine
        self.name = args.model_name or args.checkpoint
        self.context = model.args.max_seq_len
        self.max_tokens_limit, self.api_key = args.max_tokens_limit, api_key
        self.created = int(time.time())

    # ---- checks shared by the endpoints -----------------------------------------------------------------
    def require_key(self, request: Request) -> None:
        if self.api_key is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(given.strip().encode(), self.api_key.encode()):
            raise APIError(401, "missing or wrong API key: send 'Authorization: Bearer KEY' with the key the "
                                "server was started with (--api_key or SERVE_API_KEY)", code="invalid_api_key")

    def budget(self, prompt_len: int, requested: Optional[int], prompt_param: str) -> int:
        """max_tokens for a prompt of prompt_len tokens: the request's, checked, or what the context leaves."""
        if prompt_len >= self.context:
            raise APIError(400, f"the prompt has {prompt_len} tokens; the model's context is {self.context} tokens, "
                                f"which leaves no room for an answer", prompt_param)
        if requested is None:
            return min(self.context - prompt_len, self.max_tokens_limit)
        if requested > self.max_tokens_limit:
            raise APIError(400, f"max_tokens {requested} is over this server's limit of {self.max_tokens_limit} "
                                f"(--max_tokens_limit)", "max_tokens")
        if prompt_len + requested > self.context:
            raise APIError(400, f"max_tokens {requested} and the prompt's {prompt_len} tokens exceed the model's "
                                f"context of {self.context} tokens: ask for at most {self.context - prompt_len}",
                           "max_tokens")
        return requested

    def token_ids(self, ids: Any, param: str) -> list[int]:
        if not isinstance(ids, list) or not ids or not all(type(t) is int for t in ids):
            raise APIError(400, f"{param}: expected a non-empty list of token ids", param)
        bad = next((t for t in ids if not 0 <= t < self.tokenizer.n_words), None)
        if bad is not None:
            raise APIError(400, f"{param}: token id {bad} is outside the vocabulary (0..{self.tokenizer.n_words - 1})",
                           param)
        return ids

    def prompts(self, prompt: Any, param: str = "prompt") -> list[list[int]]:
        """A string, a list of strings, a list of token ids or a list of such lists -> token id lists;
        text gets <|begin_of_text|> first, as generate.py's plain prompts do."""
        if isinstance(prompt, str):
            return [self.tokenizer.encode(prompt, bos=True, eos=False)]
        if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
            return [self.tokenizer.encode(p, bos=True, eos=False) for p in prompt]
        if isinstance(prompt, list) and prompt and all(type(t) is int for t in prompt):
            return [self.token_ids(prompt, param)]
        if isinstance(prompt, list) and prompt and all(isinstance(p, list) for p in prompt):
            return [self.token_ids(p, f"{param}[{i}]") for i, p in enumerate(prompt)]
        raise APIError(400, f"{param}: expected a string, a list of strings, a list of token ids or a list of "
                            f"such lists", param)

    def run(self, body: Generation, prompts: list[list[int]], requested: Optional[int]) -> Run:
        body.refuse_unsupported()
        if body.n > self.engine.max_batch:
            raise APIError(400, f"n is at most {self.engine.max_batch} on this server (--max_batch)", "n")
        prompt_param = "messages" if isinstance(body, ChatRequest) else "prompt"
        budgets = [self.budget(len(p), requested, prompt_param) for p in prompts]
        seeds = [None if body.seed is None else body.seed + k for k in range(body.n)]  # choice k: seed + k
        sampling = [Sampling(b, body.temperature, body.top_p, body.top_k, seed, body.ignore_eos)
                    for b in budgets for seed in seeds]
        run = Run(self.engine, self.tokenizer, [p for p in prompts for _ in range(body.n)], sampling, body.stop)
        run.prompt_tokens = sum(len(p) for p in prompts)
        run.start()
        return run

    # ---- endpoints -------------------------------------------------------------------------------------------
    def chat_prompt(self, messages: list[Message]) -> list[int]:
        if messages[-1].role != "user":
            raise APIError(400, f"the conversation must end with a user turn; the last message is the "
                                f"{messages[-1].role}'s", "messages")
        return self.tokenizer.encode_chat([{"role": m.role, "content": m.content} for m in messages])

    async def chat(self, body: ChatRequest, request: Request) -> Response:
        run = self.run(body, [self.chat_prompt(body.messages)], body.max_completion_tokens or body.max_tokens)
        head = {"id": f"chatcmpl-{secrets.token_hex(12)}", "created": int(time.time()), "model": self.name}
        if body.stream:
            return sse(self.chat_chunks(run, head, body), run)
        await collect(run, request)
        choices = [{"index": i, "message": {"role": "assistant", "content": t.text}, "logprobs": None,
                    "finish_reason": f} for i, (t, f) in enumerate(zip(run.texts, run.finish))]
        return JSONResponse({**head, "object": "chat.completion", "choices": choices, "usage": run.usage()})

    async def chat_chunks(self, run: Run, head: dict, body: ChatRequest) -> AsyncIterator[dict]:
        def chunk(i: int, delta: dict, finish: Optional[str] = None) -> dict:
            return {**head, "object": "chat.completion.chunk",
                    "choices": [{"index": i, "delta": delta, "logprobs": None, "finish_reason": finish}]}

        for i in range(len(run.seqs)):
            yield chunk(i, {"role": "assistant", "content": ""})
        async for i, piece, finish in run.pieces():
            if piece:
                yield chunk(i, {"content": piece})
            if finish:
                yield chunk(i, {}, finish)
        if body.stream_options and body.stream_options.include_usage:
            yield {**head, "object": "chat.completion.chunk", "choices": [], "usage": run.usage()}

    async def completions(self, body: CompletionRequest, request: Request) -> Response:
        run = self.run(body, self.prompts(body.prompt), body.max_tokens)
        head = {"id": f"cmpl-{secrets.token_hex(12)}", "object": "text_completion", "created": int(time.time()),
                "model": self.name}
        if body.stream:
            return sse(self.completion_chunks(run, head, body), run)
        await collect(run, request)
        choices = [{"index": i, "text": t.text, "logprobs": None, "finish_reason": f}
                   for i, (t, f) in enumerate(zip(run.texts, run.finish))]
        return JSONResponse({**head, "choices": choices, "usage": run.usage()})

    async def completion_chunks(self, run: Run, head: dict, body: CompletionRequest) -> AsyncIterator[dict]:
        async for i, piece, finish in run.pieces():
            yield {**head, "choices": [{"index": i, "text": piece, "logprobs": None, "finish_reason": finish}]}
        if body.stream_options and body.stream_options.include_usage:
            yield {**head, "choices": [], "usage": run.usage()}

    async def embeddings(self, body: EmbeddingRequest) -> dict:
        body.refuse_unsupported()
        inputs = self.prompts(body.input, "input")
        for i, ids in enumerate(inputs):
            if len(ids) > self.context:
                raise APIError(400, f"input {i} has {len(ids)} tokens; the model's context is {self.context}", "input")
        device = self.engine.device

        def mean_hidden_states() -> list[torch.Tensor]:
            return [self.model.hidden_states(torch.tensor([ids], device=device))[0].float().mean(0).cpu()
                    for ids in inputs]

        try:
            vectors = await asyncio.wrap_future(self.engine.call(mean_hidden_states))
        except EngineStopped as e:
            raise APIError(503, str(e), type="server_error") from None
        encode = (lambda v: v.tolist()) if body.encoding_format == "float" else \
            (lambda v: base64.b64encode(v.numpy().astype("<f4").tobytes()).decode())
        n = sum(len(ids) for ids in inputs)
        return {"object": "list", "model": self.name, "usage": {"prompt_tokens": n, "total_tokens": n},
                "data": [{"object": "embedding", "index": i, "embedding": encode(v)} for i, v in enumerate(vectors)]}

    def models(self) -> dict:
        return {"object": "list", "data": [self.model_card()]}

    def model_card(self) -> dict:
        return {"id": self.name, "object": "model", "created": self.created, "owned_by": "llama3-trainer",
                "max_model_len": self.context}

    def tokenize(self, body: TokenizeRequest) -> dict:
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "send either prompt (a string) or messages (a conversation)", "prompt")
        if body.messages is not None:
            ids = self.tokenizer.encode_chat([{"role": m.role, "content": m.content} for m in body.messages],
                                             add_generation_prompt=body.add_generation_prompt)
        else:
            ids = self.tokenizer.encode(body.prompt, bos=body.add_special_tokens, eos=False)
        return {"tokens": ids, "count": len(ids), "max_model_len": self.context}

    def detokenize(self, body: DetokenizeRequest) -> dict:
        if body.tokens:
            self.token_ids(body.tokens, "tokens")
        return {"prompt": self.tokenizer.decode(body.tokens)}

    def health(self) -> dict:
        e = self.engine
        return {"status": "ok", "model": self.name, "max_model_len": self.context, "active": e.active,
                "queued": e.queued, "max_batch": e.max_batch, "width_floor": e.width_floor,
                "decode_steps": e.decode_steps, "peak_batch": e.peak_batch}


class BodyLimit:
    """ASGI middleware: a request body over `limit` bytes, declared or as it streams in, ends with 413
    (raised from `receive`, so the app's handler words the answer)."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"0")
        received = 0

        async def limited_receive():
            nonlocal received
            if declared.isdigit() and int(declared) > self.limit:
                raise HTTPException(413)
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit:
                raise HTTPException(413)
            return message

        await self.app(scope, limited_receive, send)


def build_app(service: Service, page: str, max_body_bytes: int) -> FastAPI:
    app = FastAPI(title="llama3-trainer", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(BodyLimit, limit=max_body_bytes)
    keyed = [Depends(service.require_key)]
    v1 = APIRouter(prefix="/v1", dependencies=keyed)
    v1.add_api_route("/chat/completions", service.chat, methods=["POST"])
    v1.add_api_route("/completions", service.completions, methods=["POST"])
    v1.add_api_route("/embeddings", service.embeddings, methods=["POST"])
    v1.add_api_route("/models", service.models, methods=["GET"])

    @v1.get("/models/{name:path}")
    def model(name: str) -> dict:
        if name != service.name:
            raise APIError(404, f"no model {name!r} here; this server serves {service.name!r}", "model",
                           code="model_not_found")
        return service.model_card()

    app.include_router(v1)
    tools = APIRouter(dependencies=keyed)
    tools.add_api_route("/tokenize", service.tokenize, methods=["POST"])
    tools.add_api_route("/detokenize", service.detokenize, methods=["POST"])
    app.include_router(tools)
    app.add_api_route("/health", service.health, methods=["GET"])

    @app.get("/", response_class=HTMLResponse)
    def chat_page() -> HTMLResponse:
        # The page's script and style are inline; it may talk only to this server.
        csp = "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'"
        return HTMLResponse(page, headers={"Content-Security-Policy": csp})

    @app.exception_handler(APIError)
    async def api_error(_: Request, e: APIError) -> JSONResponse:
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        return validation_error(e.errors()).response()

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException) -> JSONResponse:
        message = {413: f"the request body is over this server's limit of {max_body_bytes} bytes (--max_body_bytes)",
                   404: f"no such endpoint: {request.url.path}",
                   405: f"{request.method} is not allowed on {request.url.path}"}.get(e.status_code, str(e.detail))
        return APIError(e.status_code, message).response()

    return app


# ---- start and stop ---------------------------------------------------------------------------------------
def load_served_model(args: argparse.Namespace):
    """The model and tokenizer as generate.py's main() loads them, so whatever it reads, this serves."""
    device = pick_device(args.device)
    model = load_model(args.checkpoint, device=device, dtype=pick_dtype(args.dtype, device))
    tokenizer = checked_tokenizer(args.checkpoint, args.tokenizer)
    if tokenizer.n_words > model.args.vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.n_words} tokens but the model only {model.args.vocab_size}")
    return model, tokenizer, rope_scaling_note(args.checkpoint)


def listening_socket(host: str, port: int) -> socket.socket:
    """Bound and listening before the server starts, so that --port 0 can be printed and early clients wait."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(address)
    sock.listen(128)
    return sock


class _Server(uvicorn.Server):
    """uvicorn, but a signal first ends every stream (the engine answers them with an error event), so
    that the graceful shutdown does not wait for answers to finish; a second Ctrl-C quits at once."""

    def __init__(self, config: uvicorn.Config, engine: BatchEngine):
        super().__init__(config)
        self.engine = engine

    def handle_exit(self, sig: int, frame) -> None:
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True
            return
        print(f"{signal.Signals(sig).name}: stopping (open streams end now)", file=sys.stderr, flush=True)
        self.engine.request_stop()
        self.should_exit = True


def warn_if_exposed(address: str, port: int, keyed: bool) -> None:
    if ipaddress.ip_address(address.split("%")[0]).is_loopback:
        return
    bar = "!" * 78
    print(f"{bar}\nWARNING: listening on {address}:{port}: any machine that can reach this one can use the model."
          f"\n{'Requests need the API key.' if keyed else 'No API key is set: anyone can. Pass --api_key KEY.'}"
          f"\n{bar}", file=sys.stderr, flush=True)


def parse_args(argv: Optional[Seq[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True,
                   help="a .pt checkpoint from train.py, a Meta-format or a Hugging Face model directory")
    p.add_argument("--tokenizer", default=None, help="tokenizer.model or HF tokenizer dir (default: the checkpoint's)")
    p.add_argument("--device", default="auto", help="auto (cuda when available, else cpu), cpu, cuda, cuda:N")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                   help="weights' dtype; auto: bf16 where it is fast (GPUs, CPUs with native bf16), else fp32")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default: this machine only; any other address is announced loudly)")
    p.add_argument("--port", type=int, default=8000,
                   help="port to listen on (default: %(default)s); 0 picks a free one, printed")
    p.add_argument("--api_key", default=None,
                   help="require 'Authorization: Bearer KEY' on /v1, /tokenize and /detokenize "
                        "(default: the SERVE_API_KEY environment variable; unset: no key)")
    p.add_argument("--model_name", default=None,
                   help="the model's id in /v1/models and in answers (default: the --checkpoint path)")
    p.add_argument("--max_batch", type=int, default=8,
                   help="sequences decoded together (default: %(default)s); more wait in a queue")
    p.add_argument("--max_queue", type=int, default=64,
                   help="sequences that may wait (default: %(default)s); beyond, requests get 503")
    p.add_argument("--max_tokens_limit", type=int, default=4096,
                   help="the largest max_tokens a request may ask for (default: %(default)s)")
    p.add_argument("--max_body_bytes", type=int, default=1_000_000,
                   help="larger request bodies get 413 (default: %(default)s)")
    p.add_argument("--access_log", action="store_true", help="log every request (uvicorn's access log)")
    args = p.parse_args(argv)
    for name in ("max_batch", "max_queue", "max_tokens_limit", "max_body_bytes"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1")
    if not 0 <= args.port < 65536:
        p.error("--port must be in 0..65535")
    return args


def serve(model, tokenizer, page: str, sock: socket.socket, args: argparse.Namespace, api_key: Optional[str]) -> int:
    """Run the engine and the HTTP server until a signal stops them."""
    engine = BatchEngine(model, tokenizer.stop_tokens, args.max_batch, args.max_queue)
    engine.start()
    if engine.width_floor is None:
        print("WARNING: on this device a row's logits depend on the other rows of its batch: answers may differ "
              "between a request served alone and in company (--max_batch 1 serves one at a time)", file=sys.stderr)
    address, port = sock.getsockname()[:2]
    warn_if_exposed(address, port, api_key is not None)
    url = f"http://{f'[{address}]' if ':' in address else address}:{port}"
    a = model.args
    print(f"serving {args.checkpoint} ({a.n_layers} layers, dim {a.dim}, context {a.max_seq_len}, "
          f"{next(model.parameters()).dtype}, {engine.device}) at {url}/ (chat page) and {url}/v1 "
          f"(OpenAI API{', key required' if api_key else ''}); up to {args.max_batch} sequences decode together",
          flush=True)
    config = uvicorn.Config(build_app(Service(model, tokenizer, engine, args, api_key), page, args.max_body_bytes),
                            log_level="warning", access_log=args.access_log, timeout_graceful_shutdown=5)
    _Server(config, engine).run(sockets=[sock])
    engine.stop()
    print("stopped", file=sys.stderr, flush=True)
    return 0


def main(argv: Optional[Seq[str]] = None) -> int:
    args = parse_args(argv)
    api_key = args.api_key or os.environ.get("SERVE_API_KEY") or None
    try:
        page = PAGE.read_text(encoding="utf-8")
        model, tokenizer, note = load_served_model(args)
        sock = listening_socket(args.host, args.port)
    except (CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: cannot listen on {args.host}:{args.port}: {e.strerror or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted while loading", file=sys.stderr)
        return 130
    if note:
        print(note, file=sys.stderr)
    # The CPU's batched decode steps run faster on weights reordered for max_batch rows (speedups.py), for as
    # long as the server runs; the engine's width probe then measures the kernels it serves with.
    with reordered_linears(model, rows=args.max_batch):
        return serve(model, tokenizer, page, sock, args, api_key)


if __name__ == "__main__":
    raise SystemExit(main())
