"""Writing and reading a teacher-signal store: shards of example blocks, a per-shard index, a manifest.

Layout of a store folder (local or ``s3://``)::

    shard-00000.bin          blocks (see mydistill.signal.format), one per unique example
    shard-00000.index.npy    INDEX_DTYPE rows sorted by key: where each block is
    ...
    manifest.json            written last: format, teacher, tokenizer and data hashes, k, shards

Each shard and its index are committed atomically (:func:`mydistill.io.atomic_open`) and a reader
trusts only shards the manifest lists, so a crashed writer leaves nothing a reader would take for
a finished store. A reader holds the indexes in memory and reads blocks on demand: a read-only
memory map for local shards, ranged reads for object stores. Nothing else is ever loaded whole.
"""

from __future__ import annotations

import hashlib
import io as _pyio
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from mydistill import io
from mydistill.signal.format import (
    FORMAT_NAME,
    FORMAT_VERSION,
    INDEX_DTYPE,
    StoreFormatError,
    decode_block,
    encode_block,
    key_parts,
)


class StoreMismatch(ValueError):
    """A store was made for other data, another tokenizer or another vocabulary than this run's."""


@dataclass
class SignalEntry:
    """One example's stored signal: ``token_ids`` ``(T, K)`` int64, ``log_probs`` ``(T, K)`` float32, ``residual`` ``(T,)``."""

    token_ids: np.ndarray
    log_probs: np.ndarray
    residual: np.ndarray

    @property
    def tokens(self) -> int:
        return self.token_ids.shape[0]


def shard_names(number: int) -> tuple[str, str]:
    return f"shard-{number:05d}.bin", f"shard-{number:05d}.index.npy"


# ----------------------------------------------------------------------------------------------
# writing


class SignalStoreWriter:
    """Appends example blocks to shards of about ``shard_bytes`` and commits each shard atomically.

    ``add`` the examples (a key already added is skipped: upsampled copies share one entry), then
    ``close()`` and write the manifest with :func:`write_store_manifest`.
    """

    def __init__(self, uri: str, *, slots: int, shard_bytes: int = 256 * 2**20, first_shard: int = 0) -> None:
        self.uri = uri
        self.slots = slots
        self.shard_bytes = shard_bytes
        self.first_shard = first_shard  # the number of this writer's first shard file (another writer made the ones before)
        self.shards: list[dict[str, Any]] = []
        self.keys: set[bytes] = set()
        self.tokens = 0
        self.bytes = 0
        self._buffer = bytearray()
        self._rows: list[tuple[int, int, int, int, int, int]] = []

    def __contains__(self, key: bytes) -> bool:
        return key in self.keys

    def add(self, key: bytes, token_ids: np.ndarray, log_probs: np.ndarray, residual: np.ndarray) -> None:
        """Store one example: ``(T, K)`` ids and log-probs and ``(T,)`` residual, K = ``slots``."""
        if key in self.keys:
            return
        if np.shape(token_ids)[1:] != (self.slots,):
            raise ValueError(f"this store keeps {self.slots} slots per token, got ids of shape {np.shape(token_ids)}")
        block, b = encode_block(token_ids, log_probs, residual)
        hi, lo = key_parts(key)
        self._rows.append((hi, lo, len(self._buffer), len(block), len(token_ids), b))
        self._buffer += block
        self.keys.add(key)
        self.tokens += len(token_ids)
        if len(self._buffer) >= self.shard_bytes:
            self._commit_shard()

    def resume(self, shards: list[dict[str, Any]]) -> None:
        """Continue a store whose first shards (as :meth:`close` lists them) a crashed run already committed:
        their keys come from their indexes, and the next shard gets the next number."""
        if self.shards or self._rows:
            raise RuntimeError("resume() must come before add()")
        for shard in shards:
            fs, path = io.filesystem(io.join(self.uri, shard["index"]))
            index = np.load(_pyio.BytesIO(fs.cat_file(path)), allow_pickle=False)
            for hi, lo in zip(index["key_hi"].tolist(), index["key_lo"].tolist(), strict=True):
                self.keys.add(hi.to_bytes(8, "big") + lo.to_bytes(8, "big"))
            self.tokens += int(shard["tokens"])
            self.bytes += int(shard["bytes"])
            self.shards.append(dict(shard))

    def flush(self) -> dict[str, Any] | None:
        """Commit what was added since the last shard as a shard now; returns its entry (None if nothing was)."""
        before = len(self.shards)
        self._commit_shard()
        return self.shards[-1] if len(self.shards) > before else None

    def _commit_shard(self) -> None:
        if not self._rows:
            return
        number = self.first_shard + len(self.shards)
        data_name, index_name = shard_names(number)
        index = np.array(self._rows, dtype=INDEX_DTYPE)
        index = index[np.lexsort((index["key_lo"], index["key_hi"]))]
        with io.atomic_open(io.join(self.uri, data_name), "wb") as f:
            f.write(self._buffer)
        buf = _pyio.BytesIO()
        np.save(buf, index, allow_pickle=False)
        with io.atomic_open(io.join(self.uri, index_name), "wb") as f:
            f.write(buf.getvalue())
        self.shards.append(
            {
                "data": data_name,
                "index": index_name,
                "examples": len(index),
                "tokens": int(index["tokens"].sum()),
                "bytes": len(self._buffer),
                "sha256": hashlib.sha256(self._buffer).hexdigest(),
            }
        )
        self.bytes += len(self._buffer)
        self._buffer = bytearray()
        self._rows = []

    def close(self) -> dict[str, Any]:
        """Commit the last shard; returns the shard list and counts for the manifest."""
        self._commit_shard()
        return {
            "shards": self.shards,
            "counts": {"examples": len(self.keys), "tokens": self.tokens, "bytes": self.bytes},
            "bytes_per_token": self.bytes / max(self.tokens, 1),
        }


