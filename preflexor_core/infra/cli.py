"""Config dataclasses -> command lines: every CLI's options are dataclass fields, and the shared ones
are declared once here (device, seed, progress, generation) or next to their layer.

A field made with ``opt(default, help, ...)`` is the option ``--field-name`` (``flag=`` names another
spelling). Its type gives the argparse type: ``bool`` -> ``--x/--no-x``; ``Literal[...]`` (also inside
``X | None``) -> the choices, shown in ``--help`` and checked by :func:`check_fields`, which also checks
the numeric range (``ge``/``gt``/``le``/``lt``) and the upper limit (``cap``) in the metadata. A named
preset is a dict of field values (``--preset NAME``); a flag given on the command line wins over it.

    ap = argparse.ArgumentParser(formatter_class=HELP_FORMATTER)
    add_options(ap, MyConfig); add_preset(ap, PRESETS)
    cfg = from_args(MyConfig, parse(ap, argv, PRESETS))

Tests: ``python -m pytest -q tests/test_cli_options.py``.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = ["opt", "flag", "range_text", "literal_choices", "field_type", "check_fields", "add_options",
           "add_preset", "parse", "from_args", "HELP_FORMATTER", "MAX_INT", "DeviceOptions", "SeedOptions",
           "ProgressOptions", "GenerationOptions", "GenBatchOptions"]



class HELP_FORMATTER(argparse.ArgumentDefaultsHelpFormatter):
    """Each option's help with ``(default: X)``, unless the help already says its default or it has none."""

    def _get_help_string(self, action):
        if "default" in (action.help or "") or action.default in (None, [], argparse.SUPPRESS):
            return action.help
        return super()._get_help_string(action)


MAX_INT = 10**7          # the upper limit of an integer option without its own ``cap``
_BOUNDS = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}
_CHECKS = {"ge": lambda v, b: v >= b, "gt": lambda v, b: v > b, "le": lambda v, b: v <= b, "lt": lambda v, b: v < b}


def opt(default: Any = dataclasses.MISSING, help: str = "", *, factory=None, **meta) -> Any:
    """A config field that is a CLI option. ``meta``: ``flag`` (another spelling than ``--field-name``),
    ``metavar``, ``action`` ("append"), ``nargs``, ``required``; the range ``ge``/``gt``/``le``/``lt``
    and the upper limit ``cap`` (checked for every value but None); train's ``stages`` and
    ``resume_safe``; ``const``/``parse`` for an option whose value is optional (``--resume``)."""
    if factory is not None:
        return field(default_factory=factory, metadata={"help": help, **meta})
    return field(default=default, metadata={"help": help, **meta})


def flag(name: str) -> str:
    """The CLI flag of a config field: ``n_steps`` -> ``--n-steps``."""
    return "--" + name.replace("_", "-")


def range_text(meta) -> str:
    """The allowed range of a field as text (``>= 1``, ``in (0, 1]``), "" when it has none."""
    lo = next(((k, meta[k]) for k in ("ge", "gt") if k in meta), None)
    hi = next(((k, meta[k]) for k in ("le", "lt") if k in meta), None)
    if lo and hi:
        return f"in {'[' if lo[0] == 'ge' else '('}{lo[1]}, {hi[1]}{']' if hi[0] == 'le' else ')'}"
    return " and ".join(f"{_BOUNDS[b[0]]} {b[1]}" for b in (lo, hi) if b)


def literal_choices(tp) -> tuple | None:
    """The values of a ``Literal[...]`` type (also inside ``X | None``), else None."""
    if typing.get_origin(tp) is Literal:
        return typing.get_args(tp)
    return next((c for c in map(literal_choices, typing.get_args(tp)) if c), None)


def field_type(kls, name: str):
    """The resolved type of field ``name`` of dataclass ``kls`` (string annotations evaluated)."""
    return typing.get_type_hints(kls)[name]


def _base(tp):
    """The argparse type of a field type: ``int | None`` -> int; ``Literal["a"]`` -> str."""
    choices = literal_choices(tp)
    if choices:
        return type(choices[0])
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return args[0] if args else tp


