"""``cloudtrail-sink run``: deliver the spool into PutAuditEvents until stopped (or drained).

Every flag comes from :class:`cloudtrail_sink.config.SinkConfig` (flag > environment variable >
default). Exit codes: 0 clean stop or drained, 2 usage or configuration error, 3 the spool's lock
is held by another sink, 4 a drain that did not finish (``--drain-timeout`` passed, or segments
left that could not be read or deleted).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

from ..config import ConfigError, SinkConfig, env_default
from . import SubParsers

EXIT_CONFIG = 2
EXIT_LOCKED = 3


def register(subparsers: SubParsers) -> None:
    parser = subparsers.add_parser(
        "run", help="deliver spooled events into CloudTrail Lake",
        description="Watch SPOOL/ready and deliver its events with PutAuditEvents, at least once.",
        epilog="Credentials come from the standard AWS chain (environment, profile, IRSA web "
               "identity, EKS Pod Identity, instance role).")
    for field in dataclasses.fields(SinkConfig):
        meta = field.metadata
        env = meta.get("env", ())
        help_text = meta["help"]
        if env:
            help_text += f" [{', '.join(env)}]"
        if field.default not in (None, False):
            help_text += f" (default: {field.default})"
        kw = dict(meta["argparse"])
        parser.add_argument(meta["flag"], dest=field.name, default=None, help=help_text, **kw)
    parser.set_defaults(func=cmd_run)


def config_from_args(args: argparse.Namespace, environ=os.environ) -> SinkConfig:
    values = {}
    for field in dataclasses.fields(SinkConfig):
        value = getattr(args, field.name, None)
        if value is None or value is False:
            env_value = env_default(field, environ)
            if env_value is not None:
                value = env_value
        if value is None:
            continue
        values[field.name] = value
    return SinkConfig(**values).validate()


def cmd_run(args: argparse.Namespace) -> int:
    from .. import logs

    try:
        cfg = config_from_args(args)
    except ConfigError as exc:
        print(f"cloudtrail-sink run: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    logs.setup(cfg.log_level, cfg.log_format)

    from ..delivery.coordinator import Runner
    from ..spool.lock import LockHeld

    try:
        runner = Runner(cfg)
    except ConfigError as exc:
        print(f"cloudtrail-sink run: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except OSError as exc:
        print(f"cloudtrail-sink run: spool {cfg.spool_dir}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_CONFIG
    except Exception as exc:  # e.g. botocore refusing the region or role settings
        print(f"cloudtrail-sink run: cannot set up the client: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        return runner.run()
    except ConfigError as exc:
        print(f"cloudtrail-sink run: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except LockHeld as exc:
        print(f"cloudtrail-sink run: {exc}", file=sys.stderr)
        return EXIT_LOCKED
    except OSError as exc:
        if exc.errno is not None and exc.filename:
            print(f"cloudtrail-sink run: {exc.filename}: {exc.strerror}", file=sys.stderr)
            return EXIT_CONFIG
        raise
