"""``--dry-run``: the sender and the dead-letter writer a dry run is given instead of the real
ones, so the delivery code has no dry-run branches.

- :class:`DryRunSender` prints each request it would send as one JSON line
  (``{"channelArn", "auditEvents"[, "externalId"]}``) and reports every event as accepted.
- :class:`DryRunDeadLetters` prints ``{"wouldFail", "id", "errorMessage", "segment"}`` on stderr
  for each event that would go to ``failed/``, and quarantines nothing.
"""

from __future__ import annotations

import json
import sys
import threading
from typing import Any, Callable, TextIO

from ..sender import Result

# Without --channel-arn the channel's account is unknown: events lacking recipientAccountId
# are checked and shown with this one (the real run fills in the channel's account).
DRY_RUN_ACCOUNT = "000000000000"


class DryRunSender:
    def __init__(self, channel_arn: str | None, external_id: str | None, out: TextIO):
        self.channel_arn = channel_arn
        self.external_id = external_id
        self.out = out
        self._lock = threading.Lock()

    def send(self, entries: list[dict]) -> Result:
        line = {"channelArn": self.channel_arn, "auditEvents": entries}
        if self.external_id:
            line["externalId"] = self.external_id
        text = json.dumps(line, ensure_ascii=False)
        with self._lock:
            self.out.write(text + "\n")
            self.out.flush()
        return Result({e["id"] for e in entries}, [])


class DryRunDeadLetters:
    def __init__(self, err: TextIO | None = None):
        self.err = err

    def write(self, lines: list[dict], intent: Callable[[str], None] | None = None) -> None:
        err = self.err or sys.stderr
        for line in lines:
            err.write(json.dumps({"wouldFail": line["errorCode"], "id": line["id"],
                                  "errorMessage": line["errorMessage"],
                                  "segment": line["segment"]}) + "\n")
        return None

    def quarantine(self, *args: Any, **kwargs: Any) -> None:
        return None
