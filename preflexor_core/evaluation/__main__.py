"""``python -m preflexor_core.evaluation``: the evaluation CLI (``cli.py``)."""
import sys

from ..infra.errors import run_cli
from .cli import main

sys.exit(run_cli(main))
