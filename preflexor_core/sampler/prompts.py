"""Prompt inputs of ``generate``: raw strings or chats -> token-id contexts that fit the model.

A chat (list of {"role", "content"} dicts) is rendered with the tokenizer's chat template and the
assistant header; forced ``prepend_response`` ids are appended; too-long contexts are an error or,
with ``truncate_prompt_left``, cut from the left. Tests: ``python -m pytest tests/test_sampler.py -q``.
"""
from __future__ import annotations

from .params import SamplingParams, SamplingParamsError


def prompt_texts(tokenizer, prompts_or_chats) -> list[str]:
    def is_chat(x) -> bool:
        return isinstance(x, (list, tuple)) and all(isinstance(m, dict) for m in x) and len(x) > 0

    if isinstance(prompts_or_chats, str) or is_chat(prompts_or_chats):
        items = [prompts_or_chats]
    elif isinstance(prompts_or_chats, (list, tuple)):
        items = list(prompts_or_chats)
    else:
        raise TypeError(f"generate: prompts must be a str, a chat (list of {{'role', 'content'}} dicts) or a "
                        f"list of those; got {type(prompts_or_chats).__name__}")
    texts = []
    for i, x in enumerate(items):
        if isinstance(x, str):
            texts.append(x)
        elif is_chat(x):
            texts.append(tokenizer.apply_chat_template(list(x), add_generation_prompt=True))
        else:
            raise TypeError(f"generate: prompts[{i}] must be a str or a non-empty list of {{'role', 'content'}} "
                            f"dicts; got {type(x).__name__}: {x!r:.80}")
    return texts


def contexts(tokenizer, texts: list[str], forced: list[int], params: SamplingParams, max_pos: int,
              vocab: int) -> list[list[int]]:
    out = []
    budget = max_pos - params.max_new_tokens
    for i, t in enumerate(texts):
        ids = tokenizer.encode(t)
        if not ids:
            raise SamplingParamsError(f"generate: prompt {i} is empty (encodes to no tokens); pass at least one token")
        ctx = ids + forced
        if len(ctx) > budget:
            if not params.truncate_prompt_left:
                raise SamplingParamsError(
                    f"generate: prompt {i} has {len(ctx)} tokens (incl. {len(forced)} of prepend_response); with "
                    f"max_new_tokens={params.max_new_tokens} that exceeds the model's max_position_embeddings="
                    f"{max_pos}; shorten it, lower max_new_tokens, or set truncate_prompt_left=True")
            if budget < len(forced) + 1:
                raise SamplingParamsError(
                    f"generate: max_new_tokens={params.max_new_tokens} leaves {max(budget, 0)} of "
                    f"max_position_embeddings={max_pos} for prompt {i}, which needs at least "
                    f"{len(forced) + 1} tokens (prepend_response + one prompt token); lower max_new_tokens")
            ctx = ctx[len(ctx) - budget:]
        bad = [x for x in ctx if x >= vocab]
        if bad:
            raise SamplingParamsError(f"generate: prompt {i} has token id {bad[0]} >= the model's vocab_size={vocab}; "
                             f"the tokenizer and the model do not match (resize the embeddings?)")
        out.append(ctx)
    return out
