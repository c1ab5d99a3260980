"""PRefLexOR training CLI: stage 0 (causal LM), 1 (ORPO), 2 (DPO/EXO), or all.

    python train.py --stage all                              # embedded demo: tiny model, shipped corpus, offline teacher
    python train.py --stage 1 --model DIR --teacher http://host:8000/v1 --lora-r 64
    torchrun --nproc_per_node 2 train.py --stage 2 --model runs/demo/stage1

Every default lives in ``preflexor_core.trainer.TrainConfig``; this file only parses flags.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import typing

HELP = {
    "stage": "which stage to run: 0 (causal LM on the corpus), 1 (ORPO), 2 (DPO/EXO) or all (0, 1, 2 in order)",
    "model": "a preset name (tiny, small, llama-3.2-3b: random init, trained from scratch in stage 0) or an HF Llama "
             "checkpoint directory. Stages 1 and 2 start from the run's previous stage output when it exists",
    "tokenizer": "tokenizer directory (tokenizer.json); default: the model directory's, or a BPE trained on the "
                 "corpus for presets",
    "corpus": "corpus file or folder (.txt, .md, .jsonl with a 'text' field); default: the shipped corpus",
    "teacher": "'extractive' (offline, grounded in the corpus), an OpenAI-compatible base URL (http...), "
               "or a checkpoint directory",
    "teacher_model": "model name sent to an HTTP teacher (API key from $OPENAI_API_KEY)",
    "teacher_max_items": "extractive teacher: sentences or items per thinking category (shorter thinking trains faster)",
    "teacher_answer_sentences": "extractive teacher: at most this many corpus sentences in the chosen answer",
    "embedder": "retriever embedder: auto (the bundled MiniLM weights when installed, else character hashing), "
                "minilm or hashing",
    "out": "run directory (stage outputs, pairs.jsonl, log.jsonl, plots/, checkpoints/)",
    "seed": "random seed (data order, sampling, initialisation)",
    "device": "auto (cuda if available), cpu or cuda",
    "resume": "continue from the run's checkpoints exactly where it stopped; completed stages are skipped",
    "max_steps": "stop a stage after this many optimizer steps (checkpoint kept for --resume)",
    "sft_steps": "stage 0 optimizer steps",
    "sft_seq_len": "stage 0 tokens per packed block",
    "sft_batch_size": "stage 0 blocks per micro-batch per rank",
    "sft_lr": "stage 0 learning rate",
    "tokenizer_vocab_size": "vocabulary of the BPE trained for presets (default: the preset's vocab_size)",
    "iterations": "stages 1/2: how many times the preference dataset is regenerated with the current policy (default: 6; 18 in stage 1 for a preset trained from scratch)",
    "pairs_per_iteration": "stages 1/2: preference pairs generated per iteration",
    "n_steps": "stages 1/2: optimizer steps on each generated dataset",
    "batch_size": "stages 1/2: preference pairs per micro-batch per rank",
    "grad_accum": "micro-batches per optimizer step",
    "k_samples": "stage 2: policy samples per question; the lowest-scored becomes the rejected answer",
    "number_nodes_to_get": "corpus nodes sampled per generated question",
    "sample_max_new_tokens": "stage 1: max new tokens when sampling rejected answers (no thinking) from the policy",
    "thinking_max_new_tokens": "stage 2: max new tokens when sampling rejected answers (thinking + answer); "
                               "thinking cut off by this cap is handled by --on-unclosed",
    "gen_batch_size": "questions per sampler call while generating pairs",
    "sample_temperature": "temperature when sampling rejected answers",
    "sample_top_p": "top-p when sampling rejected answers",
    "orpo_beta": "ORPO odds-ratio weight (paper: 0.1)",
    "orpo_lr": "stage 1 learning rate (default: 5e-5 with LoRA, 5e-6 full, 2e-3 for a preset trained from scratch)",
    "dpo_loss_type": "stage 2 loss: sigmoid (DPO), exo_pair (EXO, paper), ipo or hinge",
    "dpo_beta": "stage 2 beta (paper: 0.5)",
    "label_smoothing": "stage 2 label smoothing / EXO epsilon (paper: 5e-3; exo_pair needs > 0)",
    "dpo_lr": "stage 2 learning rate (default: 1e-6, or 2e-5 for a preset trained from scratch)",
    "mask_mode": "stage 2 thinking masking: answer_only (paper), random_fraction or none",
    "mask_fraction": "fraction of thinking tokens masked with random_fraction",
    "include_thinking_token_in_labels": "with answer_only, keep the closing <|/thinking|> token in the loss",
    "on_unclosed": "stage 2 completions whose thinking never ends: drop the pair, or keep all tokens "
                   "(default: drop; keep for a preset trained from scratch)",
    "max_length": "max prompt + completion tokens",
    "max_prompt_length": "max prompt tokens (prompts are truncated from the left)",
    "truncation_mode": "when a completion is too long: keep_start or keep_end",
    "warmup_steps": "linear warmup steps",
    "schedule": "learning-rate schedule after warmup: constant or cosine",
    "weight_decay": "AdamW weight decay",
    "max_grad_norm": "gradient clipping norm",
    "gradient_checkpointing": "recompute activations in the backward pass to save memory",
    "bf16": "bf16 autocast on CUDA (no effect on CPU)",
    "lora_r": "LoRA rank for stages 1/2 (0: full fine-tuning; paper: 64)",
    "lora_alpha": "LoRA alpha (paper: 64)",
    "lora_dropout": "LoRA dropout",
    "save_every": "optimizer steps between checkpoints (0: at the end of each iteration)",
    "fsdp": "shard with FSDP2 (fully_shard per block) instead of DDP under torchrun; full fine-tuning only "
            "(not with --lora-r); resume needs the same number of ranks",
    "progress": "show progress bars",
}


def build_parser() -> argparse.ArgumentParser:
    from preflexor_core.trainer import TrainConfig
    p = argparse.ArgumentParser(prog="train.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        typ = hints[f.name]
        args = typing.get_args(typ)
        base = next((a for a in args if a is not type(None)), typ) if args else typ
        if base is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=HELP[f.name])
        else:
            kw = {"choices": ["0", "1", "2", "all"]} if f.name == "stage" else {}
            p.add_argument(flag, type=base, default=f.default, help=HELP[f.name], metavar=f.name.upper(), **kw)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from preflexor_core.trainer import TrainConfig, main as train_main
    try:
        cfg = TrainConfig(**vars(args))
    except ValueError as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        return 2
    try:
        summary = train_main(cfg)
    except (FileNotFoundError, ValueError, NotImplementedError) as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        return 2
    print(f"done: outputs in {cfg.out}" + (f"; {summary}" if summary else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