def check_fields(section, error=ValueError) -> None:
    """Every option field of ``section``: a ``Literal`` one of its values; a numeric one the right type
    (int / float, never bool), finite, inside its range and under its limit (``cap``, else ``MAX_INT``
    for integers). The message names the field, the value and the flag."""
    hints = typing.get_type_hints(type(section))
    for f in dataclasses.fields(section):
        value, meta, tp = getattr(section, f.name), f.metadata, hints[f.name]
        choices = literal_choices(tp)
        if choices is not None:
            if value not in choices and not (value is None and type(None) in typing.get_args(tp)):
                raise error(f"{f.name}={value!r}: use {', '.join(map(str, choices))} ({flag(f.name)})")
            continue
        base = _base(tp)
        want_int = base is int
        if value is None or not (want_int or base is float):
            continue
        ok_type = isinstance(value, int) if want_int else isinstance(value, (int, float))
        if isinstance(value, bool) or not ok_type:
            kind = "an integer" if want_int else "a number"
            raise error(f"{f.name}={value!r} must be {kind} {range_text(meta)} ({flag(f.name)})")
        if not math.isfinite(value):
            raise error(f"{f.name}={value!r} must be a finite number ({flag(f.name)})")
        if not all(_CHECKS[k](value, meta[k]) for k in _BOUNDS if k in meta):     # NaN fails every bound
            raise error(f"{f.name}={value!r} must be {range_text(meta)} ({flag(f.name)})")
        cap = meta.get("cap", MAX_INT if want_int else None)
        if cap is not None and value > cap:
            raise error(f"{f.name}={value!r} is over the limit {cap:g} ({flag(f.name)}); "
                        f"this much cannot be held or run on one machine")


def _default(f):
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else None


def add_options(parser, kls, title: str | None = None, skip=()) -> None:
    """One option per field of ``kls`` made with :func:`opt` (other fields are not options), into an
    argument group ``title`` (described by the class docstring) or straight into ``parser``."""
    group = parser.add_argument_group(title, kls.__doc__) if title else parser
    hints = typing.get_type_hints(kls)
    for f in dataclasses.fields(kls):
        meta = f.metadata
        if "help" not in meta or f.name in skip:
            continue
        kw: dict[str, Any] = {"dest": f.name, "default": _default(f), "help": meta["help"]}
        base, choices = _base(hints[f.name]), literal_choices(hints[f.name])
        if "parse" in meta:               # an optional value: --resume, --resume=auto
            kw.update(nargs="?", const=meta["const"], type=meta["parse"], metavar=meta.get("metavar"))
        elif base is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif meta.get("action") == "append":
            kw.update(action="append", metavar=meta.get("metavar"))
        else:
            item = typing.get_args(base)[0] if typing.get_origin(base) is list else base
            kw["type"] = item
            if choices:
                kw["choices"] = choices
            else:
                kw["metavar"] = meta.get("metavar", f.name.upper())
            kw.update({k: meta[k] for k in ("nargs", "required") if k in meta})
        group.add_argument(meta.get("flag", flag(f.name)), **kw)


def add_preset(parser, presets: dict[str, dict]) -> None:
    """``--preset NAME``: named settings (a dict of field values each) that replace the defaults."""
    parser.add_argument("--preset", choices=sorted(presets), default=None,
                        help="named settings defined next to this CLI's config (the `make demo` recipes); "
                             "flags given on the command line win over the preset's values")


def parse(parser: argparse.ArgumentParser, argv=None, presets: dict[str, dict] | None = None):
    """``parser.parse_args(argv)``; with ``--preset NAME``, the preset's values become the defaults first."""
    args = parser.parse_args(argv)
    if presets and getattr(args, "preset", None):
        parser.set_defaults(**presets[args.preset])
        args = parser.parse_args(argv)
    return args


def from_args(kls, args, **extra):
    """An instance of ``kls`` from the parsed options that are its fields, plus ``extra``."""
    names = {f.name for f in dataclasses.fields(kls) if f.init}
    return kls(**{k: v for k, v in vars(args).items() if k in names}, **extra)


# -- the options several CLIs share, each declared once -------------------------------------------------

@dataclass(kw_only=True)
class DeviceOptions:
    """Where the model runs."""
    device: str = opt("auto", "auto (cuda when available, else cpu), cpu, cuda or cuda:N", resume_safe=True)


@dataclass(kw_only=True)
class SeedOptions:
    """The random seed."""
    seed: int = opt(0, "random seed: every random choice (data order, initialisation, sampling, row ids)",
                    ge=0, cap=2**63 - 1)


@dataclass(kw_only=True)
class ProgressOptions:
    """Progress bars."""
    progress: bool = opt(True, "show progress bars", resume_safe=True)


@dataclass(kw_only=True)
class GenerationOptions:
    """How answers are generated (inference, evaluation)."""
    max_new_tokens: int = opt(256, "new tokens per generated answer", ge=1, cap=1 << 20)
    temperature: float = opt(0.0, "sampling temperature; 0 = greedy", ge=0.0, le=100.0)
    top_p: float = opt(0.9, "nucleus sampling (with temperature > 0)", gt=0.0, le=1.0)


@dataclass(kw_only=True)
class GenBatchOptions:
    """Questions generated together."""
    gen_batch_size: int = opt(32, "questions per sampler call", ge=1, cap=4096, stages="12")
