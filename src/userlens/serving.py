"""Reading the served user embeddings: the `UserEmbeddings` client, `SimilarUsers`, `feast serve`.

Readers see only the model version the serving pointer names; feature_store.py writes the
slots and flips the pointer.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from userlens.config import Params, ServingParams
from userlens.errors import ConfigError, ServingError
from userlens.feast_values import decode_vectors, string_value
from userlens.feature_sets import EMBEDDINGS, FeatureSet
from userlens.feature_store import (
    REDIS_URL_ENV,
    REGISTRY_TTL_S,
    Layout,
    connection_errors,
    online_store_settings,
    open_store,
    repo_config,
    sqlite_path,
    unreachable,
)
from userlens.io import read_json
from userlens.project import Project
from userlens.vector_index import LoadedIndex

# --- reading: the serving client -----------------------------------------------------------------


class UserEmbeddings:
    """Embeddings of the served model version, for serving code.

    >>> store = UserEmbeddings("feature_repo")
    >>> vectors, found, version = store.get(["u1", "u2"])   # [2, d] float32, [2] bool, "barlow_twins-..."

    Unknown users come back with found=False and the fallback vector: `mean` (the served
    version's population mean), `zeros`, or `none` (NaN). A publish is seen without a restart.
    `features=INTEREST` reads the lifelong `user_interest` vectors the same way.
    """

    def __init__(
        self,
        repo_path: str | Path,
        fallback: str = "mean",
        serving: ServingParams | None = None,
        features: FeatureSet = EMBEDDINGS,
    ):
        if fallback not in ("mean", "zeros", "none"):
            raise ConfigError(f"fallback {fallback!r}: expected mean, zeros or none")
        self.layout = Layout.of(repo_path, features)
        self.fallback = fallback
        self.serving = serving or ServingParams()
        self._store = None
        self._pointer: dict | None = None
        self._pointer_key: tuple | None = None
        self._means: dict[str, np.ndarray] = {}
        self._tables: dict[str, Any] = {}

    @property
    def store(self):
        if self._store is None:
            self._store = open_store(self.layout, self.serving)
        return self._store

    def pointer(self) -> dict:
        """The serving pointer, re-read only when the file changed (a publish replaces it)."""
        try:
            stat = self.layout.pointer.stat()
        except FileNotFoundError:
            raise ServingError(
                f"nothing is served yet ({self.layout.pointer} missing): "
                f"run `{self.layout.features.publish_command}` first"
            ) from None
        key = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
        if key != self._pointer_key:
            self._pointer, self._pointer_key = read_json(self.layout.pointer), key
            kind = online_store_settings(self.serving)[0]
            if self._pointer["online_store"] != kind:
                raise ServingError(
                    f"the served version was published to {self._pointer['online_store']}, but this reader is "
                    f"configured for {kind} (serving.online_store / ${REDIS_URL_ENV})"
                )
        return self._pointer

    def get(self, user_ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray, str]:
        """([n, d] float32, [n] found mask, model version), all from one model version."""
        ids = [str(u) for u in user_ids]
        pointer = self.pointer()
        vectors, found = self._read(pointer, ids)
        if not found.all() and self.pointer() is not pointer:  # a cut-over during the read: read again, once
            pointer = self.pointer()
            vectors, found = self._read(pointer, ids)
        vectors[~found] = self._fallback(pointer)
        return vectors, found, pointer["model_version"]

    def get_one(self, user_id: str) -> tuple[np.ndarray | None, bool, str]:
        vectors, found, version = self.get([user_id])
        if not found[0] and self.fallback == "none":
            return None, False, version
        return vectors[0], bool(found[0]), version

    def _read(self, pointer: dict, ids: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """One bulk read of the served slot's stored bytes (online_store.py, Feast's format)."""
        if not ids:
            return np.empty((0, pointer["dim"]), np.float32), np.zeros(0, bool)
        import sqlite3

        vector, tag = self.layout.features.vector, self.layout.features.version
        try:
            stored = self._table(pointer["slot"]).read(ids, [vector, tag])
        except connection_errors() as exc:
            raise ServingError(f"{unreachable(self.store, exc)}: start it, or point serving.redis_url / "
                               f"${REDIS_URL_ENV} at it") from None  # fmt: skip
        except sqlite3.OperationalError as exc:  # e.g. no such table: the database file was replaced
            raise ServingError(f"the online store cannot read slot {pointer['slot']} ({exc}): it was replaced or "
                               f"damaged; `{self.layout.features.publish_command}` publishes the served version "
                               "again") from None  # fmt: skip
        version, dim = pointer["model_version"], pointer["dim"]
        expected = string_value(version)
        found = np.fromiter((t == expected for t in stored[tag]), bool, len(ids))
        vectors = np.empty((len(ids), dim), np.float32)
        hits = np.flatnonzero(found)
        if hits.size:
            vectors[hits] = decode_vectors([stored[vector][i] for i in hits], dim)
        return vectors, found

    def _table(self, slot: str):
        """The slot's online table, once per reader (the definitions do not change)."""
        from userlens.online_store import table_for

        if slot not in self._tables:
            config = self.store.config
            if config.online_store.type == "sqlite":  # Feast's connection would create an empty file
                path = sqlite_path(config)
                if not path.exists():
                    raise ServingError(
                        f"the online store {path.resolve()} is missing (deleted or moved): "
                        f"`{self.layout.features.publish_command}` publishes the served version again"
                    )
            self._tables[slot] = table_for(self.store, self.store.get_feature_view(self.layout.view(slot)))
        return self._tables[slot]

    def _fallback(self, pointer: dict) -> np.ndarray:
        if self.fallback == "zeros":
            return np.zeros(pointer["dim"], np.float32)
        if self.fallback == "none":
            return np.full(pointer["dim"], np.nan, np.float32)
        version = pointer["model_version"]
        if version not in self._means:
            self._means[version] = np.load(self.layout.mean_file(version))
        return self._means[version]


