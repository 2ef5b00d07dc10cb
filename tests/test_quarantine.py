"""Repair rules through the real stages: drops go to reports/quarantine/, the sequences leave them
out, the summary reports them, and a failed validation leaves the last good outputs alone. Plus
the smallest valid input (interactions only) and the real Ciao export, end to end."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from click.testing import CliRunner

from conftest import ciao_dir, make_project, run, set_params
from userlens import release, stages
from userlens.cli import cli
from userlens.project import Project
from userlens.report import task_results

pytestmark = pytest.mark.integration

HEADER = "user_id,item_id,timestamp,rating\n"
ITEMS = "item_id,title,categories\n" + "".join(f"i{i},Item {i},{'A' if i % 2 else 'B|C'}\n" for i in range(30))


def events(n_users: int = 40, per_user: int = 10) -> list[str]:
    """Clean rows: whole-star ratings, every user with `per_user` distinct events."""
    return [
        f"u{u},i{(u * 7 + k) % 30},{1_600_000_000 + u * 1000 + k},{1 + (u + k) % 5}\n"
        for u in range(n_users)
        for k in range(per_user)
    ]


GOOD = events()
DEFECTS = [GOOD[3], GOOD[10], GOOD[10], "u5,i1,1600005500,17\n"]  # 3 exact copies, 1 rating off the 1-5 scale


def invoke(project: Path, *args: str):
    return CliRunner().invoke(cli, ["--project", str(project), *args], catch_exceptions=True)


def run_stages(project: Path, *options: str):
    for verb in (["fetch", "--no-progress"], ["ingest"], ["validate"], ["sequences"]):
        result = invoke(project, *options, *verb)
        if result.exit_code != 0:
            return result
    return result


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def shop(tmp_path_factory):
    """A generic project run once on data with duplicates and a stray rating (default rules)."""
    root = tmp_path_factory.mktemp("quarantine")
    interactions, items = root / "interactions.csv", root / "items.csv"
    interactions.write_text(HEADER + "".join(GOOD + DEFECTS))
    items.write_text(ITEMS)
    project = make_project(
        root / "project",
        data={"source": "generic", "dataset": "shop", "interactions": str(interactions), "items": str(items)},
    )
    set_params(project, {"dvc": {"push": False}})
    result = run_stages(project)
    assert result.exit_code == 0, result.output
    return project, interactions


def test_drop_rules_quarantine_rows_the_sequences_leave_out(shop):
    project, _ = shop
    canonical = json.loads((project / "data/canonical/manifest.json").read_text())
    assert (canonical["rating_scale"], canonical["rating_scale_origin"]) == ([1.0, 5.0], "inferred")
    assert canonical["rating_scale_outside"] == 1

    quarantine = pl.read_parquet(project / "reports/quarantine/interactions.parquet")
    assert sorted(quarantine["quarantined_by"].to_list()) == ["duplicate_events"] * 3 + ["rating_out_of_scale"]
    assert quarantine.filter(pl.col("quarantined_by") == "rating_out_of_scale")["rating"].to_list() == [17.0]
    interactions = pl.read_parquet(project / "data/canonical/interactions.parquet")
    assert interactions.height == len(GOOD) + len(DEFECTS)
    # the rows dropped are exactly those row numbers of the canonical table
    assert interactions[quarantine["row"].to_list()].equals(quarantine.drop("row", "quarantined_by"))

    report = json.loads((project / "reports/validation.json").read_text())
    assert report["success"] and report["quarantine"]["rows"] == 4
    assert report["quarantine"]["by_rule"] == {"duplicate_events": 3, "rating_out_of_scale": 1}
    repaired = {c["check"]: c for c in report["checks"] if c["quarantined"]}
    assert set(repaired) == {"no_duplicate_events", "rating_in_scale"}
    assert repaired["no_duplicate_events"]["unexpected_count"] == 5  # GX sees every copy; two of them are kept

    seq = pl.read_parquet(project / "data/sequences/sequences.parquet")
    manifest = json.loads((project / "data/sequences/manifest.json").read_text())
    total = seq["history_item_index"].list.len().sum() + seq["future_item_index"].list.len().sum()
    assert total == len(GOOD) and manifest["quarantined_events"] == 4
    ratings = pl.concat([seq["history_rating"].explode(), seq["future_rating"].explode()])
    assert ratings.max() == 5.0

    proj = Project(project)
    summary = stages.summary_markdown(proj, proj.load_params(), {"ingest": canonical})
    assert "| rating scale | [1.0, 5.0] (inferred; 1 rated rows outside) |" in summary
    assert (
        "| quarantined interactions | 4 (duplicate_events 3, rating_out_of_scale 1): "
        "`reports/quarantine/interactions.parquet` |"
    ) in summary


DUPLICATES = "interactions.(user_id, item_id, timestamp, rating): "  # the check, then its message
CASES = {
    # 40 of 440 rows are copies (9 %): more than max_drop_fraction (5 %)
    "over max_drop_fraction": (
        [],
        GOOD + GOOD[:40],
        [DUPLICATES + "80 of 440 rows are exact duplicate events", "more than validation.max_drop_fraction"],
    ),
    "duplicates under fail": (
        ["--set", "validation.repair.duplicate_events=fail"],
        GOOD + GOOD[:1],
        [DUPLICATES + "2 of 401 rows are exact"],
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_failed_validation_leaves_the_last_good_outputs(shop, case):
    project, interactions = shop
    options, rows, words = CASES[case]
    before = {d: digest(project / d) for d in ("reports/quarantine", "data/sequences")}
    good = interactions.read_bytes()
    try:
        interactions.write_text(HEADER + "".join(rows))
        result = run_stages(project, *options)
        refused = invoke(project, "sequences")
    finally:
        interactions.write_bytes(good)
    assert result.exit_code == 3, result.output
    assert all(text in result.output for text in words), result.output
    assert "e.g. (u0, i0, 1600000000, 1.0)" in result.output and "Traceback" not in result.output
    assert {d: digest(project / d) for d in before} == before
    assert refused.exit_code == 3 and "failed validation" in refused.output
    assert run_stages(project).exit_code == 0  # the good data again, for the next test


def test_sequences_refuse_a_quarantine_validation_did_not_write(shop):
    project, _ = shop
    path = project / "reports/quarantine/interactions.parquet"
    original = path.read_bytes()
    try:
        pl.read_parquet(path).head(1).write_parquet(path)
        result = invoke(project, "sequences")
    finally:
        path.write_bytes(original)
    assert result.exit_code == 2 and "not the quarantine that reports/validation.json recorded" in result.output


def test_the_sequences_stage_does_not_load_great_expectations(shop):
    """`dvc repro` runs every stage in its own process; the sequences stage reads validation's
    record and quarantine, and must not pay GX's import (~4 s) to do so."""
    project, _ = shop

    def tables() -> dict[str, str]:  # the manifest holds the time it was written
        return {k: v for k, v in digest(project / "data/sequences").items() if k.endswith(".parquet")}

    before = tables()
    done = run([sys.executable, "-X", "importtime", "-m", "userlens", "--project", str(project), "sequences"], project)
    assert "userlens.stages" in done.stderr  # importtime reported the stage's imports
    assert "great_expectations" not in done.stderr
    assert tables() == before  # the same quarantine left out, the same sequences


