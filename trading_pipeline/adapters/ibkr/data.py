"""The client's market-data requests: history (validated against IBKR's period/bar table),
snapshots (with the pre-flight re-poll) and unsubscribe. The `ibkr` market data source built
on them is market_data.py."""

from __future__ import annotations

import time
from collections.abc import Iterable
from datetime import datetime

from trading_pipeline.adapters.ibkr import history as hist
from trading_pipeline.adapters.ibkr.errors import IBKRHistoryRequestError, IBKRRequestError
from trading_pipeline.adapters.ibkr.models import Contract, Snapshot
from trading_pipeline.adapters.ibkr.parsing import parse_conid, parse_number
from trading_pipeline.adapters.ibkr.transport import HISTORY_PATH

SNAPSHOT_FIELDS = ("31", "55", "84", "85", "86", "88", "7059", "7762", "7295", "7741", "6509")


class MarketDataRequests:
    """History and snapshot requests (mixed into IBKRClient)."""

    def history(self, conid: int, period: str, bar: str, start_time: datetime | None = None,
                outside_rth: bool = False) -> dict:
        """`GET /iserver/marketdata/history`; (period, bar) validated against IBKR's table first.
        At most `history_concurrency` of these are in flight per client. 'Chart data is not
        available' is retried (transient); 'No data.' raises IBKRHistoryRequestError."""
        hist.validate_history_request(period, bar)
        params = {"conid": str(conid), "period": period, "bar": bar, "outsideRth": str(bool(outside_rth)).lower()}
        if start_time is not None:
            params["startTime"] = hist.format_start_time(start_time)
        for attempt in range(2):
            status, body = self._request("GET", HISTORY_PATH, params=params, expect=dict)
            text = self._error_text(body)
            if text and "chart data is not available" in text.lower() and attempt == 0:
                time.sleep(self.pacing.read_backoff)
                continue
            break
        if text and "no data" in text.lower():
            raise IBKRHistoryRequestError(
                f"IBKR has no {bar} history for conid {conid} (period {period}"
                + (f", startTime {params['startTime']}" if "startTime" in params else "") + f"): {text!r}",
                "check the symbol and that the account has market data for it")
        body = self._check_error_body(f"history of conid {conid} ({period}, {bar})", status, body,
                                      fix="check the conid, period and bar; 'Chart data is not available' "
                                          "usually clears within minutes")
        data = body.get("data")
        if data is not None and not isinstance(data, list):
            raise self._malformed(f"history of conid {conid} ({period}, {bar}): its 'data'", status, data, list)
        return body

    def snapshot(self, items: Iterable[Contract | int], fields: Iterable[str] = SNAPSHOT_FIELDS) -> dict[int, Snapshot]:
        """`GET /iserver/marketdata/snapshot` with the pre-flight re-poll: the first call for a
        conid only opens the stream and returns no values, so it is asked again until the fields
        arrive. String values are parsed ('1,300', 'C168.42', '1.2M')."""
        items = list(items)
        contracts = {(i.conid if isinstance(i, Contract) else int(i)): i for i in items}
        conids = list(contracts)
        fields = tuple(fields)
        if len(conids) > 100 or len(fields) > 50:
            raise IBKRRequestError("a snapshot takes at most 100 conids and 50 fields", "split the request")
        self.accounts()  # pre-flight
        params = {"conids": ",".join(map(str, conids)), "fields": ",".join(fields)}
        rows: dict[int, dict] = {}
        for attempt in range(self.pacing.snapshot_polls):
            status, body = self._request("GET", "/iserver/marketdata/snapshot", params=params, expect=list)
            body = self._check_error_body("market data snapshot", status, body)
            for row in body:
                conid = parse_conid(row.get("conid")) if isinstance(row, dict) else None
                if conid is not None:
                    rows[conid] = row
            if all(any(f in rows.get(c, {}) for f in fields) for c in conids):
                break
            time.sleep(self.pacing.poll_interval)
        result = {}
        for conid in conids:
            row = rows.get(conid, {})
            contract = contracts[conid]
            lots = 100.0 if isinstance(contract, Contract) and contract.is_us else 1.0  # sizes in lots of 100
            last_text = str(row.get("31") or "").strip()

            def size(key, row=row, lots=lots):
                value = parse_number(row.get(key))
                return None if value is None else value * lots

            result[conid] = Snapshot(
                conid, parse_number(row.get("31")), last_text.startswith("C"), last_text.startswith("H"),
                parse_number(row.get("84")), parse_number(row.get("86")), size("88"), size("85"), size("7059"),
                parse_number(row.get("7762")), parse_number(row.get("7295")), parse_number(row.get("7741")),
                str(row.get("6509") or ""), raw=dict(row))
        return result

    def unsubscribe(self, conid: int) -> None:
        status, body = self._request("POST", "/iserver/marketdata/unsubscribe", json={"conid": int(conid)})
        if status not in (200, 404, 500):  # 404/500 'unknown': it was not subscribed
            self._check_error_body(f"unsubscribe {conid}", status, body)
