"""Graph-format evaluation: the reward components and the graph validity rate of each model's answers
to held-out questions, a markdown table, and every answer's graph as GraphML (and PNG).

    python -m preflexor_core.evaluation.graph_eval --model base=smollm2-135m-instruct \\
        --model stage3=runs/demo/stage3 --retriever runs/demo/retriever --n 8 --out runs/demo/graph_eval --graphml

``evaluate_graph(models, questions, retriever)`` -> one result per model: ``metrics`` (the mean of
each ``rewards.GraphRewards`` reward, the combined ``reward`` and ``graph_validity_rate`` = share of
answers whose graph validity is 1.0) and ``rows`` (question, completion, rewards). Generation is
greedy, the response opened with ``<|thinking|>``, the prompt asks for the graph sections.

References: Graph-PReFLexOR (arXiv 2501.08120). Tests: ``python -m pytest -q tests/test_grpo_stage.py -k graph_eval``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Sequence

import networkx as nx

from ..thinking.formats import chat
from ..thinking.graph_io import completion_digraph, export_graphml
from ..thinking.tokens import THINK_START
from ..llm.registry import load_model_and_tokenizer
from ..retrieval import GraphRetriever
from ..sampler import SamplingParams, generate
from ..rewards import REWARD_NAMES, GraphRewards
from .inputs import DEFAULT_QUESTIONS, load_questions

__all__ = ["completion_digraph", "export_graphml", "draw_graph", "graph_metrics", "evaluate_graph",
           "format_graph_table", "main"]

TABLE_KEYS = ("reward", "graph_validity_rate", *REWARD_NAMES[:-1])     # the judge is optional


def draw_graph(completion: str, path: str, title: str = "") -> str:
    """Draw the completion's graph to a PNG (spring layout, relations on the edges)."""
    import matplotlib  # matplotlib: heavy, loaded only to draw
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # matplotlib: as above
    g = completion_digraph(completion)
    fig = plt.figure(figsize=(9, 6.5))
    ax = fig.add_subplot(1, 1, 1)
    if len(g):
        pos = nx.spring_layout(g, seed=0, k=1.6 / max(1, len(g)) ** 0.5)
        nx.draw_networkx_nodes(g, pos, ax=ax, node_color="#cfe3f7", edgecolors="#36648b", node_size=1400)
        nx.draw_networkx_labels(g, pos, ax=ax, font_size=8)
        nx.draw_networkx_edges(g, pos, ax=ax, arrows=True, arrowsize=14, node_size=1400, edge_color="#555555")
        nx.draw_networkx_edge_labels(g, pos, ax=ax, font_size=7,
                                     edge_labels={(u, v): d.get("relation", "") for u, v, d in g.edges(data=True)})
    else:
        ax.text(0.5, 0.5, "no graph in this answer", ha="center", va="center")
    ax.set_title(title, fontsize=10)
    ax.axis("off")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def graph_metrics(completions: Sequence[str], references: Sequence[str], rewards: GraphRewards,
                  questions: Sequence[str] | None = None) -> tuple[dict, list]:
    """(metrics, per-completion Rewards): mean of each reward, ``reward`` and ``graph_validity_rate``."""
    if not completions:
        raise ValueError("graph_metrics: no completions to score")
    scored = rewards.score_many(list(completions), list(references), None if questions is None else list(questions))
    m = {"reward": sum(r.value for r in scored) / len(scored),
         "graph_validity_rate": sum(r.components.get("graph_validity", 0.0) >= 1.0 for r in scored) / len(scored)}
    for name in REWARD_NAMES:
        vals = [r.components[name] for r in scored if name in r.components]
        if vals:
            m[name] = sum(vals) / len(vals)
    return m, scored


