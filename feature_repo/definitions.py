"""Feast definitions for serving user features (definitions only: Feast imports every .py file here).

Three feature sets, each in two slots, blue and green: a FileSource + FeatureView + FeatureService
per slot with the same schema, and one stable FeatureService per set (its own name) naming the
served slot. A publish writes the new version into the slot that is not
served, checks it, then flips the set's serving pointer; readers read only the served slot.
- user_embeddings: the served Barlow Twins model version (pointer data/feast/serving.json);
- user_interest: the lifelong interest vector (LIBER), (pointer data/feast/interest.json);
- user_context: the latents a user-conditioned LM reads (User-LLM), (pointer data/feast/context.json).
"""

import json
from datetime import timedelta
from pathlib import Path

from feast import Entity, FeatureService, FeatureView, Field, FileSource, ValueType
from feast.types import Array, Float32, Int64, String

user = Entity(
    name="user",
    join_keys=["user_id"],
    value_type=ValueType.STRING,
    description="A user, keyed by the source's user id (string).",
)


def live_slot(pointer_file: str) -> str:
    """The slot a feature set's serving pointer names (blue before the first publish), so that
    `feast apply` from this folder keeps each stable feature service where userlens put it."""
    path = Path(__file__).resolve().parent / "../data/feast" / pointer_file  # beside the registry (feature_store.yaml)
    try:
        return json.loads(path.read_text())["slot"]
    except (OSError, ValueError, KeyError):
        return "blue"


def slot_view(name: str, slot: str, file_stem: str, features: list, description: str):
    """The FeatureView and FeatureService of one slot of a feature set (keyed by user)."""
    source = FileSource(
        name=f"{name}_{slot}_source",
        path=f"../data/feast/slots/{file_stem}{slot}.parquet",  # relative to this folder
        timestamp_field="event_timestamp",
    )
    view = FeatureView(
        name=f"{name}_{slot}",
        entities=[user],
        ttl=timedelta(0),  # rows never expire: the serving pointer, not time, decides what is current
        schema=[Field(name="user_id", dtype=String), *features],  # in full: `feast plan` needs no data
        source=source,
        online=True,
        description=f"{description}, as published into the {slot} slot.",
    )
    return view, FeatureService(name=f"{name}_{slot}_service", features=[view])


EMBEDDING_FEATURES = [
    Field(name="embedding", dtype=Array(Float32)),
    Field(name="model_version", dtype=String),
    Field(name="n_events", dtype=Int64),  # history + future events in data/sequences
    Field(name="last_event_at", dtype=Int64),  # epoch seconds, UTC
]
INTEREST_FEATURES = [
    Field(name="user_interest", dtype=Array(Float32)),
    Field(name="interest_version", dtype=String),
    Field(name="n_partitions", dtype=Int64),  # closed partitions fused
    Field(name="interest_events", dtype=Int64),  # events the vector has seen (closed + open cache)
]

CONTEXT_FEATURES = [
    Field(name="user_context", dtype=Array(Float32)),  # k latents of width d, flattened: k x d floats
    Field(name="context_version", dtype=String),  # the conditioned-LM version whose latents these are
    Field(name="context_latents", dtype=Int64),  # k
]

user_embeddings_blue, user_embeddings_blue_service = slot_view(
    "user_embeddings", "blue", "", EMBEDDING_FEATURES, "User embeddings of one model version"
)
user_embeddings_green, user_embeddings_green_service = slot_view(
    "user_embeddings", "green", "", EMBEDDING_FEATURES, "User embeddings of one model version"
)
user_interest_blue, user_interest_blue_service = slot_view(
    "user_interest", "blue", "interest-", INTEREST_FEATURES, "Lifelong user_interest of one interest version"
)
user_interest_green, user_interest_green_service = slot_view(
    "user_interest", "green", "interest-", INTEREST_FEATURES, "Lifelong user_interest of one interest version"
)
user_context_blue, user_context_blue_service = slot_view(
    "user_context", "blue", "context-", CONTEXT_FEATURES, "User-conditioned LM latents of one conditioner version"
)
user_context_green, user_context_green_service = slot_view(
    "user_context", "green", "context-", CONTEXT_FEATURES, "User-conditioned LM latents of one conditioner version"
)

# The stable names plain Feast clients ask for: each names the live slot's view. A publish moves
# it at the cut-over (src/userlens/feature_store.py); here it follows the pointer for `feast apply`.
user_embeddings = FeatureService(
    name="user_embeddings",
    features=[{"blue": user_embeddings_blue, "green": user_embeddings_green}[live_slot("serving.json")]],
)
user_interest = FeatureService(
    name="user_interest",
    features=[{"blue": user_interest_blue, "green": user_interest_green}[live_slot("interest.json")]],
)
user_context = FeatureService(
    name="user_context",
    features=[{"blue": user_context_blue, "green": user_context_green}[live_slot("context.json")]],
)
