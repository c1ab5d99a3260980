"""Under torchrun (2 ranks, gloo): one accumulated ORPO step's gradients with grad_accum=K micro-batches
of B pairs per rank (DDP, or FSDP2 with "fsdp"), saved by rank 0, plus how many gradient syncs ran
(for tests/test_trainer.py). Usage: ddp_accum.py CORPUS OUT K B [fsdp]"""
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from test_trainer import ROWS, make_run, micro_batches  # noqa: E402

corpus, out, k, b = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
fsdp = "fsdp" in sys.argv[5:]
run, ex, _ = make_run(corpus, out, "1", fsdp=fsdp)
assert len(ex) == len(ROWS)
world, rank = run.world, run.rank
syncs = []
if fsdp:   # FSDP2: record the gradient-sync switches the accumulation makes
    orig = run.model.set_requires_gradient_sync
    run.model.set_requires_gradient_sync = lambda v, **kw: (syncs.append(bool(v)), orig(v, **kw))[1]
else:      # DDP: count the buckets all-reduced (a comm hook sees each one)
    def hook(state, bucket):
        syncs.append(True)
        fut = torch.futures.Future()
        t = bucket.buffer()
        torch.distributed.all_reduce(t)
        fut.set_result(t / world)
        return fut
    run.model.register_comm_hook(None, hook)
# the trainer's data layout: micro-batch a on rank r takes pairs ((a * world) + r) * b onward
mbs = [run._pair_micro_batch([ex[j] for j in range(((a * world) + rank) * b, ((a * world) + rank + 1) * b)], None)
       for a in range(k)]
m = run.accumulate(mbs)
grads = {}
for n, p in run.base.named_parameters():
    if p.grad is not None:
        g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
        grads[n] = g.detach().cpu()
if rank == 0:
    torch.save({"grads": grads, "syncs": syncs, "loss": m["loss"] / world}, os.path.join(out, "accum.pt"))
torch.distributed.barrier()
torch.distributed.destroy_process_group()
