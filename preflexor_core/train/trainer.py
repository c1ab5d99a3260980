"""The run: inputs shared by every stage (corpus, retriever, teacher, tokenizer, initial model), the
stage sequence, logs and plots.

    Trainer(TrainConfig.from_flat(stage="all", out="runs/demo")).run()    # the embedded demo (stages 1, 2)

Run layout (``run.out``): ``tokenizer/ retriever/ stage0/ stage1/ stage2/`` (HF checkpoints +
tokenizer), ``pairs.jsonl`` (every generated pair), ``log.jsonl``, ``plots/*.png`` and
``checkpoints/stageN/`` (exact resume); ``.preflexor-run`` marks the folder as the project's (a user's
non-empty folder is refused without ``--force-out``) and ``.preflexor-lock`` keeps a second run out
while one writes it (``rundir``). A stage starts from the previous stage's output when it
exists, else from ``run.model`` (a preset is initialised at random and needs stage 0 first).

Tests: ``python -m pytest -q tests/test_trainer.py``
"""
from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Any

import torch

from ..infra.errors import writing
from ..infra.io import atomic_dir, atomic_write, parse_jsonl_line, recover_dir
from ..infra.rundir import WriterLock, claim_dir, run_lock_path
from ..tokenization.tokenizer import Tokenizer
from ..llm.config import ModelConfig
from ..llm.cpu_features import native_cpu_bf16
from ..llm.lora import LoRAConfig, apply_lora
from ..llm.model import Llama
from ..llm.registry import resolve_model
from ..llm.vocab import VocabChange, add_thinking_tokens, init_token_rows
from ..retrieval import GraphRetriever
from ..retrieval.chunking import CorpusError, read_path
from ..retrieval.embedding import HashingEmbedder, MiniLMEmbedder
from ..teachers import check_teacher_endpoint, teacher_from_spec
from ..datagen.pairs_io import read_pairs
from . import distributed as D
from .config import STAGES, TrainConfig
from .grpo_stage import GRPOStage
from .plots import plot_training_log
from .provenance import built_from, corpus_fingerprint, reuse_artefact, write_built_from
from .resume import check_resume
from .signals import TrainingInterrupted, stop_on_signals
from .stage import PAIRS_FILE, StageRun

log = logging.getLogger("preflexor.train")

__all__ = ["Trainer", "JsonlLog", "StalePairsError", "main", "shipped_corpus_files"]


class StalePairsError(ValueError):
    """The run directory already has preference pairs of this run's stages, and --resume was not given."""


def shipped_corpus_files() -> list[str]:
    """The default corpus shipped with the package (markdown files; evaluation questions excluded)."""
    root = Path(__file__).resolve().parent.parent / "corpus"
    files = sorted(str(p) for p in root.glob("*.md") if p.name.lower() != "readme.md")
    if not files:
        raise FileNotFoundError(f"the shipped corpus is missing from {root}; reinstall the package or pass --corpus")
    return files


class JsonlLog:
    """Append-only JSONL log (rank 0 only); each line flushed. ``rewind`` keeps one row per step."""

    def __init__(self, path: Path, enabled: bool):
        self.path, self.enabled = path, enabled

    def rewind(self, stage: str, pos: dict) -> None:
        """Drop the rows of ``stage`` after position ``pos`` (written before a crash or by an earlier run
        into this directory) and torn lines (or any line that is not a JSON object), so a resumed or
        restarted stage logs each step once."""
        if not self.enabled or not self.path.exists():
            return
        lines = self.path.read_text(encoding="utf-8").splitlines(keepends=True)
        kept = []
        for line in lines:
            row, bad = parse_jsonl_line(line)
            if bad or not line.endswith("\n"):
                continue                          # a line torn by a crash
            if not (str(row.get("stage")) == stage and _after(row, pos)):
                kept.append(line)
        if len(kept) != len(lines):
            atomic_write(self.path, "".join(kept))

    def write(self, row: dict) -> None:
        if not self.enabled:
            return
        with writing("the training log", self.path, "free disk space and rerun with --resume"), \
                open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()


def _after(row: dict, pos: dict) -> bool:
    """A log row of a stage that the stage at ``pos`` will write again (a step past it, or an event of
    a dataset not finished); rows without a position belong to a stage that starts from scratch."""
    if "global_step" in row:
        return row["global_step"] > pos.get("global_step", 0)
    if "iteration" in row:
        return row["iteration"] >= pos.get("iteration", 0)
    return pos.get("global_step", 0) == 0


