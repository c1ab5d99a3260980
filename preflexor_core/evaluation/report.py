"""Evaluation report: a markdown table and report, metrics.json / outputs.jsonl, and PNG charts.

``write_report`` writes ``report.md`` (metrics table, base answers beside the last model's, example
outputs, links to the plots), ``metrics.json`` (``{"models", "base", "architecture"}``),
``outputs.jsonl`` (every output with its scores), ``metrics.png`` (bars per model per metric) and,
with a training log, ``stage{N}.png`` and ``training.png`` from ``plot_training_log`` (which
training also calls). Plots use matplotlib's Agg canvas (no display).
Tests: ``python -m pytest -q tests/test_evaluation.py -k "report or plot"``.
"""
from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Sequence

from ..train.plots import figure as _figure, is_number as _num, plot_training_log  # noqa: F401  (plot_training_log: re-exported)

__all__ = ["plot_training_log", "plot_metrics", "format_table", "write_report", "base_vs_last"]

log = logging.getLogger("preflexor.evaluation")

_CHART_KEYS = ("format_compliance", "header_share", "answer_f1", "answer_rouge_l", "reward_accuracy")


# ============================================================================ plots

def plot_metrics(results: Sequence[dict], path: str) -> str:
    """Grouped bar chart: one group per metric, one bar per evaluated model/stage."""
    keys = [k for k in _CHART_KEYS if any(k in r["metrics"] for r in results)]
    fig = _figure(min(16.0, max(7.0, 0.7 * len(keys) * max(1, len(results)) + 3)), 4)
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / max(1, len(results))
    for i, r in enumerate(results):
        xs = [j + (i - (len(results) - 1) / 2) * width for j in range(len(keys))]
        vals = [r["metrics"].get(k, float("nan")) for k in keys]
        bars = ax.bar(xs, [0 if math.isnan(v) else v for v in vals], width, label=r["name"])
        for b, v in zip(bars, vals):
            ax.annotate("n/a" if math.isnan(v) else f"{v:.2f}", (b.get_x() + b.get_width() / 2, b.get_height()),
                        ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(keys)))
    ax.set_xticklabels([k.replace("_", " ") for k in keys], fontsize=9)
    ax.set_ylim(0, 1.08)
    ax.set_ylabel("score")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=90)
    return path


# ============================================================================ report

def _fmt(v, digits: int = 3) -> str:
    return "n/a" if v is None else (f"{v:.{digits}f}" if isinstance(v, float) else str(v))


