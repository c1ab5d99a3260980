"""PRefLexOR training CLI: stage 0 (causal LM), 1 (ORPO), 2 (DPO/EXO), or all.

    python train.py --stage all                 # bundled SmolLM2-135M-Instruct, stages 1 and 2, offline teacher
    python train.py --stage all --model tiny    # from scratch: BPE + the tiny preset, stages 0, 1, 2
    python train.py --stage 1 --model DIR --teacher http://host:8000/v1 --lora-r 64
    torchrun --nproc_per_node 2 train.py --stage 2 --model runs/demo/stage1

Every flag, its default and its help text come from ``preflexor_core.train.config`` (one argument
group per config section); this file only parses flags. Tests: ``python -m pytest -q tests/test_trainer.py -k cli``
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import typing


def build_parser() -> argparse.ArgumentParser:
    from preflexor_core.train.config import SECTIONS
    p = argparse.ArgumentParser(prog="train.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for section, kls in SECTIONS.items():
        group = p.add_argument_group(section, kls.__doc__)
        hints = typing.get_type_hints(kls)
        for f in dataclasses.fields(kls):
            flag = "--" + f.name.replace("_", "-")
            args = typing.get_args(hints[f.name])
            base = next((a for a in args if a is not type(None)), hints[f.name]) if args else hints[f.name]
            help_text = f.metadata["help"]
            if "const" in f.metadata:        # an optional value: --resume, --resume=auto
                group.add_argument(flag, nargs="?", const=f.metadata["const"], type=f.metadata["parse"],
                                   default=f.default, help=help_text, metavar="{yes,no,auto}")
            elif base is bool:
                group.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=help_text)
            else:
                kw = {"choices": f.metadata["choices"]} if "choices" in f.metadata else {}
                group.add_argument(flag, type=base, default=f.default, help=help_text, metavar=f.name.upper(), **kw)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from preflexor_core.infra.errors import check_device
    from preflexor_core.train import TrainConfig, main as train_main
    try:
        cfg = TrainConfig.from_flat(**vars(args))
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
    from preflexor_core.infra.errors import run_cli
    sys.exit(run_cli(main))
