"""Run 2 steps of stage 1 under torchrun, then save each rank's weights (for tests/test_trainer.py)."""
import os
import sys

import torch

from preflexor_core.trainer import StageRun, TrainConfig, Trainer

corpus, out = sys.argv[1], sys.argv[2]
cfg = TrainConfig(stage="1", model="tiny", corpus=corpus, out=out, embedder="hashing", progress=False, seed=5,
                  iterations=1, pairs_per_iteration=4, n_steps=2, batch_size=1, sample_max_new_tokens=12, thinking_max_new_tokens=12,
                  max_length=256, max_prompt_length=96, tokenizer_vocab_size=320)
captured = {}
orig = StageRun.save_final


def save_final(self):
    captured["model"] = self.base
    orig(self)


StageRun.save_final = save_final
trainer = Trainer(cfg)
trainer.run()
rank = trainer.dist.rank
torch.save({k: v.detach().cpu() for k, v in captured["model"].state_dict().items()},
           os.path.join(out, f"rank{rank}.pt"))
torch.distributed.barrier()
torch.distributed.destroy_process_group()
