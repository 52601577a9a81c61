"""Registries: the one owner of "which names exist" for each open catalogue, and plugins.

A catalogue (KD methods, augmentation policies, model sources) is a :class:`Registry`. Each entry is
one file: the file defines its object (a class or a factory) and its typed settings (a pydantic model
whose fields carry their ranges, their authors' defaults and, in ``description``, the source of each
default), and registers them::

    from mixkd.registry import KD_METHODS, Settings

    class ATSettings(Settings):
        p: float = Field(2.0, gt=0, le=8, description="exponent of the attention map (Zagoruyko & "
                                                       "Komodakis; mdistiller cfg.py CFG.AT.P)")

    @KD_METHODS.register("at", settings=ATSettings, label="AT")
    class AT(Distiller): ...

Everything else derives from the registry: CLI flags and ``--help``, config keys, study axes, the
results' labels. A registry knows the module that holds its built-in entries (``builtins``) and
imports it the first time it is asked for a name, so that a configuration can be validated wherever
it is built (that import is the registry's discovery mechanism, as Python's entry points are, not a
dependency of this module on the entries). Files from outside the package register the same way when
loaded by :func:`load_plugin` (``--plugin FILE``, ``plugins: [...]`` in config and study files); the
loaded plugins, with each file's SHA-256, are listed by :func:`loaded_plugins` so that a run or a
study can record them.

Settings are resolved in layers by :meth:`Entry.resolve`: the settings model's defaults, then the
entry's per-context defaults (``context_defaults``: the first key matching the run, e.g.
``{"pair=resnet56->resnet20": {"beta": 2.0}, "dataset=imagenet": {...}}``), then what the user set.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import importlib.util
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from mixkd.errors import MixkdError


class Settings(BaseModel):
    """The base of an entry's typed settings: unknown keys are refused, assignments validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class NoSettings(Settings):
    """The settings of an entry that has none."""


@dataclass(frozen=True)
class Entry:
    """One registered name: its object, its typed settings, its labels and where it comes from."""

    name: str
    obj: Any
    settings: type[Settings]
    label: str  # short: table columns, claims ("DKD")
    title: str  # long: reports, --help ("decoupled KD")
    summary: str  # one line: the first line of the object's docstring
    source: str  # the module that registered it (a plugin's file path for plugins)
    context_defaults: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    extra: Mapping[str, Any] = field(default_factory=dict)

    def setting_names(self) -> list[str]:
        return list(self.settings.model_fields)

    def defaults(self, context: Mapping[str, str] | None = None) -> dict[str, Any]:
        """The settings' defaults for a run described by ``context`` (e.g. ``{"dataset": "imagenet",
        "pair": "resnet56->resnet20"}``): the model's defaults, overridden by every matching
        ``context_defaults`` entry (``"key=value"``), in the order the entry lists them."""
        values = {k: f.default for k, f in self.settings.model_fields.items()}
        for _key, overrides in self.matching_contexts(context):
            values.update(overrides)
        return values

    def matching_contexts(self, context: Mapping[str, str] | None) -> list[tuple[str, Mapping[str, Any]]]:
        context = context or {}
        found = []
        for key, overrides in self.context_defaults.items():
            name, _, value = key.partition("=")
            if context.get(name) == value:
                found.append((key, overrides))
        return found

    def resolve(self, values: Mapping[str, Any] | None = None, context: Mapping[str, str] | None = None,
                where: str = "") -> Settings:
        """The typed settings: defaults for ``context``, then ``values`` (None values are unset).
        Refuses a key the entry does not have, and an invalid value, in one line."""
        given = {k: v for k, v in (values or {}).items() if v is not None}
        names = self.setting_names()
        unknown = [k for k in given if k not in names]
        prefix = f"{where}." if where else ""
        if unknown:
            uses = ", ".join(f"{prefix}{n}" for n in names) or "no settings"
            raise MixkdError(f"{prefix}{unknown[0]}: the {self.name} {self.kind_hint()}does not use it "
                             f"(it uses {uses}); remove it")
        try:
            return self.settings(**{**self.defaults(context), **given})
        except ValidationError as err:
            first = err.errors()[0]
            loc = ".".join(str(p) for p in first["loc"])
            raise MixkdError(f"{prefix}{loc}: {first['msg']} (got {first.get('input')!r})") from None

    def kind_hint(self) -> str:
        kind = self.extra.get("kind", "")
        return f"{kind} " if kind else ""


