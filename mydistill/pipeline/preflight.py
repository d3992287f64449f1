"""Preflight: everything a run will read, checked in seconds before any stage starts.

A broken eval file used to be found after generation and both training stages; an unreachable
S3 endpoint printed a 948-line traceback. :func:`preflight` looks at every input of a run at once
and returns one :class:`Problem` per thing that is wrong, each naming the file and record, the
field or the URL, and what was expected:

* the work dir is writable (local) or its bucket reachable (S3, with a short timeout);
* every dataset is readable, valid UTF-8, one JSON object per line (or Parquet), with the configured
  fields as text (checked fully for small files, on the first records of large ones);
* teacher, pretrained student and extra teachers: ``config.json``, a tokenizer, and readable
  safetensors headers (a truncated or corrupt weights file is found here, not mid-training);
* the generation API answers, when the teacher is served (``generate.backend: openai``).

Nothing here loads a model or imports torch. ``mydistill check CONFIG`` prints the report; ``run``
and the pipeline flow call it first.
"""

from __future__ import annotations

import json
import os
import struct
import uuid
from dataclasses import dataclass
from typing import Any

from mydistill import io
from mydistill.config import PipelineConfig

# A dataset up to this size is checked record by record; a larger one on its first records only.
FULL_CHECK_BYTES = 64 * 2**20
SAMPLE_RECORDS = 2_000
# One record of more than this is almost surely a mistake (a whole file pasted into one field).
MAX_RECORD_BYTES = 1_000_000
NETWORK_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a run's inputs: where (file:line, field or URL) and what was expected."""

    where: str
    what: str

    def __str__(self) -> str:
        return f"{self.where}: {self.what}"


class PreflightError(ValueError):
    """A run's inputs are not usable; the message lists every problem, one per line."""

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        lines = "\n".join(f"  {p}" for p in problems)
        super().__init__(f"{len(problems)} problem(s) with this run's inputs:\n{lines}")


def preflight(cfg: PipelineConfig, *, teacher_uri: str | None = None) -> list[Problem]:
    """Every problem with ``cfg``'s inputs (empty: all is well). ``teacher_uri`` overrides the
    config's (the demo's teacher is made by the run itself and is not checked)."""
    problems = check_work_dir(cfg.work_dir)
    data = cfg.data
    for uri, fields in (
        (data.prompts_uri, (data.prompt_field,)),
        (data.real_uri, (data.prompt_field, data.answer_field)),
        (data.eval_uri, (data.prompt_field, data.answer_field)),
    ):
        if uri:  # the demo writes its own datasets
            problems += check_dataset(uri, fields)
    teacher = teacher_uri or cfg.teacher.uri
    if cfg.generate.backend == "openai":
        problems += check_api(cfg.generate.api_base)
    elif teacher:
        problems += check_model_folder(teacher, "teacher.uri")
    if cfg.student.init_uri:
        problems += check_model_folder(cfg.student.init_uri, "student.init_uri")
    for i, spec in enumerate(cfg.distill.extra_teachers):
        if spec.uri:
            problems += check_model_folder(spec.uri, f"distill.extra_teachers[{i}].uri")
    return problems


def require_preflight(cfg: PipelineConfig, *, teacher_uri: str | None = None) -> None:
    """Raise :class:`PreflightError` listing every problem, if there is any."""
    problems = preflight(cfg, teacher_uri=teacher_uri)
    if problems:
        raise PreflightError(problems)


# ----------------------------------------------------------------------------------------------
# the checks


