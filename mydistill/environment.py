"""Project-local defaults for the services the pipeline talks to, set before they are imported.

Only defaults: a variable already set in the environment wins. Prefect keeps its database and
results under ``.prefect/`` in the project (never the user's home); analytics are off; the
ephemeral API gets time to migrate a fresh database.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

# the repository root, computed here: importing the config (pydantic) would slow every CLI start
REPO_ROOT = Path(__file__).resolve().parent.parent

DEFAULTS = {
    "PREFECT_HOME": str(REPO_ROOT / ".prefect"),
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_LOGGING_LEVEL": "INFO",
    "DO_NOT_TRACK": "1",
    "MLFLOW_ENABLE_TELEMETRY": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    # the stages log their own progress; transformers' bars for every load and save ("Loading
    # weights", "Writing model shards") would add a dozen lines to each run's log
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
}


def apply_defaults() -> None:
    for key, value in DEFAULTS.items():
        os.environ.setdefault(key, value)
    if shutil.which("nvidia-smi") is None:
        # no GPU driver: say so to DeepSpeed, which otherwise warns on import that it fell back to CPU
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
