"""The render service's wire protocol (Unix domain socket, one request per connection).

Every message is framed the same way:

    kind     1 byte   (ASCII letter, below)
    length   4 bytes  unsigned, big-endian: the payload's size, at most MAX_PAYLOAD
    payload  `length` bytes

Client -> service, the first message on a connection:
    b"P"  ping; empty payload.
    b"R"  render; payload: JSON {"width": int | null, "height": int | null, "count": n}, followed by
          n b"F" messages, each one figure as plotly JSON (UTF-8), as `ChartRenderer` takes it.

Service -> client:
    to a ping:    b"P" with JSON {"protocol": 1, "pid": int, "tabs": int, "browser_running": bool,
                  "browser_pid": int | null, "starts": int, "figures": int, "browser_error": str | null}.
    to a render:  any number of b"W" (empty: still working; sent every HEARTBEAT_S while the batch
                  waits for or occupies the browser), then n answers in the figures' order, each
                  b"K" with the PNG bytes, or
                  b"E" with JSON {"problem": str, "fix": str}: that figure's ChartRenderError.
    to a request it cannot read: one b"E" message, then it closes the connection.

A client waits at most its idle timeout for each message; heartbeats keep a long batch (or one
queued behind other runs' batches) from looking hung.
"""

from __future__ import annotations

import json
import socket
import struct
from typing import Any

PROTOCOL_VERSION = 1
PING, RENDER, FIGURE, WORKING, PNG, ERROR = b"P", b"R", b"F", b"W", b"K", b"E"
KINDS = frozenset({PING, RENDER, FIGURE, WORKING, PNG, ERROR})
MAX_PAYLOAD = 64 * 1024 * 1024  # a figure's JSON or a PNG; a 4K chart is a few MB
MAX_FIGURES = 10_000
HEARTBEAT_S = 2.0
_HEADER = struct.Struct(">cI")


class ProtocolError(Exception):
    """The peer sent something that is not this protocol (unknown kind, oversized payload, bad JSON)."""


class ConnectionBroken(Exception):
    """The connection closed or failed before a whole message arrived."""


def send_message(sock: socket.socket, kind: bytes, payload: bytes = b"") -> None:
    sock.sendall(_HEADER.pack(kind, len(payload)) + payload)


def send_json(sock: socket.socket, kind: bytes, value: Any) -> None:
    send_message(sock, kind, json.dumps(value).encode())


def receive_message(sock: socket.socket) -> tuple[bytes, bytes]:
    """(kind, payload) of the next message. ConnectionBroken on EOF or a socket error (a timeout
    included), ProtocolError on a frame that is not this protocol."""
    kind, length = _HEADER.unpack(_receive_exactly(sock, _HEADER.size, "a message header"))
    if kind not in KINDS:
        raise ProtocolError(f"unknown message kind {kind!r}")
    if length > MAX_PAYLOAD:
        raise ProtocolError(f"a {kind.decode()!r} message claims {length} bytes (at most {MAX_PAYLOAD})")
    return kind, _receive_exactly(sock, length, f"a {length}-byte {kind.decode()!r} payload")


def decode_json(payload: bytes, what: str) -> Any:
    try:
        return json.loads(payload)
    except ValueError as error:
        raise ProtocolError(f"{what} is not JSON ({error})") from None


def _receive_exactly(sock: socket.socket, n: int, what: str) -> bytes:
    chunks, received = [], 0
    while received < n:
        try:
            chunk = sock.recv(min(n - received, 1 << 20))
        except OSError as error:  # TimeoutError included
            raise ConnectionBroken(f"{type(error).__name__} after {received} of {n} bytes of {what}"
                                   f"{': ' + str(error) if str(error) else ''}") from error
        if not chunk:
            raise ConnectionBroken(f"connection closed after {received} of {n} bytes of {what}")
        chunks.append(chunk)
        received += len(chunk)
    return b"".join(chunks)


def connect(socket_path: str, timeout_s: float) -> socket.socket:
    """A connection to the service; OSError if nothing answers at `socket_path`."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout_s)
        sock.connect(socket_path)
    except BaseException:
        sock.close()
        raise
    return sock


def ping(socket_path: str, timeout_s: float = 2.0) -> dict[str, Any]:
    """The service's ping answer. OSError/ConnectionBroken/ProtocolError if it does not answer one."""
    with connect(socket_path, timeout_s) as sock:
        send_message(sock, PING)
        kind, payload = receive_message(sock)
    if kind != PING:
        raise ProtocolError(f"answered a ping with a {kind!r} message")
    info = decode_json(payload, "the ping answer")
    if not isinstance(info, dict) or info.get("protocol") != PROTOCOL_VERSION:
        raise ProtocolError(f"speaks another protocol: {str(info)[:200]}")
    return info
