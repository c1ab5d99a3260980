"""The tokenization room's error: a tokenizer that cannot be read, a template that cannot render,
untrusted text that cannot be made plain. A leaf module, so that the tokenizer and the modules it
uses (control_text) raise the same class without importing each other."""
from __future__ import annotations


class TokenizerError(ValueError):
    pass
