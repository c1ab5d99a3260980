"""PRefLexOR training stages: 0 (causal LM), 1 (ORPO, on the fly), 2 (DPO/EXO, on the fly).

    cfg = TrainConfig(stage="all", out="runs/demo")        # defaults = the embedded demo
    Trainer(cfg).run()

Stage 0 trains (or continues) a causal LM on the packed corpus; for a preset it first trains a
byte-level BPE tokenizer on the corpus. Stages 1 and 2 alternate "generate preference pairs with
the current policy" and "train n_steps on them" for ``iterations`` rounds (paper, sec. 2):
stage 1 uses ORPO (NLL on chosen + odds-ratio penalty), stage 2 DPO/EXO against a frozen reference
(the initial policy, or the policy with LoRA disabled), with the thinking span masked from the loss.

Run layout (``out``)::

    tokenizer/  retriever/  stage0/ stage1/ stage2/  (HF checkpoints + tokenizer, loadable by transformers)
    pairs.jsonl (every generated pair, with stage/iteration)  log.jsonl  plots/*.png
    checkpoints/stageN/  (model + optimizer + scheduler + RNG + data position; ``resume=True`` continues exactly)

Tests: ``python -m pytest -q tests/test_trainer.py``.
"""
from __future__ import annotations

import copy
import json
import logging
import math
import os
import random
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from . import distributed as D
from .io import atomic_replace_dir
from .config import ModelConfig, PRESETS
from .data import Batch, PairFormat, collate_pairs, collate_sequences, pack_lm_stream, tokenize_pair
from .losses import dpo_loss, forward_logps, orpo_loss
from .model import Llama
from .tokenizer import THINKING_TOKENS, Tokenizer, resize_token_embeddings

log = logging.getLogger("preflexor.trainer")

STAGES = ("0", "1", "2")


def shipped_corpus_files() -> list[str]:
    """The default corpus shipped with the package (markdown files; evaluation questions excluded)."""
    root = Path(__file__).parent / "corpus"
    files = sorted(str(p) for p in root.glob("*.md") if p.name.lower() != "readme.md")
    if not files:
        raise FileNotFoundError(f"the shipped corpus is missing from {root}; reinstall the package or pass --corpus")
    return files


