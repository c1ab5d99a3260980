"""A checkpoint's chat template renders under a time and size budget: hostile templates (hangs, huge
allocations, runaway output) fail fast with one ChatTemplateBudgetError line; real templates are unaffected."""
from __future__ import annotations

import time
from pathlib import Path

import pytest

from preflexor_core.tokenization import jinja_sandbox
from preflexor_core.tokenization.chat_template import render_chat_template
from preflexor_core.tokenization.jinja_sandbox import ChatTemplateBudgetError

MSGS = [{"role": "user", "content": "hi"}]
TEMPLATES = Path(__file__).parent / "fixtures" / "chat_templates"

HOSTILE = {
    "nested range loops": "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "loops with no call": "{% set r = range(100000)|list %}{% for i in r %}{% for j in r %}{% endfor %}{% endfor %}",
    "while-like recursion": "{% macro f(n) %}{% for i in range(100000) %}{{ f(n) if false }}{% endfor %}{{ f(n) }}"
                            "{% endmacro %}{{ f(1) }}",
    "string repetition": "{{ 'A' * 20000000000 }}",
    "list repetition": "{{ [1, 2] * 10000000000 }}",
    "concatenation": "{% set a = 'A' * 10000000 %}{{ a ~ a ~ a }}",
    "namespace doubling": "{% set ns = namespace(s='A') %}{% for i in range(60) %}{% set ns.s = ns.s ~ ns.s %}"
                          "{% endfor %}",
    "list doubling": "{% set ns = namespace(l=[1]) %}{% for i in range(40) %}{% set ns.l = ns.l + ns.l %}{% endfor %}",
    "recursive macro": "{% macro f(s) %}{{ f(s ~ s) }}{% endmacro %}{{ f('a') }}",
    "big power": "{{ 10 ** 100000000 }}",
    "big product": "{% set ns = namespace(x=3) %}{% for i in range(30) %}{% set ns.x = ns.x * ns.x %}{% endfor %}",
    "percent width": "{{ '%2000000000d' % 1 }}",
    "format width": "{{ '{:>2000000000}'.format(1) }}",
    "format filter": "{{ '%2000000000s'|format('x') }}",
    "center filter": "{{ 'a'|center(20000000000) }}",
    "ljust method": "{{ 'a'.ljust(20000000000) }}",
    "replace growth": "{% set a = 'A' * 1000000 %}{{ a|replace('A', 'B' * 40) }}",
    "join growth": "{% set a = 'A' * 1000000 %}{{ range(100000)|join(a) }}",
    "indent growth": "{{ ('a\\n' * 1000000)|indent(4000) }}",
    "tojson indent": "{{ range(1000)|list|tojson(indent=100000) }}",
    "runaway output": "{% for i in range(100000) %}{% for j in range(100000) %}xxxxxxxxxx{% endfor %}{% endfor %}",
    "huge range": "{{ range(10000000)|list|length }}",
}


@pytest.fixture(autouse=True)
def short_deadline(monkeypatch):
    monkeypatch.setattr(jinja_sandbox, "RENDER_DEADLINE_S", 0.5)


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_template_fails_fast_with_one_line(name):
    t0 = time.monotonic()
    with pytest.raises(ChatTemplateBudgetError) as e:
        render_chat_template(HOSTILE[name], MSGS)
    assert time.monotonic() - t0 < 3.0
    assert "\n" not in str(e.value) and "chat template" in str(e.value)


def test_real_templates_and_normal_loops_render():
    for path in sorted(TEMPLATES.glob("*.jinja")):
        out = render_chat_template(path.read_text(), MSGS * 3 + [{"role": "assistant", "content": "ok"}],
                                   add_generation_prompt=False, special_tokens={"bos_token": "<s>"})
        assert "hi" in out
    assert render_chat_template("{% for i in range(1000) %}{{ i % 10 }}{% endfor %}", MSGS).endswith("789")
    assert render_chat_template("{{ 'ab' * 3 ~ ('x' + 'y') }}{{ 2 ** 10 }}", MSGS) == "abababxy1024"


def test_budget_error_reaches_the_cli_as_a_tokenizer_error():
    from preflexor_core import Tokenizer
    from preflexor_core.infra.errors import is_project_error
    from preflexor_core.tokenization.errors import TokenizerError
    tok = Tokenizer.train_bpe(["a b c d"] * 10, vocab_size=300)
    tok.chat_template = HOSTILE["string repetition"]
    with pytest.raises(TokenizerError) as e:
        tok.apply_chat_template(MSGS)
    assert "over the limit" in str(e.value) and is_project_error(e.value)


def test_watchdog_never_fires_after_the_rendering():
    for _ in range(50):
        render_chat_template("{{ messages[0].content }}", MSGS)
    t0, spins = time.monotonic(), 0
    while time.monotonic() - t0 < 0.7:    # past the (short) deadline: no late interrupt arrives here
        spins += 1
    assert spins > 0
