"""Questions about users, answered by a (user-conditioned) language model and scored.

Tasks, from data/sequences and the item catalogue (labels from each user's FUTURE window,
never from the history the model reads):
- favourite_category: the majority category of the future window (evaluate.build_tasks'
  label), answered in words; scored by the LM's likelihood of each category name (accuracy);
- next_item: the first future item not in the history, its title among `candidates` titles
  (the target and random others); scored by likelihood (Recall@10 and NDCG@10 over the list);
- preference: "would this user like <title>?" for a future rated item (liked = rating at
  least 75 % up the scale, as lifelong.ctr), answered yes or no; scored by
  log P(yes) - log P(no) (AUC).
Scoring by likelihood of given answers makes the figures independent of free generation.
A text prompt (the user's last N events as titles, categories and ratings) is the baseline
way to tell the LM who the user is; a conditioned LM gets the user through the encoder instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from userlens.errors import UserlensError

QUESTIONS = {
    "favourite_category": "Which category of items will this user choose most often next? Answer with the category.",
    "next_item": "Which item will this user choose next? Answer with its title.",
    "preference": "Would this user like {title}? Answer yes or no.",
}


@dataclass(frozen=True)
class Question:
    user: int  # user_index in data/sequences
    prompt: str  # the question, with the text history in front when the method has one
    choices: tuple[str, ...]  # the answers scored
    answer: int  # index of the right choice (preference: 0 = yes)


def history_text(events: list[tuple[str, tuple[str, ...], float | None]], n: int) -> str:
    """The last `n` events (title, categories, rating) as one line a prompt can hold."""
    shown = events[-n:] if n else []
    parts = [f"{title} ({', '.join(cats) or 'no category'})" + (f" rated {rating:g}" if rating is not None else "")
             for title, cats, rating in shown]  # fmt: skip
    return "This user's most recent items, oldest first: " + "; ".join(parts) + "." if parts else ""


def with_history(question: str, history: str) -> str:
    return f"{history}\n{question}" if history else question


def chat_prompt(tokenizer, prompt: str) -> str:
    """The prompt as the LM's chat template frames a user turn (plain text + newline without one)."""
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": prompt}]
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return prompt + "\n"


def encode(tokenizer, prompts: list[str], answers: list[str], device) -> tuple[torch.Tensor, ...]:
    """Right-padded ids of prompt + answer, the attention mask, and labels on the answer tokens only."""
    rows, labels = [], []
    for prompt, answer in zip(prompts, answers, strict=True):
        head = tokenizer(chat_prompt(tokenizer, prompt), add_special_tokens=False)["input_ids"]
        tail = tokenizer(answer, add_special_tokens=False)["input_ids"]
        rows.append(head + tail)
        labels.append([-100] * len(head) + tail)
    width = max(map(len, rows))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    target = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, (row, label) in enumerate(zip(rows, labels, strict=True)):
        ids[i, : len(row)], mask[i, : len(row)], target[i, : len(row)] = torch.tensor(row), 1, torch.tensor(label)
    return ids.to(device), mask.to(device), target.to(device)


def choice_scores(
    model, tokenizer, data, questions: list[Question], conditioned: bool, progress: str | None = None
) -> list[np.ndarray]:
    """Each question's score for each of its choices: the mean log-probability per token of the
    choice after the question (higher = more likely); `conditioned`: the model reads the user
    (else the plain LM: the no-context and text-prompt baselines). `progress`: a bar's title."""
    from tqdm.auto import tqdm

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out = []
    for question in tqdm(questions, desc=progress, unit="question", disable=progress is None, leave=False):
        prompt = tokenizer(chat_prompt(tokenizer, question.prompt), add_special_tokens=False)["input_ids"]
        tails = [tokenizer(choice, add_special_tokens=False)["input_ids"] for choice in question.choices]
        answers = torch.full((len(tails), max(map(len, tails))), pad, dtype=torch.long)
        mask = torch.zeros_like(answers)
        for i, tail in enumerate(tails):
            answers[i, : len(tail)], mask[i, : len(tail)] = torch.tensor(tail), 1
        latents = None
        if conditioned:
            with torch.no_grad():
                latents = model.user_latents(data.batch([question.user]).to(model.device))
        scores = model.answer_logprobs(torch.tensor([prompt], device=model.device), answers.to(model.device),
                                       mask.to(model.device), latents)  # fmt: skip
        out.append(scores.cpu().numpy().astype(np.float64))
    return out


def query_cost(model, tokenizer, data, questions: list[Question], conditioned: bool, sample: int = 3) -> dict:
    """What one question costs the LM: prompt tokens (mean over all questions; a soft prompt's
    k positions included) and FLOPs of scoring it with all its choices (torch's FLOP counter,
    mean over the first `sample` questions)."""
    from torch.utils.flop_counter import FlopCounterMode

    if not questions:
        return {}
    extra = model.settings.latents if conditioned and model.projector is not None else 0
    tokens = [len(tokenizer(chat_prompt(tokenizer, q.prompt), add_special_tokens=False)["input_ids"]) + extra
              for q in questions]  # fmt: skip
    counter = FlopCounterMode(display=False)
    with counter:
        choice_scores(model, tokenizer, data, questions[:sample], conditioned)
    return {"prompt_tokens": float(np.mean(tokens)),
            "gflops_per_query": counter.get_total_flops() / min(sample, len(questions)) / 1e9}  # fmt: skip


