"""Tests for preflexor_core/evaluation/: answer metrics, format compliance, reward accuracy,
reports and plots, the CLI.

Metric values are worked out by hand in the comments. The end-to-end tests use a tiny random
Llama (it writes gibberish, so they check structure, ranges and exact properties such as "a model
scored against itself has reward accuracy 0", not answer quality).
Run: ``python -m pytest -q tests/test_evaluation.py``.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from preflexor_core import Llama, ModelConfig, Tokenizer
from preflexor_core.evaluation import (DEFAULT_QUESTIONS, EvalConfig, EvaluationInputError, evaluate,
                                       evaluate_stages, load_pairs, load_questions, main)
from preflexor_core.text.metrics import lcs_length, normalize_answer
from preflexor_core.train.plots import plot_training_log
from preflexor_core.thinking.check import check_format
from preflexor_core.text.metrics import rouge_l, token_f1
from preflexor_core.thinking.layout import DEFAULT_CATEGORIES
from preflexor_core.thinking.tokens import THINK_END, THINK_START

ROOT = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ============================================================================ answer metrics

def test_normalize_answer_follows_squad():
    # lowercase, punctuation deleted (not replaced), articles removed, whitespace collapsed
    assert normalize_answer("The  Beta-Sheet, a crystal!") == "betasheet crystal"
    assert normalize_answer("silk \u2013 strong") == "silk strong"        # Unicode en dash is punctuation
    assert normalize_answer("theme another") == "theme another"          # articles only as whole words


def test_token_f1_hand_examples():
    assert token_f1("The cat sat.", "the cat sat") == 1.0                # identical after normalisation
    assert token_f1("dog", "cat") == 0.0                                 # disjoint
    assert token_f1("", "") == 1.0                                       # both empty: SQuAD gives 1
    assert token_f1("", "cat") == 0.0 and token_f1("cat", "") == 0.0     # one empty: 0
    assert token_f1("a the", "") == 1.0                                  # only articles -> empty
    # pred [quick, brown, fox], gold [quick, red, fox, jumps]: overlap 2, P = 2/3, R = 1/2, F1 = 4/7
    assert token_f1("the quick brown fox", "a quick red fox jumps") == pytest.approx(4 / 7)
    # bag overlap: min(3, 1) = 1 shared, P = 1/3, R = 1, F1 = 2 * (1/3) / (4/3) = 1/2
    assert token_f1("fox fox fox", "fox") == pytest.approx(0.5)
    # several references: the best one counts
    assert token_f1("cat", ["dog", "cat"]) == 1.0


def test_rouge_l_hand_examples():
    assert lcs_length("one two three four five".split(), "one three five six".split()) == 3
    assert lcs_length([], ["x"]) == 0
    assert lcs_length(list("ABCBDAB"), list("BDCABA")) == 4              # CLRS textbook example: BCBA
    # LCS = one three five (3); P = 3/5, R = 3/4, F = 2PR/(P+R) = (9/10)/(27/20) = 2/3
    assert rouge_l("one two three four five", "one three five six") == pytest.approx(2 / 3)
    # same bag, reversed order: LCS 1 -> P = R = 1/4 -> F = 1/4, whereas token F1 is 1
    assert rouge_l("four three two one", "one two three four") == pytest.approx(0.25)
    assert token_f1("four three two one", "one two three four") == 1.0
    assert rouge_l("The cat sat.", "the cat sat") == 1.0
    assert rouge_l("dog", "cat") == 0.0
    assert rouge_l("", "") == 1.0
    assert rouge_l("", "cat") == 0.0 and rouge_l("cat", "") == 0.0
    assert rouge_l("zero", ["one two", "zero one"]) == pytest.approx(2 / 3)   # max: P = 1, R = 1/2


# ============================================================================ format compliance

GOOD = (f"{THINK_START}\n**Reasoning Steps**:\n\n- silk has crystals\n\n"
        f"**Relevant Materials or Concepts**:\n\n- beta-sheets\n\n{THINK_END}\nSilk is tough because of crystals.")


def test_format_compliant_output():
    fc = check_format(GOOD)
    assert fc.compliant and fc.reason == "ok"
    assert fc.headers == ["Reasoning Steps", "Relevant Materials or Concepts"]
    assert fc.header_share == pytest.approx(2 / len(DEFAULT_CATEGORIES))
    assert fc.answer == "Silk is tough because of crystals."
    # leading whitespace, a lowercase header with extra spaces and a reflection block are all fine
    fc = check_format(f"\n {THINK_START}\n  ** reasoning steps ** :\nx\n<|reflect|>hm<|/reflect|>\n{THINK_END} yes")
    assert fc.compliant and fc.headers == ["Reasoning Steps"]


def test_format_failures():
    cases = {
        "no closing tag": f"{THINK_START}\n**Reasoning Steps**:\nx\nSilk is tough.",
        "two blocks": GOOD + f"\n{THINK_START}\n**Hypothesis**:\ny\n{THINK_END}\nmore",
        "empty answer": GOOD.split(THINK_END)[0] + THINK_END + "\n  <|eot_id|> ",
        "missing headers": f"{THINK_START}\nsilk has crystals\n{THINK_END}\nSilk is tough.",
        "unknown header": f"{THINK_START}\n**Musings**:\nsilk\n{THINK_END}\nSilk is tough.",
        "header not at line start": f"{THINK_START}\nsee **Reasoning Steps**: x\n{THINK_END}\nSilk is tough.",
        "header outside the block": f"{THINK_START}\nx\n{THINK_END}\n**Reasoning Steps**:\nSilk.",
        "text before the block": "Sure! " + GOOD,
        "no thinking at all": "Silk is tough.",
        "close before open": f"{THINK_END}\n**Reasoning Steps**:\n{THINK_START} Silk.",
    }
    for name, text in cases.items():
        fc = check_format(text)
        assert not fc.compliant, name
        assert fc.reason != "ok", name
    assert check_format(cases["no closing tag"]).reason == "thinking never closed"
    assert check_format(cases["two blocks"]).reason == "2 <|thinking|> tags"
    assert check_format(cases["empty answer"]).reason == "empty answer"
    assert check_format(cases["missing headers"]).header_share == 0.0
    assert check_format(cases["no thinking at all"]).header_share == 0.0
    # an unclosed block still counts its headers for the header share
    assert check_format(cases["no closing tag"]).header_share == pytest.approx(1 / len(DEFAULT_CATEGORIES))


def test_min_headers_and_categories():
    assert not check_format(GOOD, min_headers=3).compliant        # has 2 of 6
    assert check_format(GOOD, min_headers=2).compliant
    all_six = THINK_START + "".join(f"\n**{c}**:\nx\n" for c in DEFAULT_CATEGORIES) + THINK_END + "ans"
    fc = check_format(all_six, min_headers=len(DEFAULT_CATEGORIES))
    assert fc.compliant and fc.header_share == 1.0
    fc = check_format(f"{THINK_START}\n**Musings**:\nx\n{THINK_END}a", categories=["Musings"])
    assert fc.compliant and fc.header_share == 1.0
    with pytest.raises(ValueError, match="min_headers"):
        check_format(GOOD, min_headers=7)


# ============================================================================ tiny model fixtures

CORPUS = [
    "Nacre is a brick-and-mortar composite of aragonite platelets bonded by a thin protein layer.",
    "Spider silk combines crystalline beta-sheet regions with amorphous protein chains.",
    "Bone is a hierarchical composite of collagen fibrils and hydroxyapatite mineral crystals.",
    "**Reasoning Steps**: **Relevant Materials or Concepts**: Use thinking.",
]
QUESTIONS = [
    {"id": "a", "question": "Why is nacre tough?", "reference": "Platelets slide and dissipate energy."},
    {"id": "b", "question": "What gives silk strength?", "reference": "Beta-sheet crystals."},
    {"id": "c", "question": "What is bone made of?", "reference": ["Collagen and hydroxyapatite.", "collagen"]},
]
PAIRS = [
    {"id": str(i), "prompt": q["question"] + " Use <|thinking|>.",
     "chosen": f"{THINK_START}\n**Reasoning Steps**:\n\nthink\n\n{THINK_END}\n" + CORPUS[i],
     "rejected": f"{THINK_START}\n**Reasoning Steps**:\n\nthink\n\n{THINK_END}\nI do not know."}
    for i, q in enumerate(QUESTIONS)]


def _save_model(tok, path: Path, seed: int) -> str:
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512)
    Llama(cfg).save_pretrained(str(path))
    tok.save_pretrained(str(path))
    return str(path)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run dir with stage0/ and stage1/ (two different random models), questions, pairs and a log."""
    root = tmp_path_factory.mktemp("evalrun")
    tok = Tokenizer.train_bpe(CORPUS * 3 + [q["question"] for q in QUESTIONS] * 3, vocab_size=400)
    _save_model(tok, root / "stage0", seed=0)
    _save_model(tok, root / "stage1", seed=1)
    (root / "questions.jsonl").write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    (root / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in PAIRS))
    _write_log(root / "log.jsonl")
    return root


