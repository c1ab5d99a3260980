"""Our own Llama checkpoint as a teacher: chats rendered with its chat template, sampled with
``sampler.generate`` (all chats of ``complete_many`` in one batched call).

References: PRefLexOR (Buehler, arXiv 2410.12375), Sec. 2.1 (any capable LLM can be the teacher).

Tests: ``python -m pytest -q tests/test_teachers.py -k local``.
"""
from __future__ import annotations

import os
from typing import Sequence

from ..tokenization.tokenizer import Tokenizer
from ..llm.model import Llama
from ..sampler import SamplingParams, generate
from .base import Messages, check_messages


class LocalTeacher:
    """Our own Llama as a teacher: chats rendered with the chat template, sampled with ``sampler``.

    ``LocalTeacher("ckpt_dir")`` loads ``Llama.from_pretrained`` + ``Tokenizer.from_pretrained``;
    ``LocalTeacher((model, tokenizer))`` wraps objects already in memory. ``complete_many`` sends
    all chats through one batched ``generate`` call.
    """

    def __init__(self, checkpoint_or_pair, device: str = "cpu", dtype=None, seed: int = 0,
                 top_p: float = 0.9, top_k: int = 50, name: str | None = None):
        if isinstance(checkpoint_or_pair, (tuple, list)):
            if len(checkpoint_or_pair) != 2:
                raise ValueError("LocalTeacher takes a checkpoint dir or a (model, tokenizer) pair")
            self.model, self.tokenizer = checkpoint_or_pair
            self.name = name or f"local:{type(self.model).__name__}"
        else:
            path = os.fspath(checkpoint_or_pair)
            if not os.path.isdir(path):
                raise FileNotFoundError(f"teacher checkpoint dir not found: {path}")
            self.model = Llama.from_pretrained(path, dtype=dtype, device=device)
            self.tokenizer = Tokenizer.from_pretrained(path)
            self.name = name or f"local:{os.path.basename(os.path.normpath(path))}"
        self.model.eval()
        self.seed, self.top_p, self.top_k = seed, top_p, top_k
        self._calls = 0

    def complete(self, messages: Messages, temperature: float = 0.0, max_tokens: int = 512) -> str:
        return self.complete_many([messages], temperature=temperature, max_tokens=max_tokens)[0]

    def complete_many(self, list_of_messages: Sequence[Messages], temperature: float = 0.0,
                      max_tokens: int = 512, return_exceptions: bool = False) -> list[str]:
        chats = [check_messages(m) for m in list_of_messages]
        if not chats:
            return []
        self._calls += 1
        params = SamplingParams(max_new_tokens=int(max_tokens), temperature=float(temperature),
                                top_p=self.top_p, top_k=self.top_k, n=1,
                                seed=self.seed + self._calls)
        outs = generate(self.model, self.tokenizer, chats, params)
        return [o.text.strip() for o in outs]
