"""Talk to your model: an OpenAI-compatible server with streaming, batching and a chat page.

    python ch07/serve.py --model ch07/runs/finetune_instructions/<run>   # ch07's finetuned model
    python ch07/serve.py --model runs/pretrain-<date>-<time>   # a folder written by ch05/pretrain.py
    python ch07/serve.py --model gpt2-small                # OpenAI's GPT-2 (downloaded once)

then open http://127.0.0.1:8000/ for the chat page, or point any OpenAI client at
http://127.0.0.1:8000/v1. Routes:

- ``GET /v1/models``: the one model served;
- ``POST /v1/completions``: prompt -> continuation (for pretrained models);
- ``POST /v1/chat/completions``: messages -> ch07's Alpaca prompt -> the model's response;
  both take max_tokens, temperature, top_p, stop, seed and ``stream: true`` (server-sent events);
- ``GET /``: the chat page (``ch07/static/chat.html``).

Requests that arrive while the model is busy are generated together (shared.serving). The
server listens on 127.0.0.1 only unless told otherwise, and then only with an API key.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import secrets
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Literal

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException

from shared.instruction import format_prompt
from shared.serving import BatchingEngine, Event, SamplingSettings
from shared.tokenizer import encode_text, get_gpt2_tokenizer
from shared.utils import get_device
from shared.weights import HF_REPOS, CheckpointError, download_gpt2, load_hf_gpt2

CHAT_PAGE = Path(__file__).with_name("static") / "chat.html"
MAX_REQUEST_BYTES = 1_000_000


# ---------------------------------------------------------------------------------------
# What clients send (fields OpenAI defines that we do not use are accepted and ignored)
# ---------------------------------------------------------------------------------------


class StreamOptions(BaseModel):
    include_usage: bool = False


class GenerationFields(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1


class CompletionRequest(GenerationFields):
    prompt: str


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(GenerationFields):
    messages: list[Message] = Field(min_length=1)


class ApiError(Exception):
    """An error the client should see: HTTP status and an OpenAI-style error object."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param=None, code=None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code
        self.headers: dict[str, str] = {}


def error_response(error: ApiError) -> JSONResponse:
    body = {"error": {"message": error.message, "type": error.kind, "param": error.param, "code": error.code}}
    return JSONResponse(body, status_code=error.status, headers=error.headers)


# ---------------------------------------------------------------------------------------
# From a request to the engine and back
# ---------------------------------------------------------------------------------------


def chat_prompt(messages: list[Message]) -> str:
    """ch07's Alpaca prompt: the last user message is the instruction; earlier turns (and a
    system message) become its input, since the model was finetuned on single turns."""
    users = [i for i, m in enumerate(messages) if m.role == "user"]
    if not users:
        raise ApiError(400, "messages need at least one message with role 'user'.", param="messages")
    last = users[-1]
    earlier = "\n".join(f"{m.role.capitalize()}: {m.content}" for m in messages[:last])
    return format_prompt({"instruction": messages[last].content, "input": earlier})


class Server:
    """The app's state: the engine (with the model and tokenizer), the limits and the requests in flight."""

    def __init__(
        self,
        engine: BatchingEngine,
        model_name: str,
        api_key: str | None,
        max_tokens: int,
        max_in_flight: int,
    ):
        self.engine, self.model_name, self.api_key = engine, model_name, api_key
        self.max_tokens, self.max_in_flight = max_tokens, max_in_flight
        self.in_flight = 0

    def settings(self, body: GenerationFields) -> SamplingSettings:
        if body.n != 1:
            raise ApiError(400, "only n=1 is supported: send one request per answer.", param="n")
        if body.max_tokens is not None and body.max_tokens > self.max_tokens:
            raise ApiError(
                400,
                f"max_tokens is {body.max_tokens}, but this server allows at most {self.max_tokens} "
                "(its --max-tokens).",
                param="max_tokens",
            )
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stop) > 4 or not all(stop):
            raise ApiError(400, "stop takes up to 4 non-empty strings.", param="stop")
        return SamplingSettings(
            body.max_tokens or self.max_tokens, body.temperature, body.top_p, body.seed, tuple(stop)
        )

    def encode(self, prompt: str) -> list[int]:
        ids = encode_text(self.engine.tokenizer, prompt)
        limit = self.engine.context_length
        if not ids:
            raise ApiError(400, "the prompt is empty; send at least one character.", param="prompt")
        if len(ids) >= limit:
            raise ApiError(
                400,
                f"the prompt has {len(ids)} tokens, but the model's context holds {limit} including "
                "the answer; shorten the prompt.",
                param="prompt",
                code="context_length_exceeded",
            )
        return ids

    def start(self, prompt_ids: list[int], settings: SamplingSettings, request: Request) -> Generation:
        """Take a slot (429 when all are taken) and queue the request in the engine."""
        if self.in_flight >= self.max_in_flight:
            error = ApiError(
                429,
                f"the server is busy ({self.max_in_flight} requests in flight); retry shortly.",
                kind="rate_limit_error",
            )
            error.headers["Retry-After"] = "1"
            raise error
        self.in_flight += 1
        try:
            return Generation(self, prompt_ids, settings, request)
        except BaseException:
            self.in_flight -= 1
            raise