def check_work_dir(work_dir: str) -> list[Problem]:
    """A local work dir can be created and written; an S3 one's bucket answers."""
    if io.is_remote(work_dir):
        return _reachable(work_dir, "work_dir")
    try:
        os.makedirs(work_dir, exist_ok=True)
        probe = os.path.join(work_dir, f".preflight-{uuid.uuid4().hex}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        return [Problem(f"work_dir {work_dir}", f"cannot write here ({e.strerror or e})")]
    return []


def check_dataset(uri: str, fields: tuple[str, ...]) -> list[Problem]:
    """The dataset at ``uri`` (a file or a folder of shards) holds JSON objects with ``fields`` as text."""
    if io.is_remote(uri):
        unreachable = _reachable(uri, "dataset")
        if unreachable:
            return unreachable
    try:
        fs, path = io.filesystem(uri)
        if not fs.exists(path):
            return [Problem(uri, "dataset not found")]
        if fs.isdir(path):
            shards = sorted(p for p in fs.ls(path, detail=False) if p.endswith((".jsonl", ".parquet")))
            if not shards:
                return [Problem(uri, "folder holds no .jsonl or .parquet shards")]
            problems: list[Problem] = []
            for shard in shards:
                problems += check_dataset(fs.unstrip_protocol(shard) if io.is_remote(uri) else shard, fields)
            return problems
        if uri.endswith(".parquet"):
            return _check_parquet(fs, path, uri, fields)
        if not uri.endswith(".jsonl"):
            return [Problem(uri, "unknown dataset format (expected .jsonl or .parquet)")]
        return _check_jsonl(fs, path, uri, fields)
    except Exception as e:  # noqa: BLE001 - an unreadable input is a finding, whatever the cause
        return [Problem(uri, f"cannot be read ({type(e).__name__}: {e})")]


def _check_jsonl(fs: Any, path: str, uri: str, fields: tuple[str, ...]) -> list[Problem]:
    full = fs.size(path) <= FULL_CHECK_BYTES
    problems: list[Problem] = []
    records = 0
    with fs.open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if not full and records >= SAMPLE_RECORDS:
                break
            if not raw.strip():
                continue
            records += 1
            where = f"{uri}:{lineno}"
            if len(raw) > MAX_RECORD_BYTES:
                problems.append(Problem(where, f"a record of {len(raw):,} bytes (at most {MAX_RECORD_BYTES:,} expected)"))
                continue
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                problems.append(Problem(where, f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})"))
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                problems.append(Problem(where, f"malformed JSON line ({e.msg} at column {e.colno})"))
                continue
            problems += _check_record(record, where, fields)
            if len(problems) >= 20:  # enough to show what is wrong; the file is broken
                problems.append(Problem(uri, "more problems not listed"))
                break
    if records == 0 and not problems:
        problems.append(Problem(uri, "no records"))
    return problems


def _check_parquet(fs: Any, path: str, uri: str, fields: tuple[str, ...]) -> list[Problem]:
    import pyarrow.parquet as pq

    with fs.open(path, "rb") as f:
        table = pq.read_table(f)
    missing = [name for name in fields if name not in table.column_names]
    if missing:
        return [Problem(uri, f"no {', '.join(map(repr, missing))} column (columns: {table.column_names})")]
    problems: list[Problem] = []
    for i, record in enumerate(table.slice(0, SAMPLE_RECORDS).to_pylist()):
        problems += _check_record(record, f"{uri}: record {i + 1}", fields)
    return problems[:20]


def _check_record(record: Any, where: str, fields: tuple[str, ...]) -> list[Problem]:
    """``fields[0]`` (the prompt) must be a string; the others (answers) a string or a number."""
    if not isinstance(record, dict):
        return [Problem(where, f"expected a JSON object, got {type(record).__name__}")]
    problems = []
    for i, name in enumerate(fields):
        value = record.get(name)
        allowed: tuple[type, ...] = (str,) if i == 0 else (str, int, float)
        if name not in record:
            problems.append(Problem(where, f"no {name!r} field (fields: {sorted(record)})"))
        elif value is None:
            problems.append(Problem(where, f"field {name!r} is null; expected text"))
        elif isinstance(value, bool) or not isinstance(value, allowed):
            problems.append(Problem(where, f"field {name!r} is {type(value).__name__} ({repr(value)[:40]}); expected text"))
        elif isinstance(value, str) and not _encodable(value):
            problems.append(Problem(where, f"field {name!r} holds a lone surrogate (\\ud800-\\udfff), not text"))
    return problems


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def check_model_folder(uri: str, field: str) -> list[Problem]:
    """``uri`` holds a model saved with ``save_pretrained``: config, tokenizer, readable weights."""
    where = f"{field} {uri}"
    if io.is_remote(uri):
        unreachable = _reachable(uri, field)
        if unreachable:
            return unreachable
    try:
        if not io.exists(io.join(uri, "config.json")):
            return [Problem(where, "no model here (config.json missing)")]
        io.read_json(io.join(uri, "config.json"))
        problems = []
        if not any(io.exists(io.join(uri, name)) for name in ("tokenizer.json", "tokenizer_config.json")):
            problems.append(Problem(where, "no tokenizer here (tokenizer.json / tokenizer_config.json missing)"))
        fs, path = io.filesystem(uri)
        weights = sorted(p for p in fs.ls(path, detail=False) if p.endswith(".safetensors"))
        if not weights and not any(p.endswith((".bin", ".gguf")) for p in fs.ls(path, detail=False)):
            problems.append(Problem(where, "no weights here (*.safetensors missing)"))
        for weight in weights:
            problems += _check_safetensors_header(fs, weight, f"{field} {fs.unstrip_protocol(weight) if io.is_remote(uri) else weight}")
        return problems
    except Exception as e:  # noqa: BLE001
        return [Problem(where, f"cannot be read ({type(e).__name__}: {e})")]


def _check_safetensors_header(fs: Any, path: str, where: str) -> list[Problem]:
    """The safetensors header (8-byte length, then JSON) parses and its tensors fit in the file."""
    size = fs.size(path)
    with fs.open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return [Problem(where, f"truncated safetensors file ({size} bytes)")]
        (length,) = struct.unpack("<Q", head)
        if length > min(size - 8, 100 * 2**20):
            return [Problem(where, f"corrupt safetensors header (claims {length:,} header bytes in a {size:,}-byte file)")]
        try:
            header = json.loads(f.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError):
            return [Problem(where, "corrupt safetensors header (not JSON)")]
    end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    if 8 + length + end > size:
        return [Problem(where, f"truncated safetensors file ({size:,} bytes; its header describes {8 + length + end:,})")]
    return []


def check_api(api_base: str | None) -> list[Problem]:
    """The OpenAI-compatible endpoint answers ``GET /models`` (any HTTP answer counts as reachable)."""
    import httpx

    from mydistill.config.generation import mask_url

    url = (api_base or "").rstrip("/") + "/models"
    try:
        httpx.get(url, timeout=NETWORK_TIMEOUT_S)
    except httpx.HTTPError as e:
        return [Problem(f"generate.api_base {mask_url(api_base)}", f"unreachable ({type(e).__name__}: {e})")]
    return []


def _reachable(uri: str, what: str) -> list[Problem]:
    """An S3 URI's bucket answers within a few seconds (no retries: this is a check, not a read)."""
    from urllib.parse import urlsplit

    import s3fs

    bucket = urlsplit(uri).netloc
    options = io.storage_options_for(uri)
    from mydistill.config.generation import mask_url

    endpoint = mask_url(options.get("client_kwargs", {}).get("endpoint_url")) or "AWS"
    # one retry: a store answering 503 for a moment is the stages' to ride out (they retry longer)
    fs = s3fs.S3FileSystem(skip_instance_cache=True, **{
        **options, "config_kwargs": {"connect_timeout": NETWORK_TIMEOUT_S, "read_timeout": NETWORK_TIMEOUT_S, "retries": {"max_attempts": 2}},
    })
    try:
        fs.ls(bucket)
    except FileNotFoundError:
        return [Problem(f"{what} {uri}", f"bucket {bucket!r} does not exist at {endpoint}")]
    except Exception as e:  # noqa: BLE001 - connection refused, DNS, credentials: say which
        return [Problem(f"{what} {uri}", f"S3 at {endpoint} unreachable or refused ({type(e).__name__}: {str(e)[:160]})")]
    return []
