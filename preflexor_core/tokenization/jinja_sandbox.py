"""The sandbox a checkpoint's Jinja chat template renders in: Hugging Face's environment, under a budget.

    text = render(compile_template(template), messages=..., add_generation_prompt=True, **special_tokens)

The environment follows the Hugging Face chat-template conventions (a sandboxed Jinja environment with
trim_blocks/lstrip_blocks, loop controls, a ``{% generation %}`` block, a non-escaping ``tojson``,
``raise_exception`` and ``strftime_now``), so a checkpoint's template renders byte-identically here and in
transformers' ``apply_chat_template(..., tokenize=False)``.
A checkpoint's template is untrusted code: it renders in a sandbox (no route to Python internals) under a
budget, so a hostile one cannot hang or exhaust memory. Rendering must finish within
``RENDER_DEADLINE_S`` (checked in every call, attribute look-up and operator of the template, and
enforced by a watchdog that interrupts loops that make none); no string, list or output may grow past
``MAX_TEMPLATE_CHARS`` (repetition, concatenation, ``**``, ``%``-formatting and size-taking filters and
methods are checked *before* they allocate). Past the budget: :class:`ChatTemplateBudgetError`, one line.
What the template is given (messages, special tokens) is chat_template.py's.
Tests: ``python -m pytest -q tests/test_security_template.py`` (budgets), ``tests/test_tokenizer.py``.
"""
from __future__ import annotations

import ctypes
import json
import re
import threading
import time
from datetime import datetime
from functools import lru_cache

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.compiler import CodeGenerator
from jinja2.sandbox import ImmutableSandboxedEnvironment

RENDER_DEADLINE_S = 5.0            # wall-clock budget of one rendering
MAX_TEMPLATE_CHARS = 1 << 24       # largest string / list / output a template may build
MAX_RANGE = 100_000                # largest range() (as jinja's sandbox)
MAX_INT_BITS = 1 << 16             # largest integer a template may compute


class ChatTemplateBudgetError(jinja2.exceptions.SecurityError):
    """A chat template went past its time or size budget (a hostile or broken template)."""


class _DeadlinePassed(ChatTemplateBudgetError):
    """Raised inside the rendering thread by the watchdog (an exception class made without arguments)."""

    def __init__(self, message=None):
        super().__init__(message or f"the chat template did not finish within {RENDER_DEADLINE_S:g} s")


_state = threading.local()         # deadline of the rendering in progress in this thread


def _check_time() -> None:
    end = getattr(_state, "end", None)
    if end is not None and time.monotonic() > end:
        raise ChatTemplateBudgetError(f"the chat template did not finish within {RENDER_DEADLINE_S:g} s")


def _size(x) -> int:
    return len(x) if isinstance(x, (str, bytes, list, tuple, dict)) else 0


def _check_size(n: int, what: str) -> None:
    if n > MAX_TEMPLATE_CHARS:
        raise ChatTemplateBudgetError(f"the chat template builds {what} of length {n}, over the limit of "
                                      f"{MAX_TEMPLATE_CHARS}")


_NUMBER = re.compile(r"\d+")


def _check_format(fmt, args) -> None:
    """A %- or {}-format string and its arguments: no width / precision / number past the size limit."""
    if isinstance(fmt, str) and any(len(m) > 9 or int(m) > MAX_TEMPLATE_CHARS for m in _NUMBER.findall(fmt)):
        raise ChatTemplateBudgetError(f"the chat template formats with a width over {MAX_TEMPLATE_CHARS}")
    for a in args:
        if isinstance(a, int) and not isinstance(a, bool) and abs(a) > MAX_TEMPLATE_CHARS:
            raise ChatTemplateBudgetError(f"the chat template formats a number over {MAX_TEMPLATE_CHARS}")


