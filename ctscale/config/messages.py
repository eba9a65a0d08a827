"""How config errors speak: where a value came from, what was probably meant, how a value reads."""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from typing import Any


def where_from(source: str) -> str:
    """' in FILE' for an error message; nothing for a config built from a dict in code."""
    return "" if source == "<dict>" else f" in {source}"


def did_you_mean(word: str, options: Sequence[str], prefix: str = "") -> str:
    """'; did you mean ...?' naming the closest option, or '' when none is close."""
    close = difflib.get_close_matches(str(word), list(options), n=1)
    return f"; did you mean '{prefix}{close[0]}'?" if close else ""


def show_value(value: Any) -> str:
    """Render a value the way a user would write it in YAML."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return "[" + ", ".join(map(str, value)) + "]"
    return repr(value) if isinstance(value, str) else str(value)
