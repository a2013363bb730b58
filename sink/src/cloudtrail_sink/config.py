"""Every option of ``cloudtrail-sink run``, in one place.

:class:`SinkConfig` is the single source of truth: each field documents its flag, its environment
variable and its default; ``commands/run.py`` builds the argument parser from it and
``delivery/`` consumes it. Validation (:meth:`SinkConfig.validate`) raises :class:`ConfigError`
with a message naming the option; the CLI turns that into exit code 2.
"""

from __future__ import annotations

import dataclasses
import os
import re

# As the service (and the emulator) checks it: a channel id that is not a UUID is refused with
# InvalidChannelARN on every call, which would pause delivery forever; refused at start instead.
ARN_RE = re.compile(r"\Aarn:(aws(?:-[a-z]+)*):cloudtrail:([a-z]{2}(?:-[a-z]+)+-\d):(\d{12}):channel/"
                    r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}\Z")
ARN_FORM = ("arn:aws:cloudtrail:REGION:ACCOUNT:channel/UUID, e.g. arn:aws:cloudtrail:us-east-1:"
            "123456789012:channel/0b9a1c0e-5d33-4a5f-9f55-3c7a1a2b3c4d")
EXTERNAL_ID_RE = re.compile(r"\A[\w+=,.@:/-]{2,1224}\Z")
ROLE_ARN_RE = re.compile(r"\Aarn:aws[a-zA-Z-]*:iam::\d{12}:role/.+\Z")

# 1,000,000 bytes of request body is the service cap; stay a little under it.
DEFAULT_MAX_REQUEST_BYTES = 999_000


class ConfigError(ValueError):
    """A bad option: the message names it."""


def opt(default, flag: str, env: tuple[str, ...] = (), help: str = "", **argparse_kw):
    return dataclasses.field(default=default, metadata={"flag": flag, "env": env, "help": help,
                                                        "argparse": argparse_kw})


