"""Training: stages 0/1/2 learn and export checkpoints that transformers reproduces; exact resume;
gradient accumulation; the nested TrainConfig and the CLI built from it; torchrun DDP / FSDP2."""
import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch

from preflexor_core import Llama, Tokenizer
from preflexor_core.train.batches import PairFormat, collate_pairs, tokenize_pair
from preflexor_core.losses.preference import dpo_loss, forward_logps
from preflexor_core.train import (DataConfig, OptimConfig, PreferenceConfig, RunConfig, TrainConfig, Trainer,
                                  orpo_objective)
from preflexor_core.train.config import SECTIONS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CORPUS = """# Materials

Spider silk is a protein fibre whose beta-sheet nanocrystals give it strength while amorphous regions give it extensibility. Because the crystals are small, they fail gracefully under shear.

Nacre is a brick-and-mortar composite of aragonite tablets and a thin organic matrix. Tablet sliding dissipates energy, which makes nacre far tougher than pure aragonite.

Bone is a hierarchical composite of collagen fibrils and hydroxyapatite mineral. Its toughness comes from mechanisms at many length scales, from fibril sliding to crack deflection at osteons.

Wood cell walls contain cellulose microfibrils wound at an angle around the cell axis. A small microfibril angle gives a stiff wood, a large angle gives a compliant one.

A key design principle of biological materials is hierarchy: the same few building blocks are arranged differently at each length scale to reach properties that no single level could achieve.
"""


@pytest.fixture()
def corpus(tmp_path):
    p = tmp_path / "corpus.md"
    p.write_text(CORPUS * 3)
    return str(p)


def stage0_cfg(corpus, out, **kw):
    base = dict(stage="0", model="tiny", corpus=corpus, out=str(out), sft_steps=6, sft_seq_len=32, sft_batch_size=2,
                tokenizer_vocab_size=320, progress=False, seed=3)
    base.update(kw)
    return TrainConfig.from_flat(**base)


def losses(out, stage=0):
    rows = [json.loads(l) for l in open(os.path.join(out, "log.jsonl"))]
    return [r["loss"] for r in rows if r.get("stage") == stage and "loss" in r]


def test_stage0_trains_and_exports_hf_checkpoint(corpus, tmp_path):
    Trainer(stage0_cfg(corpus, tmp_path / "run", sft_steps=12, export_gguf="q8_0")).run()
    out = tmp_path / "run"
    ls = losses(out)
    assert len(ls) == 12 and all(map(lambda x: x == x, ls))
    assert sum(ls[-3:]) / 3 < sum(ls[:3]) / 3            # it learns
    st = out / "stage0"
    assert (st / "config.json").exists() and (st / "tokenizer.json").exists() and (st / "DONE").exists()
    assert (out / "plots" / "stage0.png").exists()
    assert_transformers_matches(st)
    # --export-gguf q8_0: the GGUF beside the export loads with the export's logits within q8_0 rounding
    hf_dir, gg = Llama.from_pretrained(str(st)).eval(), Llama.from_pretrained(str(st / "model-q8_0.gguf")).eval()
    x = torch.randint(0, hf_dir.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref, got = hf_dir(x), gg(x)
    assert (got - ref).abs().max() <= 0.02 * ref.abs().max()       # 8-bit blocks: ~0.4% per weight
    assert Tokenizer.from_pretrained(str(st / "model-q8_0.gguf")).encode("<|thinking|>") == \
        Tokenizer.from_pretrained(str(st)).encode("<|thinking|>")


def test_export_gguf_choices_are_checked():
    with pytest.raises(ValueError, match="export_gguf"):
        TrainConfig.from_flat(export_gguf="q4")


def assert_transformers_matches(path):
    """transformers loads the exported checkpoint and computes the same logits as we do."""
    transformers = pytest.importorskip("transformers", reason="transformers is the test-only reference")
    ours = Llama.from_pretrained(str(path)).eval()
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(path)).eval()
    assert hf.config.vocab_size == ours.config.vocab_size
    x = torch.randint(0, ours.config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (hf(x).logits - ours(x)).abs().max() <= 1e-4


def test_grad_accum_matches_a_larger_batch_in_stage0(corpus, tmp_path):
    # stage-0 blocks all have the same length, so 2 micro-batches of 1 block average to exactly the
    # loss and gradient of 1 batch of 2 blocks (the same blocks, in the same order); only float
    # summation order differs
    Trainer(stage0_cfg(corpus, tmp_path / "big", sft_batch_size=2, grad_accum=1)).run()
    Trainer(stage0_cfg(corpus, tmp_path / "acc", sft_batch_size=1, grad_accum=2)).run()
    assert losses(tmp_path / "acc") == pytest.approx(losses(tmp_path / "big"), abs=1e-5)
    assert losses(tmp_path / "acc")[-1] < losses(tmp_path / "acc")[0]
    from safetensors.torch import load_file
    wa = load_file(str(tmp_path / "big" / "stage0" / "model.safetensors"))
    wb = load_file(str(tmp_path / "acc" / "stage0" / "model.safetensors"))
    assert all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)
    ones = stage0_cfg(corpus, tmp_path / "one", sft_batch_size=1, grad_accum=1)
    Trainer(ones).run()                  # and accumulation is not a no-op: one block per step differs
    assert losses(tmp_path / "one") != pytest.approx(losses(tmp_path / "acc"), abs=1e-5)


