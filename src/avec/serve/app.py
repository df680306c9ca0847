"""The FastAPI app: OpenAI-compatible chat completions with per-request steering.

Routes: ``GET /`` (the web playground), ``GET /v1/models``, ``GET /v1/models/{id}``,
``POST /v1/chat/completions``, ``GET/POST /v1/vectors``, ``GET/DELETE /v1/vectors/{name}``;
the OpenAPI schema is at ``/openapi.json``. Every error is a JSON body
``{"error": {"message", "type", ...}}``.

Streaming (``stream: true``) sends Server-Sent Events in the OpenAI chunk format while the
tokens are generated (the engine hands each new token to the request as its batch step ends),
ending with ``data: [DONE]``; an error after the stream has started arrives as a
``data: {"error": ...}`` event.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from typing import Any, AsyncIterator, Awaitable, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from avec.errors import AvecError
from avec.serve.engine import Engine, GenerationResult, Limits
from avec.serve.registry import RegistryError, describe
from avec.serve.schemas import ChatCompletionRequest

# the playground page holds no data (it asks for the key itself) and the schema is public
OPEN_PATHS = frozenset({"/", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"})
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error",
               404: "not_found_error", 405: "invalid_request_error", 409: "conflict_error",
               411: "invalid_request_error", 413: "request_too_large",
               504: "timeout_error"}


class APIError(Exception):
    """An error answered as ``{"error": {...}}`` with an HTTP status."""

    def __init__(self, status: int, message: str, type_: str | None = None,
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_ or ERROR_TYPES.get(status, "server_error")
        self.param = param
        self.code = code


def error_response(status: int, message: str, type_: str | None = None,
                   param: str | None = None, code: str | None = None) -> JSONResponse:
    body = {"message": message, "type": type_ or ERROR_TYPES.get(status, "server_error"),
            "param": param, "code": code}
    return JSONResponse({"error": body}, status_code=status)


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
            if not length.isdigit():
                return error_response(400, f"invalid Content-Length {length!r}")
            if int(length) > self.max_body_bytes:
                return error_response(413, f"request body is {length} bytes; the limit is "
                                      f"{self.max_body_bytes}")
        elif scope["method"] in ("POST", "PUT", "PATCH") and "transfer-encoding" in headers:
            return error_response(411, "send a Content-Length header (chunked request bodies "
                                  "are not accepted)")
        return None


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
        parts.append(f"{loc or 'body'}: {err.get('msg', 'invalid')}")
    return "invalid request: " + "; ".join(parts)


def create_app(engine: Engine, *, api_key: str | None = None, model_id: str = "default",
               limits: Limits | None = None) -> FastAPI:
    """The HTTP app serving ``engine``'s model as ``model_id`` (requests may also name it
    ``"default"``). ``api_key``: require ``Authorization: Bearer <api_key>`` on every route
    but the OpenAPI/docs pages. ``limits`` defaults to the engine's."""
    limits = limits or engine.limits
    model = engine.model
    registry = engine.registry
    created = int(time.time())
    app = FastAPI(title="avec", description="OpenAI-compatible chat completions with "
                  "per-request activation steering (the `steering` field).")
    app.add_middleware(_Guard, api_key=api_key, max_body_bytes=limits.max_body_bytes)

    @app.exception_handler(APIError)
    async def _api_error(_request: Request, exc: APIError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.type, exc.param, exc.code)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(400, _validation_message(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def _crash(_request: Request, exc: Exception) -> JSONResponse:
        return error_response(500, f"internal error: {type(exc).__name__}: {exc}")

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

    def prompt_ids(req: ChatCompletionRequest) -> list[int]:
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        if model.has_chat_template:
            text = model.tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                       tokenize=False)
        else:
            text = "\n".join(m["content"] for m in messages)
        return list(model.tokenizer(text, add_special_tokens=False)["input_ids"])

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(req: ChatCompletionRequest) -> Any:
        check_model(req.model)
        if req.top_p not in (None, 1):
            raise APIError(400, f"top_p={req.top_p}: nucleus sampling is not supported; omit "
                           f"top_p (or set 1) and use temperature", param="top_p")
        if req.n not in (None, 1):
            raise APIError(400, f"n={req.n}: only one choice per request is supported",
                           param="n")
        max_tokens = req.max_tokens or req.max_completion_tokens or min(
            limits.default_max_tokens, limits.max_tokens)
        if max_tokens > limits.max_tokens:
            raise APIError(400, f"max_tokens={max_tokens} exceeds this server's limit of "
                           f"{limits.max_tokens}", param="max_tokens")
        ids = prompt_ids(req)
        if len(ids) > limits.max_prompt_tokens:
            raise APIError(400, f"the prompt has {len(ids)} tokens; the limit is "
                           f"{limits.max_prompt_tokens}", param="messages")
        tokens: asyncio.Queue[int | None] = asyncio.Queue()
        loop = asyncio.get_running_loop()
        on_token = (lambda t: loop.call_soon_threadsafe(tokens.put_nowait, t)) \
            if req.stream else None
        try:
            future = engine.submit(ids, req.steering or [], max_tokens, on_token=on_token,
                                   temperature=req.temperature or 0.0, seed=req.seed)
        except RegistryError as exc:
            raise APIError(400, str(exc), param="steering", code="unknown_vector") from None
        except AvecError as exc:
            raise APIError(400, str(exc), param="steering") from None
        cid = f"chatcmpl-{uuid.uuid4().hex}"
        now = int(time.time())
        if req.stream:  # the sentinel follows every token: both go through the loop in order
            future.add_done_callback(
                lambda _f: loop.call_soon_threadsafe(tokens.put_nowait, None))
            return StreamingResponse(
                _live_sse(cid, now, req.model, model.tokenizer, tokens, future,
                          limits.request_timeout_s), media_type="text/event-stream")
        try:
            result: GenerationResult = await asyncio.wait_for(
                asyncio.wrap_future(future), timeout=limits.request_timeout_s)
        except asyncio.TimeoutError:
            raise APIError(504, f"generation did not finish within "
                           f"{limits.request_timeout_s} s; ask for fewer max_tokens or "
                           f"retry later") from None
        except RuntimeError as exc:
            raise APIError(500, str(exc)) from None
        text = model.tokenizer.decode(result.tokens, skip_special_tokens=True)
        return {"id": cid, "object": "chat.completion", "created": now, "model": req.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "finish_reason": result.finish_reason, "logprobs": None}],
                "usage": {"prompt_tokens": result.prompt_tokens,
                          "completion_tokens": len(result.tokens),
                          "total_tokens": result.prompt_tokens + len(result.tokens)}}

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
        ``?filename=x.gguf`` for a GGUF file). Replaces a vector of the same name."""
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
            vec = registry.add(name, data, filename or "upload.safetensors")
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

    return app


async def _live_sse(cid: str, created: int, model_name: str, tokenizer: Any,
                    tokens: "asyncio.Queue[int | None]", future: Any,
                    timeout_s: float) -> AsyncIterator[str]:
    """OpenAI ``chat.completion.chunk`` events as tokens arrive, then ``[DONE]``. Text is
    decoded from all tokens so far and only the new part is sent, so multi-token characters
    are never split."""

    def chunk(delta: dict[str, Any], finish: str | None = None) -> str:
        body = {"id": cid, "object": "chat.completion.chunk", "created": created,
                "model": model_name,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish,
                             "logprobs": None}]}
        return f"data: {json.dumps(body)}\n\n"

    def error(message: str, type_: str) -> str:
        return f"data: {json.dumps({'error': {'message': message, 'type': type_}})}\n\n"

    yield chunk({"role": "assistant", "content": ""})
    got: list[int] = []
    sent = ""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            left = max(0.0, deadline - time.monotonic())
            tok = await asyncio.wait_for(tokens.get(), timeout=left)
        except asyncio.TimeoutError:
            yield error(f"generation did not finish within {timeout_s} s", "timeout_error")
            return
        if tok is None:
            break
        got.append(tok)
        text = tokenizer.decode(got, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            continue  # an incomplete multi-byte character: wait for the next token
        if len(text) > len(sent) and text.startswith(sent):
            yield chunk({"content": text[len(sent):]})
            sent = text
    exc = future.exception()
    if exc is not None:
        yield error(str(exc), "server_error")
        return
    result: GenerationResult = future.result()
    final = tokenizer.decode(result.tokens, skip_special_tokens=True)
    if final != sent and final.startswith(sent):
        yield chunk({"content": final[len(sent):]})
    yield chunk({}, result.finish_reason)
    yield "data: [DONE]\n\n"
