"""The render service's client: `ChartRenderer`'s rendering interface, rendered by the service.

`RenderServiceClient` has the methods the graph uses from a `ChartRenderer` (render_png,
render_many, render_each, render_each_pipelined) and checks every PNG as the local renderer
does. No chart is lost because of the service: when it cannot be reached, or the connection
breaks mid-batch and it no longer answers a ping (it died), the client logs one warning naming
the socket and the fix, renders the figures that got no answer with the local renderer that
`fallback` gives, and keeps using it for the rest of the process. A figure the renderer
refuses is that figure's ChartRenderError, as locally; so is an answer that is not the protocol
(garbled, truncated, a non-PNG) from a service that still answers pings.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
from collections.abc import Callable, Iterable
from typing import Any

from trading_pipeline.adapters import render_protocol as wire
from trading_pipeline.adapters.chart_batches import render_each_pipelined
from trading_pipeline.adapters.chart_png import check_png, figure_dict, figure_size
from trading_pipeline.errors import ChartRenderError

_log = logging.getLogger(__name__)

DEFAULT_IDLE_TIMEOUT_S = 30.0  # the service sends a heartbeat every HEARTBEAT_S while it renders
DEFAULT_CONNECT_TIMEOUT_S = 5.0


class _ServiceGone(Exception):
    """The service does not answer: what it rendered before it went (`done`), and why."""

    def __init__(self, reason: str, done: list[bytes | ChartRenderError]):
        super().__init__(reason)
        self.reason, self.done = reason, done


class RenderServiceClient:
    """Renders through the render service at `socket_path`; `fallback()` gives the local renderer
    used (and kept) once the service is gone. Thread-safe; each batch is its own connection."""

    def __init__(self, socket_path: str, fallback: Callable[[], Any], *,
                 idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S,
                 connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S) -> None:
        self.socket_path = str(socket_path)
        self.idle_timeout_s = idle_timeout_s
        self.connect_timeout_s = connect_timeout_s
        self._fallback = fallback
        self._local: Any = None  # the local renderer, once the service is gone
        self._lock = threading.Lock()
        self.tabs = 1
        try:
            self.tabs = int(wire.ping(self.socket_path, connect_timeout_s).get("tabs", 1))
        except (OSError, wire.ConnectionBroken, wire.ProtocolError) as error:
            self._fall_back(f"does not answer ({error})")

    @property
    def using_service(self) -> bool:
        return self._local is None

    # ---- ChartRenderer's rendering interface --------------------------------------------------

    def render_png(self, fig: Any, width: int | None = None, height: int | None = None) -> bytes:
        return self.render_many([fig], width=width, height=height)[0]

    def render_many(self, figs: Iterable[Any], width: int | None = None, height: int | None = None) -> list[bytes]:
        """PNG bytes for each figure, in order; the first figure's ChartRenderError if any failed."""
        results = self.render_each(figs, width=width, height=height)
        for result in results:
            if isinstance(result, ChartRenderError):
                raise result
        return results  # type: ignore[return-value]

    def render_each(self, figs: Iterable[Any], width: int | None = None,
                    height: int | None = None) -> list[bytes | ChartRenderError]:
        """Each figure's PNG or its ChartRenderError, in order."""
        figs = list(figs)
        if not figs:
            return []
        if self._local is None:
            try:
                return self._render_remotely(figs, width, height)
            except _ServiceGone as gone:
                self._fall_back(gone.reason)
                rest = figs[len(gone.done):]
                return gone.done + self._local.render_each(rest, width=width, height=height)
        return self._local.render_each(figs, width=width, height=height)

    def render_each_pipelined(self, figs: Iterable[Any], width: int | None = None,
                              height: int | None = None) -> list[concurrent.futures.Future]:
        """As `ChartRenderer.render_each_pipelined`: one Future per figure, in order."""
        return render_each_pipelined(self.render_each, 2 * self.tabs, figs, width, height)

    def close(self) -> None:
        """Nothing to close: connections last one batch; a fallback renderer is shared, not ours."""

    # ---- internals ------------------------------------------------------------------------------

    def _render_remotely(self, figs: list[Any], width: int | None,
                         height: int | None) -> list[bytes | ChartRenderError]:
        import plotly.io.json as plotly_json

        dicts = [figure_dict(fig) for fig in figs]  # TypeError for a non-figure, as locally
        sizes = [figure_size(d, width, height) for d in dicts]
        results: list[bytes | ChartRenderError] = []
        try:
            sock = wire.connect(self.socket_path, self.connect_timeout_s)
        except OSError as error:
            raise _ServiceGone(f"refused the connection ({error})", results) from None
        try:
            sock.settimeout(self.idle_timeout_s)
            try:
                wire.send_json(sock, wire.RENDER, {"width": width, "height": height, "count": len(dicts)})
                for d in dicts:
                    wire.send_message(sock, wire.FIGURE, plotly_json.to_json_plotly(d).encode())
            except OSError as error:
                raise wire.ConnectionBroken(f"sending the figures failed: {error}") from None
            while len(results) < len(dicts):
                kind, payload = wire.receive_message(sock)
                if kind == wire.WORKING:
                    continue
                i = len(results)
                if kind == wire.PNG:
                    try:
                        check_png(payload, *sizes[i], i)
                        results.append(payload)
                    except ChartRenderError as error:
                        results.append(error)
                elif kind == wire.ERROR:
                    results.append(self._error_from(payload))
                else:
                    raise wire.ProtocolError(f"answered chart {i} with a {kind!r} message")
            return results
        except wire.ProtocolError as error:
            return results + [self._garbled(error)] * (len(dicts) - len(results))
        except wire.ConnectionBroken as error:
            try:
                wire.ping(self.socket_path, self.connect_timeout_s)
            except (OSError, wire.ConnectionBroken, wire.ProtocolError):
                raise _ServiceGone(f"went away mid-batch ({error})", results) from None
            return results + [self._garbled(error)] * (len(dicts) - len(results))  # alive, yet answers so
        finally:
            sock.close()

    def _error_from(self, payload: bytes) -> ChartRenderError:
        error = wire.decode_json(payload, "an error answer")
        if not (isinstance(error, dict) and isinstance(error.get("problem"), str) and isinstance(error.get("fix"), str)):
            raise wire.ProtocolError(f"an error answer without problem and fix: {str(error)[:200]}")
        return ChartRenderError(error["problem"], error["fix"])

    def _garbled(self, error: Exception) -> ChartRenderError:
        return ChartRenderError(
            f"The render service at {self.socket_path} gave no usable answer: {error}",
            "Check the render service's log (render_service.log next to its socket); the run launcher "
            "restarts it with the daemon. Unset TRADING_RENDER_SOCKET to render in the run's own process.")

    def _fall_back(self, reason: str) -> None:
        with self._lock:
            if self._local is not None:
                return
            _log.warning(
                "chart renderer: the render service at %s %s; rendering with a local Chromium in this process "
                "instead (about 1.3 s to start). Fix: the run launcher starts the service and sets "
                "TRADING_RENDER_SOCKET: check the daemon and render_service.log next to the socket, or unset "
                "TRADING_RENDER_SOCKET to render locally.", self.socket_path, reason)
            self._local = self._fallback()