@dataclasses.dataclass
class SinkConfig:
    spool_dir: str | None = opt(None, "--spool-dir", ("CLOUDTRAIL_SPOOL_DIR",),
                                "spool root (folders tmp/ ready/ failed/ rejected/ quarantine/)")
    channel_arn: str | None = opt(None, "--channel-arn",
                                  ("CLOUDTRAIL_CHANNEL_ARN", "AWS_CLOUDTRAIL_DATA_CHANNELARN"),
                                  "ARN of the CloudTrail Lake channel "
                                  "(arn:aws:cloudtrail:REGION:ACCOUNT:channel/UUID)")
    external_id: str | None = opt(None, "--external-id", ("CLOUDTRAIL_EXTERNAL_ID",),
                                  "externalId sent with PutAuditEvents, when the channel's "
                                  "resource policy requires one")
    region: str | None = opt(None, "--region", ("AWS_REGION", "AWS_DEFAULT_REGION"),
                             "AWS region of the endpoint (default: the channel ARN's region)")
    endpoint_url: str | None = opt(None, "--endpoint-url", (),
                                   "endpoint URL (boto3 also reads AWS_ENDPOINT_URL_CLOUDTRAIL_DATA "
                                   "and AWS_ENDPOINT_URL itself)")
    role_arn: str | None = opt(None, "--role-arn", ("CLOUDTRAIL_ROLE_ARN",),
                               "IAM role to assume for PutAuditEvents (credentials refreshed "
                               "before they expire, not per request)")
    listen: str = opt("127.0.0.1:9464", "--listen", ("CLOUDTRAIL_SINK_LISTEN",),
                      "HOST:PORT of the HTTP server for /metrics /healthz /readyz "
                      "(empty: no server; port 0: any free port)")
    max_in_flight: int = opt(4, "--max-in-flight", ("CLOUDTRAIL_SINK_MAX_IN_FLIGHT",),
                             "PutAuditEvents requests in flight at once, at most; one more is "
                             "sent only while the others have waited 10 ms for their answer",
                             type=int)
    linger_ms: int = opt(200, "--linger-ms", ("CLOUDTRAIL_SINK_LINGER_MS",),
                         "send a batch that is not full after this many milliseconds, on "
                         "average (with pacing on, each batch draws 0.5x-1.5x of it, at most 100 ms "
                         "either way)", type=int)
    max_pacing_delay_ms: int = opt(10_000, "--max-pacing-delay-ms",
                                   ("CLOUDTRAIL_SINK_MAX_PACING_DELAY_MS",),
                                   "most a batch that is not full waits for pacing while the "
                                   "service throttles (0: no pacing); see docs/sink.md", type=int)
    max_calls_per_second: float = opt(0.0, "--max-calls-per-second",
                                      ("CLOUDTRAIL_SINK_MAX_CALLS_PER_SECOND",),
                                      "ceiling on this sink's PutAuditEvents calls per second, "
                                      "full batches included (0: none); for a shared account "
                                      "set it to the quota / number of nodes", type=float)
    max_batch_events: int = opt(100, "--max-batch-events", ("CLOUDTRAIL_SINK_MAX_BATCH_EVENTS",),
                                "events per request (1-100, the service's limit)", type=int)
    max_request_bytes: int = opt(DEFAULT_MAX_REQUEST_BYTES, "--max-request-bytes",
                                 ("CLOUDTRAIL_SINK_MAX_REQUEST_BYTES",),
                                 "bytes of serialized request body per request "
                                 "(at most 1,000,000, the service's limit)", type=int)
    retry_mode: str = opt("adaptive", "--retry-mode", ("CLOUDTRAIL_SINK_RETRY_MODE",),
                          "botocore retry mode for request-level errors (adaptive: client-side "
                          "rate limiting shared by all requests of this process)",
                          choices=("adaptive", "standard", "legacy"))
    max_attempts: int = opt(1, "--max-attempts", ("CLOUDTRAIL_SINK_MAX_ATTEMPTS",),
                            "botocore attempts per call (first one included) before the sink's "
                            "own unlimited retry loop takes over; 1: the sink retries, so a "
                            "throttled batch waits for pacing and grows instead of being re-sent "
                            "as it was", type=int)
    poll: bool = opt(False, "--poll", ("CLOUDTRAIL_SINK_POLL",),
                     "poll ready/ instead of using inotify (network filesystems)",
                     action="store_true")
    poll_seconds: float = opt(1.0, "--poll-seconds", ("CLOUDTRAIL_SINK_POLL_SECONDS",),
                              "interval of the ready/ scan in --poll mode", type=float)
    rescan_seconds: float = opt(30.0, "--rescan-seconds", ("CLOUDTRAIL_SINK_RESCAN_SECONDS",),
                                "full scan of ready/ as a backstop for lost inotify events",
                                type=float)
    stale_tmp_seconds: float = opt(300.0, "--stale-tmp-seconds",
                                   ("CLOUDTRAIL_SINK_STALE_TMP_SECONDS",),
                                   "publish tmp/*.open files older than this (writer gone)",
                                   type=float)
    grace_seconds: float = opt(10.0, "--grace-seconds", ("CLOUDTRAIL_SINK_GRACE_SECONDS",),
                               "on SIGTERM/SIGINT, time allowed for in-flight requests",
                               type=float)
    max_backoff_seconds: float = opt(20.0, "--max-backoff-seconds",
                                     ("CLOUDTRAIL_SINK_MAX_BACKOFF_SECONDS",),
                                     "cap of the full-jitter backoff for retries", type=float)
    max_pause_seconds: float = opt(300.0, "--max-pause-seconds",
                                   ("CLOUDTRAIL_SINK_MAX_PAUSE_SECONDS",),
                                   "cap of the pause after a configuration or permission error",
                                   type=float)
    max_pending_events: int = opt(0, "--max-pending-events", ("CLOUDTRAIL_SINK_MAX_PENDING_EVENTS",),
                                  "events read but not yet finalized, the memory bound "
                                  "(0: 4 x max-in-flight x max-batch-events, at least 1000)",
                                  type=int)
    stuck_seconds: float = opt(600.0, "--stuck-seconds", ("CLOUDTRAIL_SINK_STUCK_SECONDS",),
                               "/healthz fails when events are pending and none was finalized "
                               "for this long while delivery is not paused", type=float)
    dry_run: bool = opt(False, "--dry-run", (), "print the requests that would be sent (JSON lines "
                        "on stdout) for what is in ready/ now, then exit; deletes nothing",
                        action="store_true")
    drain: bool = opt(False, "--drain", ("CLOUDTRAIL_SINK_DRAIN",),
                      "exit 0 once ready/ is empty and nothing is in flight", action="store_true")
    drain_timeout: float = opt(0.0, "--drain-timeout", ("CLOUDTRAIL_SINK_DRAIN_TIMEOUT",),
                               "with --drain (or --dry-run): give up after this many seconds "
                               "when not drained yet (delivery paused, endless retries) and exit "
                               "4; unsettled segments stay (0: wait without limit)", type=float)
    log_level: str = opt("info", "--log-level", ("CLOUDTRAIL_SINK_LOG_LEVEL",),
                         "debug, info, warning or error", choices=("debug", "info", "warning", "error"))
    log_format: str = opt("json", "--log-format", ("CLOUDTRAIL_SINK_LOG_FORMAT",),
                          "json (one object per line) or text", choices=("json", "text"))

    @property
    def account_id(self) -> str | None:
        m = ARN_RE.match(self.channel_arn or "")
        return m.group(3) if m else None

    @property
    def arn_region(self) -> str | None:
        m = ARN_RE.match(self.channel_arn or "")
        return m.group(2) if m else None

    @property
    def effective_region(self) -> str | None:
        return self.region or self.arn_region

    @property
    def pending_limit(self) -> int:
        if self.max_pending_events > 0:
            return self.max_pending_events
        return max(1000, 4 * self.max_in_flight * self.max_batch_events)

    def validate(self) -> "SinkConfig":
        if not self.spool_dir:
            raise ConfigError("--spool-dir (CLOUDTRAIL_SPOOL_DIR) is required")
        if not self.dry_run or self.channel_arn:
            if not self.channel_arn:
                raise ConfigError("--channel-arn (CLOUDTRAIL_CHANNEL_ARN) is required")
            if not ARN_RE.match(self.channel_arn):
                raise ConfigError(f"--channel-arn {self.channel_arn!r} is not a CloudTrail channel "
                                  f"ARN; expected {ARN_FORM}")
        if self.external_id is not None and not EXTERNAL_ID_RE.match(self.external_id):
            raise ConfigError("--external-id must be 2-1224 characters of [A-Za-z0-9_+=,.@:/-]")
        if self.role_arn and not ROLE_ARN_RE.match(self.role_arn):
            raise ConfigError(f"--role-arn {self.role_arn!r} is not an IAM role ARN")
        if not 1 <= self.max_batch_events <= 100:
            raise ConfigError("--max-batch-events must be between 1 and 100")
        if not 1024 <= self.max_request_bytes <= 1_000_000:
            raise ConfigError("--max-request-bytes must be between 1024 and 1000000")
        if self.max_in_flight < 1:
            raise ConfigError("--max-in-flight must be at least 1")
        if self.linger_ms < 0:
            raise ConfigError("--linger-ms must not be negative")
        if self.max_pacing_delay_ms < 0:
            raise ConfigError("--max-pacing-delay-ms must not be negative (0: no pacing)")
        if not 0 <= self.max_calls_per_second <= 1000:  # also refuses NaN
            raise ConfigError("--max-calls-per-second must be between 0 (no ceiling) and 1000")
        if self.max_attempts < 1:
            raise ConfigError("--max-attempts must be at least 1")
        for name in ("poll_seconds", "rescan_seconds", "grace_seconds", "max_backoff_seconds",
                     "max_pause_seconds", "stuck_seconds", "stale_tmp_seconds"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be positive")
        if self.drain_timeout < 0:
            raise ConfigError("--drain-timeout must not be negative (0: wait without limit)")
        if self.listen:
            parse_listen(self.listen)
        return self


def parse_listen(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ConfigError(f"--listen {value!r} must be HOST:PORT")
    return host.strip("[]") or "127.0.0.1", int(port)


def env_default(field: dataclasses.Field, environ=os.environ):
    """The value of the first environment variable set for ``field``, converted, else None."""
    for name in field.metadata.get("env", ()):
        raw = environ.get(name)
        if raw is None or raw == "":
            continue
        if field.type in ("bool", bool):
            return raw.strip().lower() in ("1", "true", "yes", "on")
        conv = field.metadata["argparse"].get("type", str)
        try:
            return conv(raw)
        except ValueError:
            raise ConfigError(f"environment variable {name}={raw!r} is not a valid "
                              f"{conv.__name__}") from None
    return None
