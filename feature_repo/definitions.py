"""Feast definitions for serving user features (definitions only: Feast imports every .py file here).

Two feature sets, each in two slots, blue and green: a FileSource + FeatureView + FeatureService
per slot with the same schema. A publish writes the new version into the slot that is not
served, checks it, then flips the set's serving pointer; readers read only the served slot.
- user_embeddings: the served Barlow Twins model version (pointer data/feast/serving.json);
- user_interest: the lifelong interest vector (LIBER), (pointer data/feast/interest.json).
"""

from datetime import timedelta

from feast import Entity, FeatureService, FeatureView, Field, FileSource, ValueType
from feast.types import Array, Float32, Int64, String

SLOTS = ("blue", "green")

user = Entity(
    name="user",
    join_keys=["user_id"],
    value_type=ValueType.STRING,
    description="A user, keyed by the source's user id (string).",
)


def slot_view(slot: str) -> tuple[FeatureView, FeatureService]:
    source = FileSource(
        name=f"user_embeddings_{slot}_source",
        path=f"../data/feast/slots/{slot}.parquet",  # relative to this folder
        timestamp_field="event_timestamp",
    )
    view = FeatureView(
        name=f"user_embeddings_{slot}",
        entities=[user],
        ttl=timedelta(0),  # rows never expire: the serving pointer, not time, decides what is current
        schema=[  # declared in full, so `feast plan` needs no data to infer types
            Field(name="user_id", dtype=String),
            Field(name="embedding", dtype=Array(Float32)),
            Field(name="model_version", dtype=String),
            Field(name="n_events", dtype=Int64),  # history + future events in data/sequences
            Field(name="last_event_at", dtype=Int64),  # epoch seconds, UTC
        ],
        source=source,
        online=True,
        description=f"User embeddings of the model version published into the {slot} slot.",
    )
    service = FeatureService(name=f"user_embeddings_{slot}_service", features=[view])
    return view, service


user_embeddings_blue, user_embeddings_blue_service = slot_view("blue")
user_embeddings_green, user_embeddings_green_service = slot_view("green")


def interest_view(slot: str) -> tuple[FeatureView, FeatureService]:
    source = FileSource(
        name=f"user_interest_{slot}_source",
        path=f"../data/feast/slots/interest-{slot}.parquet",
        timestamp_field="event_timestamp",
    )
    view = FeatureView(
        name=f"user_interest_{slot}",
        entities=[user],
        ttl=timedelta(0),
        schema=[
            Field(name="user_id", dtype=String),
            Field(name="user_interest", dtype=Array(Float32)),
            Field(name="interest_version", dtype=String),
            Field(name="n_partitions", dtype=Int64),  # closed partitions fused
            Field(name="interest_events", dtype=Int64),  # events the vector has seen (closed + open cache)
        ],
        source=source,
        online=True,
        description=f"Lifelong user_interest vectors of the interest version published into the {slot} slot.",
    )
    service = FeatureService(name=f"user_interest_{slot}_service", features=[view])
    return view, service


user_interest_blue, user_interest_blue_service = interest_view("blue")
user_interest_green, user_interest_green_service = interest_view("green")
