"""TrainConfig: every training option, nested by concern (as torchtitan's JobConfig), with its help.

    cfg = TrainConfig(run=RunConfig(stage="1", model="runs/demo/stage0"), optim=OptimConfig(lora_r=64))
    cfg = TrainConfig.from_flat(stage="1", lora_r=64)      # flat names = train.py's flags (--lora-r)
    cfg = TrainConfig.from_flat(**PRESETS["demo-stage1"], out="runs/demo")   # `make demo`'s stage 1

Sections: ``run``, ``data``, ``optim``, ``preference``, ``checkpoint``, ``parallel``, ``grpo``. Field names
are unique across sections, so each is also a CLI flag (``infra.cli``: the help is the field's
``metadata["help"]``, a ``Literal`` type gives the choices). The options other CLIs share (seed, device,
teacher, pair generation) come from the shared sections (``infra.cli``, ``datagen.options``). Defaults,
allowed ranges and limits (``ge``/``gt``/``le``/``lt``/``cap``), the stages a field affects and whether a
``--resume`` may change it live only in the fields. ``PRESETS``: the demo recipes (``--preset``).

Tests: ``python -m pytest -q tests/test_trainer.py -k config``, ``tests/test_cli_options.py``
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

from ..datagen.options import PairOptions, TeacherOptions, ThinkingFormatOptions
from ..infra.cli import (DeviceOptions, GenBatchOptions, ProgressOptions, SeedOptions, check_fields, flag, opt,
                         range_text)
from ..infra.errors import PreflexorError
from ..llm.config import PRESETS as MODEL_PRESETS
from ..llm.registry import DEFAULT_MODEL
from ..losses.masks import MASK_MODES
from ..losses.preference import DPO_LOSS_TYPES
from ..sampler.params import DecodeWeightsOptions
from ..thinking.tokens import TRAINED_SPECIAL_TOKENS

STAGES = ("0", "1", "2")            # --stage all runs these; stage 3 (GRPO) runs on its own
STAGE_ALIASES = {"grpo": "3"}
Stage = Literal["0", "1", "2", "all", "3", "grpo"]
Schedule = Literal["constant", "cosine"]
Truncation = Literal["keep_start", "keep_end"]
AnswerAfter = Literal["first", "last"]
DpoLoss = Literal[DPO_LOSS_TYPES]
MaskMode = Literal[MASK_MODES]
OnUnclosed = Literal["drop", "keep"]
GgufType = Literal["none", "f16", "bf16", "q8_0"]
GrpoLoss = Literal["grpo", "dr_grpo", "dapo"]
ScaleRewards = Literal["group", "batch", "none"]

__all__ = ["STAGES", "STAGE_ALIASES", "GRPOConfig", "RunConfig", "DataConfig", "OptimConfig", "PreferenceConfig",
           "CheckpointConfig", "ParallelConfig", "TrainConfig", "SECTIONS", "PRESETS", "TrainConfigError",
           "DPOBetaOptions", "flag", "range_text", "parse_resume"]

MIN_BPE_VOCAB = 256 + len(TRAINED_SPECIAL_TOKENS)     # byte-level BPE: 256 bytes + the special tokens
MIN_PROMPT_LENGTH = 16       # below this a left-truncated prompt keeps BOS and the chat tags, not the question
# Samples drawn per iteration (steps x accumulation x micro-batch): the data order is materialised.
MAX_SAMPLES_PER_ITERATION = 10**7
MAX_GRPO_SAMPLES = 1 << 14          # completions decoded together in one stage-3 generation batch
N = 4096                            # the limit of batch-like integers: a typo (1e9) is refused before any work


class TrainConfigError(PreflexorError, ValueError):
    """A training option out of its range or of the wrong type; the message names the flag."""


def _check(section) -> None:
    check_fields(section, TrainConfigError)


def parse_resume(text: str) -> bool | str:
    """``--resume`` values: yes/true/1 (resume; an error when there is nothing to resume), auto (resume
    when there is something, else start), no/false/0."""
    v = str(text).strip().lower()
    if v in ("auto",):
        return "auto"
    if v in ("yes", "true", "1", "on"):
        return True
    if v in ("no", "false", "0", "off"):
        return False
    raise ValueError(f"--resume {text!r}: use --resume (or --resume=yes), --resume=auto or --resume=no")


@dataclass(kw_only=True)
class RunConfig(SeedOptions, ProgressOptions):
    """What to run and where: stage, model, tokenizer, run directory, seed."""
    stage: Stage = opt("all", "which stage to run: 0 (causal LM on the corpus), 1 (ORPO), 2 (DPO/EXO), all "
                       "(1 then 2 from a pretrained model; 0, 1, 2 for a preset trained from scratch) or 3 / grpo "
                       "(GRPO on graph rewards, after stage 2)", resume_safe=True)
    model: str = opt(DEFAULT_MODEL, "a pretrained model name (smollm2-135m-instruct: the bundled GGUF), a "
                     "preset name (tiny, small, llama-3.2-3b: random init, trained from scratch in stage 0), an HF "
                     "Llama checkpoint directory or a .gguf file. Stages 1 and 2 start from the run's previous "
                     "stage output when it exists")
    tokenizer: str | None = opt(None, "tokenizer directory (tokenizer.json); default: the model directory's, or a "
                                "BPE trained on the corpus for presets")
    tokenizer_vocab_size: int | None = opt(None, "vocabulary of the BPE trained for presets (default: the "
                                           "preset's vocab_size)", ge=MIN_BPE_VOCAB, cap=1 << 21)
    out: str = opt("runs/demo", "run directory (stage outputs, pairs.jsonl, log.jsonl, plots/, checkpoints/)",
                   resume_safe=True)
    max_steps: int | None = opt(None, "stop a stage after this many optimizer steps (checkpoint kept for --resume)",
                                ge=1, resume_safe=True)
    force_out: bool = opt(False, "write into an existing non-empty --out folder that this project did not make "
                          "(files of the names a run writes are then replaced)", resume_safe=True)

    def __post_init__(self):
        _check(self)
        self.stage = STAGE_ALIASES.get(self.stage, self.stage)


@dataclass(kw_only=True)
class DataConfig(TeacherOptions, PairOptions, GenBatchOptions, ThinkingFormatOptions, DecodeWeightsOptions):
    """Corpus, retriever, teacher, on-the-fly pair generation and sequence lengths."""
    corpus: str | None = opt(None, "corpus file or folder (.txt, .md, .jsonl with a 'text' field); default: the "
                             "shipped corpus")
    sft_seq_len: int = opt(256, "stage 0 tokens per packed block", ge=2, cap=1 << 17, stages="0")
    iterations: int | None = opt(None, "stages 1/2: how many times the preference dataset is regenerated with the "
                                 "current policy (default: 6; 18 in stage 1 for a preset trained from scratch)",
                                 ge=1, cap=10**5, stages="12")
    pairs_per_iteration: int = opt(64, "stages 1/2: preference pairs generated per iteration", ge=1, cap=10**6,
                                   stages="12")
    max_length: int = opt(1024, "max prompt + completion tokens", ge=2, cap=1 << 17, stages="12")
    max_prompt_length: int = opt(128, "max prompt tokens (prompts are truncated from the left)",
                                 ge=MIN_PROMPT_LENGTH, cap=1 << 17, stages="12")
    truncation_mode: Truncation = opt("keep_start", "when a completion is too long: keep its start or its end",
                                      stages="12")

    def __post_init__(self):
        _check(self)
        if self.max_prompt_length >= self.max_length:
            raise TrainConfigError(f"max_prompt_length={self.max_prompt_length} must be < max_length="
                                   f"{self.max_length} (--max-prompt-length, --max-length): the completion "
                                   f"needs room")


@dataclass(kw_only=True)
class OptimConfig:
    """Steps, batch sizes, learning rates and schedule, clipping, precision, LoRA."""
    sft_steps: int = opt(500, "stage 0 optimizer steps", ge=1, stages="0")
    sft_batch_size: int = opt(16, "stage 0 blocks per micro-batch per rank", ge=1, cap=N, stages="0")
    sft_lr: float = opt(3e-3, "stage 0 learning rate", gt=0.0, le=1.0, stages="0")
    n_steps: int = opt(48, "stages 1/2: optimizer steps on each generated dataset", ge=1, stages="12")
    batch_size: int = opt(4, "stages 1/2: preference pairs per micro-batch per rank", ge=1, cap=N, stages="12")
    grad_accum: int = opt(1, "micro-batches per optimizer step", ge=1, cap=N)
    orpo_lr: float | None = opt(None, "stage 1 learning rate (default: 5e-5 with LoRA, 5e-6 full, 2e-3 for a "
                                "preset trained from scratch)", gt=0.0, le=1.0, stages="1")
    dpo_lr: float | None = opt(None, "stage 2 learning rate (default: 1e-6, or 2e-5 for a preset trained from "
                               "scratch)", gt=0.0, le=1.0, stages="2")
    warmup_steps: int = opt(5, "linear warmup steps", ge=0)
    schedule: Schedule = opt("constant", "learning-rate schedule after warmup")
    weight_decay: float = opt(0.0, "AdamW weight decay", ge=0.0)
    max_grad_norm: float = opt(1.0, "gradient clipping norm", gt=0.0)
    gradient_checkpointing: bool = opt(False, "recompute activations in the backward pass to save memory",
                                       resume_safe=True)
    pack: bool = opt(True, "stages 1/2: pack a micro-batch into one row (no padding) and encode each prompt once "
                     "for its two answers (prefix sharing; plain packing for models with sliding-window layers); "
                     "--no-pack pads every sequence to the longest. Same loss, other float rounding",
                     resume_safe=True, stages="12")
    bf16: bool = opt(True, "bf16 autocast over fp32 master weights, on CUDA and on CPUs with native bf16 "
                     "(AVX512-BF16 or AMX; PREFLEXOR_CPU_BF16=0/1 overrides the detection)")
    lora_r: int = opt(0, "LoRA rank for stages 1/2 (0: full fine-tuning; paper: 64)", ge=0, cap=65536, stages="12")
    lora_alpha: float = opt(64.0, "LoRA alpha (paper: 64)", gt=0.0, stages="12")
    lora_dropout: float = opt(0.0, "LoRA dropout", ge=0.0, lt=1.0, stages="12")

    def __post_init__(self):
        _check(self)
        for steps, bs in (("n_steps", "batch_size"), ("sft_steps", "sft_batch_size")):
            n = getattr(self, steps) * self.grad_accum * getattr(self, bs)
            if n > MAX_SAMPLES_PER_ITERATION:
                raise TrainConfigError(
                    f"{flag(steps)} x --grad-accum x {flag(bs)} = {n} samples per iteration is over the limit "
                    f"{MAX_SAMPLES_PER_ITERATION}; lower one of them")


@dataclass(kw_only=True)
class DPOBetaOptions:
    """The DPO beta (train's stage 2 loss; evaluation's implicit reward)."""
    dpo_beta: float = opt(0.5, "DPO beta: stage 2 loss and the implicit reward of the reward accuracy "
                          "(paper: 0.5)", gt=0.0, stages="2")


@dataclass(kw_only=True)
class PreferenceConfig(DPOBetaOptions):
    """Preference losses (ORPO, DPO family) and stage-2 thinking masks."""
    orpo_beta: float = opt(0.1, "ORPO odds-ratio weight (paper: 0.1)", ge=0.0, stages="1")
    dpo_loss_type: DpoLoss = opt("exo_pair", "stage 2 loss: sigmoid (DPO), exo_pair (EXO, paper), ipo or hinge",
                                 stages="2")
    label_smoothing: float = opt(5e-3, "stage 2 label smoothing / EXO epsilon (paper: 5e-3; exo_pair needs > 0)",
                                 ge=0.0, lt=0.5, stages="2")
    mask_mode: MaskMode = opt("answer_only", "stage 2 thinking masking: answer_only (paper), random_fraction or "
                              "none", stages="2")
    mask_fraction: float = opt(0.5, "fraction of thinking tokens masked with random_fraction", ge=0.0, le=1.0,
                               stages="2")
    rpo_alpha: float = opt(0.0, "stage 2: weight of an NLL anchor on the chosen completion's labelled tokens "
                           "added to the DPO-family loss (iterative RPO, Pang et al. 2024; TRL's rpo_alpha); "
                           "keeps the answer format that the preference loss alone may erode (0: off, the "
                           "paper's loss)", ge=0.0, stages="2")
    include_thinking_token_in_labels: bool = opt(False, "with answer_only, keep the closing <|/thinking|> token "
                                                 "in the loss", stages="2")
    answer_after: AnswerAfter = opt("first", "with answer_only, the scored answer starts after the first "
                                    "<|/thinking|> (a sample that closes its thinking twice is penalised for "
                                    "the second) or after the last (the malformed part is hidden)", stages="2")
    on_unclosed: OnUnclosed | None = opt(None, "stage 2 completions whose thinking never ends: drop the pair, or "
                                         "keep all tokens (default: drop; keep for a preset trained from scratch)",
                                         stages="2")

    def __post_init__(self):
        _check(self)
        if self.dpo_loss_type == "exo_pair" and not self.label_smoothing > 0:
            raise TrainConfigError(f"label_smoothing={self.label_smoothing!r} must be > 0 with dpo_loss_type="
                                   f"exo_pair (--label-smoothing is the EXO epsilon; paper: 5e-3)")


@dataclass(kw_only=True)
class CheckpointConfig:
    """Checkpoints and exact resume."""
    resume: bool | str = opt(False, "continue from the run's checkpoints exactly where it stopped (completed "
                             "stages are skipped; an error when there is nothing to resume, or when a flag that "
                             "changes the training differs from the checkpoint's); --resume=auto: resume when "
                             "there is something to resume, else start", resume_safe=True, const=True,
                             parse=parse_resume, metavar="{yes,no,auto}")
    save_every: int = opt(0, "optimizer steps between checkpoints (0: at the end of each iteration)", ge=0,
                          resume_safe=True)
    keep_previous: bool = opt(True, "keep the checkpoint before the latest in checkpoints/stageN.prev (hard links; "
                              "a fallback when the latest is damaged)", resume_safe=True)
    export_gguf: GgufType = opt("none", "also write each stage's export as stageN/model-TYPE.gguf for llama.cpp, "
                                "Ollama and LM Studio (thinking tokens and chat template in its metadata)",
                                resume_safe=True)

    def __post_init__(self):
        if self.resume not in (False, True, "auto"):
            raise TrainConfigError(f"resume={self.resume!r}: use True, False or 'auto' (--resume, --resume=auto)")
        _check(self)


@dataclass(kw_only=True)
class ParallelConfig(DeviceOptions):
    """Device and torchrun parallelism (DDP, or FSDP2)."""
    fsdp: bool = opt(False, "shard with FSDP2 (fully_shard per block) instead of DDP under torchrun; full "
                     "fine-tuning only (not with --lora-r); resume needs the same number of ranks")

    def __post_init__(self):
        _check(self)


@dataclass(kw_only=True)
class GRPOConfig:
    """Stage 3: GRPO on graph-grounded rewards (rewards.GraphRewards; see train/grpo_stage.py)."""
    grpo_steps: int = opt(50, "stage 3: generation batches (each gives --grpo-updates optimizer steps)", ge=1,
                          stages="3")
    grpo_prompts: int = opt(4, "stage 3: questions per generation batch", ge=1, cap=N, stages="3")
    num_generations: int = opt(4, "stage 3: samples per question (G, one shared prefill); advantages are taken "
                               "within each group", ge=2, cap=256, stages="3")
    grpo_updates: int = opt(1, "stage 3: policy updates per generation batch (old log-probs fixed per batch)",
                            ge=1, stages="3")
    grpo_micro_batch: int = opt(8, "stage 3: completions per forward/backward (gradients accumulated)", ge=1,
                                cap=N, resume_safe=True)
    grpo_max_new_tokens: int = opt(384, "stage 3: max new tokens per sample", ge=1, cap=1 << 17, stages="3")
    grpo_temperature: float = opt(1.0, "stage 3: sampling temperature", gt=0.0, stages="3")
    grpo_lr: float | None = opt(None, "stage 3 learning rate (default: 1e-6 full, 1e-5 with LoRA, 1e-4 for a "
                                "preset trained from scratch)", gt=0.0, le=1.0, stages="3")
    loss_type: GrpoLoss = opt("grpo", "stage 3 loss: grpo (per-sequence mean), dr_grpo (sum / (B * max new "
                              "tokens)) or dapo (token level)", stages="3")
    epsilon_low: float = opt(0.2, "stage 3: lower clip of the ratio (1 - epsilon_low)", ge=0.0, lt=1.0, stages="3")
    epsilon_high: float = opt(0.2, "stage 3: upper clip of the ratio (1 + epsilon_high; DAPO: 0.28)", ge=0.0,
                              stages="3")
    beta: float = opt(0.0, "stage 3: KL weight to the reference (the stage's start; the adapter-disabled base "
                      "under LoRA); 0: no reference", ge=0.0, stages="3")
    scale_rewards: ScaleRewards = opt("group", "stage 3 advantage scale: group (std per group), batch (std of the "
                                      "batch) or none (Dr. GRPO)", stages="3")
    reward_weights: str = opt("", "stage 3 reward weights as name=value,... (format, graph_validity, "
                              "groundedness, graph_utility, correctness); default: rewards.RewardWeights", stages="3")
    grpo_sft_steps: int = opt(0, "stage 3: causal-LM steps on the teacher's graph-format answers before GRPO "
                              "(a model that never saw the format gets rewards with spread)", ge=0, stages="3")

    def __post_init__(self):
        _check(self)
        n = self.grpo_prompts * self.num_generations
        if n > MAX_GRPO_SAMPLES:
            raise TrainConfigError(f"--grpo-prompts x --num-generations = {n} samples per generation batch is over "
                                   f"the limit {MAX_GRPO_SAMPLES}; lower one of them")

SECTIONS: dict[str, type] = {"run": RunConfig, "data": DataConfig, "optim": OptimConfig,
                             "preference": PreferenceConfig, "checkpoint": CheckpointConfig,
                             "parallel": ParallelConfig, "grpo": GRPOConfig}


@dataclass(kw_only=True)
class TrainConfig:
    """The whole training configuration: one section per concern (see ``SECTIONS``)."""
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    preference: PreferenceConfig = field(default_factory=PreferenceConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)

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

    # -- values derived from several sections ------------------------------------------------
    @property
    def from_scratch(self) -> bool:
        """True when ``run.model`` names a preset (random init) rather than a checkpoint."""
        return self.run.model in MODEL_PRESETS

    @property
    def stages(self) -> tuple[str, ...]:
        """The stages ``run.stage`` stands for: "all" is 1, 2 from a pretrained model (it needs no
        causal-LM stage; ``--stage 0`` still runs one) and 0, 1, 2 for a preset trained from scratch."""
        if self.run.stage != "all":
            return (self.run.stage,)
        return STAGES if self.from_scratch else STAGES[1:]

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
        if stage == "3":
            g = self.grpo.grpo_lr
            return g if g is not None else 1e-4 if self.from_scratch else 1e-5 if o.lora_r else 1e-6
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
        trained from scratch gets 18 in stage 1, where it must learn the whole thinking format (how often
        it closes its thinking after 6, 12 and 18 rounds: docs/benchmarks.md)."""
        if self.data.iterations is not None:
            return self.data.iterations
        return 18 if (self.from_scratch and stage == "1") else 6


