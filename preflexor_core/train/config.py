"""TrainConfig: every training option, nested by concern (as torchtitan's JobConfig), with its help.

    cfg = TrainConfig(run=RunConfig(stage="1", model="runs/demo/stage0"), optim=OptimConfig(lora_r=64))
    cfg = TrainConfig.from_flat(stage="1", lora_r=64)      # flat names = train.py's flags (--lora-r)

Sections: ``run``, ``data``, ``optim``, ``preference``, ``checkpoint``, ``parallel``. Field names are
unique across sections, so each is also a CLI flag; the help text of each flag is the field's
``metadata["help"]`` (train.py builds its parser from it). Defaults live only here.

Tests: ``python -m pytest -q tests/test_trainer.py -k config``
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ..config import PRESETS
from ..losses import DPO_LOSS_TYPES
from ..masks import MASK_MODES

STAGES = ("0", "1", "2")

__all__ = ["STAGES", "RunConfig", "DataConfig", "OptimConfig", "PreferenceConfig", "CheckpointConfig",
           "ParallelConfig", "TrainConfig", "SECTIONS"]


def opt(default: Any, help: str, **meta) -> Any:
    """A config field with its CLI help (and optional ``choices``) in the field metadata."""
    return field(default=default, metadata={"help": help, **meta})


def _at_least_one(section, *names: str) -> None:
    for name in names:
        if getattr(section, name) < 1:
            raise ValueError(f"{name}={getattr(section, name)} must be >= 1")


def _one_of(name: str, value, valid) -> None:
    if value not in valid:
        raise ValueError(f"{name}={value!r}: use {', '.join(map(str, valid))}")


@dataclass(kw_only=True)
class RunConfig:
    """What to run and where: stage, model, tokenizer, run directory, seed."""
    stage: str = opt("all", "which stage to run: 0 (causal LM on the corpus), 1 (ORPO), 2 (DPO/EXO) or all "
                     "(0, 1, 2 in order)", choices=[*STAGES, "all"])
    model: str = opt("tiny", "a preset name (tiny, small, llama-3.2-3b: random init, trained from scratch in "
                     "stage 0), a pretrained model name (smollm2-135m-instruct: the bundled GGUF), an HF Llama "
                     "checkpoint directory or a .gguf file. Stages 1 and 2 start from the run's previous "
                     "stage output when it exists")
    tokenizer: str | None = opt(None, "tokenizer directory (tokenizer.json); default: the model directory's, or a "
                                "BPE trained on the corpus for presets")
    tokenizer_vocab_size: int | None = opt(None, "vocabulary of the BPE trained for presets (default: the "
                                           "preset's vocab_size)")
    out: str = opt("runs/demo", "run directory (stage outputs, pairs.jsonl, log.jsonl, plots/, checkpoints/)")
    seed: int = opt(42, "random seed (data order, sampling, initialisation)")
    max_steps: int | None = opt(None, "stop a stage after this many optimizer steps (checkpoint kept for --resume)")
    progress: bool = opt(True, "show progress bars")

    def __post_init__(self):
        _one_of("stage", self.stage, (*STAGES, "all"))


@dataclass(kw_only=True)
class DataConfig:
    """Corpus, retriever, teacher, on-the-fly pair generation and sequence lengths."""
    corpus: str | None = opt(None, "corpus file or folder (.txt, .md, .jsonl with a 'text' field); default: the "
                             "shipped corpus")
    embedder: str = opt("auto", "retriever embedder: auto (the bundled MiniLM weights when installed, else "
                        "character hashing), minilm or hashing")
    teacher: str = opt("extractive", "'extractive' (offline, grounded in the corpus), an OpenAI-compatible base "
                       "URL (http...), or a checkpoint directory")
    teacher_model: str = opt("gpt-4o-mini", "model name sent to an HTTP teacher (API key from $OPENAI_API_KEY)")
    teacher_max_items: int = opt(1, "extractive teacher: sentences or items per thinking category (shorter "
                                 "thinking trains faster)")
    teacher_answer_sentences: int = opt(2, "extractive teacher: at most this many corpus sentences in the "
                                        "chosen answer")
    sft_seq_len: int = opt(256, "stage 0 tokens per packed block")
    iterations: int | None = opt(None, "stages 1/2: how many times the preference dataset is regenerated with the "
                                 "current policy (default: 6; 18 in stage 1 for a preset trained from scratch)")
    pairs_per_iteration: int = opt(64, "stages 1/2: preference pairs generated per iteration")
    number_nodes_to_get: int = opt(3, "corpus nodes sampled per generated question")
    k_samples: int = opt(2, "stage 2: policy samples per question; the lowest-scored becomes the rejected answer")
    sample_max_new_tokens: int = opt(160, "stage 1: max new tokens when sampling rejected answers (no thinking) "
                                     "from the policy")
    thinking_max_new_tokens: int = opt(768, "stage 2: max new tokens when sampling rejected answers (thinking + "
                                       "answer); thinking cut off by this cap is handled by --on-unclosed")
    gen_batch_size: int = opt(32, "questions per sampler call while generating pairs")
    sample_temperature: float = opt(0.8, "temperature when sampling rejected answers")
    sample_top_p: float = opt(0.9, "top-p when sampling rejected answers")
    max_length: int = opt(1024, "max prompt + completion tokens")
    max_prompt_length: int = opt(128, "max prompt tokens (prompts are truncated from the left)")
    truncation_mode: str = opt("keep_start", "when a completion is too long: keep_start or keep_end")

    def __post_init__(self):
        _one_of("embedder", self.embedder, ("auto", "minilm", "hashing"))
        _one_of("truncation_mode", self.truncation_mode, ("keep_start", "keep_end"))
        _at_least_one(self, "teacher_max_items", "teacher_answer_sentences", "sft_seq_len", "pairs_per_iteration",
                      "k_samples", "sample_max_new_tokens", "thinking_max_new_tokens", "gen_batch_size")
        if self.iterations is not None:
            _at_least_one(self, "iterations")


@dataclass(kw_only=True)
class OptimConfig:
    """Steps, batch sizes, learning rates and schedule, clipping, precision, LoRA."""
    sft_steps: int = opt(500, "stage 0 optimizer steps")
    sft_batch_size: int = opt(16, "stage 0 blocks per micro-batch per rank")
    sft_lr: float = opt(3e-3, "stage 0 learning rate")
    n_steps: int = opt(48, "stages 1/2: optimizer steps on each generated dataset")
    batch_size: int = opt(4, "stages 1/2: preference pairs per micro-batch per rank")
    grad_accum: int = opt(1, "micro-batches per optimizer step")
    orpo_lr: float | None = opt(None, "stage 1 learning rate (default: 5e-5 with LoRA, 5e-6 full, 2e-3 for a "
                                "preset trained from scratch)")
    dpo_lr: float | None = opt(None, "stage 2 learning rate (default: 1e-6, or 2e-5 for a preset trained from "
                               "scratch)")
    warmup_steps: int = opt(5, "linear warmup steps")
    schedule: str = opt("constant", "learning-rate schedule after warmup: constant or cosine")
    weight_decay: float = opt(0.0, "AdamW weight decay")
    max_grad_norm: float = opt(1.0, "gradient clipping norm")
    gradient_checkpointing: bool = opt(False, "recompute activations in the backward pass to save memory")
    bf16: bool = opt(True, "bf16 autocast on CUDA (no effect on CPU)")
    lora_r: int = opt(0, "LoRA rank for stages 1/2 (0: full fine-tuning; paper: 64)")
    lora_alpha: float = opt(64.0, "LoRA alpha (paper: 64)")
    lora_dropout: float = opt(0.0, "LoRA dropout")

    def __post_init__(self):
        _one_of("schedule", self.schedule, ("constant", "cosine"))
        _at_least_one(self, "sft_steps", "sft_batch_size", "n_steps", "batch_size", "grad_accum")
        if self.lora_r < 0:
            raise ValueError(f"lora_r={self.lora_r} must be >= 0 (0 = full fine-tuning)")


@dataclass(kw_only=True)
class PreferenceConfig:
    """Preference losses (ORPO, DPO family) and stage-2 thinking masks."""
    orpo_beta: float = opt(0.1, "ORPO odds-ratio weight (paper: 0.1)")
    dpo_loss_type: str = opt("exo_pair", "stage 2 loss: sigmoid (DPO), exo_pair (EXO, paper), ipo or hinge")
    dpo_beta: float = opt(0.5, "stage 2 beta (paper: 0.5)")
    label_smoothing: float = opt(5e-3, "stage 2 label smoothing / EXO epsilon (paper: 5e-3; exo_pair needs > 0)")
    mask_mode: str = opt("answer_only", "stage 2 thinking masking: answer_only (paper), random_fraction or none")
    mask_fraction: float = opt(0.5, "fraction of thinking tokens masked with random_fraction")
    include_thinking_token_in_labels: bool = opt(False, "with answer_only, keep the closing <|/thinking|> token "
                                                 "in the loss")
    on_unclosed: str | None = opt(None, "stage 2 completions whose thinking never ends: drop the pair, or keep "
                                  "all tokens (default: drop; keep for a preset trained from scratch)")

    def __post_init__(self):
        _one_of("dpo_loss_type", self.dpo_loss_type, DPO_LOSS_TYPES)
        _one_of("mask_mode", self.mask_mode, MASK_MODES)
        if self.on_unclosed is not None:
            _one_of("on_unclosed", self.on_unclosed, ("drop", "keep"))


@dataclass(kw_only=True)
class CheckpointConfig:
    """Checkpoints and exact resume."""
    resume: bool = opt(False, "continue from the run's checkpoints exactly where it stopped; completed stages "
                       "are skipped")
    save_every: int = opt(0, "optimizer steps between checkpoints (0: at the end of each iteration)")


@dataclass(kw_only=True)
class ParallelConfig:
    """Device and torchrun parallelism (DDP, or FSDP2)."""
    device: str = opt("auto", "auto (cuda if available), cpu or cuda")
    fsdp: bool = opt(False, "shard with FSDP2 (fully_shard per block) instead of DDP under torchrun; full "
                     "fine-tuning only (not with --lora-r); resume needs the same number of ranks")


SECTIONS: dict[str, type] = {"run": RunConfig, "data": DataConfig, "optim": OptimConfig,
                             "preference": PreferenceConfig, "checkpoint": CheckpointConfig,
                             "parallel": ParallelConfig}


@dataclass(kw_only=True)
class TrainConfig:
    """The whole training configuration: one section per concern (see ``SECTIONS``)."""
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    preference: PreferenceConfig = field(default_factory=PreferenceConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    @classmethod
    def from_flat(cls, **options) -> "TrainConfig":
        """Build from flat option names (train.py's flags with ``_``); unknown names are an error."""
        owner = {f.name: sec for sec, kls in SECTIONS.items() for f in dataclasses.fields(kls)}
        unknown = sorted(set(options) - set(owner))
        if unknown:
            raise ValueError(f"unknown training option(s) {', '.join(unknown)}; valid names are the fields of "
                             f"{', '.join(k.__name__ for k in SECTIONS.values())}")
        parts: dict[str, dict] = {sec: {} for sec in SECTIONS}
        for name, value in options.items():
            parts[owner[name]][name] = value
        return cls(**{sec: SECTIONS[sec](**kw) for sec, kw in parts.items()})

    def replace(self, **options) -> "TrainConfig":
        """A copy with some flat options changed (same names as ``from_flat``)."""
        flat = {f.name: getattr(getattr(self, sec), f.name)
                for sec, kls in SECTIONS.items() for f in dataclasses.fields(kls)}
        return TrainConfig.from_flat(**{**flat, **options})

    # -- values derived from several sections ------------------------------------------------
    @property
    def from_scratch(self) -> bool:
        """True when ``run.model`` names a preset (random init) rather than a checkpoint."""
        return self.run.model in PRESETS

    @property
    def unclosed_policy(self) -> str:
        """Explicit flag, else "drop" (the paper's masking needs a closed thinking span); a tiny
        model trained from scratch rarely closes its thinking early in stage 2, so its unclosed
        samples are kept whole as rejected answers (DPO then pushes those samples down)."""
        if self.preference.on_unclosed is not None:
            return self.preference.on_unclosed
        return "keep" if self.from_scratch else "drop"

    def lr_for(self, stage: str) -> float:
        """Stage learning rate: explicit flag, else the paper's value (LoRA / full), else a from-scratch value."""
        o = self.optim
        if stage == "0":
            return o.sft_lr
        explicit = o.orpo_lr if stage == "1" else o.dpo_lr
        if explicit is not None:
            return explicit
        if self.from_scratch:        # a tiny model trained from scratch needs far larger steps
            return 2e-3 if stage == "1" else 2e-5
        if stage == "1":
            return 5e-5 if o.lora_r else 5e-6
        return 1e-6

    def iterations_for(self, stage: str) -> int:
        """Dataset regenerations of a preference stage: explicit flag (both stages), else 6; a preset
        trained from scratch gets 18 in stage 1, where it must learn the whole thinking format (on the
        shipped demo, 6 ORPO rounds left the tiny model closing its thinking in about a third of its
        answers, 12 in about two thirds, 18 in nine tenths)."""
        if self.data.iterations is not None:
            return self.data.iterations
        return 18 if (self.from_scratch and stage == "1") else 6
