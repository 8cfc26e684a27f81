"""Every public name resolves to the documented object, never to a same-named submodule."""

from __future__ import annotations

import importlib
import inspect

import hessian_worker


def test_public_names_are_not_modules() -> None:
    for name in hessian_worker.__all__:
        # importing every submodule first is what used to shadow a function with its module
        importlib.import_module(hessian_worker._EXPORTS[name])
    for name in hessian_worker.__all__:
        assert not inspect.ismodule(getattr(hessian_worker, name)), name
