"""`python -m neo_jax.cli ...` is `neo-jax ...`."""

import sys

from neo_jax.cli import main

sys.exit(main())
