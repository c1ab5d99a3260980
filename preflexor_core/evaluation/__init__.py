"""Evaluation of PRefLexOR checkpoints: format compliance, answer overlap, DPO reward accuracy;
a markdown report, a metrics bar chart and the training curves.

    from preflexor_core.evaluation import EvalConfig, evaluate, load_questions
    res = evaluate("runs/x/stage2", load_questions(path), EvalConfig(max_new_tokens=200),
                   ref_model_dir="runs/x/stage1", pairs=rows)
    res["metrics"]     # {"format_compliance": ..., "answer_f1": ..., "reward_accuracy": ..., ...} in [0, 1]

Rooms: ``inputs.py`` (question / pair files), ``runner.py`` (EvalConfig, evaluate, reward accuracy),
``graph_eval.py`` (graph-format rewards per model), ``report.py`` (report, metrics chart), ``cli.py``
(``python -m preflexor_core.evaluation``). The metrics it reports come from earlier rooms: the format
check (``thinking.check``), SQuAD F1 / ROUGE-L (``text.metrics``), the training curves (``train.plots``). Tests: ``python -m pytest -q tests/test_evaluation.py``.
"""
from .cli import main
from .inputs import DEFAULT_QUESTIONS, EvaluationInputError, load_pairs, load_questions
from .report import format_table, plot_metrics, write_report
from .runner import METRIC_KEYS, EvalConfig, evaluate, evaluate_models, evaluate_stages, reward_accuracy

__all__ = ["load_questions", "load_pairs", "EvalConfig", "evaluate", "evaluate_models",
           "evaluate_stages", "reward_accuracy", "format_table", "plot_metrics",
           "write_report", "main", "METRIC_KEYS", "DEFAULT_QUESTIONS", "EvaluationInputError"]
