"""ModelConfig validation: every class of bad field gives one ConfigError naming file, field, value, range.

Also checks that every preset and real HF Llama config.json values (SmolLM2-135M-Instruct,
Llama-3.2-3B-Instruct, as published on their model cards) still validate.

    python -m pytest -q tests/test_config.py
"""
import json

import pytest

from preflexor_core import Llama, ModelConfig
from preflexor_core.llm.config import PRESETS, UnknownPresetError
from preflexor_core.llm.config_fields import ConfigError
from preflexor_core.infra.errors import PreflexorError

# config.json of HuggingFaceTB/SmolLM2-135M-Instruct (values as published).
SMOLLM2_135M = {
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu", "hidden_size": 576,
    "initializer_range": 0.041666666666666664, "intermediate_size": 1536, "is_llama_config": True,
    "max_position_embeddings": 8192, "mlp_bias": False, "model_type": "llama", "num_attention_heads": 9,
    "num_hidden_layers": 30, "num_key_value_heads": 3, "pad_token_id": 2, "pretraining_tp": 1,
    "rms_norm_eps": 1e-05, "rope_interleaved": False, "rope_scaling": None, "rope_theta": 100000,
    "tie_word_embeddings": True, "torch_dtype": "bfloat16", "transformers_version": "4.42.3",
    "use_cache": True, "vocab_size": 49152,
}
# config.json of meta-llama/Llama-3.2-3B-Instruct (values as published).
LLAMA32_3B = {
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009], "head_dim": 128, "hidden_act": "silu",
    "hidden_size": 3072, "initializer_range": 0.02, "intermediate_size": 8192,
    "max_position_embeddings": 131072, "mlp_bias": False, "model_type": "llama", "num_attention_heads": 24,
    "num_hidden_layers": 28, "num_key_value_heads": 8, "pretraining_tp": 1, "rms_norm_eps": 1e-05,
    "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
    "transformers_version": "4.45.0.dev0", "use_cache": True, "vocab_size": 128256,
}
SMALL = dict(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2)


def load_error(tmp_path, **changes) -> str:
    """Write SMALL + changes as a config.json, load it, return the ConfigError message."""
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model_type": "llama", **SMALL, **changes}))
    with pytest.raises(ConfigError) as info:
        ModelConfig.from_json_file(str(path))
    msg = str(info.value)
    assert msg.startswith(f"{path}: "), msg          # the file comes first
    assert "\n" not in msg
    return msg


def test_config_error_is_a_project_error_and_a_value_error():
    assert issubclass(ConfigError, PreflexorError) and issubclass(ConfigError, ValueError)
    with pytest.raises(PreflexorError):
        ModelConfig(hidden_size=64, num_attention_heads=0)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_validates_and_round_trips(name):
    cfg = ModelConfig.preset(name)
    assert ModelConfig.from_hf_dict(json.loads(json.dumps(cfg.to_hf_dict()))) == cfg
    assert cfg.replace(vocab_size=cfg.vocab_size + 1).vocab_size == cfg.vocab_size + 1


