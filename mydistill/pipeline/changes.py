"""What changed since the last run: the inputs whose fingerprints moved, and the stages that run
again (and why) or are answered from their artifacts.

Each finished pipeline run records its plan (input fingerprints and stage outputs) in
``<work_dir>/last-run/<name>.json``; the next run of the same name, and ``mydistill plan``,
compare against it. The flow publishes the result as a Prefect artifact and as MLflow tags.
"""

from __future__ import annotations

import time
from typing import Any

from mydistill import io
from mydistill.pipeline.plan import STAGE_READS, STAGES, StagePlan


def record_uri(work_dir: str, name: str) -> str:
    return io.join(work_dir, "last-run", f"{name}.json")


def previous_run(work_dir: str, name: str) -> dict[str, Any] | None:
    uri = record_uri(work_dir, name)
    return io.read_json(uri) if io.exists(uri) else None


def record_run(work_dir: str, name: str, plan: StagePlan, **extra: Any) -> None:
    """Remember this run's plan for the next run's comparison (written atomically)."""
    io.write_json(record_uri(work_dir, name), {
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "fingerprints": plan.fingerprints, "stages": plan.stage_uris(), **extra,
    })


def _input_sha(fps: dict[str, Any], name: str) -> str | None:
    base, _, part = name.partition(".")
    fp = fps.get(base)
    if fp is None:
        return None
    return (fp.get("parts") or {}).get(part) if part else fp.get("sha256")


def _inputs_read(stage: str, plan: StagePlan) -> set[str]:
    """The fingerprinted inputs ``stage`` depends on, through the stages before it."""
    names: set[str] = set()
    for read in STAGE_READS[stage]:
        if read in STAGES:
            if getattr(plan, f"{read}_uri", None):
                names |= _inputs_read(read, plan)
        elif read == "extra_teachers":
            names |= {n for n in plan.fingerprints if n.startswith("extra_teacher_")}
        elif read == "signal_extra":
            if plan.signal_uri:
                names |= {n for n in plan.fingerprints if n.startswith("signal_extra_")}
        elif read.startswith("teacher.") and "student_init" in plan.fingerprints:
            continue  # the baseline reads a pretrained student's tokenizer, not the teacher's
        elif read.partition(".")[0] in plan.fingerprints:
            names.add(read)
    return names


def what_changed(plan: StagePlan, previous: dict[str, Any] | None) -> dict[str, Any]:
    """``{"inputs": {name: {"before", "now"}}, "stages": {stage: {"status", "why"}}, "first_run"}``.

    A stage's status is ``cached`` when its output (named by its identity) is already complete,
    else ``runs``; ``why`` names the changed inputs it reads, or says the settings changed, the
    output is missing, or there is no earlier run to compare with.
    """
    before = (previous or {}).get("fingerprints", {})
    names = sorted(set(plan.fingerprints) | set(before))
    moved = {}
    for name in names:
        now, was = _input_sha(plan.fingerprints, name), _input_sha(before, name)
        if previous is not None and now != was:
            moved[name] = {"before": was, "now": now}
    # a model's parts: so that the baseline (the teacher's tokenizer only) can tell
    for name, fp in plan.fingerprints.items():
        for part in (fp.get("parts") or {}):
            dotted = f"{name}.{part}"
            if previous is not None and _input_sha(plan.fingerprints, dotted) != _input_sha(before, dotted):
                moved.setdefault(dotted, {"before": _input_sha(before, dotted), "now": _input_sha(plan.fingerprints, dotted)})
    stages = {}
    old_uris = (previous or {}).get("stages", {})
    for stage, uri in plan.stage_uris().items():
        if io.read_manifest(uri) is not None:
            stages[stage] = {"status": "cached", "why": "output complete for these inputs"}
            continue
        changed = sorted(n for n in _inputs_read(stage, plan) if n in moved)
        if changed:
            why = "changed: " + ", ".join(changed)
        elif previous is None:
            why = "no earlier run to compare with"
        elif old_uris.get(stage) == uri:
            why = "output missing (deleted or unfinished)"
        else:
            why = "settings changed"
        stages[stage] = {"status": "runs", "why": why}
    top_level = {k: v for k, v in moved.items() if "." not in k}
    return {"first_run": previous is None, "inputs": top_level, "parts": moved, "stages": stages,
            "previous_finished_at": (previous or {}).get("finished_at")}


def changes_markdown(changes: dict[str, Any], fingerprints: dict[str, Any]) -> str:
    """The Prefect artifact: a table of inputs (fingerprint, moved or not), then one of stages."""
    since = f"since the run finished {changes['previous_finished_at']}" if changes["previous_finished_at"] else "(first run)"
    lines = [f"**What changed {since}**", "", "| input | fingerprint | files | bytes | changed |", "|---|---|---|---|---|"]
    for name, fp in sorted(fingerprints.items()):
        moved = changes["inputs"].get(name)
        parts = [p.split(".", 1)[1] for p in changes["parts"] if p.startswith(f"{name}.")]
        mark = (f"yes (was {moved['before']})" + (f": {', '.join(parts)}" if parts else "")) if moved else ""
        lines.append(f"| {name} | `{fp['sha256']}` | {fp.get('files', '—')} | {fp.get('bytes', '—')} | {mark} |")
    lines += ["", "| stage | this run | why |", "|---|---|---|"]
    lines += [f"| {stage} | {s['status']} | {s['why']} |" for stage, s in changes["stages"].items()]
    return "\n".join(lines)


def changes_tags(changes: dict[str, Any]) -> dict[str, str]:
    """MLflow tags for the parent run: which inputs moved, which stages ran and which were cached."""
    by = lambda status: ",".join(s for s, v in changes["stages"].items() if v["status"] == status) or "-"  # noqa: E731
    return {
        "mydistill.changed_inputs": ",".join(sorted(changes["inputs"])) or ("-" if not changes["first_run"] else "first run"),
        "mydistill.stages_run": by("runs"),
        "mydistill.stages_cached": by("cached"),
    }


def champion_history_figure(runs: list[dict[str, Any]]) -> Any:
    """The champion's score (and each run's student) over past pipeline runs, oldest first."""
    from matplotlib.figure import Figure  # outside pyplot: nothing to close

    fig = Figure(figsize=(7, 3.5))
    ax = fig.subplots()
    xs = list(range(1, len(runs) + 1))
    student = [r["metrics"].get("student_exact_match") for r in runs]
    champion = [r["metrics"].get("champion_score") for r in runs]
    ax.plot([x for x, v in zip(xs, student) if v is not None], [v for v in student if v is not None], "o", label="student this run")
    ax.step([x for x, v in zip(xs, champion) if v is not None], [v for v in champion if v is not None], where="post", label="champion")
    ax.set_xlabel("pipeline run (oldest first)")
    ax.set_ylabel("exact match")
    ax.set_title("champion over nightly runs")
    ax.legend(loc="lower right")
    fig.tight_layout()
    return fig
