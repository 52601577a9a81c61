"""What some tests need beyond mixkd's own dependencies (MLflow, W&B, a browser): where one is missing,
the test is skipped with what to install, except under CI (``.ci/run`` sets ``MIXKD_CI=1`` and installs
them all), where a missing one fails the test: CI never skips them silently."""

from __future__ import annotations

import importlib
import os
import shutil

import pytest


def _missing(what: str) -> None:
    if os.environ.get("MIXKD_CI") == "1":
        pytest.fail(f"{what} is missing under CI (.ci/run installs it)")
    pytest.skip(f"{what} is not installed here", allow_module_level=True)


def need_module(name: str, install: str):
    """The module ``name``, imported; missing: skipped (``install`` says how to get it), failed under CI."""
    try:
        return importlib.import_module(name)
    except ImportError:
        _missing(f"{name} ({install})")


def need_chromium() -> str:
    """The path of Debian's headless-capable ``chromium``; missing: skipped, failed under CI."""
    found = shutil.which("chromium")
    if found is None:
        _missing("chromium (apt-get install chromium)")
    return found
