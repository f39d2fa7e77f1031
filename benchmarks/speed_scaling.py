"""The paper's speed protocol on this machine: see geodite_sim/speed_protocol.py.

    python benchmarks/speed_scaling.py                 # ~15 min on a 2-core CPU
    python benchmarks/speed_scaling.py --sizes 1 2     # quick
Writes benchmarks/results/speed_scaling.{json,md,png}.
"""

from geodite_sim.speed_protocol import main

if __name__ == "__main__":
    raise SystemExit(main())