class Trainer:
    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        # --model: a known name, checkpoint dir or .gguf file, checked before any work (None: a preset)
        self.model_path = None if cfg.from_scratch else resolve_model(cfg.run.model)
        check_teacher_endpoint(cfg.data.teacher, cfg.data.teacher_model, flag="--teacher")
        self.dist = D.init_distributed(cfg.parallel.device)
        if cfg.parallel.fsdp and self.dist.enabled and cfg.optim.lora_r:
            D.shutdown()
            raise NotImplementedError("--fsdp with --lora-r is not supported yet; use DDP (no --fsdp) for LoRA")
        self.device = self.dist.device
        self.out = Path(cfg.run.out)
        if self.dist.is_main:      # never into a user's folder: a run dir is marked as the project's
            claim_dir(self.out, "--out", force=cfg.run.force_out)
            (self.out / "plots").mkdir(parents=True, exist_ok=True)
        D.barrier()
        self.log = JsonlLog(self.out / "log.jsonl", self.dist.is_main)
        self.packed = cfg.optim.pack                  # one row per micro-batch, prompts shared (--no-pack: padded)
        # Precision: fp32 master weights (and fp32 AdamW state; LoRA adapters fp32 over any base dtype)
        # with the forward under bf16 autocast on CUDA and on CPUs that multiply bf16 natively
        # (cpu_features.native_cpu_bf16). Tests also run it on CPU (and fp16 there).
        self.autocast = cfg.optim.bf16 and (self.device.type == "cuda" or
                                            (self.device.type == "cpu" and native_cpu_bf16()))
        self.autocast_dtype = torch.bfloat16
        self._retriever = None
        self._teacher = None
        self.summary: dict[str, Any] = {}
        self.stopped_early = False

    # -- inputs ---------------------------------------------------------------
    def corpus_files(self) -> list[str]:
        if self.cfg.data.corpus is None:
            return shipped_corpus_files()
        p = Path(self.cfg.data.corpus)
        if not p.exists():
            raise FileNotFoundError(f"--corpus {p}: no such file or folder")
        return [str(p)]

    def corpus_texts(self) -> list[str]:
        texts = [doc.text for f in self.corpus_files() for doc in read_path(f)]
        if not any(t.strip() for t in texts):
            raise CorpusError(f"--corpus {', '.join(self.corpus_files())}: no text to train on; pass a corpus "
                              f"with text (.txt, .md, .jsonl with a 'text' field)")
        return texts

    def corpus_fingerprint(self) -> dict:
        """Names, sizes and SHA-256 of the corpus files (computed once; see ``provenance``)."""
        if getattr(self, "_fingerprint", None) is None:
            self._fingerprint = corpus_fingerprint(self.corpus_files())
        return self._fingerprint

    def retriever(self):
        """The run's GraphRetriever: built on rank 0 into ``retriever/`` once, loaded on every rank (collective)."""
        if self._retriever is None:
            rdir = self.out / "retriever"
            record = built_from(self.corpus_fingerprint(), embedder=self.cfg.data.embedder)
            reuse = reuse_artefact(rdir, (rdir / "meta.json").exists(), record, [self.out / "pairs.jsonl"],
                                   "retriever")
            if self.dist.is_main and not reuse:
                emb = {"auto": None, "hashing": HashingEmbedder, "minilm": MiniLMEmbedder}[self.cfg.data.embedder]
                r = GraphRetriever.build(self.corpus_files(), embedder=emb() if emb else None)
                r.save(str(rdir))                    # atomic; the record last: without it, not complete
                write_built_from(rdir, record)
            D.barrier()
            self._retriever = GraphRetriever.load(str(rdir))
        return self._retriever

    def teacher(self):
        if self._teacher is None:
            d = self.cfg.data
            self._teacher = teacher_from_spec(d.teacher, retriever=self.retriever(), model=d.teacher_model,
                                              seed=self.cfg.run.seed, max_items=d.teacher_max_items,
                                              max_answer_sentences=d.teacher_answer_sentences,
                                              timeout=d.teacher_timeout, max_reply_bytes=d.max_reply_bytes)
        return self._teacher

    def tokenizer(self) -> Tokenizer:
        """--tokenizer, else the model's, else a BPE trained on the corpus (presets); thinking tokens added."""
        r = self.cfg.run
        if r.tokenizer:
            tok = Tokenizer.from_pretrained(r.tokenizer)
        elif not self.cfg.from_scratch:
            tok = Tokenizer.from_pretrained(self.model_path)
        else:
            tdir = self.out / "tokenizer"
            vocab = r.tokenizer_vocab_size or ModelConfig.preset(r.model).vocab_size
            record = built_from(self.corpus_fingerprint(), vocab_size=vocab)
            made_from = [self.out / f"stage{s}" for s in STAGES] + [self.out / "checkpoints"]
            reuse = reuse_artefact(tdir, (tdir / "tokenizer.json").exists(), record, made_from, "tokenizer")
            if self.dist.is_main and not reuse:                 # checked on every rank: all raise alike
                tok = Tokenizer.train_bpe(self.corpus_texts(), vocab_size=vocab)
                with atomic_dir(tdir) as tmp:
                    tok.save_pretrained(tmp)
                    write_built_from(tmp, record)
            D.barrier()
            tok = Tokenizer.from_pretrained(str(tdir))
        self.vocab_change = add_thinking_tokens(tok)      # reserved tokens renamed, else new ones added
        return tok

    def initial_model(self, stage: str, tok: Tokenizer) -> Llama:
        """Stage N starts from the run's stage N-1 output, else from --model (preset: random init)."""
        prev = self.out / f"stage{int(stage) - 1}" if stage != "0" else None
        from_prev = prev is not None and (prev / "config.json").exists()
        if from_prev:
            model = Llama.from_pretrained(str(prev), dtype=torch.float32, device=self.device)
        elif not self.cfg.from_scratch:
            model = Llama.from_pretrained(self.model_path, dtype=torch.float32, device=self.device)
        else:
            if stage != "0":
                log.warning("stage %s starts from a randomly initialised %r model (no %s found); run stage 0 first "
                            "for a meaningful result", stage, self.cfg.run.model, prev)
            mcfg = ModelConfig.preset(self.cfg.run.model)
            torch.manual_seed(self.cfg.run.seed)
            model = Llama(mcfg.replace(vocab_size=tok.vocab_size), device=self.device)
        # Rows of thinking tokens new to the base start from their tags' word pieces and are recorded in
        # model.new_token_ids (trainable under LoRA); a previous stage's output has trained them already.
        change = getattr(self, "vocab_change", None) or add_thinking_tokens(tok)
        init_token_rows(model, tok, VocabChange(ids=change.ids) if from_prev else change)
        ids = tok.stop_token_ids
        model.config.bos_token_id, model.config.eos_token_id = tok.bos_token_id, ids if len(ids) > 1 else ids[0]
        model.config.pad_token_id = tok.pad_token_id
        model.gradient_checkpointing = self.cfg.optim.gradient_checkpointing
        return model

    # -- main -----------------------------------------------------------------
    def run(self) -> dict:
        """Every configured stage, with the run dir locked against a second writer (rank 0 holds it)."""
        lock = WriterLock(run_lock_path(self.out), "--out") if self.dist.is_main else None
        if lock is not None:
            lock.acquire()
        try:
            with stop_on_signals() as stop:        # SIGTERM / SIGINT: checkpoint at the next step, then stop
                summary = self._run()
                if stop.requested():
                    raise TrainingInterrupted(f"stopped by {stop.name} after the last step; every output in "
                                              f"{self.out} is complete", stop.signum)
                return summary
        finally:
            if lock is not None:
                lock.release()

    def _run(self) -> dict:
        stages = self.cfg.stages
        if self.dist.is_main:
            for s in stages:                                 # a crash between the renames of a checkpoint
                recover_dir(self.out / "checkpoints" / f"stage{s}")
        D.barrier()
        check_resume(self.cfg, self.out, stages)            # before any work: something to resume, same flags
        self.check_no_stale_pairs(stages)
        for s in stages:
            if self.dist.is_main:
                recover_dir(self.out / f"stage{s}")          # a crash between the renames of its export
            D.barrier()
            if self.cfg.checkpoint.resume and (self.out / f"stage{s}" / "DONE").exists():
                log.info("stage %s already complete in %s; skipping", s, self.out)
                continue
            self.run_stage(s)
            if self.stopped_early:
                break
        if self.dist.is_main:
            plot_training_log(str(self.out / "log.jsonl"), str(self.out / "plots"))
        return self.summary

    def check_no_stale_pairs(self, stages) -> None:
        """Without --resume, ``pairs.jsonl`` must hold no rows of a preference stage this run trains
        (nor rows without provenance): they were sampled from an earlier policy. Checked on every rank."""
        path = self.out / PAIRS_FILE
        if self.cfg.checkpoint.resume or not path.exists() or not {"1", "2"} & set(stages):
            return
        stale = [r for r in read_pairs(path) if str(r.get("stage", "?")) in (*stages, "?")]
        if stale:
            raise StalePairsError(
                f"{path} already holds {len(stale)} preference pairs for stage(s) {', '.join(stages)} from an "
                f"earlier run (sampled from an earlier policy, so no longer on-policy); pass --resume to "
                f"continue that run, or use another --out")

    def run_stage(self, stage: str) -> None:
        tok = self.tokenizer()
        model = self.initial_model(stage, tok)
        lora_cfg = None
        o = self.cfg.optim
        if o.lora_r and stage != "0":
            lora_cfg = LoRAConfig(r=o.lora_r, alpha=o.lora_alpha, dropout=o.lora_dropout,
                                  trainable_token_indices=getattr(model, "new_token_ids", ()))
            torch.manual_seed(self.cfg.run.seed + 1000 * int(stage))    # adapter init: same in every process
            apply_lora(model, lora_cfg)
        ref = None
        if (stage == "2" or (stage == "3" and self.cfg.grpo.beta > 0)) and not lora_cfg:
            ref = copy.deepcopy(model).eval()
            ref.requires_grad_(False)
        if stage == "3":
            GRPOStage(self, stage, model, tok, ref, lora_cfg).train()
            return
        StageRun(self, stage, model, tok, ref, lora_cfg).train()


def main(cfg: TrainConfig) -> dict:
    """Run every configured stage; always shuts the process group down."""
    try:
        return Trainer(cfg).run()
    finally:
        D.shutdown()
