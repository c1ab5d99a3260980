"""Run 2 steps of stage 1 under torchrun (DDP, or FSDP2 with a third argument "fsdp"), then save each
rank's full weights (for tests/test_trainer.py)."""
import os
import sys

import torch

from preflexor_core.train import distributed as D
from preflexor_core.train import TrainConfig, Trainer
from preflexor_core.train import stage as stage_module

corpus, out = sys.argv[1], sys.argv[2]
flags = set(sys.argv[3:])                      # "fsdp", "stop1" (stop after 1 step), "resume"
cfg = TrainConfig.from_flat(
    stage="1", model="tiny", corpus=corpus, out=out, embedder="hashing", progress=False, seed=5, iterations=1,
    pairs_per_iteration=4, n_steps=2, batch_size=1, sample_max_new_tokens=12, thinking_max_new_tokens=12,
    max_length=256, max_prompt_length=96, tokenizer_vocab_size=320, fsdp="fsdp" in flags, save_every=1,
    max_steps=1 if "stop1" in flags else None, resume="resume" in flags)
captured = {}
orig = stage_module.save_final


def save_final(run):
    captured["state"] = {k: v.cpu() for k, v in D.full_state_dict(run.base).items()}     # collective under FSDP2
    orig(run)


stage_module.save_final = save_final
trainer = Trainer(cfg)
trainer.run()
rank = trainer.dist.rank
if "state" in captured:
    torch.save(captured["state"], os.path.join(out, f"rank{rank}.pt"))
torch.distributed.barrier()
torch.distributed.destroy_process_group()
