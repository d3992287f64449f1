"""Fingerprints: what an input holds, told cheaply enough to decide whether a stage can be skipped.

A stage's identity (its output name in :mod:`mydistill.pipeline.plan`, and thereby Prefect's cache key)
covers the fingerprints of everything it reads, so a dataset or a teacher changed in place at the
same URI re-runs exactly the stages downstream of it.

Nothing is read in full to make a fingerprint: a file is known by its size and modification time
(locally) or its ETag (object stores), both from one listing of the folder. The cost of that
shortcut: a file rewritten with identical bytes counts as changed (the stages after it re-run;
generation then reuses every cached teacher response). A model folder is split into parts
(``weights``, ``tokenizer``, ``chat_template``, ``config``, ``other``) so that a stage reading only
the tokenizer (the baseline) can depend on that part alone; the chat template is the only part
read from inside a file (``tokenizer_config.json``, a few kilobytes).

>>> fingerprint("data/prompts.jsonl")["sha256"]
'3f0c…'
"""

from __future__ import annotations

import json
import posixpath
from typing import Any

from mydistill import io

MISSING = "missing"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".index.json")
TOKENIZER_FILES = {
    "tokenizer.json", "tokenizer_config.json", "vocab.json", "vocab.txt", "merges.txt",
    "special_tokens_map.json", "added_tokens.json", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model",
}
CHAT_TEMPLATE_FILES = {"chat_template.jinja", "chat_template.json"}
CONFIG_FILES = {"config.json", "generation_config.json"}


def _short(obj: Any) -> str:
    return io.sha256_of(obj)[:16]


def _stamp(info: dict[str, Any]) -> str:
    """What tells one version of a file from another without reading it."""
    etag = info.get("ETag") or info.get("etag")
    if etag:
        return str(etag).strip('"')
    mtime = info.get("mtime") or info.get("LastModified") or info.get("last_modified") or info.get("created")
    return str(mtime)


def list_files(uri: str) -> dict[str, dict[str, Any]] | None:
    """``{relative name: {size, stamp}}`` of a file or every file under a folder (hidden ones and
    ``*.checkpoints`` left out); None when nothing is there. One listing, no reads."""
    fs, path = io.filesystem(uri)
    try:
        info = fs.info(path)
    except FileNotFoundError:
        return None
    if info.get("type") != "directory":
        return {posixpath.basename(path.rstrip("/")): {"size": int(info.get("size") or 0), "stamp": _stamp(info)}}
    root = path.rstrip("/") + "/"
    out = {}
    for name, meta in fs.find(path, detail=True).items():
        rel = name[len(root):] if name.startswith(root) else posixpath.basename(name)
        parts = rel.split("/")
        if any(p.startswith(".") or p.endswith(".checkpoints") for p in parts):
            continue  # temporary files of an atomic write, resumable training checkpoints
        out[rel] = {"size": int(meta.get("size") or 0), "stamp": _stamp(meta)}
    return out


def _model_part(name: str) -> str:
    base = posixpath.basename(name)
    if base.endswith(WEIGHT_SUFFIXES):
        return "weights"
    if base in CHAT_TEMPLATE_FILES:
        return "chat_template"
    if base in TOKENIZER_FILES:
        return "tokenizer"
    if base in CONFIG_FILES:
        return "config"
    return "other"


def _embedded_chat_template(uri: str, files: dict[str, Any]) -> str | None:
    """The chat template kept inside ``tokenizer_config.json`` (older transformers write it there)."""
    if "tokenizer_config.json" not in files:
        return None
    try:
        return json.loads(io.read_text(io.join(uri, "tokenizer_config.json"))).get("chat_template")
    except (ValueError, io.DataError):
        return None


def fingerprint(uri: str | None, *, kind: str = "data") -> dict[str, Any]:
    """The fingerprint of a dataset (file or folder of shards) or, with ``kind="model"``, a model folder.

    Returns ``{"uri", "kind", "sha256", "files", "bytes"}`` plus ``"parts"`` (one hash per model
    part) for a model. A URI where nothing exists fingerprints as ``"missing"``; ``kind="name"``
    (an API-served teacher) hashes the name itself.
    """
    if uri is None:
        return {"uri": None, "kind": kind, "sha256": MISSING}
    if kind == "name":
        return {"uri": uri, "kind": kind, "sha256": _short({"name": uri})}
    files = list_files(uri)
    if files is None:
        return {"uri": uri, "kind": kind, "sha256": MISSING}
    record: dict[str, Any] = {"uri": uri, "kind": kind, "files": len(files), "bytes": sum(f["size"] for f in files.values())}
    if kind == "model":
        parts: dict[str, dict[str, Any]] = {}
        for name, meta in files.items():
            parts.setdefault(_model_part(name), {})[name] = meta
        template = _embedded_chat_template(uri, files)
        if template is not None:
            parts.setdefault("chat_template", {})["tokenizer_config.json#chat_template"] = _short(template)
        record["parts"] = {name: _short(content) for name, content in sorted(parts.items())}
        record["sha256"] = _short(record["parts"])
    else:
        record["sha256"] = _short(files)
    return record


def part(fp: dict[str, Any], name: str) -> str:
    """One part's hash of a model fingerprint (the whole fingerprint's for a dataset or a name)."""
    return (fp.get("parts") or {}).get(name, MISSING) if fp.get("kind") == "model" else fp["sha256"]