def test_stage0_resume_is_bit_identical(corpus, tmp_path):
    Trainer(stage0_cfg(corpus, tmp_path / "a")).run()
    Trainer(stage0_cfg(corpus, tmp_path / "b", max_steps=3, save_every=1)).run()
    assert not (tmp_path / "b" / "stage0" / "DONE").exists()
    assert len(losses(tmp_path / "b")) == 3
    Trainer(stage0_cfg(corpus, tmp_path / "b", resume=True)).run()
    assert losses(tmp_path / "a") == losses(tmp_path / "b")         # bit-identical floats
    from safetensors.torch import load_file
    wa = load_file(str(tmp_path / "a" / "stage0" / "model.safetensors"))
    wb = load_file(str(tmp_path / "b" / "stage0" / "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_train_cli_help_and_errors(tmp_path):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "--stage" in r.stdout and "--lora-r" in r.stdout and "--resume" in r.stdout
    r = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--stage", "0", "--corpus",
                        str(tmp_path / "missing"), "--out", str(tmp_path / "o")], capture_output=True, text=True)
    assert r.returncode == 2 and "--corpus" in r.stderr and "missing" in r.stderr
    r = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--stage", "5"], capture_output=True, text=True)
    assert r.returncode == 2 and "invalid choice" in r.stderr
    r = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--dpo-loss-type", "kto"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "--dpo-loss-type" in r.stderr and "invalid choice" in r.stderr


def test_config_validation():
    with pytest.raises(ValueError, match="n_steps=0 must be >= 1"):
        OptimConfig(n_steps=0)
    with pytest.raises(ValueError, match="schedule"):
        OptimConfig(schedule="linear")
    with pytest.raises(ValueError, match="dpo_loss_type"):
        PreferenceConfig(dpo_loss_type="kto")
    with pytest.raises(ValueError, match="iterations=0 must be >= 1"):
        DataConfig(iterations=0)
    with pytest.raises(ValueError, match="stage"):
        RunConfig(stage="3b")
    ckpt = RunConfig(model="some/dir")
    assert TrainConfig(run=ckpt, optim=OptimConfig(lora_r=64)).lr_for("1") == 5e-5
    assert TrainConfig(run=ckpt).lr_for("1") == 5e-6
    assert TrainConfig(run=ckpt).lr_for("2") == 1e-6
    tiny = RunConfig(model="tiny")           # the default model is the bundled pretrained one
    assert (TrainConfig(run=tiny).lr_for("1"), TrainConfig(run=tiny).lr_for("2")) == (2e-3, 2e-5)
    assert TrainConfig(optim=OptimConfig(orpo_lr=1e-4)).lr_for("1") == 1e-4
    # rounds of on-the-fly data: an explicit flag sets both stages; by default a preset trained from
    # scratch gets 18 ORPO rounds (it must learn the thinking format), everything else 6
    assert [TrainConfig(run=tiny).iterations_for(s) for s in "12"] == [18, 6]
    assert [TrainConfig(run=ckpt).iterations_for(s) for s in "12"] == [6, 6]
    assert [TrainConfig(data=DataConfig(iterations=3)).iterations_for(s) for s in "12"] == [3, 3]
    assert (TrainConfig(run=tiny).unclosed_policy, TrainConfig(run=ckpt).unclosed_policy) == ("keep", "drop")
    p = TrainConfig().preference
    assert (p.orpo_beta, p.dpo_beta, p.dpo_loss_type, p.label_smoothing, p.mask_mode) == \
        (0.1, 0.5, "exo_pair", 5e-3, "answer_only")


