"""The thinking format: the method's central idea, in one room that every stage asks.

``tokens`` (``<|thinking|>``, ``<|/thinking|>``, ``<|reflect|>``, ``<|/reflect|>`` and the chat markers
of tokenizers trained here), ``formats`` (the format names as one ``Literal``, the instructions, the one
``prompt(question, fmt)``), ``layout`` (the paper's categories and the chosen response), ``graph`` (the
graph format's sections, writer and parser), ``graph_io`` (a completion's graph in networkx, GraphML),
``spans`` (thinking / reflection / answer extraction) and ``check`` (the format check evaluation reports).

References: PRefLexOR (Buehler, arXiv 2410.12375), Sec. 2.2; Graph-PRefLexOR (arXiv 2501.08120).
Tests: ``python -m pytest -q tests/test_thinking.py tests/test_graph_format.py``.
"""