class Registry:
    """Name -> :class:`Entry` for one catalogue. ``kind`` names it in messages ("KD method");
    ``builtins`` is the module (or package) holding the package's own entries, imported on first use;
    ``option`` is the CLI option / config key that takes a name (for messages)."""

    def __init__(self, kind: str, builtins: str | None = None, option: str = ""):
        self.kind, self.builtins, self.option = kind, builtins, option
        self.plural = kind[:-1] + "ies" if kind.endswith("y") else kind + "s"  # "augmentation policies"
        self._entries: dict[str, Entry] = {}
        self._loaded = builtins is None
        self._loading = False
        self._declared: list[dict[str, Any]] | None = None
        _REGISTRIES.append(self)

    # ---- registering ---------------------------------------------------------------------------
    def register(self, name: str, *, settings: type[Settings] = NoSettings, label: str | None = None,
                 title: str | None = None, context_defaults: Mapping[str, Mapping[str, Any]] | None = None,
                 **extra: Any) -> Callable[[Any], Any]:
        """Decorator registering a class or function under ``name`` (see the module docstring)."""

        def add(obj: Any) -> Any:
            self.add(name, obj, settings=settings, label=label, title=title,
                     context_defaults=context_defaults, **extra)
            return obj

        return add

    def add(self, name: str, obj: Any, *, settings: type[Settings] = NoSettings, label: str | None = None,
            title: str | None = None, context_defaults: Mapping[str, Mapping[str, Any]] | None = None,
            **extra: Any) -> Entry:
        if not isinstance(name, str) or not name or not name.replace("_", "").replace("-", "").isalnum():
            raise ValueError(f"a {self.kind} name must be letters, digits, '_' or '-'; got {name!r}")
        if not (isinstance(settings, type) and issubclass(settings, Settings)):
            raise TypeError(f"{self.kind} {name!r}: settings must be a subclass of mixkd.registry.Settings")
        source = _source_of(obj)
        old = self._entries.get(name)
        if old is not None and old.source != source:
            raise MixkdError(f"two {self.plural} are named {name!r}: one from {old.source}, one from {source}; "
                             "rename one of them")
        for key, overrides in (context_defaults or {}).items():
            if "=" not in key:
                raise ValueError(f"{self.kind} {name!r}: context_defaults key {key!r} must read 'name=value'")
            bad = [k for k in overrides if k not in settings.model_fields]
            if bad:
                raise ValueError(f"{self.kind} {name!r}: context_defaults[{key!r}] sets {bad[0]!r}, not a setting")
        doc = (getattr(obj, "__doc__", None) or "").strip().splitlines()
        entry = Entry(name=name, obj=obj, settings=settings, label=label or name, title=title or label or name,
                      summary=doc[0] if doc else "", source=source,
                      context_defaults=dict(context_defaults or {}), extra={"kind": self.kind, **extra})
        self._entries[name] = entry
        if hasattr(obj, "__dict__") and isinstance(obj, type):
            obj.registry_entry = entry
        return entry

    def remove(self, name: str) -> None:
        """Forget ``name`` (for tests and for a session that registered one of its own)."""
        self._entries.pop(name, None)

    # ---- looking up ----------------------------------------------------------------------------
    def _ensure_builtins(self) -> None:
        if self._loaded or self._loading:
            return
        self._loading = True
        try:
            importlib.import_module(self.builtins)
            self._loaded = True
        finally:
            self._loading = False

    def __contains__(self, name: object) -> bool:
        self._ensure_builtins()
        return name in self._entries

    def __iter__(self):
        self._ensure_builtins()
        return iter(list(self._entries))

    def names(self, where: Callable[[Entry], bool] | None = None) -> list[str]:
        """The registered names (in registration order), those ``where`` accepts when given."""
        self._ensure_builtins()
        return [n for n, e in self._entries.items() if where is None or where(e)]

    def entries(self) -> list[Entry]:
        self._ensure_builtins()
        return list(self._entries.values())

    def describe(self, name: str) -> dict[str, Any] | None:
        """``{name, label, title, extra}`` of ``name`` without importing the built-in entries when they are
        not imported yet: what their files declare (:meth:`declared`), so that a torch-free command
        (``mixkd claims``) labels methods as the loaded registry would. None for an unknown name."""
        if self._loaded or self.builtins is None:
            entry = self._entries.get(name)
            return None if entry is None else _description(entry)
        entry = self._entries.get(name)  # a plugin's, loaded already
        if entry is not None:
            return _description(entry)
        return next((d for d in self.declared() if d["name"] == name), None)

    def described_names(self) -> list[str]:
        """The names, in registration order, without importing the built-in entries (see :meth:`describe`)."""
        if self._loaded or self.builtins is None:
            return list(self._entries)
        return list(dict.fromkeys([d["name"] for d in self.declared()] + list(self._entries)))

    def declared(self) -> list[dict[str, Any]]:
        """What the built-in package's modules declare in their ``@<registry>.register("name", label=...,
        title=..., ...)`` decorators (literal arguments only), read from their source without importing
        them, in the order the package's ``__init__`` imports them."""
        if self._declared is None:
            self._declared = _declared_entries(self.builtins) if self.builtins else []
        return self._declared

    def get(self, name: str, choices: Iterable[str] | None = None) -> Entry:
        """The entry ``name``, or one line saying it is unknown, what is close and what exists."""
        self._ensure_builtins()
        entry = self._entries.get(name) if isinstance(name, str) else None
        if entry is None or (choices is not None and name not in choices):
            raise MixkdError(self.unknown_message(name, choices))
        return entry

    def unknown_message(self, name: object, choices: Iterable[str] | None = None) -> str:
        names = list(choices) if choices is not None else self.names()
        close = difflib.get_close_matches(str(name), names, n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        where = f"{self.option}: " if self.option else ""
        return (f"{where}unknown {self.kind} {name!r}{hint}; choose one of {', '.join(names)} "
                f"(one of your own: load its file with --plugin FILE)")


_REGISTRIES: list[Registry] = []  # every catalogue, for unload_plugin


def _description(entry: Entry) -> dict[str, Any]:
    return {"name": entry.name, "label": entry.label, "title": entry.title, "extra": dict(entry.extra),
            "settings": entry.setting_names()}


def _declared_entries(package: str) -> list[dict[str, Any]]:
    """The registrations written in ``package``'s modules (see :meth:`Registry.declared`)."""
    import ast

    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return []
    folder = Path(list(spec.submodule_search_locations)[0])
    order: list[str] = []
    init = folder / "__init__.py"
    for node in ast.walk(ast.parse(init.read_text())) if init.is_file() else []:
        if isinstance(node, ast.ImportFrom) and node.module == package:
            order += [alias.name for alias in node.names]
    found = []
    for module in order:
        path = folder / f"{module}.py"
        if not path.is_file():
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr == "register" and node.args and isinstance(node.args[0], ast.Constant)):
                continue
            kwargs = {}
            for kw in node.keywords:
                try:
                    kwargs[kw.arg] = ast.literal_eval(kw.value)
                except ValueError:
                    continue
            name = node.args[0].value
            label = kwargs.pop("label", None) or name
            title = kwargs.pop("title", None) or label
            extra = {k: v for k, v in kwargs.items() if k not in ("settings", "context_defaults")}
            found.append({"name": name, "label": label, "title": title, "extra": extra, "settings": None})
    return found


