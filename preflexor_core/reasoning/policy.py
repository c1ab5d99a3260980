"""The model being asked at inference: a Llama and its tokenizer, and the prompt it answers.

Shared by the loop (``loop.py``) and the same-model / checkpoint critics (``critics.py``).
The prompt is ``thinking.formats.chat(question, thinking_format)``, the one the training data used
(PRefLexOR, arXiv 2410.12375).
Tests: ``python -m pytest -q tests/test_reasoning.py``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..tokenization.tokenizer import Tokenizer
from ..llm.model import Llama
from ..sampler import generate

__all__ = ["Policy", "as_policy"]


@dataclass
class Policy:
    """A Llama and its tokenizer; generation goes through ``sampler.generate``."""

    model: Any
    tokenizer: Any
    decode_weights: str = "fp"          # sampler.generate's decode_weights: "fp" or "int8" (weight-only)

    @classmethod
    def from_pretrained(cls, path: str, device: str = "cpu", dtype=None) -> "Policy":
        return cls(Llama.from_pretrained(path, dtype=dtype, device=device), Tokenizer.from_pretrained(path))

    def generate(self, prompts, params, stream=None, max_batch_size: int | None = None):
        return generate(self.model, self.tokenizer, prompts, params, stream=stream, max_batch_size=max_batch_size,
                        decode_weights=self.decode_weights)

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer.encode(text)) if text else 0

    def fit_thinking(self, head: str, thinking: str, tail: str, max_new_tokens: int) -> tuple[str, int]:
        """Drop the *oldest* tokens of ``thinking`` until ``head + thinking + tail`` leaves room for
        ``max_new_tokens`` in the context; returns (thinking, number of tokens dropped).

        The newest part is kept because the critic appends its improvements at the end; the
        question (in ``head``) is never dropped here.
        """
        room = (self.model.config.max_position_embeddings - max_new_tokens - self.count_tokens(head)
                - self.count_tokens(tail) - 4)  # margin: re-encoding at the cut can merge differently
        ids = self.tokenizer.encode(thinking) if thinking else []
        if len(ids) <= room:
            return thinking, 0
        keep = max(room, 0)
        return (self.tokenizer.decode(ids[len(ids) - keep:]).lstrip() if keep else ""), len(ids) - keep


def as_policy(policy) -> Policy:
    """A :class:`Policy`, or a ``(model, tokenizer)`` pair made into one."""
    if isinstance(policy, Policy):
        return policy
    if isinstance(policy, (tuple, list)) and len(policy) == 2:
        return Policy(*policy)
    raise TypeError("policy must be a Policy or a (model, tokenizer) pair; got "
                    f"{type(policy).__name__}")
