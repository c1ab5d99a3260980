"""``python -m preflexor_core.convert SRC DST``: HF folder <-> GGUF file (the conversion: ``llm/convert.py``)."""
import sys

from .infra.errors import run_cli
from .llm.convert import main

if __name__ == "__main__":
    sys.exit(run_cli(main))