def test_real_hf_llama_configs_validate(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(SMOLLM2_135M))
    smol = ModelConfig.from_json_file(str(path))
    assert (smol.head_dim, smol.num_attention_heads // smol.num_key_value_heads, smol.rope_scaling) == (64, 3, None)
    assert smol.rope_theta == 100000.0 and isinstance(smol.rope_theta, float)    # int in the JSON
    assert Llama(smol, device="meta").num_parameters() == 134_515_008
    llama = ModelConfig.from_hf_dict(LLAMA32_3B)
    assert Llama(llama, device="meta").num_parameters() == 3_212_749_824
    assert llama.rope_scaling["rope_type"] == "llama3" and llama.eos_token_ids == [128001, 128008, 128009]
    # transformers >= 5 writes theta and scaling together as rope_parameters, and may write null dtypes.
    new_style = {k: v for k, v in LLAMA32_3B.items() if k not in ("rope_scaling", "rope_theta", "torch_dtype")}
    new_style.update(rope_parameters={**LLAMA32_3B["rope_scaling"], "rope_theta": 500000.0}, dtype=None,
                     torch_dtype=None)
    assert ModelConfig.from_hf_dict(new_style).replace(torch_dtype="bfloat16") == llama


@pytest.mark.parametrize("field,value,expected", [
    ("rms_norm_eps", None, "rms_norm_eps is null, expected a number > 0"),
    ("rms_norm_eps", 0, "rms_norm_eps is 0, expected a number > 0"),
    ("rope_theta", "10000", 'rope_theta is "10000", expected a number > 0'),
    ("initializer_range", -0.1, "initializer_range is -0.1, expected a number >= 0"),
    ("num_hidden_layers", 2.5, "num_hidden_layers is 2.5, expected an integer >= 1"),
    ("num_hidden_layers", True, "num_hidden_layers is true, expected an integer >= 1"),
    ("num_attention_heads", 4.0, "num_attention_heads is 4.0, expected an integer >= 1"),
    ("vocab_size", [100], "vocab_size is [100], expected an integer >= 1"),
    ("max_position_embeddings", -1, "max_position_embeddings is -1, expected an integer >= 1"),
    ("num_key_value_heads", "2", 'num_key_value_heads is "2", expected an integer >= 1 or null'),
    ("head_dim", 0, "head_dim is 0, expected an integer >= 1 or null"),
    ("tie_word_embeddings", "yes", 'tie_word_embeddings is "yes", expected true or false'),
    ("eos_token_id", [1, "2"], 'eos_token_id[1] is "2", expected an integer >= 0'),
    ("bos_token_id", -5, "bos_token_id is -5, expected an integer >= 0 or null"),
    ("pad_token_id", 1.5, "pad_token_id is 1.5, expected an integer or null"),
    ("torch_dtype", "int8", 'torch_dtype is "int8", expected one of'),
])
def test_wrong_type_or_range_names_file_field_value_and_allowed(tmp_path, field, value, expected):
    assert expected in load_error(tmp_path, **{field: value})


@pytest.mark.parametrize("field", ["num_attention_heads", "num_key_value_heads", "hidden_size",
                                   "intermediate_size", "num_hidden_layers", "vocab_size"])
def test_zero_is_refused_for_every_size(tmp_path, field):
    assert f"{field} is 0, expected an integer >= 1" in load_error(tmp_path, **{field: 0})


def test_divisibility(tmp_path):
    msg = load_error(tmp_path, num_attention_heads=4, num_key_value_heads=3)
    assert "num_attention_heads=4 must be a multiple of num_key_value_heads=3" in msg
    msg = load_error(tmp_path, hidden_size=66, num_attention_heads=4)
    assert "hidden_size=66 is not divisible by num_attention_heads=4; set head_dim" in msg
    assert ModelConfig(**{**SMALL, "hidden_size": 66, "head_dim": 16}).head_dim == 16   # explicit head_dim: fine
    assert "head_dim=15 must be even" in load_error(tmp_path, head_dim=15)


@pytest.mark.parametrize("scaling,expected", [
    ([1, 2], "rope_scaling is [1, 2], expected an object like"),
    ("llama3", 'rope_scaling is "llama3", expected an object like'),
    ({"rope_type": "yarn", "factor": 2.0}, "rope_scaling type 'yarn' is not supported"),
    ({"rope_type": 3}, "rope_scaling type 3 is not supported"),
    ({"rope_type": "llama3", "factor": 8.0}, "rope_scaling of type 'llama3' is missing key 'low_freq_factor'"),
    ({**LLAMA32_3B["rope_scaling"], "factor": None}, "rope_scaling.factor is null, expected a number > 0"),
    ({**LLAMA32_3B["rope_scaling"], "factor": -2.0}, "rope_scaling.factor is -2.0, expected a number > 0"),
    ({**LLAMA32_3B["rope_scaling"], "high_freq_factor": 1.0},
     "rope_scaling.high_freq_factor is 1.0, expected a number > 1"),
    ({**LLAMA32_3B["rope_scaling"], "original_max_position_embeddings": 8192.5},
     "rope_scaling.original_max_position_embeddings is 8192.5, expected an integer >= 1"),
])
def test_rope_scaling_shape(tmp_path, scaling, expected):
    assert expected in load_error(tmp_path, rope_scaling=scaling)


def test_rope_parameters_and_legacy_type_key(tmp_path):
    assert "rope_parameters is [1], expected an object" in load_error(tmp_path, rope_parameters=[1])
    assert "rope_parameters.factor is null" in load_error(
        tmp_path, rope_parameters={**LLAMA32_3B["rope_scaling"], "factor": None})
    legacy = {k: v for k, v in LLAMA32_3B["rope_scaling"].items() if k != "rope_type"}
    cfg = ModelConfig(**SMALL | {"rope_scaling": {**legacy, "type": "llama3"}})
    assert cfg.rope_scaling == LLAMA32_3B["rope_scaling"]       # "type" -> "rope_type"
    assert ModelConfig(**SMALL | {"rope_scaling": {"type": "default"}}).rope_scaling is None


def test_bad_files(tmp_path):
    path = tmp_path / "config.json"
    path.write_text("[1, 2]")
    with pytest.raises(ConfigError, match=r"config\.json: the top level is \[1, 2\], expected an object"):
        ModelConfig.from_json_file(str(path))
    path.write_bytes(b"\x89PNG\r\n\x1a\n\x00")
    with pytest.raises(ConfigError, match=r"config\.json: not UTF-8 text"):
        ModelConfig.from_json_file(str(path))
    path.write_text('{"hidden_size": 64,')
    with pytest.raises(ConfigError, match=r"config\.json: not valid JSON"):
        ModelConfig.from_json_file(str(path))
    assert 'architectures is "LlamaForCausalLM", expected a list' in load_error(
        tmp_path, architectures="LlamaForCausalLM")


def test_kwargs_and_replace_are_validated_without_a_file_prefix():
    with pytest.raises(ConfigError, match=r"^num_attention_heads is 0, expected an integer >= 1$"):
        ModelConfig(hidden_size=64, num_attention_heads=0)
    with pytest.raises(ConfigError, match=r"^rms_norm_eps is null"):
        ModelConfig.preset("tiny").replace(rms_norm_eps=None)


def test_unknown_preset_is_a_config_error_and_a_key_error():
    with pytest.raises(UnknownPresetError) as info:
        ModelConfig.preset("Tiny")
    assert isinstance(info.value, KeyError) and isinstance(info.value, ConfigError)
    assert str(info.value).startswith("unknown preset 'Tiny'; available: [")     # not quoted like a KeyError