def _check_call_args(name: str, self_obj, args, kwargs) -> None:
    """Before a size-taking call (a str / list method or a filter): its result stays under the limit."""
    values = list(args) + list(kwargs.values())
    for a in values:
        if isinstance(a, int) and not isinstance(a, bool) and a > MAX_TEMPLATE_CHARS:
            raise ChatTemplateBudgetError(f"the chat template calls {name} with {a}, over the limit of "
                                          f"{MAX_TEMPLATE_CHARS}")
    if name in ("format", "format_map"):
        _check_format(self_obj, values)
    elif name == "replace" and isinstance(self_obj, str) and len(args) >= 2:
        old, new = str(args[0]), str(args[1])
        grows = self_obj.count(old) * max(0, len(new) - len(old)) if old else (len(self_obj) + 1) * len(new)
        _check_size(len(self_obj) + grows, "a string")
    elif name == "join" and isinstance(self_obj, str) and args and isinstance(args[0], (list, tuple)):
        _check_size(len(self_obj) * len(args[0]) + sum(_size(x) for x in args[0]), "a string")
    elif name in ("indent",) and isinstance(self_obj, str):
        width = next((a for a in values if isinstance(a, int) and not isinstance(a, bool)), 4)
        _check_size(len(self_obj) + (self_obj.count("\n") + 1) * width, "a string")


_SMALL_ARG_FILTERS = frozenset({"indent", "tojson", "center", "wordwrap"})   # widths, per line or per item
MAX_FILTER_WIDTH = 4096


def _budget_filter(name, fn):
    skip = 1 if hasattr(fn, "jinja_pass_arg") else 0       # the context / environment argument

    def checked(*args, **kwargs):
        _check_time()
        value, rest = (args[skip], args[skip + 1:]) if len(args) > skip else (None, ())
        _check_call_args(name, value, rest, kwargs)
        if name == "format":
            _check_format(value, list(rest) + list(kwargs.values()))
        elif name == "join" and hasattr(value, "__len__"):
            sep = rest[0] if rest else kwargs.get("d", "")
            _check_size(_size(sep) * len(value) + sum(_size(x) for x in value) if len(value) <= MAX_TEMPLATE_CHARS
                        else len(value), "a string")
        if name in _SMALL_ARG_FILTERS and any(isinstance(a, int) and not isinstance(a, bool) and a > MAX_FILTER_WIDTH
                                              for a in list(rest) + list(kwargs.values())):
            raise ChatTemplateBudgetError(f"the chat template calls the {name} filter with a width over "
                                          f"{MAX_FILTER_WIDTH}")
        out = fn(*args, **kwargs)
        _check_size(_size(out), "a value")
        return out
    checked.__name__ = getattr(fn, "__name__", name)
    for attr in ("jinja_pass_arg",):            # pass_context / pass_environment markers
        if hasattr(fn, attr):
            setattr(checked, attr, getattr(fn, attr))
    return checked


def _budget_range(*args):
    _check_time()
    r = range(*args)
    if len(r) > MAX_RANGE:
        raise ChatTemplateBudgetError(f"the chat template asks for range() of {len(r)} items, over the limit "
                                      f"of {MAX_RANGE}")
    return r


def _budget_join(parts) -> str:
    _check_time()
    parts = [p if isinstance(p, str) else str(p) for p in parts]
    _check_size(sum(len(p) for p in parts), "a string")
    return "".join(parts)


class _BudgetCodeGenerator(CodeGenerator):
    """Jinja's code generator with ``~`` (concatenation) routed through a size check."""

    def visit_Concat(self, node, frame):
        if frame.eval_ctx.volatile or frame.eval_ctx.autoescape:
            return super().visit_Concat(node, frame)
        self.write("environment.budget_join((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")


