"""Make sure kaleido has a Chromium: use an installed one, else fetch one the way kaleido
documents (`kaleido.get_chrome_sync()`), else install Debian's `chromium` with apt-get when
that can run without a password prompt (root, or passwordless sudo), else say exactly what to
install. Used by the Makefile, so `make demo` and `make test` work on a fresh machine."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

from trading_pipeline.adapters.chart_render import find_chromium
from trading_pipeline.errors import ChartRenderError

INSTRUCTIONS = ("Install one and run again: `sudo apt-get install chromium` (Debian/Ubuntu), "
                "`brew install --cask chromium` (macOS), or set BROWSER_PATH to a Chrome/Chromium executable.")


def _apt_command() -> list[str] | None:
    """The apt-get prefix that can run unattended here, or None (no apt, or sudo would prompt)."""
    if shutil.which("apt-get") is None:
        return None
    if os.geteuid() == 0:
        return []
    if shutil.which("sudo") and subprocess.run(["sudo", "-n", "true"], capture_output=True).returncode == 0:
        return ["sudo", "-n"]
    return None


def _install_with_apt(prefix: list[str]) -> bool:
    print("chromium: installing Debian's chromium package with apt-get (a few minutes the first time)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for step in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "chromium"]):
        done = subprocess.run(prefix + step, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            print(f"chromium: `{' '.join(prefix + step)}` failed: {last}", file=sys.stderr)
            return False
    return True


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
    except Exception as error:  # noqa: BLE001 - any failure moves on to the next way
        print(f"chromium: kaleido could not download Chrome ({str(error).splitlines()[0]})", file=sys.stderr)
    prefix = _apt_command()
    if prefix is not None and _install_with_apt(prefix):
        try:
            print(f"chromium: {find_chromium()}")
            return 0
        except ChartRenderError as error:
            print(f"chromium: apt-get installed chromium but it was not found: {error}", file=sys.stderr)
    print(INSTRUCTIONS, file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
