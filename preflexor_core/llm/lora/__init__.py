"""LoRA adapters for the Llama model: wrap, trainable token rows, merge / unmerge, disable, PEFT files.

    cfg = LoRAConfig(r=64, alpha=64, trainable_token_indices=model.new_token_ids)
    apply_lora(model, cfg); save_adapter(model, "out/adapter", cfg); load_adapter(model2, "out/adapter")
    merge_lora(model)

``layers.py`` (the modules), ``adapters.py`` (config, apply, disable, merge), ``peft_io.py`` (files).
Tests: ``python -m pytest -q tests/test_lora.py``
"""
from .adapters import (DEFAULT_TARGETS, LoRAConfig, apply_lora, config_from_model, count_trainable_parameters,
                       disable_adapters, lora_modules, lora_state_dict, merge_lora, token_row_targets)
from .layers import LoRAEmbedding, LoRALinear, TokenRowsEmbedding, TokenRowsLinear
from .peft_io import (ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, PEFT_PREFIX, load_adapter, load_adapter_config,
                      save_adapter)

__all__ = ["LoRAConfig", "LoRALinear", "LoRAEmbedding", "TokenRowsEmbedding", "TokenRowsLinear", "apply_lora",
           "merge_lora", "disable_adapters", "lora_modules", "lora_state_dict", "save_adapter", "load_adapter",
           "load_adapter_config", "count_trainable_parameters", "config_from_model", "token_row_targets",
           "DEFAULT_TARGETS", "ADAPTER_CONFIG_NAME", "ADAPTER_WEIGHTS_NAME", "PEFT_PREFIX"]
