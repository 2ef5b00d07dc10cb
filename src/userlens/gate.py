"""The promotion gate: per-task rules on downstream accuracy (params.yaml `gate`).

For every task in `gate.tasks`, at the gate's probe and label fraction, the candidate (the
reference method, Barlow Twins) must
- reach `min_accuracy` (absolute floor),
- lose at most `max_regression` against the production version's own metrics,
- beat the baseline method (`gate.baseline`, the dual encoder) by `min_margin_over_baseline`.
A candidate is promoted only when every rule passes. `decide` is pure (metrics in, decision
out); the `gate` stage in stages.py reads the inputs and writes reports/gate.json.
"""

from __future__ import annotations

from typing import Any

from userlens.config import GateParams
from userlens.errors import UserlensError
from userlens.evaluate import fraction_key
from userlens.report import task_results

REFERENCE = "barlow_twins"


class GateError(UserlensError):
    """The metrics cannot be gated as configured (a task, probe or label fraction is missing)."""


def decide(
    metrics: dict[str, Any],
    gate: GateParams,
    production: dict[str, Any] | None = None,
    production_version: str | None = None,
) -> dict[str, Any]:
    """The decision on `metrics` (results[task][method][probe][fraction] of reports/metrics.json).

    `production`: the production version's metrics (results[task] of the reference method),
    None when nothing is in production yet. Returns {"passed", "checks", "reasons", ...};
    every check is {"task", "rule", "passed", "value", "threshold", "reason"}.
    """
    key = fraction_key(gate.label_fraction)
    metrics = task_results(metrics)
    checks: list[dict[str, Any]] = []
    for task, rule in gate.tasks.items():
        if task not in metrics:
            if not rule.optional:
                raise GateError(
                    f"gate: task {task!r} is not in reports/metrics.json (tasks there: {', '.join(sorted(metrics))}); "
                    f"remove it from gate.tasks or set gate.tasks.{task}.optional: true"
                )
            checks.append(
                _check(task, "present", True, None, None, "optional task not evaluated on this data: skipped")
            )
            continue
        value = _accuracy(metrics[task], REFERENCE, task, gate.probe, key)
        label = f"{task}: {gate.probe} accuracy at {float(key) * 100:g}% labels"
        if rule.min_accuracy is not None:
            ok = value >= rule.min_accuracy
            checks.append(
                _check(
                    task,
                    "min_accuracy",
                    ok,
                    value,
                    rule.min_accuracy,
                    f"{label} {value:.3f} {'>=' if ok else '<'} minimum {rule.min_accuracy:.3f}",
                )
            )
        if rule.max_regression is not None:
            checks.append(_regression(task, label, value, rule.max_regression, production, production_version, gate))
        if rule.min_margin_over_baseline is not None:
            base = _accuracy(metrics[task], gate.baseline, task, gate.probe, key)
            margin, need = value - base, rule.min_margin_over_baseline
            ok = margin >= need
            checks.append(
                _check(
                    task,
                    "min_margin_over_baseline",
                    ok,
                    margin,
                    need,
                    f"{label} {value:.3f} vs {gate.baseline} {base:.3f}: margin {margin:+.3f} "
                    f"{'>=' if ok else '<'} required {need:+.3f}",
                )
            )
    if all(check["rule"] == "present" for check in checks):  # every gated task was optional and absent
        reason = "no gated task was evaluated on this data: nothing shows the candidate is good"
        checks.append(_check("*", "evaluated", False, None, None, reason))
    passed = all(check["passed"] for check in checks)
    return {
        "passed": passed,
        "decision": "promote" if passed else "block",
        "reasons": [c["reason"] for c in checks if not c["passed"]] or ["every rule passed"],
        "checks": checks,
        "reference": REFERENCE,
        "baseline": gate.baseline,
        "probe": gate.probe,
        "label_fraction": gate.label_fraction,
        "production_version": production_version,
    }


def summary(decision: dict[str, Any]) -> str:
    """One line for people: the decision and, when blocked, why."""
    if decision["passed"]:
        return f"gate passed: {decision.get('model_version', 'the candidate')} may be promoted"
    return f"gate blocked {decision.get('model_version', 'the candidate')}: " + "; ".join(decision["reasons"])


def _regression(task, label, value, allowed, production, production_version, gate) -> dict[str, Any]:
    if production is None:
        return _check(task, "max_regression", True, None, allowed, "no production version yet: nothing to regress from")
    try:
        before = _stat(production.get(task), gate.probe, fraction_key(gate.label_fraction))
    except KeyError:
        before = None
    if before is None:
        return _check(
            task,
            "max_regression",
            True,
            None,
            allowed,
            f"{task}: production {production_version} has no {gate.probe} result at this label fraction: not compared",
        )
    drop = before - value
    ok = drop <= allowed
    return _check(
        task,
        "max_regression",
        ok,
        -drop,
        -allowed,
        f"{label} {value:.3f} vs production {production_version} {before:.3f}: change {-drop:+.3f} "
        f"{'within' if ok else 'beyond'} the allowed regression {allowed:.3f}",
    )


def _accuracy(by_method: dict[str, Any], method: str, task: str, probe: str, key: str) -> float:
    if method not in by_method:
        raise GateError(f"gate: reports/metrics.json has no {method!r} result for task {task!r}: rerun its stage")
    try:
        value = _stat(by_method[method], probe, key)
    except KeyError:
        entry = by_method[method].get(probe, {})
        have = ", ".join(sorted(entry, key=float)) if entry else f"no {probe!r} probe"
        raise GateError(
            f"gate: {task}/{method} has no {probe} accuracy at label fraction {float(key):g} (evaluated: {have}); "
            "add it to evaluate.label_fractions / evaluate.probes or change gate.label_fraction / gate.probe"
        ) from None
    if value is None:
        raise GateError(f"gate: {task}/{method} {probe} accuracy at label fraction {float(key):g} is undefined (NaN)")
    return value


def _stat(entry: dict[str, Any] | None, probe: str, key: str) -> float | None:
    if entry is None:
        raise KeyError(probe)
    return entry[probe][key]["mean"]


def _check(task, rule, passed, value, threshold, reason) -> dict[str, Any]:
    return {
        "task": task,
        "rule": rule,
        "passed": bool(passed),
        "value": value,
        "threshold": threshold,
        "reason": reason,
    }
