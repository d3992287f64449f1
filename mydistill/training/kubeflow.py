"""The cluster engine: one training stage as a Kubeflow Trainer v2 ``TrainJob``.

:func:`run_trainjob` writes the training job's JSON on shared storage (beside the stage's
output in the work dir), renders the ``TrainJob`` from its template (``deploy/kubeflow/trainjob.yaml``),
submits it through the official ``kubernetes`` client, streams every node pod's log to a callback
(the Prefect task log), waits on the job's ``Complete`` / ``Failed`` condition and returns the
checkpoint's manifest. Each node pod runs ``torchrun -m mydistill.train --job <uri>``; the torch
runtime gives it the node count, its rank and the master's address (``PET_*``).

* The job's name is fixed by the stage's output, so a retried task finds its own job still
  running and follows it instead of submitting a second one; a failed one is replaced.
* A failure is one line naming the node (pod) that failed first and its last words.
* Stopped from outside (a cancelled or killed flow run: ``KeyboardInterrupt``, Prefect's
  termination signal), it deletes the job, and Kubernetes stops its pods; the flows'
  cancellation and crash hooks call :func:`delete_trainjobs` for the cases where this process
  is already gone. An error of its own (a dropped connection to the API server) leaves the job
  running, for the retry to reattach.

``kubernetes`` is imported here only, inside the functions that need it.
"""

from __future__ import annotations

import collections
import json
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from mydistill import io
from mydistill.config.cluster import KubeflowConfig
from mydistill.training.job import TrainJob
from mydistill.training.kubeflow_manifest import (  # noqa: F401 (the manifest's names are imported from here too)
    API_VERSION,
    DEFAULT_TEMPLATE,
    FLOW_RUN_LABEL,
    GROUP,
    JOBSET_NAME_LABEL,
    KIND,
    NODE_INDEX_LABEL,
    PLURAL,
    STAGE_LABEL,
    VERSION,
    ManifestError,
    check_manifest,
    render_manifest,
    trainjob_manifest,
    trainjob_name,
)
from mydistill.training.launch import WorkerFailed, worker_error, write_job

# a pod waiting for one of these will not start by waiting longer
_HOPELESS = {"ErrImagePull", "ImagePullBackOff", "InvalidImageName", "CreateContainerConfigError", "CreateContainerError"}

LineCallback = Callable[[str], None]


class TrainJobFailed(WorkerFailed):
    """The cluster job failed; the message names the node (pod) that failed and its last words."""


class ClusterRefused(RuntimeError):
    """The Kubernetes API refused a request (no access, no Kubeflow Trainer, an invalid TrainJob):
    retrying cannot help; the message says what was refused and why."""


# ----------------------------------------------------------------------------------------------
# the API


