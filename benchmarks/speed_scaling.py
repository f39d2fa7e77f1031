"""The paper's speed protocol on this machine: see benchmarks/speed_protocol.py.

    python benchmarks/speed_scaling.py                 # ~15 min on a 2-core CPU
    python benchmarks/speed_scaling.py --sizes 1 2     # quick
Writes benchmarks/results/speed_scaling.{json,md,png}.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the benchmarks' shared helpers (run as a script)

from speed_protocol import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
