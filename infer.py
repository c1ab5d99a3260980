"""PRefLexOR inference CLI: recursive reflective reasoning (think, reflect, critic improves, answer again).

    python infer.py --reflect-depth 3 --question "Why is nacre tough?"       # embedded demo checkpoint
    python infer.py --questions qs.jsonl --critic http://127.0.0.1:8000/v1 --critic-model NAME --json trace.json
    python infer.py --model DIR --critic same --mode from-thinking --no-integrate --stream --question "..."
    python infer.py --model DIR --thinking-format graph --graph-out graphs/ --question "..."   # graph thinking
    python infer.py --preset demo --question "..."                           # `make demo`'s settings

Every flag, its default and its help come from ``preflexor_core.reasoning.session.InferConfig`` (built
by ``preflexor_core.infra.cli``); this file parses them and calls
``preflexor_core.reasoning.session.main(cfg)``, which checks the inputs (bad input: a specific message
and exit code 2), runs the loop and prints / writes the trace. Any other project error is one
``error:`` line too (``errors.run_cli``; ``PREFLEXOR_DEBUG=1`` shows the traceback).
Tests: ``python -m pytest -q tests/test_reasoning.py -k infer``.
"""
from __future__ import annotations

import argparse
import sys

from preflexor_core.infra.cli import HELP_FORMATTER, add_options, add_preset, from_args, parse
from preflexor_core.infra.errors import run_cli
from preflexor_core.reasoning.session import PRESETS, InferConfig
from preflexor_core.reasoning.session import main as run


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="infer.py", description="Recursive reflective reasoning with a PRefLexOR "
                                 "model.", formatter_class=HELP_FORMATTER)
    add_preset(ap, PRESETS)
    add_options(ap, InferConfig)
    return ap


def parse_args(argv=None) -> InferConfig:
    return from_args(InferConfig, parse(build_parser(), argv, PRESETS))


def main(argv=None) -> int:
    return run(parse_args(argv))


if __name__ == "__main__":
    sys.exit(run_cli(main))
