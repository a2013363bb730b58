"""Any decoded msgpack value made JSON-safe, so writing it down can never fail on its content.

:func:`jsonable` returns ``(value, lossy)``: a copy that ``json.dumps`` always accepts, and
whether it differs from the original in a way JSON cannot undo:

- map keys that are not strings (integers, floats, booleans, None, binary, arrays) become
  strings: ``str()`` of scalars, binary decoded as UTF-8 with replacement characters, anything
  else its JSON text or ``repr`` (lossy unless the key was an int, float, bool or None: those are
  what ``json.dumps`` itself does);
- binary values become their UTF-8 text with replacement characters (lossy);
- ``float`` NaN and infinities become ``null`` (lossy), as the sink sends them;
- whatever is nested deeper than ``max_depth`` becomes the string ``"<nested deeper than N
  levels>"`` (lossy);
- any other leaf that is not a JSON type becomes its ``repr`` (lossy).

It walks with an explicit stack, never recursion, so no depth raises ``RecursionError``.
"""

from __future__ import annotations

import math
from typing import Any

MAX_DEPTH = 200


def _key(key: Any) -> tuple[str, bool]:
    if key.__class__ is str:
        return key, False
    if key is None or isinstance(key, (bool, int, float)):
        # What json.dumps writes for these keys itself: nothing lost that JSON could keep.
        return ("null" if key is None else "true" if key is True else "false" if key is False
                else str(key)), False
    if isinstance(key, (bytes, bytearray)):
        return bytes(key).decode("utf-8", "replace"), True
    return repr(key), True


def _leaf(value: Any) -> tuple[Any, bool]:
    if value is None or value.__class__ in (str, bool, int):
        return value, False
    if isinstance(value, float):
        return (value, False) if math.isfinite(value) else (None, True)
    if isinstance(value, str):
        return str(value), False
    if isinstance(value, int):
        return int(value), False
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8", "replace"), True
    return repr(value), True


def jsonable(value: Any, max_depth: int = MAX_DEPTH) -> tuple[Any, bool]:
    """``(copy json.dumps accepts, lossy)`` for any decoded value (see module docstring)."""
    lossy = False
    root: list = [None]
    # (source, depth, container to fill, key or index in it)
    stack: list[tuple[Any, int, Any, Any]] = [(value, 1, root, 0)]
    while stack:
        src, depth, parent, slot = stack.pop()
        if isinstance(src, (dict, list, tuple)):
            if depth > max_depth:
                parent[slot] = f"<nested deeper than {max_depth} levels>"
                lossy = True
                continue
            if isinstance(src, dict):
                out: Any = {}
                for k, v in src.items():
                    key, changed = _key(k)
                    lossy = lossy or changed or key in out
                    out[key] = None
                    stack.append((v, depth + 1, out, key))
            else:
                out = [None] * len(src)
                for i, v in enumerate(src):
                    stack.append((v, depth + 1, out, i))
            parent[slot] = out
        else:
            leaf, changed = _leaf(src)
            lossy = lossy or changed
            parent[slot] = leaf
    return root[0], lossy
