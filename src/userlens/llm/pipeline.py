"""The user-conditioned LM as a stage: `userlens condition` (dvc.yaml `condition`).

1. The encoder: the trained Barlow Twins candidate (data/models/barlow_twins: the stage runs
   after pretrain), frozen unless user_llm.tune_encoder.
2. Users: the pretraining validation users choose the round (as for every method); the others
   are split (seeded) into train and test users, the test users capped at user_llm.eval_users.
3. Train the conditioning (user_llm.mode) on the train users' questions (user_llm.tasks).
4. Score every task on the test users: the LM without the user, the LM with the user's last N
   events in the prompt (user_llm.text_prompt_events), and the conditioned LM ->
   reports/user_llm.json and .md; the trained parts -> data/user_llm/<version>/.
"""

from __future__ import annotations

import hashlib
import logging
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch

from userlens.config import Params
from userlens.errors import UserlensError
from userlens.io import read_json, utc_now, write_json_atomic, write_text_atomic
from userlens.project import Project

log = logging.getLogger(__name__)

CONDITIONER, MANIFEST, CONTEXT = "conditioner.pt", "manifest.json", "user_context.parquet"
BATCH_USERS = 256


def versions_dir(project: Project) -> Path:
    return project.root / "data" / "user_llm"


def get_version(project: Project, version: str | None = None) -> Path:
    """A trained conditioner version's folder (the latest when `version` is None)."""
    folder = versions_dir(project)
    if version is None:
        done = sorted(p for p in folder.glob("user_llm-*") if (p / MANIFEST).exists()) if folder.exists() else []
        if not done:
            raise UserlensError("no user-conditioned LM version yet: run `userlens condition`")
        return done[-1]
    if not (folder / version / MANIFEST).exists():
        raise UserlensError(f"no user-conditioned LM version {version!r} in {project.relative(folder)}")
    return folder / version


def candidate_version(project: Project) -> str:
    """The model version of the trained Barlow Twins candidate (what `condition` reads)."""
    path = project.model_dir("barlow_twins") / "manifest.json"
    if not path.exists():
        raise UserlensError("no trained Barlow Twins encoder: run `userlens pretrain` first")
    return read_json(path).get("model_version", "unknown")


def _encoder(project: Project, params: Params):
    """(encoder, its vocabulary, max_length, its model version): the trained candidate."""
    from userlens.release import candidate_encoder

    encoder, vocabulary, max_length = candidate_encoder(project, params)
    return encoder, vocabulary, max_length, candidate_version(project)


