"""The evaluation report drawn and written for people: the comparison and per-category plots, the
loss curves of the training stages, and the summary table and lines (CLI, Prefect artifact).

Everything here reads a report as :func:`mydistill.evaluation.evaluate.evaluate_models` returns it.
"""

from __future__ import annotations

from typing import Any

from mydistill.evaluation.metrics import report_key


def comparison_figure(report: dict[str, Any]) -> Any:
    # a Figure outside pyplot: freed with its last reference (pyplot kept every one a worker ever drew)
    from matplotlib.figure import Figure

    names = list(report["models"])
    key = report_key(report.get("gate_metric", "exact"))
    scores = [report["models"][n].get(key, 0.0) for n in names]
    errors = None
    if all(f"{key}_low" in report["models"][n] for n in names):
        # max(0, …): a bootstrap end may sit a rounding error past the estimate
        errors = [[max(0.0, s - report["models"][n][f"{key}_low"]) for n, s in zip(names, scores, strict=True)],
                  [max(0.0, report["models"][n][f"{key}_high"] - s) for n, s in zip(names, scores, strict=True)]]
    fig = Figure(figsize=(5, 3), dpi=100)
    ax = fig.subplots()
    bars = ax.bar(names, scores, yerr=errors, capsize=4, color=["#4c72b0", "#55a868", "#c44e52", "#8172b2"][: len(names)])
    ax.bar_label(bars, labels=[f"{s:.1%}" for s in scores])
    ax.set_ylim(0, 1.1)
    ax.set_ylabel(key)
    ax.set_title("held-out task score" + (f" ({report.get('confidence', 0.95):.0%} intervals)" if errors else ""))
    fig.tight_layout()
    return fig


