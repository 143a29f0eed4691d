"""The HTTP server: an OpenAI-compatible API and the web playground, thin over the batcher and the store.

Routes: `GET /v1/models`, `POST /v1/completions`, `POST /v1/chat/completions` (models whose
tokenizer_config.json has a `chat_template`), `POST /v1/feedback`, `GET /health`, and the playground at `/`.
`stream: true` answers with server-sent events in OpenAI's chunk format, ending with `data: [DONE]`.

Safety: the server binds 127.0.0.1 unless told otherwise, and while it does it only answers requests whose
Host is a loopback name (a web page elsewhere cannot reach it through DNS rebinding); `--api-key` is checked on
every /v1 route (401 in OpenAI's error shape); request bodies are bounded (413); every limit is a 4xx JSON
error that names it (prompt longer than the context, max_tokens above the cap, n above the cap, too many
requests at once -> 429). The page is served with a Content-Security-Policy that allows only its own script
and it inserts generated text as text, never as HTML.
"""

# no `from __future__ import annotations`: FastAPI reads the request models from the annotations at runtime

import asyncio
import json
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pocketlm.errors import PocketLMError
from pocketlm.generate import Engine, SamplingParams
from pocketlm.serve.batching import Batcher, Event, Request
from pocketlm.serve.feedback import FeedbackStore

STATIC = Path(__file__).parent / "static"
LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1", "[::1]"}
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


@dataclass
class ServeOptions:
    model_name: str = "pocketlm"
    api_key: str | None = None
    max_concurrency: int = 8  # requests in flight (queued or generating) before 429
    max_batch: int = 16  # sequences stepped together (1 = one at a time)
    max_tokens_cap: int = 1024  # the largest max_tokens a request may ask for
    max_n: int = 8
    max_request_bytes: int = 64 * 1024
    loopback_only: bool = True  # answer only Host: 127.0.0.1 / localhost / [::1]

    def validate(self) -> "ServeOptions":
        for name in ("max_concurrency", "max_batch", "max_tokens_cap", "max_n", "max_request_bytes"):
            if getattr(self, name) < 1:
                raise PocketLMError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.api_key is not None and not self.api_key.strip():
            raise PocketLMError("--api-key is empty: pass a non-empty key or leave the flag out")
        return self


class APIError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None,
                 type_: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.type = status, message, code, param, type_

    def body(self) -> bytes:
        return json.dumps({"error": {"message": self.message, "type": self.type, "param": self.param,
                                     "code": self.code}}).encode()


# ---- the ASGI guard: host, API key, body size, security headers --------------------------------------

class Guard:
    """Pure ASGI middleware (streams pass through untouched)."""

    def __init__(self, app: Any, opts: ServeOptions) -> None:
        self.app, self.opts = app, opts

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        path = scope["path"]
        err = self._check(headers, path)
        if err is not None:
            return await _send_error(send, err)
        limit = self.opts.max_request_bytes
        seen = 0

        async def bounded_receive() -> dict:
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > limit:
                    raise _TooLarge
            return msg

        async def send_with_headers(msg: dict) -> None:
            if msg["type"] == "http.response.start":
                extra = [(b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"no-referrer")]
                if not path.startswith("/v1/"):
                    extra += [(b"content-security-policy", CSP.encode()), (b"x-frame-options", b"DENY")]
                msg = {**msg, "headers": [*msg.get("headers", []), *extra]}
            await send(msg)

        try:
            await self.app(scope, bounded_receive, send_with_headers)
        except _TooLarge:
            await _send_error(send, _too_large(limit))

    def _check(self, headers: dict[str, str], path: str) -> APIError | None:
        if self.opts.loopback_only:
            host = headers.get("host", "")
            name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
            if name not in LOOPBACK_HOSTS:
                return APIError(400, f"Host {host!r} is not a loopback name; this server only answers "
                                     "127.0.0.1/localhost (start it with --host to serve other names)",
                                code="invalid_host")
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.opts.max_request_bytes:
            return _too_large(self.opts.max_request_bytes)
        if self.opts.api_key and path.startswith("/v1/"):
            auth = headers.get("authorization", "")
            given = auth[7:].strip() if auth.lower().startswith("bearer ") else ""
            if not secrets.compare_digest(given.encode(), self.opts.api_key.encode()):
                return APIError(401, "Incorrect or missing API key: send 'Authorization: Bearer KEY' with the "
                                     "key the server was started with (--api-key)", code="invalid_api_key")
        return None


class _TooLarge(Exception):
    pass


def _too_large(limit: int) -> APIError:
    return APIError(413, f"request body is larger than this server's limit of {limit} bytes "
                         "(--max-request-bytes)", code="request_too_large")


