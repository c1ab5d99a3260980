"""The training maths: preference losses, GRPO's policy-gradient loss, and the thinking-span masks.

    from preflexor_core.losses import orpo_loss, dpo_loss, grpo_loss

``preference`` (masked sequence log-probs, ORPO, DPO sigmoid / IPO / hinge / EXO), ``grpo`` (group
advantages and the clipped GRPO / Dr. GRPO / DAPO loss) and ``masks`` (which answer tokens a loss
counts when the thinking span is masked). Pure functions of tensors: no model, file or stage here.

Tests: ``python -m pytest -q tests/test_losses.py tests/test_grpo.py``.
"""
from .grpo import group_advantages, grpo_loss, keep_groups_with_spread
from .masks import MASK_MODES, UnclosedThinking, find_thinking_spans, thinking_mask, thinking_mask_batch
from .preference import (DPO_LOSS_TYPES, IGNORE_INDEX, ORPO_MAX_LOGP, dpo_loss, forward_logps, log1mexp,
                         logps_from_hidden, orpo_loss, sequence_logps)

__all__ = ["orpo_loss", "dpo_loss", "grpo_loss", "sequence_logps", "forward_logps", "logps_from_hidden",
           "log1mexp", "group_advantages", "keep_groups_with_spread", "thinking_mask", "thinking_mask_batch",
           "find_thinking_spans", "UnclosedThinking", "MASK_MODES", "DPO_LOSS_TYPES", "IGNORE_INDEX",
           "ORPO_MAX_LOGP"]
