"""User Interest Learning (LIBER's UIL): one interest summary per closed partition, in a cascade.

The summary of partition k is written from partition k and the summary of k-1. Each is made
once: its cache key hashes (summariser identity - the model and prompt version -, previous
summary, partition as rendered), so a rerun, a crash-and-resume or a rebuild of identical
partitions generates nothing again, while a new prompt version or model writes new summaries.

Two summarisers, selected by `lifelong.summary.summariser`:
- "llm": the language model (`lifelong.llm.model`), greedy decoding with a token cap, batched;
- "template": a deterministic text built from the partition (top categories and their shares,
  rating tendency, example titles, the shift from the previous partition), with no language
  model at all: the CPU default and what tests use. It is named for what it is everywhere.

Storage, data/lifelong/<dataset>/summaries/: append-only parts of (key, user_id, partition,
rule, summariser, text); a part is written every COMMIT_EVERY summaries, so an interrupted
run keeps what it generated.
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
from collections import Counter
from pathlib import Path
from typing import Any, Protocol

import polars as pl
from tqdm.auto import tqdm

from userlens.config import SummaryParams
from userlens.lifelong.parts import PartStore
from userlens.lifelong.prompts import PROMPT_VERSION, Event, PartitionView, render_partition, summary_chat

log = logging.getLogger(__name__)
TEMPLATE_VERSION = "template-1"
COMMIT_EVERY = 256  # summaries written to the store at a time
SCHEMA = {"key": pl.String, "user_id": pl.String, "partition": pl.Int32, "rule": pl.String,
          "summariser": pl.String, "text": pl.String}  # fmt: skip
Request = tuple[str | None, PartitionView]  # (previous summary or None, the partition)


class Summariser(Protocol):
    identity: str  # names what writes the text (model, prompt version, settings that change it)

    def summarise(self, requests: list[Request], progress: Any = None) -> list[str]: ...


class TemplateSummariser:
    """Deterministic summaries from the partition's own statistics (no language model)."""

    identity = TEMPLATE_VERSION
    TOP = 3  # categories named
    SHIFT = 0.10  # a category's share must move this much to count as a shift

    def summarise(self, requests: list[Request], progress: Any = None) -> list[str]:
        out = [self._one(previous, view) for previous, view in requests]
        if progress is not None:
            progress(len(requests))
        return out

    def _one(self, previous: str | None, view: PartitionView) -> str:
        shares = _category_shares(view.events)
        top = shares.most_common(self.TOP)
        parts = ["Interests: " + (", ".join(f"{c} {s:.0%}" for c, s in top) if top else "no categories") + "."]
        ratings = [e.rating for e in view.events if e.rating is not None]
        if ratings and view.rating_scale:
            low, high = view.rating_scale
            mean = sum(ratings) / len(ratings)
            position = (mean - low) / (high - low) if high > low else 0.5
            tone = "mostly liked" if position >= 0.7 else "mostly disliked" if position < 0.45 else "mixed"
            parts.append(f"Ratings: mean {mean:.1f} of {high:g}, {tone}.")
        titles = list(dict.fromkeys(e.title for e in reversed(view.events)))[: self.TOP]
        parts.append("Recent: " + "; ".join(titles) + ".")
        parts.append("Shift: " + self._shift(previous, shares) + ".")
        return " ".join(parts)

    def _shift(self, previous: str | None, shares: Counter) -> str:
        if previous is None:
            return "first period on record"
        before = _parse_interests(previous)
        more = [c for c, s in shares.most_common(self.TOP) if s - before.get(c, 0.0) >= self.SHIFT and c in before]
        new = [c for c, _ in shares.most_common(self.TOP) if c not in before]
        less = [c for c, s in before.items() if s - shares.get(c, 0.0) >= self.SHIFT]
        said = [f"more {', '.join(more)}"] * bool(more) + [f"new {', '.join(new)}"] * bool(new)
        said += [f"less {', '.join(less)}"] * bool(less)
        return "; ".join(said) if said else "steady"


def _category_shares(events: tuple[Event, ...]) -> Counter:
    """Each category's share of the events (an event with n categories gives each 1/n)."""
    counts: Counter = Counter()
    for event in events:
        for category in event.categories:
            counts[category] += 1 / len(event.categories)
    total = sum(counts.values())
    return Counter({c: n / total for c, n in counts.items()}) if total else counts


def _parse_interests(summary: str) -> dict[str, float]:
    """The category shares a template summary states ("Interests: Drama 45%, Comedy 25%.")."""
    line = re.match(r"Interests: (.*?)\.(?: |$)", summary)
    found = re.findall(r"(.+?) (\d+)%(?:, |$)", line.group(1)) if line else []
    return {category: int(share) / 100 for category, share in found}


class LLMSummariser:
    """Summaries written by a language model (userlens.llm), greedy, batched."""

    def __init__(self, model: Any, params: SummaryParams):
        self.model, self.params = model, params
        self.identity = llm_identity(model.identity, params)

    def summarise(self, requests: list[Request], progress: Any = None) -> list[str]:
        chats = [summary_chat(prev, view, self.params.max_events_in_prompt) for prev, view in requests]
        return self.model.generate(chats, self.params.max_new_tokens, self.params.batch_size, progress,
                                   self.params.no_repeat_ngram)  # fmt: skip


def llm_identity(model_identity: str, params: SummaryParams) -> str:
    decoding = f"max_new_tokens={params.max_new_tokens}|no_repeat={params.no_repeat_ngram}"
    return f"llm:{model_identity}|{PROMPT_VERSION}|{decoding}"


