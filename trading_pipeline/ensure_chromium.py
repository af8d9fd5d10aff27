"""Make sure kaleido has a Chromium: use an installed one, else fetch one the way kaleido
documents (`kaleido.get_chrome_sync()`), else say exactly what to install. Used by the Makefile."""

from __future__ import annotations

import sys

from trading_pipeline.adapters.chart_render import find_chromium
from trading_pipeline.errors import ChartRenderError


def main() -> int:
    try:
        print(f"chromium: {find_chromium()}")
        return 0
    except ChartRenderError:
        pass
    print("chromium: none installed; asking kaleido to download one (kaleido.get_chrome_sync())")
    try:
        import kaleido

        kaleido.get_chrome_sync()
        print(f"chromium: {find_chromium()}")
        return 0
    except Exception as error:  # noqa: BLE001 - any failure ends in the same instructions
        fix = error.fix if isinstance(error, ChartRenderError) else ""
        print(f"chromium: kaleido could not download Chrome ({str(error).splitlines()[0]}).", file=sys.stderr)
        print("Install one and run again: `sudo apt-get install chromium` (Debian/Ubuntu), "
              "`brew install --cask chromium` (macOS), or set BROWSER_PATH to a Chrome/Chromium executable. "
              + fix, file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
