"""A local OpenAI-compatible Chat Completions server, scripted per test case (starlette + uvicorn).

It listens on 127.0.0.1 on an ephemeral port, records every request it receives (headers and JSON
body) and answers each with the next scripted `Reply`, or with `default` once the script is used up.
A reply may be a function of the request body, so a "good" answer can be computed from the numeric
context the analyst sent (like a model reading it). Used by the tests and by bench/llm_concurrency.py.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route


@dataclass
class Reply:
    status: int = 200
    body: Any = None  # dict → JSON; str → sent as is; an async iterator of bytes → streamed as it yields
    delay: float = 0.0
    headers: dict[str, str] = field(default_factory=dict)


Step = Reply | Callable[[dict], Reply]


class LocalOpenAIServer:
    def __init__(self) -> None:
        self.requests: list[dict] = []
        self.script: deque[Step] = deque()
        self.default: Step | None = None
        self.in_flight = 0
        self.max_in_flight = 0
        self._lock = threading.Lock()
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self.base_url = ""

    # -- scripting --

    def reset(self, *steps: Step, default: Step | None = None) -> None:
        with self._lock:
            self.requests.clear()
            self.script = deque(steps)
            self.default = default
            self.max_in_flight = 0

    def bodies(self) -> list[dict]:
        with self._lock:
            return [r["body"] for r in self.requests]

    # -- the app --

    async def _chat(self, request: Request) -> Response:
        raw = await request.body()
        try:
            body = json.loads(raw)
        except ValueError:
            body = {"unparseable": raw.decode(errors="replace")}
        with self._lock:
            self.requests.append({"headers": dict(request.headers), "body": body})
            step = self.script.popleft() if self.script else self.default
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if step is None:
                return Response(json.dumps({"error": {"message": "no scripted reply left"}}), 500,
                                media_type="application/json")
            reply = step(body) if callable(step) else step
            if reply.delay:
                await asyncio.sleep(reply.delay)
            if hasattr(reply.body, "__aiter__"):  # a slow or endless body
                return StreamingResponse(reply.body, reply.status, headers=reply.headers,
                                         media_type="application/json")
            content = reply.body if isinstance(reply.body, str) else json.dumps(reply.body)
            return Response(content, reply.status, headers=reply.headers, media_type="application/json")
        finally:
            with self._lock:
                self.in_flight -= 1

    # -- lifecycle --

    def start(self) -> LocalOpenAIServer:
        app = Starlette(routes=[Route("/v1/chat/completions", self._chat, methods=["POST"])])
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        config = uvicorn.Config(app, log_level="warning", lifespan="off", timeout_graceful_shutdown=1,
                                timeout_keep_alive=30)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]}, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("local OpenAI-compatible server did not start")
            time.sleep(0.01)
        self.base_url = f"http://127.0.0.1:{port}/v1"
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
            self._thread.join(timeout=10)


# --- replies --------------------------------------------------------------------------------------


def completion(content: str | None, *, refusal: str | None = None, finish_reason: str = "stop",
               usage: tuple[int, int] | None = (1200, 300), model: str = "gpt-4.1-mini") -> dict:
    body = {
        "id": "chatcmpl-local", "object": "chat.completion", "created": 1_700_000_000, "model": model,
        "choices": [{"index": 0, "finish_reason": finish_reason,
                     "message": {"role": "assistant", "content": content, "refusal": refusal}}],
    }
    if usage is not None:
        body["usage"] = {"prompt_tokens": usage[0], "completion_tokens": usage[1], "total_tokens": sum(usage)}
    return body


def error(status: int, message: str, **headers: str) -> Reply:
    return Reply(status, {"error": {"message": message, "type": "invalid_request_error", "code": None}},
                 headers=dict(headers))


def user_text(body: dict) -> str:
    content = body["messages"][-1]["content"]
    return content if isinstance(content, str) else next(p["text"] for p in content if p["type"] == "text")


def context_of(body: dict) -> dict:
    """The numeric context JSON the analyst put at the end of its user message (the instructions, with
    a schema of their own, may come before it in the same message: a server without a system turn)."""
    text = user_text(body)
    start = text.index("\n{")
    while True:
        try:
            return json.loads(text[start + 1:])
        except json.JSONDecodeError:
            start = text.index("\n{", start + 1)  # ValueError when there is none: no context at all


def image_parts(body: dict) -> list[dict]:
    content = body["messages"][-1]["content"]
    return [] if isinstance(content, str) else [p for p in content if p["type"] == "image_url"]


def timeframe_answer(context: dict, **overrides) -> dict:
    """A sound BUY plan read from the context: entry at the close, stop 2×ATR below, targets 3/5×ATR."""
    close, atr = context["last_close"], context["atr_14"]
    answer = {
        "trend": "up",
        "support": [context["recent_low"]],
        "resistance": [context["recent_high"]],
        "indicators": [
            {"name": "supertrend", "reading": "SuperTrend up", "bullish": True},
            {"name": "close_vs_sma20", "reading": "close above SMA 20", "bullish": True},
            {"name": "macd_vs_signal", "reading": "MACD above signal", "bullish": True},
            {"name": "rsi_vs_50", "reading": "RSI 58", "bullish": False},
        ],
        "setup": "pullback to SMA 20 in an uptrend",
        "signal": "BUY",
        "entry": round(close, 2),
        "stop": round(close - 2 * atr, 2),
        "targets": [round(close + 3 * atr, 2), round(close + 5 * atr, 2)],
        "confidence": 0.7,
        "rationale": f"Three of four indicators bullish; close {close} above SMA 20.",
    }
    answer.update(overrides)
    return answer


def consolidation_answer(context: dict, **overrides) -> dict:
    daily = context["daily"]
    answer = {"action": daily["signal"], "entry": daily["entry"], "stop": daily["stop"],
              "targets": daily["targets"][:1], "confidence": 0.72,
              "rationale": "Weekly trend agrees; first target kept at the daily level."}
    answer.update(overrides)
    return answer


def answer_json(body: dict, **overrides) -> str:
    """A sound timeframe answer to this request, as the model's text."""
    return json.dumps(timeframe_answer(context_of(body), **overrides))


def scripted(text_of_body: Callable[[dict], str], **completion_kwargs) -> Callable[[dict], Reply]:
    """A step answering 200 with a chat completion whose content is computed from the request."""
    return lambda body: Reply(200, completion(text_of_body(body), **completion_kwargs))


def good(delay: float = 0.0, usage: tuple[int, int] = (1200, 300), fence: bool = False, **overrides) -> Callable[[dict], Reply]:
    """A step answering a timeframe or consolidation request soundly (optionally in a ```json fence)."""

    def step(body: dict) -> Reply:
        context = context_of(body)
        answer = consolidation_answer(context, **overrides) if "daily" in context else timeframe_answer(context, **overrides)
        text = json.dumps(answer)
        if fence:
            text = f"```json\n{text}\n```"
        return Reply(200, completion(text, usage=usage, model=body.get("model", "gpt-4.1-mini")), delay=delay)

    return step