def _write_log(path: Path) -> None:
    rows = [{"stage": 0, "global_step": s, "loss": 5.0 - s, "nll": 5.0 - s, "time": 0.0} for s in range(1, 4)]
    rows.append({"stage": 1, "iteration": 0, "event": "dataset", "pairs": 4, "kept": 4, "dropped": {}})
    for s in range(1, 5):
        rows.append({"stage": 1, "iteration": (s - 1) // 2, "global_step": s, "loss": 2.0 / s, "nll": 1.5 / s,
                     "rewards/accuracies": 0.25 * s, "rewards/margins": 0.1 * s, "rewards/chosen": 0.0})
    text = "".join(json.dumps(r) + "\n" for r in rows) + '{"stage": 1, "global_st'   # interrupted last line
    path.write_text(text)


# ============================================================================ end to end

def test_evaluate_end_to_end(run_dir):
    m0 = str(run_dir / "stage0")
    res = evaluate(m0, str(run_dir / "questions.jsonl"), EvalConfig(max_new_tokens=12, progress=False),
                   ref_model_dir=m0, pairs=str(run_dir / "pairs.jsonl"))
    m = res["metrics"]
    assert set(m) == {"format_compliance", "header_share", "thinking_closed", "answer_nonempty", "answer_f1",
                      "answer_rouge_l", "reward_accuracy", "truncated"}
    assert all(0.0 <= v <= 1.0 for v in m.values()), m
    assert res["n_questions"] == 3 and len(res["outputs"]) == 3
    # the model against itself: every pair is a tie, and ties count as not correct
    assert res["n_pairs"] == 3 and m["reward_accuracy"] == 0.0 and res["reward_margin"] == 0.0
    # per-question scores are the module's own metrics applied to the extracted answer
    for row, q in zip(res["outputs"], QUESTIONS):
        assert row["f1"] == token_f1(row["answer"], q["reference"])
        assert row["compliant"] == check_format(row["output"]).compliant
        assert 1 <= row["new_tokens"] <= 12
    assert m["answer_f1"] == pytest.approx(sum(r["f1"] for r in res["outputs"]) / 3)


