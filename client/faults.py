"""Failure injection for tests: FEDLORA_INJECT_FAULTS makes chosen simulated sites misbehave.

Format: comma-separated `SITE:KIND[@ROUND]`, KIND one of `raise` (the train handler raises),
`empty` (it replies with no adapter), `sleep=SECONDS` (it answers late); without @ROUND the
fault applies every round. A round's head statistics (head-mode fit; round 0 has nothing else)
meet the same faults as its training. Example: "0:raise@1,2:sleep=30@2". Never set it in
production.
"""

from __future__ import annotations

import os
import time

ENV_VAR = "FEDLORA_INJECT_FAULTS"


def fault_for(site_id: int, server_round: int) -> str | None:
    for item in os.environ.get(ENV_VAR, "").split(","):
        if not item.strip():
            continue
        site, _, rest = item.strip().partition(":")
        kind, _, at_round = rest.partition("@")
        if int(site) == site_id and (not at_round or int(at_round) == server_round):
            return kind
    return None


def apply_fault(kind: str) -> bool:
    """Raise or sleep as asked; True when the reply should be empty."""
    if kind == "raise":
        raise RuntimeError("injected fault: the train handler raised")
    if kind.startswith("sleep="):
        time.sleep(float(kind.partition("=")[2]))
        return False
    return kind == "empty"
