"""`striped-attention env`: the machine as the library sees it."""

from __future__ import annotations

import json
from pathlib import Path

import torch

import striped_attention
from striped_attention import kernels
from striped_attention.cli import main as cli_main
from striped_attention.env import auto_kernels


def _sixteen_bit() -> str:
    """What "auto" runs 16-bit CPU blocks on here."""
    return "torch CPU flash" if kernels.torch_cpu_has_16_bit_tiles() else "own CPU kernel on float32 copies"


def test_env_names_versions_kernels_and_backends(capsys):
    assert cli_main(["env"]) == 0
    text = capsys.readouterr().out
    assert f"torch {torch.__version__}" in text
    assert f"striped-attention {striped_attention.__version__} ({Path(striped_attention.__file__).parent})" in text
    assert f"CPU: {torch.backends.cpu.get_cpu_capability()} vector unit" in text
    assert "float32 -> own CPU kernel," in text and f"bfloat16 -> {_sixteen_bit()}" in text
    assert "process groups: gloo" in text


def test_env_json_is_one_object(capsys):
    assert cli_main(["env", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["torch"] == torch.__version__ and "gloo" in info["process_group_backends"]
    assert info["cpu"]["own_kernel"]["file"] == kernels.cpu_extension().__file__
    assert len(info["gpus"]) == (torch.cuda.device_count() if torch.cuda.is_available() else 0)


def test_auto_kernels_follow_the_selection():
    assert auto_kernels(torch.device("cpu")) == {
        "float32": "own CPU kernel", "bfloat16": _sixteen_bit(), "float16": _sixteen_bit(),
    }
    assert set(auto_kernels(torch.device("meta")).values()) == {"reference (pure PyTorch)"}  # no fused kernel there