class Cluster:
    """The few Kubernetes API calls the engine makes, in one namespace."""

    def __init__(self, cfg: KubeflowConfig) -> None:
        try:
            from kubernetes import client, config
        except ImportError:
            raise ImportError("engine: kubeflow needs the kubernetes client: pip install kubernetes") from None
        from kubernetes.client.exceptions import ApiException

        self.ApiException = ApiException
        try:
            if cfg.kubeconfig or cfg.context or "KUBERNETES_SERVICE_HOST" not in os.environ:
                api = config.new_client_from_config(config_file=cfg.kubeconfig, context=cfg.context, persist_config=False)
            else:  # inside a pod (the Prefect job on a Kubernetes work pool): its service account
                configuration = client.Configuration()
                config.load_incluster_config(client_configuration=configuration)
                api = client.ApiClient(configuration)
        except config.ConfigException as e:
            raise ClusterRefused(
                f"engine: kubeflow: no access to a Kubernetes cluster ({e}); set kubeflow.kubeconfig (and kubeflow.context), "
                "or run the flow inside the cluster"
            ) from None
        self.host = api.configuration.host
        self.custom = client.CustomObjectsApi(api)
        self.core = client.CoreV1Api(api)
        self.namespace = cfg.namespace

    def refused(self, e: Any, action: str) -> Exception:
        """A refusal by the API (4xx) as one line for people; anything else (5xx, a timeout) as it is."""
        if not (400 <= (e.status or 0) < 500):
            return e
        message = _api_message(e)
        hint = {
            401: ": check the kubeconfig's credentials",
            403: ": the flow run's service account needs deploy/kubeflow/rbac.yaml",
            404: ": is Kubeflow Trainer (its TrainJob CRD) installed on this cluster?",
        }.get(e.status, "")
        return ClusterRefused(f"Kubernetes API {self.host} refused to {action} in namespace {self.namespace}: "
                              f"{e.status} {message}{hint}")

    def get(self, name: str) -> dict[str, Any] | None:
        try:
            return self.custom.get_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, name)
        except self.ApiException as e:
            if e.status == 404 and f'"{name}" not found' in _api_message(e):  # not a 404 for want of the CRD
                return None
            raise self.refused(e, f"read TrainJob {name}") from None

    def create(self, manifest: dict[str, Any]) -> bool:
        """Submit ``manifest``; False when a job of that name exists already."""
        try:
            self.custom.create_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, manifest)
            return True
        except self.ApiException as e:
            if e.status == 409:
                return False
            raise self.refused(e, f"create TrainJob {manifest['metadata']['name']}") from None

    def delete(self, name: str) -> bool:
        """Delete the job (its pods go with it); False when there was none."""
        try:
            self.custom.delete_namespaced_custom_object(
                GROUP, VERSION, self.namespace, PLURAL, name, propagation_policy="Foreground",
            )
            return True
        except self.ApiException as e:
            if e.status == 404:
                return False
            raise self.refused(e, f"delete TrainJob {name}") from None

    def wait_gone(self, name: str, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while self.get(name) is not None:
            if time.monotonic() > deadline:
                raise TrainJobFailed(f"TrainJob {self.namespace}/{name} was deleted but is still there after {timeout:.0f} s")
            time.sleep(0.5)

    def list(self, labels: dict[str, str]) -> list[dict[str, Any]]:
        selector = ",".join(f"{k}={v}" for k, v in labels.items())
        try:
            return self.custom.list_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, label_selector=selector)["items"]
        except self.ApiException as e:
            raise self.refused(e, "list TrainJobs") from None

    def pods(self, name: str) -> list[Any]:
        try:
            return self.core.list_namespaced_pod(self.namespace, label_selector=f"{JOBSET_NAME_LABEL}={name}").items
        except self.ApiException as e:
            raise self.refused(e, f"list the pods of TrainJob {name}") from None

    def follow(self, pod: str) -> Any:
        """The pod's log as a stream (an HTTP response: close it to stop)."""
        return self.core.read_namespaced_pod_log(pod, self.namespace, follow=True, _preload_content=False)

    def tail(self, pod: str, lines: int = 200) -> list[str]:
        try:
            return self.core.read_namespaced_pod_log(pod, self.namespace, tail_lines=lines).splitlines()
        except self.ApiException:
            return []


def _api_message(e: Any) -> str:
    """The message of the API's ``Status`` answer (its body), else the HTTP reason."""
    try:
        return json.loads(e.body or "{}").get("message") or e.reason or ""
    except (ValueError, AttributeError):
        return e.reason or ""


def condition(trainjob: dict[str, Any], kind: str) -> dict[str, Any] | None:
    """The TrainJob's ``kind`` condition (``Complete``, ``Failed``) when it is true."""
    for c in (trainjob.get("status") or {}).get("conditions") or []:
        if c.get("type") == kind and c.get("status") == "True":
            return c
    return None


def node_of(pod: Any) -> str:
    return (pod.metadata.labels or {}).get(NODE_INDEX_LABEL, "?")


# ----------------------------------------------------------------------------------------------
# following the pods' logs


