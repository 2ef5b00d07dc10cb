"""Comparing methods and writing the evaluation's report: paired tests over seeds, metrics.json,
report.md (a table per task and probe, gains of the reference over the baseline, next-item
ranking, the geometry of every method's vectors) and label_curves.png.

results = evaluate.evaluate_methods(...) per task, plus `GEOMETRY` (geometry.py per method)
when the evaluate stage measured it; `task_results` gives the tasks alone.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from userlens.evaluate import Task, finite_or_none

GEOMETRY = "geometry"  # the key of metrics.json that holds the embeddings' geometry, not a task


def task_results(results: dict[str, Any]) -> dict[str, Any]:
    """results[task][method] without the geometry entry."""
    return {task: by_method for task, by_method in results.items() if task != GEOMETRY}


# --------------------------------------------------------------------------- comparison


def paired_comparison(results: dict, a: str, b: str, probe: str = "logreg") -> dict[str, dict[str, dict]]:
    """Method a against method b on the same splits, per task and label fraction (ranking
    tasks: per metric): mean difference a - b, relative gain mean(a) / mean(b) - 1, a paired
    t-test over seeds (ttest_rel) and, with at least 6 pairs, a Wilcoxon signed-rank test.
    Tasks where either method (or the probe) is missing are left out."""
    comparison: dict[str, dict[str, dict]] = {}
    for task, by_method in results.items():
        if not isinstance(by_method, dict) or a not in by_method or b not in by_method:
            continue
        first, second = by_method[a], by_method[b]
        if probe in first and probe in second:
            pairs = {key: (first[probe][key], second[probe][key]) for key in first[probe] if key in second[probe]}
        else:
            pairs = {
                key: (value, second[key])
                for key, value in first.items()
                if isinstance(value, dict) and "per_seed" in value and key in second
            }
        if pairs:
            comparison[task] = {key: _paired(x["per_seed"], y["per_seed"]) for key, (x, y) in pairs.items()}
    return comparison


def _paired(a: list, b: list) -> dict[str, Any]:
    from scipy import stats

    keep = [(x, y) for x, y in zip(a, b, strict=True) if x is not None and y is not None]
    x = np.array([p[0] for p in keep], dtype=np.float64)
    y = np.array([p[1] for p in keep], dtype=np.float64)
    out: dict[str, Any] = {"n_pairs": len(keep), "mean_a": None, "mean_b": None, "mean_diff": None,
                           "relative_gain": None, "t_stat": None, "t_pvalue": None,
                           "wilcoxon_stat": None, "wilcoxon_pvalue": None}  # fmt: skip
    if not keep:
        return out
    diff = x - y
    out.update(mean_a=finite_or_none(x.mean()), mean_b=finite_or_none(y.mean()), mean_diff=finite_or_none(diff.mean()))
    if y.mean() != 0:
        out["relative_gain"] = finite_or_none(x.mean() / y.mean() - 1)
    if len(keep) >= 2:
        if np.all(diff == diff[0]):  # no spread: the t statistic is undefined
            out.update(t_stat=0.0 if diff[0] == 0 else None, t_pvalue=1.0 if diff[0] == 0 else None)
        else:
            test = stats.ttest_rel(x, y)
            out.update(t_stat=finite_or_none(test.statistic), t_pvalue=finite_or_none(test.pvalue))
    if len(keep) >= 6:
        if np.all(diff == 0):
            out.update(wilcoxon_stat=0.0, wilcoxon_pvalue=1.0)
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                test = stats.wilcoxon(x, y)
            out.update(wilcoxon_stat=finite_or_none(test.statistic), wilcoxon_pvalue=finite_or_none(test.pvalue))
    return out


# --------------------------------------------------------------------------- report


def write_report(
    results: dict,
    out_dir: str | Path,
    reference: str = "barlow_twins",
    baseline: str = "dual_encoder",
    tasks: dict[str, Task] | None = None,
) -> dict[str, Path]:
    """metrics.json (the results as they are), report.md (a table per task and probe, the
    relative gain of `reference` over `baseline`, the next-item table, the geometry table) and
    label_curves.png. Missing methods are skipped. `tasks`, when given, adds their descriptions
    and class balance."""
    from userlens.io import write_json_atomic, write_text_atomic

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "metrics": out_dir / "metrics.json",
        "report": out_dir / "report.md",
        "curves": out_dir / "label_curves.png",
    }
    write_json_atomic(paths["metrics"], results)
    write_text_atomic(paths["report"], _report_markdown(results, reference, baseline, tasks))
    _plot_curves(task_results(results), paths["curves"])
    return paths


def _classification_tasks(results: dict) -> list[str]:
    return [t for t, by_method in results.items() if by_method and not _is_ranking(next(iter(by_method.values())))]


def _is_ranking(entry: dict) -> bool:
    return "scorer" in entry


def _fraction_keys(entry: dict) -> list[str]:
    return sorted(entry, key=float)


def _percent(key: str) -> str:
    return f"{float(key) * 100:g}%"


def _cell(stat: dict | None) -> str:
    if not stat or stat.get("mean") is None:
        return "–"
    return f"{stat['mean']:.3f} ± {stat['std']:.3f}"


def _report_markdown(results: dict, reference: str, baseline: str, tasks: dict[str, Task] | None) -> str:
    geometry, results = results.get(GEOMETRY), task_results(results)
    lines = ["# Downstream evaluation", ""]
    lines.append("Accuracy on held-out test users (mean ± std over seeds) by share of labelled train users;")
    lines.append("the actual number of labelled users is in the header (at least two per class).")
    lines.append("")
    for task in _classification_tasks(results):
        by_method = results[task]
        lines.append(f"## {task}")
        lines.append("")
        if tasks and task in tasks:
            lines += _task_note(tasks[task])
        probes = list(next(iter(by_method.values())))
        for probe in probes:
            keys = _fraction_keys(next(iter(by_method.values()))[probe])
            first = next(iter(by_method.values()))[probe]
            lines.append(f"### {task} · {probe}")
            lines.append("")
            lines.append("| method | " + " | ".join(_percent(k) for k in keys) + " |")
            lines.append("|---|" + "---:|" * len(keys))
            lines.append("| *n labelled* | " + " | ".join(str(first[k]["n_labelled"]) for k in keys) + " |")
            for method, entry in by_method.items():
                lines.append(f"| {method} | " + " | ".join(_cell(entry.get(probe, {}).get(k)) for k in keys) + " |")
            lines.append("")
            if reference in by_method and baseline in by_method:
                compared = paired_comparison({task: by_method}, reference, baseline, probe).get(task, {})
                lines += _gain_table(compared, keys, reference, baseline)
    ranking = [t for t, by_method in results.items() if by_method and _is_ranking(next(iter(by_method.values())))]
    for task in ranking:
        by_method = results[task]
        metrics = [key for key, value in next(iter(by_method.values())).items() if isinstance(value, dict)]
        lines.append(f"## {task}")
        lines.append("")
        if tasks and task in tasks:
            lines += _task_note(tasks[task])
        lines.append("| method | scorer | " + " | ".join(m.upper() for m in metrics) + " |")
        lines.append("|---|---|" + "---:|" * len(metrics))
        for method, entry in by_method.items():
            lines.append(f"| {method} | {entry['scorer']} | " + " | ".join(_cell(entry.get(m)) for m in metrics) + " |")
        lines.append("")
        if reference in by_method and baseline in by_method:
            compared = paired_comparison({task: by_method}, reference, baseline).get(task, {})
            lines += _gain_table(compared, metrics, reference, baseline, label=str)
    if geometry:
        lines += geometry_table(geometry)
    return "\n".join(lines).rstrip() + "\n"


def geometry_table(geometry: dict[str, dict]) -> list[str]:
    """Markdown rows: each method's geometry (geometry.py) and its neighbours' taste."""
    lines = ["## Geometry of the exported vectors", ""]
    lines.append("Effective rank of the centred vectors (of their dimension), share of variance on the first")
    lines.append("direction, mean cosine of random user pairs as served; top-10 cosine neighbours sharing the")
    lines.append("user's favourite history category, against random users (lift = ratio).")
    lines.append("")
    lines.append(
        "| method | effective rank | first direction | random-pair cosine | neighbours same favourite | random | lift |"
    )
    lines.append("|---|---:|---:|---:|---:|---:|---:|")

    def number(value, pattern: str) -> str:
        return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else pattern.format(value)

    columns = (
        ("effective_rank", "{:.1f}"),
        ("first_direction_share", "{:.1%}"),
        ("random_pair_cosine", "{:.3f}"),
        ("neighbour_same_favourite", "{:.3f}"),
        ("random_same_favourite", "{:.3f}"),
        ("lift", "{:.2f}"),
    )
    for method, g in geometry.items():
        cells = [number(g.get(key), pattern) for key, pattern in columns]
        cells[0] += f" / {g.get('dim')}"
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return lines + [""]


def _task_note(task: Task) -> list[str]:
    labels = task.labels[task.labels >= 0]
    note = f"{task.description}. {labels.size} labelled users"
    if task.kind == "classification" and labels.size:
        majority = np.bincount(labels, minlength=task.n_classes).max() / labels.size
        note += f", {task.n_classes} classes, majority class {majority:.3f}"
    return [note + ".", ""]


def _gain_table(compared: dict, keys: list[str], reference: str, baseline: str, label=_percent) -> list[str]:
    if not compared:
        return []
    rows = [f"Gain of {reference} over {baseline} (paired over seeds):", ""]
    rows.append("| | " + " | ".join(label(k) for k in keys) + " |")
    rows.append("|---|" + "---:|" * len(keys))

    def fmt(key: str, field_: str, pattern: str) -> str:
        value = compared.get(key, {}).get(field_)
        return "–" if value is None else pattern.format(value)

    rows.append("| relative gain | " + " | ".join(fmt(k, "relative_gain", "{:+.1%}") for k in keys) + " |")
    rows.append("| mean difference | " + " | ".join(fmt(k, "mean_diff", "{:+.3f}") for k in keys) + " |")
    rows.append("| paired t p-value | " + " | ".join(fmt(k, "t_pvalue", "{:.3g}") for k in keys) + " |")
    if any(compared.get(k, {}).get("wilcoxon_pvalue") is not None for k in keys):
        rows.append("| Wilcoxon p-value | " + " | ".join(fmt(k, "wilcoxon_pvalue", "{:.3g}") for k in keys) + " |")
    return rows + [""]


def _plot_curves(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = _classification_tasks(results)
    columns = max(1, min(len(names), 4))
    rows = max(1, -(-len(names) // columns))
    fig, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.4 * rows), squeeze=False)
    styles = {0: "-", 1: "--", 2: ":"}
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, task in zip(axes.flat, names, strict=False):
        by_method = results[task]
        for m, (method, entry) in enumerate(by_method.items()):
            for p, (probe, curve) in enumerate(entry.items()):
                keys = [k for k in _fraction_keys(curve) if curve[k]["mean"] is not None]
                ax.errorbar(
                    [float(k) for k in keys], [curve[k]["mean"] for k in keys], yerr=[curve[k]["std"] for k in keys],
                    color=colours[m % len(colours)], linestyle=styles.get(p, "-."), marker="o", markersize=3,
                    capsize=2, label=f"{method} ({probe})",
                )  # fmt: skip
        ax.set_xscale("log")
        ax.set_title(task)
        ax.set_xlabel("label fraction")
        ax.set_ylabel("accuracy")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    if not names:
        axes[0, 0].text(0.5, 0.5, "no classification tasks", ha="center", va="center")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 4), fontsize="small", frameon=False)
        legend_inches = 0.2 * -(-len(labels) // 4) + 0.05
        fig.tight_layout(rect=(0, min(0.5, legend_inches / fig.get_figheight()), 1, 1))
    else:
        fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