def condition(project: Project, params: Params, progress: bool = True) -> dict[str, Any]:
    """Train and score the user-conditioned LM; returns (and writes) the report."""
    import shutil

    from userlens.data import SequenceData
    from userlens.llm.conditioning import UserConditionedLM
    from userlens.llm.loader import load_private
    from userlens.llm.tasks import Catalogue, make_questions
    from userlens.llm.training import train_conditioned
    from userlens.pretraining import validation_users
    from userlens.stages import load_items

    started = time.perf_counter()
    settings = params.user_llm
    encoder, vocabulary, max_length, encoder_version = _encoder(project, params)
    tables = load_items(project)
    seq_dir = project.sequences_dir
    data = SequenceData.load(seq_dir, max_length, vocabulary)
    catalogue = Catalogue.load(seq_dir, tables.items)
    val = validation_users(data.n_users, params)
    rest = np.setdiff1d(np.arange(data.n_users), val)
    rest = rest[np.random.default_rng(settings.train.seed).permutation(len(rest))]
    n_test = min(settings.eval_users, len(rest) * 3 // 10)
    test, train = np.sort(rest[:n_test]), np.sort(rest[n_test:])
    tasks = [t for t in settings.tasks if t != "preference" or tables.rating_scale is not None]
    if not tasks:
        raise UserlensError("none of user_llm.tasks fits this data (preference needs ratings)")

    def questions(users: np.ndarray, events: int = 0) -> dict[str, list]:
        return {t: make_questions(t, catalogue, seq_dir, tables.rating_scale, users, events, settings.candidates,
                                  settings.train.seed) for t in tasks}  # fmt: skip

    language_model = load_private(settings.llm.model, settings.llm.device)
    torch.manual_seed(settings.train.seed)  # the new parts' initialisation: a rerun trains the same version
    model = UserConditionedLM(language_model.model, encoder, settings).to(language_model.device)
    tokenizer = language_model.tokenizer
    # A crashed run resumes from its checkpoints; other settings or another encoder start afresh.
    run_key = hashlib.sha256(f"{settings.model_dump_json()}|{encoder_version}".encode()).hexdigest()[:12]
    work = versions_dir(project) / f".training-{run_key}"
    fit = train_conditioned(model, tokenizer, data, questions(train), questions(val[: settings.eval_users]),
                            settings, work, progress)  # fmt: skip
    model.eval()
    asked = questions(test)
    texts = {n: questions(test, n) for n in settings.text_prompt_events}
    scores = {task: _scores(model, tokenizer, data, task, asked[task], {n: t[task] for n, t in texts.items()},
                            progress) for task in tasks}  # fmt: skip
    if "favourite_category" in scores:  # the one task a plain linear probe on the embedding can answer
        scores["favourite_category"]["linear probe (Barlow Twins embedding)"] = _probe(model, data, seq_dir,
                                                                                      train, test)  # fmt: skip
    user_ids = pl.read_parquet(seq_dir / "users.parquet", columns=["user_index", "user_id"]).sort("user_index")
    version = _save_version(project, model, data, user_ids["user_id"], settings, encoder_version,
                            language_model.identity)  # fmt: skip
    result = {
        "version": version,
        "encoder": encoder_version,
        "language_model": language_model.identity,
        "mode": settings.mode,
        "device": str(language_model.device),
        "batch_size": settings.train.batch_size,
        "latents": settings.latents,
        "perceiver": settings.perceiver,
        "users": {
            "train": int(len(train)),
            "validation": int(min(len(val), settings.eval_users)),
            "test": int(len(test)),
        },  # fmt: skip
        "training": {
            "steps": fit.steps_run,
            "selected_step": fit.selected_step,
            "reason": fit.reason,
            "seconds": round(fit.seconds, 1),
        },  # fmt: skip
        "scores": scores,
        "seconds": round(time.perf_counter() - started, 1),
        "created_at": utc_now(),
    }
    write_json_atomic(project.reports_dir / "user_llm.json", result)
    write_text_atomic(project.reports_dir / "user_llm.md", markdown(result))
    shutil.rmtree(work, ignore_errors=True)
    return result


def _scores(model, tokenizer, data, task: str, asked: list, with_history: dict[int, list], progress: bool) -> dict:
    """Metrics and cost per query of every method on one task: the LM without the user, with the
    user's last N events in the prompt (also calibrated: minus the no-context score of each
    answer, which removes the LM's prior for some answers over others; it costs both prompts),
    and conditioned on the user."""
    from userlens.llm.tasks import query_cost, task_metrics
    from userlens.llm.training import scored

    def run(name: str, questions: list, conditioned: bool) -> tuple[dict, list]:
        found, choice_scores = scored(model, tokenizer, data, task, questions, conditioned,
                                      f"{task}: {name}" if progress else None)  # fmt: skip
        return {**found, **query_cost(model, tokenizer, data, questions, conditioned)}, choice_scores

    out, (out["no context"], prior) = {}, run("no context", asked, False)
    for n, questions in with_history.items():
        name = f"text prompt (last {n} events)"
        out[name], raw = run(name, questions, False)
        assert all(q.choices == a.choices for q, a in zip(questions, asked, strict=True))  # the same answers
        calibrated = task_metrics(task, [r - p for r, p in zip(raw, prior, strict=True)], questions)
        cost = {key: out[name][key] + out["no context"][key] for key in COSTS}
        out[f"{name}, calibrated"] = {**calibrated, **cost}
    out[f"conditioned ({model.settings.mode})"] = run("conditioned", asked, True)[0]
    return out


def _per_user(data, device, compute) -> np.ndarray:
    """compute(batch) for every user of `data`, BATCH_USERS at a time, without gradients, as float32."""
    with torch.no_grad():
        return np.concatenate([compute(data.batch(range(s, min(s + BATCH_USERS, data.n_users))).to(device))
                               .float().cpu().numpy() for s in range(0, data.n_users, BATCH_USERS)])  # fmt: skip


def _probe(model, data, sequences_dir, train: np.ndarray, test: np.ndarray) -> dict:
    """favourite_category by logistic regression on the encoder's pooled embedding (train users'
    labels -> test users): the plain way to use the embedding, as `userlens evaluate` does."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from userlens.evaluate import build_tasks

    labels = build_tasks(sequences_dir)["favourite_category"].labels
    train, test = train[labels[train] >= 0], test[labels[test] >= 0]
    vectors = _per_user(data, model.device, model.encoder)
    scaler = StandardScaler().fit(vectors[train])
    probe = LogisticRegression(max_iter=2000).fit(scaler.transform(vectors[train]), labels[train])
    accuracy = float((probe.predict(scaler.transform(vectors[test])) == labels[test]).mean()) if len(test) else np.nan
    return {"accuracy": accuracy, "prompt_tokens": 0.0, "gflops_per_query": 0.0, "ms_per_query": 0.0}


def _save_version(project: Project, model, data, user_ids, settings, encoder_version: str, lm_identity: str) -> str:
    """The trained parts (state_dict without the LM), what they were trained with, and every
    user's latents; the folder appears whole or not at all."""
    from userlens.io import atomic_dir, write_parquet_atomic
    from userlens.train import atomic_save

    state = model.state_dict()
    digest = hashlib.sha256(b"".join(t.detach().cpu().numpy().tobytes() for t in state.values())).hexdigest()[:8]
    version = f"user_llm-{datetime.now(UTC).strftime('%Y%m%dT%H%M%S')}-{digest}"
    latents = _per_user(data, model.device, model.user_latents)  # the model is in eval mode since scoring
    users, k, user_dim = latents.shape
    rows = pl.DataFrame({"user_id": user_ids}).with_columns(
        user_context=pl.Series(latents.reshape(users, k * user_dim), dtype=pl.List(pl.Float32)),
        context_version=pl.lit(version),
        context_latents=pl.lit(k, dtype=pl.Int64),
    )
    manifest = {"version": version, "encoder": encoder_version, "language_model": lm_identity,
                "settings": settings.model_dump(mode="json"), "latents": k, "user_dim": user_dim, "users": users,
                "created_at": utc_now()}  # fmt: skip
    with atomic_dir(versions_dir(project) / version) as staging:
        atomic_save({"model": state}, staging / CONDITIONER)
        write_json_atomic(staging / MANIFEST, manifest)
        write_parquet_atomic(staging / CONTEXT, rows)
    return version


COSTS = ("prompt_tokens", "gflops_per_query", "ms_per_query")  # per query, beside each method's quality


def method_row(label: str, tasks: list[str], entries: list[dict | None]) -> str:
    """One method's table row: its headline metric per task ("—" where it has none), then its
    cost per query averaged over the tasks it answers."""
    from userlens.llm.tasks import HEADLINE

    cells = [f"{entry[HEADLINE[t]]:.3f}" if entry else "—" for t, entry in zip(tasks, entries, strict=True)]
    tokens, gflops, ms = (np.mean([entry[c] for entry in entries if entry]) for c in COSTS)
    return f"| {label} | " + " | ".join([*cells, f"{tokens:.0f}", f"{gflops:.2f}", f"{ms:.0f}"]) + " |"


def markdown(result: dict[str, Any]) -> str:
    lines = [
        f"User-conditioned LM {result['version']}: {result['mode']}, k = {result['latents']}"
        f"{' (Perceiver)' if result['perceiver'] else ' (pooled embedding)'}, on {result['language_model']}, "
        f"encoder {result['encoder']}; {result['users']['train']} train / {result['users']['test']} test users; "
        f"{result['training']['steps']} steps in {result['training']['seconds']:.0f}s",
        "",
    ]
    from userlens.llm.tasks import HEADLINE

    tasks = list(result["scores"])
    methods = list(dict.fromkeys(m for t in tasks for m in result["scores"][t]))  # a probe answers one task
    lines += ["Headline metric per task: " + ", ".join(f"{t} {HEADLINE[t]}" for t in tasks)
              + " (answers scored by the LM's likelihood; next_item among its candidates). Cost per query "
              "(a question scored with all its choices, the prompt once), mean over the tasks.", "",
              "| method | " + " | ".join(tasks) + " | prompt tokens | GFLOPs / query | ms / query |",
              "|---|" + "---:|" * (len(tasks) + len(COSTS))]  # fmt: skip
    lines += [method_row(method, tasks, [result["scores"][t].get(method) for t in tasks]) for method in methods]
    training = result["training"]
    if training["steps"] and training["seconds"]:
        lines += ["", f"Training: {training['steps'] / training['seconds']:.2f} steps/s "
                  f"(batch {result.get('batch_size', '?')}) on {result.get('device', '?')}"]  # fmt: skip
    return "\n".join(lines) + "\n"
