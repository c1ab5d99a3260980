"""Stage 3 (train/grpo_stage.py): a short GRPO run end to end, one update that raises the advantage-weighted
log-probs, the advantage and
dynamic-sampling wiring on fixed rewards, bit-identical resume, the config flags.

Run: ``python -m pytest -q tests/test_grpo_stage.py``.
"""
import json

import pytest
import torch

from preflexor_core.rewards import GraphRewards, Reward, RewardWeights
from preflexor_core.train import TrainConfig, Trainer
from preflexor_core.train.grpo_stage import parse_reward_weights

CORPUS = """# Materials

Spider silk is a protein fibre whose beta-sheet nanocrystals give it strength while amorphous regions give it extensibility.

Nacre is a brick-and-mortar composite of aragonite tablets and a thin organic matrix. Tablet sliding dissipates energy in nacre.

Bone is a hierarchical composite of collagen fibrils and hydroxyapatite mineral. Bone toughness comes from fibril sliding and crack deflection.

Wood cell walls contain cellulose microfibrils wound at an angle. A small microfibril angle gives a stiff wood.
"""


def cfg(tmp_path, out="run", **kw):
    p = tmp_path / "corpus.md"
    p.write_text(CORPUS * 3)
    base = dict(stage="grpo", model="tiny", corpus=str(p), out=str(tmp_path / out), tokenizer_vocab_size=320,
                progress=False, seed=3, embedder="hashing", grpo_prompts=2, num_generations=4, grpo_micro_batch=8,
                warmup_steps=0, grpo_lr=1e-3)
    base.update(kw)
    return TrainConfig.from_flat(**base)


def log_rows(tmp_path, out="run"):
    return [json.loads(x) for x in (tmp_path / out / "log.jsonl").read_text().splitlines()]


def test_tiny_grpo_run_logs_rewards_and_finishes(tmp_path):
    """A short stage-3 run end to end: warm-up, generation, rewards, updates, the log, the plot, DONE.
    (Whether the update moves the policy toward higher reward is tested on one step below, where the
    outcome does not depend on a long run's numerics.)"""
    Trainer(cfg(tmp_path, grpo_sft_steps=6, grpo_steps=3, grpo_max_new_tokens=32,
                reward_weights="format=1,graph_validity=0,groundedness=0,graph_utility=0,correctness=0")).run()
    rows = [r for r in log_rows(tmp_path) if r.get("stage") == 3]
    fmt = [r["reward/format"] for r in rows if "reward/format" in r]
    assert len(fmt) == 3 and all(0.0 <= v <= 1.0 for v in fmt)
    assert (tmp_path / "run" / "stage3" / "DONE").exists()
    assert (tmp_path / "run" / "plots" / "stage3.png").exists()


def test_one_grpo_update_raises_the_advantage_weighted_logps(tmp_path, monkeypatch):
    """The policy-gradient property of one real update: after it, the completions with positive advantage
    gained log-probability relative to those with negative advantage (sum_i A_i * log p(y_i) rises)."""
    from preflexor_core.train.grpo_stage import GRPOStage
    monkeypatch.setattr(GraphRewards, "score_many", _fixed_rewards([0.0, 1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 0.0]))
    seen = {}
    real = GRPOStage.update

    def update(self, batch, adv, old, ref):
        with torch.no_grad():
            self.model.eval()
            seen["before"] = self.batch_logps(batch, self.model).sum(-1)
        out = real(self, batch, adv, old, ref)
        with torch.no_grad():
            self.model.eval()
            seen["after"] = self.batch_logps(batch, self.model).sum(-1)
        seen["adv"] = adv.float().cpu().reshape(-1)
        return out
    monkeypatch.setattr(GRPOStage, "update", update)
    Trainer(cfg(tmp_path, grpo_steps=1, grpo_max_new_tokens=16, grpo_lr=1e-4)).run()
    adv = seen["adv"]
    assert adv.numel() == 8 and (adv > 0).sum() == 4 and (adv < 0).sum() == 4
    gain = (adv * (seen["after"] - seen["before"])).sum()
    assert gain > 0, (adv, seen["before"], seen["after"])


def _fixed_rewards(values):
    def score_many(self, completions, references=None, questions=None):
        return [Reward(v, {"format": v}) for v in values[:len(completions)]]
    return score_many