def test_evaluate_force_thinking_and_batching(run_dir):
    m0 = str(run_dir / "stage0")
    a = evaluate(m0, QUESTIONS, EvalConfig(max_new_tokens=6, force_thinking=True, batch_size=3, progress=False))
    assert all(r["output"].startswith(THINK_START) for r in a["outputs"])
    assert a["metrics"]["header_share"] <= 1.0 and "reward_accuracy" not in a["metrics"]
    # greedy decoding: the same outputs whatever the batch size
    b = evaluate(m0, QUESTIONS, EvalConfig(max_new_tokens=6, force_thinking=True, batch_size=1, progress=False))
    assert [r["output"] for r in a["outputs"]] == [r["output"] for r in b["outputs"]]


def test_reward_accuracy_is_antisymmetric(run_dir):
    """Swapping model and reference negates every reward difference: without ties acc(A|B) + acc(B|A) = 1."""
    m0, m1 = str(run_dir / "stage0"), str(run_dir / "stage1")
    cfg = EvalConfig(max_new_tokens=2, progress=False, limit=1)
    ab = evaluate(m1, QUESTIONS, cfg, ref_model_dir=m0, pairs=PAIRS)
    ba = evaluate(m0, QUESTIONS, cfg, ref_model_dir=m1, pairs=PAIRS)
    assert ab["n_pairs"] == ba["n_pairs"] == 3
    assert ab["metrics"]["reward_accuracy"] + ba["metrics"]["reward_accuracy"] == pytest.approx(1.0)
    assert ab["reward_margin"] == pytest.approx(-ba["reward_margin"], abs=1e-4)



