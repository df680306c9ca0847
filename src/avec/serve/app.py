"""The FastAPI app: OpenAI-compatible chat completions with per-request steering.

Routes: ``GET /`` (the web playground), ``GET /v1/models``, ``GET /v1/models/{id}``,
``POST /v1/chat/completions``, ``GET/POST /v1/vectors``, ``GET/DELETE /v1/vectors/{name}``;
the OpenAPI schema is at ``/openapi.json``. Every error is a JSON body
``{"error": {"message", "type", "param", "code"}}``; a 429 (queue full) carries
``Retry-After``. Client errors are never logged with a traceback; a server bug is logged and
answered 500 without one.

A chat completion is checked in order of cost: the body size (``Content-Length``), the JSON
schema (:mod:`avec.serve.schemas`), the prompt's characters, the queue's room; the chat
template and tokenizer then run in a worker thread, so a large prompt never blocks the event
loop. While a request waits for its tokens the app watches its connection: a client that goes
away (streaming or not) stops the request's work in the engine.

Streaming (``stream: true``) sends Server-Sent Events in the OpenAI chunk format while the
tokens are generated (the engine hands each new token to the request as its batch step ends),
ending with ``data: [DONE]``; an error after the stream has started arrives as a
``data: {"error": ...}`` event. ``stop`` strings cut the text before the first one (a stream
holds back any text that could be the start of one); ``stream_options.include_usage`` adds a
last chunk with the token counts.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import re
import time
import uuid
from typing import Any, AsyncIterator, Awaitable, Callable, Sequence

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from avec.errors import AvecError
from avec.models.model import Model
from avec.serve.engine import Engine, Generation, GenerationResult, Limits
from avec.serve.errors import ERROR_TYPES, ServeError, safe_text
from avec.serve.registry import RegistryError, VectorRegistry, describe
from avec.serve.schemas import ChatCompletionRequest
from avec.serve.text import cut_at_stop, streamable

# the playground page holds no data (it asks for the key itself) and the schema is public
OPEN_PATHS = frozenset({"/", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"})
API_KEY_RE = re.compile(r"[\x21-\x7e]{1,512}")  # printable ASCII, no spaces
POLL_S = 0.1  # how often a waiting request checks that its client is still there
GRACE_S = 5.0  # beyond the engine's own deadline, before the app gives up waiting

APIError = ServeError  # the error a route raises; kept under its old name


def error_response(status: int, message: str, type_: str | None = None,
                   param: str | None = None, code: str | None = None,
                   retry_after: int | None = None) -> JSONResponse:
    body = {"message": safe_text(message), "type": type_ or ERROR_TYPES.get(status,
                                                                              "server_error"),
            "param": param, "code": code}
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
    return JSONResponse({"error": body}, status_code=status, headers=headers)


def check_api_key(api_key: str | None) -> str | None:
    """``api_key`` if usable (``None`` means no key); raise ValueError for an empty key or one
    a client could not send in a header."""
    if api_key is not None and not API_KEY_RE.fullmatch(api_key):
        raise ValueError("the API key is empty or has spaces or non-ASCII characters; give "
                         "1-512 printable ASCII characters, or no key at all (omit --api-key "
                         "and unset AVEC_API_KEY)")
    return api_key


class _Guard:
    """ASGI middleware: body size (by ``Content-Length``) and the optional bearer API key."""

    def __init__(self, app: Any, api_key: str | None, max_body_bytes: int) -> None:
        self.app = app
        self.api_key = api_key
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: dict, receive: Callable[[], Awaitable[dict]],
                       send: Callable[[dict], Awaitable[None]]) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1")
                   for k, v in scope.get("headers", [])}
        problem = self._check(scope, headers)
        if problem is not None:
            await problem(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _check(self, scope: dict, headers: dict[str, str]) -> JSONResponse | None:
        if self.api_key is not None and scope["path"] not in OPEN_PATHS:
            auth = headers.get("authorization", "")
            scheme, _, token = auth.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(
                    token.strip().encode(), self.api_key.encode()):
                return error_response(401, "missing or wrong API key: send the header "
                                      "'Authorization: Bearer <key>'", code="invalid_api_key")
        length = headers.get("content-length")
        if length is not None:
            if not (length.isascii() and length.isdigit()) or len(length) > 18:
                return error_response(400, f"invalid Content-Length {length[:40]!r}")
            if int(length) > self.max_body_bytes:
                return error_response(413, f"request body is {length} bytes; the limit is "
                                      f"{self.max_body_bytes}")
        elif scope["method"] in ("POST", "PUT", "PATCH") and "transfer-encoding" in headers:
            return error_response(411, "send a Content-Length header (chunked request bodies "
                                  "are not accepted)")
        return None


TYPE_TAG = re.compile(r"^(str|int|float|bool|list|dict|none)$|[\[(]")


def _validation_message(exc: RequestValidationError, limit: int = 12) -> str:
    """One line naming each invalid field (a union's branch tags left out, one message per
    field, and for a field that failed one of our checks, that check's message)."""
    found: dict[str, list[tuple[str, str]]] = {}
    for err in exc.errors():
        raw = [x for x in err.get("loc", ()) if x != "body"]
        kind = err.get("type", "")
        keep = raw[-1:] if kind == "extra_forbidden" else []  # the client's own field name
        loc = [x for x in raw[:len(raw) - len(keep)]
               if not (isinstance(x, str) and TYPE_TAG.search(x))] + keep
        where = ".".join(str(x) for x in loc) or "body"
        msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
        if kind == "extra_forbidden":
            msg = "unknown field; this server does not support it (remove it)"
        found.setdefault(where, []).append((kind, msg))
    parts = []
    for where, errs in list(found.items())[:limit]:
        ours = [m for k, m in errs if k == "value_error"] or [m for _, m in errs]
        parts.append(f"{where}: {' or '.join(dict.fromkeys(ours))}")
    more = f"; and {len(found) - limit} more" if len(found) > limit else ""
    return "invalid request: " + "; ".join(parts) + more


def create_app(engine: Engine, *, api_key: str | None = None, model_id: str = "default",
               limits: Limits | None = None,
               on_shutdown: Callable[[], None] | None = None) -> FastAPI:
    """The HTTP app serving ``engine``'s model as ``model_id`` (requests may also name it
    ``"default"``). ``api_key``: require ``Authorization: Bearer <api_key>`` on every route
    but the OpenAPI/docs pages (an empty key raises ValueError). ``limits`` defaults to the
    engine's. ``on_shutdown`` runs when the server shuts the app down (its lifespan's end)."""
    check_api_key(api_key)
    limits = limits or engine.limits

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        try:
            yield
        finally:
            if on_shutdown is not None:
                await run_in_threadpool(on_shutdown)

    app = FastAPI(title="avec", description="OpenAI-compatible chat completions with "
                  "per-request activation steering (the `steering` field).", lifespan=lifespan)
    app.add_middleware(_Guard, api_key=api_key, max_body_bytes=limits.max_body_bytes)
    _add_error_handlers(app)
    check_model = _add_model_routes(app, model_id)
    _add_chat_route(app, engine, limits, check_model)
    _add_vector_routes(app, engine.registry)
    return app


def _add_error_handlers(app: FastAPI) -> None:
    """Every error leaves as an OpenAI-style JSON error body."""

    @app.exception_handler(ServeError)
    async def _api_error(_request: Request, exc: ServeError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.type, exc.param, exc.code,
                              exc.retry_after)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(400, _validation_message(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def _crash(_request: Request, exc: Exception) -> JSONResponse:
        return error_response(500, f"internal error ({type(exc).__name__}); the server log "
                              f"has the details")


def _add_model_routes(app: FastAPI, model_id: str) -> Callable[[str], None]:
    """The playground page and ``/v1/models``; returns the check a request's ``model`` passes."""
    created = int(time.time())

    def model_card() -> dict[str, Any]:
        return {"id": model_id, "object": "model", "created": created, "owned_by": "avec"}

    def check_model(name: str) -> None:
        if name not in (model_id, "default"):
            raise APIError(404, f"model {name!r} does not exist; this server serves "
                           f"{model_id!r} (or use 'default')", param="model",
                           code="model_not_found")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def playground() -> HTMLResponse:
        """The web playground: unsteered vs steered completions, streamed (no external
        resources, works offline)."""
        from importlib.resources import files

        return HTMLResponse(files("avec.serve").joinpath("playground.html").read_text("utf-8"))

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name}")
    async def get_model(name: str) -> dict[str, Any]:
        check_model(name)
        return model_card()

    return check_model


def _prompt_ids(model: Model, req: ChatCompletionRequest) -> list[int]:
    """The chat-templated prompt's token ids (run in a worker thread)."""
    messages = [{"role": m.role, "content": m.text()} for m in req.messages]
    if model.has_chat_template:
        try:
            text = model.tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=False)
        except Exception as exc:  # e.g. a template that wants alternating roles
            raise APIError(400, f"the messages do not fit this model's chat template: "
                           f"{type(exc).__name__}: {exc}", param="messages") from None
    else:
        text = "\n".join(m["content"] for m in messages)
    return list(model.tokenizer(text, add_special_tokens=False)["input_ids"])


def _max_tokens(req: ChatCompletionRequest, limits: Limits) -> int:
    """The request's token budget, checked against the server's limits (before tokenizing)."""
    if req.top_p not in (None, 1):
        raise APIError(400, f"top_p={req.top_p}: nucleus sampling is not supported; omit "
                       f"top_p (or set 1) and use temperature", param="top_p")
    max_tokens = req.max_tokens or req.max_completion_tokens or min(
        limits.default_max_tokens, limits.max_tokens)
    if max_tokens > limits.max_tokens:
        raise APIError(400, f"max_tokens={max_tokens} exceeds this server's limit of "
                       f"{limits.max_tokens}", param="max_tokens")
    chars = req.prompt_chars()
    if chars > limits.max_prompt_chars:
        raise APIError(400, f"the messages have {chars} characters; the limit is "
                       f"{limits.max_prompt_chars}", param="messages")
    return max_tokens


def _add_chat_route(app: FastAPI, engine: Engine, limits: Limits,
                    check_model: Callable[[str], None]) -> None:
    model = engine.model

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(req: ChatCompletionRequest, request: Request) -> Any:
        check_model(req.model)
        max_tokens = _max_tokens(req, limits)
        engine.check_capacity()
        ids = await run_in_threadpool(_prompt_ids, model, req)
        if len(ids) > limits.max_prompt_tokens:
            raise APIError(400, f"the prompt has {len(ids)} tokens; the limit is "
                           f"{limits.max_prompt_tokens}", param="messages")
        tokens: asyncio.Queue[int | None] = asyncio.Queue()
        loop = asyncio.get_running_loop()
        on_token = (lambda t: loop.call_soon_threadsafe(tokens.put_nowait, t)) \
            if req.stream else None
        try:
            future = engine.submit(ids, req.steering or [], max_tokens, on_token=on_token,
                                   temperature=req.temperature or 0.0, seed=req.seed,
                                   stop=req.stop_strings(), use_default=req.default_steering)
        except RegistryError as exc:
            raise APIError(400, str(exc), param="steering", code="unknown_vector") from None
        except AvecError as exc:
            raise APIError(400, str(exc), param="steering") from None
        cid = f"chatcmpl-{uuid.uuid4().hex}"
        now = int(time.time())
        wait_s = limits.request_timeout_s + GRACE_S
        if req.stream:  # the sentinel follows every token: both go through the loop in order
            future.add_done_callback(
                lambda _f: _call_soon(loop, tokens.put_nowait, None))
            usage = bool(req.stream_options and req.stream_options.include_usage)
            return _StopOnClose(
                _live_sse(cid, now, req.model, model.tokenizer, tokens, future, wait_s,
                          req.stop_strings(), usage), future, media_type="text/event-stream")
        result = await _wait(future, request, wait_s)
        text, _ = cut_at_stop(model.tokenizer.decode(result.tokens, skip_special_tokens=True),
                              req.stop_strings())
        return {"id": cid, "object": "chat.completion", "created": now, "model": req.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "finish_reason": result.finish_reason, "logprobs": None}],
                "usage": _usage(result)}


