"""A stand-in for one Fluent Bit process running the shipped Lua filter, to be SIGKILLed.

    python lua_crash_driver.py SCRIPT ENV_JSON

Reads a msgpack stream of ``[seq, tag, timestamp, record]`` from stdin and calls the filter
through :class:`cloudtrail_sink.luaharness.FilterHarness` (the faithful ``filter_lua``), one
record at a time. After each call returns it writes one line to stdout and flushes it:

    <seq> ok <code>         the call returned (Fluent Bit now considers the record filtered)
    <seq> raised <message>  the filter raised into Fluent Bit (a bug: the batch would pass
                            through unmodified)
    <seq> invalid <message> the filter returned a table Fluent Bit refuses
    <seq> harness <message> the record cannot be given to Lua the way Fluent Bit would

The test kills this process with SIGKILL at random moments: no ``lua_close``, no flush of
buffered ``io`` files: exactly what a crashed Fluent Bit leaves behind.
"""

from __future__ import annotations

import json
import sys

import msgpack


def main() -> int:
    from cloudtrail_sink import luaharness

    script, env = sys.argv[1], json.loads(sys.argv[2])
    harness = luaharness.FilterHarness(script, env=env)
    out = sys.stdout
    out.write("ready\n")
    out.flush()
    unpacker = msgpack.Unpacker(raw=False, strict_map_key=False)
    stdin = sys.stdin.buffer
    while True:
        chunk = stdin.read1(65536)
        if not chunk:
            break
        unpacker.feed(chunk)
        for seq, tag, ts, record in unpacker:
            try:
                code, _, _ = harness.call(tag, ts, record)
                line = f"{seq} ok {code}"
            except luaharness.FilterRaised as exc:
                line = f"{seq} raised {json.dumps(str(exc))}"
            except luaharness.InvalidReturn as exc:
                line = f"{seq} invalid {json.dumps(str(exc))}"
            except luaharness.HarnessError as exc:
                line = f"{seq} harness {json.dumps(str(exc))}"
            out.write(line + "\n")
            out.flush()
    # End of input: a clean shutdown (Fluent Bit's lua_close on exit).
    harness.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
