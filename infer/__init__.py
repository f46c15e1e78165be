"""Inference: the objectives, the training recipes and the SVI training loop.

The names that need torch or Pyro load on first use (PEP 562), so that `infer.validate` (the argument rules the
command line checks before anything else) imports without them: a refused command line answers in about a second
instead of four."""
import importlib
import sys
import types

from . import validate  # noqa: F401  (first: models and guides import it, and it imports nothing of ours)

_EXPORTS = {"ClosedFormELBO": "elbo", "fit": "fit", "Recipe": "recipe", "recipe": "recipe",
            "DivergenceError": "result", "FitResult": "result", "IWAE": "objectives", "OBJECTIVES": "objectives",
            "check_objective": "objectives", "make_objective": "objectives", "weighted": "weights"}

__all__ = ["ClosedFormELBO", "fit", "FitResult", "DivergenceError", "Recipe", "recipe", "weighted",
           "make_objective", "check_objective", "IWAE", "OBJECTIVES"]


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value  # once: later lookups do not come here
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)


class _Package(types.ModuleType):
    """`infer.fit` and `infer.recipe` are functions named like the modules that define them: importing such a
    module must not bind the package's name to the module (as `from .fit import fit` used to rebind it)."""

    def __setattr__(self, name, value):
        if isinstance(value, types.ModuleType) and _EXPORTS.get(name) == name:
            return  # the module stays reachable as sys.modules['infer.<name>']
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
