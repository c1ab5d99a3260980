"""On-the-fly preference data: row format, rejection sampling, resume after a crash / torn line,
bad teacher output, LLM-style teachers, the real sampler with a tiny policy, and the CLI."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from preflexor_core.thinking.formats import THINKING_INSTRUCTION
from preflexor_core.datagen import PairsFileError, generate_pairs, read_pairs
from preflexor_core.thinking.layout import answer_part, format_chosen
from preflexor_core.thinking.layout import DEFAULT_CATEGORIES
from preflexor_core.teachers import ExtractiveTeacher, TeacherUnavailableError
from preflexor_core.text.words import split_sentences
from preflexor_core.thinking.tokens import THINK_END, THINK_START
from test_teachers import CORPUS, build_retriever, in_corpus

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def retriever():
    return build_retriever()


def _lines(path):
    return Path(path).read_bytes().splitlines(keepends=True)


# ============================================================================ format

def test_chosen_format_is_exact():
    chosen = format_chosen([("Reasoning Steps", "1. a\n2. b"), ("Hypothesis", ""), ("Design Principles", "- c")],
                           "The answer.")
    assert chosen == ("<|thinking|>\n**Reasoning Steps**:\n\n1. a\n2. b\n\n**Design Principles**:\n\n- c\n\n"
                      "<|/thinking|>\nThe answer.")
    assert answer_part(chosen) == "The answer."
    assert answer_part("<|thinking|> never closed") == ""
    assert answer_part("plain") == "plain"


def test_rows_have_prompt_chosen_rejected_and_metadata(retriever, tmp_path):
    out = tmp_path / "pairs.jsonl"
    teacher = ExtractiveTeacher(retriever, seed=0)
    rows = generate_pairs(retriever, teacher, n=4, rejected_from="teacher", out_path=out,
                          progress=False, seed=7)
    assert [r["id"] for r in rows] == ["7-0", "7-1", "7-2", "7-3"]
    assert rows.stats.written == 4 and not rows.stats.skipped
    on_disk = read_pairs(out)
    assert [r["id"] for r in on_disk] == [r["id"] for r in rows]
    for r in on_disk:
        assert r["prompt"].endswith(THINKING_INSTRUCTION) and r["prompt"] == r["question"] + THINKING_INSTRUCTION
        assert "<|start_header_id|>" not in r["prompt"]  # the chat template is applied at training time
        assert r["chosen"].startswith(THINK_START + "\n**Reasoning Steps**:\n\n")
        think, answer = r["chosen"].split("\n" + THINK_END + "\n")
        assert answer == r["answer"] and 2 <= len(split_sentences(answer)) <= 4
        assert all(in_corpus(s) for s in split_sentences(answer))
        heads = re.findall(r"^\*\*(.+?)\*\*:\n\n", think, flags=re.M)
        assert heads == list(DEFAULT_CATEGORIES) == r["categories"]
        assert r["rejected"] and THINK_START not in r["rejected"] and r["rejected"] != r["chosen"]
        assert r["source_chunk_ids"] and set(r["source_chunk_ids"]) <= set(r["context_chunk_ids"])
        assert r["scores"] == [r["rejected_score"]] and -1.0 <= r["rejected_score"] <= 1.0
        assert r["teacher"] == teacher.name and r["seed"] == 7 and r["created"]
        assert r["rejected_from"] == "teacher" and r["scorer"].startswith("embedding:")
    # same seed -> same content
    again = generate_pairs(retriever, ExtractiveTeacher(retriever, seed=0), n=4, rejected_from="teacher",
                           progress=False, seed=7)
    key = lambda rs: [(r["prompt"], r["chosen"], r["rejected"]) for r in rs]  # noqa: E731
    assert key(again) == key(rows)


def test_custom_categories(retriever):
    cats = ["Reasoning Steps", "Toughening Mechanisms"]
    rows = generate_pairs(retriever, ExtractiveTeacher(retriever), n=2, rejected_from="teacher",
                          categories=cats, progress=False)
    for r in rows:
        assert re.findall(r"^\*\*(.+?)\*\*:", r["chosen"], flags=re.M) == cats


# ============================================================================ rejection sampling

class _FakeCompletion:
    def __init__(self, text):
        self.text, self.token_ids, self.finish_reason = text, [], "stop"


def _fake_generate(calls):
    def generate(model, tokenizer, chats, params, **kw):
        calls.append((chats, params))
        return [_FakeCompletion(f"{params.prepend_response}sample {p} {s}")
                for p in range(len(chats)) for s in range(params.n)]
    return generate


SCORE_OF_SAMPLE = {0: 0.6, 1: 0.2, 2: 0.9, 3: 0.4}


def _scorer(question, reference, candidate):
    return SCORE_OF_SAMPLE[int(candidate.split()[-1])]


def test_rejection_sampling_keeps_the_lowest_scored_sample(retriever, monkeypatch):
    import preflexor_core.datagen.rejected as rejected
    calls = []
    monkeypatch.setattr(rejected, "generate", _fake_generate(calls))
    rows = generate_pairs(retriever, ExtractiveTeacher(retriever), policy=("model", "tok"), n=5,
                          k_samples=4, scorer=_scorer, progress=False, batch_size=16)
    assert len(rows) == 5
    # ONE generate call: every question of the batch, n = k_samples, stage 1 = bare question
    assert len(calls) == 1
    chats, params = calls[0]
    assert len(chats) == 5 and params.n == 4 and params.prepend_response == ""
    assert [c[0]["content"] for c in chats] == [r["question"] for r in rows]
    for r in rows:
        assert r["scores"] == [0.6, 0.2, 0.9, 0.4]
        assert r["rejected_score"] == 0.2 and r["rejected_index"] == 1
        assert r["rejected"].endswith(" 1") and r["rejected_from"] == "policy"
    assert rows.stats.policy_samples == 20


def test_stage2_samples_start_with_thinking(retriever, monkeypatch):
    import preflexor_core.datagen.rejected as rejected
    calls = []
    monkeypatch.setattr(rejected, "generate", _fake_generate(calls))
    rows = generate_pairs(retriever, ExtractiveTeacher(retriever), policy=("model", "tok"), n=2,
                          k_samples=2, with_thinking=True, scorer=_scorer, progress=False)
    chats, params = calls[0]
    assert params.prepend_response == THINK_START
    assert all(c[0]["content"].endswith(THINKING_INSTRUCTION) for c in chats)
    assert all(r["rejected"].startswith(THINK_START) and r["with_thinking"] for r in rows)


def test_only_include_wrong_answers_drops_good_rejected(retriever, monkeypatch):
    import preflexor_core.datagen.rejected as rejected
    monkeypatch.setattr(rejected, "generate", _fake_generate([]))
    scores = iter([0.95, 0.1, 0.85, 0.3])  # one sample per row
    rows = generate_pairs(retriever, ExtractiveTeacher(retriever), policy=("model", "tok"), n=4,
                          scorer=lambda q, ref, c: next(scores), only_include_wrong_answers=True,
                          wrong_threshold=0.8, progress=False)
    assert [r["id"] for r in rows] == ["0-1", "0-3"]
    assert rows.stats.skipped["not_wrong"] == 2


def test_embedding_scorer_prefers_the_closer_answer(retriever, monkeypatch):
    """With the embedding scorer the sample farthest from the chosen answer is the one kept."""
    import preflexor_core.datagen.rejected as rejected

    teacher = ExtractiveTeacher(retriever)
    state = {}

    def gen(model, tok, chats, params, **kw):  # sample 1 repeats the chosen answer of its row
        outs = []
        for c in chats:
            q = c[0]["content"]
            ans = teacher.answer(q, state.get(q))
            outs += [_FakeCompletion("zzz qqq xxx"), _FakeCompletion(ans)]
        return outs

    orig = teacher.answer

    def answer(q, ctx=None):
        state[q] = ctx
        return orig(q, ctx)

    teacher.answer = answer
    monkeypatch.setattr(rejected, "generate", gen)
    rows = generate_pairs(retriever, teacher, policy=("m", "t"), n=3, k_samples=2, progress=False)
    for r in rows:
        assert r["scores"][1] > 0.99 and r["scores"][0] < 0.5
        assert r["rejected"] == "zzz qqq xxx"


def test_judge_scorer_parses_ratings():
    from preflexor_core.datagen import JudgeScorer, make_scorer

    class Judge:
        name = "judge"

        def complete(self, messages, temperature=0.0, max_tokens=512):
            return self.complete_many([messages])[0]

        def complete_many(self, chats, temperature=0.0, max_tokens=512):
            return ["Rating: 7" if "good" in c[0]["content"].split("Candidate answer:")[1] else "2/10"
                    for c in chats]

    scorer = make_scorer(Judge(), retriever=None)
    assert isinstance(scorer, JudgeScorer)
    assert scorer.score_many(["q"], ["ref"], [["a good one", "a bad one"]]) == [[0.7, 0.2]]
    with pytest.raises(ValueError, match="scorer must be"):
        make_scorer(42, retriever=None)


# ============================================================================ resume / crash safety

class _CrashingTeacher(ExtractiveTeacher):
    """Raises (like a crash) when asked for its ``crash_at``-th answer."""

    def __init__(self, retriever, crash_at):
        super().__init__(retriever)
        self.crash_at, self.calls = crash_at, 0

    def answer(self, question, context=None, **kw):
        self.calls += 1
        if self.calls == self.crash_at:
            raise RuntimeError("simulated crash")
        return super().answer(question, context, **kw)


def test_crash_and_resume_lose_and_duplicate_nothing(retriever, tmp_path):
    out = tmp_path / "pairs.jsonl"
    with pytest.raises(RuntimeError, match="simulated crash"):
        generate_pairs(retriever, _CrashingTeacher(retriever, crash_at=4), n=6, rejected_from="teacher",
                       out_path=out, progress=False)
    before = _lines(out)
    assert [json.loads(x)["id"] for x in before] == ["0-0", "0-1", "0-2"]

    rows = generate_pairs(retriever, ExtractiveTeacher(retriever), n=6, rejected_from="teacher",
                          out_path=out, progress=False)
    after = _lines(out)
    assert after[:3] == before  # nothing written before the crash changed
    ids = [json.loads(x)["id"] for x in after]
    assert ids == [f"0-{i}" for i in range(6)]
    assert rows.stats.existing == 3 and rows.stats.written == 3 and len(rows) == 6

    # resumed rows equal those of an uninterrupted run (rows depend only on seed + index)
    fresh = generate_pairs(retriever, ExtractiveTeacher(retriever), n=6, rejected_from="teacher",
                           progress=False)
    key = lambda rs: [(r["id"], r["prompt"], r["chosen"], r["rejected"]) for r in rs]  # noqa: E731
    assert key(rows) == key(fresh)

    # nothing left to do: a rerun writes nothing
    again = generate_pairs(retriever, ExtractiveTeacher(retriever), n=6, rejected_from="teacher",
                           out_path=out, progress=False)
    assert again.stats.written == 0 and _lines(out) == after


def test_torn_last_line_is_cut_and_regenerated(retriever, tmp_path):
    out = tmp_path / "pairs.jsonl"
    generate_pairs(retriever, ExtractiveTeacher(retriever), n=3, rejected_from="teacher", out_path=out,
                   progress=False)
    good = _lines(out)
    torn = good[2][: len(good[2]) // 2]  # the third row half written, no newline
    out.write_bytes(b"".join(good[:2]) + torn)
    assert [r["id"] for r in read_pairs(out)] == ["0-0", "0-1"]  # reading ignores the torn tail
    rows = generate_pairs(retriever, ExtractiveTeacher(retriever), n=4, rejected_from="teacher",
                          out_path=out, progress=False)
    lines = _lines(out)
    assert [json.loads(x)["id"] for x in lines] == ["0-0", "0-1", "0-2", "0-3"]
    assert lines[:2] == good[:2] and rows.stats.written == 2
    assert json.loads(lines[2])["chosen"] == json.loads(good[2])["chosen"]


def test_stale_pairs_are_reused_not_regenerated(retriever, tmp_path):
    """Resuming trusts the file: a row whose id is in range is kept byte for byte whatever made it
    (another teacher, an older config); only missing ids are generated.
    Every other row of the file (other seeds, beyond ``n``) stays there and is returned too, after
    the requested ids, ordered by id (callers filter by the seed prefix)."""
    out = tmp_path / "pairs.jsonl"
    stale = [{"id": "0-1", "prompt": "stale prompt", "chosen": "stale chosen", "rejected": "stale rejected"},
             {"id": "5-0", "prompt": "other seed", "chosen": "c", "rejected": "r"},
             {"id": "0-7", "prompt": "p", "chosen": "c", "rejected": "r"}]
    out.write_text("".join(json.dumps(r) + "\n" for r in stale))
    before = _lines(out)
    rows = generate_pairs(retriever, ExtractiveTeacher(retriever), n=3, rejected_from="teacher",
                          out_path=out, progress=False)
    assert rows.stats.existing == 1 and rows.stats.written == 2 and rows.stats.requested == 3
    assert [r["id"] for r in rows] == ["0-0", "0-1", "0-2", "0-7", "5-0"]
    assert rows[1] == stale[0] and rows[3] == stale[2] and rows[4] == stale[1]
    lines = _lines(out)
    assert lines[:3] == before and [json.loads(x)["id"] for x in lines[3:]] == ["0-0", "0-2"]
    # the generated rows are those of a run without the stale file (rows depend on seed + index only)
    fresh = generate_pairs(retriever, ExtractiveTeacher(retriever), n=3, rejected_from="teacher", progress=False)
    drop_time = lambda r: {k: v for k, v in r.items() if k != "created"}  # noqa: E731
    assert [drop_time(rows[0]), drop_time(rows[2])] == [drop_time(r) for r in fresh if r["id"] != "0-1"]
    # another seed shares the file: its ids are new, the stale "5-0" is kept and nothing is rewritten
    other = generate_pairs(retriever, ExtractiveTeacher(retriever), n=2, rejected_from="teacher",
                           out_path=out, progress=False, seed=5)
    assert other.stats.existing == 1 and other.stats.written == 1
    assert [r["id"] for r in other] == ["5-0", "5-1", "0-0", "0-1", "0-2", "0-7"] and other[0] == stale[1]
    assert _lines(out)[:5] == lines


def test_config_object_and_keyword_options(retriever, tmp_path):
    from preflexor_core.datagen import DatagenConfig
    cfg = DatagenConfig(n=2, rejected_from="teacher", progress=False, seed=3, categories=["Hypothesis"])
    a = generate_pairs(retriever, ExtractiveTeacher(retriever), config=cfg)
    b = generate_pairs(retriever, ExtractiveTeacher(retriever), n=2, rejected_from="teacher", progress=False,
                       seed=3, categories=["Hypothesis"])
    key = lambda rs: [(r["id"], r["prompt"], r["chosen"], r["rejected"]) for r in rs]  # noqa: E731
    assert key(a) == key(b) and [r["id"] for r in a] == ["3-0", "3-1"]
    c = generate_pairs(retriever, ExtractiveTeacher(retriever), config=cfg, n=1)  # keywords override the config
    assert key(c) == key(a)[:1] and cfg.n == 2
    with pytest.raises(TypeError, match="unknown option.*n_pairs.*DatagenConfig fields"):
        generate_pairs(retriever, ExtractiveTeacher(retriever), config=cfg, n_pairs=3)
    with pytest.raises(ValueError, match="k_samples must be >= 1"):
        DatagenConfig(k_samples=0)
    with pytest.raises(ValueError, match="categories is empty"):
        DatagenConfig(categories=[])


def test_corrupt_middle_line_is_an_error(tmp_path):
    out = tmp_path / "pairs.jsonl"
    row = lambda i: json.dumps({"id": f"0-{i}", "prompt": "p", "chosen": "c", "rejected": "r"})  # noqa: E731
    out.write_text(f'{row(0)}\nnot json\n{row(2)}\n')
    with pytest.raises(PairsFileError, match=r"pairs.jsonl:2: not a valid pair row"):
        read_pairs(out)


# ============================================================================ bad teacher output

class _FlakyTeacher(ExtractiveTeacher):
    """Row 1: empty answer; row 3: every category empty; row 4: endpoint down."""

    def __init__(self, retriever):
        super().__init__(retriever)
        self.row_of = {}  # question -> row index

    def make_question(self, hits, salt=""):
        row = int(str(salt).split("-")[1])
        if row == 4:
            raise TeacherUnavailableError("endpoint down after retries")
        q = super().make_question(hits, salt) + f" (row {row})"
        self.row_of[q] = row
        return q

    def fill_category(self, category, question, context=None):
        return "" if self.row_of[question] == 3 else super().fill_category(category, question, context)

    def answer(self, question, context=None, **kw):
        return "   " if self.row_of.get(question) == 1 else super().answer(question, context, **kw)


def test_bad_teacher_output_skips_row_and_counts_reason(retriever, tmp_path):
    out = tmp_path / "pairs.jsonl"
    rows = generate_pairs(retriever, _FlakyTeacher(retriever), n=6, rejected_from="teacher",
                          out_path=out, progress=False, batch_size=2)
    assert [r["id"] for r in rows] == ["0-0", "0-2", "0-5"]
    assert dict(rows.stats.skipped) == {"empty_answer": 1, "no_thinking": 1, "teacher_error": 1}
    assert rows.stats.teacher_errors == 1 and rows.stats.written == 3
    assert len(read_pairs(out)) == 3


class _ScriptedLLM:
    """A chat teacher without task methods: datagen must use prompts (question, categories, answer)."""

    name = "scripted-llm"

    def __init__(self, empty_sections=False):
        self.empty_sections = empty_sections
        self.prompts = []

    def complete(self, messages, temperature=0.0, max_tokens=512):
        return self.complete_many([messages], temperature, max_tokens)[0]

    def complete_many(self, list_of_messages, temperature=0.0, max_tokens=512):
        out = []
        for m in list_of_messages:
            text = m[-1]["content"]
            self.prompts.append(text)
            if text.startswith("You write exam questions"):
                out.append("Question: Why is nacre tough?\n")
            elif "section of a structured reasoning scratchpad" in text:
                cat = re.search(r'Write the "(.+?)" section', text).group(1)
                out.append("" if self.empty_sections else f"**{cat}**: <|thinking|>point about {cat}.")
            elif text.startswith("Context:"):
                out.append("<|thinking|>scratch<|/thinking|>Nacre deflects cracks.")
            else:  # plain answer without context
                out.append("Because it is hard.")
        return out


def test_llm_style_teacher_prompts_and_cleaning(retriever):
    t = _ScriptedLLM()
    rows = generate_pairs(retriever, t, n=2, rejected_from="teacher", progress=False)
    assert len(rows) == 2
    r = rows[0]
    assert r["prompt"] == "Why is nacre tough?" + THINKING_INSTRUCTION
    assert r["chosen"] == format_chosen([(c, f"point about {c}.") for c in DEFAULT_CATEGORIES],
                                        "Nacre deflects cracks.")
    assert r["rejected"] == "Because it is hard."
    # category prompts carry the retrieved context
    cat_prompts = [p for p in t.prompts if "section of a structured reasoning scratchpad" in p]
    assert len(cat_prompts) == 2 * len(DEFAULT_CATEGORIES) and all("[1] " in p for p in cat_prompts)

    bad = generate_pairs(retriever, _ScriptedLLM(empty_sections=True), n=2, rejected_from="teacher",
                         progress=False)
    assert len(bad) == 0 and bad.stats.skipped["no_thinking"] == 2


def test_http_teacher_end_to_end(retriever):
    """An OpenAI-compatible teacher over HTTP: questions, one request per category + answer, and
    plain answers as rejected; a request that keeps failing skips only its row."""
    from preflexor_core.teachers import OpenAITeacher
    from test_teachers import _Server
    cats = ["Reasoning Steps", "Hypothesis"]
    with _Server() as s:
        t = OpenAITeacher(s.url, "m", concurrency=4, backoff_base=0.001)
        rows = generate_pairs(retriever, t, n=2, categories=cats, rejected_from="teacher", progress=False)
    assert len(rows) == 2 and len(s.bodies) == 2 + 2 * (len(cats) + 1) + 2
    for r in rows:
        assert r["prompt"].startswith("echo: You write exam questions") and r["teacher"] == t.name
        assert re.findall(r"^\*\*(.+?)\*\*:", r["chosen"], flags=re.M) == cats
        assert r["rejected"].startswith("echo: echo: You write exam questions")  # the bare question
    with _Server(statuses=[200, 200] + [500] * 3) as s:  # the first row's first section fails
        t = OpenAITeacher(s.url, "m", concurrency=1, max_retries=2, backoff_base=0.001)
        rows = generate_pairs(retriever, t, n=2, categories=cats, rejected_from="teacher", progress=False)
    assert [r["id"] for r in rows] == ["0-1"] and rows.stats.skipped["teacher_error"] == 1


def test_argument_errors(retriever):
    t = ExtractiveTeacher(retriever)
    with pytest.raises(ValueError, match="needs policy"):
        generate_pairs(retriever, t, n=1, progress=False)
    with pytest.raises(ValueError, match="rejected_from"):
        generate_pairs(retriever, t, n=1, rejected_from="nobody", progress=False)
    with pytest.raises(ValueError, match="output directory does not exist"):
        generate_pairs(retriever, t, n=1, rejected_from="teacher", out_path="/nonexistent-dir/x.jsonl",
                       progress=False)


# ============================================================================ real sampler, tiny policy

def test_tiny_policy_with_real_sampler(retriever, tmp_path):
    import torch
    from preflexor_core import Llama, ModelConfig
    from preflexor_core.sampler import SamplingParams
    from preflexor_core.tokenization.tokenizer import Tokenizer
    tok = Tokenizer.train_bpe(CORPUS * 2, vocab_size=400)
    cfg = ModelConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, max_position_embeddings=512, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    model = Llama(cfg)
    out = tmp_path / "pairs.jsonl"
    rows = generate_pairs(retriever, ExtractiveTeacher(retriever), policy=(model, tok), n=3, k_samples=3,
                          out_path=out, progress=False,
                          sampling=SamplingParams(max_new_tokens=12, temperature=1.0, top_k=50))
    assert len(rows) == 3 and rows.stats.policy_samples == 9
    for r in rows:
        assert r["rejected"] and r["rejected_from"] == "policy"
        assert len(r["scores"]) == 3 and r["rejected_score"] == min(r["scores"])
        assert r["chosen"].startswith(THINK_START)
    assert len(read_pairs(out)) == 3
    # the rows are what the trainer's tokenizer expects (thinking span closed, answer after it)
    from preflexor_core.train.batches import PairFormat, tokenize_pair
    fmt = PairFormat(max_length=8192, max_prompt_length=512, mask_mode="answer_only")
    for i, r in enumerate(rows):
        ex, why = tokenize_pair(tok, r, fmt, index=i)
        assert why is None and ex is not None


def test_policy_samples_decode_with_the_requested_weights(retriever, monkeypatch):
    import preflexor_core.datagen.rejected as rejected
    import preflexor_core.sampler as sampler
    from preflexor_core.datagen import DatagenError
    seen = []

    def fake_generate(model, tok, chats, params, **kw):
        seen.append(kw.get("decode_weights"))
        return [sampler.Completion(text="An answer.", token_ids=[1], finish_reason="stop", prompt_index=i // params.n,
                                   sample_index=i % params.n) for i in range(len(chats) * params.n)]
    monkeypatch.setattr(rejected, "generate", fake_generate)
    rows = generate_pairs(retriever, ExtractiveTeacher(retriever), policy=(object(), object()), n=2, progress=False,
                          decode_weights="int8", batch_size=2)
    assert len(rows) == 2 and seen == ["int8"]
    generate_pairs(retriever, ExtractiveTeacher(retriever), policy=(object(), object()), n=2, progress=False, seed=1)
    assert seen == ["int8", "fp"]
    with pytest.raises(DatagenError, match="decode_weights must be fp or int8"):
        generate_pairs(retriever, ExtractiveTeacher(retriever), policy=(object(), object()), n=1, decode_weights="q4")


# ============================================================================ CLI

def _cli(*args, timeout=120):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "preflexor_core.datagen", *args], capture_output=True,
                          text=True, cwd=REPO, env=env, timeout=timeout)


def test_cli_help():
    p = _cli("--help")
    assert p.returncode == 0
    for flag in ("--corpus", "--out", "--n", "--teacher", "--model", "--seed", "--k-samples"):
        assert flag in p.stdout


def test_cli_bad_inputs(tmp_path):
    p = _cli("--corpus", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "p.jsonl"))
    assert p.returncode == 2 and "--corpus" in p.stderr and "no such file or directory" in p.stderr
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n\n".join(CORPUS))
    p = _cli("--corpus", str(corpus), "--teacher", "gpt-4o")
    assert p.returncode == 2 and "--teacher 'gpt-4o'" in p.stderr and "http(s)://" in p.stderr
    p = _cli("--corpus", str(corpus), "--teacher", "http://127.0.0.1:9/v1")     # --teacher-model: gpt-4o-mini
    assert p.returncode == 2 and "--teacher" in p.stderr and "unreachable" in p.stderr


def test_cli_extractive_run(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n\n".join(CORPUS))
    out = tmp_path / "pairs.jsonl"
    p = _cli("--corpus", str(corpus), "--out", str(out), "--n", "3", "--embedder", "hashing", "--no-progress")
    assert p.returncode == 0, p.stderr
    summary = json.loads(p.stdout.strip().splitlines()[-1])
    assert summary["written"] == 3
    assert [r["id"] for r in read_pairs(out)] == ["0-0", "0-1", "0-2"]
