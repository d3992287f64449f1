"""Artifact I/O through fsspec: every path may be local or ``s3://``.

Stages talk through artifacts named by URI. Each artifact is written atomically (to a temporary
name, then renamed / put) and carries a ``manifest.json`` recording counts, a sha256 of the
contents, the config that made it and the library version. A stage whose manifest exists and
matches its inputs is done and is skipped on re-run (:func:`manifest_matches`).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import uuid
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import fsspec

from mydistill import __version__
from mydistill.storage.s3 import (  # noqa: F401 (the object store's names are imported from here too)
    S3_RETRY_ENV,
    StoreUnavailable,
    bucket_of,
    storage_options_for,
    store_unavailable,
    store_unavailable_error,
)

MANIFEST_NAME = "manifest.json"


class DataError(ValueError):
    """A dataset or artifact is missing or malformed; the message names the file (and line)."""


# ----------------------------------------------------------------------------------------------
# paths


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem for ``uri`` and the path inside it."""
    fs, path = fsspec.core.url_to_fs(uri, **storage_options_for(uri))
    return fs, path


def join(base: str, *parts: str) -> str:
    """Join URI parts with ``/`` (works for local paths and object stores alike)."""
    out = base.rstrip("/")
    for part in parts:
        out = f"{out}/{part.strip('/')}"
    return out


def basename(uri: str) -> str:
    """The last part of a URI or path, a trailing ``/`` ignored (``s3://b/runs/x/`` → ``x``)."""
    return uri.rstrip("/").rsplit("/", 1)[-1]


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.exists(path)


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


# ----------------------------------------------------------------------------------------------
# temporary names owned by a process (mydistill.storage.debris sweeps them once their writer is gone)


# Temporary names carry the writer's pid, so that what a killed writer left can be told from what a
# live one is still writing: `.<name>.tmp-<pid>-<random>` files, `<artifact>.tmp-<pid>` staging
# folders, `mydistill-<what>-<pid>-…` folders in the system temp dir.
TMP_NAME = re.compile(r"\.tmp-(\d+)(?:-[0-9a-f]+)?$")
TMP_DIR_NAME = re.compile(r"^mydistill-[a-z]+-(\d+)-")