def read_signal_records(data_uri: str) -> list[dict[str, Any]]:
    """The records a store is made for, each with the ``prompt`` and ``response`` it scores."""
    records = io.read_records(data_uri)
    for i, r in enumerate(records):
        if "prompt" not in r or "response" not in r:
            raise io.DataError(f"{data_uri}: record {i + 1} needs 'prompt' and 'response' fields (has {sorted(r)})")
    return records


def write_store_manifest(
    uri: str, *, inputs: Mapping[str, Any], written: Mapping[str, Any], **content: Any
) -> dict[str, Any]:
    """The manifest that makes a store visible to readers (written last)."""
    return io.write_manifest(
        uri, stage="signal", inputs=inputs, format={"name": FORMAT_NAME, "version": FORMAT_VERSION}, **written, **content
    )


# ----------------------------------------------------------------------------------------------
# reading


class SignalStore:
    """A finished store, opened for random access by example key.

    Attributes mirror the manifest: ``slots`` (K per token), ``k``, ``mode``, ``vocab_size``,
    ``temperature``, ``tokenizer_sha256``, ``data_sha256``, ``teacher``.
    """

    def __init__(self, uri: str) -> None:
        self.uri = uri
        manifest = io.read_manifest(uri)
        if manifest is None:
            raise io.DataError(
                f"{uri}: no finished teacher-signal store here (manifest.json missing); run the signal stage "
                "(signal.enabled: true) or point at a store it made"
            )
        fmt = manifest.get("format") or {}
        if fmt.get("name") != FORMAT_NAME or fmt.get("version") != FORMAT_VERSION:
            raise StoreFormatError(
                f"{uri}: not a {FORMAT_NAME} v{FORMAT_VERSION} store (manifest says {fmt or 'nothing'}); "
                "recompute it with this version of mydistill"
            )
        self.manifest = manifest
        self.slots: int = int(manifest["slots"])
        self.k: int = int(manifest["k"])
        self.mode: str = manifest["mode"]
        self.vocab_size: int = int(manifest["vocab_size"])
        self.temperature: float = float(manifest["temperature"])
        self.tokenizer_sha256: str = manifest["tokenizer_sha256"]
        self.data_sha256: str = manifest["data_sha256"]
        self.max_length: int = int(manifest["max_length"])
        self.teacher: dict[str, Any] = manifest.get("teacher", {})
        self._shards = manifest["shards"]
        self._maps: dict[int, Any] = {}
        parts = []
        for number, shard in enumerate(self._shards):
            fs, path = io.filesystem(io.join(uri, shard["index"]))
            if not fs.exists(path):
                raise io.DataError(f"{io.join(uri, shard['index'])}: index of a listed shard is missing; the store is damaged")
            index = np.load(_pyio.BytesIO(fs.cat_file(path)), allow_pickle=False)
            if index.dtype != INDEX_DTYPE:
                raise StoreFormatError(f"{io.join(uri, shard['index'])}: unexpected index layout {index.dtype}")
            parts.append((np.full(len(index), number, dtype=np.uint32), index))
        shard_of = np.concatenate([p[0] for p in parts]) if parts else np.zeros(0, np.uint32)
        index = np.concatenate([p[1] for p in parts]) if parts else np.zeros(0, INDEX_DTYPE)
        order = np.lexsort((index["key_lo"], index["key_hi"]))
        self._index = index[order]
        self._shard_of = shard_of[order]

    # ------------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._index)

    @property
    def tokens(self) -> int:
        return int(self._index["tokens"].sum())

    def _row(self, key: bytes) -> int | None:
        hi, lo = key_parts(key)
        his = self._index["key_hi"]
        start = int(np.searchsorted(his, np.uint64(hi), side="left"))
        stop = int(np.searchsorted(his, np.uint64(hi), side="right"))
        for row in range(start, stop):
            if int(self._index["key_lo"][row]) == lo:
                return row
        return None

    def __contains__(self, key: bytes) -> bool:
        return self._row(key) is not None

    def keys(self) -> Iterator[bytes]:
        """Every example key the store holds (16 bytes each), in index order."""
        for hi, lo in zip(self._index["key_hi"].tolist(), self._index["key_lo"].tolist(), strict=True):
            yield hi.to_bytes(8, "big") + lo.to_bytes(8, "big")

    def _read(self, shard: int, offset: int, nbytes: int) -> np.ndarray | bytes:
        uri = io.join(self.uri, self._shards[shard]["data"])
        if not io.is_remote(uri):
            if shard not in self._maps:
                path = uri.removeprefix("file://")
                self._maps[shard] = np.memmap(path, dtype=np.uint8, mode="r") if os.path.getsize(path) else np.zeros(0, np.uint8)
            block = self._maps[shard][offset : offset + nbytes]
            if block.size != nbytes:
                raise StoreFormatError(f"{uri}: shard is shorter than its index says; the store is damaged")
            return block
        fs, path = io.filesystem(uri)
        return fs.cat_file(path, start=offset, end=offset + nbytes)

    def get(self, key: bytes) -> SignalEntry:
        """The stored signal of one example; :class:`KeyError` if the store does not hold it."""
        row = self._row(key)
        if row is None:
            raise KeyError(key.hex())
        entry = self._index[row]
        block = self._read(int(self._shard_of[row]), int(entry["offset"]), int(entry["nbytes"]))
        ids, log_probs, residual = decode_block(block, int(entry["tokens"]), self.slots, int(entry["rice_b"]))
        return SignalEntry(ids, log_probs, residual)

    def get_many(self, keys: Iterable[bytes]) -> list[SignalEntry]:
        return [self.get(key) for key in keys]

    def verify(self) -> None:
        """Re-hash every shard against the manifest (reads the whole store; for audits, not training)."""
        for shard in self._shards:
            fs, path = io.filesystem(io.join(self.uri, shard["data"]))
            h = hashlib.sha256()
            with fs.open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 22), b""):
                    h.update(chunk)
            if h.hexdigest() != shard["sha256"]:
                raise StoreFormatError(f"{io.join(self.uri, shard['data'])}: sha256 differs from the manifest's")

    def check_matches(self, *, tokenizer_sha256: str, data_sha256: str | None, vocab_size: int) -> None:
        """Refuse a store made with another tokenizer, on other data, or for another vocabulary size."""
        problems = []
        if self.tokenizer_sha256 != tokenizer_sha256:
            problems.append(
                f"it was computed with another tokenizer (store {self.tokenizer_sha256[:12]}, this run "
                f"{tokenizer_sha256[:12]}): token ids would mean other strings"
            )
        if data_sha256 is not None and self.data_sha256 != data_sha256:
            problems.append(
                f"it was computed on other training data (store {self.data_sha256[:12]}, this run {data_sha256[:12]})"
            )
        if self.vocab_size != vocab_size:
            problems.append(f"its vocabulary has {self.vocab_size} tokens, the student's {vocab_size}")
        if problems:
            raise StoreMismatch(
                f"{self.uri}: teacher-signal store does not match this run: "
                + "; ".join(problems)
                + ". Recompute the store for this data and tokenizer (run the signal stage), or unset it to "
                "use the online teacher."
            )