def test_reward_accuracy_scores_packed_like_padded_rows_and_caches_each_model_once(run_dir, monkeypatch):
    """The packed, prompt-shared scoring gives the padded rows' sums; with a cache, the middle model of a
    chain (policy of one comparison, reference of the next) runs once per batch."""
    from preflexor_core.evaluation import runner
    from preflexor_core.losses.preference import forward_logps
    from preflexor_core.train.batches import PairFormat, collate_pairs, tokenize_pair
    from preflexor_core.llm.registry import load_model_and_tokenizer
    (m0, tok), (m1, _) = [load_model_and_tokenizer(str(run_dir / d), "cpu", "float32") for d in ("stage0", "stage1")]
    m0.eval(), m1.eval()
    fmt = PairFormat(max_length=1024, max_prompt_length=512, mask_mode="answer_only", on_unclosed="keep")
    examples = [tokenize_pair(tok, row, fmt, index=i)[0] for i, row in enumerate(PAIRS)]
    with torch.inference_mode():
        padded = [forward_logps(m, collate_pairs(examples, tok.pad_token_id or 0))[0] for m in (m0, m1)]
    h = 0.5 * ((padded[1][:3] - padded[0][:3]) - (padded[1][3:] - padded[0][3:]))
    calls = []
    real = runner.forward_logps
    monkeypatch.setattr(runner, "forward_logps", lambda m, b: calls.append(m) or real(m, b))
    cache: dict = {}
    got = runner.reward_accuracy(m1, m0, tok, PAIRS, beta=0.5, batch_size=3, cache=cache, keys=("m1", "m0"))
    assert got["n_pairs"] == 3 and len(calls) == 2
    assert got["reward_margin"] == pytest.approx(h.mean().item(), abs=1e-4)
    assert got["reward_accuracy"] == pytest.approx((h > 0).float().mean().item())
    again = runner.reward_accuracy(m0, m1, tok, PAIRS, beta=0.5, batch_size=3, cache=cache, keys=("m0", "m1"))
    assert len(calls) == 2                                       # both models' sums came from the cache
    assert again["reward_margin"] == pytest.approx(-got["reward_margin"], abs=1e-6)
    runner.reward_accuracy(m0, m1, tok, PAIRS, beta=0.5, batch_size=2, cache=cache, keys=("m0", "m1"))
    assert len(calls) == 6                                       # other batches: scored afresh (2 batches x 2)


def test_evaluate_stages_writes_report(run_dir, tmp_path):
    out = tmp_path / "report"
    results = evaluate_stages(str(run_dir), str(run_dir / "questions.jsonl"),
                              EvalConfig(max_new_tokens=4, progress=False), pairs=str(run_dir / "pairs.jsonl"),
                              out_dir=str(out))
    assert [r["name"] for r in results] == ["stage0", "stage1"]
    assert "reward_accuracy" not in results[0]["metrics"]            # stage 0 has no stage before it
    assert results[1]["ref_model"] == str(run_dir / "stage0")
    assert 0.0 <= results[1]["metrics"]["reward_accuracy"] <= 1.0
    for name in ("report.md", "metrics.png", "metrics.json", "outputs.jsonl", "stage0.png", "stage1.png",
                 "training.png"):
        assert (out / name).is_file(), name
    assert (out / "metrics.png").read_bytes()[:8] == PNG_MAGIC
    report = (out / "report.md").read_text()
    assert "| stage0 |" in report and "| stage1 |" in report
    assert "![metrics](metrics.png)" in report and "(training.png)" in report
    saved = json.loads((out / "metrics.json").read_text())
    assert [r["name"] for r in saved["models"]] == ["stage0", "stage1"] and "outputs" not in saved["models"][0]
    assert saved["base"] is None and saved["architecture"]["num_hidden_layers"] >= 1
    assert len((out / "outputs.jsonl").read_text().splitlines()) == 6


