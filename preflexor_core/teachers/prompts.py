"""What an LLM teacher (an HTTP endpoint or a local checkpoint) is asked, step by step, to write the
chosen side of a preference row: a question from corpus text, one thinking section per category
from the retrieved context, and the answer.

Teachers with their own ``make_question`` / ``fill_category`` / ``answer`` (the offline extractive
teacher) do not use these. References: PRefLexOR (arXiv 2410.12375) Sec. 2.1-2.2 and its notebooks.

Tests: ``python -m pytest -q tests/test_datagen.py -k teacher``.
"""
from __future__ import annotations

QUESTION_PROMPT = (
    "You write exam questions for scientists. Read the text below and write ONE challenging "
    "question that connects at least two of its concepts and can be answered from the text. "
    "Reply with the question only.\n\nText:\n{text}")
CATEGORY_PROMPT = (
    "Question: {question}\n\nContext:\n{context}\n\nWrite the \"{category}\" section of a structured "
    "reasoning scratchpad for answering the question, using only facts from the context. {hint} "
    "Reply with the section content only, without a heading.")
CATEGORY_HINTS = {
    "Reasoning Steps": "Give numbered steps that lead from the question to the answer.",
    "Relevant Materials or Concepts": "Give a bulleted list of the key materials and concepts.",
    "Design Principles": "List the design principles or strategies involved.",
    "Material Properties": "List the relevant material properties, with values where given.",
    "Hypothesis": "State a testable hypothesis that follows from the context.",
    "Additional Background": "Give short background facts that help to answer.",
}
ANSWER_PROMPT = ("Context:\n{context}\n\nAnswer the question accurately and concisely, using the "
                 "context.\n\nQuestion: {question}")