async def _send_error(send: Any, err: APIError) -> None:
    body = err.body()
    await send({"type": "http.response.start", "status": err.status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


# ---- the application ---------------------------------------------------------------------------------

def create_app(engine: Engine, opts: ServeOptions, store: FeedbackStore, chat_template_tokenizer: Any = None):
    """The FastAPI app; the batcher starts and stops with the app's lifespan."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request as HTTPRequest
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
    from fastapi.staticfiles import StaticFiles
    from pydantic import BaseModel, ConfigDict, Field

    opts.validate()
    batcher = Batcher(engine, opts.max_batch)
    state = {"inflight": 0, "created": int(time.time())}
    T = engine.block_size

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        batcher.start()
        try:
            yield
        finally:
            batcher.close()

    app = FastAPI(title="pocketlm", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.batcher = batcher
    app.state.store = store

    class Common(BaseModel):
        model_config = ConfigDict(extra="ignore")
        model: str | None = None
        max_tokens: int | None = Field(None, ge=0)
        max_completion_tokens: int | None = Field(None, ge=0)
        temperature: float = Field(1.0, ge=0, le=2)
        top_p: float = Field(1.0, gt=0, le=1)
        top_k: int = Field(0, ge=0)  # beyond OpenAI: the sampler has them
        repetition_penalty: float = Field(1.0, gt=0)
        ignore_eos: bool = False  # vLLM's extension: keep going past end-of-text (fixed-length benchmarks)
        n: int = Field(1, ge=1)
        stream: bool = False
        stream_options: dict[str, Any] | None = None
        stop: str | list[str] | None = None
        seed: int | None = None
        logprobs: Any = None
        echo: bool = False

    class CompletionBody(Common):
        prompt: str | list[str] | list[int] = ""
        suffix: str | None = None

    class Message(BaseModel):
        model_config = ConfigDict(extra="ignore")
        role: str
        content: str | list[dict[str, Any]] | None = None

    class ChatBody(Common):
        messages: list[Message] = Field(min_length=1)

    class FeedbackBody(BaseModel):
        model_config = ConfigDict(extra="forbid")
        kind: Literal["rating", "compare"]
        prompt: str
        completion: str | None = None
        label: bool | None = None  # thumbs up = true
        chosen: str | None = None
        rejected: str | None = None
        source: Literal["web", "api"] = "api"
        model: str | None = None
        meta: dict[str, Any] | None = None

    # ---- errors in OpenAI's shape
    @app.exception_handler(APIError)
    async def _api_error(_: HTTPRequest, e: APIError) -> Response:
        return Response(e.body(), status_code=e.status, media_type="application/json")

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: HTTPRequest, e: RequestValidationError) -> Response:
        first = e.errors()[0] if e.errors() else {"loc": (), "msg": "invalid request"}
        loc = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        err = APIError(400, f"{loc}: {first.get('msg')}" if loc else str(first.get("msg")), code="invalid_value",
                       param=loc or None)
        return Response(err.body(), status_code=400, media_type="application/json")

    @app.exception_handler(404)
    async def _not_found(_: HTTPRequest, e: Exception) -> Response:
        err = APIError(404, "no such route; the API is under /v1 (models, completions, chat/completions, "
                            "feedback)", code="not_found")
        return Response(err.body(), status_code=404, media_type="application/json")

    # ---- helpers
    def check_model(name: str | None) -> None:
        if name and name != opts.model_name:
            raise APIError(404, f"The model '{name}' does not exist; this server serves '{opts.model_name}'",
                           code="model_not_found", param="model")

    def sampling(body: Common, default_max: int) -> SamplingParams:
        if body.logprobs or body.echo or getattr(body, "suffix", None):
            raise APIError(400, "logprobs, echo and suffix are not supported by this server", code="unsupported")
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        max_tokens = default_max if max_tokens is None else max_tokens
        if max_tokens > opts.max_tokens_cap:
            raise APIError(400, f"max_tokens {max_tokens} is above this server's cap of {opts.max_tokens_cap} "
                                "(--max-tokens-cap)", code="max_tokens_exceeded", param="max_tokens")
        if body.n > opts.max_n:
            raise APIError(400, f"n={body.n} is above this server's cap of {opts.max_n} (--max-n)", param="n")
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stop) > 4 or any(not s or len(s) > 64 for s in stop):
            raise APIError(400, "stop takes up to 4 non-empty strings of at most 64 characters", param="stop")
        p = SamplingParams(max_new_tokens=max_tokens, temperature=body.temperature, top_k=body.top_k,
                           top_p=body.top_p, repetition_penalty=body.repetition_penalty, seed=body.seed, stop=stop,
                           stop_at_eot=not body.ignore_eos)
        try:
            return p.validate()
        except PocketLMError as e:
            raise APIError(400, str(e)) from None

    def encode(prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, list) and any(not 0 <= t < engine.model.config.vocab_size for t in prompt):
            raise APIError(400, "prompt token ids must be in [0, vocab_size)", param="prompt")
        try:
            ids = engine.encode_prompt(prompt)
        except PocketLMError as e:
            raise APIError(400, str(e), param="prompt") from None
        if len(ids) > T:
            raise APIError(400, f"the prompt has {len(ids)} tokens; this model's context is {T} tokens: shorten "
                                "the prompt", code="context_length_exceeded", param="prompt")
        return ids

    def admit() -> None:
        if state["inflight"] >= opts.max_concurrency:
            raise APIError(429, f"the server is busy: {opts.max_concurrency} requests are in flight "
                                "(--max-concurrency); retry shortly", code="rate_limit_exceeded", type_="requests")
        state["inflight"] += 1

    async def generate(prompts: list[list[int]], p: SamplingParams, n: int,
                       http: HTTPRequest) -> AsyncIterator[tuple[int, Event]]:
        """Events of every choice (index = prompt * n + sample) as the worker produces them."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()
        reqs = []
        for pi, ids in enumerate(prompts):
            def emit(ev: Event, base: int = pi * n) -> None:
                loop.call_soon_threadsafe(events.put_nowait, (base + ev.index, ev))
            reqs.append(Request(ids, p, n, emit, engine.tok))
        open_choices = len(prompts) * n
        try:
            for r in reqs:
                batcher.submit(r)
            while open_choices:
                try:
                    index, ev = await asyncio.wait_for(events.get(), timeout=1.0)
                except asyncio.TimeoutError:
                    if await http.is_disconnected():
                        return
                    continue
                if ev.kind == "error":
                    raise APIError(500, ev.text, code="generation_failed", type_="server_error")
                if ev.kind == "done":
                    open_choices -= 1
                yield index, ev
        finally:
            for r in reqs:  # a client that went away stops its generation at the next step
                r.cancel()

    def new_id(prefix: str) -> str:
        return f"{prefix}-{uuid.uuid4().hex[:24]}"

    def sse(obj: Any) -> bytes:
        return b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n"

    async def respond(http: HTTPRequest, body: Common, prompts: list[list[int]], p: SamplingParams,
                      chat: bool) -> Response:
        n = body.n
        if len(prompts) * n > opts.max_batch:
            raise APIError(400, f"{len(prompts)} prompt(s) x n={n} sequences exceed the server's batch of "
                                f"{opts.max_batch} (--max-batch)", param="n")
        admit()
        rid, created = new_id("chatcmpl" if chat else "cmpl"), int(time.time())
        obj = "chat.completion" if chat else "text_completion"
        prompt_tokens = sum(len(ids) for ids in prompts)
        base = {"id": rid, "object": obj + (".chunk" if chat and body.stream else ""), "created": created,
                "model": opts.model_name}
        if body.stream:
            usage_wanted = bool((body.stream_options or {}).get("include_usage"))

            async def chunks() -> AsyncIterator[bytes]:
                completion_tokens = 0
                try:
                    if chat:
                        for i in range(len(prompts) * n):
                            yield sse({**base, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                                            "logprobs": None, "finish_reason": None}]})
                    async for index, ev in generate(prompts, p, n, http):
                        if ev.kind == "delta":
                            choice = ({"index": index, "delta": {"content": ev.text}, "logprobs": None,
                                       "finish_reason": None} if chat else
                                      {"index": index, "text": ev.text, "logprobs": None, "finish_reason": None})
                        else:
                            completion_tokens += ev.tokens
                            choice = ({"index": index, "delta": {}, "logprobs": None,
                                       "finish_reason": ev.finish_reason} if chat else
                                      {"index": index, "text": "", "logprobs": None,
                                       "finish_reason": ev.finish_reason})
                        yield sse({**base, "choices": [choice]})
                    if usage_wanted:
                        yield sse({**base, "choices": [], "usage": _usage(prompt_tokens, completion_tokens)})
                    yield b"data: [DONE]\n\n"
                except APIError as e:  # after the headers went out, an error travels as an event
                    yield b"data: " + e.body() + b"\n\n"
                finally:
                    state["inflight"] -= 1

            return StreamingResponse(chunks(), media_type="text/event-stream",
                                     headers={"cache-control": "no-cache", "x-accel-buffering": "no"})
        try:
            texts = [""] * (len(prompts) * n)
            finish: list[str | None] = [None] * len(texts)
            completion_tokens = 0
            async for index, ev in generate(prompts, p, n, http):
                if ev.kind == "delta":
                    texts[index] += ev.text
                else:
                    finish[index] = ev.finish_reason
                    completion_tokens += ev.tokens
        finally:
            state["inflight"] -= 1
        if chat:
            choices = [{"index": i, "message": {"role": "assistant", "content": t}, "logprobs": None,
                        "finish_reason": f} for i, (t, f) in enumerate(zip(texts, finish))]
        else:
            choices = [{"index": i, "text": t, "logprobs": None, "finish_reason": f}
                       for i, (t, f) in enumerate(zip(texts, finish))]
        return JSONResponse({**base, "choices": choices, "usage": _usage(prompt_tokens, completion_tokens)})

    # ---- routes
    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": opts.model_name, "inflight": state["inflight"], **batcher.stats()}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{
            "id": opts.model_name, "object": "model", "created": state["created"], "owned_by": "pocketlm",
            "context_length": T, "max_tokens_cap": opts.max_tokens_cap, "max_n": opts.max_n,
            "chat": chat_template_tokenizer is not None}]}

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, http: HTTPRequest) -> Response:
        check_model(body.model)
        p = sampling(body, default_max=16)  # OpenAI's default for completions
        if isinstance(body.prompt, str) or (body.prompt and isinstance(body.prompt[0], int)):
            prompts = [encode(body.prompt)]
        else:
            if not body.prompt:
                raise APIError(400, "prompt is an empty list", param="prompt")
            prompts = [encode(x) for x in body.prompt]
        return await respond(http, body, prompts, p, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatBody, http: HTTPRequest) -> Response:
        check_model(body.model)
        if chat_template_tokenizer is None:
            raise APIError(400, f"the model '{opts.model_name}' has no chat template (no chat_template in its "
                                "tokenizer_config.json): use /v1/completions", code="no_chat_template")
        p = sampling(body, default_max=min(opts.max_tokens_cap, T))
        messages = [{"role": m.role, "content": _text_of(m.content)} for m in body.messages]
        try:
            text = chat_template_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as e:  # a template that raises (e.g. on an unexpected role) names the problem itself
            raise APIError(400, f"the chat template cannot render these messages: {e}", param="messages") from None
        return await respond(http, body, [encode(text)], p, chat=True)

    @app.post("/v1/feedback")
    async def feedback(body: FeedbackBody) -> dict[str, Any]:
        try:
            event_id = await asyncio.to_thread(
                store.add, body.kind, body.prompt, source=body.source, model=body.model or opts.model_name,
                completion=body.completion, label=body.label, chosen=body.chosen, rejected=body.rejected,
                meta=body.meta)
        except PocketLMError as e:
            raise APIError(400, str(e)) from None
        return {"id": event_id, "object": "feedback", "stored": True}

    @app.get("/")
    async def index() -> Response:
        return FileResponse(STATIC / "index.html", media_type="text/html; charset=utf-8")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.add_middleware(Guard, opts=opts)
    return app


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _text_of(content: str | list[dict[str, Any]] | None) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    parts = []
    for part in content:
        if part.get("type") != "text":
            raise APIError(400, f"message content of type {part.get('type')!r} is not supported; send text",
                           param="messages")
        parts.append(str(part.get("text", "")))
    return "".join(parts)


