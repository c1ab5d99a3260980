"""Rewards of graph-format completions for the GRPO stage: pure functions, each a ``Reward``
(value in [0, 1] and its components), and a weighted combiner.

Rooms: ``structure`` (``format_reward``, ``graph_validity_reward``, the completion's DiGraph),
``corpus`` (``CorpusConcepts``, ``groundedness_reward``, ``graph_utility_reward``), ``answer``
(``correctness_reward``: token F1, ROUGE-L, embedding cosine), ``judge`` (optional ``HTTPJudge``
with an on-disk cache), ``combine`` (``RewardWeights``, ``combine_rewards``, ``GraphRewards``).

References: Graph-PReFLexOR (Buehler 2025, arXiv 2501.08120); GRPO (arXiv 2402.03300).
Tests: ``python -m pytest -q tests/test_rewards.py``.
"""
from .answer import correctness_reward, embedding_cosine
from .combine import REWARD_NAMES, GraphRewards, RewardWeights, combine_rewards
from .corpus import CorpusConcepts, answer_concepts, graph_utility_reward, groundedness_reward
from .judge import JUDGE_PROMPT, HTTPJudge, JudgeError, parse_grade
from .structure import Reward, format_reward, graph_validity_reward

__all__ = ["Reward", "format_reward",
           "graph_validity_reward", "CorpusConcepts", "answer_concepts", "groundedness_reward",
           "graph_utility_reward", "correctness_reward", "embedding_cosine", "HTTPJudge", "JudgeError",
           "JUDGE_PROMPT", "parse_grade", "RewardWeights", "REWARD_NAMES", "combine_rewards", "GraphRewards"]
