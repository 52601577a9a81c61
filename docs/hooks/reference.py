"""An mkdocs hook: the reference pages (command line, config keys, KD methods, model names) written from
the code at every build, so they cannot drift from the program.

Each page comes from mixkd's public functions: the argparse parser (:func:`mixkd.cli.build_parser`), the
pydantic models of the config (:class:`mixkd.config.RunConfig`, :func:`mixkd.config.value_range`), the
registry of KD methods (:func:`kd_methods`, the one function that reads it) and the model zoo
(:func:`mixkd.models.available_models`). ``tests/test_docs.py`` checks that every flag, key, method and
model appears; ``mkdocs build --strict`` (CI) that every page and link resolves.
"""

from __future__ import annotations

import argparse
import inspect
import json
import re
import typing
from typing import Any

from pydantic import BaseModel

PAGES = {"reference/cli.md": "cli_page", "reference/config.md": "config_page",
         "reference/methods.md": "methods_page", "reference/models.md": "models_page"}
GENERATED = "*Generated from the code at every build of this site ({source}): edit the code, not this page.*"


# ---- the command line --------------------------------------------------------------------------


def _setting(value) -> str:
    """A setting's default as a config file spells it: booleans true/false, numbers short (4, 0.5)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return f"{value:g}" if isinstance(value, (int, float)) else str(value)

def commands(parser: argparse.ArgumentParser, prefix: str = "mixkd") -> list[tuple[str, argparse.ArgumentParser]]:
    """(``mixkd train``, its parser), ... for every command and subcommand, depth first."""
    found = [(prefix, parser)]
    for action in parser._actions:  # argparse keeps its subcommands in the _SubParsersAction's choices
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found += commands(sub, f"{prefix} {name}")
    return found


def cli_page() -> str:
    from mixkd.cli import build_parser

    lines = ["# Command line", "", GENERATED.format(source="`mixkd.cli.build_parser()`, each command's `--help`"), ""]
    for name, parser in commands(build_parser()):
        parser.formatter_class = lambda prog: argparse.HelpFormatter(prog, width=110, max_help_position=32)
        lines += [f"## `{name}`", "", "```text", parser.format_help().rstrip(), "```", ""]
    return "\n".join(lines)


# ---- config keys -------------------------------------------------------------------------------

def config_keys(model: type[BaseModel] = None, prefix: str = "") -> list[tuple[str, Any, str, str]]:
    """(dotted key, default, type, description) of every key of :class:`mixkd.config.RunConfig`."""
    from mixkd.config import RunConfig

    model = model or RunConfig
    rows = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        if inspect.isclass(field.annotation) and issubclass(field.annotation, BaseModel):
            rows += config_keys(field.annotation, key + ".")
        else:
            if typing.get_origin(field.annotation) is typing.Literal:
                kind = "one of " + ", ".join(map(str, typing.get_args(field.annotation)))
            else:
                kind = getattr(field.annotation, "__name__", None) or str(field.annotation).replace("typing.", "")
            rows.append((key, field.get_default(call_default_factory=True), kind, field.description or ""))
    return rows


def _cell(text: Any) -> str:
    """Table-cell text: reST's ``code`` and :role:`name` as Markdown code, no pipes, one line."""
    text = re.sub(r":[a-z]+:`~?([^`]+)`", r"`\1`", str(text)).replace("``", "`")
    return text.replace("|", "\\|").replace("\n", " ")


def flags() -> dict[str, tuple[str, str]]:
    """Config key -> (its command-line flags, their help) for the keys that have a flag."""
    from mixkd.cli import DISTILL_OPTIONS, RUN_OPTIONS

    found = {"model": ("--model / --student", "")}
    for names, key, _, text in DISTILL_OPTIONS + RUN_OPTIONS:
        found[key] = (" / ".join(names), text.replace("%%", "%"))
    return found


