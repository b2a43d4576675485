"""The HTTP app: OpenAI's completions and chat completions (plain and Server-Sent Events),
the model list, health, Prometheus metrics and a chat page, over a SlotPool.

Generation runs on the slots' threads, never on the event loop; the handlers only
tokenize (in the thread pool), queue a Job and relay its pieces. Every error a client can
cause is an HTTP 4xx with OpenAI's error object:
    {"error": {"message": ..., "type": "invalid_request_error", "param": ..., "code": ...}}
"""
import asyncio
import json
import secrets
import time
import uuid
from importlib import resources
from typing import Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from engine.chat import end_of_turn_stops, render_prompt, template_for, tokenize_prompt
from engine.chat_template import ChatTemplateError
from engine.cli.serve.metrics import Metrics
from engine.cli.serve.schemas import ChatRequest, CompletionRequest
from engine.cli.serve.slots import Job, SlotPool

# The pools of this process's Ray Serve replicas, by model name (engine/cli/serve/ray_serve.py).
REPLICA_POOLS: dict = {}
# Requests larger than this are refused with 413 before they are parsed.
DEFAULT_MAX_BODY = 1 << 20
# Seconds a client has to send a request's head (engine/cli/serve/protocol.py), then its
# body (BodyLimit); a slower one gets 408.
DEFAULT_TIMEOUT = 30.0
# How often a non-streaming request checks that its client is still there.
DISCONNECT_POLL_SECONDS = 0.5


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: Optional[str] = None, code: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class BodyLimit:
    """ASGI middleware: the request body is read here, before the app sees it, within
    `timeout` seconds and up to max_bytes, whether or not it says its length up front.
    Over the limit gets 413, too slow gets 408; both close the connection, so the rest
    of a refused body is never read."""

    def __init__(self, app, max_bytes: int, timeout: float = DEFAULT_TIMEOUT):
        self.app, self.max_bytes, self.timeout = app, max_bytes, timeout

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.max_bytes
        too_big = ApiError(413, f"the request body is larger than the server's limit of {limit} bytes")
        length = dict(scope.get("headers", ())).get(b"content-length")
        if length is not None:
            try:
                over = int(length) > limit
            except ValueError:
                over = True
            if over:
                return await _send_json(send, 413, too_big.body(), close=True)
        chunks, seen, more = [], 0, True
        try:
            async with asyncio.timeout(self.timeout):
                while more:
                    message = await receive()
                    if message["type"] != "http.request":  # the client left
                        return
                    chunks.append(message.get("body", b""))
                    seen += len(chunks[-1])
                    if seen > limit:
                        return await _send_json(send, 413, too_big.body(), close=True)
                    more = message.get("more_body", False)
        except TimeoutError:
            late = ApiError(408, f"the request body did not arrive within {self.timeout:g} s",
                            code="request_timeout")
            return await _send_json(send, 408, late.body(), close=True)
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


async def _send_json(send, status, obj, close=False):
    body = json.dumps(obj).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _sampling(req) -> dict:
    """generate() keywords from a request body (its defaults are kiln's)."""
    out = {"temperature": req.temperature, "top_k": req.top_k, "top_p": req.top_p, "min_p": req.min_p,
           "repeat_penalty": req.repeat_penalty, "seed": req.seed, "max_tokens": req.max_tokens}
    return {k: v for k, v in out.items() if v is not None or k == "max_tokens"}


