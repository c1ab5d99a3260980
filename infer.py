"""PRefLexOR inference CLI: recursive reflective reasoning (think, reflect, critic improves, answer again).

    python infer.py --reflect-depth 3 --question "Why is nacre tough?"       # embedded demo checkpoint
    python infer.py --questions qs.jsonl --critic http://127.0.0.1:8000/v1 --critic-model NAME --json trace.json
    python infer.py --model DIR --critic same --mode from-thinking --no-integrate --stream --question "..."

Every default lives in ``preflexor_core.reasoning.InferConfig``; the loop, the critics and the span
rules are in ``preflexor_core/reasoning.py``. This file parses flags, checks the inputs (bad input:
a specific message and exit code 2), runs the loop and prints / writes the trace.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

from preflexor_core.reasoning import (DEMO_COMMAND, DEMO_MODEL_DIRS, MODES, CriticUnreachableError,
                                      InferConfig, Policy, make_critic, recursive_response)

D = InferConfig()


class InputError(ValueError):
    """Bad command-line input: reported with exit code 2."""


def parse_args(argv=None) -> InferConfig:
    ap = argparse.ArgumentParser(description="Recursive reflective reasoning with a PRefLexOR model.")
    ap.add_argument("--question", action="append", default=[],
                    help="a question (repeat the flag for several; all are answered in one batch)")
    ap.add_argument("--questions", default=None, metavar="FILE",
                    help="questions from a file: .txt (one per line, blank lines skipped) or .jsonl "
                         "(a 'question' field per line)")
    ap.add_argument("--model", default=D.model, metavar="DIR",
                    help="checkpoint dir (config.json, *.safetensors, tokenizer.json); default: the embedded "
                         f"demo checkpoint, the first of {', '.join(DEMO_MODEL_DIRS)} that exists")
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
                       reflect_depth=a.reflect_depth, mode=a.mode, integrate=a.integrate,
                       max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_p=a.top_p,
                       top_k=a.top_k, seed=a.seed, stream=a.stream, json=a.json, device=a.device)


def read_questions(path: str) -> list[str]:
    if not os.path.isfile(path):
        raise InputError(f"--questions file not found: {path}")
    out = []
    with open(path, encoding="utf-8") as f:
        if path.endswith(".jsonl"):
            for n, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise InputError(f"{path}:{n}: not valid JSON ({e.msg})") from None
                q = row.get("question") if isinstance(row, dict) else None
                if not isinstance(q, str) or not q.strip():
                    raise InputError(f"{path}:{n}: needs a non-empty string field 'question'")
                out.append(q.strip())
        else:
            out = [line.strip() for line in f if line.strip()]
    if not out:
        raise InputError(f"--questions file {path} holds no questions")
    return out


def resolve_model(model: str | None) -> str:
    hint = f"create the demo checkpoint with {DEMO_COMMAND}, or pass --model DIR"
    if model is None:
        for d in DEMO_MODEL_DIRS:
            if os.path.isfile(os.path.join(d, "config.json")):
                return d
        raise InputError(f"no model: the embedded demo checkpoint ({' / '.join(DEMO_MODEL_DIRS)}) does not "
                         f"exist in {os.getcwd()}; {hint}")
    if not os.path.isdir(model):
        raise InputError(f"model dir not found: {model}; {hint}")
    for need in ("config.json", "tokenizer.json"):
        if not os.path.isfile(os.path.join(model, need)):
            raise InputError(f"model dir {model} has no {need}; expected a checkpoint dir written by "
                             f"train.py (config.json, *.safetensors, tokenizer.json); {hint}")
    return model


def check_inputs(cfg: InferConfig) -> None:
    if cfg.questions_file:
        cfg.questions = cfg.questions + read_questions(cfg.questions_file)
    if not cfg.questions:
        raise InputError("no question: pass --question \"...\" (repeatable) or --questions FILE")
    for i, q in enumerate(cfg.questions):
        if not q.strip():
            raise InputError(f"question {i + 1} is empty: give --question a non-empty text")
    cfg.questions = [q.strip() for q in cfg.questions]
    if cfg.reflect_depth < 0:
        raise InputError(f"--reflect-depth must be >= 0 (0 = a single pass), got {cfg.reflect_depth}")
    if cfg.max_new_tokens < 1:
        raise InputError(f"--max-new-tokens must be >= 1, got {cfg.max_new_tokens}")
    if cfg.temperature < 0:
        raise InputError(f"--temperature must be >= 0 (0 = greedy), got {cfg.temperature}")
    if not 0 < cfg.top_p <= 1:
        raise InputError(f"--top-p must be in (0, 1], got {cfg.top_p}")
    if cfg.top_k < 0:
        raise InputError(f"--top-k must be >= 0 (0 = off), got {cfg.top_k}")
    if cfg.critic is None:
        cfg.critic = "graph" if os.path.isdir(cfg.retriever) else "same"
    if cfg.critic == "graph" and cfg.reflect_depth > 0 and not os.path.isdir(cfg.retriever):
        raise InputError(f"--critic graph needs a retriever dir, but {cfg.retriever} does not exist "
                         f"({DEMO_COMMAND} writes runs/demo/retriever); pass --retriever DIR or --critic same")
    c = cfg.critic
    if c not in ("same", "graph") and not c.startswith(("http://", "https://")) and not os.path.isdir(c):
        raise InputError(f"--critic {c!r} is not same, graph, an http(s):// URL or an existing checkpoint dir")
    cfg.model = resolve_model(cfg.model)


def build_critic(cfg: InferConfig, policy: Policy):
    if cfg.reflect_depth == 0:
        return None
    retriever = None
    if cfg.critic == "graph":
        from preflexor_core.retrieval import GraphRetriever
        try:
            retriever = GraphRetriever.load(cfg.retriever)
        except (OSError, ValueError, KeyError) as e:
            raise InputError(f"could not load the retriever in {cfg.retriever} ({type(e).__name__}: {e}); "
                             f"rebuild it ({DEMO_COMMAND} writes runs/demo/retriever) or pass --critic same") from None
    try:
        return make_critic(cfg.critic, policy=policy, retriever=retriever, critic_model=cfg.critic_model,
                           max_new_tokens=cfg.max_new_tokens, seed=cfg.seed, timeout=cfg.critic_timeout,
                           check_timeout=cfg.check_timeout)
    except CriticUnreachableError as e:
        raise InputError(f"{e}; start the server or choose another --critic (graph, same or a checkpoint dir)") from None
    except ValueError as e:
        raise InputError(str(e)) from None


class _Streamer:
    """Prints policy text as it is generated, readable for a batch: in every step the first
    question's tokens are printed live, the other questions' text of that step is printed as a
    block once the next step starts (steps run one after another), or at :meth:`flush`."""

    def __init__(self, out=sys.stdout):
        self.out = out
        self.step = None        # (iteration, step name) now streaming
        self.live = None        # question printed live in this step
        self.held: dict[int, str] = {}

    def _header(self, q: int) -> None:
        it, name = self.step
        self.out.write(f"\n[question {q + 1} | iteration {it} | {name}] ")

    def flush(self) -> None:
        for q in sorted(self.held):
            self._header(q)
            self.out.write(self.held[q])
        self.held = {}
        self.out.flush()

    def __call__(self, q: int, iteration: int, step: str, delta: str) -> None:
        if (iteration, step) != self.step:
            self.flush()
            self.step, self.live = (iteration, step), q
            self._header(q)
        if q == self.live:
            self.out.write(delta)
            self.out.flush()
        else:
            self.held[q] = self.held.get(q, "") + delta


def main(argv=None) -> int:
    cfg = parse_args(argv)
    try:
        check_inputs(cfg)
    except InputError as e:
        print(f"infer.py: error: {e}", file=sys.stderr)
        return 2
    from preflexor_core.sampler import SamplingParams
    policy = Policy.from_pretrained(cfg.model, device=cfg.device)
    try:
        critic = build_critic(cfg, policy)
    except InputError as e:
        print(f"infer.py: error: {e}", file=sys.stderr)
        return 2
    sampling = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                              top_k=cfg.top_k, seed=cfg.seed)
    streamer = _Streamer() if cfg.stream else None
    t0 = time.perf_counter()
    traces = recursive_response(policy, critic, cfg.questions, depth=cfg.reflect_depth, sampling=sampling,
                                mode=cfg.mode, integrate=cfg.integrate, stream=streamer)
    elapsed = time.perf_counter() - t0
    if streamer is not None:
        streamer.flush()
        print("\n")
    for i, tr in enumerate(traces, start=1):
        print(f"Question {i}: {tr.question}")
        print(f"Answer ({len(tr.iterations)} iteration(s){', integrated' if tr.integrated else ''}): "
              f"{tr.final_answer or '(empty)'}\n")
    if cfg.json:
        options = {k: v for k, v in vars(cfg).items() if k != "questions"}
        options["critic_name"] = getattr(critic, "name", None)
        doc = {"options": options, "elapsed_s": elapsed, "questions": [tr.to_dict() for tr in traces]}
        parent = os.path.dirname(os.path.abspath(cfg.json))
        os.makedirs(parent, exist_ok=True)
        tmp = cfg.json + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=2, ensure_ascii=False)
        os.replace(tmp, cfg.json)
        print(f"trace written to {cfg.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
