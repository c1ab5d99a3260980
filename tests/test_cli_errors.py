"""run_cli (one-line ``error: ...`` with exit code 2, PREFLEXOR_DEBUG=1 traceback) and check_device.

    python -m pytest -q tests/test_cli_errors.py
"""
import json
import os
import subprocess
import sys

import pytest
import torch

from preflexor_core import ModelConfig
from preflexor_core.llm.config_fields import ConfigError
from preflexor_core.infra.errors import (DEBUG_ENV, DeviceError, PreflexorError, check_device, is_project_error,
                                         register_error, run_cli)


@pytest.fixture(autouse=True)
def no_debug(monkeypatch):
    monkeypatch.delenv(DEBUG_ENV, raising=False)


def raising(exc):
    def main(argv=None):
        raise exc
    return main


def test_success_returns_the_main_code_and_passes_argv():
    seen = []
    assert run_cli(lambda argv: seen.append(argv) or 0, ["--x", "1"]) == 0
    assert seen == [["--x", "1"]]
    assert run_cli(lambda argv: None) == 0
    assert run_cli(lambda argv: 3) == 3


@pytest.mark.parametrize("exc", [
    PreflexorError("bad thing in x.json"),
    ConfigError("x/config.json: rms_norm_eps is null, expected a number > 0"),
    DeviceError("--device 'bogus': not a device"),
    FileNotFoundError(2, "No such file or directory", "qs.txt"),
    PermissionError(13, "Permission denied", "/out/trace.json"),
])
def test_project_errors_print_one_line_and_exit_2(capsys, exc):
    assert run_cli(raising(exc)) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err == f"error: {exc}\n"
    assert "Traceback" not in err


def test_existing_error_classes_are_accepted():
    from preflexor_core.llm.checkpoint import CheckpointError
    from preflexor_core.tokenization.errors import TokenizerError
    for cls in (CheckpointError, TokenizerError):
        assert is_project_error(cls("m")), cls
        assert run_cli(raising(cls("m"))) == 2, cls


def make_class(name, module, base=ValueError):
    return type(name, (base,), {"__module__": module})


@pytest.mark.parametrize("module", ["preflexor_core.datagen.pairs_io", "preflexor_core.teachers.base",
                                    "preflexor_core"])
def test_any_package_error_class_and_its_subclasses_are_accepted(module):
    base = make_class("DatagenError", module)
    sub = make_class("PairsFileError", module, base)
    outside = make_class("Sub", "somewhere_else", base)      # a subclass elsewhere still counts (MRO)
    for cls in (base, sub, outside):
        assert is_project_error(cls("m")) and run_cli(raising(cls("m"))) == 2, cls


@pytest.mark.parametrize("name,module", [("DatagenError", "other_pkg.datagen"),
                                         ("DatagenError", "preflexor_core_extra"),
                                         ("UnclosedThinking", "preflexor_core.losses.masks")])
def test_other_classes_are_not_accepted(name, module):
    cls = make_class(name, module)
    assert not is_project_error(cls("m"))
    with pytest.raises(cls):
        run_cli(raising(cls("m")))


def test_a_multi_line_message_becomes_one_line(capsys):
    assert run_cli(raising(PreflexorError("first line\n  second line\n"))) == 2
    assert capsys.readouterr().err == "error: first line second line\n"


def test_unknown_preset_key_error_is_not_quoted(capsys):
    assert run_cli(lambda argv: ModelConfig.preset("Tiny")) == 2
    assert capsys.readouterr().err.startswith("error: unknown preset 'Tiny'; available: [")


@pytest.mark.parametrize("exc", [ValueError("shape mismatch"), RuntimeError("boom"), KeyError("k"),
                                 ZeroDivisionError()])
def test_bugs_keep_their_traceback(exc):
    assert not is_project_error(exc)
    with pytest.raises(type(exc)):
        run_cli(raising(exc))


def test_debug_env_reraises_project_errors(monkeypatch):
    monkeypatch.setenv(DEBUG_ENV, "1")
    with pytest.raises(ConfigError, match="rms_norm_eps"):
        run_cli(raising(ConfigError("rms_norm_eps is null")))
    monkeypatch.setenv(DEBUG_ENV, "0")
    assert run_cli(raising(ConfigError("rms_norm_eps is null"))) == 2


