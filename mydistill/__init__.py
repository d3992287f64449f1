"""mydistill: distil large language models into small ones."""

__version__ = "0.1.0"


def raised_by_us(error: BaseException) -> bool:
    """Whether ``error`` is one of mydistill's own errors (bad config, data, model, API, training):
    raised for people, its message is the whole report, and retrying cannot fix it."""
    return any(cls.__module__.startswith("mydistill.") for cls in type(error).__mro__)