class LogFollower:
    """One thread per node pod, each reading its log as it comes; lines wait in a queue for the
    caller's thread (Prefect's logger belongs to the task's thread), and each pod's last lines are
    kept for the error message."""

    def __init__(self, cluster: Cluster, tail_lines: int = 400) -> None:
        self.cluster = cluster
        self.lines: queue.Queue[str] = queue.Queue()
        self.tails: dict[str, collections.deque[str]] = {}
        self._threads: dict[str, threading.Thread] = {}
        self._streams: list[Any] = []
        self._tail_lines = tail_lines

    def watch(self, pods: list[Any]) -> None:
        """Start following each pod that has started (or already ended) and is not followed yet."""
        for pod in pods:
            name = pod.metadata.name
            if name in self._threads or (pod.status and pod.status.phase) == "Pending":
                continue
            self.tails[name] = collections.deque(maxlen=self._tail_lines)
            thread = threading.Thread(target=self._read, args=(name, f"[node {node_of(pod)}] "), daemon=True)
            self._threads[name] = thread
            thread.start()

    def _read(self, pod: str, prefix: str) -> None:
        try:
            stream = self.cluster.follow(pod)
        except Exception as e:  # noqa: BLE001 - a log we cannot read is said, not fatal
            self.lines.put(f"{prefix}(cannot read the log: {e})")
            return
        self._streams.append(stream)
        try:
            for line in _lines(stream):
                self.tails[pod].append(line)
                self.lines.put(prefix + line)
        except Exception:  # noqa: BLE001 - the stream was closed under us (stop) or dropped
            pass

    def drain(self, on_line: LineCallback, timeout: float) -> None:
        """Pass on the lines that came, waiting up to ``timeout`` seconds for the first."""
        try:
            on_line(self.lines.get(timeout=timeout))
            while True:
                on_line(self.lines.get_nowait())
        except queue.Empty:
            pass

    def finish(self, on_line: LineCallback, timeout: float = 15.0) -> None:
        """Wait (a while) for the pods' last lines, then pass them on."""
        deadline = time.monotonic() + timeout
        for thread in self._threads.values():
            thread.join(timeout=max(0.0, deadline - time.monotonic()))
        self.drain(on_line, timeout=0)

    def stop(self) -> None:
        for stream in self._streams:
            try:
                stream.close()
            except Exception:  # noqa: BLE001 - closing is best effort
                pass


def _lines(stream: Any) -> Iterator[str]:
    # chunk by chunk as the API server sends them (amt=None: one chunk at a time), split into lines
    pending = b""
    for chunk in stream.stream(amt=None, decode_content=False):
        pending += chunk
        *done, pending = pending.split(b"\n")
        for raw in done:
            yield raw.decode("utf-8", "replace").rstrip("\r")
    if pending:
        yield pending.decode("utf-8", "replace")


# ----------------------------------------------------------------------------------------------
# the stage