# ============================================================================ training plots

def test_plot_training_log(tmp_path):
    log_path = tmp_path / "log.jsonl"
    _write_log(log_path)
    paths = plot_training_log(str(log_path), str(tmp_path / "plots"))
    assert [Path(p).name for p in paths] == ["stage0.png", "stage1.png", "training.png"]
    for p in paths:
        assert Path(p).read_bytes()[:8] == PNG_MAGIC
    assert plot_training_log(str(tmp_path / "missing.jsonl"), str(tmp_path / "plots2")) == []
    (tmp_path / "events.jsonl").write_text(json.dumps({"stage": 1, "event": "dataset", "pairs": 2}) + "\n")
    assert plot_training_log(str(tmp_path / "events.jsonl"), str(tmp_path / "plots3")) == []


# ============================================================================ inputs and CLI

def test_load_questions_errors_name_file_and_line(tmp_path):
    assert len(load_questions(DEFAULT_QUESTIONS)) == 75
    bad = tmp_path / "q.jsonl"
    bad.write_text(json.dumps(QUESTIONS[0]) + "\n{not json\n")
    with pytest.raises(EvaluationInputError, match=r"q\.jsonl:2: not valid JSON"):
        load_questions(str(bad))
    bad.write_text("\n" + json.dumps({"question": "Why?"}) + "\n")
    with pytest.raises(EvaluationInputError, match=r"q\.jsonl:2: field 'reference'"):
        load_questions(str(bad))
    with pytest.raises(EvaluationInputError, match="does not exist"):
        load_questions(str(tmp_path / "nope.jsonl"))
    bad.write_text(json.dumps({"prompt": "p", "chosen": "c"}) + "\n")
    with pytest.raises(EvaluationInputError, match=r"q\.jsonl:1: field 'rejected'"):
        load_pairs(str(bad))



