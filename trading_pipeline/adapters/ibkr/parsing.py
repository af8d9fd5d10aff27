"""Reading the gateway's answers as IBKR sends them and as hostile gateways vary them: bodies that
are not JSON, conids and numbers as strings, flags as "true"/"false", `{"error": ...}` bodies.
Pure functions, no I/O."""

from __future__ import annotations

import json as jsonlib
import math
import re
from typing import Any

_SHAPES = {dict: "a JSON object", list: "a JSON list", (dict, list): "a JSON object or list"}


class NotJSON(str):
    """A response body that did not parse as JSON (an HTML page, plain text, truncated JSON),
    kept as the text received so that it can be described, never parsed further."""


def describe_body(body: Any) -> str:
    """A short description of an answer body for error messages: what it is, never the whole page
    (and never the values of a JSON object, which may hold a session token)."""
    if body is None:
        return "an empty body"
    if isinstance(body, NotJSON):
        text = body.strip()
        if not text:
            return "an empty body"
        if text[:1] == "<":
            found = (re.search(r"<title[^>]*>(.*?)</title>", text, re.IGNORECASE | re.DOTALL)
                     or re.search(r"<h1[^>]*>(.*?)</h1>", text, re.IGNORECASE | re.DOTALL))
            name = " ".join(re.sub(r"<[^>]+>", " ", found.group(1)).split())[:80] if found else ""
            return "an HTML page" + (f" ({name!r})" if name else "")
        if text[:1] in "{[":
            return f"truncated or malformed JSON ({len(text)} characters)"
        return f"plain text {' '.join(text.split())[:120]!r}"
    if isinstance(body, dict):
        keys = [str(k) for k in body][:8]
        return f"a JSON object with keys {', '.join(keys)}" if keys else "an empty JSON object"
    if isinstance(body, list):
        return f"a JSON list of {len(body)} item(s)"
    return f"a JSON {type(body).__name__}"


def parse_flag(value: Any) -> bool | None:
    """IBKR's booleans as a hostile gateway might send them: true/false, "true"/"false", 1/0.
    None when missing or unrecognizable (callers decide which way that fails closed)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        text = value.strip().lower()
        if text in ("true", "1", "yes"):
            return True
        if text in ("false", "0", "no"):
            return False
    return None


def parse_conid(value: Any) -> int | None:
    """A conid as IBKR sends it: an int almost everywhere, a string in secdef/search (and from
    other gateways anywhere). None unless it is a positive whole number."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int):
        return value if value > 0 else None
    if isinstance(value, float):
        return int(value) if value.is_integer() and value > 0 else None
    text = str(value).strip()
    return int(text) if text.isdigit() and int(text) > 0 else None



def parse_number(value: Any) -> float | None:
    """IBKR's string numbers: '1,300', '168.42', 'C168.42' (prior close), 'H...' (halted),
    '1.2M' / '35.5K' (formatted volume). None for missing or unparseable values, and for NaN and
    infinities (JSON NaN/Infinity, "nan", "inf", "1e999"): no IBKR quantity, price or amount is
    one, and a NaN position or P&L would pass every risk comparison as if it were a number. A
    boolean is not a number either (`"filledQuantity": true` is not 1 share)."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value) if math.isfinite(value) else None
    text = str(value).strip().replace(",", "")
    if not text:
        return None
    if text[0] in "CH" and len(text) > 1:
        text = text[1:]
    text = text.removesuffix("%")
    scale = 1.0
    if text and text[-1] in "KMB":
        scale = {"K": 1e3, "M": 1e6, "B": 1e9}[text[-1]]
        text = text[:-1]
    try:
        number = float(text) * scale
    except ValueError:
        return None
    return number if math.isfinite(number) else None



def error_field(body: Any) -> str:
    """The text of an `{"error": ...}` answer (also `[{"error": ...}]`); "" if there is none.
    A null or empty `error` next to real data is not an error."""
    value = None
    if isinstance(body, dict):
        value = body.get("error")
    elif isinstance(body, list) and len(body) == 1 and isinstance(body[0], dict):
        value = body[0].get("error")
    if value is None or value == "" or value is False:
        return ""
    return " ".join(value.split())[:300] if isinstance(value, str) else jsonlib.dumps(value)[:300]


def error_text(body: Any) -> str:
    """IBKR's error text: the `error` field, else a plain-text body, else a description of an
    HTML page or broken JSON (never the page itself)."""
    text = error_field(body)
    if text:
        return text
    if isinstance(body, NotJSON):
        stripped = body.strip()
        return describe_body(body) if stripped[:1] in "<{[" else " ".join(stripped.split())[:300]
    if isinstance(body, str):
        return body.strip()[:300]
    return ""


def strings(body: Any):
    """Every string in an answer (for texts IBKR may put in any field, e.g. a duplicate cOID)."""
    if isinstance(body, str):
        yield body
    elif isinstance(body, dict):
        for value in body.values():
            yield from strings(value)
    elif isinstance(body, list):
        for value in body:
            yield from strings(value)


# IBKR's order states (reference section 7), keyed by their letters in lower case: the states as
# IBKR spells them, its filter spellings (pre_submitted), other casings ("filled"), "Canceled",
# and TWS's ApiCancelled (cancelled before IBKR acknowledged the order: a cancellation too).
_ORDER_STATES = {name.lower(): name for name in (
    "Inactive", "PendingSubmit", "PreSubmitted", "Submitted", "Filled", "PendingCancel", "PreCancelled",
    "Cancelled", "WarnState", "ApiPending", "Rejected")}
_ORDER_STATES.update({"canceled": "Cancelled", "apicancelled": "Cancelled", "apicanceled": "Cancelled"})


def order_state(value: Any) -> str:
    """An order's status in IBKR's own spelling ('Filled', 'PreSubmitted', ...), whatever the
    casing or separators a gateway uses; a state IBKR does not document is kept as sent (it is
    then not final: the order counts as working and is reconciled again), "" when absent."""
    if value is None or isinstance(value, bool):
        return ""
    text = str(value).strip()
    return _ORDER_STATES.get(re.sub(r"[\s_-]", "", text).lower(), text)


def parse_side(value: Any) -> str | None:
    """BUY or SELL from IBKR's sides: "BUY"/"SELL" (orders), "B"/"S" (trades, order status), in
    any casing, and TWS's "BOT"/"SLD". None for anything else (callers fail closed)."""
    if not isinstance(value, str):
        return None
    return {"B": "BUY", "BUY": "BUY", "BOT": "BUY", "S": "SELL", "SELL": "SELL", "SLD": "SELL"}.get(
        value.strip().upper())
