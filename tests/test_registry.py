"""mixkd.registry: names, typed settings resolved in layers, one-line errors, plugins by file and module."""

from __future__ import annotations

import sys

import pytest
from pydantic import Field

from mixkd.errors import MixkdError
from mixkd.registry import Registry, Settings, load_plugin, loaded_plugins


class _Temp(Settings):
    temperature: float = Field(4.0, gt=0, le=100)
    beta: float = Field(8.0, ge=0)


def _registry() -> Registry:
    reg = Registry("KD method", option="kd.method")

    @reg.register("dkdx", settings=_Temp, label="DKDX", title="decoupled KD x",
                  context_defaults={"pair=resnet56->resnet20": {"beta": 2.0},
                                    "dataset=imagenet": {"temperature": 1.0, "beta": 0.5}})
    class DKDX:
        """Decoupled KD, for the test."""

    return reg


def test_settings_resolve_in_layers_defaults_context_then_user():
    entry = _registry().get("dkdx")
    assert entry.resolve().model_dump() == {"temperature": 4.0, "beta": 8.0}
    assert entry.resolve(context={"pair": "resnet56->resnet20"}).model_dump() == {"temperature": 4.0, "beta": 2.0}
    assert entry.resolve(context={"dataset": "imagenet"}).model_dump() == {"temperature": 1.0, "beta": 0.5}
    # what the user sets wins over every default; None means unset
    got = entry.resolve({"beta": 3.0, "temperature": None}, context={"dataset": "imagenet"})
    assert got.model_dump() == {"temperature": 1.0, "beta": 3.0}
    assert (entry.label, entry.title, entry.summary) == ("DKDX", "decoupled KD x", "Decoupled KD, for the test.")


def test_unknown_key_and_bad_value_are_one_line():
    entry = _registry().get("dkdx")
    with pytest.raises(MixkdError) as err:
        entry.resolve({"p": 2.0}, where="kd")
    assert str(err.value) == "kd.p: the dkdx KD method does not use it (it uses kd.temperature, kd.beta); remove it"
    with pytest.raises(MixkdError) as err:
        entry.resolve({"temperature": -1.0}, where="kd")
    assert str(err.value).startswith("kd.temperature: Input should be greater than 0 (got -1.0)")
    assert "\n" not in str(err.value)


def test_unknown_name_suggests_the_close_one_and_plugins():
    with pytest.raises(MixkdError) as err:
        _registry().get("dkd")
    assert str(err.value) == ("kd.method: unknown KD method 'dkd'; did you mean 'dkdx'?; choose one of dkdx "
                              "(one of your own: load its file with --plugin FILE)")


def test_context_defaults_must_name_settings():
    reg = Registry("thing")
    with pytest.raises(ValueError, match="'gamma', not a setting"):
        reg.add("x", object, settings=_Temp, context_defaults={"dataset=imagenet": {"gamma": 1.0}})


PLUGIN = '''
from pydantic import Field
from mixkd.registry import Settings

from {module} import REG


class S(Settings):
    p: float = Field(2.0, gt=0)


@REG.register("at_plugin", settings=S, label="AT")
class AT:
    """Attention transfer, a plugin."""
'''


def test_plugin_file_registers_once_with_its_hash(tmp_path, monkeypatch):
    reg = Registry("KD method")
    module = "mixkd_test_registry_host"
    host = type(sys)(module)
    host.REG = reg
    monkeypatch.setitem(sys.modules, module, host)
    path = tmp_path / "at.py"
    path.write_text(PLUGIN.format(module=module))
    plugin = load_plugin("at.py", base=tmp_path)
    assert reg.get("at_plugin").resolve().model_dump() == {"p": 2.0}
    assert reg.get("at_plugin").source == str(path.resolve())
    import hashlib

    assert plugin.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert load_plugin(str(path)) is plugin  # a second load is the first
    assert plugin in loaded_plugins()


def test_plugin_errors_are_one_line(tmp_path):
    with pytest.raises(MixkdError, match=r"^plugin nope\.py: no such file"):
        load_plugin("nope.py", base=tmp_path)
    (tmp_path / "bad.py").write_text("raise RuntimeError('boom')\n")
    with pytest.raises(MixkdError) as err:
        load_plugin(str(tmp_path / "bad.py"))
    assert str(err.value) == f"plugin {tmp_path / 'bad.py'} failed to load: RuntimeError: boom"
    with pytest.raises(MixkdError, match="no such module or file"):
        load_plugin("no_such_module_xyz")


def test_two_sources_for_one_name_are_refused():
    reg = Registry("KD method")
    reg.add("x", type("A", (), {"__module__": "one"}))
    with pytest.raises(MixkdError, match="two KD methods are named 'x': one from one, one from two"):
        reg.add("x", type("B", (), {"__module__": "two"}))
    policies = Registry("augmentation policy")
    policies.add("x", type("A", (), {"__module__": "one"}))
    with pytest.raises(MixkdError, match="two augmentation policies are named 'x'"):
        policies.add("x", type("B", (), {"__module__": "two"}))
