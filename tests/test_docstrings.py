"""The docstrings' examples run: every module of the package whose source holds a ``>>>`` example is doctested
(examples that need a trained run or a photo are marked ``+SKIP``)."""

from __future__ import annotations

import doctest
import importlib
import pkgutil
from pathlib import Path

import pytest

import mpoxscope


def _modules_with_examples() -> list[str]:
    root = Path(mpoxscope.__file__).parent
    names = []
    for info in pkgutil.walk_packages([str(root)], prefix="mpoxscope."):
        rel = info.name.split(".")[1:]
        path = root.joinpath(*rel)
        source = path / "__init__.py" if info.ispkg else path.with_suffix(".py")
        if source.is_file() and ">>> " in source.read_text(encoding="utf-8"):
            names.append(info.name)
    return sorted(names)


def test_the_package_has_examples():
    assert len(_modules_with_examples()) >= 5


@pytest.mark.parametrize("name", _modules_with_examples())
def test_docstring_examples_run(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {name}"