def category_figure(report: dict[str, Any]) -> Any:
    """Share of the teacher's gate-metric score each model keeps, per category, with its paired
    interval; a dotted line at 100%. None when the report has no categories or no teacher."""
    from matplotlib.figure import Figure

    rows = report.get("by_category") or {}
    models = [n for n in report["models"] if any("teacher_retained" in rows[c].get(n, {}) for c in rows)]
    if not models:
        return None
    categories = list(rows)
    fig = Figure(figsize=(6, 1.6 + 0.4 * len(categories) * len(models)), dpi=100)
    ax = fig.subplots()
    height = 0.8 / len(models)
    for k, (name, color) in enumerate(zip(models, ["#55a868", "#c44e52", "#8172b2", "#4c72b0"], strict=False)):
        cells = [rows[c].get(name, {}) for c in categories]
        kept = [cell.get("teacher_retained") or 0.0 for cell in cells]
        low = [max(0.0, v - cell.get("teacher_retained_low", v)) if cell.get("teacher_retained") is not None else 0.0
               for v, cell in zip(kept, cells, strict=True)]
        high = [max(0.0, cell.get("teacher_retained_high", v) - v) if cell.get("teacher_retained") is not None else 0.0
                for v, cell in zip(kept, cells, strict=True)]
        positions = [i + k * height for i in range(len(categories))]
        ax.barh(positions, kept, height=height, xerr=[low, high], capsize=3, color=color, label=name)
    ax.set_yticks([i + height * (len(models) - 1) / 2 for i in range(len(categories))],
                  [f"{c} ({rows[c]['count']})" for c in categories])
    ax.invert_yaxis()
    ax.axvline(1.0, color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel(f"share of the teacher's {report_key(report.get('gate_metric', 'exact'))} kept")
    ax.set_title(f"per category ({report.get('confidence', 0.95):.0%} paired intervals)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def loss_curves_figure(histories: dict[str, list[dict[str, float]]]) -> Any:
    """Training and validation loss per stage, from checkpoint manifests' ``history`` rows.

    ``histories`` maps a stage (``distill``, ``finetune``, ``baseline``) to its rows
    (``{"step": s, "loss": …, "val_loss": …}``). Stage 2 continues stage 1 on one step axis
    (a dotted line marks the switch); the baseline, trained from scratch on the real data alone,
    is drawn dashed from step 0. Training losses differ in kind (KD + CE in stage 1, CE after),
    so the validation panel (CE on held-out real data, the same for every stage) is the one to
    compare.
    """
    # a Figure outside pyplot: nothing to close, freed with its last reference
    from matplotlib.figure import Figure

    colors = {"distill": "#4c72b0", "finetune": "#55a868", "baseline": "#c44e52"}
    fig = Figure(figsize=(9, 3.2), dpi=100)
    ax_train, ax_val = fig.subplots(1, 2)
    offset = 0
    for stage, rows in histories.items():
        if not rows:
            continue
        chained = stage in ("distill", "finetune")
        start = offset if chained else 0
        style = {"color": colors.get(stage), "linestyle": "-" if chained else "--", "label": stage}
        train = [(start + r["step"], r["loss"]) for r in rows if "loss" in r]
        val = [(start + r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
        if train:  # markers where there are few points, so a short stage still shows
            ax_train.plot(*zip(*train, strict=True), marker="o" if len(train) < 20 else None, markersize=3, **style)
        if val:
            ax_val.plot(*zip(*val, strict=True), marker="o", markersize=3, **style)
        if chained:
            if offset:
                for ax in (ax_train, ax_val):
                    ax.axvline(offset, color="grey", linestyle=":", linewidth=1)
            offset = start + int(rows[-1]["step"])
    for ax, title in ((ax_train, "training loss"), (ax_val, "validation loss (held-out real data)")):
        ax.set_title(title)
        ax.set_xlabel("step")
        if ax.lines:
            ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def with_interval(row: dict[str, Any], key: str) -> str:
    """``row[key]`` as a percentage, followed by its interval when the row has one: ``37.5% (21.2–57.3)``."""
    value = row.get(key)
    if not isinstance(value, (int, float)):
        return "—"
    low, high = row.get(f"{key}_low"), row.get(f"{key}_high")
    if isinstance(low, (int, float)) and isinstance(high, (int, float)):
        return f"{value:.1%} ({low * 100:.1f}–{high * 100:.1f})"
    return f"{value:.1%}"


def comparison_lines(report: dict[str, Any]) -> list[str]:
    """One sentence per paired comparison in the report (student vs baseline), saying whether the
    difference is more than noise."""
    lines = []
    for name, c in report.get("comparisons", {}).items():
        first, _, second = name.partition("_vs_")
        verdict = ("more than noise" if c["low"] > 0 or c["high"] < 0 else "within the noise")
        lines.append(
            f"{first} vs {second} on the same {report.get('num_examples', '?')} questions ({c['metric']}): "
            f"{c['difference'] * 100:+.1f} points, {c['confidence']:.0%} interval {c['low'] * 100:+.1f} to {c['high'] * 100:+.1f} ({verdict})"
        )
    return lines


def category_lines(report: dict[str, Any]) -> list[str]:
    """Per category: each model's gate-metric score and the share of the teacher's it keeps, with intervals."""
    key = report_key(report.get("gate_metric", "exact"))
    lines = []
    for category, row in report.get("by_category", {}).items():
        cells = []
        for model, m in row.items():
            if not isinstance(m, dict):
                continue
            cell = f"{model} {with_interval(m, key)}"
            if "teacher_retained" in m:
                cell += f", keeps {with_interval(m, 'teacher_retained')}" if m["teacher_retained"] is not None else ", keeps: undefined"
            cells.append(cell)
        lines.append(f"{category} ({row['count']} questions, {key}): " + "; ".join(cells))
    return lines


def summary_table(report: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Column names and formatted rows (one per model) of the report, for the CLI and Prefect
    summaries: the chosen answer metrics, % of teacher on the gate metric, then the rest. A score
    with an interval in the report reads ``37.5% (21.2–57.3)``."""
    keys = report.get("metrics") or ["exact_match"]
    gate = report.get("gate_metric", "exact")
    undefined = report.get("retained_undefined")
    columns = ["model", *keys, f"% of teacher ({gate})", "perplexity", "KL to teacher", "top-1 agree",
               "text agree", "ECE (1st token)", "length × teacher", "parameters"]

    def pct(v: Any) -> str:
        return f"{v:.1%}" if isinstance(v, (int, float)) else "—"

    def num(v: Any, fmt: str = ".3f") -> str:
        return format(v, fmt) if isinstance(v, (int, float)) else "—"

    rows = []
    for name, m in report["models"].items():
        if "teacher_retained" in m:
            retained = with_interval(m, "teacher_retained") if m["teacher_retained"] is not None else "undefined"
        else:
            retained = "—"
        rows.append([
            name, *(with_interval(m, k) for k in keys), retained, num(m.get("perplexity")), num(m.get("kl_to_teacher")),
            pct(m.get("top1_agreement")), pct(m.get("text_agreement")), num(m.get("calibration_ece")),
            num(m.get("length_vs_teacher"), ".2f"), f"{m['parameters']:,}",
        ])
    if undefined:
        rows.append([f"note: {undefined}"] + [""] * (len(columns) - 1))
    return columns, rows
