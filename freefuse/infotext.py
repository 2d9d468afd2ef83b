"""The ``FreeFuse`` infotext entry: the settings that differ from the family's defaults, readable by a person.

    FreeFuse: family=sdxl; capture_step=6; mask_method=paper; subjects=harry%3A harry_potter%0Adaiyu%3A daiyu_lin

``key=value`` pairs separated by ``; ``, the family first. Forge quotes (and escapes) an infotext value that holds
a comma, a colon, a quote or a line break, so those characters, the format's own ``;``, ``=``, ``%``, and any
whitespace but inner spaces are written percent-encoded (UTF-8) inside text values; numbers and true/false are
written as they are. Infotexts of version 0.1
(a JSON object, ``{"v":1,"family":"flux",...}``) still paste.
"""

from __future__ import annotations

import json
import re
from typing import Any
from urllib.parse import unquote

_ESCAPED = re.compile(r"[%,:;=\"]|[^\S ]|^ | $")  # the format's and Forge's specials, whitespace but inner spaces
_SEPARATOR = "; "


def _encode(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)  # shortest text that reads back to the same float
    if isinstance(value, int):
        return str(value)
    return _ESCAPED.sub(lambda m: "".join(f"%{b:02X}" for b in m.group().encode()), str(value))


def _decode(text: str) -> str:
    return unquote(text)


def encode_settings(family: str, changed: dict[str, Any]) -> str:
    """``family=...; key=value; ...`` with the keys in the given order."""
    pairs = [("family", family), *changed.items()]
    return _SEPARATOR.join(f"{key}={_encode(value)}" for key, value in pairs)


def decode_settings(text: str) -> dict[str, Any]:
    """The pairs of an entry as a dict of strings (values still to be coerced), or of JSON types for 0.1's."""
    text = text.strip()
    if text.startswith("{"):
        data = json.loads(text)  # version 0.1
        if not isinstance(data, dict):
            raise ValueError("the value is not a JSON object")
        data.pop("v", None)
        return data
    data: dict[str, Any] = {}
    for pair in filter(None, (p.lstrip() for p in text.split(";"))):
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"{pair!r} is not key=value")
        data[key.strip()] = _decode(value)
    return data