def test_zero_spread_groups_are_dropped_and_advantages_reach_the_loss(tmp_path, monkeypatch):
    # group 0 all equal (dropped), group 1 spread: one update over its 4 rows
    monkeypatch.setattr(GraphRewards, "score_many", _fixed_rewards([0.5, 0.5, 0.5, 0.5, 0.0, 1.0, 0.0, 1.0]))
    Trainer(cfg(tmp_path, grpo_steps=1, grpo_max_new_tokens=8)).run()
    upd = [r for r in log_rows(tmp_path) if r.get("stage") == 3 and "loss" in r]
    assert len(upd) == 1 and upd[0]["groups_kept"] == 0.5 and upd[0]["rows"] == 4
    assert upd[0]["grad_norm"] > 0
    assert upd[0]["reward"] == pytest.approx(0.5)


def test_all_equal_rewards_skip_the_update(tmp_path, monkeypatch):
    monkeypatch.setattr(GraphRewards, "score_many", _fixed_rewards([0.3] * 8))
    Trainer(cfg(tmp_path, grpo_steps=2, grpo_max_new_tokens=8)).run()
    rows = [r for r in log_rows(tmp_path) if r.get("stage") == 3]
    assert [r.get("event") for r in rows] == ["skipped_generation"] * 2
    assert not any("loss" in r for r in rows)


def _text_rewards(self, completions, references=None, questions=None):
    """Deterministic rewards with spread (a random tiny model scores 0 on every real reward)."""
    return [Reward((sum(map(ord, c)) % 11) / 10, {"format": 0.0}) for c in completions]


