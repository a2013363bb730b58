"""A local, strict CloudTrail Data endpoint (``PutAuditEvents``) for users and tests.

``Emulator`` serves the wire format botocore speaks, checks requests and events the way the
service does (the strict reading where public sources leave a choice open, see
``docs/emulator.md``), stores accepted events in SQLite wrapped like CloudTrail Lake (and what it
refused), and exposes them at ``/_emulator/events`` and in a console page at ``/``. ``Faults``
injects throttling, 5xx answers, per-event failures and latency, deterministically for a given
seed. The ``lake`` package answers CloudTrail Lake's query API (``StartQuery`` ...) over the
stored events.
"""

from .faults import Faults

__all__ = ["Emulator", "Faults"]


def __getattr__(name: str):
    # Lazy, so that checker worker processes import neither the server nor botocore.
    if name == "Emulator":
        from .server import Emulator

        return Emulator
    raise AttributeError(name)
