"""``python -m preflexor_core.evaluation``: the evaluation CLI (``cli.py``)."""
import sys

from .cli import main

sys.exit(main())