def test_interactions_only_input_runs_end_to_end(tmp_path):
    """user_id, item_id, timestamp and nothing else: no ratings, no items file, no categories."""
    from userlens import baselines
    from userlens.data import SequenceData
    from userlens.model import UserEncoder

    interactions = tmp_path / "events.csv"
    interactions.write_text("user_id,item_id,timestamp\n" + "".join(r.rsplit(",", 1)[0] + "\n" for r in events()))
    project = make_project(
        tmp_path / "project", data={"source": "generic", "dataset": "bare", "interactions": str(interactions)}
    )
    set_params(project, {"dvc": {"push": False}})
    result = run_stages(project)
    assert result.exit_code == 0, result.output

    params = Project(project).load_params()
    seq_dir = project / "data/sequences"
    data = SequenceData.load(seq_dir, params.sequences.max_length)
    assert (data.n_users, data.n_items, data.n_categories) == (40, 30, 0)
    assert not data.has_rating.any()
    max_length = params.sequences.max_length
    encoder = UserEncoder(params.model, data.n_items, data.n_categories, max_length, data.item_categories)
    with torch.no_grad():
        vectors = encoder(data.batch(torch.arange(data.n_users)))
    assert vectors.shape == (40, params.model.d_model) and torch.isfinite(vectors).all()
    # the baselines that read the sequences directly: a profile without categories or ratings, ALS
    assert np.isfinite(baselines.handcrafted_profile(seq_dir)).all()
    users, items = baselines.als_factors(seq_dir, params.baselines, seed=0)
    assert users.shape[0] == 40 and items.shape[0] == 30
    # ... and every learning stage after them: no category task, no rating task, next item only
    proj = Project(project)
    stages.pretrain(proj, params, progress=False)
    stages.train_baselines(proj, params, progress=False)
    results = stages.evaluate(proj, params, progress=False)
    assert set(task_results(results)) == {"next_item"}
    decision = release.gate(proj, params)
    assert not decision["passed"] and "no gated task was evaluated" in decision["reasons"][0]


