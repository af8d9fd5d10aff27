"""Symbols -> IBKR contracts (`/trsrv/stocks`, cached per process) and contract rules."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from typing import Any

from trading_pipeline.adapters.ibkr.errors import IBKRContractError, IBKRRequestError
from trading_pipeline.adapters.ibkr.models import Contract
from trading_pipeline.adapters.ibkr.parsing import parse_conid, parse_flag, parse_number

log = logging.getLogger("trading_pipeline.adapters.ibkr.client")

_contract_cache: dict[tuple, Contract] = {}
_contract_cache_lock = threading.Lock()
_tick_cache: dict[tuple[str, int], float] = {}  # (gateway URL, conid) -> minimum price increment
DEFAULT_MIN_TICK = 0.01


class ContractRequests:
    """Contract lookups (mixed into IBKRClient)."""

    def _cache_key(self, symbol: str) -> tuple:
        return (self.gateway_url, self.exchanges, symbol)

    def resolve(self, symbol: str) -> Contract:
        return self.resolve_many([symbol])[symbol]

    def resolve_many(self, symbols: Iterable[str]) -> dict[str, Contract]:
        """Symbols -> contracts via `GET /trsrv/stocks` (batched, cached per process). US listings
        (isUS) by default; with `exchanges` the first listing exchange in that order; IBKR_CONIDS
        overrides win. Exactly one match is required, else IBKRContractError with the candidates."""
        wanted = list(dict.fromkeys(s.strip().upper() for s in symbols))
        found: dict[str, Contract] = {}
        missing = []
        with _contract_cache_lock:
            for symbol in wanted:
                if symbol in self.conid_overrides:
                    found[symbol] = Contract(symbol, self.conid_overrides[symbol], self.exchanges[0]
                                             if self.exchanges else "SMART", self.exchanges is None)
                elif (cached := _contract_cache.get(self._cache_key(symbol))) is not None:
                    found[symbol] = cached
                else:
                    missing.append(symbol)
        for start in range(0, len(missing), 50):
            chunk = missing[start:start + 50]
            answer = self._stocks([self._ibkr_symbol(s) for s in chunk])
            retry = []
            for symbol in chunk:
                entries = answer.get(self._ibkr_symbol(symbol)) or answer.get(symbol)
                if not entries and "." in symbol:
                    retry.append(symbol)
                    continue
                found[symbol] = self._pick_contract(symbol, entries or [])
            if retry:  # IBKR writes share classes with a space: BRK.B is 'BRK B'
                spaced = self._stocks([s.replace(".", " ") for s in retry])
                for symbol in retry:
                    found[symbol] = self._pick_contract(symbol, spaced.get(symbol.replace(".", " ")) or [])
        with _contract_cache_lock:
            for symbol in missing:
                _contract_cache[self._cache_key(symbol)] = found[symbol]
        return {s: found[s] for s in wanted}

    @staticmethod
    def _ibkr_symbol(symbol: str) -> str:
        return symbol.upper()

    def _stocks(self, symbols: list[str]) -> dict:
        status, body = self._request("GET", "/trsrv/stocks", params={"symbols": ",".join(symbols)}, expect=dict)
        body = self._check_error_body(f"contract lookup for {', '.join(symbols)}", status, body)
        return body if isinstance(body, dict) else {}

    def _pick_contract(self, symbol: str, entries: Any) -> Contract:
        """Candidates from IBKR's instruments -> contracts; a contract without a usable conid (missing,
        not a whole number; IBKR sends it as an int here and a string elsewhere) is left out."""
        if isinstance(entries, dict):  # one instrument, not wrapped in a list
            entries = [entries]
        candidates, unusable = [], 0
        for instrument in entries if isinstance(entries, list) else []:
            if not isinstance(instrument, dict) or str(instrument.get("assetClass") or "STK").upper() != "STK":
                continue
            contracts = instrument.get("contracts")
            for contract in contracts if isinstance(contracts, list) else []:
                conid = parse_conid(contract.get("conid")) if isinstance(contract, dict) else None
                if conid is None:
                    unusable += 1
                    continue
                candidates.append(Contract(symbol, conid, str(contract.get("exchange") or ""),
                                           parse_flag(contract.get("isUS")) is True, str(instrument.get("name") or "")))
        if unusable:
            log.warning("IBKR listed %d contract(s) of %s without a usable conid; ignored", unusable, symbol)
        if self.exchanges is None:
            matches = [c for c in candidates if c.is_us]
            policy = "US listings (isUS)"
        else:
            matches = []
            for exchange in self.exchanges:
                matches = [c for c in candidates if c.exchange.upper() == exchange]
                if matches:
                    break
            policy = f"exchanges {', '.join(self.exchanges)}"
        listing = "; ".join(f"{c.conid} {c.exchange} {c.name!r}" for c in candidates) or "none"
        if len({c.conid for c in matches}) == 1:  # one contract, listed once or more (a conid is a contract)
            return matches[0]
        if not matches:
            raise IBKRContractError(
                f"IBKR has no stock contract for {symbol!r} among {policy} (candidates: {listing})",
                "check the symbol (IBKR writes share classes with a space, e.g. 'BRK B'), set IBKR_EXCHANGES "
                f"to the listing exchange, or pin the contract with IBKR_CONIDS={symbol}=<conid>")
        raise IBKRContractError(
            f"symbol {symbol!r} matches {len(matches)} stock contracts among {policy}: "
            + "; ".join(f"{c.conid} {c.exchange} {c.name!r}" for c in matches),
            f"pin the one you mean with IBKR_CONIDS={symbol}=<conid>, or narrow IBKR_EXCHANGES")

    # ------------------------------------------------------------------ contract rules
    def min_tick(self, conid: int) -> float:
        """The contract's minimum price increment: `rules.increment` of
        `GET /iserver/contract/{conid}/info-and-rules?isBuy=true`, cached per conid. 0.01 (with a
        warning, not cached) when IBKR's answer has no usable increment or is an error; a gateway
        that cannot be reached raises as every request does."""
        key = (self.gateway_url, int(conid))
        with _contract_cache_lock:
            if key in _tick_cache:
                return _tick_cache[key]
        self.accounts()  # pre-flight (iserver endpoint)
        try:
            status, body = self._request("GET", f"/iserver/contract/{int(conid)}/info-and-rules",
                                         params={"isBuy": "true"}, expect=dict)
            body = self._check_error_body(f"contract rules of conid {conid}", status, body)
        except IBKRRequestError as error:
            log.warning("IBKR's contract rules of conid %s are unavailable (%s); using a tick of %s",
                        conid, error.problem, DEFAULT_MIN_TICK)
            return DEFAULT_MIN_TICK
        rules = body.get("rules") if isinstance(body, dict) else None
        increment = parse_number(rules.get("increment")) if isinstance(rules, dict) else None
        if increment is None or not increment > 0:
            log.warning("IBKR's contract rules of conid %s have no usable increment (%r); using a tick of %s",
                        conid, rules.get("increment") if isinstance(rules, dict) else rules, DEFAULT_MIN_TICK)
            return DEFAULT_MIN_TICK
        with _contract_cache_lock:
            _tick_cache[key] = increment
        return increment
