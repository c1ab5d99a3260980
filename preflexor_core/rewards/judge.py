"""An optional LLM judge over an OpenAI-compatible endpoint, with an on-disk cache.

``HTTPJudge(base_url, model, cache_path=...)``: ``score_many(questions, completions, references)``
asks the judge for a 0-10 grade of each answer (concurrent requests and retries are those of
``teachers.chat_client.OpenAITeacher``) and returns ``Reward(grade / 10)``. Replies are cached in one
JSON file keyed by sha256 of (model, prompt), written atomically after each batch, so a rerun
sends no request; failed requests are not cached and raise :class:`JudgeError` once the
successful ones are saved.

References: OpenAI chat-completions wire format; LLM-as-a-judge grading (Zheng et al. 2023, arXiv 2306.05685).
Tests: ``python -m pytest -q tests/test_rewards.py -k judge`` (a counting server on 127.0.0.1).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import threading
from pathlib import Path
from typing import Sequence

from ..infra.io import atomic_write
from ..thinking.graph import ParsedGraphThinking
from ..thinking.graph_io import as_parsed
from ..teachers.base import TeacherError
from ..teachers.chat_client import OpenAITeacher
from .structure import Reward

__all__ = ["HTTPJudge", "JudgeError", "JUDGE_PROMPT", "parse_grade"]

JUDGE_PROMPT = """You grade answers to questions about a technical corpus.
Question: {question}
Reference answer: {reference}
Answer to grade: {answer}
Grade the answer from 0 (wrong or empty) to 10 (correct, complete and consistent with the reference).
Reply with the grade only, as a number."""

_NUMBER = re.compile(r"(?<![\w.])(\d+(?:\.\d+)?)(?:\s*/\s*10)?")


class JudgeError(RuntimeError):
    """Some judge requests failed (the others are cached)."""


def parse_grade(reply: str) -> float | None:
    """The first number of a judge reply, as a grade in [0, 10] (None when there is none or it
    lies outside)."""
    m = _NUMBER.search(reply or "")
    if not m:
        return None
    x = float(m.group(1))
    return x if 0.0 <= x <= 10.0 else None


class HTTPJudge:
    """LLM judge over ``POST {base_url}/chat/completions``; see the module docstring."""

    def __init__(self, base_url: str, model: str, cache_path: str | os.PathLike | None = None,
                 prompt: str = JUDGE_PROMPT, concurrency: int = 8, max_retries: int = 5, timeout: float = 60,
                 api_key_env: str = "OPENAI_API_KEY", max_tokens: int = 8, backoff_base: float = 1.0):
        for key in ("{question}", "{answer}", "{reference}"):
            if key not in prompt:
                raise ValueError(f"HTTPJudge: prompt must contain {key} (see rewards.judge.JUDGE_PROMPT)")
        self.client = OpenAITeacher(base_url, model, api_key_env=api_key_env, timeout=timeout,
                                    max_retries=max_retries, concurrency=concurrency, backoff_base=backoff_base)
        self.model, self.prompt, self.max_tokens = model, prompt, int(max_tokens)
        self.cache_path = Path(cache_path) if cache_path is not None else None
        self.cache: dict[str, str] = self._load_cache()
        self.requests = 0  # requests sent (cache misses), for logs and tests
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"HTTPJudge(url={self.client.url!r}, model={self.model!r}, cache={str(self.cache_path)!r})"

    def _load_cache(self) -> dict[str, str]:
        if self.cache_path is None or not self.cache_path.exists():
            return {}
        try:
            data = json.loads(self.cache_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"HTTPJudge: cache file {self.cache_path} is unreadable ({e}); "
                             "delete it or pass another cache_path") from None
        if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
            raise ValueError(f"HTTPJudge: cache file {self.cache_path} is not a JSON object of replies; "
                             "delete it or pass another cache_path")
        return data

    def _save_cache(self) -> None:
        if self.cache_path is None:
            return
        self.cache_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(self.cache_path, json.dumps(self.cache, ensure_ascii=False, sort_keys=True))

    def key(self, prompt: str) -> str:
        return hashlib.sha256(json.dumps([self.model, prompt], ensure_ascii=False).encode("utf-8")).hexdigest()

    def render(self, question: str, answer: str, reference: str) -> str:
        return self.prompt.format(question=question.strip(), answer=answer.strip() or "(empty)",
                                  reference=reference.strip() or "(none)")

    def score_many(self, questions: Sequence[str], completions: Sequence[str | ParsedGraphThinking],
                   references: Sequence[str] | None = None) -> list[Reward]:
        """One ``Reward(grade / 10, {"grade": grade / 10})`` per completion (its answer part is
        graded); an unreadable reply gives 0 with the reply in the note."""
        if len(questions) != len(completions) or (references is not None and len(references) != len(completions)):
            raise ValueError(f"HTTPJudge.score_many: {len(questions)} questions, {len(completions)} completions and "
                             f"{'no' if references is None else len(references)} references; give one of each per item")
        refs = list(references) if references is not None else [""] * len(completions)
        prompts = [self.render(q, as_parsed(c).answer, r) for q, c, r in zip(questions, completions, refs)]
        with self._lock:
            todo = list(dict.fromkeys(p for p in prompts if self.key(p) not in self.cache))
            if todo:
                replies = self.client.complete_many([[{"role": "user", "content": p}] for p in todo],
                                                    temperature=0.0, max_tokens=self.max_tokens,
                                                    return_exceptions=True)
                self.requests += len(todo)
                errors = [r for r in replies if isinstance(r, TeacherError)]
                for p, r in zip(todo, replies):
                    if not isinstance(r, TeacherError):
                        self.cache[self.key(p)] = r
                self._save_cache()
                if errors:
                    raise JudgeError(f"{len(errors)} of {len(todo)} judge requests to {self.client.url} failed "
                                     f"(the others are cached; rerun to retry): {errors[0]}")
            out = []
            for p in prompts:
                reply = self.cache[self.key(p)]
                grade = parse_grade(reply)
                if grade is None:
                    out.append(Reward(0.0, {"grade": 0.0}, f"no grade in the judge reply {reply[:80]!r}"))
                else:
                    out.append(Reward(grade / 10.0, {"grade": grade / 10.0}))
            return out
