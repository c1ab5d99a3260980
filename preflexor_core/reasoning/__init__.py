"""Recursive reflective reasoning at inference (PRefLexOR, arXiv 2410.12375): think, reflect, a
critic improves the thinking, answer again; integrate the answers.

    from preflexor_core.reasoning import recursive_response, GraphCritic, Policy
    traces = recursive_response(Policy(model, tok), GraphCritic(retriever), ["Why is nacre tough?"], depth=3)

Rooms: ``spans.py`` (thinking / reflection / answer extraction), ``policy.py`` (the model asked and
its prompt), ``critics.py`` (protocol, same-model, checkpoint, HTTP critics), ``graph_critic.py``
(offline critic), ``loop.py`` (the loop and its traces), ``session.py`` (the
session ``infer.py`` runs: config, input checks, output).
Tests: ``python -m pytest -q tests/test_reasoning.py``.
"""
from .critics import (Critic, CriticUnreachableError, ModelCritic, TeacherCritic, check_endpoint,
                      make_critic)
from .graph_critic import GraphCritic
from .loop import MODES, IterationTrace, QuestionTrace, recursive_response, recursive_response_from_thinking
from .policy import Policy

__all__ = ["Policy", "Critic", "ModelCritic",
           "TeacherCritic", "GraphCritic", "IterationTrace", "QuestionTrace",
           "recursive_response", "recursive_response_from_thinking", "make_critic", "check_endpoint",
           "CriticUnreachableError", "MODES"]
