"""PRefLexOR training: stage 0 (causal LM), 1 (ORPO, on the fly), 2 (DPO/EXO, on the fly).

config.py (TrainConfig by concern), objectives.py (losses per stage), stage.py (StageRun: the step
loop), checkpointing.py (exact resume, final export), trainer.py (Trainer: inputs and the run).
Tests: ``python -m pytest -q tests/test_trainer.py``
"""
from .config import (STAGES, CheckpointConfig, DataConfig, OptimConfig, ParallelConfig, PreferenceConfig,
                     RunConfig, TrainConfig)
from .objectives import dpo_objective, lm_objective, orpo_objective
from .stage import StageRun
from .trainer import StalePairsError, Trainer, main, shipped_corpus_files

__all__ = ["STAGES", "TrainConfig", "RunConfig", "DataConfig", "OptimConfig", "PreferenceConfig",
           "CheckpointConfig", "ParallelConfig", "Trainer", "StageRun", "StalePairsError", "main",
           "shipped_corpus_files", "lm_objective", "orpo_objective", "dpo_objective"]
