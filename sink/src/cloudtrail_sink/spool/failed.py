"""``failed/``: reading and trimming dead-letter files (the writer is ``deadletters.py``).

- :func:`failed_files` lists the regular ``.jsonl`` files, in sealing order.
- :func:`read_lines` gives ``(line number, text, object or None)`` per non-empty line; lines end
  at ``\\n`` only, and a line that is not a JSON object comes back with None (kept, reported).
- :func:`keep_only` rewrites a file with the given lines (tmp, fsync, rename), or removes it
  when none is left.
"""

from __future__ import annotations

import json
import os

from . import Layout, regular_files, write_new


def failed_files(lay: Layout) -> list[str]:
    return regular_files(lay.failed, ".jsonl")


def read_lines(path: str) -> list[tuple[int, str, dict | None]]:
    out = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            text = raw.decode("utf-8", "replace").rstrip("\n")
            if not text.strip():
                continue
            try:
                obj = json.loads(text)
            except (ValueError, RecursionError):
                obj = None
            out.append((lineno, text, obj if isinstance(obj, dict) else None))
    return out


def keep_only(lay: Layout, path: str, keep: list[str], writer: str) -> None:
    if not keep:
        os.unlink(path)
        return
    tmp = os.path.join(lay.tmp, f"{writer}-rewrite-{os.path.basename(path)}")
    write_new(tmp, "".join(line + "\n" for line in keep).encode("utf-8"))
    os.rename(tmp, path)
