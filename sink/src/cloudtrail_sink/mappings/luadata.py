"""Write Python data as a Lua chunk that only builds tables: ``return { ... }``.

Contract: ``dumps(value) -> str``. The output holds table constructors, string literals,
numbers and booleans, nothing else: no names, no calls, no long brackets. Strings are written
byte by byte: printable ASCII (0x20-0x7E) except ``"`` and ``\\`` as-is, every other byte as a
three-digit ``\\ddd`` escape, so no text from a mapping file can end the literal or run as code.
Numbers must be finite; integers within +-2^53 (Lua numbers are doubles). Dict keys must be
strings. ``None`` is refused (Lua tables cannot hold nil). The chunk runs under
``loadfile(path, "t", {})`` (an empty environment) because it needs no globals at all.
"""

from __future__ import annotations

import math
from typing import Any

MAX_INT = 2**53


def string_literal(text: str) -> str:
    out = ['"']
    for byte in text.encode("utf-8"):
        if 0x20 <= byte <= 0x7E and byte not in (0x22, 0x5C):
            out.append(chr(byte))
        else:
            out.append("\\%03d" % byte)
    out.append('"')
    return "".join(out)


def _dump(value: Any, out: list[str], indent: int) -> None:
    if isinstance(value, bool):
        out.append("true" if value else "false")
    elif isinstance(value, int):
        if abs(value) > MAX_INT:
            raise ValueError(f"integer {value} is beyond what a Lua number holds exactly")
        out.append(str(value))
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError("numbers must be finite")
        out.append(repr(value))
    elif isinstance(value, str):
        out.append(string_literal(value))
    elif isinstance(value, dict):
        if not value:
            out.append("{}")
            return
        pad = "  " * (indent + 1)
        out.append("{\n")
        for key, item in value.items():
            if not isinstance(key, str):
                raise ValueError(f"table key {key!r} is not a string")
            out.append(f"{pad}[{string_literal(key)}] = ")
            _dump(item, out, indent + 1)
            out.append(",\n")
        out.append("  " * indent + "}")
    elif isinstance(value, (list, tuple)):
        if not value:
            out.append("{}")
            return
        pad = "  " * (indent + 1)
        out.append("{\n")
        for item in value:
            out.append(pad)
            _dump(item, out, indent + 1)
            out.append(",\n")
        out.append("  " * indent + "}")
    elif value is None:
        raise ValueError("null cannot be stored in a Lua table")
    else:
        raise ValueError(f"{type(value).__name__} cannot be written as Lua data")


def dumps(value: Any, header: str = "") -> str:
    out: list[str] = []
    for comment in header.splitlines():
        # comments hold only printable ASCII so they cannot break out of the comment
        safe = "".join(c if " " <= c <= "~" else "?" for c in comment)
        out.append(f"-- {safe}\n")
    out.append("return ")
    _dump(value, out, 0)
    out.append("\n")
    return "".join(out)
