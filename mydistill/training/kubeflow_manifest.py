"""The TrainJob a training stage submits (Kubeflow Trainer v2): its name, the template rendered
with the stage's values, and the checks that make a bad template one clear error.

The template (``deploy/kubeflow/trainjob.yaml``, or ``kubeflow.template``) is YAML with ``{{ key }}``
placeholders; see :mod:`mydistill.training.kubeflow` for the engine that submits and follows it.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any

import yaml

from mydistill.config import REPO_ROOT
from mydistill.config.cluster import KubeflowConfig
from mydistill.training.job import TrainJob

GROUP, VERSION, PLURAL, KIND = "trainer.kubeflow.org", "v1alpha1", "trainjobs", "TrainJob"
API_VERSION = f"{GROUP}/{VERSION}"
DEFAULT_TEMPLATE = REPO_ROOT / "deploy" / "kubeflow" / "trainjob.yaml"
# set by JobSet / the Job controller on every pod of a TrainJob
JOBSET_NAME_LABEL = "jobset.sigs.k8s.io/jobset-name"
NODE_INDEX_LABEL = "batch.kubernetes.io/job-completion-index"
# ours, on the TrainJob: who made it
FLOW_RUN_LABEL = "mydistill.io/flow-run"
STAGE_LABEL = "mydistill.io/stage"
_PLACEHOLDER = re.compile(r"\{\{\s*([a-z_]+)\s*\}\}")
_DNS_LABEL = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")


class ManifestError(ValueError):
    """The TrainJob template does not render to a valid TrainJob; the message names the file and field."""


def trainjob_name(stage: str, output_uri: str) -> str:
    """``mydistill-<stage>-<hash of the output>``: the same stage output, the same job (63 characters at most)."""
    return f"mydistill-{stage}-{hashlib.sha256(output_uri.encode()).hexdigest()[:12]}"


def render_manifest(template: str | Path, values: dict[str, Any]) -> dict[str, Any]:
    """The template's YAML with its ``{{ key }}`` placeholders filled, checked as a TrainJob.

    A string that is exactly one placeholder becomes the value itself (a list, a mapping, a
    number); a placeholder inside a longer string becomes its text. Filling the parsed tree, not
    the text, keeps a value from ever being read as YAML.
    """
    where = str(template)
    try:
        tree = yaml.safe_load(Path(template).read_text())
    except OSError as e:
        raise ManifestError(f"TrainJob template {where}: cannot read it ({e.strerror or e})") from None
    except yaml.YAMLError as e:
        raise ManifestError(f"TrainJob template {where}: not valid YAML ({str(e).splitlines()[0]})") from None

    def fill(node: Any, path: str) -> Any:
        if isinstance(node, dict):
            return {k: fill(v, f"{path}.{k}" if path else str(k)) for k, v in node.items()}
        if isinstance(node, list):
            return [fill(v, f"{path}[{i}]") for i, v in enumerate(node)]
        if not isinstance(node, str):
            return node
        for key in _PLACEHOLDER.findall(node):
            if key not in values:
                raise ManifestError(
                    f"TrainJob template {where}: {path}: unknown placeholder {{{{ {key} }}}}; known: {', '.join(sorted(values))}"
                )
        whole = _PLACEHOLDER.fullmatch(node.strip())
        if whole:
            return values[whole[1]]
        return _PLACEHOLDER.sub(lambda m: str(values[m[1]]), node)

    manifest = fill(tree, "")
    check_manifest(manifest, where)
    return manifest


def check_manifest(manifest: Any, where: str) -> None:
    """Raise :class:`ManifestError` naming the first field that a TrainJob cannot have."""

    def field(path: str) -> Any:
        node = manifest
        for part in path.split("."):
            if not isinstance(node, dict) or part not in node:
                raise ManifestError(f"TrainJob template {where}: {path} is missing")
            node = node[part]
        return node

    if not isinstance(manifest, dict):
        raise ManifestError(f"TrainJob template {where}: expected a mapping (a TrainJob), got {type(manifest).__name__}")
    if field("apiVersion") != API_VERSION or field("kind") != KIND:
        raise ManifestError(f"TrainJob template {where}: expected apiVersion {API_VERSION} and kind {KIND}")
    name = field("metadata.name")
    if not isinstance(name, str) or len(name) > 63 or not _DNS_LABEL.fullmatch(name):
        raise ManifestError(f"TrainJob template {where}: metadata.name {name!r} is not a DNS label (a-z, 0-9, '-', 63 at most)")
    if not isinstance(field("spec.runtimeRef.name"), str) or not field("spec.runtimeRef.name"):
        raise ManifestError(f"TrainJob template {where}: spec.runtimeRef.name must name a training runtime")
    trainer = field("spec.trainer")
    nodes = trainer.get("numNodes", 1) if isinstance(trainer, dict) else None
    if not isinstance(nodes, int) or isinstance(nodes, bool) or nodes < 1:
        raise ManifestError(f"TrainJob template {where}: spec.trainer.numNodes must be a whole number >= 1, got {nodes!r}")
    env = trainer.get("env", [])
    if not isinstance(env, list) or not all(isinstance(e, dict) and "name" in e for e in env):
        raise ManifestError(f"TrainJob template {where}: spec.trainer.env must be a list of {{name, value | valueFrom}}")
    leftover = _PLACEHOLDER.search(yaml.safe_dump(manifest))
    if leftover:
        raise ManifestError(f"TrainJob template {where}: placeholder {leftover[0]} was not filled")


def trainjob_manifest(
    job: TrainJob, cfg: KubeflowConfig, *, job_uri: str, nodes: int, num_processes: int,
    env: dict[str, str] | None = None, labels: dict[str, str] | None = None,
) -> dict[str, Any]:
    """The TrainJob for ``job``, from ``cfg.template`` (default ``deploy/kubeflow/trainjob.yaml``)."""
    variables = [{"name": k, "value": str(v)} for k, v in {**(env or {}), **cfg.env, "PYTHONUNBUFFERED": "1"}.items()]
    variables += [
        {"name": k, "valueFrom": {"secretKeyRef": {"name": ref.split("/", 1)[0], "key": ref.split("/", 1)[1]}}}
        for k, ref in cfg.secret_env.items()
    ]
    values = {
        "name": trainjob_name(job.stage, job.output_uri), "namespace": cfg.namespace,
        "labels": {**(labels or {}), STAGE_LABEL: job.stage}, "runtime": cfg.runtime, "image": cfg.image,
        "job_uri": job_uri, "num_nodes": nodes, "num_proc_per_node": num_processes,
        "resources": dict(cfg.resources_per_node), "env": variables,
    }
    return render_manifest(cfg.template or DEFAULT_TEMPLATE, values)