def _source_of(obj: Any) -> str:
    module = sys.modules.get(getattr(obj, "__module__", "") or "")
    if module is not None and module.__name__ in _PLUGIN_MODULES:
        return _PLUGIN_MODULES[module.__name__]
    return getattr(obj, "__module__", None) or "?"


# ---- plugins ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Plugin:
    """A loaded plugin: what was asked (``spec``), the file it resolved to, its SHA-256."""

    spec: str
    path: str
    sha256: str
    module: str

    @property
    def ref(self) -> str:
        """What loads it again from anywhere: its resolved file path, or the module name it was given as."""
        return self.spec if self.module == self.spec else self.path


_PLUGINS: dict[str, Plugin] = {}  # by resolved path
_PLUGIN_MODULES: dict[str, str] = {}  # module name -> path


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_plugin(spec: str, base: str | Path | None = None) -> Plugin:
    """Load a plugin: a ``.py`` file (relative paths from ``base``, the folder of the config or study file
    naming it, else the working directory) or an importable module name. Its entries register
    themselves on import. Loading the same file again does nothing; a failing plugin is one line."""
    if not isinstance(spec, str) or not spec.strip():
        raise MixkdError(f"plugins: {spec!r} is not a file path or a module name")
    is_path = spec.endswith(".py") or "/" in spec or "\\" in spec
    if is_path:
        path = Path(spec).expanduser()
        if not path.is_absolute() and base is not None:
            path = Path(base) / path
        path = path.resolve()
        if not path.is_file():
            raise MixkdError(f"plugin {spec}: no such file ({path}); check the path (relative paths in a config "
                             "or study file are taken from that file's folder)")
        key = str(path)
        if key in _PLUGINS:
            return _PLUGINS[key]
        digest = file_sha256(path)
        module_name = f"mixkd_plugin_{path.stem}_{digest[:12]}"
        _PLUGIN_MODULES[module_name] = key
        module_spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[module_name] = module
        try:
            module_spec.loader.exec_module(module)
        except MixkdError:
            _forget(module_name)
            raise
        except Exception as err:  # a plugin's own bug: one line naming it
            _forget(module_name)
            raise MixkdError(f"plugin {spec} failed to load: {type(err).__name__}: {err}") from None
        plugin = Plugin(spec=spec, path=key, sha256=digest, module=module_name)
    else:
        try:
            found = importlib.util.find_spec(spec)
        except (ImportError, ValueError):
            found = None
        if found is None:
            raise MixkdError(f"plugin {spec}: no such module or file; give a .py path or an importable module name")
        origin = found.origin or spec
        if origin in _PLUGINS:
            return _PLUGINS[origin]
        _PLUGIN_MODULES[spec] = origin
        try:
            importlib.import_module(spec)
        except MixkdError:
            _PLUGIN_MODULES.pop(spec, None)
            raise
        except Exception as err:
            _PLUGIN_MODULES.pop(spec, None)
            raise MixkdError(f"plugin {spec} failed to load: {type(err).__name__}: {err}") from None
        key = origin
        digest = file_sha256(origin) if Path(origin).is_file() else ""
        plugin = Plugin(spec=spec, path=origin, sha256=digest, module=spec)
    _PLUGINS[key] = plugin
    return plugin


