"""Run `fedlora simulate ARGS` in this process (sites in-process, no Ray) and die like a SIGKILL
(os._exit: no finally, no flush) just before its N-th file publication: every write of a run
goes through os.replace (common/atomic.py), so "before the N-th os.replace" walks through every
write point. With N = -1 it runs to the end and prints each publication's target, one a line,
to the file named by KILL_AT_WRITE_LOG.

    python tests/kill_at_write.py N simulate ARGS...
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

KILLED = 137


def main() -> int:
    kill_at, argv = int(sys.argv[1]), sys.argv[2:]
    published: list[str] = []
    real_replace = os.replace

    def replace(src, dst, *args, **kwargs):
        if len(published) == kill_at:
            os._exit(KILLED)
        published.append(str(dst))
        return real_replace(src, dst, *args, **kwargs)

    os.replace = replace

    from common.flower_compat import set_task_identity
    from simulations import cli
    from tests.conftest import simulate_without_ray

    set_task_identity(run_id=1, task_id=1, node_id=0)
    simulate_without_ray(None, patch=setattr)
    code = cli.main(argv)
    if kill_at < 0 and os.environ.get("KILL_AT_WRITE_LOG"):
        Path(os.environ["KILL_AT_WRITE_LOG"]).write_text("\n".join(published) + "\n")
    return code


if __name__ == "__main__":
    sys.exit(main())
