"""Feast definitions for serving user embeddings (definitions only: Feast imports every .py file here).

Two slots, blue and green, each a FileSource + FeatureView + FeatureService with the same
schema. A publish writes the new model version into the slot that is not served, checks it,
then flips the serving pointer (data/feast/serving.json); readers read only the served slot.
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