# The `make demo` recipes: field values on top of the defaults (the Makefile adds --out and --seed).
# `make demo` trains the bundled SmolLM2-135M-Instruct in full on 2 CPU cores (the README's demo section
# says why these values); demo-tiny trains the tiny preset from scratch; demo-graph runs stage 3.
_DEMO = {"batch_size": 2, "warmup_steps": 2, "gen_batch_size": 16, "thinking_max_new_tokens": 640}
PRESETS: dict[str, dict] = {
    "demo-stage1": {**_DEMO, "stage": "1", "iterations": 4, "pairs_per_iteration": 32, "n_steps": 16,
                    "orpo_lr": 1e-4},
    "demo-stage2": {**_DEMO, "stage": "2", "iterations": 2, "pairs_per_iteration": 24, "n_steps": 12,
                    "dpo_lr": 1e-5, "rpo_alpha": 1.0},
    "demo-tiny": {"stage": "all", "model": "tiny", "seed": 42, "pairs_per_iteration": 64, "n_steps": 48},
    "demo-graph": {"stage": "grpo", "grpo_sft_steps": 24, "orpo_lr": 1e-4, "grpo_steps": 12, "grpo_prompts": 2,
                   "num_generations": 4, "grpo_max_new_tokens": 512, "grpo_lr": 1e-5, "warmup_steps": 0},
}
