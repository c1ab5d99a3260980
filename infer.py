"""PRefLexOR inference CLI: recursive reflective reasoning (think, reflect, critic improves, answer again).

    python infer.py --reflect-depth 3 --question "Why is nacre tough?"       # embedded demo checkpoint
    python infer.py --questions qs.jsonl --critic http://127.0.0.1:8000/v1 --critic-model NAME --json trace.json
    python infer.py --model DIR --critic same --mode from-thinking --no-integrate --stream --question "..."
    python infer.py --model DIR --thinking-format graph --graph-out graphs/ --question "..."   # graph thinking

This file parses flags into ``preflexor_core.reasoning.cli.InferConfig`` (where every default lives)
and calls ``preflexor_core.reasoning.cli.main(cfg)``, which checks the inputs (bad input: a specific
message and exit code 2), runs the loop and prints / writes the trace. Any other project error is
one ``error:`` line too (``errors.run_cli``; ``PREFLEXOR_DEBUG=1`` shows the traceback).
Tests: ``python -m pytest -q tests/test_reasoning.py -k infer``.
"""
from __future__ import annotations

import argparse
import sys

from preflexor_core.llm.registry import DTYPE_CHOICES, NAMED_MODELS
from preflexor_core.reasoning import MODES
from preflexor_core.reasoning.cli import DEMO_MODEL_DIRS, InferConfig
from preflexor_core.reasoning.cli import main as run
from preflexor_core.thinking.formats import THINKING_FORMATS

D = InferConfig()


def parse_args(argv=None) -> InferConfig:
    ap = argparse.ArgumentParser(description="Recursive reflective reasoning with a PRefLexOR model.")
    ap.add_argument("--question", action="append", default=[],
                    help="a question (repeat the flag for several; all are answered in one batch)")
    ap.add_argument("--questions", default=None, metavar="FILE",
                    help="questions from a file: .txt (one per line, blank lines skipped) or .jsonl "
                         "(a 'question' field per line)")
    ap.add_argument("--model", default=D.model, metavar="DIR|FILE.gguf|NAME",
                    help="checkpoint dir (config.json, *.safetensors, tokenizer.json), a .gguf file, or a known "
                         f"model name ({', '.join(NAMED_MODELS)}); default: the embedded "
                         f"demo checkpoint, the first of {', '.join(DEMO_MODEL_DIRS)} that exists")
    ap.add_argument("--dtype", default=D.dtype, choices=DTYPE_CHOICES,
                    help="weights dtype; auto = bfloat16 on cuda, float32 on cpu (default: %(default)s)")
    ap.add_argument("--decode-weights", default=D.decode_weights, choices=("fp", "int8"),
                    help="policy generation: fp = in the weights' dtype, int8 = weight-only int8 copies with "
                         "per-channel scales, LM head included (on CPU at batch 1-2 about 1.7x bf16 and 3x fp32 "
                         "decode speed; slightly different outputs; slower than fp at large batches) "
                         "(default: %(default)s)")
    ap.add_argument("--retriever", default=D.retriever, metavar="DIR",
                    help="GraphRetriever dir used by the graph critic (default: %(default)s)")
    ap.add_argument("--critic", default=D.critic,
                    help="same (the policy prompted as critic), graph (offline, retriever-based), a checkpoint "
                         "DIR, or the URL of an OpenAI-compatible server; default: graph when --retriever "
                         "exists, else same")
    ap.add_argument("--critic-model", default=D.critic_model, metavar="NAME",
                    help="model name sent to a critic URL (default: the first model the server lists)")
    ap.add_argument("--reflect-depth", type=int, default=D.reflect_depth, metavar="N",
                    help="critic/answer iterations; 0 = a single pass without critic (default: %(default)s)")
    ap.add_argument("--mode", choices=MODES, default=D.mode,
                    help="reflect: the policy writes its own <|reflect|> feedback; from-thinking: the critic "
                         "writes the feedback from the thinking (default: %(default)s)")
    ap.add_argument("--thinking-format", choices=THINKING_FORMATS, default=D.thinking_format,
                    help="the thinking the policy is asked for: categories, or graph (Brainstorm, Graph, Graph "
                         "JSON, Patterns, Synthesis; prints each final graph's size and validity) "
                         "(default: %(default)s)")
    ap.add_argument("--graph-out", default=D.graph_out, metavar="DIR",
                    help="with --thinking-format graph: write each question's final graph as GraphML to "
                         "DIR/q1.graphml, DIR/q2.graphml, ...")
    ap.add_argument("--integrate", action=argparse.BooleanOptionalAction, default=D.integrate,
                    help="merge the answers of all iterations into the final answer (default: on)")
    ap.add_argument("--max-new-tokens", type=int, default=D.max_new_tokens,
                    help="new tokens per generation step (policy and model critics) (default: %(default)s)")
    ap.add_argument("--temperature", type=float, default=D.temperature,
                    help="policy sampling temperature; 0 = greedy (default: %(default)s)")
    ap.add_argument("--top-p", type=float, default=D.top_p, help="nucleus sampling (default: %(default)s)")
    ap.add_argument("--top-k", type=int, default=D.top_k, help="top-k sampling, 0 = off (default: %(default)s)")
    ap.add_argument("--seed", type=int, default=D.seed, help="sampling seed (default: %(default)s)")
    ap.add_argument("--stream", action="store_true", help="print policy tokens as they are generated")
    ap.add_argument("--json", default=D.json, metavar="OUT",
                    help="write the whole trace (per question and iteration) and the options to OUT")
    ap.add_argument("--device", default=D.device, help="cpu or cuda (default: %(default)s)")
    a = ap.parse_args(argv)
    return InferConfig(questions=list(a.question), questions_file=a.questions, model=a.model,
                       retriever=a.retriever, critic=a.critic, critic_model=a.critic_model,
                       reflect_depth=a.reflect_depth, mode=a.mode, thinking_format=a.thinking_format,
                       graph_out=a.graph_out, integrate=a.integrate,
                       max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_p=a.top_p,
                       top_k=a.top_k, seed=a.seed, stream=a.stream, json=a.json, device=a.device,
                       dtype=a.dtype, decode_weights=a.decode_weights)


def main(argv=None) -> int:
    return run(parse_args(argv))


if __name__ == "__main__":
    from preflexor_core.infra.errors import run_cli
    sys.exit(run_cli(main))
