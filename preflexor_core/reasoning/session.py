"""The recursive-reasoning session ``infer.py`` drives: its config, input checks, critic, streaming, output.

``infer.py`` only parses flags into :class:`InferConfig` (every option, its default and help; the
``--preset`` recipes in ``PRESETS``) and calls :func:`main`. Bad input (checked
before any work: questions, --device, the --json path, a critic URL that does not answer) is reported
with a specific message and exit code 2; a trace that cannot be written goes to a fallback file.
``--thinking-format graph`` asks for the graph sections; each answer is followed by one line with the
final thinking's graph (nodes, edges, graph validity), and ``--graph-out DIR`` writes it as GraphML.
Method: PRefLexOR, arXiv 2410.12375.
Tests: ``python -m pytest -q tests/test_reasoning.py -k infer``.
"""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from typing import Literal

from ..datagen.options import ThinkingFormatOptions
from ..infra.cli import DeviceOptions, GenerationOptions, SeedOptions, opt
from ..infra.errors import DeviceError, check_device
from ..infra.io import (JSONLError, OutputPathError, atomic_write, check_output_dir, check_output_file, read_jsonl,
                        write_fallback)
from ..llm.registry import (NAMED_MODELS, DtypeError, DtypeOptions, ModelSpecError, load_model_and_tokenizer,
                            parse_dtype, resolve_checkpoint, resolve_device)
from ..retrieval import GraphRetriever
from ..sampler import SamplingParams
from ..sampler.params import MAX_NEW_TOKENS, DecodeWeightsOptions
from ..teachers.net import redact_url
from ..thinking.formats import check_format_name
from ..thinking.graph_io import completion_digraph, export_graphml
from .critics import CriticUnreachableError, check_endpoint, make_critic
from .loop import MODES, recursive_response
from .policy import Policy

__all__ = ["InferConfig", "InputError", "PRESETS", "DEMO_MODEL_DIRS", "DEMO_RETRIEVER", "DEMO_COMMAND",
           "read_questions", "resolve_model", "check_inputs", "build_critic", "main"]

DEMO_MODEL_DIRS = ("runs/demo/stage2", "runs/demo/stage1", "runs/demo/stage0")
DEMO_RETRIEVER = "runs/demo/retriever"
DEMO_COMMAND = "`make demo` (or `python train.py --stage all`)"


@dataclass(kw_only=True)
class InferConfig(GenerationOptions, SeedOptions, DeviceOptions, DtypeOptions, ThinkingFormatOptions,
                  DecodeWeightsOptions):
    """Every option and default of ``infer.py`` (the CLI only parses flags into this)."""

    questions: list[str] = opt(factory=list, help="a question (repeat the flag for several; all are answered in "
                               "one batch)", flag="--question", action="append", metavar="TEXT")
    questions_file: str | None = opt(None, "questions from a file: .txt (one per line, blank lines skipped) or "
                                     ".jsonl (a 'question' field per line)", flag="--questions", metavar="FILE")
    model: str | None = opt(None, "checkpoint folder (config.json, *.safetensors, tokenizer.json), a .gguf file "
                            f"or a known model name ({', '.join(NAMED_MODELS)}); default: the embedded demo "
                            f"checkpoint, the first of {', '.join(DEMO_MODEL_DIRS)} that exists",
                            metavar="DIR|FILE.gguf|NAME")
    retriever: str | None = opt(None, f"GraphRetriever folder used by the graph critic (default: {DEMO_RETRIEVER})",
                                metavar="DIR")
    critic: str | None = opt(None, "same (the policy prompted as critic), graph (offline, retriever-based), a "
                             "checkpoint DIR, or the URL of an OpenAI-compatible server; default: graph when "
                             "the retriever exists, else same")
    critic_model: str | None = opt(None, "model name sent to a critic URL (default: the first model the server "
                                   "lists)", metavar="NAME")
    reflect_depth: int = opt(3, "critic/answer iterations; 0 = a single pass without critic", metavar="N")
    mode: Literal[MODES] = opt("reflect", "reflect: the policy writes its own <|reflect|> feedback; "
                               "from-thinking: the critic writes the feedback from the thinking")
    graph_out: str | None = opt(None, "with --thinking-format graph: write each question's final graph as GraphML "
                                "to DIR/q1.graphml, DIR/q2.graphml, ...", metavar="DIR")
    integrate: bool = opt(True, "merge the answers of all iterations into the final answer")
    top_k: int = opt(50, "top-k sampling, 0 = off")
    stream: bool = opt(False, "print policy tokens as they are generated")
    json: str | None = opt(None, "write the whole trace (per question and iteration) and the options to OUT",
                           metavar="OUT")
    critic_timeout: float = 60.0          # not options: an HTTP critic's deadline, and its first check's
    check_timeout: float = 3.0


