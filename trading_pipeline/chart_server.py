"""Serve the local chart store's PNGs over HTTP on loopback, so chart links in the Dagster UI
open in the browser (which refuses file:// links from a web page).

    python -m trading_pipeline.chart_server      # `make dev` starts it next to the Dagster UI

Serves GET/HEAD of `/charts/<...>.png` from the local store's folder (TRADING_DATA_DIR, else
$DAGSTER_HOME/trading) on 127.0.0.1, port TRADING_CHART_SERVER_PORT (3001); reads ./.env like
the demo. Nothing else: no
listing, no other file types, nothing outside that folder (`..`, symlinks out of it). The links
are the chart store's `public_url(key)`. Standard library only.
"""

from __future__ import annotations

import argparse
import logging
import sys
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

from trading_pipeline.errors import UserError

HOST = "127.0.0.1"  # loopback only: charts show positions and decisions
CHARTS_PREFIX = "charts"  # the local store's keys start with charts/ (chart_store.chart_key)

_log = logging.getLogger("trading_pipeline.chart_server")


def resolve_chart(root: Path, url_path: str) -> Path | None:
    """The PNG file under `root`/charts that `url_path` names, or None if it names anything else.

    Decoded first (so %2e%2e is `..` too), then resolved (following symlinks) and required to
    stay inside root/charts and to end in .png.
    """
    path = unquote(urlsplit(url_path).path)
    if "\x00" in path or "\\" in path:
        return None
    parts = [p for p in path.split("/") if p]
    if len(parts) < 2 or parts[0] != CHARTS_PREFIX or not parts[-1].lower().endswith(".png"):
        return None
    if any(p in (".", "..") for p in parts):
        return None
    charts = (root / CHARTS_PREFIX).resolve()
    candidate = (root.joinpath(*parts)).resolve()
    if not candidate.is_relative_to(charts) or not candidate.is_file():
        return None
    return candidate


def make_handler(root: Path) -> type[BaseHTTPRequestHandler]:
    root = Path(root)

    class ChartHandler(BaseHTTPRequestHandler):
        server_version = "trading-pipeline-charts"
        sys_version = ""

        def do_GET(self) -> None:
            self._serve(body=True)

        def do_HEAD(self) -> None:
            self._serve(body=False)

        def _serve(self, *, body: bool) -> None:
            if urlsplit(self.path).path in ("", "/"):
                self._text(HTTPStatus.OK, f"trading_pipeline chart server: charts are under /{CHARTS_PREFIX}/ "
                           "(links in the Dagster UI's asset metadata).\n", body)
                return
            file = resolve_chart(root, self.path)
            if file is None:
                self._text(HTTPStatus.NOT_FOUND, "not found: only chart PNGs under /charts/ are served\n", body)
                return
            data = file.read_bytes()
            self.send_response(HTTPStatus.OK)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(data)))
            # a re-run at the same as_of rewrites the same key: let the browser check again
            self.send_header("Cache-Control", "no-cache")
            self.send_header("X-Content-Type-Options", "nosniff")
            self.end_headers()
            if body:
                self.wfile.write(data)

        def _text(self, status: HTTPStatus, text: str, body: bool) -> None:
            data = text.encode()
            self.send_response(status)
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if body:
                self.wfile.write(data)

        def log_message(self, format: str, *args) -> None:
            _log.debug("%s " + format, self.address_string(), *args)

    return ChartHandler


def make_server(root: Path, port: int) -> ThreadingHTTPServer:
    """A server on 127.0.0.1:`port` (0 = any free port) for the charts under `root`."""
    server = ThreadingHTTPServer((HOST, port), make_handler(root))
    server.daemon_threads = True
    return server


def main(argv: list[str] | None = None) -> int:
    from trading_pipeline import config
    from trading_pipeline.adapters.chart_store import chart_server_port

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])  # the whole first paragraph
    parser.add_argument("--port", type=int, help="default TRADING_CHART_SERVER_PORT, else 3001")
    args = parser.parse_args(argv)
    try:  # the .env that `dg dev` and the demo read (dagster ships python-dotenv); the shell's values win
        from dotenv import load_dotenv

        load_dotenv(".env", override=False)
    except ImportError:
        pass
    try:
        port = args.port if args.port is not None else chart_server_port()
        root = config.data_dir()
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    try:
        server = make_server(root, port)
    except OSError as error:
        print(f"error: the chart server cannot listen on {HOST}:{port}: {error.strerror}. "
              "Stop what uses that port, or set TRADING_CHART_SERVER_PORT to a free port "
              "(and TRADING_CHART_BASE_URL to match if you set it).", file=sys.stderr)
        return 2
    print(f"chart server: http://{HOST}:{server.server_port}/{CHARTS_PREFIX}/ serves {root / CHARTS_PREFIX}",
          flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