def test_flat_options_route_to_their_sections():
    c = TrainConfig.from_flat(stage="1", corpus="c.md", lora_r=8, orpo_beta=0.2, save_every=3, fsdp=True)
    assert (c.run.stage, c.data.corpus, c.optim.lora_r, c.preference.orpo_beta, c.checkpoint.save_every,
            c.parallel.fsdp) == ("1", "c.md", 8, 0.2, 3, True)
    with pytest.raises(ValueError, match="unknown training option.*lora_rank"):
        TrainConfig.from_flat(lora_rank=8)
    names = [f.name for kls in SECTIONS.values() for f in dataclasses.fields(kls)]
    assert len(names) == len(set(names))            # every field is also a unique CLI flag


def test_cli_help_comes_from_the_config_fields():
    import importlib.util
    spec = importlib.util.spec_from_file_location("train_cli", os.path.join(ROOT, "train.py"))
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    actions = {a.dest: a for a in cli.build_parser()._actions if a.dest != "help"}
    fields = {f.name: f for kls in SECTIONS.values() for f in dataclasses.fields(kls)}
    actions.pop("preset")
    assert set(actions) == set(fields)
    for name, f in fields.items():
        assert actions[name].help == f.metadata["help"] and actions[name].default == f.default, name
        assert actions[name].option_strings[0] == "--" + name.replace("_", "-")
    args = vars(cli.build_parser().parse_args(["--stage", "2", "--lora-r", "16", "--no-bf16", "--orpo-lr", "1e-4"]))
    args.pop("preset")
    c = TrainConfig.from_flat(**args)
    assert (c.run.stage, c.optim.lora_r, c.optim.bf16, c.optim.orpo_lr) == ("2", 16, False, 1e-4)


def pref_cfg(corpus, out, **kw):
    base = dict(model="tiny", corpus=corpus, out=str(out), embedder="hashing", sft_steps=4, sft_seq_len=32,
                sft_batch_size=2, tokenizer_vocab_size=320, progress=False, seed=5, iterations=2,
                pairs_per_iteration=4, n_steps=2, batch_size=2, k_samples=2, sample_max_new_tokens=12, thinking_max_new_tokens=12,
                max_length=256, max_prompt_length=96, on_unclosed="keep")
    base.update(kw)
    return TrainConfig.from_flat(**base)


def pair_scores(model_dir, tok, rows, fmt, ref_dir=None):
    """(loss, margin) of a model on preference rows, as one batch. Without ``ref_dir``: the ORPO
    objective and the mean per-token log-prob margin chosen - rejected (what stage 1 optimises);
    with it: the EXO loss against that reference and the summed log-prob margin (stage 2)."""
    examples = [ex for ex, _ in (tokenize_pair(tok, r, fmt) for r in rows) if ex is not None]
    assert len(examples) == len(rows)
    batch = collate_pairs(examples, tok.pad_token_id)
    n = batch.n_pairs
    model = Llama.from_pretrained(str(model_dir)).eval()
    with torch.no_grad():
        sums, counts = forward_logps(model, batch)
        if ref_dir is None:
            loss = orpo_objective(model, batch, beta=0.1)[0]
            means = sums / counts
            return float(loss), float((means[:n] - means[n:]).mean())
        ref, _ = forward_logps(Llama.from_pretrained(str(ref_dir)).eval(), batch)
    losses_, _, _ = dpo_loss(sums[:n], sums[n:], ref[:n], ref[n:], beta=0.5, loss_type="exo_pair",
                             label_smoothing=5e-3)
    return float(losses_.mean()), float((sums[:n] - sums[n:]).mean())


