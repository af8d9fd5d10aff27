"""PNG and figure-size checks shared by the local chart renderer and the render service's client:
both hand back only PNGs of the size asked for."""

from __future__ import annotations

import struct
from typing import Any

from trading_pipeline.errors import ChartRenderError

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# A PNG ends with its empty IEND chunk (length 0, type, CRC): a cut-off PNG does not.
PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"
DEFAULT_WIDTH = 1920
DEFAULT_HEIGHT = 1080


def png_size(data: bytes) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk; ValueError if `data` is not a PNG."""
    if len(data) < 24 or not data.startswith(PNG_SIGNATURE) or data[12:16] != b"IHDR":
        raise ValueError("not a PNG (bad signature or no IHDR chunk)")
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def figure_dict(fig: Any) -> dict[str, Any]:
    if hasattr(fig, "to_dict"):
        return fig.to_dict()
    if isinstance(fig, dict) and "data" in fig:
        return fig
    raise TypeError(f"expected a plotly Figure or figure dict, got {type(fig).__name__}")


def figure_size(fig: dict[str, Any], width: int | None, height: int | None) -> tuple[int, int]:
    layout = fig.get("layout") or {}
    w = width or layout.get("width") or DEFAULT_WIDTH
    h = height or layout.get("height") or DEFAULT_HEIGHT
    return int(w), int(h)


def check_png(data: Any, width: int, height: int, index: int) -> None:
    if not isinstance(data, bytes | bytearray):
        raise ChartRenderError(
            f"Chart {index}: the renderer returned {type(data).__name__}, not PNG bytes.",
            "Check that kaleido 1.x is installed (`pip install 'kaleido>=1,<2'`).",
        )
    try:
        size = png_size(bytes(data))
    except ValueError:
        raise ChartRenderError(
            f"Chart {index}: the renderer returned {len(data)} bytes that are not a PNG "
            f"(starts with {bytes(data[:8])!r}).",
            "Check that kaleido 1.x and plotly match (`pip install -U kaleido plotly`).",
        ) from None
    if size != (width, height):
        raise ChartRenderError(
            f"Chart {index}: PNG is {size[0]}x{size[1]} px, expected {width}x{height}.",
            "Render with scale=1 and the figure's width/height; check kaleido is 1.x.",
        )
    if bytes(data[-len(PNG_END):]) != PNG_END:
        raise ChartRenderError(
            f"Chart {index}: the PNG ({len(data)} bytes) is cut off: it does not end with an IEND chunk.",
            "Render it again; if it keeps happening, check kaleido/Chromium (or the render service's log).",
        )
