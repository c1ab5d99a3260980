"""PRefLexOR training CLI: stage 0 (causal LM), 1 (ORPO), 2 (DPO/EXO), or all.

    python train.py --stage all                 # bundled SmolLM2-135M-Instruct, stages 1 and 2, offline teacher
    python train.py --stage all --model tiny    # from scratch: BPE + the tiny preset, stages 0, 1, 2
    python train.py --preset demo-stage1        # `make demo`'s stage 1 (presets: train/config.py PRESETS)
    python train.py --stage 1 --model DIR --teacher http://host:8000/v1 --lora-r 64
    torchrun --nproc_per_node 2 train.py --stage 2 --model runs/demo/stage1

Every flag, its default and its help text come from ``preflexor_core.train.config`` (one argument
group per config section, built by ``preflexor_core.infra.cli``); this file only parses flags. Tests: ``python -m pytest -q tests/test_trainer.py -k cli``
"""
from __future__ import annotations

import argparse
import logging
import sys

from preflexor_core.infra.cli import HELP_FORMATTER, add_options, add_preset, parse
from preflexor_core.infra.errors import check_device, run_cli
from preflexor_core.train import TrainConfig, main as train_main
from preflexor_core.train.config import PRESETS, SECTIONS


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="train.py", description=__doc__.split("\n\n")[0],
                                formatter_class=HELP_FORMATTER)
    add_preset(p, PRESETS)
    for section, kls in SECTIONS.items():
        add_options(p, kls, title=section)
    return p


def main(argv=None) -> int:
    args = vars(parse(build_parser(), argv, PRESETS))
    args.pop("preset")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        cfg = TrainConfig.from_flat(**args)
        check_device(cfg.parallel.device)
    except ValueError as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        return 2
    try:
        summary = train_main(cfg)
    except (FileNotFoundError, ValueError, NotImplementedError) as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        return 2
    print(f"done: outputs in {cfg.run.out}" + (f"; {summary}" if summary else ""))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
