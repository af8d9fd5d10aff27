"""kaleido's `Kaleido`, subclassed to keep its tabs' plotly.js pages loaded (see chart_render).

Stock kaleido reloads a tab's page (re-parsing the 4.6 MB plotly.js) after every figure, which
costs more than rendering the figure itself, and it loads its tabs one after the other at start.
The warm subclass reloads a tab only after `TAB_RECYCLE_AFTER` figures or after a figure failed
(a failed render may leave the page dirty), and loads all tabs in parallel. It relies on kaleido
internals (`_KALEIDO_HOOKS`); where those are missing, stock kaleido is used (and logged).

kaleido is imported lazily, on the first call.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from typing import Any

_log = logging.getLogger("trading_pipeline.adapters.chart_render")

# A tab's page is reloaded after this many figures (kaleido: after every one); see module doc.
TAB_RECYCLE_AFTER = 200
# kaleido internals the warm subclass overrides or calls (kaleido 1.x).
_KALEIDO_HOOKS: tuple[str, ...] = (
    "_get_kaleido_tab", "_return_kaleido_tab", "populate_targets", "_conform_tabs", "_create_kaleido_tab",
)  # fmt: skip


@functools.cache
def warm_kaleido_class() -> type:
    """kaleido.Kaleido, subclassed to keep tab pages loaded and load them in parallel.

    Returns stock kaleido.Kaleido (and logs why) if this kaleido lacks the internals used.
    """
    import kaleido

    base = kaleido.Kaleido
    missing = [name for name in _KALEIDO_HOOKS if not callable(getattr(base, name, None))]
    if missing:
        _log.warning(
            "chart renderer: kaleido %s has no %s; using its stock tab handling (a page reload "
            "per figure: slower, still correct)",
            getattr(kaleido, "__version__", "?"), ", ".join(missing),
        )  # fmt: skip
        return base

    class WarmKaleido(base):  # type: ignore[misc, valid-type]
        """Reloads a tab's page only after `recycle_after` figures or after a failed render."""

        recycle_after = TAB_RECYCLE_AFTER

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.tab_reloads = 0  # page reloads done (kaleido would do one per figure)
            self._renders_since_load: dict[int, int] = {}  # id(tab) -> figures since its page loaded
            self._stale: set[int] = set()  # tabs to reload before their next figure

        async def populate_targets(self) -> None:
            # kaleido's version loads the first tab's page, and only then creates and loads the
            # others: do it all at once (each tab is its own renderer process).
            await super(base, self).populate_targets()  # choreographer: adopt existing tabs
            existing = list(self.tabs.values())
            jobs = [self._create_kaleido_tab() for _ in range(max(0, self._n - len(existing)))]
            if existing:
                jobs.append(self._conform_tabs(existing))
            await asyncio.gather(*jobs)

        async def _get_kaleido_tab(self) -> Any:
            tab = await super()._get_kaleido_tab()
            key = id(tab)
            if key in self._stale or self._renders_since_load.get(key, 0) >= self.recycle_after:
                try:
                    await tab.reload()
                except BaseException:
                    self._stale.add(key)
                    self.tabs_ready.put_nowait(tab)  # keep it in the pool; retried next time
                    raise
                self.tab_reloads += 1
                self._stale.discard(key)
                self._renders_since_load[key] = 0
            self._renders_since_load[key] = self._renders_since_load.get(key, 0) + 1
            return tab

        async def _return_kaleido_tab(self, tab: Any) -> None:
            await self.tabs_ready.put(tab)  # no reload: the page stays warm

        def reload_before_next_use(self) -> None:
            """After a failed render: every tab that rendered gets a fresh page first."""
            self._stale.update(self._renders_since_load)

    return WarmKaleido