def create_app(pool: Optional[SlotPool], model_name: str, api_key: Optional[str] = None,
               max_body: int = DEFAULT_MAX_BODY, timeout: float = DEFAULT_TIMEOUT) -> FastAPI:
    """The app over `pool`; with pool None, over REPLICA_POOLS[model_name], which a Ray
    Serve replica fills in its own process (Ray ships the app and the replica class to
    the replica separately, so a pool set on the app object would not reach the copy
    that serves)."""
    app = FastAPI(title="kiln", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.pool = pool

    def _pool() -> SlotPool:
        if app.state.pool is not None:
            return app.state.pool
        # imported here, not read as a global: a copy of this function that Ray shipped
        # by value carries a copy of this module's globals, the import finds the module
        import engine.cli.serve.app as this
        return this.REPLICA_POOLS[model_name]
    app.add_middleware(BodyLimit, max_bytes=max_body, timeout=timeout)
    metrics = Metrics()
    created = int(time.time())

    def error_response(e: ApiError, endpoint: str):
        metrics.request(endpoint, e.status)
        headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
        return JSONResponse(e.body(), status_code=e.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, exc: RequestValidationError):
        errs = exc.errors()
        first = errs[0] if errs else {}
        if first.get("type") == "json_invalid":  # loc is ("body", byte offset)
            where = first.get("loc", ())[-1:]
            detail = (first.get("ctx") or {}).get("error", first.get("msg", ""))
            at = f" at byte {where[0]}" if where and isinstance(where[0], int) else ""
            return error_response(ApiError(400, f"invalid request body: not valid JSON{at} ({detail})"),
                                  request.url.path)
        loc = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        msg = first.get("msg", "invalid request body")
        return error_response(ApiError(400, f"invalid request body: {loc + ': ' if loc else ''}{msg}",
                                       param=loc or None), request.url.path)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        return error_response(exc, request.url.path)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        if exc.status_code == 404:
            e = ApiError(404, f"no route {request.method} {request.url.path}", code="not_found")
        elif exc.status_code == 405:
            e = ApiError(405, f"method {request.method} is not allowed on {request.url.path}")
        elif exc.status_code == 400 and exc.detail == "There was an error parsing the body":
            e = ApiError(400, "invalid request body: it cannot be parsed as JSON (invalid UTF-8, a "
                              "number too long or nesting too deep)")
        else:
            e = ApiError(exc.status_code, str(exc.detail))
        return error_response(e, request.url.path)

    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception):
        return error_response(ApiError(500, f"internal error: {type(exc).__name__}: {exc}",
                                       type_="server_error"), request.url.path)

    @app.middleware("http")
    async def authorize(request: Request, call_next):
        path = request.url.path
        if api_key is not None and (path.startswith("/v1/") or path == "/metrics"):
            given = request.headers.get("authorization", "")
            scheme, _, token = given.partition(" ")
            if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), api_key.encode()):
                what = "no API key given" if not given else "the API key is not valid"
                return error_response(ApiError(401, f"{what}: send 'Authorization: Bearer <key>'",
                                               code="invalid_api_key"), path)
        return await call_next(request)

    # --- the generation endpoints ---------------------------------------------------
    def check_prompt(ids):
        if len(ids) > _pool().n_ctx:
            raise ApiError(400, f"the prompt is {len(ids)} tokens but the context holds "
                                f"{_pool().n_ctx} tokens", param="prompt", code="context_length_exceeded")

    async def completion_ids(req: CompletionRequest):
        prompt = req.prompt
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]
        if isinstance(prompt, list) and prompt and not all(isinstance(t, int) for t in prompt):
            raise ApiError(400, "one prompt per request: a string or a list of token ids", param="prompt")
        if isinstance(prompt, str):
            try:
                ids = await run_in_threadpool(_pool().llm.tokenize, prompt, None, True)
            except ValueError as e:  # text the tokenizer refuses (a lone surrogate, say)
                raise ApiError(400, f"the prompt cannot be tokenized: {e}", param="prompt") from None
        else:
            ids = list(prompt)
            bad = [t for t in ids if not 0 <= t < _pool().llm.n_vocab]
            if bad:
                raise ApiError(400, f"prompt token id {bad[0]} is outside the vocabulary "
                                    f"(0..{_pool().llm.n_vocab - 1})", param="prompt")
        if not ids:
            raise ApiError(400, "the prompt is empty", param="prompt")
        check_prompt(ids)
        return ids, list(req.stop_list())

    async def chat_ids(req: ChatRequest):
        llm = _pool().llm
        messages = [m.as_dict() for m in req.messages]

        def render():
            template = template_for(llm)
            text, spans = render_prompt(template, messages)
            return tokenize_prompt(llm, template, text, spans), end_of_turn_stops(llm, template)

        try:
            ids, eot = await run_in_threadpool(render)
        except (ChatTemplateError, ValueError) as e:
            raise ApiError(400, f"the messages cannot be rendered with the model's chat template: {e}",
                           param="messages") from None
        check_prompt(ids)
        stop = list(req.stop_list())
        return ids, stop + [s for s in eot if s not in stop]

    async def start(ids, stop, req, logprobs=None) -> Job:
        params = _sampling(req)
        params["stop"] = stop
        params["logprobs"] = logprobs
        # generate() validates the knobs; do it here so a bad one is a 400, not a dead job
        try:
            from engine.sampler import SAMPLING_KNOBS, SamplingParams, check_seed
            SamplingParams(**{k: params[k] for k in SAMPLING_KNOBS if k in params})
            check_seed(params.get("seed"))
        except (TypeError, ValueError) as e:
            raise ApiError(400, str(e)) from None
        job = Job(prompt_ids=ids, params=params, loop=asyncio.get_running_loop())
        _pool().submit(job)
        return job

    def finish(job, completion, endpoint):
        if job.first_piece is not None:
            metrics.first_token(job.first_piece - job.submitted)
        metrics.tokens(len(job.prompt_ids), len(completion.tokens))
        metrics.request(endpoint, 200)

    def usage(job, completion) -> dict:
        n = len(completion.tokens)
        return {"prompt_tokens": len(job.prompt_ids), "completion_tokens": n,
                "total_tokens": len(job.prompt_ids) + n}

    async def collect(job: Job, request: Request):
        """Wait for a job's pieces; withdraw it if the client goes away."""
        parts = []
        try:
            while True:
                try:
                    kind, value = await asyncio.wait_for(job.events.get(), DISCONNECT_POLL_SECONDS)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        _pool().withdraw(job)
                        raise ApiError(499, "the client closed the request")
                    continue
                if kind == "piece":
                    parts.append(value)
                elif kind == "error":
                    raise _job_error(value)
                else:
                    return "".join(parts), value
        finally:
            _pool().withdraw(job)  # no-op once done; frees the slot if we were cancelled

    def sse(obj) -> bytes:
        return b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n"

    def stream(job: Job, make_chunk, endpoint, include_usage):
        async def events():
            try:
                first = make_chunk(None, None, first=True)
                if first is not None:
                    yield sse(first)
                while True:
                    kind, value = await job.events.get()
                    if kind == "piece":
                        yield sse(make_chunk(value, None))
                    elif kind == "error":
                        yield sse(_job_error(value).body())
                        metrics.request(endpoint, _job_error(value).status)
                        break
                    else:
                        chunk = make_chunk(None, value.finish_reason, completion=value)
                        if include_usage:
                            chunk["usage"] = usage(job, value)
                        yield sse(chunk)
                        finish(job, value, endpoint)
                        break
                yield b"data: [DONE]\n\n"
            finally:  # the client went away mid-stream (or we are done): free the slot
                _pool().withdraw(job)

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    def logprobs_object(completion):
        """OpenAI's legacy completion logprobs: per generated token its text, log
        probability and the most likely alternatives."""
        tok = _pool().llm.tokenizer
        texts = [tok.decode([t]) for t in completion.tokens]
        offsets, at = [], 0
        for t in texts:
            offsets.append(at)
            at += len(t)
        return {"tokens": texts, "token_logprobs": [lp for lp, _ in completion.logprobs],
                "top_logprobs": [{tok.decode([i]): v for i, v in top} for _, top in completion.logprobs],
                "text_offset": offsets}

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        endpoint = "/v1/completions"
        ids, stop = await completion_ids(req)
        job = await start(ids, stop, req, logprobs=req.logprobs)
        cid, now = f"cmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(text, finish_reason, first=False, completion=None):
            if first:
                return None
            lp = logprobs_object(completion) if completion is not None and completion.logprobs is not None else None
            return {"id": cid, "object": "text_completion", "created": now, "model": model_name,
                    "choices": [{"text": text or "", "index": 0, "logprobs": lp,
                                 "finish_reason": finish_reason}]}

        if req.stream:
            return stream(job, chunk, endpoint, req.include_usage())
        text, completion = await collect(job, request)
        finish(job, completion, endpoint)
        body = chunk(text, completion.finish_reason, completion=completion)
        body["usage"] = usage(job, completion)
        return body

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest, request: Request):
        endpoint = "/v1/chat/completions"
        ids, stop = await chat_ids(req)
        job = await start(ids, stop, req)
        cid, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(text, finish_reason, first=False, completion=None):
            delta = {"role": "assistant", "content": ""} if first else ({"content": text} if text else {})
            return {"id": cid, "object": "chat.completion.chunk", "created": now, "model": model_name,
                    "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}

        if req.stream:
            return stream(job, chunk, endpoint, req.include_usage())
        text, completion = await collect(job, request)
        finish(job, completion, endpoint)
        return {"id": cid, "object": "chat.completion", "created": now, "model": model_name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "logprobs": None, "finish_reason": completion.finish_reason}],
                "usage": usage(job, completion)}

    # --- the rest -------------------------------------------------------------------
    @app.get("/v1/models")
    async def models():
        metrics.request("/v1/models", 200)
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "kiln", "n_ctx": _pool().n_ctx}]}

    @app.get("/health")
    async def health():
        return {"status": "ok", "slots": len(_pool().slots), "slots_busy": _pool().busy(),
                "requests_waiting": _pool().waiting()}

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(metrics.render(len(_pool().slots), _pool().busy(), _pool().waiting(),
                                                _pool().n_steps, _pool().n_slot_steps, _pool().n_rows),
                                 media_type="text/plain; version=0.0.4")

    page = resources.files("engine.cli.serve").joinpath("static", "index.html").read_text(encoding="utf-8")

    @app.get("/")
    async def chat_page():
        return HTMLResponse(page)

    app.state.metrics = metrics
    return app


def _job_error(e: Exception) -> ApiError:
    if isinstance(e, ApiError):
        return e
    if isinstance(e, (ValueError, TypeError)):
        return ApiError(400, str(e))
    return ApiError(500, f"generation failed: {type(e).__name__}: {e}", type_="server_error")