class Generation:
    """One request in flight: the engine's events for it, on this server's event loop."""

    def __init__(self, server: Server, prompt_ids, settings, request: Request):
        self.server, self.request, self.closed = server, request, False
        self.prompt_tokens = len(prompt_ids)
        loop, self.queue = asyncio.get_running_loop(), asyncio.Queue()
        self.handle = server.engine.submit(
            prompt_ids, settings, lambda event: loop.call_soon_threadsafe(self.queue.put_nowait, event)
        )

    async def events(self) -> AsyncIterator[Event]:
        """The events as they come, until the last one; stops early when the client leaves."""
        try:
            while True:
                try:
                    event = await asyncio.wait_for(self.queue.get(), timeout=1.0)
                except asyncio.TimeoutError:
                    if await self.request.is_disconnected():
                        return
                    continue
                yield event
                if event.finish_reason is not None:
                    return
        finally:
            self.close()

    def close(self) -> None:
        """Stop the generation (if it still runs) and free the slot; safe to call twice."""
        if not self.closed:
            self.closed = True
            self.handle.cancel()
            self.server.in_flight -= 1


async def read_body(request: Request, schema: type[BaseModel]):
    """The JSON body, checked: 413 over 1 MB, 400 when it is not JSON, 422 when a field is wrong."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_REQUEST_BYTES:
        raise ApiError(413, f"the request is larger than {MAX_REQUEST_BYTES:,} bytes.")
    raw = bytearray()
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > MAX_REQUEST_BYTES:
            raise ApiError(413, f"the request is larger than {MAX_REQUEST_BYTES:,} bytes.")
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ApiError(400, f"the body is not valid JSON ({error}).") from None
    try:
        return schema.model_validate(data)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "body"
        raise ApiError(422, f"{where}: {first['msg']}", param=where) from None


# ---------------------------------------------------------------------------------------
# Replies in OpenAI's format
# ---------------------------------------------------------------------------------------


def usage(event: Event) -> dict:
    total = event.prompt_tokens + event.completion_tokens
    return {
        "prompt_tokens": event.prompt_tokens,
        "completion_tokens": event.completion_tokens,
        "total_tokens": total,
    }


def choice(
    chat: bool, text: str | None, finish_reason: str | None, stream: bool, first: bool = False
) -> dict:
    """One entry of ``choices``: a message or its delta for chat, text for completions."""
    if not chat:
        return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
    if not stream:
        return {
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "logprobs": None,
            "finish_reason": finish_reason,
        }
    delta = {"role": "assistant", "content": text or ""} if first else ({"content": text} if text else {})
    return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}


async def reply(server: Server, generation: Generation, body: GenerationFields, chat: bool):
    """The whole answer as one JSON object, or a stream of server-sent events ending in [DONE]."""
    kind = "chat.completion" if chat else "text_completion"
    head = {
        "id": f"{'chatcmpl' if chat else 'cmpl'}-{secrets.token_hex(12)}",
        "created": int(time.time()),
        "model": server.model_name,
    }
    if not body.stream:
        pieces, last = [], None
        async for event in generation.events():
            pieces.append(event.text)
            last = event
        if last is None or last.finish_reason is None:  # the client left: nobody to answer
            return JSONResponse({}, status_code=499)
        if last.error:
            return error_response(ApiError(500, f"generation failed: {last.error}", kind="server_error"))
        text = "".join(pieces)
        return {
            **head,
            "object": kind,
            "choices": [choice(chat, text, last.finish_reason, False)],
            "usage": usage(last),
        }

    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    async def sse() -> AsyncIterator[str]:
        chunk = {**head, "object": f"{kind}.chunk" if chat else kind}
        if chat:  # OpenAI's first chunk names the role
            yield f"data: {json.dumps({**chunk, 'choices': [choice(True, '', None, True, first=True)]})}\n\n"
        async for event in generation.events():
            if event.error:
                error = {
                    "message": f"generation failed: {event.error}",
                    "type": "server_error",
                    "param": None,
                    "code": None,
                }
                yield f"data: {json.dumps({'error': error})}\n\n"
                break
            if event.text or event.finish_reason:
                choices = [choice(chat, event.text, event.finish_reason, True)]
                yield f"data: {json.dumps({**chunk, 'choices': choices})}\n\n"
            if event.finish_reason and include_usage:
                yield f"data: {json.dumps({**chunk, 'choices': [], 'usage': usage(event)})}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(
        sse(), media_type="text/event-stream", background=BackgroundTask(generation.close)
    )


# ---------------------------------------------------------------------------------------
# The app
# ---------------------------------------------------------------------------------------


def create_app(server: Server) -> FastAPI:
    """The FastAPI app for ``server``; its engine must be started (see :func:`main`)."""
    app = FastAPI(title="ch07 model server", docs_url=None, redoc_url=None, openapi_url=None)

    @app.middleware("http")
    async def check_api_key(request: Request, call_next):
        if server.api_key and request.url.path != "/":
            given = request.headers.get("authorization", "")
            if not secrets.compare_digest(given.encode(), f"Bearer {server.api_key}".encode()):
                return error_response(
                    ApiError(
                        401,
                        "missing or wrong API key: send the header 'Authorization: Bearer <key>'.",
                        kind="authentication_error",
                        code="invalid_api_key",
                    )
                )
        return await call_next(request)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError):
        return error_response(error)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException):
        return error_response(ApiError(error.status_code, str(error.detail), kind="invalid_request_error"))

    @app.exception_handler(Exception)
    async def unexpected(
        request: Request, error: Exception
    ):  # logged by uvicorn; the client gets no traceback
        return error_response(
            ApiError(
                500, f"internal error ({type(error).__name__}); see the server log.", kind="server_error"
            )
        )

    @app.get("/", include_in_schema=False)
    async def chat_page():
        return FileResponse(CHAT_PAGE, media_type="text/html")

    @app.get("/v1/models")
    async def models():
        card = {
            "id": server.model_name,
            "object": "model",
            "created": 0,
            "owned_by": "you",
            "context_length": server.engine.context_length,
            "max_tokens": server.max_tokens,
        }
        return {"object": "list", "data": [card]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await read_body(request, CompletionRequest)
        settings, prompt_ids = server.settings(body), server.encode(body.prompt)
        return await reply(server, server.start(prompt_ids, settings, request), body, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await read_body(request, ChatRequest)
        settings, prompt_ids = server.settings(body), server.encode(chat_prompt(body.messages))
        return await reply(server, server.start(prompt_ids, settings, request), body, chat=True)

    return app


# ---------------------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------------------


def load_model(name: str, device):
    """A GPTModel from a checkpoint folder (ch05's pretrain run, ch07's out-dir or its model/), or GPT-2 by size."""
    if name in HF_REPOS:
        folder = download_gpt2(name)
    else:
        folder = Path(name)
        if (folder / "model" / "config.json").is_file():  # ch07/finetune_instructions.py's --out-dir
            folder = folder / "model"
    if not folder.is_dir():
        raise SystemExit(
            f"--model {name}: no such folder. Give a checkpoint folder (config.json + model.safetensors: "
            f"ch05/pretrain.py's run folder, ch07/finetune_instructions.py's out-dir) or one of {list(HF_REPOS)}."
        )
    try:
        return load_hf_gpt2(folder, device=device)
    except CheckpointError as error:
        raise SystemExit(f"--model {name}: {error}") from None


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="checkpoint folder, or gpt2-small/-medium/-large/-xl")
    parser.add_argument("--model-name", help="the name clients see (default: the folder's name)")
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default: this machine only)"
    )
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument(
        "--api-key", help="required from clients as 'Authorization: Bearer KEY'; needed off loopback"
    )
    parser.add_argument("--device", help="cuda, mps or cpu (default: the best available)")
    parser.add_argument(
        "--max-batch", type=int, default=8, help="requests generated together (1: one at a time)"
    )
    parser.add_argument(
        "--max-in-flight", type=int, default=32, help="requests queued or running; more get 429"
    )
    parser.add_argument(
        "--max-tokens", type=int, default=256, help="the most new tokens one request may ask for"
    )
    args = parser.parse_args(argv)
    if not is_loopback(args.host) and not args.api_key:
        parser.error(
            f"--host {args.host} lets other machines connect: also give --api-key (a long random string)."
        )
    for flag in ("max_batch", "max_in_flight", "max_tokens"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1.")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    model = load_model(args.model, get_device(args.device))
    tokenizer = get_gpt2_tokenizer()
    engine = BatchingEngine(model, tokenizer, eos_id=tokenizer.eot_token, max_batch=args.max_batch).start()
    name = args.model_name or Path(args.model.rstrip("/")).name
    server = Server(engine, name, args.api_key, args.max_tokens, args.max_in_flight)
    print(
        f"serving {name} on http://{args.host}:{args.port}/ (chat page) and http://{args.host}:{args.port}/v1"
    )
    try:
        uvicorn.run(create_app(server), host=args.host, port=args.port, log_level="warning")
    finally:
        engine.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