def test_resume_is_bit_identical(tmp_path, monkeypatch):
    monkeypatch.setattr(GraphRewards, "score_many", _text_rewards)
    kw = dict(grpo_sft_steps=2, grpo_steps=2, grpo_max_new_tokens=12, grpo_updates=2, loss_type="dapo",
              epsilon_high=0.28, beta=0.05)
    Trainer(cfg(tmp_path, "a", **kw)).run()
    Trainer(cfg(tmp_path, "b", max_steps=2, **kw)).run()
    assert not (tmp_path / "b" / "stage3" / "DONE").exists()
    Trainer(cfg(tmp_path, "b", resume=True, **kw)).run()
    la = [r["loss"] for r in log_rows(tmp_path, "a") if "loss" in r]
    lb = [r["loss"] for r in log_rows(tmp_path, "b") if "loss" in r]
    assert len(la) == 4 and la == lb
    from safetensors.torch import load_file
    wa = load_file(str(tmp_path / "a" / "stage3" / "model.safetensors"))
    wb = load_file(str(tmp_path / "b" / "stage3" / "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_decode_weights_int8_reaches_the_group_sampler_and_the_pairs_hash(tmp_path, monkeypatch):
    import preflexor_core.sampler as sampler
    import preflexor_core.train.grpo_stage as grpo_stage
    from preflexor_core.sampler import SamplingParams
    from preflexor_core.train.provenance import settings_hash
    seen = []
    real = sampler.generate
    monkeypatch.setattr(grpo_stage, "generate", lambda *a, **k: seen.append(k.get("decode_weights")) or real(*a, **k))
    Trainer(cfg(tmp_path, grpo_sft_steps=1, grpo_steps=1, grpo_max_new_tokens=8, decode_weights="int8")).run()
    assert seen == ["int8"]                     # the one generation batch of the one GRPO step
    sp = SamplingParams(max_new_tokens=8)
    fp, q8 = TrainConfig.from_flat(model="tiny"), TrainConfig.from_flat(model="tiny", decode_weights="int8")
    assert settings_hash(fp, sp, "1") == settings_hash(TrainConfig.from_flat(model="tiny", decode_weights="fp"), sp, "1")
    assert settings_hash(q8, sp, "1") != settings_hash(fp, sp, "1")
    with pytest.raises(ValueError, match="decode_weights"):
        TrainConfig.from_flat(decode_weights="int4")


def test_config_flags():
    c = TrainConfig.from_flat(stage="grpo", model="tiny", loss_type="dr_grpo", scale_rewards="none")
    assert c.run.stage == "3" and c.grpo.loss_type == "dr_grpo" and c.lr_for("3") == 1e-4
    assert TrainConfig.from_flat(stage="3", model="smollm2-135m-instruct").lr_for("3") == 1e-6
    with pytest.raises(ValueError, match="loss_type"):
        TrainConfig.from_flat(loss_type="ppo")
    with pytest.raises(ValueError, match="num_generations"):
        TrainConfig.from_flat(num_generations=1)
    assert parse_reward_weights("format=2, correctness=0") == RewardWeights(format=2.0, correctness=0.0)
    with pytest.raises(ValueError, match="unknown reward"):
        parse_reward_weights("style=1")
    with pytest.raises(ValueError, match="name=number"):
        parse_reward_weights("format")


def test_graph_eval_metrics_graphml_and_png(tmp_path):
    import networkx as nx
    from preflexor_core import Llama, ModelConfig, Tokenizer
    from preflexor_core.evaluation.graph_eval import draw_graph, evaluate_graph, format_graph_table, graph_metrics
    from preflexor_core.thinking.graph_io import export_graphml
    from preflexor_core.thinking.graph import format_graph_thinking
    from preflexor_core.thinking.layout import join_chosen
    from preflexor_core.retrieval import GraphRetriever
    from preflexor_core.retrieval.embedding import HashingEmbedder
    from preflexor_core.llm.vocab import add_thinking_tokens
    r = GraphRetriever.build([CORPUS * 3], embedder=HashingEmbedder())
    good = join_chosen(format_graph_thinking("b", [("bone", "composite of", "collagen fibril")], "p", "s"),
                       "Bone is a composite.")
    bad = good.replace('"target": "collagen fibril"}', '"target": "collagen fibril"')      # broken JSON
    m, scored = graph_metrics([good, bad], ["Bone is a composite."] * 2, GraphRewards(corpus=r))
    assert m["graph_validity_rate"] == 0.5 and scored[0].components["graph_validity"] == 1.0
    assert 0 < m["reward"] < 1 and m["format"] == 1.0
    g = nx.read_graphml(export_graphml(good, str(tmp_path / "g.graphml")))
    assert set(g.nodes) == {"bone", "collagen fibril"} and g.edges["bone", "collagen fibril"]["relation"] == "composite of"
    assert (tmp_path / "g.png").exists() is False and draw_graph(good, str(tmp_path / "g.png")).endswith(".png")
    assert (tmp_path / "g.png").stat().st_size > 1000
    tok = Tokenizer.train_bpe([CORPUS], vocab_size=320)
    add_thinking_tokens(tok)
    torch.manual_seed(0)
    model = Llama(ModelConfig.preset("tiny").replace(vocab_size=tok.vocab_size))
    qs = [{"id": "q1", "question": "What is bone?", "reference": "Bone is a hierarchical composite."}]
    res = evaluate_graph({"random": (model, tok)}, qs, r, max_new_tokens=8, out_dir=str(tmp_path / "ev"), graphml=True)
    assert res[0]["metrics"]["graph_validity_rate"] == 0.0 and len(res[0]["rows"]) == 1
    assert (tmp_path / "ev" / "random" / "q1.graphml").exists()
    assert "| random |" in format_graph_table(res)


def test_warmup_rows_end_the_turn_only_when_the_chosen_fits(tmp_path):
    """The graph-format warm-up trains on prompt + chosen + end of turn; a chosen cut at --max-length
    keeps no end-of-turn token, so the warm-up never teaches stopping inside the thinking."""
    from preflexor_core.kernels import IGNORE_INDEX
    from preflexor_core.train.grpo_stage import GRPOPrompt, GRPOStage
    t = Trainer(cfg(tmp_path, max_length=200, max_prompt_length=160))
    tok = t.tokenizer()
    stage = GRPOStage(t, "3", t.initial_model("3", tok), tok, None, None)
    short = GRPOPrompt("What is nacre?", "Nacre is a composite.", "<|thinking|>\nshort\n<|/thinking|>\nNacre.")
    long = GRPOPrompt("What is nacre?", "Nacre is a composite.", "<|thinking|>\n" + "nacre tablets slide " * 200)
    (ids_s, lab_s), (ids_l, lab_l) = stage.sft_rows([short, long])
    assert len(ids_l) == 200 and len(ids_s) < 200
    assert ids_s[-1] == lab_s[-1] == stage.end_id                         # fits: the turn ends
    assert stage.end_id not in lab_l[-4:] and ids_l[-1] != stage.end_id   # cut: no end of turn
    n_prompt = next(i for i, x in enumerate(lab_s) if x != IGNORE_INDEX)
    assert lab_s[n_prompt:] == ids_s[n_prompt:] and all(x == IGNORE_INDEX for x in lab_s[:n_prompt])
