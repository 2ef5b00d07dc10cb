"""The report of one training run (reports/run_report.md, also a Prefect artifact) and its metrics table.

It says what a person running the pipeline wants to know, in order: what data went in, whether it
passed validation (and where Data Docs are), how the candidate did against the thresholds and the
production version, what the gate decided and why, what was published online, and how to look a
user up.
"""

from __future__ import annotations

from typing import Any

import polars as pl

from userlens.config import Params
from userlens.evaluate import fraction_key
from userlens.io import read_json
from userlens.report import GEOMETRY, geometry_table, task_results


def read_metrics(project) -> dict[str, Any]:
    """reports/metrics.json of the run ({} before the first evaluation)."""
    path = project.reports_dir / "metrics.json"
    return read_json(path) if path.exists() else {}


def markdown(project, params: Params, results: dict[str, Any], metrics: dict[str, Any]) -> str:
    """The run report, from the run's results and its metrics (`read_metrics`)."""
    decision = results.get("gate") or {}
    lines = [f"# userlens run: {params.data.dataset} ({params.data.source})", ""]
    if project.data_summary.exists():  # data summary, validation result and the path to Data Docs
        summary = project.data_summary.read_text().splitlines()
        lines += ["## Data and validation", "", *summary[1:], ""]
    lines += [
        f"## Metrics vs thresholds vs production ({decision.get('probe')} probe, "
        f"{decision.get('label_fraction', 0) * 100:g}% labels)",
        "",
    ]
    lines += _comparison(metrics, decision) + [""]
    lines += [f"## Gate: {'PROMOTE' if decision.get('passed') else 'BLOCKED'} {decision.get('model_version', '')}", ""]
    lines += [f"- {reason}" for reason in decision.get("reasons", [])] + [""]
    lines += geometry_table(metrics[GEOMETRY]) if metrics.get(GEOMETRY) else []
    lines += ["## Online store", "", *_materialized(results), ""]
    interest = results.get("interest")
    if interest:
        lines += [f"user_interest {interest['version']} (lifelong, on encoder {interest['encoder_version']}) is "
                  f"served from slot {interest['published']['slot']} for {interest['users']:,} users.", ""]  # fmt: skip
    user = example_user(project)
    if user is not None:
        lookups = [f"userlens lookup {user}"] + ([f"userlens lookup {user} --interest"] if interest else [])
        lines += ["## Try it", "", "```", *lookups, "```", ""]
    return "\n".join(lines)


def example_user(project) -> str | None:
    """A real user id of the current data (the first in data/sequences/users.parquet)."""
    path = project.sequences_dir / "users.parquet"
    if not path.exists():
        return None
    ids = pl.read_parquet(path, columns=["user_id"], n_rows=1)["user_id"]
    return str(ids[0]) if len(ids) else None


def metrics_rows(metrics: dict[str, Any], params: Params) -> list[dict[str, Any]]:
    """One row per task x method x label fraction (the gate's probe) and per ranking metric."""
    rows = []
    for task, by_method in task_results(metrics).items():
        for method, entry in by_method.items():
            if "scorer" in entry:  # ranking task: one row per metric
                for metric, stat in entry.items():
                    if isinstance(stat, dict) and "mean" in stat:
                        rows.append(_row(task, method, metric, "all", stat))
                continue
            for key, stat in entry.get(params.gate.probe, {}).items():
                rows.append(_row(task, method, f"accuracy ({params.gate.probe})", key, stat))
    return rows


def _row(task: str, method: str, metric: str, fraction: str, stat: dict) -> dict[str, Any]:
    mean, std = stat.get("mean"), stat.get("std")
    return {
        "task": task,
        "method": method,
        "metric": metric,
        "label_fraction": fraction,
        "mean": None if mean is None else round(mean, 4),
        "std": None if std is None else round(std, 4),
    }


def _comparison(metrics: dict, decision: dict) -> list[str]:
    if not decision:
        return ["(no gate decision)"]
    key = fraction_key(decision["label_fraction"])
    probe, reference, baseline = decision["probe"], decision["reference"], decision["baseline"]
    lines = ["| task | rule | candidate | baseline | threshold | result |", "|---|---|---|---|---|---|"]
    for check in decision["checks"]:
        by_method = metrics.get(check["task"], {})
        lines.append(
            f"| {check['task']} | {check['rule']} | {_mean(by_method, reference, probe, key)} | "
            f"{_mean(by_method, baseline, probe, key)} | {_fmt(check['threshold'])} | "
            f"{'pass' if check['passed'] else '**FAIL**'}: {check['reason']} |"
        )
    production = decision.get("production_version")
    lines += ["", f"Production before this run: {production or 'none'}; baseline: {baseline}."]
    return lines


def _mean(by_method: dict, method: str, probe: str, key: str) -> str:
    stat = by_method.get(method, {}).get(probe, {}).get(key)
    return _fmt(stat["mean"]) if stat else "–"


def _fmt(value) -> str:
    return "–" if value is None else f"{value:.3f}"


def _materialized(results: dict) -> list[str]:
    promoted = results.get("promote")
    if promoted is None:
        return ["Nothing published: the gate blocked the candidate; production and the online store are unchanged."]
    lines = [promoted["message"]]
    published = promoted.get("published") or {}
    lines += [f"- {k}: {v}" for k, v in published.items() if isinstance(v, str | int | float | bool)]
    return lines