def test_stages_1_and_2_on_the_fly_learn_with_grad_accum(corpus, tmp_path):
    out = tmp_path / "run"
    # grad_accum=2 x batch_size=1: each optimizer step accumulates two micro-batches
    Trainer(pref_cfg(corpus, out, stage="all", grad_accum=2, batch_size=1)).run()
    rows = [json.loads(l) for l in open(out / "log.jsonl")]
    s1 = [r for r in rows if r.get("stage") == 1 and "loss" in r]
    s2 = [r for r in rows if r.get("stage") == 2 and "loss" in r]
    assert len(s1) == 4 and len(s2) == 4
    for r in s1:
        for k in ("loss", "nll", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                  "log_odds", "grad_norm", "lr", "tokens_per_s"):
            assert k in r and r[k] == r[k], k
    assert all("log_odds" not in r for r in s2)
    datasets = [r for r in rows if r.get("event") == "dataset"]
    assert len(datasets) == 4 and all(d["kept"] > 0 for d in datasets)
    pairs = [json.loads(l) for l in open(out / "pairs.jsonl")]
    # every row a dataset reported is in the file, once (datagen may skip a row: an empty policy sample)
    assert len(pairs) == sum(d["pairs"] for d in datasets) >= 12 and len({p["id"] for p in pairs}) == len(pairs)
    assert all(p["prompt"].endswith("Use <|thinking|>.") and p["chosen"].startswith("<|thinking|>") for p in pairs)
    for s in ("stage1", "stage2"):
        assert (out / s / "DONE").exists() and (out / s / "model.safetensors").exists()
    assert (out / "plots" / "stage1.png").exists() and (out / "plots" / "stage2.png").exists()
    # the model learned: on the pairs each stage trained on, the loss went down and the chosen answers
    # gained log-probability over the rejected ones
    tok = Tokenizer.from_pretrained(str(out / "stage2"))
    s1_rows = [p for p in pairs if p["stage"] == 1]
    s2_rows = [p for p in pairs if p["stage"] == 2]
    # provenance: iteration, the policy's optimizer step when it sampled (2 steps per iteration), settings hash
    assert sorted({(p["stage"], p["iteration"], p["policy_step"]) for p in pairs}) == \
        [(1, 0, 0), (1, 1, 2), (2, 0, 0), (2, 1, 2)]
    assert len({p["settings_hash"] for p in s1_rows}) == 1 and len(s1_rows[0]["settings_hash"]) == 10
    assert {len(s1_rows), len(s2_rows)} <= {6, 7, 8}     # 2 iterations x 4 rows, less a skipped row or two
    fmt1 = PairFormat(max_length=256, max_prompt_length=96)
    (loss0, margin0), (loss1, margin1) = (pair_scores(out / d, tok, s1_rows, fmt1) for d in ("stage0", "stage1"))
    assert loss1 < loss0 and margin1 > margin0, (loss0, loss1, margin0, margin1)
    fmt2 = PairFormat(max_length=256, max_prompt_length=96, mask_mode="answer_only", on_unclosed="keep")
    (loss1, margin1), (loss2, margin2) = (pair_scores(out / d, tok, s2_rows, fmt2, ref_dir=out / "stage1")
                                          for d in ("stage1", "stage2"))
    assert loss2 < loss1 and margin2 > margin1, (loss1, loss2, margin1, margin2)
    assert_transformers_matches(out / "stage2")


def test_stage1_resume_is_bit_identical(corpus, tmp_path):
    Trainer(pref_cfg(corpus, tmp_path / "a0", stage="0")).run()
    import shutil
    shutil.copytree(tmp_path / "a0", tmp_path / "b0")
    Trainer(pref_cfg(corpus, tmp_path / "a0", stage="1")).run()
    Trainer(pref_cfg(corpus, tmp_path / "b0", stage="1", max_steps=3, save_every=1)).run()
    assert len(losses(tmp_path / "b0", stage=1)) == 3
    # training state loads with weights_only=True: the numpy RNG state is stored as a tensor
    st = torch.load(tmp_path / "b0" / "checkpoints" / "stage1" / "trainer_state.pt", weights_only=True)
    assert isinstance(st["rng"]["numpy"]["keys"], torch.Tensor) and st["position"]["global_step"] == 3
    # without --resume, a run into a directory with this stage's pairs stops (they are off-policy now)
    from preflexor_core.train import StalePairsError
    with pytest.raises(StalePairsError, match="--resume.*another --out"):
        Trainer(pref_cfg(corpus, tmp_path / "b0", stage="1")).run()
    r = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--stage", "1", "--model", "tiny",
                        "--corpus", corpus, "--out", str(tmp_path / "b0")], capture_output=True, text=True)
    assert r.returncode == 2 and "pass --resume" in r.stderr, r.stderr[-2000:]
    # rows of iteration 1 sampled by another policy step (p1, not p2) must not be reused on resume
    pairs_path = tmp_path / "b0" / "pairs.jsonl"
    rows = [json.loads(l) for l in open(pairs_path)]
    # 2 iterations x 4 pairs; a sampled row can be skipped (and is skipped again on resume: same seed)
    assert 6 <= len(rows) <= 8 and {(p["iteration"], p["policy_step"]) for p in rows} == {(0, 0), (1, 2)}
    n_stale = sum(p["iteration"] == 1 for p in rows)
    with open(pairs_path, "a") as f:
        for p in rows:
            if p["iteration"] == 1:
                f.write(json.dumps({**p, "id": p["id"].replace("-p2-", "-p1-"), "policy_step": 1,
                                    "chosen": "stale " + p["chosen"]}) + "\n")
    Trainer(pref_cfg(corpus, tmp_path / "b0", stage="1", resume=True)).run()
    assert losses(tmp_path / "a0", stage=1) == losses(tmp_path / "b0", stage=1)
    # the interrupted iteration's rows were reused (none regenerated), the stale ones ignored
    assert [json.loads(l)["id"] for l in open(pairs_path)][:len(rows)] == [p["id"] for p in rows]
    assert sum(1 for _ in open(pairs_path)) == len(rows) + n_stale
    assert sorted(p["id"] for p in map(json.loads, open(tmp_path / "a0" / "pairs.jsonl"))) == \
        sorted(p["id"] for p in rows)


