"""Materialise the demo: its datasets and its teacher (trained once, cached by config)."""

from __future__ import annotations

import os
import tempfile
from typing import Any

from mydistill import io
from mydistill.storage.locks import artifact_lock
from mydistill.config import DemoConfig, TrainConfig
from mydistill.demo.task import category_of, make_examples
from mydistill.demo.tokenizer import build_tokenizer

EVAL_SEED, REAL_SEED, PROMPTS_SEED, TEACHER_SEED = 1001, 1002, 1003, 1004


def write_demo_data(cfg: DemoConfig, data_dir: str) -> dict[str, str]:
    """Write the demo's prompts pool, small real labelled set and eval set; returns their URIs.

    The three sets share no prompt. Deterministic, so re-running rewrites identical files. Eval
    rows carry their transform as ``category`` (reverse / sort), so the report and the gate see
    each skill on its own.
    """
    eval_set = [{**e, "category": category_of(e["prompt"])} for e in make_examples(cfg.num_eval, seed=EVAL_SEED)]
    held = {e["prompt"] for e in eval_set}
    real = make_examples(cfg.num_real, seed=REAL_SEED, exclude=held)
    held |= {e["prompt"] for e in real}
    prompts = [{"id": e["id"], "prompt": e["prompt"]} for e in make_examples(cfg.num_prompts, seed=PROMPTS_SEED, exclude=held)]
    uris = {name: io.join(data_dir, f"{name}.jsonl") for name in ("prompts", "real", "eval")}
    for name, rows in (("prompts", prompts), ("real", real), ("eval", eval_set)):
        if not io.exists(uris[name]) or io.records_sha256(io.read_records(uris[name])) != io.records_sha256(rows):
            io.write_records(uris[name], rows)
    return uris


def teacher_key(cfg: DemoConfig) -> str:
    from mydistill import __version__

    fields = cfg.model_dump(include={"teacher_train_examples", "teacher_steps", "teacher_lr", "num_eval"})
    fields["teacher_arch"] = cfg.teacher_arch.as_dict()
    return io.sha256_of({"demo_teacher": fields, "version": __version__})[:12]


def ensure_teacher(cfg: DemoConfig, *, progress: bool = False, on_metrics: Any = None) -> str:
    """The demo teacher's folder, training it first if this config has no cached teacher.

    It is trained with the same loop as the students (cross-entropy on labelled task data that
    excludes every evaluation prompt).
    """

    teacher_uri = io.join(cfg.cache_dir, f"teacher-{teacher_key(cfg)}")
    if io.read_manifest(teacher_uri):
        return teacher_uri
    # the cache is shared by every run of this demo config: one trains it, the others wait for it
    with artifact_lock(teacher_uri, what="demo teacher"):
        if not io.read_manifest(teacher_uri):
            _train_teacher(cfg, teacher_uri, progress=progress, on_metrics=on_metrics)
    return teacher_uri


def _train_teacher(cfg: DemoConfig, teacher_uri: str, *, progress: bool, on_metrics: Any) -> None:
    from mydistill.train import TrainJob, run_training

    held = {e["prompt"] for e in make_examples(cfg.num_eval, seed=EVAL_SEED)}
    with tempfile.TemporaryDirectory(prefix=io.temp_prefix("demo")) as tmp:
        tokenizer_dir = os.path.join(tmp, "tokenizer")
        build_tokenizer().save_pretrained(tokenizer_dir)
        data_uri = os.path.join(tmp, "teacher_train.jsonl")
        io.write_records(
            data_uri,
            [
                {"prompt": e["prompt"], "response": e["answer"]}
                for e in make_examples(cfg.teacher_train_examples, seed=TEACHER_SEED, exclude=held)
            ],
        )
        train = TrainConfig(
            steps=cfg.teacher_steps, lr=cfg.teacher_lr, batch_size=64, warmup_steps=50, log_every=50,
            eval_every=cfg.teacher_steps,
        )
        run_training(
            TrainJob(
                stage="teacher", data_uri=data_uri, output_uri=teacher_uri, tokenizer_uri=tokenizer_dir,
                train=train.model_dump(), arch=cfg.teacher_arch.as_dict(), inputs={"key": teacher_key(cfg)},
            ),
            on_metrics=on_metrics,
            progress=progress,
        )
