"""What an installed mixkd says of itself (``mixkd --version``) and what its wheel holds (CI builds the
wheel and trains from it in a fresh virtual environment: .ci/run)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import mixkd

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib
from mixkd.cli import cudnn_text, main

ROOT = Path(__file__).resolve().parent.parent


def test_version_prints_mixkd_torch_and_the_cuda_it_sees(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    first, second = capsys.readouterr().out.strip().splitlines()
    assert first == f"mixkd {mixkd.__version__} (at {Path(mixkd.__file__).resolve().parent})"
    assert second.startswith(f"torch {torch.__version__}, torchvision ")
    if torch.version.cuda is None:
        assert second.endswith("CUDA: none (a CPU build of torch)")
    else:
        assert f"CUDA {torch.version.cuda} ({torch.cuda.device_count()} GPU(s) seen" in second and "cuDNN " in second


@pytest.mark.parametrize("number, text", [(92400, "9.24.0"), (90100, "9.1.0"), (8902, "8.9.2"), (7605, "7.6.5"),
                                          (None, "not available")])
def test_cudnn_version_numbers_are_written_out(number, text):
    assert cudnn_text(number) == text


def test_every_package_and_config_ships_in_the_wheel():
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    packages = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "mixkd").rglob("__init__.py")}
    assert packages | {"mixkd.configs"} == set(setuptools["packages"])
    shipped = setuptools["package-data"]["mixkd.configs"]
    configs = [p.relative_to(ROOT / "configs") for p in (ROOT / "configs").rglob("*") if p.is_file()]
    assert configs and all(any(c.match(pattern) for pattern in shipped) for c in configs)
