"""Every public name is importable and documented, and the docstring examples run."""

import doctest
import importlib
import inspect

import pytest

PUBLIC_MODULES = [
    "jaxparam",
    "jaxparam.parametrize",
    "jaxparam.parametrizations",
    "jaxparam.functional",
    "jaxparam.linen",
    "jaxparam.interop",
    "torch_compat",
    "torch_compat.parametrize",
    "torch_compat.parametrizations",
]


def _module(name):
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name == name:
            pytest.skip(f"{name} does not exist yet")
        raise


@pytest.mark.parametrize("name", PUBLIC_MODULES)
def test_public_names_are_importable_and_documented(name):
    module = _module(name)
    assert module.__doc__, f"{name} has no module docstring"
    exported = getattr(module, "__all__", None)
    assert exported, f"{name} has no __all__"
    undocumented = []
    for attr in exported:
        obj = getattr(module, attr)  # raises if a name in __all__ is missing
        if inspect.ismodule(obj):
            continue
        if callable(obj) and not inspect.getdoc(obj):
            undocumented.append(attr)
    assert not undocumented, f"{name}: undocumented public names {undocumented}"


@pytest.mark.parametrize("name", PUBLIC_MODULES)
def test_docstring_examples_run(name):
    module = _module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0
