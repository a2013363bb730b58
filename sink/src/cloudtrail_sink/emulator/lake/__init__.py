"""CloudTrail Lake queries over the emulator's stored events, through the real control-plane API.

Modules, one job each:

- ``catalog``: which event data stores and channels exist (a channel's destination is the store
  of its account and region) and their API shapes;
- ``columns``: the columns Lake gives integration events, as a DuckDB table, and value printing;
- ``translate``: Lake's Trino SQL to DuckDB SQL with sqlglot, refusing what is not a query over
  event data stores (``InvalidQueryStatementException``);
- ``engine``: DuckDB over the stored events (loaded incrementally from SQLite), locked down,
  with bounded memory;
- ``queries``: query states (QUEUED, RUNNING, FINISHED, FAILED, TIMED_OUT, CANCELLED), worker
  threads, per-query time limit, cancel;
- ``api``: the JSON 1.1 operations and the page's ``POST /_emulator/query``.

``Lake`` wires them for the ``Emulator``: built in ``start()``, closed in ``stop()``.
"""

from __future__ import annotations

import datetime as _dt
from typing import Callable

from ..channels import Channels
from ..storage import EventStore
from .api import TARGET_PREFIX, Answer, ControlPlane
from .catalog import Catalog
from .engine import Engine
from .queries import QueryStore

__all__ = ["Answer", "Lake", "TARGET_PREFIX"]


class Lake:
    def __init__(self, store: EventStore, channels: Channels,
                 credentials: tuple[str, str] | None, wall_clock: Callable[[], _dt.datetime],
                 query_timeout: float = 30.0, max_result_rows: int = 100_000) -> None:
        self.engine = Engine(store)
        self.queries = QueryStore(self.engine, timeout=query_timeout, max_rows=max_result_rows,
                                  wall_clock=wall_clock)
        self.api = ControlPlane(Catalog(channels), self.engine, self.queries, credentials,
                                wall_clock, wall_clock().timestamp())

    def close(self) -> None:
        self.queries.close()
        self.engine.close()