# The `make demo` recipes (infer.py --preset NAME): field values on top of the defaults.
PRESETS: dict[str, dict] = {
    "demo": {"reflect_depth": 3, "max_new_tokens": 640, "temperature": 0.1, "device": "cpu"},
    "demo-tiny": {"reflect_depth": 3, "max_new_tokens": 768, "temperature": 0.1, "device": "cpu"},
}


class InputError(ValueError):
    """Bad command-line input: reported with exit code 2."""


def read_questions(path: str) -> list[str]:
    """Questions from a .txt file (one per line, blank lines skipped) or .jsonl ("question" field)."""
    if not os.path.isfile(path):
        raise InputError(f"--questions file not found: {path}")
    if path.endswith(".jsonl"):
        try:
            rows = list(read_jsonl(path, what="--questions"))
        except JSONLError as e:
            raise InputError(str(e)) from None
        out = []
        for n, row in rows:
            q = row.get("question")
            if not isinstance(q, str) or not q.strip():
                raise InputError(f"{path}:{n}: needs a non-empty string field 'question'")
            out.append(q.strip())
        return _nonempty(out, path)
    binary = (f"--questions {path}: not a text file (binary content); give a .txt file (one question per "
              "line) or a .jsonl file (a 'question' field per line)")
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.readlines()
    except UnicodeDecodeError:
        raise InputError(binary) from None
    if any("\x00" in line for line in lines):
        raise InputError(binary)
    return _nonempty([line.strip() for line in lines if line.strip()], path)


def _nonempty(out: list[str], path: str) -> list[str]:
    if not out:
        raise InputError(f"--questions file {path} holds no questions")
    return out


def resolve_model(model: str | None) -> str:
    """``model`` as a checked checkpoint path (``llm.registry.resolve_checkpoint``); None -> the first demo
    checkpoint that exists. Errors are :class:`InputError` saying how to make or name a model."""
    hint = f"create the demo checkpoint with {DEMO_COMMAND}, or pass --model DIR|FILE.gguf|NAME"
    if model is None:
        for d in DEMO_MODEL_DIRS:
            if os.path.isfile(os.path.join(d, "config.json")):
                return d
        raise InputError(f"no model: the embedded demo checkpoint ({' / '.join(DEMO_MODEL_DIRS)}) does not "
                         f"exist in {os.getcwd()}; {hint}")
    try:
        return resolve_checkpoint(model)
    except ModelSpecError as e:
        raise InputError(f"--model: {e}; {hint}") from None


def check_inputs(cfg: InferConfig) -> None:
    """Validate ``cfg`` and fill in what it leaves open (questions from the file, critic, model)."""
    if cfg.questions_file:
        cfg.questions = cfg.questions + read_questions(cfg.questions_file)
    if not cfg.questions:
        raise InputError("no question: pass --question \"...\" (repeatable) or --questions FILE")
    for i, q in enumerate(cfg.questions):
        if not q.strip():
            raise InputError(f"question {i + 1} is empty: give --question a non-empty text")
    cfg.questions = [q.strip() for q in cfg.questions]
    if not 0 <= cfg.reflect_depth <= 64:
        raise InputError(f"--reflect-depth must be >= 0 and <= 64 (0 = a single pass), got {cfg.reflect_depth}")
    if not 1 <= cfg.max_new_tokens <= MAX_NEW_TOKENS:
        raise InputError(f"--max-new-tokens must be >= 1 and <= {MAX_NEW_TOKENS}, got {cfg.max_new_tokens}")
    if not 0 <= cfg.temperature <= 100:        # NaN fails too
        raise InputError(f"--temperature must be >= 0 (0 = greedy) and <= 100, got {cfg.temperature}")
    if not 0 < cfg.top_p <= 1:
        raise InputError(f"--top-p must be in (0, 1], got {cfg.top_p}")
    if not 0 <= cfg.seed < 2**63:
        raise InputError(f"--seed must be in 0..2**63-1, got {cfg.seed}")
    if cfg.top_k < 0:
        raise InputError(f"--top-k must be >= 0 (0 = off), got {cfg.top_k}")
    try:
        check_format_name(cfg.thinking_format, where="--thinking-format")
    except ValueError as e:
        raise InputError(str(e)) from None
    if cfg.graph_out and cfg.thinking_format != "graph":
        raise InputError(f"--graph-out needs --thinking-format graph (got {cfg.thinking_format}): only graph "
                         "thinking holds a graph to export")
    if cfg.retriever is None:
        cfg.retriever = DEMO_RETRIEVER
    if cfg.critic is None:
        cfg.critic = "graph" if os.path.isdir(cfg.retriever) else "same"
    if cfg.critic == "graph" and cfg.reflect_depth > 0 and not os.path.isdir(cfg.retriever):
        raise InputError(f"--critic graph needs a retriever dir, but {cfg.retriever} does not exist "
                         f"({DEMO_COMMAND} writes runs/demo/retriever); pass --retriever DIR or --critic same")
    c = cfg.critic
    if c not in ("same", "graph") and not c.startswith(("http://", "https://")) and not os.path.isdir(c):
        raise InputError(f"--critic {c!r} is not same, graph, an http(s):// URL or an existing checkpoint dir")
    check_device(cfg.device)
    cfg.device = resolve_device(cfg.device) if cfg.device in (None, "auto") else cfg.device
    try:
        parse_dtype(cfg.dtype, cfg.device)
    except DtypeError as e:
        raise InputError(f"--dtype: {e}") from None
    if cfg.json:
        check_output_file(cfg.json, "--json")
    if cfg.graph_out:
        check_output_dir(cfg.graph_out, "--graph-out")
    cfg.model = resolve_model(cfg.model)
    if c.startswith(("http://", "https://")) and cfg.reflect_depth > 0:
        try:          # before the model loads; make_critic asks again for the model list
            check_endpoint(c, timeout=cfg.check_timeout)
        except CriticUnreachableError as e:
            raise InputError(f"--critic: {e}; start the server or choose another --critic (graph, same or a "
                             "checkpoint dir)") from None


