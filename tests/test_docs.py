"""The documentation site: its reference pages are generated from the code (docs/hooks/reference.py, an
mkdocs hook), so every command, flag, config key, KD method and model name is in them; every page is in
the navigation. CI builds the site with ``mkdocs build --strict`` (no broken link, no missing page)."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
import yaml

from mixkd.cli import build_parser
from mixkd.config import RunConfig
from mixkd.distiller import method_names
from mixkd.models import available_models
from mixkd.registry import KD_METHODS
from mixkd.tracking import flat_params

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def reference():
    spec = importlib.util.spec_from_file_location("docs_reference", ROOT / "docs" / "hooks" / "reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_command_line_reference_has_every_command_and_flag(reference):
    page = reference.page("reference/cli.md")
    names = [name for name, _ in reference.commands(build_parser())]
    assert {"mixkd", "mixkd train", "mixkd distill", "mixkd eval", "mixkd analyze", "mixkd models", "mixkd demo",
            "mixkd claims", "mixkd study", "mixkd study plan", "mixkd study run", "mixkd study status",
            "mixkd study report"} <= set(names)
    for name, parser in reference.commands(build_parser()):
        section = page.split(f"## `{name}`\n", 1)[1].split("\n## ", 1)[0]
        for action in parser._actions:
            for option in action.option_strings:
                assert option in section, (name, option)
    assert "--track {none,mlflow,wandb}" in page and "--kd OPT_KD__METHOD" in page


def test_the_config_reference_has_every_key_with_its_default_flag_and_range(reference):
    page = reference.page("reference/config.md")
    keys = flat_params(RunConfig().model_dump(mode="json"))
    main, settings = page.split("## The KD methods' settings")
    rows = {line.split("`")[1]: line for line in main.splitlines() if line.startswith("| `")}
    assert set(rows) == {k for k in keys if k not in {f"kd.{s}" for s in RunConfig().kd.params()}}
    for method in method_names(None):  # every setting of every method, with its range
        for name in KD_METHODS.get(method).settings.model_fields:
            assert f"| `kd.{name}` | `{method}` | " in settings, (method, name)
    assert "| `kd.beta` | `dkd` | float | [0, 1000] | weight of NCKD" in settings
    assert rows["mix.fraction"] == ("| `mix.fraction` | `--mix-fraction` | `1.0` | float | [0, 1] | share of each batch "
                                    "that is mixed (1 = full mixup) |")
    assert rows["track.backend"].startswith("| `track.backend` *machine* | `--track` | `none` | one of none, mlflow, wandb |")
    assert rows["optim.momentum"] == "| `optim.momentum` | `--momentum` | `0.9` | float | [0, 1) | SGD momentum |"


def test_the_methods_reference_has_every_registered_method_with_its_defaults(reference):
    page = reference.page("reference/methods.md")
    rows = {line.split("`")[1]: line for line in page.splitlines() if line.startswith("| `")}
    assert set(rows) == set(method_names(None)) >= {"alone", "kd", "std", "dkd", "lskd", "dist", "fitnet"}
    assert rows["dkd"].startswith("| `dkd` | DKD | `kd.temperature` 4, `kd.ce_weight` 1, `kd.kd_weight` 1, `kd.standardize` false, `kd.alpha` 1, "
                                  "`kd.beta` 8, `kd.warmup_epochs` 20 | dataset=imagefolder: temperature 1, ce_weight 1, "
                                  "beta 0.5, warmup_epochs 1; pair=resnet56->resnet20: beta 2;")
    assert "(no settings)" in rows["alone"] and "| `kd` | KD | `kd.temperature` 4, `kd.ce_weight` 0.1" in rows["kd"]


def test_the_model_reference_has_every_model(reference):
    page = reference.page("reference/models.md")
    rows = [line.split("`")[1] for line in page.splitlines() if line.startswith("| `")]
    assert rows == available_models()
    assert "| `MobileNetV2` | 0.01 |" in page and "| `resnet32x4` | 0.05 |" in page


def test_every_page_is_in_the_navigation_and_every_entry_exists(reference):
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())

    def entries(nav):
        for item in nav:
            for value in item.values():
                yield from entries(value) if isinstance(value, list) else [value]

    listed = list(entries(config["nav"]))
    pages = {str(p.relative_to(ROOT / "docs")) for p in (ROOT / "docs").rglob("*.md")} | set(reference.PAGES)
    assert sorted(listed) == sorted(pages)
    assert {"methods.md", "augmentation.md", "models.md"} <= set(listed)
    assert config["hooks"] == ["docs/hooks/reference.py"] and config["strict"] is True


def test_the_readme_is_one_screen_or_two_with_the_two_commands_and_links_into_the_site():
    readme = (ROOT / "README.md").read_text()
    lines = readme.splitlines()
    assert len(lines) <= 150
    assert lines[:5] == ["# mixkd", "", "```bash", "pip install -e . && mixkd demo",
                         "pip install -e '.[dev]' && python -m pytest -q"]
    links = re.findall(r"\]\((docs/[^)#]+)(?:#[^)]*)?\)", readme)
    assert len(links) >= 10 and all((ROOT / link).is_file() for link in links), links