def test_lora_checkpoint_holds_adapter_rows_and_optimizer_not_the_base(corpus, tmp_path):
    Trainer(pref_cfg(corpus, tmp_path / "a", stage="0")).run()
    import shutil
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    lora = dict(stage="1", lora_r=4, lora_alpha=8, iterations=1)
    Trainer(pref_cfg(corpus, tmp_path / "a", **lora)).run()
    Trainer(pref_cfg(corpus, tmp_path / "b", max_steps=1, save_every=1, **lora)).run()
    ckpt = tmp_path / "b" / "checkpoints" / "stage1"
    assert sorted(os.listdir(ckpt)) == sorted(set(os.listdir(ckpt)) - {"model.safetensors"})
    from safetensors.torch import load_file
    sd = load_file(str(ckpt / "trainable.safetensors"))
    assert sd and all("lora_" in k or "trainable_tokens_delta" in k for k in sd)
    assert any("lora_A" in k for k in sd) and any("lora_B" in k for k in sd)
    base_bytes = os.path.getsize(tmp_path / "b" / "stage0" / "model.safetensors")
    assert os.path.getsize(ckpt / "trainable.safetensors") < base_bytes / 4
    st = torch.load(ckpt / "trainer_state.pt", weights_only=True)
    assert len(st["optimizer"]["state"]) == len(sd)       # AdamW moments of exactly the trainable tensors
    Trainer(pref_cfg(corpus, tmp_path / "b", resume=True, **lora)).run()
    assert losses(tmp_path / "a", stage=1) == losses(tmp_path / "b", stage=1)
    wa = load_file(str(tmp_path / "a" / "stage1" / "model.safetensors"))
    wb = load_file(str(tmp_path / "b" / "stage1" / "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_stage2_with_lora_reference_is_adapter_disabled(corpus, tmp_path):
    out = tmp_path / "run"
    Trainer(pref_cfg(corpus, out, stage="0")).run()
    Trainer(pref_cfg(corpus, out, stage="2", lora_r=4, lora_alpha=8, iterations=1)).run()
    assert (out / "stage2" / "adapter" / "adapter_model.safetensors").exists()
    cfg = json.loads((out / "stage2" / "adapter" / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["peft_type"] == "LORA"
    from safetensors.torch import load_file
    sd = load_file(str(out / "stage2" / "model.safetensors"))
    assert not any("lora" in k for k in sd)                      # merged for export
    first = [r for r in map(json.loads, open(out / "log.jsonl")) if r.get("stage") == 2 and "loss" in r][0]
    # step 1: policy == reference (B = 0), so the margin is exactly 0
    assert abs(first["rewards/margins"]) < 1e-6


def _torchrun_stage1(corpus, out, *flags):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(ROOT, "tests", "helpers", "ddp_stage1.py"), corpus, str(out), *flags]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built")
def test_torchrun_two_ranks_identical_weights_ddp_and_fsdp(corpus, tmp_path):
    import shutil
    out = tmp_path / "run"
    Trainer(pref_cfg(corpus, out, stage="0")).run()
    shutil.copytree(out, tmp_path / "fsdp")
    shutil.copytree(out, tmp_path / "fsdp_resumed")
    _torchrun_stage1(corpus, out)                                   # DDP
    w0, w1 = torch.load(out / "rank0.pt"), torch.load(out / "rank1.pt")
    assert w0.keys() == w1.keys() and all(torch.equal(w0[k], w1[k]) for k in w0)
    assert len(losses(out, stage=1)) == 2
    _torchrun_stage1(corpus, tmp_path / "fsdp", "fsdp")             # FSDP2: same math, sharded
    f0, f1 = torch.load(tmp_path / "fsdp" / "rank0.pt"), torch.load(tmp_path / "fsdp" / "rank1.pt")
    assert all(torch.equal(f0[k], f1[k]) for k in f0)
    assert all(torch.allclose(f0[k], w0[k], atol=1e-5) for k in w0)     # reduction order differs from DDP
    assert losses(tmp_path / "fsdp", stage=1) == pytest.approx(losses(out, stage=1), abs=1e-5)
    # FSDP2 checkpoint (full weights + per-rank optimizer shards) and exact resume
    _torchrun_stage1(corpus, tmp_path / "fsdp_resumed", "fsdp", "stop1")
    assert (tmp_path / "fsdp_resumed" / "checkpoints" / "stage1" / "optimizer-rank1.pt").exists()
    _torchrun_stage1(corpus, tmp_path / "fsdp_resumed", "fsdp", "resume")
    assert losses(tmp_path / "fsdp_resumed", stage=1) == losses(tmp_path / "fsdp", stage=1)
    r0 = torch.load(tmp_path / "fsdp_resumed" / "rank0.pt")
    assert all(torch.equal(r0[k], f0[k]) for k in f0)


# -- mixed precision, accumulation, provenance, checkpoints --------------------------------------
ROWS = [{"prompt": f"Why is nacre tough? Case {i}.",
         "chosen": "<|thinking|>Tablets slide " + "and dissipate energy " * (1 + i % 3) + f"({i}).<|/thinking|> "
                   "Nacre is tough because its aragonite tablets slide" + " past each other" * (i % 2) + ".",
         "rejected": f"<|thinking|>Unsure {i}.<|/thinking|> It is soft" + " and brittle" * (i % 4) + "."}
        for i in range(8)]


def make_run(corpus, out, stage, **kw):
    """A StageRun on a tiny model and tokenizer (no pair generation), for step-level tests."""
    import copy
    from preflexor_core.train import StageRun
    t = Trainer(pref_cfg(corpus, out, stage=stage, **kw))
    tok = t.tokenizer()
    model = t.initial_model(stage, tok)
    ref = None
    if stage == "2":
        ref = copy.deepcopy(model).eval()
        ref.requires_grad_(False)
    run = StageRun(t, stage, model, tok, ref, None)
    examples, dropped = run.tokenize(ROWS, torch.Generator().manual_seed(0))
    assert not dropped and len(examples) == len(ROWS)
    refs = run.reference_logps(examples) if stage == "2" else None
    return run, examples, refs


def micro_batches(run, examples, refs, k, b):
    """k micro-batches of b pairs over the first k*b examples."""
    return [run._pair_micro_batch(examples[a * b:(a + 1) * b],
                                  None if refs is None else (refs[0][a * b:(a + 1) * b], refs[1][a * b:(a + 1) * b]))
            for a in range(k)]


def grads_of(run, mbs):
    run.opt.zero_grad(set_to_none=True)
    m = run.accumulate(mbs)
    g = {n: p.grad.detach().clone() for n, p in run.base.named_parameters() if p.grad is not None}
    run.opt.zero_grad(set_to_none=True)
    return g, m


@pytest.mark.parametrize("stage", ["1", "2"])
def test_grad_accum_equals_one_batch_of_k_times_b(corpus, tmp_path, stage):
    # chosen/rejected lengths differ between pairs, so a per-micro-batch mean would weight tokens
    # unequally; normalising by the accumulated batch's token and pair counts gives the same gradient
    run, ex, refs = make_run(corpus, tmp_path / "r", stage, dpo_loss_type="ipo" if stage == "2" else "exo_pair")
    big, mb = grads_of(run, micro_batches(run, ex, refs, 1, 8))
    acc, ma = grads_of(run, micro_batches(run, ex, refs, 4, 2))
    assert big.keys() == acc.keys() and len(big) > 0
    for n in big:
        torch.testing.assert_close(acc[n], big[n], atol=1e-6, rtol=1e-4, msg=n)
    assert ma["loss"] == pytest.approx(mb["loss"], rel=1e-5)
    if stage == "2":
        return           # pair losses only: equal-sized micro-batches average the same; no token weighting
    # the per-micro-batch mean NLL (what accumulation computed before) is measurably different
    naive = {}
    for m in micro_batches(run, ex, refs, 4, 2):
        run.opt.zero_grad(set_to_none=True)
        loss, _ = run._loss(m, m.n_tokens, m.n_pairs)
        (loss / 4).backward()
        for n, p in run.base.named_parameters():
            if p.grad is not None:
                naive[n] = naive.get(n, 0) + p.grad.detach().clone()
    assert max(float((naive[n] - big[n]).abs().max()) for n in big) > 1e-4


@pytest.mark.parametrize("stage", ["1", "2"])
def test_bf16_autocast_steps_on_fp32_weights(corpus, tmp_path, stage):
    """fp32 master weights + bf16 autocast (the CUDA default) through whole ORPO / EXO steps on CPU."""
    run, ex, refs = make_run(corpus, tmp_path / "a", stage)
    fp32 = grads_of(run, micro_batches(run, ex, refs, 2, 2))[1]["loss"]
    run.t.autocast = True
    before = {n: p.detach().clone() for n, p in run.base.named_parameters()}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        hidden = run.model(torch.tensor([ex[0].chosen_ids]), return_hidden=True)
    assert hidden.dtype == torch.float32                 # residual stream stays in the weights' dtype
    m = run.optimizer_step(micro_batches(run, ex, refs, 2, 2))
    assert m["loss"] == m["loss"] and abs(m["loss"] - fp32) <= 0.05 * abs(fp32) + 0.02, (m["loss"], fp32)
    assert all(p.dtype == torch.float32 for p in run.base.parameters())
    changed = [n for n, p in run.base.named_parameters() if not torch.equal(p, before[n])]
    assert len(changed) == len(before)                   # every weight got a finite update
    assert all(torch.isfinite(p).all() for p in run.base.parameters())


def test_autocast_step_with_triton_kernels_in_the_interpreter(corpus, tmp_path, monkeypatch, interpreter_bf16_dot_ok):
    # tiny model, 2 pairs, an EXO step: Triton attention (model._attend) and log-probs in Triton's
    # interpreter under autocast; bf16 where the interpreter's bf16 dot works, else fp16 (same code
    # path: half q, k, v from the linears, fp32 cos/sin and residual stream)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    half = torch.bfloat16 if interpreter_bf16_dot_ok else torch.float16
    monkeypatch.setenv("PREFLEXOR_KERNELS", "reference")
    run, ex, refs = make_run(corpus, tmp_path / "a", "2")
    ex = ex[:2]
    ref_loss = grads_of(run, micro_batches(run, ex, (refs[0][:2], refs[1][:2]), 1, 2))[1]["loss"]
    monkeypatch.setenv("PREFLEXOR_KERNELS", "triton")
    from preflexor_core import kernels
    calls = []
    orig = kernels.flash_attention
    monkeypatch.setattr(kernels, "flash_attention", lambda *a, **k: calls.append(a[0].dtype) or orig(*a, **k))
    run.t.autocast, run.t.autocast_dtype = True, half
    g, m = grads_of(run, micro_batches(run, ex, (refs[0][:2], refs[1][:2]), 1, 2))
    assert calls and set(calls) == {half}                # the kernel ran, on consistent half q, k, v
    assert abs(m["loss"] - ref_loss) <= 0.05 * abs(ref_loss) + 0.02
    assert g and all(torch.isfinite(v).all() for v in g.values())


def test_datagen_seeds_and_pair_ids_never_collide():
    from preflexor_core.train.provenance import datagen_seed, pair_id_prefix
    seeds = {datagen_seed(s, st, it) for s in (0, 1, 5) for st in "12" for it in range(300)}
    assert len(seeds) == 3 * 2 * 300                     # iteration 100 of stage 1 != iteration 0 of stage 2
    assert datagen_seed(5, "1", 100) != datagen_seed(5, "2", 0)
    ids = {pair_id_prefix({"stage": st, "iteration": it, "policy_step": p, "settings_hash": "abc"})
           for st in (1, 2) for it in range(20) for p in (0, 1, 10)}
    assert len(ids) == 2 * 20 * 3
    with pytest.raises(ValueError, match="iteration"):
        datagen_seed(5, "1", -1)


def _torchrun_accum(corpus, out, k, b, *flags):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(ROOT, "tests", "helpers", "ddp_accum.py"), corpus, str(out), str(k), str(b), *flags]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return torch.load(os.path.join(out, "accum.pt"))


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built")
def test_torchrun_grad_accum_equals_one_batch_and_syncs_once(corpus, tmp_path):
    # 2 ranks x 2 micro-batches x 2 pairs == 2 ranks x 1 x 4 == one process with the 8 pairs
    run, ex, _ = make_run(corpus, tmp_path / "single", "1")
    single, _ = grads_of(run, micro_batches(run, ex, None, 1, 8))
    acc = _torchrun_accum(corpus, tmp_path / "acc", 2, 2)
    one = _torchrun_accum(corpus, tmp_path / "one", 1, 4)
    for n in single:
        torch.testing.assert_close(acc["grads"][n], single[n], atol=1e-6, rtol=1e-4, msg=n)
        torch.testing.assert_close(one["grads"][n], single[n], atol=1e-6, rtol=1e-4, msg=n)
    # DDP all-reduces only in the last micro-batch's backward: as many buckets as a single backward
    assert len(one["syncs"]) > 0 and len(acc["syncs"]) == len(one["syncs"])
    fsdp = _torchrun_accum(corpus, tmp_path / "fsdp", 2, 2, "fsdp")
    assert fsdp["syncs"] == [False, True]                # FSDP2: sync off for micro-batch 1, back on for 2
    for n in single:
        torch.testing.assert_close(fsdp["grads"][n], single[n], atol=1e-6, rtol=1e-4, msg=n)


def _load_smoke():
    import importlib.util
    spec = importlib.util.spec_from_file_location("smoke_train", os.path.join(ROOT, "tests", "gpu", "smoke_train.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_smoke_train_mfu_arithmetic():
    s = _load_smoke()
    # 3.2e9 params, 28 layers, hidden 3072, 512 tokens: 6N + 12 L H T
    fpt = s.train_flops_per_token(3_212_749_824, 28, 3072, 512)
    assert fpt == 6 * 3_212_749_824 + 12 * 28 * 3072 * 512
    assert s.peak_flops("NVIDIA H200") == 989e12 and s.peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert s.peak_flops("some card") is None and s.mfu(1000.0, fpt, None) is None
    assert s.mfu(10_000.0, fpt, 989e12) == pytest.approx(10_000 * fpt / 989e12)
    rows = s._pairs(64, 3, 4, 12, (62, 63), 0)
    assert [len(r.chosen_ids) for r in rows] == [16, 15, 14] and rows[0].chosen_labels[:4] == [-100] * 4
    assert rows[0].chosen_ids[4] == 62 and rows[0].chosen_ids[-1] == 63


def test_smoke_train_skips_without_cuda_and_never_imports_hnswlib_or_gguf(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: the smoke test would run instead of skipping")
    block = ("import sys, runpy\n"
             "class Block:\n"
             "    def find_spec(self, name, path=None, target=None):\n"
             "        if name.split('.')[0] in ('hnswlib', 'gguf'):\n"
             "            raise ImportError(f'{name} is blocked')\n"
             "sys.meta_path.insert(0, Block())\n"
             f"sys.argv = ['smoke_train.py', '--out', {str(tmp_path)!r}]\n"
             f"runpy.run_path({os.path.join(ROOT, 'tests', 'gpu', 'smoke_train.py')!r}, run_name='__main__')\n")
    r = subprocess.run([sys.executable, "-c", block], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    rec = json.loads((tmp_path / "train_smoke.json").read_text())
    assert rec["status"] == "skipped" and "CUDA" in rec["reason"]
    # the module imports of the CUDA path (model, LoRA, data, objectives) work with both blocked
    imp = block.replace("runpy.run_path", "print").replace(", run_name='__main__')", ")") + \
        "from preflexor_core.train import dpo_objective, orpo_objective\nfrom preflexor_core.llm.lora import apply_lora\n" \
        "from preflexor_core.train.batches import collate_pairs\nprint('imports ok')\n"
    r = subprocess.run([sys.executable, "-c", imp], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0 and "imports ok" in r.stdout, r.stderr[-2000:]


def test_gpu_check_summary_carries_the_train_smoke_record(tmp_path):
    rec = {"status": "ok", "steps": {"orpo": {"tokens_per_s": 1234.5, "peak_memory_gib": 20.1, "mfu": 0.31}}}
    (tmp_path / "train_smoke.json").write_text(json.dumps(rec))
    cmd = [sys.executable, os.path.join(ROOT, "tests", "gpu", "summarize.py"), "--out", str(tmp_path / "o"),
           "--no-env", "--train-smoke", str(tmp_path / "train_smoke.json")]
    subprocess.run(cmd, capture_output=True, text=True)
    out = json.loads((tmp_path / "o" / "gpu_check.json").read_text())
    assert out["train_smoke"] == rec
    (tmp_path / "train_smoke.json").write_text(json.dumps({"status": "failed", "error": "boom"}))
    r = subprocess.run(cmd, capture_output=True, text=True)
    out = json.loads((tmp_path / "o" / "gpu_check.json").read_text())
    assert out["train_smoke"]["status"] == "failed" and out["ok"] is False and r.returncode == 1


@pytest.mark.parametrize("env,bf16,want", [("1", True, True), ("0", True, False), ("1", False, False)])
def test_cpu_autocast_follows_native_bf16_and_the_flag(corpus, tmp_path, monkeypatch, env, bf16, want):
    """On CPU, --bf16 (the default) autocasts only where the CPU multiplies bf16 natively
    (PREFLEXOR_CPU_BF16 overrides the detection); --no-bf16 always keeps fp32."""
    monkeypatch.setenv("PREFLEXOR_CPU_BF16", env)
    t = Trainer(pref_cfg(corpus, tmp_path / "run", stage="1", bf16=bf16))
    assert t.autocast is want and t.autocast_dtype == torch.bfloat16
