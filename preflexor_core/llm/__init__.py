"""The model core: one decoder for every supported family, its files and its compiled ops.

``config`` (+ ``config_fields``: ``ModelConfig``, presets, HF ``config.json`` round trip), ``families``
(each family's options), ``model`` (``Llama``), ``attention``, ``rope``, ``ops`` (the compiled csrc ops
and their torch fallbacks), ``cpu_features`` (ISA paths), ``checkpoint`` (safetensors in HF naming),
``limits`` (model sizes bounded before loading), ``gguf/`` (GGUF config, weights and writing), ``lora/``
(LoRA adapters in PEFT's format), ``vocab`` (thinking tokens in the vocabulary), ``registry`` (named
models, model resolution, dtypes) and ``convert`` (HF folder <-> GGUF; run ``python -m preflexor_core.convert``).
"""
