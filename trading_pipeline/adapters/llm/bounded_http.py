"""Bounds on what a model server may send: the whole response within the timeout, at most
MAX_RESPONSE_BYTES of it.

httpx2's timeouts bound each read, not a response: a server sending a byte now and then holds a
request (and a slot of TRADING_LLM_CONCURRENCY) for as long as it likes, and one sending without
end fills the memory, then the call log. The client's event hooks (public API, whatever transport
or proxy carries the request) note when a request starts and wrap each response's body, so reading
it raises `httpx2.ReadTimeout` once OPENAI_TIMEOUT_SECONDS have passed since the request started
(the SDK reports an APITimeoutError, retried like any timeout) and `ResponseTooLarge` beyond
MAX_RESPONSE_BYTES (an APIConnectionError caused by it: not retried, the server answered).
The check is made as each piece of the body arrives, so a response ends at most one read timeout
after the deadline. Headers sent slowly are bounded per read only (and by h11's 16 KB header limit).

Imported only when a client is built (it imports httpx2).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx2

# An answer is a few KB; a reasoning model's full output at OPENAI_MAX_OUTPUT_TOKENS=100,000 is well under this.
MAX_RESPONSE_BYTES = 8 * 1024 * 1024
_STARTED = "trading_pipeline.started"


class ResponseTooLarge(httpx2.RemoteProtocolError):
    """The response grew beyond MAX_RESPONSE_BYTES; `status_code` is its HTTP status."""

    def __init__(self, message: str, *, request: httpx2.Request, status_code: int):
        super().__init__(message, request=request)
        self.status_code = status_code


class _BoundedStream(httpx2.SyncByteStream):
    def __init__(self, inner: Any, response: httpx2.Response, deadline: float, max_bytes: int, timeout_s: float):
        self._inner, self._response = inner, response
        self._deadline, self._max_bytes, self._timeout_s = deadline, max_bytes, timeout_s

    def __iter__(self) -> Iterator[bytes]:
        received = 0
        for chunk in self._inner:
            received += len(chunk)
            if received > self._max_bytes:
                raise ResponseTooLarge(f"{self._max_bytes // (1024 * 1024)} MB",
                                       request=self._response.request, status_code=self._response.status_code)
            if time.monotonic() > self._deadline:
                raise httpx2.ReadTimeout(f"the response was still arriving {self._timeout_s:g} s after the request "
                                         f"({received:,} bytes received)", request=self._response.request)
            yield chunk

    def close(self) -> None:
        self._inner.close()

    def __getattr__(self, name: str) -> Any:  # `elapsed`, read back by the response
        return getattr(self._inner, name)


def bounded_hooks(timeout_s: float, max_bytes: int = MAX_RESPONSE_BYTES) -> dict[str, list]:
    """`event_hooks` for an httpx2.Client: every response within `timeout_s` of its request, in all,
    and within `max_bytes`."""

    def started(request: httpx2.Request) -> None:
        request.extensions[_STARTED] = time.monotonic()

    def bounded(response: httpx2.Response) -> None:
        deadline = response.request.extensions.get(_STARTED, time.monotonic()) + timeout_s
        response.stream = _BoundedStream(response.stream, response, deadline, max_bytes, timeout_s)

    return {"request": [started], "response": [bounded]}
