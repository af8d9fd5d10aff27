"""The one JSON value in a model's text, read strictly.

Model text is read strictly: ```json fences, a leading <think>…</think> block of a reasoning model,
or prose around one JSON object are removed and said; several candidate objects, NaN/Infinity,
duplicate keys, absurd nesting or length fail (UnreadableJSON): the answer is never guessed.
"""

from __future__ import annotations

import json
import re
from typing import Any

JSON_FENCE = re.compile(r"^```[A-Za-z0-9_-]*\s*\n?(?P<body>.*?)\n?\s*```$", re.DOTALL)
ANY_FENCE = re.compile(r"```[A-Za-z0-9_-]*[ \t]*\n?(?P<body>.*?)```", re.DOTALL)
# Reasoning models on vLLM, Ollama or llama.cpp without a reasoning parser put their thinking first.
REASONING_BLOCK = re.compile(r"^<(?P<tag>think|thinking|reasoning)>.*?</(?P=tag)>", re.DOTALL | re.IGNORECASE)
REASONING_OPEN = re.compile(r"^<(?P<tag>think|thinking|reasoning)>", re.IGNORECASE)
REASONING_CLOSE = re.compile(r"</(?P<tag>think|thinking|reasoning)>", re.IGNORECASE)
MAX_ANSWER_CHARS = 200_000  # an answer is a few KB; far more is a runaway model or a hostile server
MAX_JSON_CANDIDATES = 64  # '{' positions tried when looking for a second JSON object in prose


class UnreadableJSON(Exception):
    """The text holds no single strict JSON value; the message says why and quotes the text."""


def strip_fences(text: str) -> str:
    """```json … ``` (or bare ``` … ```) around the JSON is formatting, not a reason to fail."""
    text = text.strip()
    match = JSON_FENCE.match(text)
    return match.group("body").strip() if match else text


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not a number JSON allows")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    data = dict(pairs)
    if len(data) != len(pairs):  # {"signal": "HOLD", ..., "signal": "BUY"}: which one the model meant is unknown
        seen: set[str] = set()
        duplicates = sorted({k for k, _ in pairs if k in seen or seen.add(k)})
        raise ValueError(f"duplicate key(s) {duplicates} in one object")
    return data


_DECODER = json.JSONDecoder(parse_constant=_reject_constant, object_pairs_hook=_unique_keys)


def _decode(text: str, start: int | None = None) -> tuple[Any, int]:
    """Strict JSON (no NaN/Infinity, no duplicate keys) from `start` (None: the whole text)."""
    try:
        if start is None:
            return _DECODER.decode(text), len(text)
        return _DECODER.raw_decode(text, start)
    except RecursionError:
        raise ValueError("nested too deeply") from None


def read_json(content: str) -> tuple[Any, tuple[str, ...]]:
    """The one JSON value in the model's text, and notes saying what was removed around it.

    Plain JSON or JSON in a ``` fence is read as is. Otherwise a leading <think>…</think> block (or
    text up to a lone </think>) is removed, then the one fenced block, or the one JSON object the
    text holds, is read. No JSON, several candidates, or JSON that is not strict (NaN, Infinity,
    duplicate keys) raise UnreadableJSON saying so: the answer is never guessed.
    """
    if len(content) > MAX_ANSWER_CHARS:
        raise UnreadableJSON(f"the model's answer is {len(content):,} characters long, more than the "
                                             f"{MAX_ANSWER_CHARS:,} an answer may have")
    text = content.strip()
    try:
        return _decode(strip_fences(text))[0], ()
    except ValueError as error:
        problem = error
    notes: list[str] = []
    block = REASONING_BLOCK.match(text)
    close = None if block else list(REASONING_CLOSE.finditer(text))
    if block:
        text = text[block.end():].strip()
        notes.append(f"a <{block.group('tag').lower()}> reasoning block before the JSON was removed")
    elif REASONING_OPEN.match(text):
        tag = REASONING_OPEN.match(text).group("tag").lower()
        raise UnreadableJSON(f"the model's answer is a reasoning block that never closes (<{tag}> "
                             f"without </{tag}>) and holds no JSON answer: it ran out of output tokens or never "
                             "answered. Fix: raise OPENAI_MAX_OUTPUT_TOKENS, or enable the server's reasoning parser")
    elif close:
        text = text[close[-1].end():].strip()
        notes.append(f"text up to a </{close[-1].group('tag').lower()}> reasoning end tag was removed")
    if notes:
        try:
            return _decode(strip_fences(text))[0], tuple(notes)
        except ValueError as error:
            problem = error
    around = "text around the JSON was ignored"
    fences = [m.group("body").strip() for m in ANY_FENCE.finditer(text)]
    if len(fences) > 1:
        raise UnreadableJSON(f"the model's answer holds {len(fences)} fenced blocks; which one is the "
                                             f"answer is ambiguous: {text[:200]!r}")
    if fences:
        try:
            return _decode(fences[0])[0], (*notes, around)
        except ValueError as error:
            raise UnreadableJSON(f"the model's answer is not valid JSON ({error}): "
                                                 f"{fences[0][:200]!r}") from None
    start = text.find("{")
    if start == -1:
        raise UnreadableJSON(f"the model's answer is not valid JSON ({problem}): {text[:200]!r}")
    try:  # the JSON object starts at the first brace: text before it is prose, braces in prose are not guessed past
        value, end = _decode(text, start)
    except ValueError as error:
        raise UnreadableJSON(f"the model's answer is not valid JSON ({error}): "
                                             f"{text[start:start + 200]!r}") from None
    found, position = 1, text.find("{", end)
    for _ in range(MAX_JSON_CANDIDATES):
        if position == -1:
            break
        try:
            _, position = _decode(text, position)
            found += 1
        except ValueError:
            position += 1
        position = text.find("{", position)
    if found > 1:
        raise UnreadableJSON(f"the model's answer holds {found} JSON objects; which one is the answer "
                                             f"is ambiguous: {text[:200]!r}")
    return value, (*notes, around)