def test_extra_and_registered_error_classes(capsys):
    class InputError(ValueError):
        pass

    with pytest.raises(InputError):
        run_cli(raising(InputError("--questions file not found: q.txt")))
    assert run_cli(raising(InputError("--questions file not found: q.txt")), errors=(InputError,)) == 2
    assert capsys.readouterr().err == "error: --questions file not found: q.txt\n"

    @register_error
    class OtherInputError(ValueError):
        pass

    assert run_cli(raising(OtherInputError("x"))) == 2
    with pytest.raises(TypeError, match="expects an exception class"):
        register_error("not a class")


def test_system_exit_and_interrupt(capsys):
    assert run_cli(raising(SystemExit(2))) == 2          # argparse's ap.error
    assert run_cli(raising(SystemExit(None))) == 0
    assert run_cli(raising(SystemExit("fatal: stop"))) == 1
    assert capsys.readouterr().err == "fatal: stop\n"
    assert run_cli(raising(KeyboardInterrupt())) == 130
    assert capsys.readouterr().err == "error: interrupted\n"


def test_a_real_cli_process_prints_one_line(tmp_path):
    """End to end: a bad config.json in a subprocess gives one stderr line and exit code 2 (traceback with DEBUG)."""
    bad = tmp_path / "config.json"
    bad.write_text(json.dumps({"model_type": "llama", "hidden_size": 64, "num_attention_heads": 0}))
    code = ("import sys; from preflexor_core import ModelConfig; from preflexor_core.infra.errors import run_cli; "
            f"sys.exit(run_cli(lambda argv: ModelConfig.from_json_file({str(bad)!r})))")
    env_off = {k: v for k, v in os.environ.items() if k != DEBUG_ENV}
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env_off)
    assert p.returncode == 2
    assert p.stderr == f"error: {bad}: num_attention_heads is 0, expected an integer >= 1\n"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**env_off, DEBUG_ENV: "1"})
    assert p.returncode == 1 and "Traceback" in p.stderr and "ConfigError" in p.stderr


# ------------------------------------------------------------------------------------------ devices
def test_device_cpu_and_auto_pass_through():
    assert check_device("cpu") == "cpu"
    assert check_device("cpu:0") == "cpu:0"
    assert check_device("auto") == "auto"
    assert check_device(None) is None


@pytest.mark.parametrize("spec,expected", [
    ("bogus", "--device 'bogus': not a device; expected auto, cpu, cuda or cuda:N"),
    ("CPU", "--device 'CPU': not a device"),
    ("", "--device '': not a device"),
    ("cuda:x", "--device 'cuda:x': not a device"),
    ("meta", "--device 'meta': device type 'meta' is not supported"),
    ("mps", "--device 'mps': device type 'mps' is not supported"),
])
def test_bad_device_strings(spec, expected):
    with pytest.raises(DeviceError) as info:
        check_device(spec)
    assert str(info.value).startswith(expected)
    assert isinstance(info.value, PreflexorError) and is_project_error(info.value)


def test_device_flag_name_is_used():
    with pytest.raises(DeviceError, match=r"^--critic-device 'gpu': not a device"):
        check_device("gpu", flag="--critic-device")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
@pytest.mark.parametrize("spec", ["cuda", "cuda:0"])
def test_cuda_without_cuda_is_refused(spec):
    with pytest.raises(DeviceError) as info:
        check_device(spec)
    msg = str(info.value)
    assert msg.startswith(f"--device {spec!r}: ") and "use --device cpu" in msg
    if torch.version.cuda is None:
        assert f"this torch build ({torch.__version__}) has no CUDA support" in msg
    else:
        assert "torch sees no CUDA device" in msg


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_index_out_of_range_is_refused():
    n = torch.cuda.device_count()
    assert check_device("cuda") == "cuda" and check_device("cuda:0") == "cuda:0"
    with pytest.raises(DeviceError, match=f"only {n} CUDA device"):
        check_device(f"cuda:{n}")
