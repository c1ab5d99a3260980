"""Sampling settings and results: ``SamplingParams`` (validated on construction) and ``Completion``.

A leaf of the sampler package, so prompt handling and generation can both use the settings.
Tests: ``python -m pytest tests/test_sampler.py -q``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from ..infra.cli import opt
from ..infra.errors import PreflexorError

MAX_NEW_TOKENS = 1 << 20        # far above any context window; a typo (1e9) is refused before any work
MAX_SAMPLES = 4096              # samples per prompt


class SamplingParamsError(PreflexorError, ValueError):
    """A sampling setting out of range (one line, naming the setting, its value and what is allowed)."""


@dataclass
class SamplingParams:
    """How to sample.

    ``prepend_response`` text is forced at the start of every response: its tokens are appended to
    the prompt context (so the model continues after it) AND returned at the start of
    ``Completion.text`` / ``token_ids`` (``Completion.num_forced_tokens`` says how many ids).
    ``max_new_tokens`` and ``logprobs`` count only model-generated tokens; ``logprobs`` are
    log-probabilities of the chosen tokens under the unmodified model distribution (before
    repetition penalty, temperature and top-k/top-p). A stop token ends a row and is not part of
    the output; a stop string ends a row and the text is cut just before it, ``token_ids`` to the
    shortest prefix whose decoded text covers the kept text. ``seed`` None: one draw from torch's
    global RNG keys the whole call (see ``sampling.row_key``).
    """

    max_new_tokens: int = 256
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    n: int = 1
    stop_token_ids: list[int] | None = None        # None -> tokenizer.stop_token_ids; [] -> never stop on a token
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    prepend_response: str = ""
    return_logprobs: bool = False
    truncate_prompt_left: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.validate()

    def validate(self) -> None:
        def bad(msg: str):
            raise SamplingParamsError(f"SamplingParams: {msg}")
        if not isinstance(self.max_new_tokens, int) or not 1 <= self.max_new_tokens <= MAX_NEW_TOKENS:
            bad(f"max_new_tokens must be an int in 1..{MAX_NEW_TOKENS}, got {self.max_new_tokens!r}")
        if not isinstance(self.n, int) or not 1 <= self.n <= MAX_SAMPLES:
            bad(f"n must be an int in 1..{MAX_SAMPLES} (samples per prompt), got {self.n!r}")
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature)) or self.temperature < 0:
            bad(f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            bad(f"top_k must be an int >= 0 (0 = off), got {self.top_k!r}")
        if not isinstance(self.top_p, (int, float)) or not (0 < self.top_p <= 1):
            bad(f"top_p must be in (0, 1] (1 = off), got {self.top_p!r}")
        if not isinstance(self.repetition_penalty, (int, float)) or not 0 < self.repetition_penalty < math.inf:
            bad(f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty!r}")
        if self.stop_token_ids is not None:
            if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
                bad(f"stop_token_ids must be non-negative ints, got {self.stop_token_ids!r}")
        if not all(isinstance(s, str) and s for s in self.stop):
            bad(f"stop must be a list of non-empty strings, got {self.stop!r}")
        if self.seed is not None and not isinstance(self.seed, int):
            bad(f"seed must be an int or None, got {self.seed!r}")
        if not isinstance(self.prepend_response, str):
            bad(f"prepend_response must be a str, got {type(self.prepend_response).__name__}")


@dataclass
class Completion:
    text: str
    token_ids: list[int]                 # generated ids only (forced prepend_response ids first)
    finish_reason: str                   # "stop" | "length"
    logprobs: list[float] | None = None  # one per model-generated token (after the forced ones)
    prompt_index: int = 0
    sample_index: int = 0
    num_forced_tokens: int = 0           # leading ids of token_ids that came from prepend_response


DecodeWeights = Literal["fp", "int8"]


@dataclass(kw_only=True)
class DecodeWeightsOptions:
    """The weights the policy generates with; one option for training's own samples and for inference."""
    decode_weights: DecodeWeights = opt("fp", "weights the policy generates with (training's rejected answers and "
                                        "GRPO groups, inference): fp = the model's precision, int8 = weight-only "
                                        "int8 copies with per-channel scales, LM head included (slightly different "
                                        "outputs; speed: docs/benchmarks.md); training always updates the "
                                        "full-precision weights", stages="123")