def _add_vector_routes(app: FastAPI, registry: VectorRegistry) -> None:
    """List, describe, upload and delete the server's named vectors."""

    @app.get("/v1/vectors")
    async def list_vectors() -> dict[str, Any]:
        return {"object": "list", "data": registry.list()}

    @app.get("/v1/vectors/{name}")
    async def get_vector(name: str) -> dict[str, Any]:
        try:
            return describe(name, registry.get(name))
        except RegistryError as exc:
            raise APIError(exc.status, str(exc)) from None

    @app.post("/v1/vectors", status_code=201)
    async def upload_vector(request: Request, name: str | None = None,
                            filename: str | None = None) -> dict[str, Any]:
        """Upload a vector file (avec .safetensors or .gguf): multipart form with a ``file``
        part and a ``name`` field, or the raw file as the body with ``?name=`` (and optionally
        ``?filename=x.gguf`` for a GGUF file). Replaces a vector of the same name. The store
        is capped in file size, vector count and total bytes (413 or 409 beyond them)."""
        ctype = request.headers.get("content-type", "")
        if ctype.startswith("multipart/form-data"):
            form = await request.form()
            upload = form.get("file")
            if upload is None or isinstance(upload, str):
                raise APIError(400, "multipart upload needs a file part named 'file'",
                               param="file")
            data = await upload.read()
            field_name = form.get("name")
            name = field_name if isinstance(field_name, str) and field_name else name
            filename = upload.filename or filename
        else:
            data = await request.body()
        if not name:
            raise APIError(400, "give the vector a name: form field 'name' or ?name=",
                           param="name")
        try:
            vec = await run_in_threadpool(registry.add, name, data,
                                          filename or "upload.safetensors")
        except RegistryError as exc:
            raise APIError(exc.status, str(exc), param="file") from None
        return describe(name, vec)

    @app.delete("/v1/vectors/{name}")
    async def delete_vector(name: str) -> dict[str, Any]:
        try:
            registry.remove(name)
        except RegistryError as exc:
            raise APIError(exc.status, str(exc)) from None
        return {"name": name, "object": "vector", "deleted": True}