class _BudgetSandbox(ImmutableSandboxedEnvironment):
    """The sandbox with a wall-clock deadline and size checks in every call, attribute and operator."""
    code_generator_class = _BudgetCodeGenerator
    intercepted_binops = frozenset({"*", "+", "**", "%"})

    @staticmethod
    def budget_join(parts) -> str:
        return _budget_join(parts)

    def getattr(self, obj, attribute):
        _check_time()
        value = super().getattr(obj, attribute)
        if isinstance(obj, str) and attribute in ("format", "format_map") and callable(value):
            def checked_format(*args, **kwargs):
                _check_format(obj, list(args) + [v for a in args if isinstance(a, dict) for v in a.values()]
                              + list(kwargs.values()))
                return value(*args, **kwargs)
            return checked_format
        return value

    def getitem(self, obj, argument):
        _check_time()
        return super().getitem(obj, argument)

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (jinja's signature)
        _check_time()
        owner = getattr(__obj, "__self__", None)
        if isinstance(owner, (str, list, tuple, dict)):
            _check_call_args(getattr(__obj, "__name__", "a method"), owner, args, kwargs)
        out = super().call(__context, __obj, *args, **kwargs)
        _check_size(_size(out), "a value")
        return out

    def call_binop(self, context, operator, left, right):
        _check_time()
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if _size(seq) and isinstance(n, int) and not isinstance(n, bool):
                    _check_size(_size(seq) * n, "a repeated value")
            if isinstance(left, int) and isinstance(right, int):
                self._check_bits(abs(left).bit_length() + abs(right).bit_length())
        elif operator == "+":
            if _size(left) and _size(right):
                _check_size(_size(left) + _size(right), "a concatenation")
        elif operator == "**":
            if isinstance(left, int) and isinstance(right, int) and right > 0 and abs(left) > 1:
                self._check_bits(abs(left).bit_length() * min(right, MAX_INT_BITS + 1))
        elif operator == "%" and isinstance(left, str):
            _check_format(left, right if isinstance(right, tuple) else
                          list(right.values()) if isinstance(right, dict) else [right])
        out = super().call_binop(context, operator, left, right)
        _check_size(_size(out), "a value")
        return out

    @staticmethod
    def _check_bits(bits: int) -> None:
        if bits > MAX_INT_BITS:
            raise ChatTemplateBudgetError(f"the chat template computes a number of about {bits} bits, over the "
                                          f"limit of {MAX_INT_BITS}")


class _GenerationBlock(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}`` marks assistant text; rendered as its body."""
    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Jinja's own tojson escapes <, >, & and ' for HTML; chat templates need the plain JSON text.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


class _Dict:
    """``dict(...)`` and ``dict.fromkeys(...)`` for templates, without exposing the dict type itself."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


class _Namespace(jinja2.utils.Namespace):
    """Jinja's namespace, refusing underscore-prefixed attribute names (no route to interpreter internals)."""

    def __init__(*args, **kwargs):
        self, attrs = args[0], dict(*args[1:], **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _Namespace._check(name)
        _check_time()
        _check_size(_size(value), "a value")
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"a chat template may not set the namespace attribute {name!r}")


@lru_cache(maxsize=32)
def compile_template(template: str) -> jinja2.Template:
    """The compiled template (cached); raises ``jinja2.TemplateSyntaxError`` on a malformed one."""
    env = _BudgetSandbox(trim_blocks=True, lstrip_blocks=True,
                         extensions=[_GenerationBlock, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.filters = {name: _budget_filter(name, fn) for name, fn in env.filters.items()}
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now, dict=_Dict(),
                       namespace=_Namespace, range=_budget_range)
    return env.from_string(template)


class _Watchdog:
    """Raises :class:`_DeadlinePassed` in this thread once the deadline passes (interrupts a loop that
    calls nothing the sandbox sees); cancelled, and never fired, once the rendering is over."""

    def __init__(self, seconds: float):
        self._tid = threading.get_ident()
        self._lock = threading.Lock()
        self._done = False
        self._timer = threading.Timer(seconds, self._fire)
        self._timer.daemon = True

    def _fire(self):
        with self._lock:
            if not self._done:
                ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(self._tid), ctypes.py_object(_DeadlinePassed))

    def __enter__(self):
        self._timer.start()
        return self

    def __exit__(self, *exc):
        self._timer.cancel()
        with self._lock:
            self._done = True
        return False


def render(template: jinja2.Template, **variables) -> str:
    """``template.render(**variables)`` under the time and size budget."""
    outer = getattr(_state, "end", None)
    _state.end = time.monotonic() + RENDER_DEADLINE_S if outer is None else outer
    try:
        with _Watchdog(RENDER_DEADLINE_S):
            parts, total = [], 0
            for piece in template.generate(**variables):
                total += len(piece)
                _check_size(total, "an output")
                parts.append(piece)
            return "".join(parts)
    except RecursionError:
        raise ChatTemplateBudgetError("the chat template recursed too deeply") from None
    except MemoryError:
        raise ChatTemplateBudgetError("the chat template ran out of memory") from None
    finally:
        _state.end = outer