def tmp_suffix() -> str:
    """The suffix of a temporary name owned by this process (see :func:`mydistill.storage.debris.sweep_debris`)."""
    return f".tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def temp_prefix(what: str) -> str:
    """A ``tempfile`` prefix owned by this process, e.g. ``mydistill-job-<pid>-``."""
    return f"mydistill-{what}-{os.getpid()}-"


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists (one of another user counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ----------------------------------------------------------------------------------------------
# a full disk


class DiskFull(OSError):
    """A write ran out of space (ENOSPC, or the quota EDQUOT); the message names the path."""

    def __str__(self) -> str:
        return str(self.strerror)  # the message alone, without OSError's "[Errno 28]"


@contextlib.contextmanager
def full_disk_named(uri: str) -> Iterator[None]:
    """Inside the block, a write that finds the disk full raises :class:`DiskFull` naming ``uri``
    and how much room is left there, in one line (an ``OSError`` from a ``write()`` names no file)."""
    import errno

    try:
        yield
    except OSError as e:
        import shutil

        # shutil.copytree gathers its files' errors into one shutil.Error, without an errno
        copied = isinstance(e, shutil.Error) and any(
            f"[Errno {errno.ENOSPC}]" in str(why) or f"[Errno {errno.EDQUOT}]" in str(why) for *_, why in e.args[0]
        )
        if isinstance(e, DiskFull) or not (copied or e.errno in (errno.ENOSPC, errno.EDQUOT)):
            raise
        path = uri.removeprefix("file://")
        where = next((p for p in (path, os.path.dirname(path)) if p and os.path.exists(p)), ".")

        free = shutil.disk_usage(where).free
        at = f" at {e.filename}" if e.filename and str(e.filename) != path else ""
        raise DiskFull(
            errno.ENOSPC, f"{uri}: the disk is full (no space left on the device{at}; {free:,} bytes free at {where}); "
            "free some space and run again: what was finished, and the last checkpoint, are kept"
        ) from None


# ----------------------------------------------------------------------------------------------
# atomic writes


@contextlib.contextmanager
def atomic_open(uri: str, mode: str = "wb") -> Iterator[Any]:
    """Open ``uri`` for writing so that readers see either nothing or the whole file.

    Local files are written to a hidden temporary name beside the target and renamed into place;
    object stores get a single PUT once the file is complete (an S3 object never appears half
    written). On error the temporary file is removed and the target is untouched.
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_open supports 'w' and 'wb', not {mode!r}")
    fs, path = filesystem(uri)
    if is_remote(uri):
        buffer = io.BytesIO()
        handle: Any = io.TextIOWrapper(buffer, encoding="utf-8", newline="") if mode == "w" else buffer
        yield handle
        if mode == "w":
            handle.flush()
        fs.pipe_file(path, buffer.getvalue())
        return
    parent = os.path.dirname(path) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(path)}{tmp_suffix()}")
    try:
        with full_disk_named(uri), open(tmp, mode, **({"encoding": "utf-8", "newline": ""} if mode == "w" else {})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def write_text(uri: str, text: str) -> None:
    with atomic_open(uri, "w") as f:
        f.write(text)


def read_text(uri: str) -> str:
    fs, path = filesystem(uri)
    if not fs.exists(path):
        raise DataError(f"{uri}: file not found")
    with fs.open(path, "r", encoding="utf-8") as f:
        return f.read()


def write_json(uri: str, obj: Any) -> None:
    write_text(uri, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def read_json(uri: str) -> Any:
    text = read_text(uri)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{uri}:{e.lineno}: not valid JSON ({e.msg})") from None


def remove(uri: str) -> None:
    fs, path = filesystem(uri)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def copy_dir(src: str, dst: str) -> None:
    """Copy a local folder to ``dst`` (local or remote); used to publish checkpoints."""
    fs, path = filesystem(dst)
    if is_remote(dst):
        fs.put(src.rstrip("/") + "/", path, recursive=True)
    else:
        import shutil

        shutil.copytree(src, path, dirs_exist_ok=True)


# ----------------------------------------------------------------------------------------------
# records: JSONL and Parquet


def _format_of(uri: str) -> str:
    if uri.endswith((".jsonl", ".jsonl.gz", ".json")):
        return "jsonl"
    if uri.endswith(".parquet"):
        return "parquet"
    raise DataError(f"{uri}: unknown dataset format (expected .jsonl or .parquet)")


def read_records(uri: str) -> list[dict[str, Any]]:
    """Read a JSONL or Parquet file, or a folder of such shards, into a list of dicts.

    A malformed JSONL line raises :class:`DataError` naming the file and the line number.
    """
    return list(iter_records(uri))


def iter_records(uri: str) -> Iterator[dict[str, Any]]:
    fs, path = filesystem(uri)
    if not fs.exists(path):
        raise DataError(f"{uri}: dataset not found")
    if fs.isdir(path):
        shards = sorted(
            p
            for p in fs.ls(path, detail=False)
            if p.endswith((".jsonl", ".parquet")) and not os.path.basename(p).startswith(".")
        )
        if not shards:
            raise DataError(f"{uri}: folder holds no .jsonl or .parquet shards")
        for shard in shards:
            shard_uri = fs.unstrip_protocol(shard) if is_remote(uri) else shard
            yield from iter_records(shard_uri)
        return
    fmt = _format_of(uri)
    if fmt == "parquet":
        import pyarrow.parquet as pq

        with fs.open(path, "rb") as f:
            table = pq.read_table(f)
        yield from table.to_pylist()
        return
    with fs.open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{uri}:{lineno}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})") from None
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{uri}:{lineno}: malformed JSON line ({e.msg} at column {e.colno})") from None
            if not isinstance(record, dict):
                raise DataError(f"{uri}:{lineno}: expected a JSON object, got {type(record).__name__}")
            if b"\\ud" in raw.lower() and not _encodable(record):
                # an escaped lone surrogate decodes, then fails wherever the text is written or tokenized
                raise DataError(f"{uri}:{lineno}: a string holds a lone surrogate (\\ud800-\\udfff), not text")
            yield record


def _encodable(record: Any) -> bool:
    try:
        json.dumps(record, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def text_field(record: Mapping[str, Any], name: str, where: str, *, numbers: bool = False) -> str:
    """``record[name]`` as text, or a :class:`DataError` naming ``where`` (file and record) and the field
    when it is missing, null, or not text (``numbers``: an int or float is taken as its text, as an
    answer like 42 is)."""
    if name not in record:
        raise DataError(f"{where} has no {name!r} field (fields: {sorted(record)})")
    value = record[name]
    if value is None:
        raise DataError(f"{where}: field {name!r} is null; expected text")
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise DataError(f"{where}: field {name!r} holds a lone surrogate (\\ud800-\\udfff), not text") from None
        return value
    if numbers and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise DataError(f"{where}: field {name!r} is {type(value).__name__} ({repr(value)[:40]}); expected text")


def write_records(uri: str, records: Iterable[Mapping[str, Any]]) -> int:
    """Write records atomically as JSONL or Parquet (by extension); returns the count."""
    rows = [dict(r) for r in records]
    fmt = _format_of(uri)
    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        with atomic_open(uri, "wb") as f:
            pq.write_table(pa.Table.from_pylist(rows), f)
    else:
        with atomic_open(uri, "w") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n")
    return len(rows)


def records_sha256(records: Iterable[Mapping[str, Any]]) -> str:
    """A content hash of records, independent of the file format they are stored in."""
    h = hashlib.sha256()
    for r in records:
        h.update(json.dumps(r, sort_keys=True, ensure_ascii=False, default=str).encode())
        h.update(b"\n")
    return h.hexdigest()


def sha256_of(obj: Any) -> str:
    """Stable hash of a JSON-able object (configs, input descriptions)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


# ----------------------------------------------------------------------------------------------
# manifests


def write_manifest(artifact_uri: str, *, stage: str, inputs: Mapping[str, Any], **content: Any) -> dict[str, Any]:
    """Write ``manifest.json`` into the artifact folder ``artifact_uri``; returns the manifest.

    ``inputs`` describes everything the artifact was made from (config, input hashes); its hash
    is what :func:`manifest_matches` compares on re-run.
    """
    manifest = {
        "stage": stage,
        "library_version": __version__,
        "inputs": dict(inputs),
        "inputs_sha256": sha256_of(dict(inputs)),
        **content,
    }
    write_json(join(artifact_uri, MANIFEST_NAME), manifest)
    return manifest


def read_manifest(artifact_uri: str) -> dict[str, Any] | None:
    uri = join(artifact_uri, MANIFEST_NAME)
    if not exists(uri):
        return None
    return read_json(uri)


def manifest_matches(artifact_uri: str, inputs: Mapping[str, Any]) -> dict[str, Any] | None:
    """The existing manifest if the artifact was made from exactly ``inputs``, else None."""
    manifest = read_manifest(artifact_uri)
    if manifest and manifest.get("inputs_sha256") == sha256_of(dict(inputs)):
        return manifest
    return None


def localize(uri: str, cache_root: str | None = None) -> str:
    """A local path holding the file or folder ``uri`` (downloaded once for remote URIs).

    Model folders are read by transformers from local disk, so an ``s3://`` checkpoint is copied
    into ``cache_root`` (default ``~/.cache/mydistill/remote``) under a name derived from the URI.
    """
    if not is_remote(uri):
        return uri.removeprefix("file://")
    cache_root = cache_root or os.path.join(os.path.expanduser("~"), ".cache", "mydistill", "remote")
    target = os.path.join(cache_root, hashlib.sha256(uri.encode()).hexdigest()[:16])
    fs, path = filesystem(uri)
    if not fs.exists(path):
        raise DataError(f"{uri}: not found")
    if os.path.exists(target):
        import shutil

        shutil.rmtree(target)
    if fs.isdir(path):
        fs.get(path.rstrip("/") + "/", target + "/", recursive=True)
    else:
        os.makedirs(cache_root, exist_ok=True)
        fs.get(path, target)
    return target
