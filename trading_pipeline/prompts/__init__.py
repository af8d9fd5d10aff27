"""Versioned prompt files and their loader.

Each prompt is one file in this folder with a `=== system ===` part and a `=== user ===` part
(the user part is a `str.format` template). Its version is `<name>@<first 12 hex of the
sha256 of the file's bytes>`: editing a prompt changes its version, which is stored with every
analysis and model call and is part of the response-cache key, so an edited prompt is never
answered from an old cache entry.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from importlib import resources

SYSTEM_MARKER = "=== system ==="
USER_MARKER = "=== user ==="

TIMEFRAME_ANALYSIS = "timeframe_analysis"
CONSOLIDATION = "consolidation"


@dataclass(frozen=True)
class Prompt:
    name: str
    version: str  # "<name>@<sha256[:12]>" of the file's bytes
    sha256: str
    system: str
    user_template: str

    def user(self, **fields: object) -> str:
        return self.user_template.format(**fields)


def parse_prompt(name: str, raw: bytes) -> Prompt:
    text = raw.decode("utf-8")
    if not text.startswith(SYSTEM_MARKER) or text.count(USER_MARKER) != 1:
        raise ValueError(f"prompt {name!r} must start with {SYSTEM_MARKER!r} and contain one {USER_MARKER!r} line")
    system, user = text[len(SYSTEM_MARKER):].split(USER_MARKER)
    digest = hashlib.sha256(raw).hexdigest()
    return Prompt(name=name, version=f"{name}@{digest[:12]}", sha256=digest,
                  system=system.strip(), user_template=user.strip())


@functools.cache
def load_prompt(name: str) -> Prompt:
    """The packaged prompt `<name>.md` with its content-hash version."""
    raw = resources.files(__name__).joinpath(f"{name}.md").read_bytes()
    return parse_prompt(name, raw)