def chat_tokenizer(folder: Path) -> Any:
    """The HF tokenizer when the model has a chat template (the standard `chat_template` field), else None."""
    cfg_file = folder / "tokenizer_config.json"
    has_template = cfg_file.is_file() and json.loads(cfg_file.read_text(encoding="utf-8")).get("chat_template")
    if not has_template and not (folder / "chat_template.jinja").is_file():
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


def build(model: str | Path, opts: ServeOptions, db: str | Path | None = None, device: str = "auto"):
    """Load a model and open the feedback store -> (app, engine, store)."""
    from pocketlm import checkpoint as ckpt

    _require()
    engine = Engine.load(model, device)
    folder = ckpt.resolve(model)
    store = FeedbackStore(db)
    return create_app(engine, opts, store, chat_tokenizer(folder)), engine, store


def _require() -> None:
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise PocketLMError("serving needs FastAPI and uvicorn: pip install 'pocketlm[serve]'") from None


def make_server(app: Any, host: str, port: int):
    """A uvicorn Server and its bound socket (port 0 picks a free port: read it from the socket)."""
    import socket

    import uvicorn

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise PocketLMError(f"cannot listen on {host}:{port}: {e.strerror}; pick another --port") from None
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=3, access_log=False)
    return uvicorn.Server(config), sock
