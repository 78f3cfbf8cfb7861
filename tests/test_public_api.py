"""The public names of ``mxfp8``: each is the object its home submodule defines.

Lazy exports (PEP 562) can go wrong quietly: a name mapped to the wrong submodule, a stale
re-export, a name left out of ``__all__`` or ``dir()``, or a typo answered with something
instead of an AttributeError. Each test below fails on one of those.
"""

from __future__ import annotations

import ast
import importlib
import inspect
from pathlib import Path

import pytest

import mxfp8


def test_all_lists_exactly_the_exports():
    assert sorted(mxfp8.__all__) == sorted([*mxfp8._EXPORTS, "__version__"])
    assert len(set(mxfp8.__all__)) == len(mxfp8.__all__)


@pytest.mark.parametrize("name", sorted(mxfp8._EXPORTS))
def test_each_export_is_the_object_of_its_home_module(name):
    home = importlib.import_module(mxfp8._EXPORTS[name])
    obj = getattr(mxfp8, name)
    assert obj is getattr(home, name)  # identity: the same object, not a look-alike
    if inspect.isclass(obj) or inspect.isfunction(obj):
        # defined there, not imported into it from elsewhere
        assert obj.__module__ == home.__name__
    assert getattr(mxfp8, name) is obj  # the cached second lookup agrees


def test_static_imports_match_the_lazy_map():
    """The TYPE_CHECKING imports (what type checkers see) name the same home modules."""
    tree = ast.parse(Path(mxfp8.__file__).read_text())
    static: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            for imp in node.body:
                assert isinstance(imp, ast.ImportFrom)
                static.update({a.name: imp.module for a in imp.names})
    assert static == mxfp8._EXPORTS


def test_dir_lists_every_public_name():
    names = dir(mxfp8)
    assert set(mxfp8.__all__) <= set(names)
    assert "step_window" in names and "MXLinear" in names


def test_star_import_gives_the_same_objects():
    namespace: dict[str, object] = {}
    exec("from mxfp8 import *", namespace)  # noqa: S102
    for name in mxfp8._EXPORTS:
        assert namespace[name] is getattr(mxfp8, name)


def test_version_is_a_string():
    assert isinstance(mxfp8.__version__, str) and mxfp8.__version__.count(".") == 2


def test_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'not_a_name'"):
        mxfp8.not_a_name  # noqa: B018
    assert not hasattr(mxfp8, "MXlinear")  # a near miss is not answered either
    with pytest.raises(ImportError):
        exec("from mxfp8 import not_a_name", {})  # noqa: S102