@dataclass(kw_only=True)
class TrainConfig:
    """Every training option and its default (the CLI mirrors these names)."""
    # -- run
    stage: str = "all"                 # 0 | 1 | 2 | all
    model: str = "tiny"                # preset name (trained from scratch in stage 0) or an HF Llama directory
    tokenizer: str | None = None       # tokenizer dir; default: the model dir's, or trained on the corpus for presets
    corpus: str | None = None          # file or folder (.txt/.md/.jsonl); default: the shipped corpus
    teacher: str = "extractive"        # extractive | http(s)://... OpenAI-compatible URL | checkpoint dir
    teacher_model: str = "gpt-4o-mini"  # model name sent to an HTTP teacher
    teacher_max_items: int = 1         # extractive teacher: sentences / items per thinking category
    teacher_answer_sentences: int = 2  # extractive teacher: max sentences in the chosen answer
    embedder: str = "auto"             # retriever embedder: auto (bundled MiniLM, else hashing) | minilm | hashing
    out: str = "runs/demo"
    seed: int = 42
    device: str = "auto"               # auto | cpu | cuda
    resume: bool = False
    max_steps: int | None = None       # stop after this many optimizer steps in a stage (for experiments)
    # -- stage 0 (causal LM, packed)
    sft_steps: int = 500
    sft_seq_len: int = 256
    sft_batch_size: int = 16
    sft_lr: float = 3e-3
    tokenizer_vocab_size: int | None = None   # default: the preset's vocab_size
    # -- on-the-fly preference loop (stages 1 and 2)
    iterations: int | None = None      # dataset regenerations per stage (None: see iterations_for)
    pairs_per_iteration: int = 64
    n_steps: int = 48                  # optimizer steps per generated dataset
    batch_size: int = 4                # pairs per micro-batch per rank
    grad_accum: int = 1
    k_samples: int = 2                 # policy samples per question in stage 2 (the worst is kept)
    number_nodes_to_get: int = 3
    sample_max_new_tokens: int = 160   # stage 1 rejected answers (no thinking)
    thinking_max_new_tokens: int = 768  # stage 2 rejected answers (thinking + answer)
    gen_batch_size: int = 32           # questions per sampler call during pair generation
    sample_temperature: float = 0.8
    sample_top_p: float = 0.9
    # -- stage 1: ORPO (paper: beta 0.1, lr 5e-5 with LoRA / 5e-6 full)
    orpo_beta: float = 0.1
    orpo_lr: float | None = None
    # -- stage 2: DPO / EXO (paper: exo_pair, beta 0.5, label_smoothing 5e-3, lr 1e-6, answer-only masking)
    dpo_loss_type: str = "exo_pair"
    dpo_beta: float = 0.5
    label_smoothing: float = 5e-3
    dpo_lr: float | None = None
    mask_mode: str = "answer_only"     # answer_only | random_fraction | none
    mask_fraction: float = 0.5
    include_thinking_token_in_labels: bool = False
    on_unclosed: str | None = None     # stage-2 completions whose thinking never ends: drop | keep
                                       # (None: drop, or keep for a preset trained from scratch)
    # -- lengths
    max_length: int = 1024
    max_prompt_length: int = 128
    truncation_mode: str = "keep_start"
    # -- optimisation
    warmup_steps: int = 5
    schedule: str = "constant"         # constant | cosine
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    gradient_checkpointing: bool = False
    bf16: bool = True                  # bf16 autocast on CUDA (ignored on CPU)
    # -- LoRA (r = 0: full fine-tuning)
    lora_r: int = 0
    lora_alpha: float = 64.0
    lora_dropout: float = 0.0
    # -- checkpoints / logs / distributed
    save_every: int = 0                # optimizer steps between checkpoints (0: end of each iteration only)
    fsdp: bool = False
    progress: bool = True

    def __post_init__(self):
        if self.stage not in (*STAGES, "all"):
            raise ValueError(f"stage={self.stage!r}: use 0, 1, 2 or all")
        if self.dpo_loss_type not in ("sigmoid", "exo_pair", "ipo", "hinge"):
            raise ValueError(f"dpo_loss_type={self.dpo_loss_type!r}: use sigmoid, exo_pair, ipo or hinge")
        if self.schedule not in ("constant", "cosine"):
            raise ValueError(f"schedule={self.schedule!r}: use constant or cosine")
        for name in ("gen_batch_size", "thinking_max_new_tokens", "sample_max_new_tokens", "teacher_max_items", "teacher_answer_sentences", "pairs_per_iteration", "n_steps", "batch_size", "grad_accum", "k_samples",
                     "sft_steps", "sft_seq_len", "sft_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.embedder not in ("auto", "minilm", "hashing"):
            raise ValueError(f"embedder={self.embedder!r}: use auto, minilm or hashing")
        if self.on_unclosed not in (None, "drop", "keep"):
            raise ValueError(f"on_unclosed={self.on_unclosed!r}: use drop or keep")
        if self.lora_r < 0:
            raise ValueError(f"lora_r={self.lora_r} must be >= 0 (0 = full fine-tuning)")
        if self.iterations is not None and self.iterations < 1:
            raise ValueError(f"iterations={self.iterations} must be >= 1")

    @property
    def from_scratch(self) -> bool:
        return self.model in PRESETS

    @property
    def unclosed_policy(self) -> str:
        """Explicit flag, else "drop" (the paper's masking needs a closed thinking span); a tiny
        model trained from scratch rarely closes its thinking early in stage 2, so its unclosed
        samples are kept whole as rejected answers (DPO then pushes those samples down)."""
        if self.on_unclosed is not None:
            return self.on_unclosed
        return "keep" if self.from_scratch else "drop"

    def lr_for(self, stage: str) -> float:
        """Stage learning rate: explicit flag, else the paper's value (LoRA / full), else a from-scratch value."""
        if stage == "0":
            return self.sft_lr
        explicit = self.orpo_lr if stage == "1" else self.dpo_lr
        if explicit is not None:
            return explicit
        if self.from_scratch:        # a tiny model trained from scratch needs far larger steps
            return 2e-3 if stage == "1" else 2e-5
        if stage == "1":
            return 5e-5 if self.lora_r else 5e-6
        return 1e-6

    def iterations_for(self, stage: str) -> int:
        """Dataset regenerations of a preference stage: explicit flag (both stages), else 6; a preset
        trained from scratch gets 18 in stage 1, where it must learn the whole thinking format (on the
        shipped demo, 6 ORPO rounds left the tiny model closing its thinking in about a third of its
        answers, 12 in about two thirds, 18 in nine tenths)."""
        if self.iterations is not None:
            return self.iterations
        return 18 if (self.from_scratch and stage == "1") else 6


# ----------------------------------------------------------------------------- small utilities
def _rng_state() -> dict:
    st = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _set_rng_state(st: dict) -> None:
    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def make_scheduler(opt, warmup: int, total: int, kind: str):
    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if kind == "cosine":
            progress = (step - warmup) / max(1, total - warmup)
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return 1.0
    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


class JsonlLog:
    """Append-only JSONL log (rank 0 only); each line flushed."""

    def __init__(self, path: Path, enabled: bool):
        self.path, self.enabled = path, enabled

    def write(self, row: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()


# ----------------------------------------------------------------------------- objectives
def orpo_objective(model, batch: Batch, beta: float) -> tuple[torch.Tensor, dict]:
    """ORPO (Hong et al. 2024): NLL(chosen) + mean(-beta * log sigmoid(log odds ratio))."""
    sums, counts = forward_logps(model, batch)
    n = batch.n_pairs
    cs, rs, cc, rc = sums[:n], sums[n:], counts[:n], counts[n:]
    nll = -cs.sum() / cc.sum().clamp(min=1)
    losses, cr, rr, log_odds = orpo_loss(cs / cc.clamp(min=1), rs / rc.clamp(min=1), beta)
    loss = nll + losses.mean()
    return loss, {"loss": loss.item(), "nll": nll.item(), "rewards/chosen": cr.mean().item(),
                  "rewards/rejected": rr.mean().item(), "rewards/margins": (cr - rr).mean().item(),
                  "rewards/accuracies": (cr > rr).float().mean().item(), "log_odds": log_odds.mean().item()}


def dpo_objective(model, batch: Batch, ref_c: torch.Tensor, ref_r: torch.Tensor, cfg: TrainConfig
                  ) -> tuple[torch.Tensor, dict]:
    sums, counts = forward_logps(model, batch)
    n = batch.n_pairs
    losses, cr, rr = dpo_loss(sums[:n], sums[n:], ref_c, ref_r, cfg.dpo_beta, cfg.dpo_loss_type, cfg.label_smoothing)
    loss = losses.mean()
    nll = -sums[:n].sum() / counts[:n].sum().clamp(min=1)
    return loss, {"loss": loss.item(), "nll": nll.item(), "rewards/chosen": cr.mean().item(),
                  "rewards/rejected": rr.mean().item(), "rewards/margins": (cr - rr).mean().item(),
                  "rewards/accuracies": (cr > rr).float().mean().item()}


def lm_objective(model, batch: Batch) -> tuple[torch.Tensor, dict]:
    sums, counts = forward_logps(model, batch)
    loss = -sums.sum() / counts.sum().clamp(min=1)
    return loss, {"loss": loss.item(), "nll": loss.item()}


# ----------------------------------------------------------------------------- the trainer
class Trainer:
    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.dist = D.init_distributed(cfg.device)
        if cfg.fsdp and self.dist.enabled and cfg.lora_r:
            D.shutdown()
            raise NotImplementedError("--fsdp with --lora-r is not supported yet; use DDP (no --fsdp) for LoRA")
        self.device = self.dist.device
        self.out = Path(cfg.out)
        if self.dist.is_main:
            (self.out / "plots").mkdir(parents=True, exist_ok=True)
        D.barrier()
        self.log = JsonlLog(self.out / "log.jsonl", self.dist.is_main)
        self.packed = self.device.type == "cuda"      # varlen packing on CUDA, padding on CPU
        self.autocast = self.device.type == "cuda" and cfg.bf16
        self._retriever = None
        self._teacher = None
        self.summary: dict[str, Any] = {}
        self.stopped_early = False

    # -- inputs ---------------------------------------------------------------
    def corpus_files(self) -> list[str]:
        if self.cfg.corpus is None:
            return shipped_corpus_files()
        p = Path(self.cfg.corpus)
        if not p.exists():
            raise FileNotFoundError(f"--corpus {p}: no such file or folder")
        return [str(p)]

    def corpus_texts(self) -> list[str]:
        from .retrieval.chunking import read_path
        return [doc.text for f in self.corpus_files() for doc in read_path(f)]

    def retriever(self):
        if self._retriever is None:
            from .retrieval import GraphRetriever
            rdir = self.out / "retriever"
            if self.dist.is_main and not (rdir / "meta.json").exists():
                from .retrieval.embedding import HashingEmbedder, MiniLMEmbedder
                emb = {"auto": None, "hashing": HashingEmbedder, "minilm": MiniLMEmbedder}[self.cfg.embedder]
                r = GraphRetriever.build(self.corpus_files(), embedder=emb() if emb else None)
                r.save(str(rdir))
            D.barrier()
            self._retriever = GraphRetriever.load(str(rdir))
        return self._retriever

    def teacher(self):
        if self._teacher is None:
            from .teachers import ExtractiveTeacher, teacher_from_spec
            if self.cfg.teacher == "extractive":
                self._teacher = ExtractiveTeacher(self.retriever(), seed=self.cfg.seed,
                                                  max_items=self.cfg.teacher_max_items,
                                                  max_answer_sentences=self.cfg.teacher_answer_sentences)
            else:
                self._teacher = teacher_from_spec(self.cfg.teacher, retriever=self.retriever(), seed=self.cfg.seed,
                                                  model=self.cfg.teacher_model)
        return self._teacher

    def tokenizer(self) -> Tokenizer:
        cfg = self.cfg
        if cfg.tokenizer:
            tok = Tokenizer.from_pretrained(cfg.tokenizer)
        elif not cfg.from_scratch:
            tok = Tokenizer.from_pretrained(cfg.model)
        else:
            tdir = self.out / "tokenizer"
            if self.dist.is_main and not (tdir / "tokenizer.json").exists():
                vocab = cfg.tokenizer_vocab_size or ModelConfig.preset(cfg.model).vocab_size
                tok = Tokenizer.train_bpe(self.corpus_texts(), vocab_size=vocab)
                tok.save_pretrained(str(tdir))
            D.barrier()
            tok = Tokenizer.from_pretrained(str(tdir))
        tok.add_special_tokens(THINKING_TOKENS)
        return tok

    def initial_model(self, stage: str, tok: Tokenizer) -> Llama:
        """Stage N starts from the run's stage N-1 output, else from --model (preset: random init)."""
        prev = self.out / f"stage{int(stage) - 1}" if stage != "0" else None
        if prev is not None and (prev / "config.json").exists():
            model = Llama.from_pretrained(str(prev), dtype=torch.float32, device=self.device)
        elif not self.cfg.from_scratch:
            model = Llama.from_pretrained(self.cfg.model, dtype=torch.float32, device=self.device)
        else:
            if stage != "0":
                log.warning("stage %s starts from a randomly initialised %r model (no %s found); run stage 0 first "
                            "for a meaningful result", stage, self.cfg.model, prev)
            mcfg = ModelConfig.preset(self.cfg.model)
            torch.manual_seed(self.cfg.seed)
            model = Llama(mcfg.replace(vocab_size=tok.vocab_size), device=self.device)
        if model.config.vocab_size < tok.vocab_size:
            resize_token_embeddings(model, tok.vocab_size)
        ids = tok.stop_token_ids
        model.config.bos_token_id, model.config.eos_token_id = tok.bos_token_id, ids if len(ids) > 1 else ids[0]
        model.config.pad_token_id = tok.pad_token_id
        model.gradient_checkpointing = self.cfg.gradient_checkpointing
        return model

    # -- main -----------------------------------------------------------------
    def run(self) -> dict:
        stages = STAGES if self.cfg.stage == "all" else (self.cfg.stage,)
        for s in stages:
            if self.cfg.resume and (self.out / f"stage{s}" / "DONE").exists():
                log.info("stage %s already complete in %s; skipping", s, self.out)
                continue
            self.run_stage(s)
            if self.stopped_early:
                break
        if self.dist.is_main:
            self.plot()
        return self.summary

    def run_stage(self, stage: str) -> None:
        tok = self.tokenizer()
        model = self.initial_model(stage, tok)
        lora_cfg = None
        if self.cfg.lora_r and stage != "0":
            from .lora import LoRAConfig, apply_lora
            lora_cfg = LoRAConfig(r=self.cfg.lora_r, alpha=self.cfg.lora_alpha, dropout=self.cfg.lora_dropout)
            apply_lora(model, lora_cfg)
        ref = None
        if stage == "2" and not lora_cfg:
            ref = copy.deepcopy(model).eval()
            ref.requires_grad_(False)
        run = StageRun(self, stage, model, tok, ref, lora_cfg)
        run.train()

    def plot(self) -> None:
        from .evaluation import plot_training_log
        plot_training_log(str(self.out / "log.jsonl"), str(self.out / "plots"))


class StageRun:
    """One stage: optimizer, schedule, data, the step loop, checkpoints and exact resume."""

    def __init__(self, trainer: Trainer, stage: str, model: Llama, tok: Tokenizer, ref: Llama | None, lora_cfg):
        self.t, self.cfg, self.stage = trainer, trainer.cfg, stage
        self.tok, self.ref, self.lora_cfg = tok, ref, lora_cfg
        self.base = model
        self.fsdp = self.cfg.fsdp and trainer.dist.enabled
        self.model = D.wrap_model(model, trainer.dist, fsdp=self.cfg.fsdp)
        self.ckpt_dir = trainer.out / "checkpoints" / f"stage{stage}"
        self.final_dir = trainer.out / f"stage{stage}"
        self.total_steps = self.cfg.sft_steps if stage == "0" else self.cfg.iterations_for(stage) * self.cfg.n_steps
        params = [p for p in model.parameters() if p.requires_grad]
        kw = {"fused": True} if trainer.device.type == "cuda" else {}
        self.opt = torch.optim.AdamW(params, lr=self.cfg.lr_for(stage), betas=(0.9, 0.999), eps=1e-8,
                                     weight_decay=self.cfg.weight_decay, **kw)
        self.sched = make_scheduler(self.opt, self.cfg.warmup_steps, self.total_steps, self.cfg.schedule)
        self.pos = {"iteration": 0, "step": 0, "global_step": 0}
        self.fmt = PairFormat(max_length=self.cfg.max_length, max_prompt_length=self.cfg.max_prompt_length,
                              truncation_mode=self.cfg.truncation_mode,
                              mask_mode=self.cfg.mask_mode if stage == "2" else "none",
                              mask_fraction=self.cfg.mask_fraction,
                              include_thinking_token_in_labels=self.cfg.include_thinking_token_in_labels,
                              on_unclosed=self.cfg.unclosed_policy)

    @property
    def rank(self) -> int:
        return self.t.dist.rank

    @property
    def world(self) -> int:
        return self.t.dist.world_size

    # -- full (unsharded) weights -------------------------------------------------
    def full_state(self) -> dict[str, torch.Tensor]:
        """The model's full state dict on every rank (FSDP2 shards are all-gathered: collective)."""
        return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach()
                for k, v in self.base.state_dict().items()}

    def plain_model(self, state: dict[str, torch.Tensor] | None = None) -> Llama:
        """An unsharded Llama with the current weights (the model itself unless FSDP2 shards it)."""
        if not self.fsdp:
            return self.base
        model = Llama(self.base.config, device="meta")
        model.load_state_dict(state if state is not None else self.full_state(), assign=True)
        return model

    # -- checkpoints ----------------------------------------------------------
    def save_checkpoint(self) -> None:
        """Atomic checkpoint: full weights + trainer state (rank 0); under FSDP2 each rank also
        writes its optimizer shard. Collective: every rank calls it."""
        from safetensors.torch import save_file
        state = self.full_state() if self.fsdp else None
        tmp = None
        if self.t.dist.is_main:
            self.ckpt_dir.parent.mkdir(parents=True, exist_ok=True)
            tmp = tempfile.mkdtemp(prefix=f"stage{self.stage}.tmp-", dir=self.ckpt_dir.parent)
        if self.fsdp:
            tmp = D.broadcast_object(tmp)
            torch.save(self.opt.state_dict(), os.path.join(tmp, f"optimizer-rank{self.rank}.pt"))
            D.barrier()
        if self.t.dist.is_main:
            state = state if state is not None else self.base.state_dict()
            save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, os.path.join(tmp, "model.safetensors"))
            torch.save({"optimizer": None if self.fsdp else self.opt.state_dict(), "scheduler": self.sched.state_dict(),
                        "rng": _rng_state(), "position": dict(self.pos), "config": asdict(self.cfg),
                        "world_size": self.world}, os.path.join(tmp, "trainer_state.pt"))
            atomic_replace_dir(tmp, str(self.ckpt_dir), carry_over=False)
        D.barrier()

    def load_checkpoint(self) -> bool:
        from safetensors.torch import load_file
        if not (self.ckpt_dir / "trainer_state.pt").exists():
            return False
        sd = load_file(str(self.ckpt_dir / "model.safetensors"), device=str(self.t.device))
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
            set_model_state_dict(self.base, sd, options=StateDictOptions(full_state_dict=True))
            sd = {k: v for k, v in sd.items() if k not in self.base.state_dict()}
        missing, unexpected = ([], []) if self.fsdp else self.base.load_state_dict(sd, strict=False)
        if missing or unexpected:
            raise RuntimeError(f"{self.ckpt_dir}/model.safetensors does not match the model being trained "
                               f"(missing {missing[:3]}, unexpected {unexpected[:3]}); was it made with other "
                               f"--model/--lora-r flags? Remove {self.ckpt_dir} to start the stage over")
        st = torch.load(self.ckpt_dir / "trainer_state.pt", map_location="cpu", weights_only=False)
        if self.fsdp:
            if st.get("world_size") != self.world:
                raise RuntimeError(f"{self.ckpt_dir} was written by {st.get('world_size')} FSDP2 ranks; resume with "
                                   f"the same --nproc_per_node (now {self.world})")
            st["optimizer"] = torch.load(self.ckpt_dir / f"optimizer-rank{self.rank}.pt", map_location="cpu",
                                         weights_only=False)
        self.opt.load_state_dict(st["optimizer"])
        self.sched.load_state_dict(st["scheduler"])
        _set_rng_state(st["rng"])
        self.pos = dict(st["position"])
        log.info("resumed stage %s at %s", self.stage, self.pos)
        return True

    def save_final(self) -> None:
        state = self.full_state() if self.fsdp else None       # collective under FSDP2
        if self.t.dist.is_main:
            model = self.plain_model(state)
            if self.lora_cfg is not None:
                from .lora import merge_lora, save_adapter
                save_adapter(model, str(self.final_dir / "adapter"), self.lora_cfg)
                model = merge_lora(copy.deepcopy(model))
            model.save_pretrained(str(self.final_dir))
            self.tok.save_pretrained(str(self.final_dir))
            (self.final_dir / "DONE").write_text(json.dumps(self.pos) + "\n")
        D.barrier()

    # -- one optimizer step -----------------------------------------------------
    def optimizer_step(self, micro_batches: list[Callable[[], tuple[torch.Tensor, dict, int]]]) -> dict:
        t0 = time.perf_counter()
        self.model.train()
        metrics: dict[str, float] = {}
        ntok = 0
        for fn in micro_batches:
            with torch.autocast(self.t.device.type, dtype=torch.bfloat16, enabled=self.t.autocast):
                loss, m, n = fn()
            (loss / len(micro_batches)).backward()
            ntok += n
            for k, v in m.items():
                metrics[k] = metrics.get(k, 0.0) + v / len(micro_batches)
        params = [p for p in self.base.parameters() if p.requires_grad]
        grad_norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.max_grad_norm)
        lr = self.sched.get_last_lr()[0]
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        vals = torch.tensor([metrics[k] for k in sorted(metrics)] + [float(ntok)], dtype=torch.float64)
        vals = D.all_reduce_mean(vals.to(self.t.device)).cpu()
        out = {k: float(v) for k, v in zip(sorted(metrics), vals[:-1])}
        dt = time.perf_counter() - t0
        out.update(grad_norm=float(grad_norm), lr=lr, tokens_per_s=float(vals[-1]) * self.world / dt)
        return out

    # -- the loops --------------------------------------------------------------
    def train(self) -> None:
        resumed = self.cfg.resume and self.load_checkpoint()
        if not resumed:
            seed_everything(self.cfg.seed + 1000 * int(self.stage))
        if self.stage == "0":
            self.train_lm()
        else:
            self.train_preference()
        if self._stop_early() and self.pos["global_step"] < self.total_steps:
            log.info("stage %s stopped at step %d by max_steps; continue with --resume", self.stage,
                     self.pos["global_step"])
            self.t.stopped_early = True
            return
        self.save_final()

    def _log(self, metrics: dict, **extra) -> None:
        row = {"stage": int(self.stage), **extra, "global_step": self.pos["global_step"], **metrics,
               "time": time.time()}
        self.t.log.write(row)

    def _stop_early(self) -> bool:
        return self.cfg.max_steps is not None and self.pos["global_step"] >= self.cfg.max_steps

    def train_lm(self) -> None:
        texts = self.t.corpus_texts()
        blocks = pack_lm_stream([self.tok.encode(t) for t in texts], self.cfg.sft_seq_len + 1,
                                self.tok.token_to_id("<|end_of_text|>") or self.tok.eos_token_id)
        g = torch.Generator().manual_seed(self.cfg.seed)
        bs, world = self.cfg.sft_batch_size, self.world
        need = self.total_steps * bs * world * self.cfg.grad_accum
        order = torch.cat([torch.randperm(len(blocks), generator=g) for _ in range(need // len(blocks) + 1)])
        bar = _bar(self.total_steps, f"stage 0 (causal LM, {len(blocks)} blocks)", self.cfg.progress and self.t.dist.is_main,
                   initial=self.pos["global_step"])
        while self.pos["global_step"] < self.total_steps and not self._stop_early():
            step = self.pos["global_step"]
            fns = []
            for a in range(self.cfg.grad_accum):
                start = ((step * self.cfg.grad_accum + a) * world + self.rank) * bs
                idx = order[start:start + bs]
                rows = blocks[idx]
                seqs = [(r.tolist(), r.tolist()) for r in rows]

                def fn(seqs=seqs):
                    b = collate_sequences(seqs, pad_id=0, packed=False).to(self.t.device)
                    b.attention_mask = None
                    loss, m = lm_objective(self.model, b)
                    return loss, m, b.input_ids.numel()
                fns.append(fn)
            m = self.optimizer_step(fns)
            self.pos["global_step"] += 1
            self.pos["step"] = self.pos["global_step"]
            self._log(m)
            bar.update(1)
            bar.set_postfix(loss=f"{m['loss']:.3f}")
            if self.cfg.save_every and self.pos["global_step"] % self.cfg.save_every == 0:
                self.save_checkpoint()
        bar.close()
        self.save_checkpoint()

    # -- preference stages ------------------------------------------------------
    def generate(self, iteration: int) -> list[dict]:
        """Rank 0 generates (or reloads) this iteration's pairs; all ranks receive the same rows."""
        rows = None
        self.t.retriever()            # collective (built on rank 0, loaded everywhere): call on every rank
        state = self.full_state() if self.fsdp else None        # collective under FSDP2
        if self.t.dist.is_main:
            from .datagen import generate_pairs
            policy = self.plain_model(state)
            pairs_path = self.t.out / "pairs.jsonl"       # one append-only file; row ids are f"{seed}-{i}"
            seed = self.cfg.seed * 1000 + int(self.stage) * 100 + iteration
            was_training = policy.training
            policy.eval()
            rows = generate_pairs(
                self.t.retriever(), self.t.teacher(), policy=(policy, self.tok), tokenizer=self.tok,
                n=self.cfg.pairs_per_iteration, number_nodes_to_get=self.cfg.number_nodes_to_get,
                rejected_from="policy", with_thinking=self.stage == "2",
                k_samples=self.cfg.k_samples if self.stage == "2" else 1,
                seed=seed, out_path=str(pairs_path), sampling=self._sampling_params(), progress=self.cfg.progress,
                batch_size=self.cfg.gen_batch_size)
            policy.train(was_training)
            del policy
            rows = [dict(r) for r in rows if str(r["id"]).startswith(f"{seed}-")]
        return D.broadcast_object(rows)

    def _sampling_params(self):
        from .sampler import SamplingParams
        cap = self.cfg.thinking_max_new_tokens if self.stage == "2" else self.cfg.sample_max_new_tokens
        return SamplingParams(max_new_tokens=cap, temperature=self.cfg.sample_temperature,
                              top_p=self.cfg.sample_top_p)

    @torch.no_grad()
    def reference_logps(self, examples) -> tuple[torch.Tensor, torch.Tensor]:
        """Reference (frozen initial policy, or LoRA disabled) summed log-probs, once per dataset."""
        out_c, out_r = [], []
        ctx = None
        if self.ref is None:
            from .lora import disable_adapters
            ctx = disable_adapters(self.base)
            ctx.__enter__()
        model = self.ref if self.ref is not None else self.base
        was = model.training
        model.eval()
        try:
            for i in range(0, len(examples), self.cfg.batch_size):
                chunk = examples[i:i + self.cfg.batch_size]
                b = collate_pairs(chunk, self.tok.pad_token_id, packed=self.t.packed).to(self.t.device)
                with torch.autocast(self.t.device.type, dtype=torch.bfloat16, enabled=self.t.autocast):
                    sums, _ = forward_logps(model, b)
                out_c.append(sums[:b.n_pairs].float().cpu())
                out_r.append(sums[b.n_pairs:].float().cpu())
        finally:
            model.train(was)
            if ctx is not None:
                ctx.__exit__(None, None, None)
        return torch.cat(out_c), torch.cat(out_r)

    def train_preference(self) -> None:
        cfg = self.cfg
        name = "ORPO" if self.stage == "1" else f"DPO/{cfg.dpo_loss_type}"
        bar = _bar(self.total_steps, f"stage {self.stage} ({name})", cfg.progress and self.t.dist.is_main,
                   initial=self.pos["global_step"])
        while self.pos["iteration"] < cfg.iterations_for(self.stage) and not self._stop_early():
            it = self.pos["iteration"]
            rows = self.generate(it)
            g = torch.Generator().manual_seed(cfg.seed * 7919 + it)
            examples, dropped = [], {}
            for i, row in enumerate(rows):
                ex, why = tokenize_pair(self.tok, row, self.fmt, generator=g, index=i)
                if ex is None:
                    dropped[why] = dropped.get(why, 0) + 1
                else:
                    examples.append(ex)
            self.t.log.write({"stage": int(self.stage), "iteration": it, "event": "dataset", "pairs": len(rows),
                              "kept": len(examples), "dropped": dropped})
            if not examples:
                log.warning("stage %s iteration %d: every generated pair was dropped (%s); skipping this dataset. "
                            "Unclosed thinking drops pairs with --on-unclosed drop: raise --thinking-max-new-tokens "
                            "or pass --on-unclosed keep", self.stage, it, dropped)
                self.pos["iteration"] += 1
                self.pos["step"] = 0
                self.save_checkpoint()
                continue
            ref_c = ref_r = None
            if self.stage == "2":
                ref_c, ref_r = self.reference_logps(examples)
            bs, world = cfg.batch_size, self.world
            need = cfg.n_steps * cfg.grad_accum * bs * world
            perm = torch.cat([torch.randperm(len(examples), generator=g) for _ in range(need // len(examples) + 1)])
            while self.pos["step"] < cfg.n_steps and not self._stop_early():
                step = self.pos["step"]
                fns = []
                for a in range(cfg.grad_accum):
                    start = ((step * cfg.grad_accum + a) * world + self.rank) * bs
                    idx = perm[start:start + bs].tolist()
                    fns.append(self._micro_batch([examples[j] for j in idx],
                                                 None if ref_c is None else (ref_c[idx], ref_r[idx])))
                m = self.optimizer_step(fns)
                self.pos["step"] += 1
                self.pos["global_step"] += 1
                self._log(m, iteration=it)
                bar.update(1)
                bar.set_postfix(loss=f"{m['loss']:.3f}", acc=f"{m['rewards/accuracies']:.2f}")
                if cfg.save_every and self.pos["global_step"] % cfg.save_every == 0:
                    self.save_checkpoint()
            if self.pos["step"] >= cfg.n_steps:
                self.pos["iteration"] += 1
                self.pos["step"] = 0
            self.save_checkpoint()
        bar.close()

    def _micro_batch(self, chunk, refs):
        def fn():
            b = collate_pairs(chunk, self.tok.pad_token_id, packed=self.t.packed).to(self.t.device)
            if self.stage == "1":
                loss, m = orpo_objective(self.model, b, self.cfg.orpo_beta)
            else:
                rc, rr = (r.to(self.t.device) for r in refs)
                loss, m = dpo_objective(self.model, b, rc, rr, self.cfg)
            return loss, m, b.num_tokens
        return fn


def _bar(total: int, desc: str, enabled: bool, initial: int = 0):
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, disable=not enabled, initial=initial, dynamic_ncols=True)


def main(cfg: TrainConfig) -> dict:
    try:
        return Trainer(cfg).run()
    finally:
        D.shutdown()