def test_ciao_ingest_validate_sequences_with_the_defaults(tmp_path):
    """The real Ciao export keeps its defects: exact duplicate events and a few 0 ratings off its
    1-5 scale. The default rules drop both into the quarantine; everything else passes."""
    folder = ciao_dir()
    project = make_project(tmp_path / "project")
    set_params(project, {"dvc": {"push": False}})
    options = ["--interactions", str(folder / "interactions.csv"), "--set", f"data.items={folder / 'items.csv'}",
               "--set", "data.dataset=ciao"]  # fmt: skip
    result = run_stages(project, *options)
    assert result.exit_code == 0, result.output

    raw = pl.read_csv(folder / "interactions.csv", schema_overrides={"rating": pl.Float32})
    copies = raw.height - raw.unique().height  # every copy of an event but the first
    zeros = raw.filter(pl.col("rating") == 0).height
    assert copies > 0 and zeros > 0  # the defects the export is known for (SOURCES.md)

    canonical = json.loads((project / "data/canonical/manifest.json").read_text())
    assert (canonical["rating_scale"], canonical["rating_scale_origin"]) == ([1.0, 5.0], "inferred")
    assert canonical["rating_scale_outside"] == zeros
    quarantine = pl.read_parquet(project / "reports/quarantine/interactions.parquet")
    by_rule = quarantine["quarantined_by"].str.split(",").explode().value_counts()
    assert dict(by_rule.iter_rows()) == {"duplicate_events": copies, "rating_out_of_scale": zeros}
    assert quarantine.filter(pl.col("quarantined_by").str.contains("rating"))["rating"].unique().to_list() == [0.0]
    kept = pl.read_parquet(project / "data/canonical/interactions.parquet").with_row_index("row")
    kept = kept.filter(~pl.col("row").is_in(quarantine["row"].implode())).drop("row")
    assert kept.height == raw.height - quarantine.height and not kept.is_duplicated().any()

    report = json.loads((project / "reports/validation.json").read_text())
    assert report["success"] and report["quarantine"]["rows"] == quarantine.height
    manifest = json.loads((project / "data/sequences/manifest.json").read_text())
    assert manifest["quarantined_events"] == quarantine.height
    seq = pl.read_parquet(project / "data/sequences/sequences.parquet")
    assert seq["history_rating"].explode().min() >= 1.0 and seq["future_rating"].explode().min() >= 1.0