def rank_of_answer(scores: np.ndarray, answer: int) -> int:
    """0 = the right answer scored highest; ties count against it."""
    return int((scores >= scores[answer]).sum() - 1)


HEADLINE = {"favourite_category": "accuracy", "next_item": "recall@10", "preference": "auc"}


def task_metrics(task: str, scores: list[np.ndarray], questions: list[Question]) -> dict[str, float]:
    """favourite_category: accuracy; next_item: Recall@10 and NDCG@10 over its candidates (and
    accuracy, the target first); preference: AUC of log P(yes) - log P(no)."""
    if not questions:
        return {HEADLINE[task]: float("nan")}
    ranks = np.array([rank_of_answer(s, q.answer) for s, q in zip(scores, questions, strict=True)])
    out = {"accuracy": float(np.mean(ranks == 0))}
    if task == "next_item":
        out["recall@10"] = float(np.mean(ranks < 10))
        out["ndcg@10"] = float(np.mean(np.where(ranks < 10, 1 / np.log2(ranks + 2), 0.0)))
    if task == "preference":
        from sklearn.metrics import roc_auc_score

        liked = np.array([q.answer == 0 for q in questions])
        margin = np.array([s[0] - s[1] for s in scores])
        out["auc"] = float(roc_auc_score(liked, margin)) if 0 < liked.sum() < len(liked) else float("nan")
    return out


# --- questions from data/sequences --------------------------------------------------------------


@dataclass
class Catalogue:
    """What prompts say about items and users: titles, category names, each user's history."""

    titles: list[str]  # by item_index of data/sequences
    item_categories: list[tuple[str, ...]]  # by item_index
    categories: tuple[str, ...]
    histories: list[list[tuple[str, tuple[str, ...], float | None]]]  # by user_index: (title, cats, rating)

    @classmethod
    def load(cls, sequences_dir, items) -> Catalogue:
        """`items`: the canonical items table (item_id, title, categories)."""
        import polars as pl

        from userlens.io import read_json
        from userlens.lifelong.summaries import item_lookup

        categories = tuple(read_json(sequences_dir / "manifest.json")["categories"])
        known = pl.read_parquet(sequences_dir / "items.parquet", columns=["item_index", "item_id"]).sort("item_index")
        lookup = item_lookup(items)  # the names the interest summaries use too
        described = [lookup.get(i, (f"item {i}", ())) for i in known["item_id"].to_list()]
        titles = [title for title, _ in described]
        item_categories = [cats for _, cats in described]
        columns = ["user_index", "history_item_index", "history_rating"]
        rows = pl.read_parquet(sequences_dir / "sequences.parquet", columns=columns).sort("user_index")
        histories = []
        for seq, ratings in rows.select("history_item_index", "history_rating").iter_rows():
            ratings = ratings or [None] * len(seq)
            histories.append([(titles[i], item_categories[i], r) for i, r in zip(seq, ratings, strict=True)])
        return cls(titles, item_categories, categories, histories)


def make_questions(
    task: str,
    catalogue: Catalogue,
    sequences_dir,
    rating_scale: tuple[float, float] | None,
    users: np.ndarray,
    history_events: int = 0,
    candidates: int = 20,
    seed: int = 0,
) -> list[Question]:
    """The `task`'s questions for these users (those with a label), the last `history_events`
    events written into each prompt (0: none, as for a conditioned LM)."""
    from userlens.evaluate import build_tasks

    rng = np.random.default_rng(seed)
    users = np.asarray(users)

    def prompt(user: int, question: str) -> str:
        return with_history(question, history_text(catalogue.histories[user], history_events))

    if task == "favourite_category":
        labels = build_tasks(sequences_dir)["favourite_category"].labels
        return [Question(int(u), prompt(u, QUESTIONS[task]), catalogue.categories, int(labels[u]))
                for u in users if labels[u] >= 0]  # fmt: skip
    if task == "next_item":
        labels = build_tasks(sequences_dir)["next_item"].labels
        out = []
        for u in users:
            if labels[u] < 0:
                continue
            others = rng.choice(np.delete(np.arange(len(catalogue.titles)), labels[u]), candidates - 1, replace=False)
            options = np.concatenate([[labels[u]], others])
            rng.shuffle(options)
            titles = tuple(catalogue.titles[i] for i in options)
            right = int(np.flatnonzero(options == labels[u])[0])
            out.append(Question(int(u), prompt(u, QUESTIONS[task]), titles, right))
        return out
    if task == "preference":
        import polars as pl

        from userlens.lifelong.ctr import examples

        if rating_scale is None:
            raise UserlensError("the preference task needs ratings: this data has none")
        sequences = pl.read_parquet(sequences_dir / "sequences.parquet").sort("user_index")
        pairs = examples(sequences, rating_scale)
        first = {}  # one rated future item per user: the first
        for user, item, liked in zip(pairs.user, pairs.item, pairs.label, strict=True):
            first.setdefault(int(user), (int(item), bool(liked)))
        return [Question(int(u), prompt(u, QUESTIONS[task].format(title=catalogue.titles[first[u][0]])), ("yes", "no"),
                         0 if first[u][1] else 1) for u in users if int(u) in first]  # fmt: skip
    raise UserlensError(f"unknown task {task!r}: expected one of {sorted(QUESTIONS)}")