def _call_soon(loop: asyncio.AbstractEventLoop, fn: Callable[..., Any], *args: Any) -> None:
    """``fn(*args)`` on ``loop`` from another thread; nothing if the loop has closed."""
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(fn, *args)


def _usage(result: GenerationResult) -> dict[str, int]:
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": len(result.tokens),
            "total_tokens": result.prompt_tokens + len(result.tokens)}


async def _wait(future: Generation, request: Request, wait_s: float) -> GenerationResult:
    """``future``'s result, stopping its work if the client disconnects or ``wait_s`` pass."""
    waiter = asyncio.wrap_future(future)
    end = time.monotonic() + wait_s
    try:
        while True:
            done, _ = await asyncio.wait({waiter}, timeout=POLL_S)
            if done:
                return waiter.result()
            if await request.is_disconnected():
                future.stop()
                raise APIError(499, "the client closed the connection")
            if time.monotonic() > end:
                future.stop()
                raise APIError(504, f"generation did not finish within {wait_s:g} s; ask "
                               f"for fewer max_tokens or retry later")
    except asyncio.CancelledError:
        future.stop()
        raise


class _StopOnClose(StreamingResponse):
    """A streaming response that stops its request's work however the stream ends (finished,
    client gone, server shutting down)."""

    def __init__(self, content: AsyncIterator[str], future: Generation, **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self.future = future

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            if not self.future.done():
                self.future.stop()


async def _live_sse(cid: str, created: int, model_name: str, tokenizer: Any,
                    tokens: "asyncio.Queue[int | None]", future: Generation,
                    wait_s: float, stops: Sequence[str], include_usage: bool
                    ) -> AsyncIterator[str]:
    """OpenAI ``chat.completion.chunk`` events as tokens arrive, then ``[DONE]``. Text is
    decoded from all tokens so far and only the new part is sent, so multi-token characters
    are never split; with ``stops``, text that could begin a stop string waits, and nothing
    after a stop string is sent."""

    def chunk(delta: dict[str, Any], finish: str | None = None) -> str:
        body = {"id": cid, "object": "chat.completion.chunk", "created": created,
                "model": model_name,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish,
                             "logprobs": None}]}
        return f"data: {json.dumps(body)}\n\n"

    def error(exc: ServeError) -> str:
        body = {"message": safe_text(exc.message), "type": exc.type, "param": exc.param,
                "code": exc.code}
        return f"data: {json.dumps({'error': body})}\n\n"

    yield chunk({"role": "assistant", "content": ""})
    got: list[int] = []
    sent = ""
    hit = False
    end = time.monotonic() + wait_s
    while True:
        try:
            tok = await asyncio.wait_for(tokens.get(), timeout=max(0.0, end - time.monotonic()))
        except asyncio.TimeoutError:
            future.stop()
            yield error(ServeError(504, f"generation did not finish within {wait_s:g} s"))
            return
        if tok is None:
            break
        if hit:
            continue
        got.append(tok)
        text = tokenizer.decode(got, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            continue  # an incomplete multi-byte character: wait for the next token
        text, hit = streamable(text, stops)
        if len(text) > len(sent) and text.startswith(sent):
            yield chunk({"content": text[len(sent):]})
            sent = text
    if future.cancelled():
        return
    exc = future.exception()
    if exc is not None:
        yield error(exc if isinstance(exc, ServeError)
                    else ServeError(500, f"generation failed ({type(exc).__name__})"))
        return
    result: GenerationResult = future.result()
    final, _ = cut_at_stop(tokenizer.decode(result.tokens, skip_special_tokens=True), stops)
    if final != sent and final.startswith(sent):
        yield chunk({"content": final[len(sent):]})
    yield chunk({}, result.finish_reason)
    if include_usage:
        body = {"id": cid, "object": "chat.completion.chunk", "created": created,
                "model": model_name, "choices": [], "usage": _usage(result)}
        yield f"data: {json.dumps(body)}\n\n"
    yield "data: [DONE]\n\n"
