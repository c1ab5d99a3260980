"""Command line of the evaluation: ``python -m preflexor_core.evaluation`` (see ``--help``).

    python -m preflexor_core.evaluation --model runs/x/stage1 --model runs/x/stage2 \\
        --pairs heldout_pairs.jsonl --out runs/x/eval --log runs/x/log.jsonl
    python -m preflexor_core.evaluation --run runs/x            # stage0/1/2 of one run, its log

Flags are the fields of :class:`EvalOptions` (the shared ones declared once: ``infra.cli``,
``datagen.options``, ``train.config``) and map onto :class:`runner.EvalConfig`; bad input (checked before any
work: inputs, --device, a writable --out that holds no earlier report unless --overwrite) exits with 2; a report that still cannot be written goes to
a fallback folder in the system temp dir, and the error says where.
Tests: ``python -m pytest -q tests/test_evaluation.py -k "cli or main"``.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass
from typing import Sequence

from ..datagen.options import CategoriesOptions
from ..infra.cli import (HELP_FORMATTER, DeviceOptions, GenBatchOptions, GenerationOptions, ProgressOptions,
                         SeedOptions, add_options, add_preset, opt, parse)
from ..infra.errors import check_device
from ..infra.io import OutputPathError, check_output_dir
from ..llm.registry import NAMED_MODELS, DtypeOptions, resolve_device
from ..train.config import DPOBetaOptions
from .inputs import DEFAULT_QUESTIONS, EvaluationInputError, check_model_dir, load_pairs, load_questions
from .report import format_table, write_report
from .runner import EvalConfig, evaluate_models, evaluate_stages

__all__ = ["EvalOptions", "PRESETS", "build_parser", "main"]


@dataclass(kw_only=True)
class EvalOptions(GenerationOptions, GenBatchOptions, SeedOptions, DeviceOptions, DtypeOptions, DPOBetaOptions,
                  CategoriesOptions, ProgressOptions):
    """Every option of the evaluation CLI (the shared ones: ``infra.cli``, ``datagen.options``, ``train.config``)."""
    model: list[str] = opt(factory=list, help="checkpoint folder (config.json, *.safetensors, tokenizer.json), a "
                           f".gguf file or a known model name ({', '.join(NAMED_MODELS)}); repeat to compare several",
                           action="append", metavar="DIR|FILE.gguf|NAME")
    run: str | None = opt(None, "a training run folder: evaluates RUN_DIR/stage0, stage1, stage2 (those present), "
                          "each against the stage before it for the reward accuracy, and plots RUN_DIR/log.jsonl",
                          metavar="RUN_DIR")
    base: str | None = opt(None, "the pretrained model the run started from (e.g. smollm2-135m-instruct): "
                           "evaluated first, as 'base', with a system message describing the thinking format",
                           metavar="DIR|FILE.gguf|NAME")
    questions_file: str | None = opt(None, "JSONL with 'question' and 'reference' per line (default: the shipped "
                                     "75 held-out questions)", flag="--questions", metavar="FILE")
    limit: int | None = opt(None, "only the first N questions", metavar="N")
    spread: bool = opt(False, "with --limit: N questions evenly spaced over the file (every topic of the shipped "
                       "set) instead of the first N")
    pairs: str | None = opt(None, "held-out preference pairs JSONL ('prompt', 'chosen', 'rejected') for the reward "
                            "accuracy", metavar="FILE")
    pairs_limit: int | None = opt(None, "only the first N pairs", metavar="N")
    ref_model: str | None = opt(None, "reference model for the reward accuracy (default with --model: the first "
                                "--model, which is then itself reported without one; with --run: the stage before "
                                "each stage)", metavar="DIR")
    out: str = opt("eval_report", "report folder", metavar="DIR")
    overwrite: bool = opt(False, "replace the report files (report.md, metrics.json, outputs.jsonl, plots) already "
                          "in --out")
    log: str | None = opt(None, "training log.jsonl to plot into --out (stage{N}.png, training.png)",
                          metavar="LOG_JSONL")
    force_thinking: bool = opt(False, "start every response with a forced <|thinking|> (off: format compliance "
                               "then measures the model's own output)")
    min_headers: int = opt(EvalConfig.min_headers, "category headers a compliant thinking block needs")
    examples: int = opt(3, "example outputs per model in report.md")


# The `make demo` recipes (--preset NAME): field values on top of the defaults.
PRESETS: dict[str, dict] = {
    "demo": {"base": "smollm2-135m-instruct", "max_new_tokens": 640, "gen_batch_size": 25, "temperature": 0.0,
             "top_p": 1.0},
    "demo-tiny": {"max_new_tokens": 768, "gen_batch_size": 16, "temperature": 0.0, "top_p": 1.0},
}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m preflexor_core.evaluation", formatter_class=HELP_FORMATTER,
        description="Evaluate PRefLexOR checkpoints: format compliance of the thinking block, answer token-F1 "
                    "and ROUGE-L against reference answers, DPO reward accuracy on held-out preference pairs. "
                    "Writes report.md, metrics.json, outputs.jsonl and PNG charts to --out.")
    add_preset(ap, PRESETS)
    add_options(ap, EvalOptions)
    return ap


def _config(ap: argparse.ArgumentParser, args) -> EvalConfig:
    """The flags as an :class:`EvalConfig` (its checks reported as usage errors)."""
    if args.model and args.run:
        ap.error("pass --model DIR (one or more) or --run RUN_DIR, not both")
    if not (args.model or args.run or args.base):
        ap.error("pass --model DIR (one or more), --run RUN_DIR or --base NAME (a base model alone)")
    if args.run and args.ref_model:
        ap.error("--ref-model goes with --model; with --run each stage is scored against the stage before it")
    device = check_device(args.device)
    device = resolve_device(device) if device in (None, "auto") else device
    try:
        return EvalConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                          seed=args.seed, force_thinking=args.force_thinking,
                          categories=[c.strip() for c in args.categories.split(",") if c.strip()],
                          min_headers=args.min_headers, beta=args.dpo_beta, batch_size=args.gen_batch_size,
                          device=device, dtype=args.dtype, progress=args.progress, limit=args.limit,
                          pairs_limit=args.pairs_limit)
    except ValueError as e:   # the message names the field; the flag is --field-name
        ap.error(str(e).removeprefix("EvalConfig: ").replace("beta", "dpo_beta")
                 .replace("batch_size", "gen_batch_size"))


def _run(args, cfg: EvalConfig) -> tuple[list[dict], str | None]:
    """Evaluate what the flags name; returns (results, training log to plot or None)."""
    questions = load_questions(args.questions_file or DEFAULT_QUESTIONS, args.limit, args.spread)
    pairs = load_pairs(args.pairs, args.pairs_limit) if args.pairs else None
    if args.run:
        if not os.path.isdir(args.run):
            raise EvaluationInputError(f"run dir {args.run} does not exist")
        base = check_model_dir(args.base) if args.base else None        # resolved once, here
        results = evaluate_stages(args.run, questions, cfg, pairs=pairs, base=base)
        run_log = os.path.join(args.run, "log.jsonl")
        log_path = args.log or (run_log if os.path.isfile(run_log) else None)
    else:
        specs = [args.base, *args.model] if args.base else list(args.model)
        paths = [check_model_dir(d) for d in specs]                        # each resolved once, here
        ref = check_model_dir(args.ref_model) if args.ref_model else paths[0]   # reported without one itself
        refs = None if pairs is None else [None if os.path.realpath(d) == os.path.realpath(ref) else ref
                                           for d in paths]
        names = _unique_names(specs)
        if args.base:
            names[0] = "base"
        results = evaluate_models(paths, questions, cfg, names=names, ref_model_dirs=refs, pairs=pairs,
                                  instructed=[bool(args.base) and i == 0 for i in range(len(paths))])
        log_path = args.log
    if log_path and not os.path.isfile(log_path):
        raise EvaluationInputError(f"training log {log_path} does not exist")
    return results, log_path


def main(argv: Sequence[str] | None = None) -> int:
    ap = build_parser()
    args = parse(ap, argv, PRESETS)
    cfg = _config(ap, args)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        check_output_dir(args.out, "--out")
        check_no_report(args.out, args.overwrite)
        results, log_path = _run(args, cfg)
        paths = _write(results, args.out, log_path, args.examples)
    except (EvaluationInputError, OutputPathError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_table(results))
    print(f"\nwrote {paths['report']}, {paths['metrics_json']}, {paths['metrics_png']}"
          + (f" and {len(paths['training_plots'])} training plot(s)" if paths["training_plots"] else ""))
    return 0


REPORT_FILES = ("report.md", "metrics.json", "outputs.jsonl", "metrics.png", "training.png")


def check_no_report(out: str, overwrite: bool) -> None:
    """Before any work: ``out`` must not hold a report (or files of its names) unless ``overwrite``."""
    if overwrite or not os.path.isdir(out):
        return
    found = [f for f in REPORT_FILES if os.path.exists(os.path.join(out, f))]
    found += sorted(f for f in os.listdir(out) if f.startswith("stage") and f.endswith(".png"))
    if found:
        raise OutputPathError(f"--out {out} already holds {', '.join(found)} (an earlier report?); it is kept: "
                              f"pass --overwrite to replace it, or choose another --out")


def _write(results: list[dict], out: str, log_path: str | None, n_examples: int) -> dict:
    """``write_report`` into ``out``; when that fails, into a fresh folder of the system temp dir and
    an :class:`OutputPathError` naming it (the results are never lost)."""
    try:
        return write_report(results, out, log_path=log_path, n_examples=n_examples)
    except OSError as e:
        fallback = tempfile.mkdtemp(prefix="preflexor-eval-")
        write_report(results, fallback, log_path=log_path, n_examples=n_examples)
        raise OutputPathError(f"--out {out}: could not write the report ({e.strerror or e}); it was written to "
                              f"{fallback} instead") from None


def _unique_names(dirs: Sequence[str]) -> list[str]:
    """Short labels: the dir's base name, with its parent when base names repeat (run1/stage2, run2/stage2)."""
    base = [os.path.basename(os.path.normpath(d)) for d in dirs]
    out = []
    for d, b in zip(dirs, base):
        if base.count(b) > 1:
            parent = os.path.basename(os.path.dirname(os.path.normpath(os.path.abspath(d))))
            b = f"{parent}/{b}"
        out.append(b)
    seen: Counter = Counter()
    final = []
    for b in out:
        seen[b] += 1
        final.append(b if seen[b] == 1 else f"{b}#{seen[b]}")
    return final
