"""Shared fixtures: a tiny locally-built tokenizer and model, isolated Prefect/MLflow state."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

# Before anything imports prefect or mlflow: isolated, quiet, offline.
_STATE = Path(tempfile.mkdtemp(prefix="mydistill-tests-"))
os.environ["PREFECT_HOME"] = str(_STATE / "prefect")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["DO_NOT_TRACK"] = "1"
os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{_STATE / 'mlflow.db'}"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

torch.set_num_threads(2)

TINY_ARCH = dict(
    hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
    max_position_embeddings=64, tie_word_embeddings=True,
)


@pytest.fixture(scope="session")
def state_dir() -> Path:
    return _STATE


@pytest.fixture(scope="session")
def demo_tokenizer():
    from mydistill.demo.tokenizer import build_tokenizer

    return build_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, demo_tokenizer) -> str:
    """A 1-layer Llama with the demo tokenizer, saved as a Hugging Face folder (random weights)."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny-model"), demo_tokenizer, seed=0)


def save_tiny_model(path: Path | str, tokenizer, *, seed: int, arch: dict | None = None) -> str:
    """A tiny Llama (``TINY_ARCH`` unless ``arch``) with ``tokenizer``, saved at ``path``; returns the path."""
    from mydistill.models import build_model

    build_model(arch or TINY_ARCH, tokenizer, seed=seed).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3 API on loopback (moto server), with a bucket ``mydistill-test``; stopped afterwards."""
    import subprocess
    import time
    import urllib.request

    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    env = {
        "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing-secret",
        "AWS_DEFAULT_REGION": "us-east-1", "MYDISTILL_S3_ENDPOINT_URL": endpoint,
    }
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        for _ in range(100):
            try:
                urllib.request.urlopen(endpoint, timeout=1)
                break
            except Exception:
                time.sleep(0.1)
        import boto3

        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="mydistill-test")
        yield endpoint
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
