"""Training a UserConditionedLM on the questions of userlens.llm.tasks, with userlens.train.fit.

Each step takes `batch_size` train users and one task (drawn from the step's seeded RNG), asks each
user that task's question with the right answer, and minimises the LM's next-token loss on
the answer tokens only, scored on the validation users each round; what fit records as the
round's "embeddings" are the validation users' latents (so its collapse monitor watches them).
The validation score is the mean over tasks of each one's headline metric (tasks.HEADLINE).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from userlens.config import UserLLMParams
from userlens.errors import UserlensError
from userlens.llm.conditioning import UserConditionedLM
from userlens.llm.tasks import HEADLINE, Question, choice_scores, encode, rank_of_answer, task_metrics
from userlens.train import FitResult, fit


def accuracy(model, tokenizer, data, questions: list[Question], conditioned: bool = True) -> float:
    """Share of questions whose right choice scores highest."""
    if not questions:
        return float("nan")
    scores = choice_scores(model, tokenizer, data, questions, conditioned)
    return float(np.mean([rank_of_answer(s, q.answer) == 0 for s, q in zip(scores, questions, strict=True)]))


def metrics(
    model, tokenizer, data, task: str, questions: list[Question], conditioned: bool = True, progress: str | None = None
) -> dict:
    """The task's metrics (tasks.task_metrics) on these questions (`progress`: a bar with this
    title), and ms_per_query: the wall time of scoring one question with all its choices."""
    return scored(model, tokenizer, data, task, questions, conditioned, progress)[0]


def scored(
    model, tokenizer, data, task: str, questions: list[Question], conditioned: bool = True, progress: str | None = None
) -> tuple[dict, list[np.ndarray]]:
    """(metrics as `metrics` gives them, each question's choice scores)."""
    started = time.perf_counter()
    scores = choice_scores(model, tokenizer, data, questions, conditioned, progress) if questions else []
    seconds = time.perf_counter() - started
    return {**task_metrics(task, scores, questions), "ms_per_query": 1000 * seconds / max(len(questions), 1)}, scores


def train_conditioned(
    model: UserConditionedLM,
    tokenizer,
    data,
    train_questions: dict[str, list[Question]],
    val_questions: dict[str, list[Question]],
    settings: UserLLMParams,
    out_dir: Path,
    progress: bool = True,
) -> FitResult:
    """Fit the new parts (and the encoder with tune_encoder) on `train_questions` (task -> one
    question per user); selection and curves as userlens.train.fit does them."""
    tasks = [t for t in settings.tasks if train_questions.get(t)]
    if not tasks:
        raise UserlensError("no training questions for any of user_llm.tasks (no user has their labels)")
    by_user = {task: {q.user: q for q in train_questions[task]} for task in tasks}
    users = np.array(sorted({q.user for task in tasks for q in train_questions[task]}))
    val_users = sorted({q.user for questions in val_questions.values() for q in questions})

    def step_loss(module: UserConditionedLM, batch_users: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        task = tasks[int(torch.randint(len(tasks), (1,), generator=generator))]  # by step: a resume agrees
        questions = [by_user[task][u] for u in batch_users.tolist() if u in by_user[task]]
        if not questions:  # none of these users has this task's label: another task's turn
            questions = [by_user[t][u] for t in tasks for u in batch_users.tolist() if u in by_user[t]]
        ids, mask, labels = encode(tokenizer, [q.prompt for q in questions],
                                   [q.choices[q.answer] for q in questions], module.device)  # fmt: skip
        batch = data.batch([q.user for q in questions]).to(module.device)
        return module(batch, ids, mask, labels).loss

    def embed(module: UserConditionedLM) -> np.ndarray:
        with torch.no_grad():
            latents = module.user_latents(data.batch(val_users).to(module.device))
        return latents.flatten(1).float().cpu().numpy()

    def score(_: np.ndarray) -> float:  # the mean of each task's headline metric
        values = [metrics(model, tokenizer, data, t, val_questions[t])[HEADLINE[t]] for t in tasks
                  if val_questions.get(t)]  # fmt: skip
        return float(np.nanmean(values)) if values else float("nan")

    return fit(model, step_loss, embed, score, users, settings.train, out_dir, desc="user-conditioned LM",
               progress=progress)  # fmt: skip
