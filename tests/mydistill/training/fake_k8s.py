"""A fake Kubernetes API on loopback, for the cluster engine's tests: Kubeflow Trainer's TrainJob,
with each node pod run as a local process.

What it serves, just enough for the official ``kubernetes`` client as
:mod:`mydistill.training.kubeflow` calls it:

* TrainJobs (``trainer.kubeflow.org/v1alpha1``): create (409 for a name in use; 422 for an unknown
  runtime or a missing command), get, list by label selector, delete.
* Pods: list by label selector; a pod's log, whole, its last ``tailLines``, or followed
  (``follow=true``: sent chunk by chunk while the process runs, as the API server does).

Creating a TrainJob starts ``spec.trainer.numNodes`` "pods" at once, each a local process group
running the trainer's ``command`` + ``args`` in a folder of its own (its working directory, ``HOME``
and ``TMPDIR``), with the environment the torch runtime of Kubeflow Trainer injects:
``PET_NNODES``, ``PET_NPROC_PER_NODE``, ``PET_NODE_RANK``, ``PET_MASTER_ADDR``, ``PET_MASTER_PORT``,
and the trainer's ``env`` (values, and ``secretKeyRef`` read from :attr:`FakeKubernetes.secrets`;
a missing Secret leaves the pod waiting with ``CreateContainerConfigError``, as the kubelet does).
Pods carry the labels JobSet puts on them (``jobset.sigs.k8s.io/jobset-name``,
``jobset.sigs.k8s.io/replicatedjob-name: node``, ``batch.kubernetes.io/job-completion-index``).
:attr:`FakeKubernetes.unavailable` makes the next requests fail with 503, as a restarting API server. When
every pod exits 0 the TrainJob gets ``Complete``; when one fails it gets ``Failed`` and the others
are stopped (SIGTERM, exit code 143), as JobSet's default failure policy does. Deleting a
TrainJob kills its pods' process groups.

What it leaves out: scheduling and resources (``resourcesPerNode`` is accepted and ignored; no
pod waits for a GPU), images (every "container" runs this Python environment; ``image`` is
recorded only), volumes (the pods share this machine's file system, so a local work dir stands in
for shared storage), networking (``PET_MASTER_ADDR`` is 127.0.0.1 with a free port, not the headless
Service's DNS name and 29400), RBAC and authentication (any request is allowed), JobSet and Job
objects, restarts (``restartPolicy``, ``backoffLimit``), the initializers, ``suspend``, watches,
admission webhooks beyond the two checks above, resourceVersion / conflicts on update, and
finalizers (deletion is immediate).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

TRAINJOBS = re.compile(r"^/apis/trainer\.kubeflow\.org/v1alpha1/namespaces/(?P<ns>[^/]+)/trainjobs(?:/(?P<name>[^/]+))?$")
PODS = re.compile(r"^/api/v1/namespaces/(?P<ns>[^/]+)/pods(?:/(?P<name>[^/]+)(?P<log>/log)?)?$")
RUNTIMES = {"torch-distributed"}


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _matches(labels: dict[str, str], selector: str | None) -> bool:
    for term in filter(None, (selector or "").split(",")):
        key, _, value = term.partition("=")
        if labels.get(key.strip()) != value.strip():
            return False
    return True


class FakePod:
    def __init__(self, job: FakeTrainJob, index: int, folder: Path) -> None:
        self.job, self.index, self.folder = job, index, folder
        self.name = f"{job.name}-node-0-{index}-{uuid.uuid4().hex[:5]}"
        self.log_path = folder / "log"
        self.proc: subprocess.Popen | None = None
        self.phase = "Pending"
        self.waiting: tuple[str, str] | None = None
        self.exit_code: int | None = None
        self.finished_at: str | None = None

    def as_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {}
        if self.exit_code is not None:
            state["terminated"] = {"exitCode": self.exit_code, "finishedAt": self.finished_at,
                                   "reason": "Completed" if self.exit_code == 0 else "Error"}
        elif self.waiting:
            state["waiting"] = {"reason": self.waiting[0], "message": self.waiting[1]}
        elif self.phase == "Running":
            state["running"] = {"startedAt": _now()}
        image = self.job.body["spec"]["trainer"].get("image", "")
        return {
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {
                "name": self.name, "namespace": self.job.namespace, "labels": {
                    "jobset.sigs.k8s.io/jobset-name": self.job.name, "jobset.sigs.k8s.io/replicatedjob-name": "node",
                    "batch.kubernetes.io/job-completion-index": str(self.index),
                    "trainer.kubeflow.org/trainjob-ancestor-step": "trainer",
                },
            },
            "spec": {"containers": [{"name": "node", "image": image}]},
            "status": {"phase": self.phase, "containerStatuses": [
                {"name": "node", "image": image, "imageID": "", "ready": self.phase == "Running", "restartCount": 0, "state": state},
            ]},
        }


class FakeTrainJob:
    def __init__(self, body: dict[str, Any], namespace: str) -> None:
        self.body, self.namespace = body, namespace
        self.name = body["metadata"]["name"]
        body["metadata"].update(namespace=namespace, uid=str(uuid.uuid4()), creationTimestamp=_now())
        body["status"] = {"conditions": []}
        self.pods: list[FakePod] = []

    def set_condition(self, kind: str, reason: str, message: str) -> None:
        conditions = self.body["status"]["conditions"]
        if not any(c["type"] in ("Complete", "Failed") for c in conditions):
            conditions.append({"type": kind, "status": "True", "reason": reason, "message": message, "lastTransitionTime": _now()})


class FakeKubernetes:
    """The fake API server. ``with FakeKubernetes(tmp) as k8s: k8s.write_kubeconfig(path)``.

    ``created`` lists every TrainJob name ever created (so a test can count submissions);
    ``secrets`` maps Secret name to its data, for ``secretKeyRef``.
    """

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        self.jobs: dict[tuple[str, str], FakeTrainJob] = {}
        self.created: list[str] = []
        self.secrets: dict[str, dict[str, str]] = {}
        self.lock = threading.RLock()
        self._dead_groups: list[int] = []
        self.unavailable = 0  # answer this many next requests 503, as an API server restarting does
        # the "image": this Python environment, its scripts (torchrun) first on PATH
        self.image_env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:  # quiet
                pass

            def do_GET(self) -> None:
                fake._dispatch(self, "GET")

            def do_POST(self) -> None:
                fake._dispatch(self, "POST")

            def do_DELETE(self) -> None:
                fake._dispatch(self, "DELETE")

        self.server = ThreadingHTTPServer(("127.0.0.1", _free_port()), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    # lifecycle ---------------------------------------------------------------------------------

    def __enter__(self) -> FakeKubernetes:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        for job in list(self.jobs.values()):
            self._kill(job)
        self.server.shutdown()
        self.server.server_close()

    def write_kubeconfig(self, path: Path | str) -> str:
        config = {
            "apiVersion": "v1", "kind": "Config", "current-context": "fake",
            "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
            "users": [{"name": "fake", "user": {"token": "fake"}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake", "namespace": "default"}}],
        }
        Path(path).write_text(json.dumps(config))
        return str(path)

    def process_groups(self) -> list[int]:
        """Every pod process group ever started (live or not)."""
        return [pod.proc.pid for job in self.jobs.values() for pod in job.pods if pod.proc] + list(self._dead_groups)

    # HTTP --------------------------------------------------------------------------------------

    def _dispatch(self, req: BaseHTTPRequestHandler, method: str) -> None:
        url = urlparse(req.path)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        length = int(req.headers.get("Content-Length") or 0)
        body = json.loads(req.rfile.read(length) or b"null") if length else None
        with self.lock:
            down, self.unavailable = self.unavailable > 0, max(0, self.unavailable - 1)
        if down:
            return self._send(req, 503, _status(503, "ServiceUnavailable", "the fake is restarting"))
        try:
            if m := TRAINJOBS.match(url.path):
                self._trainjobs(req, method, m["ns"], m["name"], query, body)
            elif m := PODS.match(url.path):
                self._pods(req, method, m["ns"], m["name"], bool(m["log"]), query)
            else:
                self._send(req, 404, _status(404, "NotFound", f"the fake serves no {url.path}"))
        except (BrokenPipeError, ConnectionResetError):
            pass

    def _send(self, req: BaseHTTPRequestHandler, code: int, obj: Any, content_type: str = "application/json") -> None:
        data = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
        req.send_response(code)
        req.send_header("Content-Type", content_type)
        req.send_header("Content-Length", str(len(data)))
        req.end_headers()
        req.wfile.write(data)

    def _trainjobs(self, req, method: str, ns: str, name: str | None, query: dict, body: Any) -> None:
        with self.lock:
            if method == "POST" and name is None:
                problem = _invalid(body)
                if problem:
                    return self._send(req, 422, _status(422, "Invalid", problem))
                if (ns, body["metadata"]["name"]) in self.jobs:
                    return self._send(req, 409, _status(409, "AlreadyExists", f'trainjobs "{body["metadata"]["name"]}" already exists'))
                job = FakeTrainJob(body, ns)
                self.jobs[(ns, job.name)] = job
                self.created.append(job.name)
                self._start(job)
                return self._send(req, 201, job.body)
            if method == "GET" and name is None:
                items = [j.body for (n, _), j in self.jobs.items() if n == ns and _matches(j.body["metadata"].get("labels") or {}, query.get("labelSelector"))]
                return self._send(req, 200, {"apiVersion": "trainer.kubeflow.org/v1alpha1", "kind": "TrainJobList", "metadata": {}, "items": items})
            job = self.jobs.get((ns, name or ""))
            if job is None:
                return self._send(req, 404, _status(404, "NotFound", f'trainjobs.trainer.kubeflow.org "{name}" not found'))
            if method == "GET":
                return self._send(req, 200, job.body)
            if method == "DELETE":
                del self.jobs[(ns, job.name)]
        self._kill(job)
        self._send(req, 200, _status(200, "Success", "deleted"))

    def _pods(self, req, method: str, ns: str, name: str | None, log: bool, query: dict) -> None:
        with self.lock:
            pods = [p for (n, _), j in self.jobs.items() if n == ns for p in j.pods]
        if method != "GET":
            return self._send(req, 405, _status(405, "MethodNotAllowed", "the fake's pods are read-only"))
        if name is None:
            items = [p.as_dict() for p in pods if _matches(p.as_dict()["metadata"]["labels"], query.get("labelSelector"))]
            return self._send(req, 200, {"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": items})
        pod = next((p for p in pods if p.name == name), None)
        if pod is None or not log:
            return self._send(req, 404 if pod is None else 200, _status(404, "NotFound", f'pods "{name}" not found') if pod is None else pod.as_dict())
        if query.get("follow") != "true":
            text = pod.log_path.read_bytes() if pod.log_path.exists() else b""
            if "tailLines" in query:
                text = b"".join(text.splitlines(keepends=True)[-int(query["tailLines"]):])
            return self._send(req, 200, text, "text/plain")
        self._follow(req, pod)

    def _follow(self, req: BaseHTTPRequestHandler, pod: FakePod) -> None:
        req.send_response(200)
        req.send_header("Content-Type", "text/plain")
        req.send_header("Transfer-Encoding", "chunked")
        req.end_headers()
        with open(pod.log_path, "rb") as f:
            while True:
                ended = pod.exit_code is not None or pod.proc is None
                data = f.read(65536)
                if data:
                    req.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                    req.wfile.flush()
                elif ended:
                    break
                else:
                    time.sleep(0.05)
        req.wfile.write(b"0\r\n\r\n")
        req.wfile.flush()

    # pods as processes ---------------------------------------------------------------------------

    def _start(self, job: FakeTrainJob) -> None:
        trainer = job.body["spec"].get("trainer") or {}
        nodes = int(trainer.get("numNodes", 1))
        per_node = trainer.get("numProcPerNode", "auto")
        port = _free_port()
        command = [*trainer.get("command", []), *trainer.get("args", [])]
        for index in range(nodes):
            folder = self.root / job.namespace / job.name / f"node-{index}"
            shutil.rmtree(folder, ignore_errors=True)
            for sub in ("work", "home", "tmp"):
                (folder / sub).mkdir(parents=True)
            pod = FakePod(job, index, folder)
            pod.log_path.touch()
            job.pods.append(pod)
            env, missing = self._container_env(trainer.get("env") or [])
            if missing:
                pod.waiting = ("CreateContainerConfigError", missing)
                continue
            env.update({
                "HOME": str(folder / "home"), "TMPDIR": str(folder / "tmp"),
                "PET_NNODES": str(nodes), "PET_NPROC_PER_NODE": str(1 if per_node == "auto" else per_node),
                "PET_NODE_RANK": str(index), "PET_MASTER_ADDR": "127.0.0.1", "PET_MASTER_PORT": str(port),
            })
            with open(pod.log_path, "ab") as log:
                pod.proc = subprocess.Popen(command, cwd=folder / "work", env=env, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True)
            pod.phase = "Running"
            threading.Thread(target=self._watch, args=(job, pod), daemon=True).start()

    def _container_env(self, variables: list[dict[str, Any]]) -> tuple[dict[str, str], str | None]:
        env = dict(self.image_env)
        for var in variables:
            ref = (var.get("valueFrom") or {}).get("secretKeyRef")
            if ref is None:
                env[var["name"]] = str(var.get("value", ""))
                continue
            secret = self.secrets.get(ref["name"])
            if secret is None or ref["key"] not in secret:
                return env, f'secret "{ref["name"]}" not found' if secret is None else f'couldn\'t find key {ref["key"]} in Secret {ref["name"]}'
            env[var["name"]] = secret[ref["key"]]
        return env, None

    def _watch(self, job: FakeTrainJob, pod: FakePod) -> None:
        assert pod.proc is not None
        code = pod.proc.wait()
        with self.lock:
            pod.exit_code = code if code >= 0 else 128 - code  # killed by signal N: 128 + N, as a container reports it
            pod.finished_at = _now()
            pod.phase = "Succeeded" if code == 0 else "Failed"
            if code != 0:
                job.set_condition("Failed", "FailedJobs", f"jobset failed: pod {pod.name} exited with code {pod.exit_code}")
                others = [p for p in job.pods if p is not pod]
            elif all(p.exit_code == 0 for p in job.pods):
                job.set_condition("Complete", "JobsCompleted", "jobset completed successfully")
                others = []
            else:
                others = []
        for other in others:
            _stop(other)

    def _kill(self, job: FakeTrainJob) -> None:
        for pod in job.pods:
            if pod.proc is not None:
                self._dead_groups.append(pod.proc.pid)
            _stop(pod)


def _stop(pod: FakePod, grace: float = 5.0) -> None:
    """SIGTERM the pod's process group, SIGKILL it after ``grace`` seconds (the kubelet's way)."""
    if pod.proc is None or pod.proc.poll() is not None and not _group_alive(pod.proc.pid):
        return
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pod.proc.pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if pod.proc.poll() is not None and not _group_alive(pod.proc.pid):
                return
            time.sleep(0.05)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def group_alive(pgid: int) -> bool:
    """Whether any process of the group still runs (zombies aside)."""
    if not _group_alive(pgid):
        return False
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def _invalid(body: Any) -> str | None:
    if not isinstance(body, dict) or body.get("apiVersion") != "trainer.kubeflow.org/v1alpha1" or body.get("kind") != "TrainJob":
        return "expected a trainer.kubeflow.org/v1alpha1 TrainJob"
    name = (body.get("metadata") or {}).get("name", "")
    if not re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name) or len(name) > 63:
        return f"metadata.name {name!r} must match RFC 1035 DNS label format"
    runtime = ((body.get("spec") or {}).get("runtimeRef") or {}).get("name")
    if runtime not in RUNTIMES:
        return f"spec.runtimeRef.name: ClusterTrainingRuntime {runtime!r} not found (the fake knows {sorted(RUNTIMES)})"
    if not ((body["spec"].get("trainer") or {}).get("command")):
        return "spec.trainer.command: the fake has no runtime image to take a default command from"
    return None


def _status(code: int, reason: str, message: str) -> dict[str, Any]:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success" if code < 400 else "Failure",
            "message": message, "reason": reason, "code": code}
