"""The data pipeline with the real tools: DVC in a temporary repo, GX, the CLI as people run it."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import polars as pl
import pytest
import yaml
from click.testing import CliRunner

from conftest import make_project, run, set_params, userlens
from userlens.cli import cli

pytestmark = pytest.mark.integration


def dvc(project: Path, *args: str) -> str:
    return run([sys.executable, "-m", "dvc", *args], project).stdout


def folder_digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_fetch_versions_raw_data_and_dvc_repro_runs_stages_once(project):
    userlens(project, "fetch", "--no-progress")
    dvc_file = yaml.safe_load((project / "data/raw/synthetic.dvc").read_text())
    raw_hash = dvc_file["outs"][0]["md5"]
    assert any((project / ".dvc-storage").rglob("*")), "dvc push put nothing in the local remote"

    first = dvc(project, "repro")
    for stage in ("ingest", "validate", "sequences", "pretrain", "baselines", "evaluate"):
        assert f"Running stage '{stage}'" in first
    for manifest in ("data/canonical/manifest.json", "data/sequences/manifest.json"):
        assert json.loads((project / manifest).read_text())["raw_dvc_hash"] == raw_hash
    assert json.loads((project / "reports/validation.json").read_text())["raw_dvc_hash"] == raw_hash
    assert (project / "reports/data_docs/index.html").exists()

    second = dvc(project, "repro")
    assert "Running stage" not in second and "up to date" in second
    dag = dvc(project, "dag", "--md")
    assert all(stage in dag for stage in ("ingest", "validate", "sequences", "pretrain", "baselines", "evaluate"))
    assert "favourite_category" in dvc(project, "metrics", "show")

    # A second data version: new hash, and only then does repro rerun the stages.
    set_params(project, {"data": {"synthetic": {"seed": 1}}})
    userlens(project, "fetch", "--no-progress")
    new_hash = yaml.safe_load((project / "data/raw/synthetic.dvc").read_text())["outs"][0]["md5"]
    assert new_hash != raw_hash
    third = dvc(project, "repro")
    assert "Running stage 'ingest'" in third
    assert json.loads((project / "data/sequences/manifest.json").read_text())["raw_dvc_hash"] == new_hash
    # Both raw versions are in the remote (DVC 3 layout: files/md5/<2 chars>/<rest>).
    for digest in (raw_hash, new_hash):
        assert (project / ".dvc-storage/files/md5" / digest[:2] / digest[2:]).exists(), digest


def test_sequences_refuse_unvalidated_tables(project):
    userlens(project, "fetch", "--no-progress")
    userlens(project, "ingest")
    done = userlens(project, "sequences", check=False)
    assert done.returncode != 0 and "run `userlens validate` first" in done.stderr
    assert "Traceback" not in done.stderr


def test_ingest_refuses_raw_data_changed_since_versioning(project):
    userlens(project, "fetch", "--no-progress")
    (project / "data/raw/synthetic/extra.csv").write_text("x\n")
    done = userlens(project, "ingest", check=False)
    assert done.returncode != 0 and "changed since it was versioned" in done.stderr


# --- bad input corpus: each refused with a clear message; a good run's outputs stay intact ----------

HEADER = "user_id,item_id,timestamp,rating\n"


def good_rows(n_users: int = 12, per_user: int = 6) -> str:
    return "".join(
        f"u{u},i{(u * 7 + k) % 20},{1_600_000_000 + u * 1000 + k},{1 + (u + k) % 5}\n"
        for u in range(n_users)
        for k in range(per_user)
    )


ITEMS = "item_id,title,categories\n" + "".join(f"i{i},Item {i},{'A' if i % 2 else 'B'}\n" for i in range(20))

BAD_INPUTS = {
    "empty file": (b"", "empty"),
    "header only": (HEADER, "no rows"),
    "wrong delimiter": (HEADER.replace(",", ";") + "u0;i1;1600000000;3\n", "separated by semicolons"),
    "missing column": ("user_id,item_id,rating\nu0,i1,3\n", "missing column(s) timestamp"),
    "non-numeric timestamp": (HEADER + good_rows() + "u0,i1,noon,3\n", "'noon'"),
    "truncated last line": (HEADER + good_rows() + "u0,i1", "truncated"),
    "exact duplicate events": (HEADER + good_rows() + "u0,i0,1600000000,1\n", "duplicate"),
    "future timestamps": (HEADER + good_rows() + "u0,i3,4102444800,3\n", "future"),
    "rating out of scale": (HEADER + good_rows() + "u0,i3,1600000100,9\n", "9"),
    "unknown item ids": (HEADER + good_rows() + "u0,i999,1600000100,3\n", "i999"),
    "null user ids": (HEADER + good_rows() + ",i3,1600000100,3\n", "user_id"),
    "binary garbage": (bytes(range(256)) * 16, "binary"),
    "wrong encoding": ((HEADER + good_rows() + "u0,Amélie,1600000100,3\n").encode("latin-1"), "UTF-8"),
}


def invoke(project: Path, *args: str):
    return CliRunner().invoke(cli, ["--project", str(project), *args], catch_exceptions=True)


def run_stages(project: Path):
    for verb in (["fetch", "--no-progress"], ["ingest"], ["validate"], ["sequences"]):
        result = invoke(project, *verb)
        if result.exit_code != 0:
            return result
    return result


@pytest.fixture(scope="module")
def generic_project(tmp_path_factory):
    root = tmp_path_factory.mktemp("generic")
    (root / "in").mkdir()
    (root / "in/items.csv").write_text(ITEMS)
    interactions = root / "in/interactions.csv"
    interactions.write_text(HEADER + good_rows())
    project = make_project(
        root / "project",
        data={
            "source": "generic",
            "dataset": "shop",
            "interactions": str(interactions),
            "items": str(root / "in/items.csv"),
            "rating_scale": [1, 5],
        },
    )
    # Every repairable defect fails here, so each case below is refused (the drop rules: test_quarantine.py).
    fail = {"duplicate_events": "fail", "rating_out_of_scale": "fail", "unknown_items": "fail", "null_keys": "fail"}
    set_params(project, {"dvc": {"push": False}, "validation": {"min_events_per_user": 2, "repair": fail}})
    result = run_stages(project)
    assert result.exit_code == 0, result.output
    return project, interactions


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_refused_and_previous_outputs_stay(generic_project, case):
    project, interactions = generic_project
    content, expected = BAD_INPUTS[case]
    before = {d: folder_digest(project / "data" / d) for d in ("sequences", "canonical")}
    good = interactions.read_bytes()
    try:
        interactions.write_bytes(content if isinstance(content, bytes) else content.encode())
        result = run_stages(project)
    finally:
        interactions.write_bytes(good)
    assert result.exit_code not in (0, 1), f"{case}: expected a handled error, got {result.exit_code}: {result.output}"
    assert expected in result.output, f"{case}: message lacks {expected!r}:\n{result.output}"
    assert "Traceback" not in result.output
    assert folder_digest(project / "data/sequences") == before["sequences"], "sequences were overwritten"
    if "Validation FAILED" not in result.output:  # refused at parse time: nothing new was written
        assert folder_digest(project / "data/canonical") == before["canonical"]


def test_cli_error_has_no_traceback_and_debug_shows_it(tmp_path):
    done = userlens(tmp_path, "ingest", check=False)  # no params.yaml here
    assert done.returncode == 2
    assert done.stderr.startswith("error: ") and "params.yaml" in done.stderr and "Traceback" not in done.stderr
    debug = userlens(tmp_path, "--debug", "ingest", check=False)
    assert "Traceback" in debug.stderr


@pytest.mark.parametrize("verb", ["run", "fetch", "ingest", "validate", "sequences"])
def test_every_verb_has_help_with_examples(verb):
    result = CliRunner().invoke(cli, [verb, "--help"])
    assert result.exit_code == 0 and "Examples:" in result.output and "userlens" in result.output


def test_sequences_match_canonical_events(generic_project):
    project, _ = generic_project
    assert run_stages(project).exit_code == 0  # the good input again, after the bad-input cases
    seq = pl.read_parquet(project / "data/sequences/sequences.parquet")
    users = pl.read_parquet(project / "data/sequences/users.parquet")
    canonical = pl.read_parquet(project / "data/canonical/interactions.parquet")
    total = seq["history_item_index"].list.len().sum() + seq["future_item_index"].list.len().sum()
    assert total == canonical.height  # max_length 200 keeps everything here
    assert users["user_index"].to_list() == list(range(users.height))
    assert (users["n_future"] >= 1).all()


@pytest.mark.parametrize("rule, expected_users", [("drop", 12), ("keep", 14)])
def test_short_user_rule_is_applied_and_reported(tmp_path, rule, expected_users):
    interactions = tmp_path / "interactions.csv"
    # 12 users with 6 events, plus two short users with 1 and 2 events
    interactions.write_text(HEADER + good_rows() + "s1,i1,1600000000,3\ns2,i1,1600000000,3\ns2,i2,1600000001,4\n")
    project = make_project(
        tmp_path / "project", data={"source": "generic", "dataset": "shop", "interactions": str(interactions)}
    )
    set_params(project, {"dvc": {"push": False}, "validation": {"short_users": rule, "min_events_per_user": 3}})
    result = run_stages(project)
    assert result.exit_code == 0, result.output
    users = pl.read_parquet(project / "data/sequences/users.parquet")
    assert users.height == expected_users
    assert ("s1" in users["user_id"].to_list()) == (rule == "keep")
    manifest = json.loads((project / "data/sequences/manifest.json").read_text())
    assert manifest["short_users"] == {"count": 2, "min_events": 3, "rule": rule}
    report = json.loads((project / "reports/validation.json").read_text())
    assert report["short_users"]["count"] == 2 and sorted(report["short_users"]["examples"]) == ["s1", "s2"]
    assert users["user_index"].to_list() == list(range(expected_users))


def test_short_user_rule_fail_stops_validation(tmp_path):
    interactions = tmp_path / "interactions.csv"
    interactions.write_text(HEADER + good_rows() + "s1,i1,1600000000,3\n")
    project = make_project(
        tmp_path / "project", data={"source": "generic", "dataset": "shop", "interactions": str(interactions)}
    )
    set_params(project, {"dvc": {"push": False}, "validation": {"short_users": "fail", "min_events_per_user": 3}})
    result = run_stages(project)
    assert result.exit_code == 3 and "fewer than 3 events" in result.output and "s1" in result.output
