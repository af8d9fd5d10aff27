"""The `ibkr` market data source: Client Portal history -> the pipeline's bar frame.

Same contract as every source (adapters/market_data.py): UTC DatetimeIndex of bar starts named
"time", float64 open/high/low/close/volume (volume in shares), sorted, unique, only bars closed by
`as_of`, none older than the strategy's period before `as_of`.

Volume units. For US stocks IBKR's history `v` is in lots of 100 shares, so it is multiplied by
100 here. Evidence:
  - IBKR's own spec of this endpoint (the OpenAPI model `HistoryData`, mirrored by generated
    clients such as docs.rs `ib_client` and the campus "Historical Market Data" page): the `high`
    and `low` strings are "%h/%v/%t ... %v is volume (volume factor will always be 100 (reported
    volume = actual volume/100))".
  - The `%v` in those strings is the same number as the bar's `v`: kevinburke/ibclientportal
    NOTES.md records VOO 30d/1d with `"high":"37719/40807/25920"` and the 2022-12-13 bar
    `{"h":377.19,"v":40807}`; ibind's fixture (test/integration/client/ibkr_responses.py) has
    AAPL `"high":"19293/6942998.04/1440"` with `"v":6942998.04`.
  - Magnitudes: VOO traded ~4 M shares on 2022-12-13 (v=40807 -> 4.08 M); AAPL's November 2023
    month-to-date bar v=6942998.04 -> ~694 M shares (not 6.9 M); IBKR's own example AAPL daily
    bar v=472117.45 -> ~47 M. The two decimals only make sense as shares/100.
  - TWS API users saw the same lot convention for US stocks until TWS 985 (ib_insync #382).
Non-US listings in ibind's fixture carry integer volumes (CDN on PURE, CFC on IBIS), so the
factor is applied to US contracts only; `volume_multiplier` overrides it if IBKR changes this.

Bar times. IBKR stamps an RTH daily bar with the session open (t=14:30 UTC in the VOO answer);
weekly bars are mapped to their trading week's first session open (market_calendar.session_start_index),
which is what the simulated and CSV sources use.

History period. The strategy's period (TimeframeSettings.period) is sent as IBKR's `period` when
IBKR's table allows the bar for it and it fits one response (<= 1000 points), e.g. 2y of 1d or
6y of 1w; otherwise (e.g. 6y of 1d, whose row allows only 1w-1m) the window is fetched in pages
of 3y (1d) or 15y (1w), each anchored with `startTime` at the earliest bar received so far.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC, datetime

import pandas as pd

from trading_pipeline.adapters.ibkr import history as hist
from trading_pipeline.adapters.ibkr.client import Contract, IBKRClient
from trading_pipeline.adapters.ibkr.errors import IBKRError, IBKRHistoryRequestError
from trading_pipeline.core.bars import validate_bars
from trading_pipeline.core.strategies import TimeframeSettings
from trading_pipeline.errors import BarDataError

log = logging.getLogger(__name__)

US_VOLUME_LOT = 100.0
BAD_BARS_FIX = ("these bars are as the gateway sent them and none of them is used: check that IBKR_GATEWAY_URL points "
                "at IBKR's Client Portal gateway and ask again later (IBKR corrects bad prints), or read this symbol's "
                "bars from another source (TRADING_MARKET_DATA=csv)")
MAX_PAGES = 12


class IBKRMarketData:
    name = "ibkr"

    def __init__(self, client: IBKRClient, volume_multiplier: float | None = None,
                 clock: Callable[[], datetime] | None = None):
        self.client = client
        self.volume_multiplier = volume_multiplier
        self.clock = clock or (lambda: datetime.now(UTC))  # the real time: what delayed data lags behind

    @property
    def fetch_concurrency(self) -> int:
        """Fetches a batched run makes at once: the client's history requests in flight (the
        client's slots, shared by processes with IBKR_STATE_DIR, keep IBKR's limit either way)."""
        return self.client.pacing.history_concurrency

    def multiplier_for(self, contract: Contract) -> float:
        if self.volume_multiplier is not None:
            return float(self.volume_multiplier)
        return US_VOLUME_LOT if contract.is_us else 1.0

    def cache_key(self, symbol: str) -> str:
        """What, besides symbol, timeframe, period and as_of, decides which bars `fetch` gives, read
        from the settings alone (no request): the listing chosen (IBKR_EXCHANGES, IBKR_CONIDS) and the
        volume factor (IBKR_HISTORY_VOLUME_MULTIPLIER). A kept answer is only read for the same key."""
        symbol = symbol.strip().upper()
        listing = (f"conid{self.client.conid_overrides[symbol]}" if symbol in self.client.conid_overrides
                   else "-".join(self.client.exchanges) if self.client.exchanges else "US")
        volume = "auto" if self.volume_multiplier is None else f"{float(self.volume_multiplier):g}"
        return f"{listing}_v{volume}"

    def contract(self, symbol: str) -> Contract:
        """The IBKR contract the bars of `symbol` come from (resolved once, cached)."""
        return self.client.resolve(symbol)

    def prefetch_contracts(self, symbols: list[str]) -> dict[str, Contract]:
        """Resolve many symbols in a few batched contract lookups (then cached)."""
        return self.client.resolve_many(symbols)

    def raw_history(self, contract: Contract, timeframe: str, period: str, as_of: datetime,
                    start: pd.Timestamp, now: datetime | None = None) -> pd.DataFrame:
        """IBKR bars (raw `t` index, raw volume) covering [start, as_of]: one request or pages."""
        plan = hist.plan_pages(timeframe, period, as_of, now=now)
        anchor = plan.anchor
        frames: list[pd.DataFrame] = []
        for page in range(MAX_PAGES if plan.paged else 1):
            asked_at = self.clock()
            try:
                answer = self.client.history(contract.conid, plan.period, plan.bar, start_time=anchor)
            except IBKRHistoryRequestError:
                if frames:  # 'No data.' before the window start: IBKR's history ends here
                    break
                raise
            raw = hist.raw_bars_frame(answer.get("data") or [])
            self._refuse_unfinished(contract, timeframe, raw, answer, as_of, asked_at)
            if anchor is not None:
                raw = raw.loc[raw.index < pd.Timestamp(anchor)]
            earliest = frames[-1].index.min() if frames else None
            if earliest is not None:
                raw = raw.loc[raw.index < earliest]
            if raw.empty:
                break
            frames.append(raw)
            if not plan.paged or raw.index.min() <= start:
                break
            anchor = raw.index.min().to_pydatetime()
        else:
            log.warning("%s %s: stopped paging after %d pages", contract.symbol, timeframe, MAX_PAGES)
        if not frames:
            return hist.raw_bars_frame([])
        combined = pd.concat(frames[::-1])
        return combined.sort_index(kind="stable")  # duplicates are judged by normalize_bars

    @staticmethod
    def _refuse_unfinished(contract: Contract, timeframe: str, raw: pd.DataFrame, answer: dict, as_of: datetime,
                           asked_at: datetime) -> None:
        """Raise if a bar closed by `as_of` had not closed when the answer was asked for (an as_of
        later than that), or, with delayed data (hist.data_delay), closed within the delay before it:
        such a bar is not final, and a later answer would differ."""
        if raw.empty:
            return
        delay, how = hist.data_delay(answer)
        from trading_pipeline.core.market_calendar import bar_close_times, session_start_index

        closes = bar_close_times(pd.DatetimeIndex(session_start_index(raw.index, timeframe)), timeframe).dropna()
        closes = closes[closes <= pd.Timestamp(as_of)]
        error = hist.unfinished_bars_error(contract.symbol, timeframe, closes, asked_at, delay, how)
        if error is not None:
            raise error

    def fetch(self, symbol: str, timeframe: str, history: TimeframeSettings, as_of: datetime) -> pd.DataFrame:
        from trading_pipeline.adapters.market_data import history_start
        from trading_pipeline.core.market_calendar import bar_close_times

        as_of_ts = pd.Timestamp(as_of).tz_convert("UTC")
        start = history_start(history, as_of)
        try:
            contract = self.client.resolve(symbol)
            raw = self.raw_history(contract, timeframe, history.period, as_of_ts.to_pydatetime(), start,
                                   now=self.clock())
        except IBKRError as error:
            raise BarDataError(f"IBKR history for {symbol} {timeframe}: {error.problem}", error.fix) from None
        frame, unmatched, conflicts = hist.normalize_bars(raw, timeframe, self.multiplier_for(contract))
        if unmatched:
            log.warning("%s %s: dropped %d IBKR bar(s) on dates without an XNYS session", symbol, timeframe,
                        unmatched)
        frame = frame.loc[frame.index >= start]
        closes = bar_close_times(frame.index, timeframe)
        frame = frame.loc[(closes.notna() & (closes <= as_of_ts)).to_numpy()]
        used = conflicts[conflicts.isin(frame.index)]
        if len(used):  # several different bars for a bar we keep: whichever we took would be wrong
            error = hist.conflicting_bars_error(raw, timeframe, used)
            raise BarDataError(f"IBKR history for {symbol} {timeframe}: {error.problem}", error.fix)
        if frame.empty:
            raise BarDataError(
                f"IBKR returned no {timeframe} bars for {symbol} (conid {contract.conid}) closed by "
                f"{as_of_ts.isoformat()} within period {history.period}",
                "check the symbol and its market data subscription; for a run at an earlier point in time, "
                "check that as_of lies within IBKR's history")
        frame.index.name = "time"
        frame = frame[["open", "high", "low", "close", "volume"]].astype("float64")
        # Checked here, not only by the graph's bar checks: the account's marks, the paper broker's
        # fills and the backtest read this source directly (a close of 0 would value a position at 0).
        try:
            validate_bars(frame)
        except BarDataError as error:
            raise BarDataError(f"IBKR history for {symbol} {timeframe}: {error.problem}", BAD_BARS_FIX) from None
        return frame

