"""GRPO generation throughput: a stage-3 generation batch against the sampler at the same batch size.

    python -m pytest tests/benchmarks/test_bench_grpo.py --benchmark-only -s

A GRPO step generates G completions for each of P prompts in one ``sampler.generate`` call with
``SamplingParams(n=G)``: the G rows of a prompt share one prefill (``GRPOStage.generate_batch``, which
this benchmark calls on a real stage-3 run object). The baseline is the sampler on the same P * G
rows as independent prompts (``n=1``, each row prefilled), the same sampling settings and the same
model. Sampled at temperature 1, stop tokens disabled, so both sides generate exactly N tokens per
row:

    ratio = (GRPO generated tokens/s) / (sampler generated tokens/s)     (target >= 0.8)

The two sides alternate over rounds (load from other processes hits both alike); the best time of
each is kept. One torch thread unless ``PREFLEXOR_BENCH_THREADS`` says otherwise. Model: the ``small``
preset (random init), whose per-token cost is closer to SmolLM2's than ``tiny``'s.
"""
from __future__ import annotations

import dataclasses
import os
import time

import pytest
import torch

from preflexor_core.sampler import SamplingParams, generate
from preflexor_core.thinking.tokens import THINK_START
from preflexor_core.train import TrainConfig, Trainer
from preflexor_core.train.grpo_stage import GRPOStage

PROMPTS, G, NEW_TOKENS, ROUNDS = 4, 4, 128, 3
CORPUS = ("Nacre is a brick-and-mortar composite of aragonite tablets and a thin organic matrix. "
          "Tablet sliding dissipates energy in nacre. Bone is a hierarchical composite of collagen fibrils "
          "and hydroxyapatite mineral. Spider silk owes its strength to beta-sheet nanocrystals.\n\n") * 6


@pytest.fixture(scope="module")
def stage3(tmp_path_factory):
    d = tmp_path_factory.mktemp("grpo-bench")
    (d / "corpus.md").write_text(CORPUS)
    cfg = TrainConfig.from_flat(stage="grpo", model="small", corpus=str(d / "corpus.md"), out=str(d / "run"),
                                tokenizer_vocab_size=512, progress=False, seed=0, embedder="hashing",
                                grpo_prompts=PROMPTS, num_generations=G, grpo_max_new_tokens=NEW_TOKENS,
                                grpo_temperature=1.0, warmup_steps=0)
    t = Trainer(cfg)
    tok = t.tokenizer()
    model = t.initial_model("3", tok)
    return GRPOStage(t, "3", model, tok, None, None)


def test_bench_grpo_generation_vs_sampler(benchmark, stage3, monkeypatch):
    torch.set_num_threads(int(os.environ.get("PREFLEXOR_BENCH_THREADS", 1)))
    run = stage3
    # no early stop: both sides make NEW_TOKENS per row (stage 3 uses the tokenizer's stop set)
    monkeypatch.setattr(type(run.tok), "stop_token_ids", property(lambda self: []))
    prompts = run.prompts(0)
    assert len(prompts) == PROMPTS
    chats = [[{"role": "user", "content": p.prompt}] for p in prompts]
    base = SamplingParams(max_new_tokens=NEW_TOKENS, temperature=1.0, stop_token_ids=[], seed=0)
    model = run.plain_model()

    def grpo_side():
        outs, _ = run.generate_batch(0, prompts)
        return sum(len(o.token_ids) - o.num_forced_tokens for o in outs), len(outs)

    def sampler_side():
        rows = [c for c in chats for _ in range(G)]
        outs = generate(model, run.tok, rows, dataclasses.replace(base, prepend_response=THINK_START))
        return sum(len(o.token_ids) - o.num_forced_tokens for o in outs), len(outs)

    times = {"grpo": [], "sampler": []}
    tokens = {}
    for _ in range(ROUNDS):
        for name, fn in (("grpo", grpo_side), ("sampler", sampler_side)):
            t0 = time.perf_counter()
            tokens[name] = fn()
            times[name].append(time.perf_counter() - t0)
    benchmark.pedantic(grpo_side, rounds=1, iterations=1)
    rate = {k: tokens[k][0] / min(v) for k, v in times.items()}
    assert tokens["grpo"][1] == tokens["sampler"][1] == PROMPTS * G
    assert tokens["grpo"][0] == tokens["sampler"][0] == PROMPTS * G * NEW_TOKENS
    ratio = rate["grpo"] / rate["sampler"]
    benchmark.extra_info.update({"rows": PROMPTS * G, "new_tokens": NEW_TOKENS, "threads": torch.get_num_threads(),
                                 "grpo_tok_s": rate["grpo"], "sampler_tok_s": rate["sampler"], "ratio": ratio})
    print(f"\nGRPO generation {rate['grpo']:.0f} tok/s vs sampler {rate['sampler']:.0f} tok/s at batch "
          f"{PROMPTS * G} ({NEW_TOKENS} new tokens): {ratio:.2f}x")
    assert ratio >= 0.8, f"GRPO generation at {ratio:.2f}x the sampler's throughput (target >= 0.8)"