def reader(
    project: Project, params: Params, fallback: str | None = None, features: FeatureSet = EMBEDDINGS
) -> UserEmbeddings:
    return UserEmbeddings(
        project.root / params.serving.repo, fallback or params.serving.fallback, params.serving, features
    )


# --- similar users: from the served version's index ---------------------------------------------


class SimilarUsers:
    """Similar users of the served version, from the index its publish built (vector_index.py).

    >>> similar = SimilarUsers("feature_repo")
    >>> neighbours, version = similar.of("42", k=10)    # [(user_id, cosine), ...] best first
    >>> similar.like(vector, k=10)                        # the same for any vector

    The query user's vector comes from the online store; the index switches with the pointer.
    """

    def __init__(self, repo_path: str | Path, serving: ServingParams | None = None):
        self.embeddings = UserEmbeddings(repo_path, "none", serving)
        self._loaded: LoadedIndex | None = None

    def of(self, user_id: str, k: int = 10) -> tuple[list[tuple[str, float]], str]:
        """The k users nearest to `user_id` (never the user itself), and the version they are from."""
        for _ in range(2):  # a cut-over between reading the vector and the index: once more
            index = self._index()
            vector, found, version = self.embeddings.get_one(user_id)
            if not found:
                raise ServingError(f"unknown user {user_id!r}: not in the served version {version}")
            if version == index.manifest["model_version"]:
                return index.search(vector, k, exclude=str(user_id)), version
        raise ServingError("the served version changed twice during one similar-users query; try again")

    def like(self, vector: np.ndarray, k: int = 10) -> list[tuple[str, float]]:
        return self._index().search(np.asarray(vector, np.float32), k)

    def _index(self) -> LoadedIndex:
        pointer = self.embeddings.pointer()
        manifest = pointer.get("index")
        if manifest is None:
            raise ServingError(
                f"the served version {pointer['model_version']} has no similar-users index (published by an "
                "earlier userlens): run `userlens materialize` again"
            )
        manifest = {**manifest, "model_version": pointer["model_version"]}
        if self._loaded is None or self._loaded.manifest != manifest:
            self._loaded = LoadedIndex.load(self.embeddings.layout.index_folder, manifest)
        return self._loaded


def similar(project: Project, params: Params, user_id: str, k: int = 10) -> tuple[list[tuple[str, float]], str]:
    """The k users nearest to `user_id` by cosine similarity in the served version, and that version."""
    return SimilarUsers(project.root / params.serving.repo, params.serving).of(user_id, k)


# --- feast serve ---------------------------------------------------------------------------------


def serve_command(project: Project, params: Params, host: str, port: int) -> tuple[list[str], dict[str, Any]]:
    """The `feast serve` command line and environment for this project's store (config passed inline)."""
    import shutil
    import sys

    layout = Layout.of(project.root / params.serving.repo)
    config = yaml.safe_dump(repo_config(layout, params.serving, absolute=True))
    feast = shutil.which("feast", path=str(Path(sys.executable).parent)) or "feast"
    env = {"FEATURE_STORE_YAML_BASE64": base64.b64encode(config.encode()).decode()}
    command = [feast, "serve", "--host", host, "--port", str(port), "--registry_ttl_sec", str(REGISTRY_TTL_S)]
    return command, env