def format_table(results: Sequence[dict]) -> str:
    """A markdown table: one row per evaluated model, one column per metric."""
    head = ["model", "questions", "format compliance", "header share", "thinking closed", "answer non-empty",
            "answer F1", "ROUGE-L", "reward acc.", "pairs", "truncated", "mean new tokens"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        m = r["metrics"]
        ra = m.get("reward_accuracy")
        lines.append("| " + " | ".join([
            r["name"], str(r["n_questions"]), _fmt(m["format_compliance"]), _fmt(m["header_share"]),
            _fmt(m["thinking_closed"]), _fmt(m["answer_nonempty"]), _fmt(m["answer_f1"]), _fmt(m["answer_rouge_l"]),
            _fmt(ra) + (f" (vs {os.path.basename(os.path.normpath(r['ref_model']))})" if ra is not None
                        else f" ({r['reward_note']})" if r.get("reward_note") else ""),
            str(r["n_pairs"]), _fmt(m["truncated"]), f"{r['mean_new_tokens']:.1f}"]) + " |")
    return "\n".join(lines)


def _fence(text: str) -> str:
    ticks = "```"
    while ticks in text:
        ticks += "`"
    return f"{ticks}text\n{text}\n{ticks}"


def _cell(text: str, limit: int = 400) -> str:
    text = " ".join(str(text).split())
    text = text if len(text) <= limit else text[:limit] + " [...]"
    return text.replace("|", "\\|") or "(empty)"


def base_vs_last(results: Sequence[dict], n: int = 3) -> list[str]:
    """Markdown lines: for the first ``n`` questions, the base model's answer beside the last model's
    (with their F1); [] without a result named "base" and another after it."""
    base = next((r for r in results if r["name"] == "base"), None)
    if base is None or results[-1] is base or n < 1:
        return []
    last = results[-1]
    by_id = {row["id"]: row for row in last["outputs"]}
    lines = [f"## Base vs {last['name']}", "", f"| question | reference | base answer | {last['name']} answer |",
             "|---|---|---|---|"]
    for b in base["outputs"][:n]:
        t = by_id.get(b["id"])
        if t is None:
            continue
        ref = b["reference"] if isinstance(b["reference"], str) else b["reference"][0]
        lines.append(f"| {_cell(b['question'])} | {_cell(ref)} | {_cell(b['answer'])} (F1 {b['f1']:.2f}) | "
                     f"{_cell(t['answer'])} (F1 {t['f1']:.2f}) |")
    return lines + [""]


def write_report(results: Sequence[dict], out_dir: str, log_path: str | None = None, n_examples: int = 3,
                 example_chars: int = 1200) -> dict:
    """Write report.md, metrics.json, outputs.jsonl, metrics.png (and the training curves when
    ``log_path`` is given) into ``out_dir``; returns ``{"report", "metrics_json", "outputs",
    "metrics_png", "training_plots"}`` paths."""
    os.makedirs(out_dir, exist_ok=True)
    metrics_png = plot_metrics(results, os.path.join(out_dir, "metrics.png"))
    plots = plot_training_log(log_path, out_dir) if log_path else []
    summary = [{k: v for k, v in r.items() if k != "outputs"} for r in results]
    mj = os.path.join(out_dir, "metrics.json")
    with open(mj, "w", encoding="utf-8") as f:
        json.dump({"models": summary, "base": next((r for r in summary if r["name"] == "base"), None),
                   "architecture": summary[0].get("architecture") if summary else None}, f, indent=2)
        f.write("\n")
    oj = os.path.join(out_dir, "outputs.jsonl")
    with open(oj, "w", encoding="utf-8") as f:
        for r in results:
            for row in r["outputs"]:
                f.write(json.dumps({"model": r["name"], **row}, ensure_ascii=False) + "\n")
    s = results[0]["settings"] if results else {}
    md = ["# Evaluation report", "",
          f"Questions: {results[0]['n_questions'] if results else 0}; generation: temperature "
          f"{s.get('temperature')}, top-p {s.get('top_p')}, max {s.get('max_new_tokens')} new tokens, "
          f"seed {s.get('seed')}, " + ("`<|thinking|>` forced at the start of every response."
                                        if s.get("force_thinking") else "nothing forced (the model opens its own thinking)."),
          "", format_table(results), "",
          *([f"Model: hidden size {a.get('hidden_size')}, {a.get('num_hidden_layers')} layers, "
             f"{a.get('parameters', 0) / 1e6:.1f}M parameters.", ""]
            if results and (a := results[0].get("architecture")) else []),
          *(["The base model is asked with a system message that describes the thinking format in words; "
             "`<thinking>` / `</thinking>` written as text count as the thinking tokens for every model.", ""]
            if any(r.get("instructed") for r in results) else []),
          "- **format compliance**: exactly one `<|thinking|>` ... `<|/thinking|>` block opening the response, "
          f"holding at least {s.get('min_headers', 1)} `**Category**:` header(s), followed by a non-empty answer.",
          "- **header share**: mean share of the thinking categories with a header in the thinking block.",
          "- **answer F1 / ROUGE-L**: SQuAD token F1 and ROUGE-L F-measure of the answer after the thinking "
          "against the reference.",
          f"- **reward acc.**: share of held-out preference pairs with beta*(log pi - log ref)(chosen) > "
          f"(rejected) on answer tokens only, beta = {s.get('beta')}; ties count as wrong.",
          "", "![metrics](metrics.png)", ""]
    if plots:
        md += ["## Training curves", ""] + [f"![{Path(p).stem}]({os.path.basename(p)})" for p in plots] + [""]
    md += base_vs_last(results)
    md += ["## Example outputs", ""]
    for r in results:
        md += [f"### {r['name']}", ""]
        for row in r["outputs"][:n_examples]:
            out = row["output"] if len(row["output"]) <= example_chars else row["output"][:example_chars] + " [...]"
            md += [f"**{row['id']}** — {row['question']}", "",
                   f"compliant: {'yes' if row['compliant'] else 'no'} ({row['format_reason']}); "
                   f"F1 {row['f1']:.3f}; ROUGE-L {row['rouge_l']:.3f}", "", _fence(out), ""]
    report = os.path.join(out_dir, "report.md")
    with open(report, "w", encoding="utf-8") as f:
        f.write("\n".join(md))
    return {"report": report, "metrics_json": mj, "outputs": oj, "metrics_png": metrics_png, "training_plots": plots}
