"""The Lua filter's ``<spool>/mappings-status.json`` as Prometheus metrics of the sink.

The filter (``fluent-bit/lua/cloudtrail/filter.lua``, ``Filter:write_status``) rewrites that
file atomically (temporary file, rename) whenever its rules or the refused file change, and for
new drop counts at most every 10 s::

    {"state": "ok"|"error", "mappings": path, "rules": n, "loaded_at": epoch s (while rules are
     in use), "error": why the newest file was refused, "error_at": epoch s (state "error"),
     "started_at": epoch s, "dropped": {rule name: records its drop: rule took since started_at}}

:class:`MappingsStatus` is a prometheus-client collector: every ``collect()`` (every scrape of
``/metrics``) reads the file once, in the scraping thread; no thread, no cache. It yields (names
prefixed ``cloudtrail_sink_``):

===========================================  =======  ===========================================
mappings_status_readable                     gauge    1 when the file was read and is a status,
                                                      0 otherwise (missing, unreadable, not one)
mappings_status_age_seconds                  gauge    now - the file's mtime (when it exists)
mappings_rules                               gauge    rules in use (0: none, every record goes
                                                      to rejected/)
mappings_rules_loaded_timestamp_seconds      gauge    when the rules in use were loaded
mappings_reload_failed{reason}               gauge    1 while the newest file is refused
                                                      (``reason``: one of :data:`REASONS`), else
                                                      0 with ``reason="none"``
mapping_dropped_records_total{rule}          counter  records each drop: rule took since Fluent
                                                      Bit started (``_created``: ``started_at``)
===========================================  =======  ===========================================

The last four come only from a readable status. Label values are bounded: ``reason`` is
classified from the filter's own message prefixes, never copied; ``rule`` is a name the
compiler allows (``[A-Za-z0-9_.-]{1,128}``, or ``?`` for a drop without a rule name), at most
:data:`MAX_RULES` of them in name order, and every other count is summed into
``rule="(other)"``. No path, error text or payload from the file reaches a label or the log.

Whatever the file holds (any bytes, a FIFO, a symlink, gigabytes, deep nesting, wrong types,
NaN, huge numbers) ``collect()`` never raises and never blocks: the file is opened non-blocking
without following symlinks, only a regular file of at most :data:`MAX_BYTES` is read, and any
unexpected error counts as an unreadable status. A change of what is wrong with the file (or its
recovery) is logged once, naming the file and the field; a missing file is not logged (Fluent
Bit may not have started yet, or the sink runs without it).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import stat
import threading
from typing import Any, Callable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

log = logging.getLogger(__name__)

PREFIX = "cloudtrail_sink_"
STATUS_FILE = "mappings-status.json"  # filter.lua: M.STATUS_FILE
# A real status holds a few hundred bytes per rule name; this is thousands of rules.
MAX_BYTES = 1 << 20
MAX_RULES = 50
OTHER_RULE = "(other)"
_RULE_NAME = re.compile(r"\A(?:[A-Za-z0-9_.-]{1,128}|\?)\Z")  # compiler.NAME_RE, filter's "?"

REASONS = ("unreadable", "syntax", "evaluation", "format", "refused", "other")


class BadStatus(Exception):
    """The file is not a status the filter writes; the message names what is wrong."""


def reason_of(error: Any) -> str:
    """The bounded reason label for the filter's ``error`` text: its message forms (filter.lua:
    ``load_mapper``, ``parse_mappings``, ``build_mapper``), told apart by plain string tests
    (no regular expression can backtrack over a hostile megabyte)."""
    if not isinstance(error, str):
        return "other"
    if error.startswith("cannot load mappings: "):  # the file could not be read
        return "unreadable"
    if error.startswith("cannot load mappings "):  # load() refused the text
        return "syntax"
    if error.startswith("mappings "):
        if " failed to evaluate: " in error:  # it raised, called something or never finished
            return "evaluation"
        if error.endswith(" does not return a table") or error.endswith(", expected 1"):
            return "format"
        if " rejected by the mapping engine: " in error:  # e.g. an older compiler's file
            return "refused"
    return "other"


def read_status(path: str) -> tuple[dict | None, float | None]:
    """``(status, mtime)``: the parsed object, or ``(None, None)`` when the file is missing.

    Raises :class:`BadStatus` for anything else that is not a readable, bounded JSON object.
    """
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        return None, None
    except OSError as exc:
        raise BadStatus(f"cannot be opened: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise BadStatus("is not a regular file")
        if st.st_size > MAX_BYTES:
            raise BadStatus(f"is larger than {MAX_BYTES} bytes")
        chunks, size = [], 0
        while size <= MAX_BYTES:  # the size may grow after fstat
            chunk = os.read(fd, MAX_BYTES + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except OSError as exc:
        raise BadStatus(f"cannot be read: {exc.strerror}") from None
    finally:
        os.close(fd)
    if size > MAX_BYTES:
        raise BadStatus(f"is larger than {MAX_BYTES} bytes")
    try:
        value = json.loads(b"".join(chunks))
    except RecursionError:
        raise BadStatus("is not JSON: nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, too many digits
        text = exc.msg if isinstance(exc, json.JSONDecodeError) else type(exc).__name__
        raise BadStatus(f"is not JSON: {text}") from None
    if not isinstance(value, dict):
        raise BadStatus("is not a JSON object")
    return value, st.st_mtime


def _number(status: dict, field: str, required: bool = False) -> float | None:
    value = status.get(field)
    if value is None and not required:
        return None
    return _count(value, f"field {field!r}")


def _count(value: Any, where: str) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            number = float(value)
        except OverflowError:
            number = math.inf
        if math.isfinite(number) and number >= 0:
            return number
    raise BadStatus(f"{where} is not a finite number >= 0")


def dropped_by_label(dropped: Any) -> dict[str, float]:
    """``dropped`` of the status as ``{rule label: count}``, at most MAX_RULES + 1 labels."""
    if dropped is None:
        return {}
    if not isinstance(dropped, dict):
        raise BadStatus("field 'dropped' is not an object")
    named: dict[str, float] = {}
    other, others = 0.0, False
    for name, value in dropped.items():
        count = _count(value, "a count in field 'dropped'")
        if _RULE_NAME.match(name):
            named[name] = count
        else:
            other, others = other + count, True
    names = sorted(named)
    for name in names[MAX_RULES:]:
        other, others = other + named.pop(name), True
    if others:
        named[OTHER_RULE] = other
    return named


class MappingsStatus:
    """Collector of the metrics above for the status file at ``path``; ``clock`` is wall time."""

    def __init__(self, path: str, clock: Callable[[], float]):
        self.path, self.clock = path, clock
        self._lock = threading.Lock()
        self._problem: str | None = None

    def describe(self) -> Iterator:
        return iter(self._families(None, None))

    def collect(self) -> Iterator:
        mtime = None
        try:
            status, mtime = read_status(self.path)
            families, problem = self._families(status, mtime), None
        except BadStatus as exc:
            problem = str(exc)
        except Exception as exc:  # noqa: BLE001 - a scrape must never fail for this file
            problem = f"cannot be used ({type(exc).__name__})"
        if problem is not None:
            if mtime is None:
                try:
                    mtime = os.lstat(self.path).st_mtime
                except (OSError, ValueError):
                    pass
            families = self._families(None, mtime)
        self._note(problem)
        return iter(families)

    def _note(self, problem: str | None) -> None:
        with self._lock:
            if problem == self._problem:
                return
            before, self._problem = self._problem, problem
        if problem is not None:
            log.warning("mappings status %s: %s; only mappings_status_readable 0 (and its age) "
                        "are exported until it is fixed", self.path, problem)
        elif before is not None:
            log.info("mappings status %s: readable again", self.path)

    def _families(self, status: dict | None, mtime: float | None) -> list:
        readable = GaugeMetricFamily(
            PREFIX + "mappings_status_readable",
            "1 when Fluent Bit's mappings-status.json was read and is a status, else 0")
        age = GaugeMetricFamily(PREFIX + "mappings_status_age_seconds",
                                "Seconds since Fluent Bit last wrote mappings-status.json")
        rules = GaugeMetricFamily(PREFIX + "mappings_rules",
                                  "Mapping rules Fluent Bit uses (0: none, records are rejected)")
        loaded = GaugeMetricFamily(PREFIX + "mappings_rules_loaded_timestamp_seconds",
                                   "When the mapping rules in use were loaded")
        failed = GaugeMetricFamily(PREFIX + "mappings_reload_failed",
                                   "1 while Fluent Bit refuses the newest mappings file",
                                   labels=["reason"])
        dropped = CounterMetricFamily(PREFIX + "mapping_dropped_records",
                                      "Records a drop: rule took since Fluent Bit started",
                                      labels=["rule"])
        out = [readable, age, rules, loaded, failed, dropped]
        if mtime is not None:
            age.add_metric([], max(0.0, self.clock() - mtime))
        if status is None:
            readable.add_metric([], 0)
            return out
        state = status.get("state")
        if state not in ("ok", "error"):
            raise BadStatus("field 'state' is neither \"ok\" nor \"error\"")
        n_rules = _number(status, "rules", required=True)
        loaded_at = _number(status, "loaded_at")
        started_at = _number(status, "started_at")
        _number(status, "error_at")
        by_rule = dropped_by_label(status.get("dropped"))
        readable.add_metric([], 1)
        rules.add_metric([], n_rules)
        if loaded_at is not None:
            loaded.add_metric([], loaded_at)
        if state == "error":
            failed.add_metric([reason_of(status.get("error"))], 1)
        else:
            failed.add_metric(["none"], 0)
        for name, count in by_rule.items():
            dropped.add_metric([name], count, created=started_at)
        return out
