"""What every stage function shares: clearing a killed run's leftovers, checking an input stage is
done, the teacher's lineage, numbers for MLflow; and the pipeline run's cost."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any, TypeVar

from mydistill import io, lineage, tracking
from mydistill.storage import debris, locks
from mydistill.pipeline import costs
from mydistill.config import PipelineConfig
from mydistill.fingerprint import fingerprint
from mydistill.pipeline.plan import StagePlan


F = TypeVar("F", bound=Callable[..., Any])


def one_writer(output_of: Callable[..., str | None], what: str | Callable[..., str]) -> Callable[[F], F]:
    """Run the decorated stage function holding the lock of its output (:mod:`mydistill.storage.locks`).

    ``output_of`` and ``what`` (the stage's name, or a function giving it) take the stage
    function's arguments. Two runs of one config and work dir then never write one artifact at
    once: the second waits, then finds the stage finished (its manifest matches) and answers from it.
    """
    def decorate(stage_function: F) -> F:
        @functools.wraps(stage_function)
        def locked(*args: Any, **kwargs: Any) -> Any:
            uri = output_of(*args, **kwargs)
            if not uri:
                return stage_function(*args, **kwargs)
            with locks.artifact_lock(uri, what=what if isinstance(what, str) else what(*args, **kwargs)):
                return stage_function(*args, **kwargs)
        return locked  # type: ignore[return-value]
    return decorate


def sweep_debris(uri: str) -> None:
    """Clear what a killed earlier run of this stage left (temporary files, staging folders, stale
    checkpoints; see :func:`mydistill.storage.debris.sweep_debris`) and say so."""
    removed = debris.sweep_debris(uri)
    if removed:
        logging.getLogger("mydistill").info("removed %d leftover(s) of a killed run: %s", len(removed), ", ".join(removed))


def require_done(uri: str | None, stage: str) -> None:
    """Fail clearly when a stage's input, the output of an earlier stage, is not there yet."""
    if uri and io.read_manifest(uri) is None:
        raise io.DataError(f"{uri}: no finished {stage} output here; run the {stage} stage (or the whole pipeline) first")


def teacher_lineage(plan: StagePlan) -> dict[str, Any]:
    """The teacher as recorded in manifests: its fingerprint, and its tokenizer when it is a folder."""
    fp = plan.fingerprints.get("teacher") or fingerprint(plan.teacher_uri, kind="model")
    tokenizer = lineage.model_lineage(plan.teacher_uri, fp) if fp.get("kind") == "model" else {}
    return {"teacher": fp["sha256"], "teacher_uri": plan.teacher_uri, **tokenizer}


def on_gpu(device: str) -> bool:
    """Whether a stage configured for ``device`` runs on GPUs here ('auto': when CUDA is available)."""
    if device.startswith("cuda"):
        return True
    if device != "auto":
        return False
    import torch

    return torch.cuda.is_available()


def numeric(d: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """The numbers of ``d`` (ints and floats, not bools) as floats, keys prefixed: metrics for MLflow."""
    return {f"{prefix}{k}": float(v) for k, v in d.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def run_costs(cfg: PipelineConfig, parent_run_id: str, teacher_retained: float | None = None) -> dict[str, float]:
    """The pipeline run's cost: its stages' ``cost/*`` summed, priced with ``costs:``; logged on the run."""
    total = costs.priced(costs.total_cost(tracking.child_metrics(parent_run_id)), cfg.costs, teacher_retained)
    tracking.log_metrics(parent_run_id, total)
    return total