def build_critic(cfg: InferConfig, policy: Policy):
    """The critic ``cfg.critic`` names (None at depth 0); loading failures raise :class:`InputError`."""
    if cfg.reflect_depth == 0:
        return None
    retriever = None
    if cfg.critic == "graph":
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

    def __init__(self, out=None):
        self.out = out if out is not None else sys.stdout   # looked up now: stdout may be redirected
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


def _write_json(cfg: InferConfig, critic, traces, elapsed: float) -> None:
    """The trace to ``cfg.json``; when that write fails, to a fallback file, and an error that says where."""
    options = {k: redact_url(v) for k, v in vars(cfg).items() if k != "questions"}   # no password in a trace
    options["critic_name"] = getattr(critic, "name", None)
    doc = {"options": options, "elapsed_s": elapsed, "questions": [tr.to_dict() for tr in traces]}
    text = json.dumps(doc, indent=2, ensure_ascii=False, default=str)
    try:
        os.makedirs(os.path.dirname(os.path.abspath(cfg.json)), exist_ok=True)
        atomic_write(cfg.json, text)
    except OSError as e:
        saved = write_fallback(os.path.basename(cfg.json) or "trace.json", text)
        raise OutputPathError(f"--json {cfg.json}: could not write the trace ({e.strerror or e}); it was saved "
                              f"to {saved} instead") from None
    print(f"trace written to {cfg.json}")


def graph_line(tr) -> str:
    """``graph: N nodes, M edges, validity V`` of the final thinking of ``tr`` (a graph-format trace)."""
    last = tr.iterations[-1]
    g = completion_digraph(last.completion())
    return (f"graph: {g.number_of_nodes()} nodes, {g.number_of_edges()} edges, "
            f"validity {last.rewards.get('graph_validity', 0.0):.2f}")


def _write_graphs(out_dir: str, traces) -> None:
    """Each question's final graph to ``out_dir/q<N>.graphml`` (``graph_eval.export_graphml``)."""
    try:
        for i, tr in enumerate(traces, start=1):
            export_graphml(tr.iterations[-1].completion(), os.path.join(out_dir, f"q{i}.graphml"))
    except OSError as e:
        raise OutputPathError(f"--graph-out {out_dir}: could not write the graphs ({e.strerror or e})") from None
    print(f"graphs written to {out_dir} (q1.graphml .. q{len(traces)}.graphml)")


def main(cfg: InferConfig) -> int:
    """Run inference for ``cfg``: print each answer, write the trace JSON; 2 on bad input."""
    try:
        check_inputs(cfg)
        policy = Policy(*load_model_and_tokenizer(cfg.model, cfg.device, cfg.dtype), decode_weights=cfg.decode_weights)
        critic = build_critic(cfg, policy)
    except (InputError, OutputPathError, DeviceError) as e:
        print(f"infer.py: error: {e}", file=sys.stderr)
        return 2
    sampling = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                              top_k=cfg.top_k, seed=cfg.seed)
    streamer = _Streamer() if cfg.stream else None
    t0 = time.perf_counter()
    traces = recursive_response(policy, critic, cfg.questions, depth=cfg.reflect_depth, sampling=sampling,
                                mode=cfg.mode, integrate=cfg.integrate, stream=streamer,
                                thinking_format=cfg.thinking_format)
    elapsed = time.perf_counter() - t0
    if streamer is not None:
        streamer.flush()
        print("\n")
    for i, tr in enumerate(traces, start=1):
        print(f"Question {i}: {tr.question}")
        print(f"Answer ({len(tr.iterations)} iteration(s){', integrated' if tr.integrated else ''}): "
              f"{tr.final_answer or '(empty)'}")
        if cfg.thinking_format == "graph":
            print(graph_line(tr))
        print()
    try:
        if cfg.graph_out:
            _write_graphs(cfg.graph_out, traces)
        if cfg.json:
            _write_json(cfg, critic, traces, elapsed)
    except OutputPathError as e:
        print(f"infer.py: error: {e}", file=sys.stderr)
        return 2
    return 0
