"""`python -m pfadseg`: the `pfadseg` command (also what torchrun and `pfadseg benchmark` start)."""
import sys

from .cli import main

sys.exit(main())
