"""``python -m geodite_sim.training DATA ... --out model.ckpt`` (same as ``geodite-sim train``)."""

import sys

from geodite_sim.training.cli import main

sys.exit(main())
