"""Every public name has a docstring with a runnable example and a place in the README."""

import inspect
import sys
import typing
from pathlib import Path

import pytest

import tfpure as tp
import tfpure.testing as tpt
from tfpure import bench, distribute, metrics, outputs, transforms
from tfpure.testing import strategies

README = (Path(__file__).parents[1] / "README.md").read_text()
MODULES = (tp, tpt, transforms, distribute, strategies, bench, outputs, metrics)
PUBLIC = [
    (module.__name__, name, getattr(module, name))
    for module in MODULES
    for name in module.__all__
    if not inspect.ismodule(getattr(module, name))
]


def is_alias(obj):
    return typing.get_origin(obj) is not None  # Logs = dict[str, tf.Tensor], ...


@pytest.mark.parametrize(("module", "name", "obj"), PUBLIC, ids=[f"{m}.{n}" for m, n, _ in PUBLIC])
def test_public_names_have_a_runnable_example(module, name, obj):
    if is_alias(obj):
        pytest.skip("a type alias holds no docstring; the README's API table describes it")
    if not callable(obj):  # A constant (tfpure.bench.VARIANTS): an example of its module uses it.
        docs = [getattr(sys.modules[module], n).__doc__ or "" for n in sys.modules[module].__all__]
        assert any(">>>" in d and name in d for d in docs), f"{module}.{name}: no example uses it"
        return
    assert ">>>" in (obj.__doc__ or ""), f"{module}.{name} has no example in its docstring"
    if inspect.isclass(obj):
        for method, member in vars(obj).items():
            if not method.startswith("_") and inspect.isfunction(member):
                assert ">>>" in (member.__doc__ or ""), f"{name}.{method} has no example"


@pytest.mark.parametrize("name", [n for n in tp.__all__ if not n.startswith("_")])
def test_every_top_level_name_is_in_the_readme(name):
    mentions = (f"`{name}", f"{name}(", f"`tfpure.{name}`")
    assert any(m in README for m in mentions), f"tp.{name} is not in the README"
