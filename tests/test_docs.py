"""The docs' model-loading snippets run: a renamed model fails here, not for the person who copies them.

The README's Python blocks and ``docs/operations.md``'s inline ``mlflow.….load_model(...)`` calls
are taken from the markdown as written and run against a registry made as the pipeline makes it
(a tiny student registered by the ``register`` stage under the preset's ``registry.model_name``):
the README's for the ``demo`` preset (what ``mydistill run`` runs), the operations guide's for the
stack's default preset. Every other ``models:/NAME@ALIAS`` in them (``mlflow models serve``) must
name a registered alias too.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

from mydistill import stage_functions, tracking
from mydistill.config import load_config
from mydistill.pipeline.plan import make_plan
from tests.conftest import save_tiny_model

pytestmark = pytest.mark.slow  # logs and loads MLflow models of the transformers flavor (about 20 s)

REPO = Path(__file__).resolve().parent.parent


def stack_default_preset() -> str:
    spec = importlib.util.spec_from_file_location("stack", REPO / "scripts" / "stack.py")
    stack = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(stack)
    return stack.DEFAULT_PRESET


def python_blocks(markdown: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", markdown, re.S)


def load_calls(markdown: str) -> list[str]:
    """Inline code that loads a registered model: `mlflow.pyfunc.load_model("models:/…")`."""
    return re.findall(r"`(mlflow\.\w+\.load_model\(\"models:/[^\"]+\"\))`", markdown)


def model_references(markdown: str) -> set[tuple[str, str]]:
    return set(re.findall(r"models:/([\w.-]+)@([\w-]+)", markdown))


@pytest.fixture(scope="module")
def demo_registry(tmp_path_factory, demo_tokenizer):
    """A sqlite store at ``<dir>/.mlflow/mlflow.db`` (where `mydistill run` keeps it, relative to the
    folder it runs in) with a student registered, as the pipeline does, for each preset the docs use."""
    import mlflow

    root = tmp_path_factory.mktemp("docs")
    before = mlflow.get_tracking_uri()
    tracking.configure(f"sqlite:///{root}/.mlflow/mlflow.db")
    (root / ".mlflow").mkdir()
    try:
        for preset in dict.fromkeys(["demo", stack_default_preset()]):
            cfg = load_config(preset, [f"work_dir={root}/{preset}", "tracking.experiment=docs-test"])
            plan = make_plan(cfg)
            save_tiny_model(plan.student_uri, demo_tokenizer, seed=0)
            report = {"models": {"student": {"exact_match": 0.5, "teacher_retained": 1.0}}}
            decision = stage_functions.register(cfg, plan, report, tracking.start_run(cfg.tracking.experiment, preset))
            assert decision["alias"] == "champion", decision
        yield root
    finally:
        tracking.configure(before)


def test_the_readmes_loading_snippet_runs_against_the_demos_registry(demo_registry, monkeypatch):
    markdown = (REPO / "README.md").read_text()
    blocks = [b for b in python_blocks(markdown) if "models:/" in b]
    assert blocks, "README.md has no model-loading snippet any more"
    monkeypatch.chdir(demo_registry)  # the snippet's store is relative: sqlite:///.mlflow/mlflow.db
    for block in blocks:
        scope: dict = {}
        exec(compile(block, "README.md snippet", "exec"), scope)  # running the docs is the point
        assert isinstance(scope["chat"].predict(["reverse: dbcaf"])[0], str)
    for name, alias in model_references(markdown):
        assert tracking.client().get_model_version_by_alias(name, alias), (name, alias)


def test_the_operations_guides_loading_calls_run_against_the_stacks_registry(demo_registry):
    import mlflow

    markdown = (REPO / "docs" / "operations.md").read_text()
    calls = load_calls(markdown)
    assert {c.split("(")[0] for c in calls} >= {"mlflow.pyfunc.load_model", "mlflow.transformers.load_model"}, calls
    for call in calls:
        assert eval(call, {"mlflow": mlflow}) is not None  # running the docs is the point
    names = {name for name, _ in model_references(markdown)}
    assert load_config(stack_default_preset()).registry.model_name in names
    for name, alias in model_references(markdown):
        assert tracking.client().get_model_version_by_alias(name, alias), (name, alias)