def summariser_identity(params: SummaryParams, llm_model: str) -> str:
    """The identity of the configured summariser, without loading a language model."""
    if params.summariser == "template":
        return TEMPLATE_VERSION
    from userlens.llm.loader import locate

    return llm_identity(locate(llm_model).identity, params)


def make_summariser(params: SummaryParams, llm_model: str, device: str) -> Summariser:
    if params.summariser == "template":
        return TemplateSummariser()
    from userlens.llm import load_language_model

    return LLMSummariser(load_language_model(llm_model, device), params)


def cache_key(identity: str, previous: str | None, rendered: str) -> str:
    payload = "\x1f".join((identity, previous if previous is not None else "\x00", rendered))
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


class Summaries:
    """The summaries of one dataset's partitions (data/lifelong/<dataset>/summaries/)."""

    def __init__(self, folder: Path):
        self.store = PartStore(folder)

    def records(self, summariser: str | None = None, rule: str | None = None) -> pl.DataFrame:
        """(key, user_id, partition, rule, summariser, text) rows; the last written wins per
        (user, partition, rule, summariser)."""
        return _latest(self.store.read(schema=SCHEMA), summariser, rule)

    def update(
        self,
        partitions: pl.DataFrame,
        rule: str,
        summariser: Summariser,
        items: pl.DataFrame,
        rating_scale: tuple[float, float] | None,
        params: SummaryParams,
        progress: bool = True,
    ) -> dict[str, Any]:
        """Summarise every closed partition (PARTITION_SCHEMA rows, made by the closing rule
        named `rule`) that has no summary from this summariser yet. Returns counts: partitions
        summarised, generated (cache misses), rounds, seconds."""
        started = time.perf_counter()
        written = self.store.read(schema=SCHEMA)
        done = _latest(written, summariser.identity, rule)
        closed = partitions.join(done.select("user_id", "partition"), on=["user_id", "partition"], how="anti")
        if closed.is_empty():
            return {"summarised": 0, "generated": 0, "rounds": 0, "seconds": 0.0, "summariser": summariser.identity}
        cache = dict(written.select("key", "text").iter_rows())
        previous = {(u, p): t for u, p, t in done.select("user_id", "partition", "text").iter_rows()}
        lookup = item_lookup(items)
        pending = closed.sort(["user_id", "partition"]).partition_by("partition", as_dict=True, maintain_order=True)
        summarised = generated = rounds = 0
        bar = tqdm(total=closed.height, desc=f"summaries ({summariser.identity.split('|')[0]})", unit="partition",
                   disable=not progress)  # fmt: skip
        for (index,), level in sorted(pending.items()):
            # Partition index - 1 of these users is summarised (done before, or the last round).
            for chunk in level.iter_slices(COMMIT_EVERY):  # each chunk is committed: a crash keeps the rest
                ready = list(chunk.iter_rows(named=True))
                requests = [(previous.get((r["user_id"], index - 1)), _view(r, lookup, rating_scale)) for r in ready]
                keys = [cache_key(summariser.identity, prev, render_partition(view, params.max_events_in_prompt))
                        for prev, view in requests]  # fmt: skip
                missing = [i for i, key in enumerate(keys) if key not in cache]
                texts = summariser.summarise([requests[i] for i in missing], progress=bar.update)
                cache.update(zip((keys[i] for i in missing), texts, strict=True))
                bar.update(len(ready) - len(missing))
                frame = pl.DataFrame(
                    {"key": keys, "user_id": [r["user_id"] for r in ready], "partition": [index] * len(ready),
                     "rule": [rule] * len(ready), "summariser": [summariser.identity] * len(ready),
                     "text": [cache[k] for k in keys]}, schema=SCHEMA,
                )  # fmt: skip
                self.store.commit(frame)
                previous.update(((r["user_id"], index), cache[k]) for r, k in zip(ready, keys, strict=True))
                summarised, generated = summarised + len(ready), generated + len(missing)
            rounds += 1
        bar.close()
        seconds = time.perf_counter() - started
        log.info("summaries: %d partitions (%d generated, %d from the cache) in %.1fs by %s", summarised, generated,
                 summarised - generated, seconds, summariser.identity)  # fmt: skip
        return {"summarised": summarised, "generated": generated, "rounds": rounds, "seconds": round(seconds, 3),
                "summariser": summariser.identity}  # fmt: skip


def _latest(rows: pl.DataFrame, summariser: str | None, rule: str | None) -> pl.DataFrame:
    """The last written row per (user, partition, rule, summariser); only this summariser's and
    rule's when a summariser is named."""
    if summariser is not None:
        rows = rows.filter((pl.col("summariser") == summariser) & (pl.col("rule") == rule))
    return rows.unique(subset=["user_id", "partition", "rule", "summariser"], keep="last", maintain_order=True)


def item_lookup(items: pl.DataFrame) -> dict[str, tuple[str, tuple[str, ...]]]:
    """item_id -> (title, categories); a title-less item is called "item <id>"."""
    rows = items.select(
        "item_id",
        pl.col("title") if "title" in items.columns else pl.lit(None, pl.String).alias("title"),
        pl.col("categories") if "categories" in items.columns else pl.lit(None, pl.List(pl.String)).alias("categories"),
    )
    return {item: (title or f"item {item}", tuple(cats or ())) for item, title, cats in rows.iter_rows()}


def _view(row: dict[str, Any], lookup: dict, rating_scale: tuple[float, float] | None) -> PartitionView:
    events = tuple(
        Event(ts, *lookup.get(item, (f"item {item}", ())), rating)
        for ts, item, rating in zip(row["timestamps"], row["item_ids"], row["ratings"], strict=True)
    )
    return PartitionView(events, rating_scale)
