"""mydistill: distil large language models into small ones."""

import importlib
import importlib.abc
import importlib.util
import sys

__version__ = "0.1.0"

# Modules that moved into packages, under the names users imported them by before.
MOVED = {
    "mydistill.evaluate": "mydistill.evaluation.evaluate",
    "mydistill.scoring": "mydistill.evaluation.scoring",
    "mydistill.metrics": "mydistill.evaluation.metrics",
    "mydistill.judge": "mydistill.evaluation.judge",
    "mydistill.plan": "mydistill.pipeline.plan",
    "mydistill.changes": "mydistill.pipeline.changes",
    "mydistill.preflight": "mydistill.pipeline.preflight",
    "mydistill.costs": "mydistill.pipeline.costs",
    "mydistill.debris": "mydistill.storage.debris",
}


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """``import mydistill.plan`` gives ``mydistill.pipeline.plan`` itself (one module, not a copy)."""

    def find_spec(self, name, path=None, target=None):  # noqa: ANN001 (importlib's signature)
        return importlib.util.spec_from_loader(name, self) if name in MOVED else None

    def create_module(self, spec):  # noqa: ANN001
        return importlib.import_module(MOVED[spec.name])

    def exec_module(self, module):  # noqa: ANN001
        pass


sys.meta_path.insert(0, _MovedModules())  # before an editable install's finder, which may map the old paths


def raised_by_us(error: BaseException) -> bool:
    """Whether ``error`` is one of mydistill's own errors (bad config, data, model, API, training):
    raised for people, its message is the whole report, and retrying cannot fix it."""
    return any(cls.__module__.startswith("mydistill.") for cls in type(error).__mro__)
