"""TEST-ONLY stand-in for the Fluent Bit container (no Fluent Bit image or binary exists here).

Runs in the sink image. It does what fluent-bit.yaml's syslog path does, with the real Lua:
a TCP listener on 127.0.0.1:$STANDIN_SYSLOG_PORT takes newline-framed syslog lines (the syslog
input with the syslog-raw parser), splits each with the RFC 5424 / RFC 3164 regexes of
parsers.yaml (the `parser` filter, reserve_data on), and hands it as tag `syslog` to the real
`cloudtrail.lua` through cloudtrail_sink.luaharness (the filter_lua-faithful harness), which maps
it with the file $CLOUDTRAIL_MAPPINGS names and writes the spool. Once a second it sends the
`cloudtrail.tick` record (the in_dummy input), which seals segments by age and reloads changed
mappings. SIGTERM ends it (segments still open stay in tmp/, as after a crash).
What it does NOT stand in for: Fluent Bit's C engine (buffering, backpressure, its TCP server).
"""

from __future__ import annotations

import os
import re
import selectors
import signal
import socket
import sys
import time

import yaml

from cloudtrail_sink.luaharness import ENTRY_SCRIPT, FilterHarness

PARSERS = os.environ.get("STANDIN_PARSERS", "/standin/parsers.yaml")


def syslog_parsers() -> list[re.Pattern]:
    with open(PARSERS, encoding="utf-8") as fh:
        parsers = {p["name"]: p for p in yaml.safe_load(fh)["parsers"]}
    return [re.compile(parsers[name]["regex"].replace("(?<", "(?P<"))
            for name in ("syslog-rfc5424", "syslog-rfc3164")]


def parse(line: str, patterns: list[re.Pattern]) -> dict:
    for pattern in patterns:
        match = pattern.match(line)
        if match:
            return {k: v for k, v in match.groupdict().items() if v is not None}
    return {"message": line}


def main() -> int:
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    patterns = syslog_parsers()
    harness = FilterHarness(ENTRY_SCRIPT, env=dict(os.environ))
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", int(os.environ["STANDIN_SYSLOG_PORT"])))
    server.listen()
    sel = selectors.DefaultSelector()
    sel.register(server, selectors.EVENT_READ)
    buffers: dict[socket.socket, bytes] = {}
    next_tick = time.monotonic() + 1.0
    print("stand-in listening", flush=True)
    while not stopping:
        for key, _ in sel.select(timeout=max(0.0, next_tick - time.monotonic())):
            if key.fileobj is server:
                conn, _ = server.accept()
                sel.register(conn, selectors.EVENT_READ)
                buffers[conn] = b""
                continue
            conn = key.fileobj
            chunk = conn.recv(65536)
            data = buffers[conn] + chunk
            if chunk:
                *lines, buffers[conn] = data.split(b"\n")
            else:  # closed: a last line without its newline still counts
                sel.unregister(conn)
                conn.close()
                del buffers[conn]
                lines = [data]
            for line in lines:
                if line:
                    harness.call("syslog", time.time(), parse(line.decode(), patterns))
        if time.monotonic() >= next_tick:
            next_tick += 1.0
            harness.call("cloudtrail.tick", time.time(), {"tick": 1})
    return 0


if __name__ == "__main__":
    sys.exit(main())
