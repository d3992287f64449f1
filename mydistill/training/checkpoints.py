"""Checkpoints: periodic engine states for resume, and the finished student as a Hugging Face folder."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from typing import Any

import torch

from mydistill import io
from mydistill.training.job import TrainingError

COMPLETE_FILE = "complete.json"
_STEP_TAG = re.compile(r"^step(\d+)$")
# a ZeRO shard of one data-parallel rank (`zero_pp_rank_3_mp_rank_00_optim_states.pt`, NVMe `rank3/`)
_RANK_FILE = re.compile(r"zero_pp_rank_(\d+)_|offloaded_tensors/rank0*(\d+)/")


class CheckpointStore:
    """The periodic checkpoints of one run, in a folder on shared storage: a local (or shared) path,
    or an object store (``s3://``), beside the run's output, so that any node finds them.

    Every rank writes its own files (a ZeRO-3 shard each). A checkpoint counts once all of them are
    in place: after a barrier, rank 0 writes ``<tag>/complete.json``, then ``latest``. Resume takes the
    newest complete tag, so a node lost in the middle of a save costs that checkpoint, never a half
    one. With an object store each rank saves into a staging folder under its own ``TMPDIR`` and
    uploads what it wrote; on resume it downloads the files its rank reads (the shared ones and its own
    shards, not the other ranks'). Engines save into and load from :attr:`local`.
    """

    def __init__(self, uri: str, *, keep: int = 2) -> None:
        self.uri = uri.rstrip("/")
        self.keep = keep
        self.remote = io.is_remote(uri)
        self._staging: str | None = None

    @property
    def local(self) -> str:
        """The local folder the engine reads and writes: the store itself, or this process's staging folder."""
        if not self.remote:
            return self.uri.removeprefix("file://")
        if self._staging is None:
            self._staging = tempfile.mkdtemp(prefix=io.temp_prefix("ckpt"))
        return self._staging

    def complete_tags(self) -> list[str]:
        """The tags with every rank's files in place, oldest first."""
        fs, path = io.filesystem(self.uri)
        fs.invalidate_cache()  # s3fs caches listings: another node's new checkpoint must show
        found = [m.rsplit("/", 2)[-2] for m in fs.glob(f"{path}/step*/{COMPLETE_FILE}")]
        return sorted((t for t in found if _STEP_TAG.match(t)), key=_step_of)

    def latest(self) -> str | None:
        """The newest complete tag, the same on every rank (rank 0 decides)."""
        tags = self.complete_tags() if _rank_and_size()[0] == 0 else []
        return _from_rank_zero(tags[-1] if tags else None)

    def save(self, engine: Any, tag: str, client_state: dict[str, Any]) -> None:
        """Save ``engine`` (a collective: every rank calls this) as ``tag``, then mark it complete."""
        rank, world_size = _rank_and_size()
        engine.save_checkpoint(self.local, tag, client_state)
        if self.remote:
            written = os.path.join(self.local, tag)
            if os.path.isdir(written):
                io.copy_dir(written, io.join(self.uri, tag))
                shutil.rmtree(written)
        if world_size > 1:
            import torch.distributed as dist

            dist.barrier()  # every rank's files are in place
        if rank == 0:
            io.write_json(io.join(self.uri, tag, COMPLETE_FILE), {"tag": tag, "world_size": world_size})
            io.write_text(io.join(self.uri, "latest"), tag)
            self.prune()

    def load(self, engine: Any) -> dict[str, Any] | None:
        """Load the newest complete checkpoint into ``engine`` (a collective); its client state, or None."""
        tag = self.latest()
        if tag is None:
            return None
        if self.remote:
            self._download(tag, _rank_and_size()[0])
        return engine.load_checkpoint(self.local, tag)

    def prune(self) -> None:
        """Keep the ``keep`` newest complete checkpoints; drop the rest, incomplete ones included (rank 0,
        after a save, when no other save is under way)."""
        kept = set(self.complete_tags()[-self.keep :])
        fs, path = io.filesystem(self.uri)
        for entry in fs.ls(path, detail=False):
            tag = entry.rstrip("/").rsplit("/", 1)[-1]
            if _STEP_TAG.match(tag) and tag not in kept:
                fs.rm(entry, recursive=True)

    def remove(self) -> None:
        """Drop every checkpoint (the run is finished)."""
        if self.remote:
            io.remove(self.uri)
        else:
            shutil.rmtree(self.local, ignore_errors=True)

    def close(self) -> None:
        """Remove this process's staging folder."""
        if self._staging is not None:
            shutil.rmtree(self._staging, ignore_errors=True)
            self._staging = None

    def _download(self, tag: str, rank: int) -> None:
        fs, path = io.filesystem(io.join(self.uri, tag))
        target = os.path.join(self.local, tag)
        shutil.rmtree(target, ignore_errors=True)
        for key in fs.find(path):
            name = key[len(path.rstrip("/")) + 1 :]
            shard = _RANK_FILE.search(name)
            if shard and int(next(g for g in shard.groups() if g is not None)) != rank:
                continue  # another rank's shard: gigabytes this rank never reads
            os.makedirs(os.path.dirname(os.path.join(target, name)), exist_ok=True)
            fs.get(key, os.path.join(target, name))


def _step_of(tag: str) -> int:
    return int(tag.removeprefix("step"))


def _rank_and_size() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _from_rank_zero(value: Any) -> Any:
    """``value`` as rank 0 has it (every rank calls this)."""
    if _rank_and_size()[1] == 1:
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def lock_checkpoints(directory: str) -> int:
    """Hold an exclusive lock on the checkpoint folder ``directory`` for this process's life.

    Two runs writing one folder would interleave their steps and the resumed run would train on
    another run's state; the second one fails here instead, naming the first. The lock is a
    ``flock`` on ``<directory>.lock`` (released by the kernel when the holder dies, so a killed
    run never blocks its re-run). Returns the file descriptor to keep; see :func:`unlock_checkpoints`.
    """
    import fcntl

    path = directory.rstrip("/") + ".lock"
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise TrainingError(
            f"{directory}: another training run (pid {holder}) is writing checkpoints here; "
            "wait for it to finish or stop it before starting this one"
        ) from None
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    return fd


def unlock_checkpoints(directory: str, fd: int) -> None:
    """Remove the lock file of :func:`lock_checkpoints` and release it (the run is finished)."""
    with contextlib.suppress(FileNotFoundError):
        os.remove(directory.rstrip("/") + ".lock")
    os.close(fd)


def save_checkpoint(
    student: Any, tokenizer: Any, output_uri: str, *, stage: str, inputs: dict[str, Any],
    state_dict: dict[str, torch.Tensor] | None = None, **content: Any,
) -> dict[str, Any]:
    """Write the student as a Hugging Face folder (safetensors + tokenizer), then its manifest.

    The folder is assembled locally and moved (or uploaded) into place before the manifest is
    written, so a reader never takes a half-written checkpoint for a finished one.
    """
    with io.full_disk_named(output_uri), tempfile.TemporaryDirectory(prefix=io.temp_prefix("ckpt")) as tmp:
        student.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        files = sorted(os.listdir(tmp))
        if io.is_remote(output_uri):
            io.remove(output_uri)
            io.copy_dir(tmp, output_uri)
        else:
            target = output_uri.removeprefix("file://")
            staging = f"{target.rstrip('/')}.tmp-{os.getpid()}"
            try:
                shutil.copytree(tmp, staging)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)  # a half copy would keep a full disk full
                raise
            if os.path.exists(target):
                shutil.rmtree(target)
            os.replace(staging, target)
    return io.write_manifest(output_uri, stage=stage, inputs=inputs, files=files, **content)
