"""preflexor: PRefLexOR (arXiv 2410.12375) from scratch on torch + triton.

Public entry points: ``Llama``, ``ModelConfig``, ``Tokenizer``. See DESIGN/README for the rest.
"""
from .llm.config import ModelConfig
from .llm.model import Llama
from .tokenization.tokenizer import Tokenizer

__all__ = ["Llama", "ModelConfig", "Tokenizer"]
__version__ = "0.1.0"

