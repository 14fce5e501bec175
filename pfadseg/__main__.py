"""`python -m pfadseg`: the `pfadseg` command (also what torchrun and `pfadseg benchmark` start)."""
import sys

from . import heed_interrupts

heed_interrupts()  # before the seconds the imports below take
from .cli import main  # noqa: E402

sys.exit(main())
