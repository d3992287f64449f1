"""The ``mydistill`` command line.

``mydistill run [PRESET|FILE] [key=value …]`` runs the Prefect pipeline flow (no server needed:
Prefect's ephemeral API keeps its state under ``.prefect/``) and prints a summary table.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from mydistill.environment import apply_defaults

apply_defaults()

app = typer.Typer(help="Distil a large language model into a small one.", no_args_is_help=True, add_completion=False)
console = Console()


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
    from flows.pipeline_flow import distill_pipeline

    start = time.perf_counter()
    result = distill_pipeline(config=cfg)
    elapsed = time.perf_counter() - start
    print_summary(result, elapsed)


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
    """Show where each stage of this config reads and writes, and which are already done."""
    from mydistill import io
    from mydistill.plan import make_plan

    p = make_plan(_load(config, overrides))
    table = Table("artifact", "uri", "done")
    for name, uri in p.as_dict().items():
        if uri and name.endswith("_uri"):
            done = io.read_manifest(uri) is not None if not uri.endswith(".jsonl") else io.exists(uri)
            table.add_row(name.removesuffix("_uri"), uri, "✓" if done else "")
    console.print(table)


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


def print_summary(result: dict[str, Any], elapsed: float) -> None:
    report, decision = result["report"], result["decision"]
    table = Table(title=f"mydistill — pipeline finished in {elapsed:.0f} s")
    for column in ("model", "exact match", "% of teacher", "perplexity", "KL to teacher", "top-1 agree", "parameters"):
        table.add_column(column, justify="right" if column != "model" else "left")
    for name, m in report["models"].items():
        table.add_row(
            name,
            f"{m['exact_match']:.1%}",
            f"{m['teacher_retained']:.1%}" if "teacher_retained" in m else "—",
            f"{m['perplexity']:.3f}",
            f"{m['kl_to_teacher']:.3f}" if "kl_to_teacher" in m else "—",
            f"{m['top1_agreement']:.1%}" if "top1_agreement" in m else "—",
            f"{m['parameters']:,}",
        )
    console.print(table)
    gate = "[green]passed[/green]" if decision["passed"] else "[yellow]not passed[/yellow]"
    console.print(f"quality gate {gate}: {decision['reason']}")
    if decision.get("registered"):
        alias = f", alias '{decision['alias']}'" if decision.get("alias") else ""
        console.print(f"registered {decision['model_name']} version {decision['version']}{alias}")
    console.print(f"student: {result['plan']['finetune_uri'] or result['plan']['distill_uri']}")
    console.print(f"MLflow run: {result['mlflow_run_id']}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
