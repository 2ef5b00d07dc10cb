"""Every text the lifelong system shows a language model, in one place, with its version.

Bump PROMPT_VERSION whenever a prompt's wording changes: it is part of every summary's cache
key, so the summaries are then written again rather than mixed across prompt versions.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

PROMPT_VERSION = "uil-2"

SYSTEM = (
    "You write short, factual profiles of a person's interests for a recommender system. "
    "Use only the activity you are given."
)

FIRST_PERIOD = "none: this is the first period on record"

INSTRUCTION = (
    "In at most two sentences of plain prose (no lists), summarise this person's current interests "
    "(genres or kinds of items, what they rate highly) and how they shifted from the previous summary."
)


@dataclass(frozen=True)
class Event:
    timestamp: int
    title: str
    categories: tuple[str, ...]
    rating: float | None


@dataclass(frozen=True)
class PartitionView:
    """One closed partition as the summarisers see it: its events in time order and the scale."""

    events: tuple[Event, ...]
    rating_scale: tuple[float, float] | None


def day(timestamp: int) -> str:
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%d")


def period(view: PartitionView, max_events: int) -> str:
    shown = min(len(view.events), max_events)
    listed = f" (the last {shown} listed)" if shown < len(view.events) else ""
    return f"{day(view.events[0].timestamp)} to {day(view.events[-1].timestamp)}, {len(view.events)} events{listed}"


def event_lines(view: PartitionView, max_events: int) -> str:
    """The partition's most recent `max_events` events, one a line: date, title, kinds, rating."""
    top = view.rating_scale[1] if view.rating_scale else None
    lines = []
    for event in view.events[-max_events:]:
        kinds = f" [{', '.join(event.categories)}]" if event.categories else ""
        rated = f", rated {event.rating:g}/{top:g}" if event.rating is not None and top is not None else ""
        lines.append(f"- {day(event.timestamp)}: {event.title}{kinds}{rated}")
    return "\n".join(lines)


def render_partition(view: PartitionView, max_events: int) -> str:
    """The partition as the prompt shows it (what a summary's cache key hashes)."""
    return period(view, max_events) + "\n" + event_lines(view, max_events)


def summary_chat(previous: str | None, view: PartitionView, max_events: int) -> list[dict[str, str]]:
    """The chat messages that ask for the summary of one partition, given the previous summary."""
    user = (
        f"Previous summary of this person: {previous or FIRST_PERIOD}\n\n"
        f"Their activity in the next period ({period(view, max_events)}):\n"
        f"{event_lines(view, max_events)}\n\n{INSTRUCTION}"
    )
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]