def evaluate_graph(models: dict, questions: Sequence[dict], retriever, max_new_tokens: int = 384,
                   device: str = "cpu", out_dir: str | None = None, graphml: bool = False,
                   png: bool = False) -> list[dict]:
    """Answer ``questions`` (rows with "question", "reference") with each model (name -> spec or
    (model, tokenizer)); score with ``GraphRewards(corpus=retriever)``. ``graphml``: write each answer's
    graph to ``out_dir/<name>/<id>.graphml`` (``png``: also drawn to ``<id>.png``)."""
    rewards = GraphRewards(corpus=retriever, embedder=getattr(retriever, "embedder", None))
    refs = [q["reference"] if isinstance(q["reference"], str) else q["reference"][0] for q in questions]
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, prepend_response=THINK_START)
    results = []
    for name, spec in models.items():
        model, tok = spec if isinstance(spec, tuple) else load_model_and_tokenizer(spec, device=device)
        model.eval()
        chats = [chat(q["question"], "graph") for q in questions]
        texts = [o.text for o in generate(model, tok, chats, params)]
        metrics, scored = graph_metrics(texts, refs, rewards, [q["question"] for q in questions])
        rows = [{"id": str(q.get("id", i)), "question": q["question"], "completion": t, "reward": r.value,
                 "components": r.components} for i, (q, t, r) in enumerate(zip(questions, texts, scored))]
        if graphml and out_dir:
            for row in rows:
                row["graphml"] = export_graphml(row["completion"], os.path.join(out_dir, name, f"{row['id']}.graphml"))
        if png and out_dir:
            for row in rows:
                row["png"] = draw_graph(row["completion"], os.path.join(out_dir, name, f"{row['id']}.png"),
                                        f"{name}: {row['question']}")
        results.append({"name": name, "metrics": metrics, "rows": rows})
        del model
    return results


def format_graph_table(results: Sequence[dict]) -> str:
    keys = [k for k in TABLE_KEYS if any(k in r["metrics"] for r in results)]
    lines = ["| model | " + " | ".join(k.replace("_", " ") for k in keys) + " |",
             "|---" * (len(keys) + 1) + "|"]
    for r in results:
        lines.append(f"| {r['name']} | " + " | ".join(f"{r['metrics'][k]:.3f}" if k in r["metrics"] else "n/a"
                                                     for k in keys) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m preflexor_core.evaluation.graph_eval", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", action="append", required=True, metavar="NAME=SPEC",
                    help="a model to evaluate: a name for the table = a known model name, checkpoint dir or .gguf")
    ap.add_argument("--retriever", required=True, help="a saved retriever directory (the run's retriever/)")
    ap.add_argument("--questions", default=DEFAULT_QUESTIONS, help="held-out questions JSONL (default: shipped)")
    ap.add_argument("--n", type=int, default=8, help="questions evaluated (default: %(default)s)")
    ap.add_argument("--max-new-tokens", type=int, default=384, help="tokens per answer (default: %(default)s)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (default: %(default)s)")
    ap.add_argument("--out", default="graph_eval", help="output folder: results.json, table.md, GraphML files")
    ap.add_argument("--graphml", action="store_true", help="write each answer's graph as GraphML")
    ap.add_argument("--png", action="store_true", help="also draw each answer's graph as a PNG")
    ap.add_argument("--overwrite", action="store_true", help="replace results.json / table.md already in --out")
    a = ap.parse_args(argv)
    if not 1 <= a.n <= 10**6 or not 1 <= a.max_new_tokens <= 1 << 20:
        ap.error(f"--n must be in 1..1000000 and --max-new-tokens in 1..{1 << 20}; got {a.n} and {a.max_new_tokens}")
    earlier = [f for f in ("results.json", "table.md") if os.path.exists(os.path.join(a.out, f))]
    if earlier and not a.overwrite:     # before any work: an earlier report is kept unless asked
        ap.error(f"--out {a.out} already holds {', '.join(earlier)} (an earlier report?); pass --overwrite to "
                 f"replace it, or choose another --out")
    models = {}
    for m in a.model:
        name, sep, spec = m.partition("=")
        if not sep or not name or not spec:
            print(f"graph_eval: error: --model {m!r}: write NAME=SPEC, e.g. base=smollm2-135m-instruct", file=sys.stderr)
            return 2
        models[name] = spec
    results = evaluate_graph(models, load_questions(a.questions, limit=a.n), GraphRetriever.load(a.retriever),
                             a.max_new_tokens, a.device, a.out, a.graphml, a.png)
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "results.json"), "w", encoding="utf-8") as f:
        json.dump(results, f, indent=1)
    table = format_graph_table(results)
    with open(os.path.join(a.out, "table.md"), "w", encoding="utf-8") as f:
        f.write(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