def run_trainjob(
    job: TrainJob, cfg: KubeflowConfig, *, nodes: int, num_processes: int, on_line: LineCallback | None = None,
    env: dict[str, str] | None = None, labels: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Run ``job`` as a TrainJob (or follow the one already running for its output); returns the
    checkpoint's manifest. See the module's docstring."""
    say = on_line or (lambda line: None)
    if not io.is_remote(job.output_uri) and not os.path.isabs(job.output_uri):
        raise ValueError(
            f"engine: kubeflow: the work dir must be shared by every node, an absolute path (a shared volume) "
            f"or s3://; the stage's output {job.output_uri!r} is relative"
        )
    cluster = Cluster(cfg)
    name = trainjob_name(job.stage, job.output_uri)
    where = f"TrainJob {cfg.namespace}/{name}"
    existing = cluster.get(name)
    if existing is not None and condition(existing, "Failed"):
        say(f"{where}: an earlier attempt failed; deleting it to start again")
        cluster.delete(name)
        cluster.wait_gone(name)
        existing = None
    submitted = False
    if existing is None:
        job_uri = write_job(job)
        manifest = trainjob_manifest(job, cfg, job_uri=job_uri, nodes=nodes, num_processes=num_processes, env=env, labels=labels)
        submitted = cluster.create(manifest)
    say(f"{where}: submitted ({nodes} node(s) × {num_processes} process(es), image {cfg.image})" if submitted
        else f"{where}: already there (an earlier attempt's): following it instead of submitting another")
    logs = LogFollower(cluster)
    try:
        _wait(cluster, name, where, logs, say, cfg.poll_seconds)
    except Exception:
        raise  # our own error, or the API's: the job runs on, and a retry reattaches to it
    except BaseException:
        # stopped from outside (cancelled, killed): take the job down with us
        say(f"{where}: stopped; deleting the TrainJob and its pods")
        cluster.delete(name)
        raise
    finally:
        logs.stop()
    manifest = io.read_manifest(job.output_uri)
    if manifest is None:
        raise TrainJobFailed(f"{where} completed but wrote no model at {job.output_uri}")
    return manifest


def _transient(error: BaseException) -> bool:
    """A blip on the way to the API server (a dropped connection, a timeout, a 5xx): worth asking again."""
    import urllib3

    status = getattr(error, "status", None)
    return isinstance(error, (urllib3.exceptions.HTTPError, ConnectionError, TimeoutError)) or (
        isinstance(status, int) and status >= 500 and not isinstance(error, ClusterRefused)
    )


def _patiently(call: Callable[[], Any]) -> Any:
    """``call()``, asked again on a transient error for about two minutes: a training job outlives
    a restart of the API server, and so does the stage waiting on it."""
    from tenacity import Retrying, retry_if_exception, stop_after_delay, wait_exponential

    for attempt in Retrying(retry=retry_if_exception(_transient), stop=stop_after_delay(120),
                            wait=wait_exponential(multiplier=0.5, max=15), reraise=True):
        with attempt:
            return call()


def _wait(cluster: Cluster, name: str, where: str, logs: LogFollower, say: LineCallback, poll: float) -> None:
    next_check = 0.0
    while True:
        logs.drain(say, timeout=max(0.0, min(poll, next_check - time.monotonic())))
        if time.monotonic() < next_check:
            continue
        next_check = time.monotonic() + poll
        pods = _patiently(lambda: cluster.pods(name))
        logs.watch(pods)
        trainjob = _patiently(lambda: cluster.get(name))
        if trainjob is None:
            logs.finish(say, timeout=2)
            raise TrainJobFailed(f"{where} was deleted while the stage was waiting on it")
        if condition(trainjob, "Complete"):
            logs.finish(say)
            say(f"{where}: complete")
            return
        stuck = _hopeless(pods)
        failed = condition(trainjob, "Failed")
        if failed or stuck:
            logs.finish(say)
            if stuck:  # Kubernetes would keep the job waiting: give it up
                cluster.delete(name)
            raise TrainJobFailed(f"{where} failed: {stuck or describe_failure(cluster, name, failed, logs.tails)}")


def _hopeless(pods: list[Any]) -> str | None:
    """A pod waiting on something time will not fix (no such image, a missing Secret), said in one line."""
    for pod in pods:
        for status in (pod.status and pod.status.container_statuses) or []:
            waiting = status.state and status.state.waiting
            if waiting and waiting.reason in _HOPELESS:
                return f"node {node_of(pod)} (pod {pod.metadata.name}) cannot start: {waiting.reason}: {waiting.message or ''}".rstrip(": ")
    return None


def describe_failure(cluster: Cluster, name: str, failed: dict[str, Any] | None, tails: dict[str, Any]) -> str:
    """The node (pod) that failed first, its exit code and its last words, in one line."""
    ended = []
    for pod in cluster.pods(name):
        for status in (pod.status and pod.status.container_statuses) or []:
            done = status.state and status.state.terminated
            if done and done.exit_code:
                # the first to fail is the cause; the others were stopped because of it (137, 143)
                ended.append((done.exit_code in (137, 143), done.finished_at or 0, node_of(pod), pod.metadata.name, done.exit_code))
    if not ended:
        reason = f"{(failed or {}).get('reason', '')}: {(failed or {}).get('message', '')}".strip(": ")
        return reason or "no pod says why"
    _, _, node, pod, code = min(ended, key=lambda e: (e[0], str(e[1]), e[2]))
    lines = list(tails.get(pod) or cluster.tail(pod))
    error, _ = worker_error(lines)
    return f"node {node} (pod {pod}) exited with code {code}: {error}"


def delete_trainjobs(cfg: KubeflowConfig, labels: dict[str, str]) -> list[str]:
    """Delete every TrainJob in ``cfg.namespace`` with these labels (a cancelled flow run's); returns their names."""
    cluster = Cluster(cfg)
    names = [item["metadata"]["name"] for item in cluster.list(labels)]
    return [name for name in names if cluster.delete(name)]
