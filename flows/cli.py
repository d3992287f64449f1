"""The ``mydistill`` command line.

``mydistill run [PRESET|FILE] [key=value …]`` runs the Prefect pipeline flow (no server needed:
Prefect's ephemeral API keeps its state under ``.prefect/``) and prints a summary table.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
from collections.abc import Iterator
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from mydistill import raised_by_us
from mydistill.environment import apply_defaults

apply_defaults()

app = typer.Typer(help="Distil a large language model into a small one.", no_args_is_help=True, add_completion=False)
# piped output (a worker's log, `| tee`) gets full-width tables instead of cells cut at 80 columns
console = Console() if sys.stdout.isatty() else Console(width=200)
DEBUG_ENV = "MYDISTILL_DEBUG"


@app.callback()
def options(
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks (also: MYDISTILL_DEBUG=1).")] = False,
) -> None:
    if debug:
        os.environ[DEBUG_ENV] = "1"


def _debug() -> bool:
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


@contextlib.contextmanager
def one_line_errors() -> Iterator[None]:
    """Print a failure as ``error: <message>`` and exit 2 (1 for an unexpected error, with its type);
    the traceback only with ``--debug``. Prefect's own failure logs lose their tracebacks too."""
    if not _debug():
        _drop_tracebacks_from_logs()
    try:
        yield
    except (typer.Exit, KeyboardInterrupt):
        raise
    except Exception as e:
        if _debug():
            raise
        message = str(e).split("\n", 1)[0] if type(e).__name__ == "WorkerFailed" else str(e)
        if raised_by_us(e):
            console.print(f"[red]error:[/red] {message}", soft_wrap=True, highlight=False)
            raise typer.Exit(2) from None
        console.print(f"[red]error:[/red] {type(e).__name__}: {message} (run with --debug for the traceback)", soft_wrap=True, highlight=False)
        raise typer.Exit(1) from None


def _lost_by_prefect(error: BaseException) -> bool:
    """Prefect's own bookkeeping failed (the ephemeral server under load answered a finished run's
    state report with ObjectNotFound), not the pipeline."""
    from prefect.exceptions import ObjectNotFound, PrefectHTTPStatusError

    return isinstance(error, (ObjectNotFound, PrefectHTTPStatusError))


