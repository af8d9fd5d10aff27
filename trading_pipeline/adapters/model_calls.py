"""Model calls in the trading database: the call log, token/cost budgets, the response cache, prices.

Tables (on the trading database's `Base`, created on first use):
- `llm_calls`: one row per HTTP attempt and per cache hit or budget refusal: model (asked for, and
  the one the server says answered), prompt version,
  image sha256, vision, response format, the request (Authorization redacted, the base64 image
  replaced by its sha256), the raw response, tokens, latency, estimated cost, status and outcome.
  Attempts of one logical call share a `call_id`.
- `llm_response_cache`: schema-valid answers keyed by model, prompt version, image sha256, the
  numeric context and the response schema, so re-materializing an unchanged partition costs
  nothing and returns the same analysis.

Budgets (all optional; unset = no limit): `TRADING_LLM_MAX_TOKENS_PER_RUN`,
`TRADING_LLM_MAX_TOKENS_PER_DAY`, `TRADING_LLM_MAX_COST_PER_DAY_USD` (days are UTC days). A call
starts only while what was used (from `llm_calls`) plus what calls in flight in this process have
reserved stays below every limit; otherwise `BudgetExceeded` says which limit and how to lift it.

Secrets: every text written here goes through `Redactor`: the API key and any run of 8 or more of its
consecutive characters (a server may echo part of it), a password in the base URL (also as the
`Basic` credential the HTTP client makes of it), `Bearer …` and `sk-…` tokens.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import logging
import re
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, time
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

from sqlalchemy import JSON, Boolean, Float, Integer, String, Text, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Mapped, Session, mapped_column, sessionmaker

from trading_pipeline.adapters.trading_db import Base, utcnow
from trading_pipeline.config import env_number
from trading_pipeline.errors import ConfigError, UserError

log = logging.getLogger(__name__)

CACHE_ENV = "TRADING_LLM_CACHE"
CACHE_RUN_TAG = "trading/llm_cache"
MAX_TOKENS_PER_RUN_ENV = "TRADING_LLM_MAX_TOKENS_PER_RUN"
MAX_TOKENS_PER_DAY_ENV = "TRADING_LLM_MAX_TOKENS_PER_DAY"
MAX_COST_PER_DAY_ENV = "TRADING_LLM_MAX_COST_PER_DAY_USD"
PRICE_INPUT_ENV = "OPENAI_PRICE_INPUT_PER_MTOK"
PRICE_OUTPUT_ENV = "OPENAI_PRICE_OUTPUT_PER_MTOK"

ON_VALUES = ("", "on", "yes", "true", "1")
OFF_VALUES = ("off", "no", "false", "0")

# Statuses of an `llm_calls` row.
OK = "ok"
CACHE_HIT = "cache_hit"
BUDGET_EXCEEDED = "budget_exceeded"


class ModelCallRow(Base):
    __tablename__ = "llm_calls"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    call_id: Mapped[str] = mapped_column(String(32), index=True)
    attempt: Mapped[int] = mapped_column(Integer)
    run_id: Mapped[str | None] = mapped_column(String(64), index=True)
    kind: Mapped[str] = mapped_column(String(32))  # timeframe_analysis | consolidation
    symbol: Mapped[str] = mapped_column(String(16), index=True)
    timeframe: Mapped[str | None] = mapped_column(String(8))
    endpoint: Mapped[str] = mapped_column(String(255))  # base URL without credentials
    model: Mapped[str] = mapped_column(String(128))  # the model asked for (OPENAI_MODEL)
    # The model the server says answered (its `model`), cleaned; a cache hit carries the cached answer's.
    answered_model: Mapped[str | None] = mapped_column(String(128))
    prompt_version: Mapped[str] = mapped_column(String(64))
    image_sha256: Mapped[str | None] = mapped_column(String(64))
    vision: Mapped[bool] = mapped_column(Boolean)
    response_format: Mapped[str] = mapped_column(String(16))  # json_schema | json_object | none
    cache_key: Mapped[str] = mapped_column(String(64), index=True)
    cache_hit: Mapped[bool] = mapped_column(Boolean, default=False)
    status: Mapped[str] = mapped_column(String(32))
    http_status: Mapped[int | None] = mapped_column(Integer)
    error: Mapped[str | None] = mapped_column(Text)
    request: Mapped[dict | None] = mapped_column(JSON)
    response: Mapped[str | None] = mapped_column(Text)
    prompt_tokens: Mapped[int] = mapped_column(Integer, default=0)
    completion_tokens: Mapped[int] = mapped_column(Integer, default=0)
    total_tokens: Mapped[int] = mapped_column(Integer, default=0)
    usage_estimated: Mapped[bool] = mapped_column(Boolean, default=False)
    latency_ms: Mapped[float] = mapped_column(Float, default=0.0)
    cost_usd: Mapped[float | None] = mapped_column(Float)
    outcome: Mapped[str | None] = mapped_column(Text)  # what the call became: "valid" or "invalid: …"
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)


class ModelResponseCacheRow(Base):
    __tablename__ = "llm_response_cache"
    cache_key: Mapped[str] = mapped_column(String(64), primary_key=True)
    kind: Mapped[str] = mapped_column(String(32))
    model: Mapped[str] = mapped_column(String(128))  # asked for; part of the key
    answered_model: Mapped[str | None] = mapped_column(String(128))  # not part of the key
    prompt_version: Mapped[str] = mapped_column(String(64))
    image_sha256: Mapped[str | None] = mapped_column(String(64))
    context_sha256: Mapped[str] = mapped_column(String(64))
    content: Mapped[str] = mapped_column(Text)  # the model's answer text, schema-valid
    vision: Mapped[bool] = mapped_column(Boolean)
    response_format: Mapped[str] = mapped_column(String(16))
    call_id: Mapped[str] = mapped_column(String(32))
    hits: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_hit_at: Mapped[datetime | None] = mapped_column()




# --- secrets ----------------------------------------------------------------------------------

_TOKEN_PATTERNS = (
    re.compile(r"(?i)(bearer\s+)[A-Za-z0-9._~+/=\-*]+"),
    re.compile(r"\bsk-[A-Za-z0-9_\-*]{6,}"),
)
# The shortest run of a secret's consecutive characters that counts as a leak of it.
MIN_SECRET_RUN = 8
MIN_SECRET_LENGTH = 4  # a secret shorter than this is not looked for (it would match ordinary text)


class Redactor:
    """Removes secrets (the API key, a password in the base URL) from text and nested JSON, and
    anything shaped like a key (`Bearer …`, `sk-…`).

    What counts as a leak of a secret: any run of MIN_SECRET_RUN (8) or more of its consecutive
    characters, wherever it stands, so a server echoing the start, the middle or the end of the key
    is caught too. Shorter runs are left alone: 7 characters of a key are often ordinary text
    ("sk-proj", "support", "1234567"), hiding them would mangle answers and JSON, and they give away
    little of a random key. A secret of 4 to 7 characters is redacted only whole. The match is exact
    (case-sensitive): an echo the server transformed (case, encoding, order) is not recognised.
    """

    def __init__(self, secrets: Iterable[str] = ()):
        needles: set[str] = set()
        for secret in secrets:
            if secret and len(secret) >= MIN_SECRET_RUN:
                needles.update(secret[i:i + MIN_SECRET_RUN] for i in range(len(secret) - MIN_SECRET_RUN + 1))
            elif secret and len(secret) >= MIN_SECRET_LENGTH:
                needles.add(secret)
        self._needles = tuple(sorted(needles))

    def _secret_spans(self, value: str) -> list[tuple[int, int]]:
        """Where secrets' runs stand in `value`, overlapping and touching runs merged, in order."""
        found = []
        for needle in self._needles:
            start = value.find(needle)
            while start != -1:
                found.append((start, start + len(needle)))
                start = value.find(needle, start + 1)
        spans: list[tuple[int, int]] = []
        for start, end in sorted(found):
            if spans and start <= spans[-1][1]:
                spans[-1] = (spans[-1][0], max(end, spans[-1][1]))
            else:
                spans.append((start, end))
        return spans

    def text(self, value: str | None) -> str | None:
        """The text with every secret run and key-shaped token replaced by [REDACTED]; the one way
        text from a model server is cleaned before it is stored, logged or raised. A NUL character
        becomes the JSON escape `\\u0000`: PostgreSQL text cannot hold NUL, and a server sending one
        must still leave its attempt in the call log (inside a JSON string the escape stands for the
        same character)."""
        if value is None:
            return None
        value = value.replace("\x00", "\\u0000")
        kept, position = [], 0
        for start, end in self._secret_spans(value):
            kept.append(value[position:start] + "[REDACTED]")
            position = end
        value = "".join(kept) + value[position:]
        value = _TOKEN_PATTERNS[0].sub(r"\1[REDACTED]", value)
        return _TOKEN_PATTERNS[1].sub("[REDACTED]", value)

    @classmethod
    def for_endpoint(cls, api_key: str | None, base_url: str | None) -> Redactor:
        """The redactor of one endpoint's calls: the API key, and the user:password of the base URL
        (https://user:password@proxy/v1) as written, decoded and as the HTTP client sends it: an
        `Authorization: Basic base64(user:password)` header, which a server may echo back."""
        secrets = [api_key or ""]
        try:
            parts = urlsplit(base_url or "")
            user, password = parts.username, parts.password
        except ValueError:
            user = password = None
        if password:
            decoded_user, decoded = unquote(user or ""), unquote(password)
            secrets += [password, decoded,
                        base64.b64encode(f"{decoded_user}:{decoded}".encode()).decode()]
        return cls(secrets)

    @staticmethod
    def _credential(value: Any) -> str:
        return "Bearer [REDACTED]" if str(value).lower().startswith("bearer") else "[REDACTED]"

    def json(self, value: Any) -> Any:
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, Mapping):
            return {k: (self._credential(v) if str(k).lower() in ("authorization", "api-key", "x-api-key", "api_key")
                        else self.json(v)) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [self.json(v) for v in value]
        return value


def endpoint_for_record(base_url: str) -> str:
    """The base URL as recorded: any user:password@ part removed, query string dropped."""
    try:
        parts = urlsplit(base_url)
        host = parts.hostname or ""
        netloc = host + (f":{parts.port}" if parts.port else "")
        return urlunsplit((parts.scheme, netloc, parts.path, "", ""))[:255]
    except ValueError:
        return "unparseable base URL"


# --- prices -----------------------------------------------------------------------------------

# USD per 1M tokens (input, output): OpenAI list prices for standard processing when this table was
# written. Prices change: set OPENAI_PRICE_INPUT_PER_MTOK / OPENAI_PRICE_OUTPUT_PER_MTOK to override.
PRICES_PER_MTOK: dict[str, tuple[float, float]] = {
    "gpt-4o": (2.50, 10.00),
    "gpt-4o-mini": (0.15, 0.60),
    "gpt-4.1": (2.00, 8.00),
    "gpt-4.1-mini": (0.40, 1.60),
    "gpt-4.1-nano": (0.10, 0.40),
    "gpt-5": (1.25, 10.00),
    "gpt-5-mini": (0.25, 2.00),
    "gpt-5-nano": (0.05, 0.40),
}
_SNAPSHOT = re.compile(r"^(?:openai/)?(?P<base>.+?)(?:-\d{4}-\d{2}-\d{2})?$")


# What follows the asked name in a dated snapshot of it: gpt-4o-2024-08-06, gpt-4-0613.
_SNAPSHOT_SUFFIX = re.compile(r"-\d[\d-]*")


def same_model(asked: str, answered: str) -> bool:
    """Is the model a server says answered the model asked for? The same name (any case), a dated
    snapshot of it (`gpt-4o` answered as `gpt-4o-2024-08-06`), or Ollama's default tag (`:latest`).
    Not any name starting with the asked one: `gpt-4o-mini` is another, cheaper model than `gpt-4o`."""
    asked, answered = asked.strip().lower(), answered.strip().lower()
    if answered in (asked, f"{asked}:latest"):
        return True
    return answered.startswith(f"{asked}-") and bool(_SNAPSHOT_SUFFIX.fullmatch(answered[len(asked):]))


def answered_model_note(asked: str, answered: str | None) -> str | None:
    """The how-obtained note of an answer another model gave, or None (no name given, or the same model).
    The call is still priced (and budgeted) at the asked model's price: the only one configured."""
    if not answered or same_model(asked, answered):
        return None
    return f"answered by {answered}, asked for {asked}; cost estimates use {asked}'s price"


@dataclass(frozen=True)
class ModelPrice:
    input_per_mtok: float
    output_per_mtok: float
    source: str  # "environment" or "built-in table (<name>)"

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        return round((prompt_tokens * self.input_per_mtok + completion_tokens * self.output_per_mtok) / 1e6, 8)


def _int_env(environ: Mapping[str, str], name: str, *, minimum: int = 1) -> int | None:
    raw = (environ.get(name) or "").strip().replace("_", "")
    if not raw:
        return None
    if not raw.isdigit() or int(raw) < minimum:
        raise ConfigError(f"{name}={environ.get(name)!r} is not a whole number ≥ {minimum}",
                          f"set {name} to a whole number such as 200000, or unset it")
    return int(raw)


def price_for(model: str, environ: Mapping[str, str]) -> ModelPrice | None:
    """The model's price: the environment's override, else the built-in table, else None (unknown)."""
    price_in = env_number(environ, PRICE_INPUT_ENV, None, low=0, example="2.5")
    price_out = env_number(environ, PRICE_OUTPUT_ENV, None, low=0, example="2.5")
    if (price_in is None) != (price_out is None):
        missing = PRICE_OUTPUT_ENV if price_out is None else PRICE_INPUT_ENV
        raise ConfigError(f"only one of {PRICE_INPUT_ENV} and {PRICE_OUTPUT_ENV} is set",
                          f"set {missing} too (USD per 1M tokens), or unset both to use the built-in price table")
    if price_in is not None:
        return ModelPrice(price_in, price_out, "environment")
    match = _SNAPSHOT.match(model.strip().lower())
    for name in (model.strip().lower(), match.group("base") if match else None):
        if name in PRICES_PER_MTOK:
            return ModelPrice(*PRICES_PER_MTOK[name], f"built-in table ({name})")
    return None


# --- budgets ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class BudgetLimits:
    max_tokens_per_run: int | None = None
    max_tokens_per_day: int | None = None
    max_cost_per_day_usd: float | None = None

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> BudgetLimits:
        return cls(_int_env(environ, MAX_TOKENS_PER_RUN_ENV), _int_env(environ, MAX_TOKENS_PER_DAY_ENV),
                   env_number(environ, MAX_COST_PER_DAY_ENV, None, low=0, example="2.5"))

    def describe(self) -> dict[str, Any]:
        return {MAX_TOKENS_PER_RUN_ENV: self.max_tokens_per_run, MAX_TOKENS_PER_DAY_ENV: self.max_tokens_per_day,
                MAX_COST_PER_DAY_ENV: self.max_cost_per_day_usd}


class BudgetExceeded(UserError):
    """A token or cost budget is used up: no further model calls until it is raised or resets."""


@dataclass
class Reservation:
    id: int
    run_id: str | None
    tokens: int
    cost: float


_inflight: dict[int, Reservation] = {}
_inflight_lock = threading.Lock()
_reservation_ids = itertools.count(1)


def _day_start(now: datetime) -> datetime:
    return datetime.combine(now.astimezone(UTC).date(), time(0), tzinfo=UTC)


class Budget:
    """Checks the limits against the call log before each call, and reserves the call's estimate."""

    def __init__(self, log_: ModelCallLog, limits: BudgetLimits, run_id: str | None):
        self.log = log_
        self.limits = limits
        self.run_id = run_id

    def reserve(self, tokens: int, cost: float | None) -> Reservation:
        """Reserve an estimate for one call, or raise BudgetExceeded naming the limit and the fix."""
        limits = self.limits
        with _inflight_lock:
            if limits.max_tokens_per_run is not None and self.run_id is not None:
                used = self.log.tokens_used(run_id=self.run_id)
                pending = sum(r.tokens for r in _inflight.values() if r.run_id == self.run_id)
                if used + pending >= limits.max_tokens_per_run:
                    raise BudgetExceeded(
                        f"LLM token budget for this run is used up: {used:,} tokens used by run {self.run_id}"
                        + (f" (+{pending:,} reserved by calls in flight)" if pending else "")
                        + f" of {MAX_TOKENS_PER_RUN_ENV}={limits.max_tokens_per_run:,}; no further model calls in this run",
                        f"raise {MAX_TOKENS_PER_RUN_ENV} (or unset it) and re-materialize the affected partitions")
            day = _day_start(utcnow())
            if limits.max_tokens_per_day is not None:
                used = self.log.tokens_used(since=day)
                pending = sum(r.tokens for r in _inflight.values())
                if used + pending >= limits.max_tokens_per_day:
                    raise BudgetExceeded(
                        f"LLM token budget for today (UTC) is used up: {used:,} tokens used since {day:%Y-%m-%d} 00:00 UTC"
                        + (f" (+{pending:,} reserved by calls in flight)" if pending else "")
                        + f" of {MAX_TOKENS_PER_DAY_ENV}={limits.max_tokens_per_day:,}; no further model calls today",
                        f"wait for 00:00 UTC, or raise {MAX_TOKENS_PER_DAY_ENV} (or unset it)")
            if limits.max_cost_per_day_usd is not None:
                spent = self.log.cost_spent(since=day)
                pending = sum(r.cost for r in _inflight.values())
                if spent + pending >= limits.max_cost_per_day_usd:
                    raise BudgetExceeded(
                        f"LLM cost budget for today (UTC) is used up: ${spent:.4f} estimated since {day:%Y-%m-%d} 00:00 UTC"
                        + (f" (+${pending:.4f} reserved by calls in flight)" if pending else "")
                        + f" of {MAX_COST_PER_DAY_ENV}={limits.max_cost_per_day_usd:g}; no further model calls today",
                        f"wait for 00:00 UTC, or raise {MAX_COST_PER_DAY_ENV} (or unset it)")
            reservation = Reservation(next(_reservation_ids), self.run_id, int(tokens), float(cost or 0.0))
            _inflight[reservation.id] = reservation
            return reservation

    @staticmethod
    def release(reservation: Reservation | None) -> None:
        if reservation is not None:
            with _inflight_lock:
                _inflight.pop(reservation.id, None)


# --- the call log -----------------------------------------------------------------------------


class ModelCallLog:
    """Writes and sums `llm_calls` rows. Every text field is redacted before it is written."""

    def __init__(self, sessions: sessionmaker[Session], redactor: Redactor):
        self.sessions = sessions
        self.redactor = redactor

    def _clean(self, fields: dict[str, Any]) -> dict[str, Any]:
        for name in ("error", "response", "outcome"):
            if fields.get(name) is not None:
                fields[name] = self.redactor.text(str(fields[name]))
        if fields.get("request") is not None:
            fields["request"] = self.redactor.json(fields["request"])
        fields.setdefault("total_tokens", int(fields.get("prompt_tokens") or 0) + int(fields.get("completion_tokens") or 0))
        return fields

    def record(self, **fields: Any) -> None:
        """Write one row now (failed attempts, budget refusals); redacted."""
        with self.sessions.begin() as session:
            session.add(ModelCallRow(**self._clean(fields)))

    def settle(self, call_id: str, outcome: str, *, row: dict[str, Any] | None = None,
               cache_put: tuple[str, dict[str, Any]] | None = None, cache_hit_key: str | None = None) -> None:
        """In one transaction: the call's last row (if not yet written), what the call became ("valid"
        or "invalid: why") on all its rows, and its response-cache entry (a fresh answer, or a hit)."""
        outcome = self.redactor.text(outcome)[:4000]
        for attempt in range(2):
            try:
                with self.sessions.begin() as session:
                    if row is not None:
                        session.add(ModelCallRow(**self._clean(dict(row)), outcome=outcome))
                    session.execute(update(ModelCallRow)
                                    .where(ModelCallRow.call_id == call_id, ModelCallRow.outcome.is_(None))
                                    .values(outcome=outcome))
                    if cache_put is not None:
                        key, fields = cache_put
                        entry = session.get(ModelResponseCacheRow, key)
                        if entry is None:
                            session.add(ModelResponseCacheRow(cache_key=key, **fields))
                        else:  # a bypassed cache replaces the entry with the fresh answer
                            for name, value in fields.items():
                                setattr(entry, name, value)
                            entry.created_at = utcnow()
                    if cache_hit_key is not None:
                        session.execute(update(ModelResponseCacheRow)
                                        .where(ModelResponseCacheRow.cache_key == cache_hit_key)
                                        .values(hits=ModelResponseCacheRow.hits + 1, last_hit_at=utcnow()))
                return
            except IntegrityError:  # a concurrent run cached the same key first: update it instead
                if attempt:
                    raise

    def tokens_used(self, *, run_id: str | None = None, since: datetime | None = None) -> int:
        query = select(func.coalesce(func.sum(ModelCallRow.total_tokens), 0)).where(ModelCallRow.cache_hit.is_(False))
        if run_id is not None:
            query = query.where(ModelCallRow.run_id == run_id)
        if since is not None:
            query = query.where(ModelCallRow.created_at >= since)
        with self.sessions() as session:
            return int(session.execute(query).scalar_one())

    def cost_spent(self, *, since: datetime) -> float:
        query = (select(func.coalesce(func.sum(ModelCallRow.cost_usd), 0.0))
                 .where(ModelCallRow.cache_hit.is_(False), ModelCallRow.created_at >= since))
        with self.sessions() as session:
            return float(session.execute(query).scalar_one())


# --- the response cache -----------------------------------------------------------------------


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def sha256_hex(data: str | bytes) -> str:
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


def cache_key(*, kind: str, model: str, prompt_version: str, chart_sha256: str | None, context_sha256: str,
              schema_sha256: str) -> str:
    """Same model, prompt, chart, numeric context and schema ⇒ same key. `chart_sha256` is what the
    chart shows (core/chart_spec.py), None when no chart is sent; `context_sha256` the context's
    contents (llm/request.py `RequestContext.sha256`)."""
    return sha256_hex(repr((kind, model, prompt_version, chart_sha256, context_sha256, schema_sha256)))


@dataclass(frozen=True)
class CachedResponse:
    content: str
    vision: bool
    response_format: str
    call_id: str
    answered_model: str | None = None


class ResponseCache:
    def __init__(self, sessions: sessionmaker[Session]):
        self.sessions = sessions

    def get(self, key: str) -> CachedResponse | None:
        """Read-only lookup; entries are written (and hits counted) by ModelCallLog.settle."""
        with self.sessions() as session:
            row = session.get(ModelResponseCacheRow, key)
            if row is None:
                return None
            return CachedResponse(row.content, row.vision, row.response_format, row.call_id, row.answered_model)


def cache_enabled(environ: Mapping[str, str], run_tags: Mapping[str, str] | None = None) -> bool:
    """Off when TRADING_LLM_CACHE=off or the run has the tag trading/llm_cache=off."""
    for name, raw in ((CACHE_ENV, environ.get(CACHE_ENV)), (f"run tag {CACHE_RUN_TAG}", (run_tags or {}).get(CACHE_RUN_TAG))):
        value = (raw or "").strip().lower()
        if value in OFF_VALUES:
            return False
        if value not in ON_VALUES:
            raise ConfigError(f"{name}={raw!r} is not on or off",
                              f"set {name} to off (bypass the LLM response cache) or on (default)")
    return True


# --- summaries for Dagster metadata -----------------------------------------------------------


def summarize_calls(sessions: sessionmaker[Session], *, run_id: str | None, symbol: str,
                    timeframe: str | None = None, kind: str | None = None) -> dict[str, Any]:
    """Plain-JSON summary of the model calls of one run and partition (for asset metadata)."""
    query = select(ModelCallRow).where(ModelCallRow.symbol == symbol)
    query = query.where(ModelCallRow.run_id == run_id) if run_id is not None else query.where(ModelCallRow.run_id.is_(None))
    if timeframe is not None:
        query = query.where(ModelCallRow.timeframe == timeframe)
    if kind is not None:
        query = query.where(ModelCallRow.kind == kind)
    with sessions() as session:
        rows = list(session.execute(query.order_by(ModelCallRow.id)).scalars())
    http = [r for r in rows if not r.cache_hit and r.status != BUDGET_EXCEEDED]
    costs = [r.cost_usd for r in http]
    statuses: dict[str, int] = {}
    for r in rows:
        statuses[r.status] = statuses.get(r.status, 0) + 1
    return {
        "model_calls": len({r.call_id for r in rows}),
        "http_attempts": len(http),
        "cache_hits": sum(r.cache_hit for r in rows),
        "budget_refusals": sum(r.status == BUDGET_EXCEEDED for r in rows),
        "prompt_tokens": sum(r.prompt_tokens for r in http),
        "completion_tokens": sum(r.completion_tokens for r in http),
        "total_tokens": sum(r.total_tokens for r in http),
        "usage_estimated": any(r.usage_estimated for r in http),
        "cost_usd": round(sum(c for c in costs if c is not None), 6) if http and all(c is not None for c in costs)
        else (0.0 if not http else None),
        "latency_ms_total": round(sum(r.latency_ms for r in http), 1),
        "latency_ms_max": round(max((r.latency_ms for r in http), default=0.0), 1),
        "models": sorted({r.model for r in rows}),
        "answered_models": sorted({r.answered_model for r in rows if r.answered_model}),
        "prompt_versions": sorted({r.prompt_version for r in rows}),
        "image_sha256": sorted({r.image_sha256 for r in rows if r.image_sha256}),
        "vision": sorted({r.vision for r in rows if r.status in (OK, CACHE_HIT)}),
        "response_formats": sorted({r.response_format for r in rows}),
        "statuses": statuses,
        "outcomes": sorted({r.outcome for r in rows if r.outcome}),
        "call_ids": sorted({r.call_id for r in rows}),
    }
