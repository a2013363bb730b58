"""``rejected/``: the Lua filter's records no mapping rule took (``docs/spool.md``).

- :func:`rejected_files` lists the regular ``.rej`` files, in sealing order.
- :func:`read_entries` decodes one file into its ``{"tag", "time", "reason", "record"}`` maps,
  all or nothing (:class:`Unreadable` names the file and where it stopped).
- :func:`rewrite` replaces a file by one holding only the given entries (tmp, fsync, rename).
"""

from __future__ import annotations

import os

import msgpack

from . import Layout, open_segment, regular_files, write_new


class Unreadable(Exception):
    """A rejected file that cannot be opened or decoded to its end."""


def rejected_files(lay: Layout) -> list[str]:
    """Names in ``rejected/`` that are regular ``.rej`` files, in sealing order."""
    return regular_files(lay.rejected, ".rej")


def read_entries(path: str) -> list[dict]:
    """Every entry of one rejected file; raises ``Unreadable`` unless all of it decodes."""
    try:
        f = open_segment(path)
    except OSError as exc:
        raise Unreadable(f"{path}: cannot open: {exc}") from exc
    with f:
        data = f.read()
    unpacker = msgpack.Unpacker(raw=False, strict_map_key=False)
    unpacker.feed(data)
    entries = []
    end = 0  # offset just after the last complete entry
    try:
        for entry in unpacker:
            if not isinstance(entry, dict) or "record" not in entry:
                raise Unreadable(f"{path}: entry {len(entries) + 1} is not a rejected-record map")
            entries.append(entry)
            end = unpacker.tell()
    except (ValueError, msgpack.UnpackException) as exc:
        raise Unreadable(f"{path}: undecodable after {len(entries)} entries: {exc}") from exc
    if end != len(data):
        raise Unreadable(f"{path}: truncated after {len(entries)} entries "
                         f"(byte {end} of {len(data)})")
    return entries


def rewrite(lay: Layout, name: str, entries: list[dict]) -> None:
    """Replace rejected/<name> by a file holding only ``entries`` (tmp, fsync, rename)."""
    tmp = os.path.join(lay.tmp, f"rejected-rewrite-{os.getpid()}-{name}.tmp")
    packer = msgpack.Packer(use_bin_type=True)
    write_new(tmp, b"".join(packer.pack(entry) for entry in entries))
    os.replace(tmp, os.path.join(lay.rejected, name))


