"""`forge.config.registry`: one name -> object registry for losses, rewards, envs, tasks, tools, collate."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from forge.config import ConfigError, registry
from forge.config.registry import ImportPathError, UnknownNameError


@dataclasses.dataclass
class Widget:
    size: int = 1
    colour: str = "red"


def make_widget(size: int = 2) -> Widget:
    return Widget(size=size, colour="blue")


@pytest.fixture
def widgets():
    registry.register("widget", "small_widget", "Widget")(Widget)
    registry.register("widget", "factory")(make_widget)
    yield
    for name in ("small_widget", "Widget", "factory"):
        registry.unregister("widget", name)
    assert registry.names("widget") == []


def test_name_lookup_is_case_and_underscore_insensitive(widgets):
    for name in ("small_widget", "SMALL-WIDGET", "smallWidget", "Widget", "widget"):
        assert registry.resolve("widget", name) is Widget
    assert registry.names("widget") == ["Widget", "factory", "small_widget"]
    assert registry.registered("widget") == {"small_widget": Widget, "Widget": Widget, "factory": make_widget}


def test_import_path_both_spellings(widgets):
    assert registry.resolve("widget", f"{__name__}:Widget") is Widget
    assert registry.resolve("widget", f"{__name__}.make_widget") is make_widget
    # a nested attribute after the colon
    assert registry.resolve("widget", "os:path.join") is __import__("os").path.join
    with pytest.raises(ImportPathError, match="cannot import widget 'no_such_pkg.mod:X'.*no_such_pkg"):
        registry.resolve("widget", "no_such_pkg.mod:X")
    with pytest.raises(ImportPathError, match=f"module '{__name__}' has no attribute 'Nope'"):
        registry.resolve("widget", f"{__name__}:Nope")
    # the error is an ImportError for code and a ConfigError (ValueError) for configs
    with pytest.raises(ImportError):
        registry.resolve("widget", "no_such_pkg:X")
    with pytest.raises(ValueError):
        registry.resolve("widget", "no_such_pkg:X")


def test_target_dict_instantiates_with_kwargs(widgets):
    w = registry.resolve("widget", {"_target_": "small_widget", "size": 5, "colour": "green"})
    assert w == Widget(size=5, colour="green")
    # a factory function, an import path, torchforge's `name` spelling, an OmegaConf node
    assert registry.resolve("widget", {"_target_": "factory", "size": 7}) == Widget(7, "blue")
    assert registry.resolve("widget", {"_target_": f"{__name__}:Widget", "size": 3}) == Widget(3)
    assert registry.resolve("widget", {"name": "widget", "size": 4}) == Widget(4)
    node = OmegaConf.create({"w": {"_target_": "Widget", "size": 6, "colour": "${c}"}, "c": "teal"})
    assert registry.resolve("widget", node.w) == Widget(6, "teal")
    # with `_target_` present, `name` is an ordinary keyword
    with pytest.raises(TypeError, match=r"widget Widget: bad arguments \['name'\]"):
        registry.resolve("widget", {"_target_": "Widget", "name": "x"})
    with pytest.raises(ConfigError, match="needs `_target_`.*got keys \\['size'\\]"):
        registry.resolve("widget", {"size": 1})
    # instantiate always calls; call-time kwargs update the dict's
    assert registry.instantiate("widget", "factory", size=9) == Widget(9, "blue")
    assert registry.instantiate("widget", {"_target_": "Widget", "size": 1}, size=2) == Widget(2)
    assert registry.instantiate("widget", Widget) == Widget()
    # anything that is not a name or a mapping is returned as it is
    w = Widget()
    assert registry.resolve("widget", w) is w


def test_unknown_name_lists_registered_and_closest(widgets):
    with pytest.raises(UnknownNameError) as info:
        registry.resolve("widget", "smal_widgt")
    msg = str(info.value)
    assert msg.startswith("unknown widget 'smal_widgt'. Did you mean 'small_widget'?")
    assert "Registered: Widget, factory, small_widget" in msg
    # a KeyError for code that looked a name up, a ValueError (ConfigError) for a config
    assert isinstance(info.value, KeyError) and isinstance(info.value, ConfigError)
    # nothing close: no guess
    with pytest.raises(UnknownNameError, match=r"unknown widget 'zzzz'\. Registered"):
        registry.resolve("widget", "zzzz")
    with pytest.raises(UnknownNameError, match=r"unknown gadget 'x'\. Registered: \(none\)"):
        registry.resolve("gadget", "x")


def test_register_refuses_a_second_object_and_bad_names(widgets):
    registry.register("widget", "Widget")(Widget)  # the same object again: a no-op
    with pytest.raises(ValueError, match="'small-widget' is already registered"):
        registry.register("widget", "small-widget")(make_widget)
    for bad in ("", "a.b", "a:b"):
        with pytest.raises(ValueError, match="without ':' or '.'"):
            registry.register("widget", bad)


def test_builtins_register_at_package_import():
    """Each kind's built-ins are there as soon as the package that defines them is imported, in a
    fresh interpreter (no test has imported anything else first)."""
    code = """
import forge.losses, forge.data.rewards, forge.data.tasks, forge.data.collate, forge.envs
from forge.config import registry
r = {k: registry.names(k) for k in ("loss", "reward", "task", "env", "tool", "collate")}
assert {"grpo", "GRPOLoss", "gspo", "dapo", "simple_grpo", "clip_cov"} <= set(r["loss"]), r
assert {"math", "thinking", "format", "length", "task"} <= set(r["reward"]), r
assert {"arithmetic", "addition", "countdown", "calculator", "coding"} <= set(r["task"]), r
assert {"calculator", "coding", "tool", "openenv"} <= set(r["env"]), r
assert r["tool"] == ["calculator", "python"] and r["collate"] == ["episodes"], r
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr


def test_registry_module_is_import_light():
    """Lower layers import the registry: it must not pull in torch or any forge package above config."""
    code = """
import sys
import forge.config.registry
bad = sorted(m for m in sys.modules if m == "torch" or (m.startswith("forge.") and not m.startswith("forge.config")))
assert not bad, bad
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
