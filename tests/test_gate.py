"""The promotion gate on hand-made metrics: each rule passes and fails for the reason it states."""

from __future__ import annotations

import pytest

from userlens.config import GateParams, Params
from userlens.errors import ConfigError
from userlens.gate import GateError, decide


def entry(mean: float, key: str = "0.05", probe: str = "logreg") -> dict:
    return {probe: {key: {"mean": mean, "std": 0.01, "per_seed": [mean]}}}


def metrics(bt: float = 0.60, de: float = 0.55, **extra_tasks) -> dict:
    found = {"favourite_category": {"barlow_twins": entry(bt), "dual_encoder": entry(de)}}
    for task, (a, b) in extra_tasks.items():
        found[task] = {"barlow_twins": entry(a), "dual_encoder": entry(b)}
    return found


def gate(**rules) -> GateParams:
    return GateParams(tasks={"favourite_category": rules or {"min_accuracy": 0.5}})


def failed(decision: dict) -> list[tuple[str, str]]:
    return [(c["task"], c["rule"]) for c in decision["checks"] if not c["passed"]]


def test_every_rule_passing_promotes():
    rules = gate(min_accuracy=0.5, max_regression=0.02, min_margin_over_baseline=0.01)
    decision = decide(metrics(), rules, production={"favourite_category": entry(0.61)}, production_version="v1")
    assert decision["passed"] and decision["decision"] == "promote"
    assert decision["reasons"] == ["every rule passed"]
    assert {c["rule"] for c in decision["checks"]} == {"min_accuracy", "max_regression", "min_margin_over_baseline"}
    regression = next(c for c in decision["checks"] if c["rule"] == "max_regression")
    assert "v1" in regression["reason"] and "within" in regression["reason"]


def test_absolute_minimum_blocks():
    decision = decide(metrics(bt=0.45), gate(min_accuracy=0.5, max_regression=None, min_margin_over_baseline=None))
    assert not decision["passed"] and decision["decision"] == "block"
    assert failed(decision) == [("favourite_category", "min_accuracy")]
    assert "0.450 < minimum 0.500" in decision["reasons"][0]


def test_regression_against_production_blocks():
    rules = gate(min_accuracy=None, max_regression=0.02, min_margin_over_baseline=None)
    decision = decide(metrics(bt=0.60), rules, production={"favourite_category": entry(0.65)}, production_version="v1")
    assert failed(decision) == [("favourite_category", "max_regression")]
    assert "production v1 0.650" in decision["reasons"][0] and "-0.050 beyond" in decision["reasons"][0]
    # no production yet: nothing to regress from
    assert decide(metrics(bt=0.60), rules)["passed"]


def test_margin_over_baseline_blocks():
    rules = gate(min_accuracy=None, max_regression=None, min_margin_over_baseline=0.02)
    decision = decide(metrics(bt=0.60, de=0.59), rules)
    assert failed(decision) == [("favourite_category", "min_margin_over_baseline")]
    assert "margin +0.010 < required +0.020" in decision["reasons"][0]
    # a negative margin lets the candidate trail the baseline by that much
    assert decide(metrics(bt=0.58, de=0.59), gate(min_margin_over_baseline=-0.02))["passed"]


def test_every_failing_rule_is_reported():
    rules = GateParams(
        tasks={
            "favourite_category": {"min_accuracy": 0.7, "max_regression": None, "min_margin_over_baseline": 0.1},
            "rating_tendency": {"min_accuracy": 0.5, "max_regression": None, "min_margin_over_baseline": None},
        }
    )
    decision = decide(metrics(rating_tendency=(0.55, 0.5)), rules)
    assert failed(decision) == [
        ("favourite_category", "min_accuracy"),
        ("favourite_category", "min_margin_over_baseline"),
    ]
    assert len(decision["reasons"]) == 2


def test_missing_task_is_an_error_unless_optional():
    rules = GateParams(tasks={"gender": {"min_accuracy": 0.6}})
    with pytest.raises(GateError, match="task 'gender' is not in reports/metrics.json.*optional: true"):
        decide(metrics(), rules)
    optional = GateParams(tasks={"gender": {"min_accuracy": 0.6, "optional": True},
                                 "favourite_category": {"min_accuracy": 0.5}})  # fmt: skip
    decision = decide(metrics(), optional)
    assert decision["passed"] and "skipped" in decision["checks"][0]["reason"]


def test_a_gate_with_no_task_evaluated_blocks():
    """Every gated task optional and absent from the data: nothing was checked, so no promotion."""
    only_absent = GateParams(tasks={"gender": {"min_accuracy": 0.6, "optional": True}})
    decision = decide(metrics(), only_absent)
    assert not decision["passed"] and "no gated task was evaluated" in decision["reasons"][0]


def test_missing_label_fraction_or_baseline_is_an_error():
    with pytest.raises(GateError, match=r"label fraction 0.1 \(evaluated: 0.05\)"):
        decide(metrics(), GateParams(label_fraction=0.1, tasks={"favourite_category": {}}))
    no_baseline = {"favourite_category": {"barlow_twins": entry(0.6)}}
    with pytest.raises(GateError, match="no 'dual_encoder' result"):
        decide(no_baseline, gate(min_margin_over_baseline=0.0))


def test_production_without_the_gated_fraction_is_not_compared():
    rules = gate(min_accuracy=None, max_regression=0.0, min_margin_over_baseline=None)
    production = {"favourite_category": entry(0.9, key="0.1")}
    decision = decide(metrics(bt=0.6), rules, production=production, production_version="v0")
    assert decision["passed"] and "not compared" in decision["checks"][0]["reason"]


def test_gate_settings_are_validated():
    with pytest.raises(ConfigError, match="gate.tasks.favourite_category.min_acuracy"):
        Params().with_overrides({"gate.tasks": {"favourite_category": {"min_acuracy": 0.5}}})
    with pytest.raises(ConfigError, match="gate.label_fraction"):
        Params().with_overrides({"gate.label_fraction": 0})
    assert Params().gate.probe == "logreg" and Params().gate.label_fraction == 0.05


@pytest.mark.parametrize("verb", ["gate", "register", "promote", "rollback", "models", "deploy"])
def test_release_verbs_have_help_with_examples(verb):
    from click.testing import CliRunner

    from userlens.cli import cli

    result = CliRunner().invoke(cli, [verb, "--help"])
    assert result.exit_code == 0 and "Examples:" in result.output and f"userlens {verb}" in result.output


def test_a_blocked_run_with_nothing_in_production_offers_no_lookup(tmp_path, capsys):
    """The end of `userlens run`: a lookup is suggested only when something is served."""
    from userlens.cli.learning import _echo_release
    from userlens.project import Project

    _echo_release(Project(tmp_path), {"gate": {"summary": "gate blocked v1: ...", "passed": False}})
    printed = capsys.readouterr().out
    assert "nothing is served yet" in printed and "try:" not in printed