class _NoTraceback(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.exc_info = record.exc_text = None
        return True


def _drop_tracebacks_from_logs() -> None:
    # a failed task logs its whole traceback (hundreds of lines through Prefect's engine); the
    # message line stays, and the error is printed once more, alone, when the run ends
    for name in ("", "prefect", "prefect.flow_runs", "prefect.task_runs"):
        for handler in logging.getLogger(name).handlers:
            if not any(isinstance(f, _NoTraceback) for f in handler.filters):
                handler.addFilter(_NoTraceback())


def _load(config: str, overrides: list[str] | None):
    from mydistill.config import ConfigError, load_config

    try:
        return load_config(config, overrides or [])
    except ConfigError as e:
        console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from None


@app.command()
def run(
    config: Annotated[str, typer.Argument(help="Preset name in configs/ (e.g. demo) or a YAML file.")] = "demo",
    overrides: Annotated[list[str] | None, typer.Argument(help="key=value overrides, e.g. distill.steps=200")] = None,
) -> None:
    """Run the whole pipeline as a Prefect flow and print the results."""
    cfg = _load(config, overrides)
    with one_line_errors():
        from mydistill.pipeline.preflight import require_preflight

        require_preflight(cfg)  # every input checked before Prefect or any model starts
        from flows.pipeline_flow import distill_pipeline

        if not _debug():
            _drop_tracebacks_from_logs()  # again: importing the flow set up Prefect's log handlers
        start = time.perf_counter()
        try:
            result = distill_pipeline(config=cfg)
        except Exception as e:
            # (a service that kept failing is told in one line by the flow itself: raised_by_us, printed below)
            if not _lost_by_prefect(e):
                raise
            # the work is in the artifacts (every stage idempotent, registration exactly once):
            # a second run answers from them in seconds and reports the outcome
            console.print(f"[yellow]warning:[/yellow] Prefect's API lost track of the run ({type(e).__name__}: {e}); "
                          "running it once more, finished stages answer from their artifacts", soft_wrap=True)
            result = distill_pipeline(config=cfg)
        elapsed = time.perf_counter() - start
    print_summary({**result, "mlflow_run_url": _run_url(cfg, result["mlflow_run_id"])}, elapsed, cfg.costs.currency)


def _run_url(cfg: Any, run_id: str) -> str | None:
    """The run's address in MLflow's "Model training" view, when there is a server to open."""
    from mydistill import tracking

    tracking.configure(cfg.tracking.tracking_uri, cfg.tracking.artifact_location)
    return tracking.run_reference(run_id)["url"] if tracking.ui_base_url() else None


@app.command()
def check(
    config: Annotated[str, typer.Argument(help="Preset name or YAML file.")] = "demo",
    overrides: Annotated[list[str] | None, typer.Argument(help="key=value overrides")] = None,
) -> None:
    """Check everything a run would read (data, models, S3, the API, the work dir) and list every problem."""
    cfg = _load(config, overrides)
    from mydistill.pipeline.preflight import preflight

    start = time.perf_counter()
    problems = preflight(cfg)
    elapsed = time.perf_counter() - start
    for problem in problems:
        console.print(f"[red]error:[/red] {problem}", soft_wrap=True, highlight=False)
    if problems:
        console.print(f"{len(problems)} problem(s) found in {elapsed:.1f} s")
        raise typer.Exit(2)
    console.print(f"ok: the inputs of {config} are readable ({elapsed:.1f} s)")


@app.command()
def validate(
    config: Annotated[str, typer.Argument(help="Preset name or YAML file.")] = "demo",
    overrides: Annotated[list[str] | None, typer.Argument(help="key=value overrides")] = None,
) -> None:
    """Validate a config and print it with every default filled in."""
    cfg = _load(config, overrides)
    console.print_json(json.dumps(cfg.model_dump(mode="json")))


@app.command()
def plan(
    config: Annotated[str, typer.Argument(help="Preset name or YAML file.")] = "demo",
    overrides: Annotated[list[str] | None, typer.Argument(help="key=value overrides")] = None,
) -> None:
    """Show each input's fingerprint, where each stage reads and writes, and which stages a run
    would re-run (and why) or answer from their finished artifacts."""
    from mydistill.pipeline import changes
    from mydistill.pipeline.plan import make_plan

    cfg = _load(config, overrides)
    p = make_plan(cfg)
    found = changes.what_changed(p, changes.previous_run(cfg.work_dir, cfg.name))
    inputs = Table("input", "uri", "fingerprint", "files", "bytes", "since the last run", title="inputs")
    for name, fp in p.fingerprints.items():
        moved = found["inputs"].get(name)
        parts = [k.split(".", 1)[1] for k in found["parts"] if k.startswith(f"{name}.")]
        since = "first run" if found["first_run"] else (f"changed ({', '.join(parts) or 'content'})" if moved else "unchanged")
        inputs.add_row(name, str(fp["uri"]), fp["sha256"], str(fp.get("files", "—")), f"{fp.get('bytes', 0):,}" if "bytes" in fp else "—", since)
    console.print(inputs)
    missing = [name for name, fp in p.fingerprints.items() if fp["sha256"] == "missing"]
    if missing:
        console.print(f"[yellow]not there yet:[/yellow] {', '.join(missing)} (the demo makes its data and teacher on "
                      "its first run); the stages' outputs get their final names once these exist")
    stages = Table("stage", "output", "next run", "why", title="stages")
    for stage, uri in p.stage_uris().items():
        s = found["stages"][stage]
        stages.add_row(stage, uri, "[green]cached[/green]" if s["status"] == "cached" else "[yellow]runs[/yellow]", s["why"])
    console.print(stages)


@app.command("demo-teacher")
def demo_teacher(
    config: Annotated[str, typer.Argument(help="Preset name or YAML file with a `demo` section.")] = "demo",
    overrides: Annotated[list[str] | None, typer.Argument(help="key=value overrides")] = None,
) -> None:
    """Train (or find cached) the demo teacher and print where it is."""
    from mydistill.demo.bootstrap import ensure_teacher

    cfg = _load(config, overrides)
    if cfg.demo is None:
        console.print("[red]error:[/red] this config has no `demo` section")
        raise typer.Exit(2)
    console.print(ensure_teacher(cfg.demo, progress=sys.stderr.isatty()))


def print_summary(result: dict[str, Any], elapsed: float, currency: str = "USD") -> None:
    report, decision = result["report"], result["decision"]
    from mydistill.evaluation.evaluate import category_lines, comparison_lines, summary_table

    table = Table(title=f"mydistill — pipeline finished in {elapsed:.0f} s")
    columns, rows = summary_table(report)
    for column in columns:
        table.add_column(column, justify="right" if column != "model" else "left")
    for row in rows:
        table.add_row(*row)
    console.print(table)
    for line in [*comparison_lines(report), *category_lines(report)]:
        console.print(line)
    gate = "[green]passed[/green]" if decision["passed"] else "[yellow]not passed[/yellow]"
    console.print(f"quality gate {gate}: {decision['reason']}")
    if decision.get("registered"):
        alias = f", alias '{decision['alias']}'" if decision.get("alias") else ""
        console.print(f"registered {decision['model_name']} version {decision['version']}{alias}")
    if result.get("cost"):
        from mydistill.pipeline.costs import cost_lines

        for line in cost_lines(result["cost"], currency):
            console.print(line)
    console.print(f"student: {result['plan']['finetune_uri'] or result['plan']['distill_uri']}")
    console.print(f"MLflow run: {result.get('mlflow_run_url') or result['mlflow_run_id']}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
