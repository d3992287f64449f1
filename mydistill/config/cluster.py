"""``distill.kubeflow`` / ``finetune.kubeflow``: where a training stage with ``engine: kubeflow`` runs.

The stage submits one Kubeflow Trainer v2 ``TrainJob`` (one pod per node, ``torchrun`` in each)
rendered from a YAML template (``deploy/kubeflow/trainjob.yaml`` unless ``template`` names
another); see docs/operations.md, "Running on a cluster". The job has the stage's ``nodes`` pods,
each running its ``num_processes`` workers (``kubeflow.num_nodes``, the older name, is read as ``nodes``).
"""

from __future__ import annotations

import re

from pydantic import Field, field_validator

from mydistill.config.section import Section

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# a Secret's name (DNS subdomain) and one of its keys
_SECRET_KEY = re.compile(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?/[-._a-zA-Z0-9]+")


class KubeflowConfig(Section):
    namespace: str = Field("default", description="Kubernetes namespace the TrainJob (and its pods) run in.")
    image: str | None = Field(
        None, description="Container image of every node: this project installed, with torch (deploy/Dockerfile.gpu)."
    )
    runtime: str = Field(
        "torch-distributed", description="ClusterTrainingRuntime the TrainJob refers to (Kubeflow Trainer's torch runtime)."
    )
    resources_per_node: dict[str, str | int] = Field(
        default_factory=dict,
        description="Resource limits of each node's container, e.g. {'nvidia.com/gpu': 8, 'memory': '512Gi'}.",
    )
    env: dict[str, str] = Field(default_factory=dict, description="Environment variables set in every node, by value.")
    secret_env: dict[str, str] = Field(
        default_factory=dict,
        description="Environment variables read from Kubernetes Secrets, NAME: 'secret-name/key' "
        "(e.g. AWS_SECRET_ACCESS_KEY: 's3-credentials/secret-key'); the values never pass through this config.",
    )
    template: str | None = Field(
        None, description="TrainJob manifest template (YAML with {{ placeholders }}); empty: deploy/kubeflow/trainjob.yaml."
    )
    kubeconfig: str | None = Field(
        None, description="kubeconfig file; empty: the pod's service account inside a cluster, else ~/.kube/config."
    )
    context: str | None = Field(None, description="kubeconfig context; empty: its current context.")
    poll_seconds: float = Field(5.0, gt=0, description="How often the TrainJob's status is read while it runs.")

    @field_validator("env", "secret_env")
    @classmethod
    def _env_names(cls, value: dict[str, str]) -> dict[str, str]:
        bad = [k for k in value if not _ENV_NAME.fullmatch(k)]
        if bad:
            raise ValueError(f"not environment variable names: {', '.join(map(repr, bad))}")
        return value

    @field_validator("secret_env")
    @classmethod
    def _secret_refs(cls, value: dict[str, str]) -> dict[str, str]:
        bad = [f"{k}: {v!r}" for k, v in value.items() if not _SECRET_KEY.fullmatch(v)]
        if bad:
            raise ValueError(f"expected 'secret-name/key' for each variable; got {'; '.join(bad)}")
        return value
