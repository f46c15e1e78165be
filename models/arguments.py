"""The constructor arguments a model or guide was built with, recorded on the object, so that a run written from
Python (analysis.run_outputs.describe) says which networks it trained, as a command-line run's overrides do."""
import functools
import inspect
import numbers

SETTING = (numbers.Number, str, type(None))  # what a config key holds (null too): not a model, not a tensor


def records_arguments(init):
    """Decorate a module's __init__: after it runs, `self.arguments` holds the settings it was given (numbers and
    strings, by name, as the caller passed them or as the signature's defaults fill them in)."""
    signature = inspect.signature(init)

    @functools.wraps(init)
    def wrapped(self, *args, **kwargs):
        init(self, *args, **kwargs)
        bound = signature.bind(self, *args, **kwargs)
        bound.apply_defaults()
        self.arguments = {k: v for k, v in bound.arguments.items() if k != "self" and isinstance(v, SETTING)}

    return wrapped


def changed_arguments(obj) -> dict:
    """{name: value} of obj's recorded settings that differ from its constructor's defaults (the command line's
    option values: tests/test_defaults.py holds them equal); {} where obj records none."""
    recorded = getattr(obj, "arguments", None)
    if not isinstance(recorded, dict):
        return {}
    defaults = {k: p.default for k, p in inspect.signature(type(obj).__init__).parameters.items()}
    return {k: v for k, v in recorded.items() if k in defaults and defaults[k] is not inspect.Parameter.empty
            and defaults[k] != v}
