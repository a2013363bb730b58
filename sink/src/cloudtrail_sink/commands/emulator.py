"""``cloudtrail-sink emulator``: run the local CloudTrail Data endpoint until SIGTERM/SIGINT.

    cloudtrail-sink emulator --listen 127.0.0.1:8000 --db FILE
        [--channel ARN[,EXTERNAL_ID]]... [--quota N] [--faults JSON] [--seed N]
        [--access-key K --secret-key S] [--workers N] [--admin-token T] [--allow-host NAME]...
        [--max-connections N] [--connection-timeout S] [--query-timeout S]

Without ``--channel`` every well-formed channel ARN is accepted (said in the startup log).
Exit status: 0 after a clean stop on a signal, 2 for bad options, 1 when the address or the
database cannot be used.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import signal
import sqlite3
import sys
import threading

DEFAULT_LISTEN = "127.0.0.1:8000"
DEFAULT_QUERY_TIMEOUT = 30.0
QUERY_TIMEOUT_ENV = "CLOUDTRAIL_EMULATOR_QUERY_TIMEOUT"


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "emulator", help="run a local, strict CloudTrail Data (PutAuditEvents) endpoint",
        description="Serve PutAuditEvents like AWS CloudTrail Data does, storing accepted "
                    "events in SQLite; inspect them at http://HOST:PORT/ .")
    parser.add_argument("--listen", default=DEFAULT_LISTEN, metavar="HOST:PORT",
                        help=f"address to bind (default {DEFAULT_LISTEN}; use 0.0.0.0:8000 "
                             "inside a container)")
    parser.add_argument("--db", required=True, metavar="FILE",
                        help="SQLite file holding accepted events (created if missing)")
    parser.add_argument("--channel", action="append", default=[], metavar="ARN[,EXTERNAL_ID]",
                        help="a channel that exists, optionally with the external id its "
                             "resource policy requires; repeatable. None given: any "
                             "well-formed channel ARN is accepted")
    parser.add_argument("--quota", type=float, default=100.0, metavar="N",
                        help="PutAuditEvents calls per second per account and region "
                             "(default 100, the service's; 0 disables)")
    parser.add_argument("--faults", default=None, metavar="JSON",
                        help='fault injection, e.g. \'{"throttle_rate": 0.1, "latency_ms": 50}\' '
                             "(fields: throttle_rate, error_5xx_rate, event_throttling_rate, "
                             "event_internal_failure_rate, latency_ms)")
    parser.add_argument("--seed", type=int, default=0, help="seed for fault injection (default 0)")
    parser.add_argument("--access-key", default=None, metavar="K",
                        help="verify SigV4 signatures against this access key id (with "
                             "--secret-key); without it only the signature's form is checked")
    parser.add_argument("--secret-key", default=None, metavar="S",
                        help="secret access key for --access-key (prefer env "
                             "CLOUDTRAIL_EMULATOR_SECRET_KEY: command lines are visible)")
    parser.add_argument("--workers", type=int, default=None, metavar="N",
                        help="processes checking events (default: one per CPU beyond the "
                             "first, at most 4, so none on 2 CPUs; 0 checks in the serving "
                             "threads)")
    parser.add_argument("--admin-token", default=None, metavar="T",
                        help="require 'Authorization: Bearer T' to change faults (PUT "
                             "/_emulator/faults); prefer env CLOUDTRAIL_EMULATOR_ADMIN_TOKEN")
    parser.add_argument("--allow-host", action="append", default=None, metavar="NAME",
                        help="a Host name the page and /_emulator/* answer to (against DNS "
                             "rebinding); repeatable; default: localhost, 127.0.0.1, ::1 and "
                             "the --listen host; '*' allows any")
    parser.add_argument("--max-connections", type=int, default=128, metavar="N",
                        help="connections served at once (default 128); more get a 503")
    parser.add_argument("--connection-timeout", type=float, default=30.0, metavar="S",
                        help="seconds a connection may wait for the client between reads, "
                             "idle keep-alive included (default 30)")
    parser.add_argument("--query-timeout", type=float, default=None, metavar="S",
                        help="seconds a CloudTrail Lake query may run before it ends TIMED_OUT "
                             f"(default {DEFAULT_QUERY_TIMEOUT:g}; or env {QUERY_TIMEOUT_ENV})")
    parser.add_argument("--log-level", default="INFO",
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    parser.set_defaults(func=run)


def parse_listen(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise ValueError(f"--listen {text!r} must be HOST:PORT")
    host = host.strip("[]")
    try:
        number = int(port)
    except ValueError:
        raise ValueError(f"--listen {text!r}: port must be a number") from None
    if not 0 <= number <= 65535:
        raise ValueError(f"--listen {text!r}: port must be 0-65535")
    return host, number


def parse_channels(values: list[str]) -> dict[str, str | None] | None:
    if not values:
        return None
    channels: dict[str, str | None] = {}
    for value in values:
        arn, sep, external_id = value.partition(",")
        channels[arn.strip()] = external_id.strip() if sep else None
    return channels


def query_timeout(given: float | None, environ) -> float:
    """--query-timeout, else the environment's CLOUDTRAIL_EMULATOR_QUERY_TIMEOUT, else 30 s;
    a finite number of seconds above 0."""
    source, value = "--query-timeout", given
    if given is None:
        text = environ.get(QUERY_TIMEOUT_ENV, "").strip()
        if not text:
            return DEFAULT_QUERY_TIMEOUT
        source = QUERY_TIMEOUT_ENV
        try:
            value = float(text)
        except ValueError:
            raise ValueError(f"{source} must be a number of seconds, not {text[:50]!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{source} must be a number of seconds above 0, not {value!r}")
    return value


def _parse_faults(text: str, faults_type):
    try:
        return faults_type.from_dict(json.loads(text))
    except ValueError as exc:
        raise ValueError(f"--faults: {exc}") from None


def run(args: argparse.Namespace) -> int:
    import os

    from ..emulator import Emulator, Faults

    secret = args.secret_key or os.environ.get("CLOUDTRAIL_EMULATOR_SECRET_KEY")
    try:
        host, port = parse_listen(args.listen)
        if (args.access_key is None) != (secret is None):
            raise ValueError("--access-key and --secret-key go together")
        faults = _parse_faults(args.faults, Faults) if args.faults else Faults()
        emulator = Emulator(args.db, host=host, port=port,
                            channels=parse_channels(args.channel),
                            quota_per_second=args.quota, faults=faults, seed=args.seed,
                            workers=args.workers,
                            admin_token=args.admin_token
                            or os.environ.get("CLOUDTRAIL_EMULATOR_ADMIN_TOKEN"),
                            allowed_hosts=args.allow_host,
                            max_connections=args.max_connections,
                            connection_timeout=args.connection_timeout,
                            query_timeout=query_timeout(args.query_timeout, os.environ),
                            credentials=(args.access_key, secret) if args.access_key else None)
    except (ValueError, TypeError) as exc:
        print(f"cloudtrail-sink emulator: {exc}", file=sys.stderr)
        return 2

    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    stop = threading.Event()

    def on_signal(signum, frame):
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        try:
            emulator.start()
        except sqlite3.Error as exc:
            print(f"cloudtrail-sink emulator: cannot use database {args.db}: {exc}",
                  file=sys.stderr)
            return 1
        except OSError as exc:
            print(f"cloudtrail-sink emulator: cannot listen on {args.listen}: {exc}",
                  file=sys.stderr)
            return 1
        print(f"emulator ready at {emulator.url}", file=sys.stderr, flush=True)
        while not stop.wait(0.5):
            pass
        emulator.stop()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0