def test_load_questions_limit_takes_the_first_or_an_even_spread():
    rows = load_questions(DEFAULT_QUESTIONS)
    assert load_questions(DEFAULT_QUESTIONS, 5) == rows[:5]
    spread = load_questions(DEFAULT_QUESTIONS, 48, spread=True)
    assert [r["id"] for r in spread] == [rows[i * 75 // 48]["id"] for i in range(48)]
    assert {r["source"] for r in spread} == {r["source"] for r in rows}          # every topic, not the first ten
    assert len({r["source"] for r in load_questions(DEFAULT_QUESTIONS, 48)}) < 16
    assert load_questions(DEFAULT_QUESTIONS, 100, spread=True) == rows          # fewer rows than asked: all


def test_main_reports_bad_questions_file(run_dir, tmp_path, capsys):
    bad = tmp_path / "q.jsonl"
    bad.write_text("[1, 2]\n")
    rc = main(["--model", str(run_dir / "stage0"), "--questions", str(bad), "--out", str(tmp_path / "o")])
    assert rc == 2
    assert "q.jsonl:1: expected a JSON object" in capsys.readouterr().err


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "preflexor_core.evaluation", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def test_cli_help_and_missing_model(tmp_path):
    r = _cli("--help")
    assert r.returncode == 0
    for flag in ("--model", "--questions", "--pairs", "--ref-model", "--out", "--max-new-tokens", "--limit",
                 "--log", "--force-thinking", "--run"):
        assert flag in r.stdout
    missing = tmp_path / "no_such_model"
    r = _cli("--model", str(missing), "--out", str(tmp_path / "o"))
    assert r.returncode == 2
    assert f"model path '{missing}' does not exist" in r.stderr
    assert not (tmp_path / "o").exists()


def test_eval_config_checks_and_cli_reports_them(run_dir, tmp_path, capsys):
    with pytest.raises(ValueError, match="beta must be > 0"):
        EvalConfig(beta=0)
    with pytest.raises(ValueError, match=r"min_headers=7 must lie in \[0, 6\]"):
        EvalConfig(min_headers=7)
    with pytest.raises(ValueError, match="limit must be >= 1"):
        EvalConfig(limit=0)
    with pytest.raises(SystemExit) as e:
        main(["--model", str(run_dir / "stage0"), "--dpo-beta", "0", "--out", str(tmp_path / "o")])
    assert e.value.code == 2 and "beta must be > 0" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


# ============================================================================ the base model's row

def test_tags_written_as_text_count_as_the_thinking_tokens():
    from preflexor_core.thinking.check import normalize_tags
    text = "<thinking>\n**Reasoning Steps**:\n1. x\n</thinking>\nIt is tough."
    assert not check_format(text).compliant
    fc = check_format(normalize_tags(text))
    assert fc.compliant and fc.answer == "It is tough."
    assert normalize_tags(f"{THINK_START} a {THINK_END} b") == f"{THINK_START} a {THINK_END} b"
    assert normalize_tags("<| thinking |> a </ thinking> b") == f"{THINK_START} a {THINK_END} b"


def test_base_model_is_instructed_and_comes_first(run_dir, tmp_path, monkeypatch):
    import preflexor_core.sampler as sampler
    import preflexor_core.evaluation.runner as runner
    from preflexor_core.evaluation.runner import FORMAT_INSTRUCTION
    seen = []
    real = sampler.generate

    def spy(model, tok, chats, params):
        seen.append([c[0]["role"] for c in chats])
        return real(model, tok, chats, params)
    monkeypatch.setattr(runner, "generate", spy)
    out = tmp_path / "report"
    results = evaluate_stages(str(run_dir), str(run_dir / "questions.jsonl"),
                              EvalConfig(max_new_tokens=4, progress=False), pairs=str(run_dir / "pairs.jsonl"),
                              out_dir=str(out), base=str(run_dir / "stage0"))
    assert [r["name"] for r in results] == ["base", "stage0", "stage1"]
    assert [r["instructed"] for r in results] == [True, False, False]
    assert seen[0] == ["system"] * 3 and seen[1] == ["user"] * 3     # only the base gets the instruction
    assert "<|thinking|>" in FORMAT_INSTRUCTION and "**Reasoning Steps**" in FORMAT_INSTRUCTION
    assert results[1]["ref_model"] == str(run_dir / "stage0")          # the stage after the base is scored against it
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["base"]["name"] == "base" and saved["base"]["metrics"] == results[0]["metrics"]
    assert saved["architecture"]["hidden_size"] == 32 and saved["architecture"]["num_hidden_layers"] == 1
    report = (out / "report.md").read_text()
    assert report.index("| base |") < report.index("| stage0 |") < report.index("| stage1 |")
    side = report[report.index("## Base vs stage1"):report.index("## Example outputs")]
    assert side.count("\n| ") == 1 + 3                                  # header + one row per question
    for row in results[0]["outputs"]:
        assert row["question"] in side


def test_cli_base_alone_is_evaluated_as_the_instructed_base(monkeypatch, tmp_path):
    """``--base NAME`` with no --model / --run evaluates that model alone, named "base", instructed."""
    from preflexor_core.evaluation import cli
    seen = {}

    def fake_evaluate_models(dirs, questions, cfg, names=None, ref_model_dirs=None, pairs=None, instructed=None):
        seen.update(dirs=dirs, names=names, instructed=instructed)
        raise cli.EvaluationInputError("stop here")

    monkeypatch.setattr(cli, "evaluate_models", fake_evaluate_models)
    monkeypatch.setattr(cli, "check_model_dir", lambda d: d)
    assert cli.main(["--base", "smollm2-135m-instruct", "--limit", "2", "--out", str(tmp_path / "r")]) == 2
    assert seen == {"dirs": ["smollm2-135m-instruct"], "names": ["base"], "instructed": [True]}
    with pytest.raises(SystemExit):
        cli.main(["--out", str(tmp_path / "r2")])                  # nothing to evaluate: a usage error
