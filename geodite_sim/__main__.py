import sys

from geodite_sim.cli import main

sys.exit(main())