def config_page() -> str:
    from mixkd.config import MACHINE_KEYS, machine_key, value_range

    lines = ["# Config keys", "", GENERATED.format(source="the pydantic models of `mixkd.config`"), "",
             "Every key can be given in a `--config` YAML file (sections as mappings: `mix: {fraction: 0.1}`), "
             "as a flag where one exists (see [the command line](cli.md)), or as a `key=value` override after "
             "the flags (`mix.fraction=0.1`); a study file sets them under `defaults:` and `recipe:`. Keys marked "
             f"*machine* ({', '.join(MACHINE_KEYS)}) describe the machine, not the run: a resumed run may change "
             "them. Tracked runs (`track:`) log every other key as a parameter under these names.", "",
             "| key | flag | default | type | valid | description |", "|---|---|---|---|---|---|"]
    given = flags()
    for key, default, kind, text in config_keys():
        shown = json.dumps(default) if not isinstance(default, str) else default
        note = " *machine*" if machine_key(key) else ""
        flag, help_text = given.get(key, ("", ""))
        lines.append(f"| `{key}`{note} | {f'`{flag}`' if flag else ''} | `{_cell(shown)}` | {_cell(kind)} | "
                     f"{_cell(value_range(key) or '')} | {_cell(text or help_text)} |")
    lines += ["", "## The KD methods' settings", "",
              "`kd.<setting>` keys depend on `kd.method`: each method has its own typed settings (a key it does "
              "not have is refused). Their defaults are on [KD methods](methods.md).", "",
              "| key | method | type | valid | description |", "|---|---|---|---|---|"]
    for m in kd_methods():
        for name, kind, valid, text in m["fields"]:
            lines.append(f"| `kd.{name}` | `{m['name']}` | {_cell(kind)} | {_cell(valid)} | {_cell(text)} |")
    return "\n".join(lines) + "\n"


# ---- KD methods --------------------------------------------------------------------------------

def kd_methods() -> list[dict[str, Any]]:
    """Every registered KD method (``alone`` included: the student trained alone), as ``name``, ``title``,
    ``defaults``, ``contexts`` (per-context defaults), ``summary`` and ``fields`` (its settings: name, type,
    valid range, description): the one place that reads the registry."""
    from mixkd.config import field_range
    from mixkd.registry import KD_METHODS

    return [{"name": e.name, "title": e.title, "defaults": e.defaults(), "summary": e.summary,
             "contexts": {k: dict(v) for k, v in e.context_defaults.items()},
             "fields": [(k, getattr(f.annotation, "__name__", str(f.annotation)), field_range(f) or "",
                         f.description or "") for k, f in e.settings.model_fields.items()]}
            for e in KD_METHODS.entries()]


def methods_page() -> str:
    lines = ["# KD methods", "", GENERATED.format(source="the registry, `mixkd.registry.KD_METHODS`"), "",
             "`kd.method` (`--kd`) names one of them; each setting left out takes the method's default "
             "(its authors' CIFAR-100 setting, or their setting for the dataset or teacher → student pair "
             "where they publish one), and a setting a method does not use is refused. "
             "[Methods](../methods.md) explains what each computes and how to add one.", "",
             "| method | name | defaults | other defaults where | what it computes |", "|---|---|---|---|---|"]
    for m in kd_methods():
        settings = ", ".join(f"`kd.{k}` {_setting(v)}" for k, v in m["defaults"].items()) or "(no settings)"
        where = "; ".join(f"{key}: " + ", ".join(f"{k} {_setting(v)}" for k, v in values.items())
                          for key, values in m["contexts"].items())
        lines.append(f"| `{m['name']}` | {_cell(m['title'])} | {settings} | {_cell(where)} | {_cell(m['summary'])} |")
    return "\n".join(lines) + "\n"


# ---- model names -------------------------------------------------------------------------------

def models_page() -> str:
    from mixkd.models import available_models, default_lr

    lines = ["# Model names", "", GENERATED.format(source="`mixkd.models.available_models()`, `default_lr()`"), "",
             "`--model`, `--student` and `--teacher-model` take these names (`mixkd models` lists them, "
             "`mixkd models --params` with their sizes); [Models](../models.md) describes the zoo.", "",
             "| name | default learning rate |", "|---|---|"]
    lines += [f"| `{name}` | {default_lr(name):g} |" for name in available_models()]
    return "\n".join(lines) + "\n"


def page(path: str) -> str:
    return globals()[PAGES[path]]()


# ---- the mkdocs hook ---------------------------------------------------------------------------

def on_files(files, config):
    from mkdocs.structure.files import File

    for path in PAGES:
        files.append(File.generated(config, path, content=page(path)))
    return files