def _forget(module_name: str) -> None:
    sys.modules.pop(module_name, None)
    _PLUGIN_MODULES.pop(module_name, None)


def load_plugins(specs: Iterable[str], base: str | Path | None = None) -> list[Plugin]:
    return [load_plugin(s, base) for s in specs]


def plugin_records(paths: Iterable[str]) -> list[dict[str, str]]:
    """``[{"path", "sha256"}]`` of the loaded plugins ``paths`` (resolved paths or module names), for a
    run or a study to record what it ran with."""
    by_module = {p.module: p for p in _PLUGINS.values()}
    records = []
    for path in paths:
        plugin = _PLUGINS.get(path) or by_module.get(path)
        if plugin is None:
            raise MixkdError(f"plugin {path} is not loaded")
        records.append({"path": plugin.path, "sha256": plugin.sha256})
    return records


def unload_plugin(plugin: Plugin) -> None:
    """Forget a plugin and every entry it registered (tests; a session trying a new version of its file)."""
    for registry in _REGISTRIES:
        for name in [n for n, e in registry._entries.items() if e.source == plugin.path]:
            registry.remove(name)
    _PLUGINS.pop(plugin.path, None)
    _forget(plugin.module)


def loaded_plugins() -> list[Plugin]:
    """The plugins loaded in this process, in load order."""
    return list(_PLUGINS.values())


# ---- the catalogues -----------------------------------------------------------------------------
# Each is filled by its built-in package (one file an entry) and by plugins.
KD_METHODS = Registry("KD method", builtins="mixkd.methods", option="kd.method")
AUGMENTATIONS = Registry("augmentation policy", builtins="mixkd.augment", option="augment")
