"""Plain-text helpers with no model in them: sentence splitting, content words and concept-term
normalisation (``words``), and the answer-overlap metrics, SQuAD-style token F1 and ROUGE-L
(``metrics``). Retrieval, teachers, rewards and evaluation share them.
"""
