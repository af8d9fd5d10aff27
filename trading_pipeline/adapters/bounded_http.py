"""Bounds on what a server may send: the whole response within a deadline, at most
MAX_RESPONSE_BYTES of it. Used by the IBKR client (httpx) and the OpenAI analyst (httpx2, under
the SDK): the two libraries have the same API but separate classes, so each bound is made for
the library given (`http`, the module itself).

httpx's timeouts bound each read, not a response: a server sending a byte now and then holds a
request for as long as it likes (an IBKR order request holds the gateway's order gate meanwhile,
a model call a slot of TRADING_LLM_CONCURRENCY), and one sending without end fills the memory.
The client's event hooks (public API, whatever transport or proxy carries the request) note when
a request starts and wrap each response's body, so reading it raises `deadline_exceeded(http)`
(a ReadTimeout of that library: a timeout to whoever catches timeouts) once `timeout_s` have
passed since the request started, and `response_too_large(http)` (a RemoteProtocolError of that
library) beyond `max_bytes`. The check is made as each piece of the body arrives, so a response
ends at most one read timeout after the deadline. Headers sent slowly are bounded per read only
(and by h11's 16 KB header limit).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Iterator
from types import ModuleType
from typing import Any, NamedTuple

# An answer of either server is a few KB; a reasoning model's full output at
# OPENAI_MAX_OUTPUT_TOKENS=100,000 is well under this.
MAX_RESPONSE_BYTES = 8 * 1024 * 1024
_STARTED = "trading_pipeline.started"


class _Bounds(NamedTuple):
    too_large: type
    deadline_exceeded: type
    stream: type


@functools.cache
def _bounds(http: ModuleType) -> _Bounds:
    """The exception and stream classes for one HTTP library (made once per library)."""

    class ResponseTooLarge(http.RemoteProtocolError):
        """The response grew beyond `max_bytes` (its text: "8 MB"); `status_code` is its HTTP status."""

        def __init__(self, message: str, *, request: Any, status_code: int, max_bytes: int):
            super().__init__(message, request=request)
            self.status_code = status_code
            self.max_bytes = max_bytes

    class ResponseDeadlineExceeded(http.ReadTimeout):
        """The response was still arriving `timeout_s` after its request; `received` bytes had come."""

        def __init__(self, message: str, *, request: Any, timeout_s: float, received: int):
            super().__init__(message, request=request)
            self.timeout_s = timeout_s
            self.received = received

    class BoundedStream(http.SyncByteStream):
        def __init__(self, inner: Any, response: Any, deadline: float, max_bytes: int, timeout_s: float):
            self._inner, self._response = inner, response
            self._deadline, self._max_bytes, self._timeout_s = deadline, max_bytes, timeout_s

        def __iter__(self) -> Iterator[bytes]:
            received = 0
            for chunk in self._inner:
                received += len(chunk)
                if received > self._max_bytes:
                    raise ResponseTooLarge(f"{self._max_bytes // (1024 * 1024)} MB", request=self._response.request,
                                           status_code=self._response.status_code, max_bytes=self._max_bytes)
                if time.monotonic() > self._deadline:
                    raise ResponseDeadlineExceeded(
                        f"the response was still arriving {self._timeout_s:g} s after the request "
                        f"({received:,} bytes received)", request=self._response.request,
                        timeout_s=self._timeout_s, received=received)
                yield chunk

        def close(self) -> None:
            self._inner.close()

        def __getattr__(self, name: str) -> Any:  # `elapsed`, read back by the response
            return getattr(self._inner, name)

    return _Bounds(ResponseTooLarge, ResponseDeadlineExceeded, BoundedStream)


def response_too_large(http: ModuleType) -> type:
    """The error `http`'s bounded clients raise for a response beyond its size cap."""
    return _bounds(http).too_large


def deadline_exceeded(http: ModuleType) -> type:
    """The error (a ReadTimeout of `http`) its bounded clients raise for a response past its deadline."""
    return _bounds(http).deadline_exceeded


def bounded_hooks(http: ModuleType, timeout_s: float, max_bytes: int = MAX_RESPONSE_BYTES) -> dict[str, list]:
    """`event_hooks` for a Client of `http` (the httpx or httpx2 module): every response within
    `timeout_s` of its request, in all, and within `max_bytes`."""
    stream = _bounds(http).stream

    def started(request: Any) -> None:
        request.extensions[_STARTED] = time.monotonic()

    def bounded(response: Any) -> None:
        deadline = response.request.extensions.get(_STARTED, time.monotonic()) + timeout_s
        response.stream = stream(response.stream, response, deadline, max_bytes, timeout_s)

    return {"request": [started], "response": [bounded]}
