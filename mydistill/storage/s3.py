"""Object stores (s3://): the options every filesystem is opened with (endpoint, retries with
backoff, timeouts) and the one-line error that names the bucket when a store keeps failing.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any


# How long an object store may misbehave (500/503, timeouts, reset connections) before a stage
# fails: botocore's "standard" retry mode backs off exponentially with jitter (at most 20 s a wait),
# so 10 attempts ride out about a minute of trouble. Each is an environment variable, e.g. for tests.
S3_RETRY_ENV = {"MYDISTILL_S3_MAX_ATTEMPTS": 10, "MYDISTILL_S3_CONNECT_TIMEOUT": 10, "MYDISTILL_S3_READ_TIMEOUT": 60}


def storage_options_for(uri: str) -> dict[str, Any]:
    """fsspec options for ``uri``: S3 endpoint from ``MYDISTILL_S3_ENDPOINT_URL`` / ``AWS_ENDPOINT_URL``,
    retries with backoff and timeouts (:data:`S3_RETRY_ENV`).

    Credentials are never passed here: s3fs reads them from the environment or its config files,
    so they never end up in a config, a manifest or an MLflow param.
    """
    if uri.startswith(("s3://", "s3a://")):
        knobs = {k: float(os.environ.get(k) or default) for k, default in S3_RETRY_ENV.items()}
        options: dict[str, Any] = {"config_kwargs": {
            "retries": {"max_attempts": int(knobs["MYDISTILL_S3_MAX_ATTEMPTS"]), "mode": "standard"},
            "connect_timeout": knobs["MYDISTILL_S3_CONNECT_TIMEOUT"], "read_timeout": knobs["MYDISTILL_S3_READ_TIMEOUT"],
        }}
        endpoint = os.environ.get("MYDISTILL_S3_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            options["client_kwargs"] = {"endpoint_url": endpoint}
        return options
    return {}


class StoreUnavailable(OSError):
    """An object store kept failing (5xx, timeouts, reset connections) after every retry."""


def store_unavailable_error(error: BaseException, uris: Iterable[str]) -> StoreUnavailable:
    """``error`` (see :func:`store_unavailable`) told in one line naming the bucket(s) of ``uris``."""
    buckets = sorted({b for uri in uris if (b := bucket_of(uri))})
    endpoint = os.environ.get("MYDISTILL_S3_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL") or "AWS"
    cause = error
    while cause.__cause__ is not None or cause.__context__ is not None:  # the innermost says what happened
        cause = cause.__cause__ or cause.__context__  # type: ignore[assignment]
    what = " ".join(f"{type(cause).__name__}: {cause}".split())[:160]
    names = ", ".join(repr(b) for b in buckets) or "(none named in the config)"
    return StoreUnavailable(
        f"S3 bucket {names} at {endpoint} kept failing after retries with backoff ({what}); "
        "the stages finished so far are kept: run again once the store answers, and the run resumes from them"
    )


def bucket_of(uri: str) -> str | None:
    """The bucket of an ``s3://`` URI (None for a local path)."""
    return uri.split("://", 1)[1].split("/", 1)[0] if uri.startswith(("s3://", "s3a://")) else None


def store_unavailable(error: BaseException) -> bool:
    """Whether ``error`` (or what caused it) is an object store that did not answer well: a 5xx
    after every retry, a timeout, a refused or reset connection; not a missing key or a refusal."""
    seen: BaseException | None = error
    while seen is not None:
        module, name, text = type(seen).__module__, type(seen).__name__, str(seen)
        if module.startswith(("botocore", "aiobotocore", "aiohttp", "urllib3")) and (
            "Connect" in name or "Timeout" in name or "Endpoint" in name or "Disconnected" in name
        ):
            return True
        if "FSTimeoutError" in name or any(
            code in text for code in ("(ServiceUnavailable)", "(InternalError)", "(SlowDown)", "(503)", "(500)", "(502)", "(504)")
        ):
            return True
        if isinstance(seen, (ConnectionError, TimeoutError)):
            return True
        seen = seen.__cause__ or seen.__context__
    return False
