"""The conditioned LM served: its latents as Feast `user_context`, answers from the online store.

A real project (synthetic source through the real data stages), the real Feast sqlite online
store, `userlens condition` with a tiny local model folder standing in for SmolLM2 (any local
causal-LM folder is accepted; the real SmolLM2 is trained in test_conditioning.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from click.testing import CliRunner

from conftest import build_sequences_project, promote_candidate
from test_conditioning import tiny_lm_folder
from userlens.cli import cli
from userlens.project import Project

pytestmark = pytest.mark.integration
QUESTION = "Which category of items will this user choose most often next? Answer with the category."
# Soft prompt from a 2-latent Perceiver: the served vector is k x d, reshaped by the reader.
SETTINGS = {"mode": "soft_prompt", "perceiver": "true", "latents": "2", "tasks": '["favourite_category"]',
            "text_prompt_events": "[3]", "eval_users": "20", "train.steps": "6", "train.eval_every": "6",
            "train.batch_size": "16", "llm.device": "cpu"}  # fmt: skip


def invoke(project: Path, *args: str):
    return CliRunner().invoke(cli, ["--project", str(project), *args], catch_exceptions=True)


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> tuple[Path, list[str]]:
    """Sequences, a 12-step Barlow Twins candidate (not yet in production), a tiny LM folder,
    and one trained conditioned-LM version; returns the root and the --set options."""
    from userlens import stages

    root = build_sequences_project(tmp_path_factory.mktemp("context") / "project",
                                   {"n_users": 120, "n_items": 80, "n_categories": 4})  # fmt: skip
    proj = Project(root)
    stages.pretrain(proj, proj.load_params().with_overrides({"pretrain.steps": 12}), progress=False)
    categories = json.loads((proj.sequences_dir / "manifest.json").read_text())["categories"]
    folder = tiny_lm_folder(root.parent / "tiny-lm", QUESTION.split() + list(categories))
    options = [a for k, v in {**SETTINGS, "llm.model": str(folder)}.items() for a in ("--set", f"user_llm.{k}={v}")]
    result = invoke(root, *options, "condition", "--no-progress")
    assert result.exit_code == 0, result.output
    return root, options


def test_latents_are_not_served_until_their_encoder_is_in_production(project):
    root, options = project
    refused = invoke(root, *options, "materialize", "--context")
    assert refused.exit_code == 2 and "nothing is in production yet" in refused.output
    assert "Traceback" not in refused.output
    skipped = invoke(root, *options, "--set", "user_llm.enabled=true", "materialize", "--context", "--stage")
    assert skipped.exit_code == 0 and "user_context not published" in skipped.output
    assert not (root / "data/feast/context.json").exists()
    early = invoke(root, *options, "condition", "--publish")  # refused before training, not after
    assert early.exit_code == 2 and "--publish: nothing is in production" in early.output


def test_served_latents_answer_as_the_trained_model_does(project):
    """After promotion: Feast serves every user's k x d latents (plain Feast read = the
    version's file), and `userlens ask` answers from them exactly as the trained model
    answers from the encoder; an unknown user is a clear error."""
    from feast import FeatureStore

    from userlens.config import UserLLMParams
    from userlens.data import SequenceData
    from userlens.llm.conditioning import UserConditionedLM
    from userlens.llm.loader import load_private
    from userlens.llm.tasks import chat_prompt
    from userlens.release import candidate_encoder

    root, options = project
    proj = Project(root)
    params = proj.load_params()
    promote_candidate(proj, params)
    published = invoke(root, *options, "materialize", "--context")
    assert published.exit_code == 0, published.output
    pointer = json.loads((root / "data/feast/context.json").read_text())
    version = pointer["model_version"]
    rows = pl.read_parquet(root / "data/user_llm" / version / "user_context.parquet")
    assert rows.height == 120 and pointer["dim"] == 2 * params.model.d_model  # k = 2 latents of the encoder's width

    ids = rows["user_id"].head(3).to_list()
    store = FeatureStore(repo_path=str(root / "feature_repo"))
    read = store.get_online_features(features=store.get_feature_service("user_context"),
                                     entity_rows=[{"user_id": u} for u in ids]).to_dict()  # fmt: skip
    np.testing.assert_array_equal(np.array(read["user_context"], np.float32), np.stack(rows["user_context"].head(3)))
    assert read["context_latents"] == [2, 2, 2] and set(read["context_version"]) == {version}

    asked = invoke(root, *options, "ask", ids[0], QUESTION, "--json", "--max-new-tokens", "6")
    assert asked.exit_code == 0, asked.output
    answer = json.loads(asked.stdout)
    assert answer["version"] == version and answer["user_id"] == ids[0]

    # The same answer from the trained model reading the user through the encoder.
    settings = UserLLMParams.model_validate(json.loads((root / "data/user_llm" / version / "manifest.json")
                                                       .read_text())["settings"])  # fmt: skip
    language_model = load_private(settings.llm.model, "cpu")
    encoder, vocabulary, max_length = candidate_encoder(proj, params)
    model = UserConditionedLM(language_model.model, encoder, settings)
    state = torch.load(root / "data/user_llm" / version / "conditioner.pt", weights_only=True)["model"]
    model.load_state_dict(state)
    model.eval()
    data = SequenceData.load(proj.sequences_dir, max_length, vocabulary)
    user_index = pl.read_parquet(proj.sequences_dir / "users.parquet").filter(pl.col("user_id") == ids[0])
    with torch.no_grad():
        latents = model.user_latents(data.batch([int(user_index["user_index"][0])]))
    served = torch.tensor(read["user_context"][0]).reshape(1, 2, -1)
    torch.testing.assert_close(served, latents)  # what Feast serves is what the encoder computes
    tokenizer = language_model.tokenizer
    encoded = tokenizer(chat_prompt(tokenizer, QUESTION), return_tensors="pt", add_special_tokens=False)
    from userlens.llm.serving import NO_REPEAT_NGRAM

    tokens = model.generate(encoded["input_ids"], encoded["attention_mask"], latents, 6, NO_REPEAT_NGRAM)
    expected = tokenizer.decode(tokens[0], skip_special_tokens=True).strip()
    assert answer["text"] == expected

    unknown = invoke(root, *options, "ask", "no-such-user", QUESTION)
    assert unknown.exit_code == 2 and "'no-such-user' has no user_context" in unknown.output
    assert "Traceback" not in unknown.output
    looked = invoke(root, *options, "lookup", ids[0], "--context")
    assert looked.exit_code == 0 and f"context version {version} (d={pointer['dim']})" in looked.output
