"""Every CLI's options come from config dataclass fields (``infra.cli``): one name, one default and one
meaning per option across train.py, infer.py, ``python -m preflexor_core.datagen`` and ``python -m
preflexor_core.evaluation``; Literal choices shown in ``--help``; the `make demo` presets reproduce the
settings the Makefile used to pass as flags.

Run: ``python -m pytest -q tests/test_cli_options.py``.
"""
import argparse
import dataclasses
import importlib.util
import os
import typing

import pytest

from preflexor_core.datagen import __main__ as datagen_cli
from preflexor_core.evaluation import cli as eval_cli
from preflexor_core.evaluation.runner import EvalConfig
from preflexor_core.infra.cli import literal_choices, parse
from preflexor_core.llm.registry import resolve_device
from preflexor_core.reasoning import session
from preflexor_core.thinking.layout import DEFAULT_CATEGORIES
from preflexor_core.train.config import PRESETS as TRAIN_PRESETS, SECTIONS, TrainConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Inputs and outputs whose default is each CLI's own: train starts from the bundled model, infer from the demo
# checkpoint, datagen samples only when given a policy, evaluation takes several; --out is each CLI's output.
PER_CLI = {"--model", "--out", "--preset", "--help"}


def _load(name):
    spec = importlib.util.spec_from_file_location(f"{name}_cli", os.path.join(ROOT, f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


TRAIN, INFER = _load("train"), _load("infer")
PARSERS = {"train": TRAIN.build_parser, "infer": INFER.build_parser, "datagen": datagen_cli.build_arg_parser,
           "evaluation": eval_cli.build_parser}
CONFIGS = {"train": list(SECTIONS.values()), "infer": [session.InferConfig],
           "datagen": [datagen_cli.DatagenOptions], "evaluation": [eval_cli.EvalOptions]}
PRESETS = {"train": TRAIN_PRESETS, "infer": session.PRESETS, "datagen": datagen_cli.PRESETS,
           "evaluation": eval_cli.PRESETS}


def _options():
    """{cli: {flag: action}} for every visible option."""
    out = {}
    for name, build in PARSERS.items():
        out[name] = {s: a for a in build()._actions if a.help != argparse.SUPPRESS
                     for s in a.option_strings if s.startswith("--") and not s.startswith("--no-")}
    return out


def test_one_default_and_one_meaning_per_flag():
    opts = _options()
    flags = {f for per in opts.values() for f in per} - PER_CLI
    for f in sorted(flags):
        seen = {cli: (a.dest, repr(a.default), a.choices and tuple(a.choices)) for cli, per in opts.items()
                for f2, a in per.items() if f2 == f}
        assert len(set(seen.values())) == 1, f"{f} differs across CLIs: {seen}"


def test_one_flag_per_config_field():
    by_dest = {}
    for cli, per in _options().items():
        for f, a in per.items():
            by_dest.setdefault(a.dest, set()).add(f)
    assert {d: fs for d, fs in by_dest.items() if len(fs) > 1} == {}


@pytest.mark.parametrize("cli", list(PARSERS))
def test_literal_fields_show_their_choices(cli):
    p = PARSERS[cli]()
    text = " ".join(p.format_help().split())
    actions = {a.dest: a for a in p._actions}
    for kls in CONFIGS[cli]:
        for f in dataclasses.fields(kls):
            choices = literal_choices(typing.get_type_hints(kls)[f.name])
            if choices and "help" in f.metadata:
                assert tuple(actions[f.name].choices) == choices, (cli, f.name)
                assert "{" + ",".join(choices) + "}" in text, (cli, f.name)


@pytest.mark.parametrize("cli", list(PARSERS))
def test_presets_name_options(cli):
    dests = {a.dest for a in PARSERS[cli]()._actions}
    for name, values in PRESETS[cli].items():
        assert set(values) <= dests, (cli, name, set(values) - dests)


def _train(argv):
    args = vars(parse(TRAIN.build_parser(), argv, TRAIN_PRESETS))
    args.pop("preset")
    return TrainConfig.from_flat(**args)


# The Makefile's recipes before the presets (DEMO=runs/demo, SEED=0, DEMO_TOKENS=640), with the defaults they
# relied on that have changed since written out (train's seed was 42, infer's temperature 0.1 and device cpu,
# evaluation's top-p 1.0).
OLD_DEMO_TRAIN = "--out runs/demo --seed 0 --batch-size 2 --warmup-steps 2 --gen-batch-size 16 --thinking-max-new-tokens 640"


@pytest.mark.parametrize("old,new", [
    ("--stage 1 --iterations 4 --pairs-per-iteration 32 --n-steps 16 --orpo-lr 1e-4 " + OLD_DEMO_TRAIN,
     "--preset demo-stage1 --out runs/demo --seed 0"),
    ("--stage 2 --iterations 2 --pairs-per-iteration 24 --n-steps 12 --dpo-lr 1e-5 --rpo-alpha 1.0 " + OLD_DEMO_TRAIN,
     "--preset demo-stage2 --out runs/demo --seed 0"),
    ("--stage all --model tiny --out runs/demo-tiny --pairs-per-iteration 64 --n-steps 48 --seed 42",
     "--preset demo-tiny --out runs/demo-tiny"),
    ("--stage grpo --model M --out runs/demo-graph --seed 0 --grpo-sft-steps 24 --orpo-lr 1e-4 --grpo-steps 12 "
     "--grpo-prompts 2 --num-generations 4 --grpo-max-new-tokens 512 --grpo-lr 1e-5 --warmup-steps 0",
     "--preset demo-graph --model M --out runs/demo-graph --seed 0")])
def test_train_presets_are_the_old_makefile_flags(old, new):
    assert _train(new.split()) == _train(old.split())


def _datagen_effective(o):
    return {"max_new_tokens": o.thinking_max_new_tokens if o.with_thinking else o.sample_max_new_tokens,
            "temperature": o.sample_temperature, "top_p": o.sample_top_p, **{k: getattr(o, k) for k in (
                "with_thinking", "k_samples", "teacher", "teacher_max_items", "teacher_answer_sentences", "n",
                "seed", "gen_batch_size", "number_nodes_to_get", "embedder", "rag", "thinking_format", "scorer",
                "only_wrong", "wrong_threshold", "rejected_from", "dtype", "categories", "retriever", "model",
                "out", "corpus")}}


@pytest.mark.parametrize("preset,tokens", [("demo", 640), ("demo-tiny", 768)])
def test_datagen_presets_are_the_old_makefile_flags(preset, tokens):
    args = vars(parse(datagen_cli.build_arg_parser(), ["--preset", preset, "--corpus", "c.md", "--retriever", "D/r",
                                                       "--model", "D/stage1", "--out", "D/h.jsonl"],
                      datagen_cli.PRESETS))
    args.pop("preset")
    got = _datagen_effective(datagen_cli.DatagenOptions(**args))
    # old: --with-thinking --k-samples 2 --max-new-tokens N --teacher-max-items 1 --teacher-answer-sentences 2
    # --n 32 --seed 9001 --batch-size 32 (temperature 0.8, top-p 0.9, --nodes 3, embedder default = auto)
    assert got == {"max_new_tokens": tokens, "temperature": 0.8, "top_p": 0.9, "with_thinking": True,
                   "k_samples": 2, "teacher": "extractive", "teacher_max_items": 1, "teacher_answer_sentences": 2,
                   "n": 32, "seed": 9001, "gen_batch_size": 32, "number_nodes_to_get": 3, "embedder": "auto",
                   "rag": True, "thinking_format": "categories", "scorer": "embedding", "only_wrong": False,
                   "wrong_threshold": 0.8, "rejected_from": None, "dtype": "auto",
                   "categories": ",".join(DEFAULT_CATEGORIES),
                   "retriever": "D/r", "model": "D/stage1", "out": "D/h.jsonl", "corpus": ["c.md"]}


@pytest.mark.parametrize("preset,tokens", [("demo", 640), ("demo-tiny", 768)])
def test_infer_presets_are_the_old_makefile_flags(preset, tokens):
    got = INFER.parse_args(["--preset", preset, "--model", "D/stage2", "--retriever", "D/r", "--question", "a",
                            "--question", "b", "--json", "D/t.json"])
    old = session.InferConfig(questions=["a", "b"], model="D/stage2", retriever="D/r", reflect_depth=3,
                              max_new_tokens=tokens, json="D/t.json", temperature=0.1, device="cpu")
    assert got == old


@pytest.mark.parametrize("preset,old", [("demo", EvalConfig(max_new_tokens=640, batch_size=25)),
                                        ("demo-tiny", EvalConfig(max_new_tokens=768))])
def test_evaluation_presets_are_the_old_makefile_flags(preset, old):
    ap = eval_cli.build_parser()
    args = parse(ap, ["--preset", preset, "--run", "D", "--pairs", "p.jsonl", "--log", "l", "--out", "o"],
                 eval_cli.PRESETS)
    assert eval_cli._config(ap, args) == dataclasses.replace(old, device=resolve_device("auto"))
    assert args.base == ("smollm2-135m-instruct" if preset == "demo" else None)
