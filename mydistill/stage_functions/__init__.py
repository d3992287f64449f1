"""One function per pipeline stage: read the plan's inputs, do the work, write the plan's output.

These are what the Prefect tasks call (one each) and what a user calls from Python. Each takes
the validated config, the :class:`~mydistill.pipeline.plan.StagePlan` and, optionally, the MLflow
parent run to log a child run under. Each is idempotent: outputs carry manifests, and a stage
whose output already matches its inputs returns at once.

* :mod:`.data` -- ``prepare_demo``, ``generate``, ``mix``, ``teacher_signal``.
* :mod:`.training` -- ``train`` (distill, finetune, baseline), its ``train_job`` and lineage checks.
* :mod:`.evaluation` -- ``evaluate``.
* :mod:`.registry` -- ``log_model``, the ``quality_gate``, ``register``.
* :mod:`.common` -- what the stages share, and the pipeline run's cost (``run_costs``).
* :mod:`.pipeline_run` -- the pipeline's MLflow parent run: ``open_pipeline_run``, ``record_run``,
  ``close_pipeline_run``.
"""

from mydistill.stage_functions.common import require_done, run_costs, sweep_debris, teacher_lineage
from mydistill.stage_functions.data import generate, mix, prepare_demo, teacher_signal
from mydistill.stage_functions.evaluation import evaluate, summary_metrics
from mydistill.stage_functions.pipeline_run import close_pipeline_run, open_pipeline_run, record_run
from mydistill.stage_functions.registry import STUDENT_TAG, log_model, quality_gate, register
from mydistill.stage_functions.training import check_lineage, prepare_student_init, student_lineage, train, train_job

__all__ = [
    "STUDENT_TAG",
    "check_lineage",
    "close_pipeline_run",
    "evaluate",
    "generate",
    "log_model",
    "mix",
    "open_pipeline_run",
    "prepare_demo",
    "prepare_student_init",
    "quality_gate",
    "record_run",
    "register",
    "require_done",
    "run_costs",
    "student_lineage",
    "summary_metrics",
    "sweep_debris",
    "teacher_lineage",
    "teacher_signal",
    "train",
    "train_job",
]
