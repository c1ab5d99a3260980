"""Greedy agreement of int8 decoding with fp on the bundled SmolLM2 over the held-out questions.

    python tests/benchmarks/int8_agreement.py [--new-tokens 32] [--dtype float32] [--limit N]

Each question of ``preflexor_core/corpus/eval_questions.jsonl`` as a chat (the model's template),
greedy, no stop: prints the share of questions whose int8 completion equals the fp one token for
token, the mean matching prefix, and the share of all token positions before the first
divergence; and the logits error of one int8 decode step against the fp step from the same cache
(after each prompt and its first fp token): max |difference| over the largest |fp logit|, mean and
worst over the questions. With the fused CPU step the prompt's prefill is at full precision, so the
first token always agrees. A measurement script (not collected by pytest); figures go to docs/benchmarks.md.
"""
import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
from preflexor_core.llm.registry import load_model_and_tokenizer  # noqa: E402
from preflexor_core.sampler import KVCache, SamplingParams, decode_one_token, generate, int8_linears, prefill
from preflexor_core.sampler import fused_decode, prompts  # noqa: E402


def step_logits_error(model, tok, chats, first_tokens) -> list[float]:
    """Per question: max |int8 - fp| / max |fp| of the next-token logits after the prompt + first token."""
    texts = prompts.prompt_texts(tok, chats)
    errs = []
    fused = fused_decode.FusedDecoder(model, "int8") if fused_decode.usable(model) else None
    with torch.inference_mode():
        for text, first in zip(texts, first_tokens):
            ids = tok.encode(text)
            cache = KVCache.for_model(model, 1, len(ids) + 2)
            prefill(model, cache, [ids])
            k, v, n = cache.k.clone(), cache.v.clone(), cache.host_lengths
            ref = decode_one_token(model, cache, torch.tensor([first])).float()
            cache.k.copy_(k), cache.v.copy_(v), cache.set_lengths(n)
            if fused is not None:
                got = fused(cache, torch.tensor([first]))
            else:
                with int8_linears(model):
                    got = decode_one_token(model, cache, torch.tensor([first])).float()
            errs.append(float((got - ref).abs().max() / ref.abs().max()))
    return errs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--limit", type=int, default=None, help="first N questions only")
    a = ap.parse_args()
    path = os.path.join(os.path.dirname(__file__), "..", "..", "preflexor_core", "corpus", "eval_questions.jsonl")
    with open(path) as f:
        questions = [json.loads(line)["question"] for line in f if line.strip()][:a.limit]
    model, tok = load_model_and_tokenizer("smollm2-135m-instruct", "cpu", a.dtype)
    model.eval()
    chats = [[{"role": "user", "content": q}] for q in questions]
    p = SamplingParams(max_new_tokens=a.new_tokens, temperature=0.0, stop_token_ids=[])
    fp = [c.token_ids for c in generate(model, tok, chats, p, max_batch_size=16)]
    q8 = [c.token_ids for c in generate(model, tok, chats, p, max_batch_size=16, decode_weights="int8")]
    prefix = []
    for x, y in zip(fp, q8):
        n = next((i for i, (u, v) in enumerate(zip(x, y)) if u != v), min(len(x), len(y)))
        prefix.append(n)
    same = sum(x == y for x, y in zip(fp, q8))
    print(f"{len(questions)} questions, {a.new_tokens} new tokens, {a.dtype} vs int8 (torch {torch.__version__}):")
    print(f"  identical completions: {same}/{len(questions)} ({same / len(questions):.0%})")
    print(f"  first token equal: {sum(x[0] == y[0] for x, y in zip(fp, q8))}/{len(questions)}")
    print(f"  mean matching prefix: {sum(prefix) / len(prefix):.1f} tokens; positions before the first "
          f"divergence: {sum(prefix) / (len(prefix) * a.new_tokens):.0%}")
    errs = step_logits_error(model, tok, chats, [x[0] for x in fp])
    print(f"  one decode step, max |logit error| / max |fp logit|: mean {sum(errs) / len(errs):.2%}, "
          f"worst {max(errs):.2%} (path: {'fused CPU step' if fused_decode.usable(model) else 'int8_linears'})")


if __name__ == "__main__":
    main()
