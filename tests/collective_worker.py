"""torchrun target for the failure tests: rank 1 dies or hangs, the others run collectives.

  torchrun --standalone --nproc-per-node W tests/collective_worker.py {die,hang} TIMEOUT_SECONDS
"""

import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernels.collectives import all_reduce  # noqa: E402
from minimax_m2.distributed import CollectiveError, start  # noqa: E402


def main() -> int:
    scenario, timeout = sys.argv[1], float(sys.argv[2])
    layout, backend = start(tp=1, timeout_seconds=timeout)
    all_reduce(np.ones(4, np.float32), layout.ep_groups)
    if layout.rank == 1:
        if scenario == "die":
            os._exit(7)
        time.sleep(10 * timeout)
    try:
        all_reduce(np.ones(4, np.float32), layout.ep_groups)
    except CollectiveError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
