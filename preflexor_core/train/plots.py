"""Training curves: ``stage{N}.png`` per stage and ``training.png`` over all stages, from ``log.jsonl``.

Training calls ``plot_training_log`` at the end of a run; the evaluation report links the same
plots. matplotlib's Agg canvas (no display); matplotlib is imported only when a plot is drawn.

Tests: ``python -m pytest -q tests/test_evaluation.py -k plot``.
"""
from __future__ import annotations

import logging
import math
import os

from ..infra.io import read_jsonl

log = logging.getLogger("preflexor.train")

_LOG_KEYS = ("loss", "nll", "rewards/accuracies", "rewards/margins", "reward", "reward/format",
             "reward/graph_validity", "reward/groundedness", "reward/graph_utility", "reward/correctness")


def figure(w: float, h: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # matplotlib: heavy, loaded only to draw
    from matplotlib.figure import Figure  # matplotlib: as above
    fig = Figure(figsize=(w, h))
    FigureCanvasAgg(fig)
    return fig


def _stage_key(s) -> tuple:
    try:
        return (0, int(s), "")
    except (TypeError, ValueError):
        return (1, 0, str(s))


def _plot_stage(s, rs: list[dict], keys: list[str], out_dir: str) -> str:
    """``stage{s}.png``: one panel per logged key against global_step, dotted lines at regenerations."""
    fig = figure(4 * len(keys), 3.2)
    for j, k in enumerate(keys):
        ax = fig.add_subplot(1, len(keys), j + 1)
        pts = [(r["global_step"], r[k]) for r in rs if is_number(r.get(k))]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], lw=1.2, marker="." if len(pts) < 30 else None)
        for x in _iteration_starts(rs):
            ax.axvline(x, color="grey", ls=":", lw=0.8)
        ax.set_title(f"stage {s}: {k}", fontsize=10)
        ax.set_xlabel("global step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path = os.path.join(out_dir, f"stage{s}.png")
    fig.savefig(path, dpi=90)
    return path


def _plot_all_stages(per_stage: dict, out_dir: str) -> str:
    """``training.png``: every stage one after the other on a shared step axis (dashed boundaries)."""
    stages = list(per_stage)
    keys = [k for k in _LOG_KEYS if any(k in per_stage[s][1] for s in stages)]
    ncols = min(2, len(keys))
    nrows = math.ceil(len(keys) / ncols)
    fig = figure(5.5 * ncols, 3.4 * nrows)
    offset = float(per_stage[stages[0]][0][0]["global_step"])   # the first stage keeps its own steps
    spans = []
    for s in stages:
        rs, _ = per_stage[s]
        lo, hi = rs[0]["global_step"], rs[-1]["global_step"]
        spans.append((s, offset - lo, offset))
        offset += hi - lo + 1
    for j, k in enumerate(keys):
        ax = fig.add_subplot(nrows, ncols, j + 1)
        for c, (s, shift, start) in enumerate(spans):
            pts = [(r["global_step"] + shift, r[k]) for r in per_stage[s][0] if is_number(r.get(k))]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], lw=1.2, color=f"C{c}", label=f"stage {s}")
            if c > 0:
                ax.axvline(start - 0.5, color="black", ls="--", lw=0.8)
        ax.set_title(k, fontsize=10)
        ax.set_xlabel("step (stages in sequence)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = os.path.join(out_dir, "training.png")
    fig.savefig(path, dpi=90)
    return path


def plot_training_log(log_path: str, out_dir: str) -> list[str]:
    """Training curves from a trainer ``log.jsonl``: ``stage{N}.png`` per stage (loss, nll, reward
    accuracy and margins against global_step, those logged; dotted lines at dataset regenerations)
    and ``training.png`` (every stage one after the other on a shared step axis). Returns the
    written paths; [] (with a warning) when the log is missing or holds no loss rows."""
    if not os.path.isfile(log_path):
        log.warning("plot_training_log: no log at %s; nothing plotted", log_path)
        return []
    rows = [r for _, r in read_jsonl(log_path, skip_bad=True) if "stage" in r and "loss" in r and "event" not in r
            and isinstance(r.get("global_step"), (int, float))]
    stages = sorted({r["stage"] for r in rows}, key=_stage_key)
    if not stages:
        log.warning("plot_training_log: %s has no loss rows; nothing plotted", log_path)
        return []
    os.makedirs(out_dir, exist_ok=True)
    per_stage = {}
    for s in stages:
        rs = sorted((r for r in rows if r["stage"] == s), key=lambda r: r["global_step"])
        per_stage[s] = (rs, [k for k in _LOG_KEYS if any(is_number(r.get(k)) for r in rs)])
    written = [_plot_stage(s, rs, keys, out_dir) for s, (rs, keys) in per_stage.items()]
    return written + [_plot_all_stages(per_stage, out_dir)]


def is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _iteration_starts(rs: list[dict]) -> list[float]:
    xs, prev = [], None
    for r in rs:
        it = r.get("iteration")
        if it is not None and prev is not None and it != prev:
            xs.append(r["global_step"] - 0.5)
        prev = it if it is not None else prev
    return xs
