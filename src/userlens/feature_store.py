"""Publishing served feature sets to Feast: blue/green slots, a serving pointer, incremental refresh.

A feature set (`FeatureSet`: the user embeddings, lifelong `user_interest`, a conditioned LM's
`user_context`) has two identical Feast feature views, `<name>_blue` and `<name>_green`
(feature_repo/definitions.py). A publish writes a version into the slot that is *not* served,
reads a sample back to check it, and only then cuts over: the feature service `<name>` (the
stable name plain Feast clients ask for) moves to that slot's view, and the set's serving
pointer (`data/feast/serving.json`, `interest.json`, `context.json`) is replaced atomically.
Readers (serving.py) read the pointer, then only the served slot, and count a row whose
version is not the pointer's as not found, so one batch never mixes two versions and a
publish that fails half-way leaves the served version whole. Everything Feast and userlens
keep lives beside the Feast registry (`data/feast/` of the project). The feature sets and their
rows are in feature_sets.py, the Feast row format in feast_values.py, the bulk reads and writes in
online_store.py, the similar-users index in vector_index.py.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import polars as pl
import pyarrow as pa
import yaml

from userlens.config import Params, ServingParams
from userlens.errors import ConfigError, ServingError
from userlens.faults import fault_point
from userlens.feast_values import encoded_columns
from userlens.feature_sets import EMBEDDINGS, FeatureSet, export_version, slot_table
from userlens.io import list_vectors, read_json, save_array_atomic, utc_now, write_json_atomic, write_parquet_atomic
from userlens.locking import file_lock
from userlens.project import Project

log = logging.getLogger(__name__)

SLOTS = ("blue", "green")
REDIS_URL_ENV = "USERLENS_REDIS_URL"  # set: serve from Redis at this URL, whatever params.yaml says
VERIFY_SAMPLE = 1000  # users read back from a freshly written slot before the pointer flips
HISTORY = 20  # earlier publishes kept in the pointer
# How stale a Feast client's registry may be: `feast serve` refreshes it this often (userlens
# serve passes it), SDK clients through feature_store.yaml's cache_ttl_seconds (the same).
REGISTRY_TTL_S = 5
# An online-store call that fails to connect (Redis restarting, a network blip) is tried this often
# in all, waiting BACKOFF_S, then twice that, between tries (on top of the Redis client's own retries).
ATTEMPTS = 3
BACKOFF_S = 1.0


class OnlineStoreUnavailable(ServingError):
    """The online store did not answer, try after try: trying again later may help."""

    retryable = True


# --- where things live and how Feast is configured ----------------------------------------------


@dataclass(frozen=True)
class Layout:
    """The Feast repository, the state beside its registry (data/feast/ of the project), and
    the feature set whose slots and pointer this layout names."""

    repo: Path
    state: Path
    features: FeatureSet = EMBEDDINGS

    @classmethod
    def of(cls, repo: str | Path, features: FeatureSet = EMBEDDINGS) -> Layout:
        repo = Path(repo).resolve()
        path = repo / "feature_store.yaml"
        if not path.exists():
            raise ServingError(f"{path}: no feature_store.yaml (serving.repo must name the Feast repository)")
        registry = _read_yaml(path).get("registry")
        registry = registry.get("path") if isinstance(registry, dict) else registry
        if not registry:
            raise ConfigError(f"{path}: no registry path")
        return cls(repo, (repo / registry).resolve().parent, features)

    @property
    def pointer(self) -> Path:
        return self.state / self.features.pointer_file

    def view(self, slot: str) -> str:
        return self.features.view(slot)

    def slot_parquet(self, slot: str) -> Path:
        return self.state / "slots" / f"{self.features.slot_stem}{slot}.parquet"

    def slot_record(self, slot: str) -> Path:
        """What a slot fully holds; absent while it is being written."""
        return self.state / "slots" / f"{self.features.slot_stem}{slot}.json"

    def mean_file(self, version: str) -> Path:
        return self.state / "means" / f"{version}.npy"

    @property
    def index_folder(self) -> Path:
        return self.state / "index"


def _read_yaml(path: Path) -> dict:
    return yaml.safe_load(os.path.expandvars(path.read_text())) or {}


def online_store_settings(serving: ServingParams) -> tuple[str, str | None]:
    """(kind, Feast connection string): $USERLENS_REDIS_URL wins over params.yaml."""
    url = os.environ.get(REDIS_URL_ENV) or serving.redis_url
    if os.environ.get(REDIS_URL_ENV) or serving.online_store == "redis":
        return "redis", redis_connection_string(url)
    return "sqlite", None


def redis_connection_string(url: str | None) -> str:
    """redis://[user:password@]host:port[/db] -> Feast's `host:port,db=N,password=...` form."""
    if not url:
        return "localhost:6379"
    if "://" not in url:
        return url  # already Feast's form
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss"):
        raise ConfigError(f"serving.redis_url {url!r}: expected redis://host:port[/db]")
    conn = f"{parts.hostname or 'localhost'}:{parts.port or 6379}"
    extras = {"db": parts.path.strip("/"), "username": parts.username, "password": parts.password}
    conn += "".join(f",{key}={value}" for key, value in extras.items() if value)
    return conn + (",ssl=true" if parts.scheme == "rediss" else "")


def repo_config(layout: Layout, serving: ServingParams, absolute: bool = False):
    """feature_store.yaml with the online store params.yaml / the environment ask for.

    Redis writes skip Feast's per-key timestamp check: the slot, not time, decides what is
    current, and a rollback rewrites older rows over newer ones on purpose.
    """
    from feast import RepoConfig

    raw = _read_yaml(layout.repo / "feature_store.yaml")
    kind, connection = online_store_settings(serving)
    if kind == "redis":
        raw["online_store"] = {"type": "redis", "connection_string": connection, "skip_dedup": True}
    if absolute:  # for a config shipped without its folder (feast serve via FEATURE_STORE_YAML_BASE64)
        registry = raw["registry"]
        registry["path"] = str((layout.repo / registry["path"]).resolve())
        if kind == "sqlite":
            raw["online_store"]["path"] = str((layout.repo / raw["online_store"]["path"]).resolve())
        return raw
    return RepoConfig(repo_path=layout.repo, **raw)


def _store_identity(config) -> str:
    """Which physical online store a slot record refers to (no credentials)."""
    online = config.online_store
    if online.type == "redis":
        return "redis:" + ",".join(p for p in online.connection_string.split(",") if not p.startswith("password="))
    return f"sqlite:{sqlite_path(config).resolve()}"


def sqlite_path(config) -> Path:
    """The sqlite online store's database file."""
    return Path(config.repo_path or ".") / config.online_store.path


def open_store(layout: Layout, serving: ServingParams):
    from feast import FeatureStore

    return FeatureStore(repo_path=str(layout.repo), config=repo_config(layout, serving))


def definitions(layout: Layout) -> list:
    """The Feast objects defined in the repository's .py files (what `feast apply` collects)."""
    import importlib.util

    from feast import Entity, FeatureService, FeatureView

    objects = []
    for path in sorted(layout.repo.glob("*.py")):
        spec = importlib.util.spec_from_file_location(f"_userlens_feature_repo_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        objects += [v for v in vars(module).values() if isinstance(v, Entity | FeatureView | FeatureService)]
    return objects


def apply_definitions(store, layout: Layout) -> None:
    """`feast apply` through the Python API (feast's own apply changes the working directory)."""
    store.apply(definitions(layout))


# --- publish: standby slot, verify, flip ----------------------------------------------------------


def publish(
    project: Project,
    params: Params,
    model_version: str,
    embeddings: Path,
    progress: bool = False,
    chunk_users: int = 10_000,
) -> dict:
    """Serve `model_version` (its export Parquet `embeddings`) with a consistent cut-over (publish_set)."""
    layout = Layout.of(project.root / params.serving.repo)
    return publish_set(
        layout,
        params.serving,
        lambda at: slot_table(Path(embeddings), model_version, project.sequences_dir, at),
        source=str(Path(embeddings).resolve()),
        progress=progress,
        chunk_users=chunk_users,
    )


def publish_set(
    layout: Layout,
    serving: ServingParams,
    make_table: Callable[[datetime], pa.Table],
    source: str,
    progress: bool = False,
    chunk_users: int = 10_000,
) -> dict:
    """Serve the version `make_table(published_at)` holds (rows of the layout's feature set).

    Writes it into the standby slot, reads a sample back, then flips the pointer. If the standby
    slot already fully holds this version (a rollback to the previous version), it only checks
    and flips. Any failure before the flip leaves the served version as it was.
    """
    features = layout.features
    layout.state.mkdir(parents=True, exist_ok=True)  # Feast creates the registry file, not its folder
    store = open_store(layout, serving)  # the first one imports Feast (seconds): not timed
    started = time.perf_counter()
    stages: dict[str, float] = {}  # seconds per step of this publish, in the summary
    published_at = datetime.now(UTC).replace(microsecond=0)
    with _timed(stages, "slot_table"):
        table = make_table(published_at)
        vectors = list_vectors(table[features.vector])
    version = table[features.version][0].as_py()
    with _lock(layout):
        pointer = read_pointer(layout)
        slot = SLOTS[0] if pointer is None else SLOTS[1 - SLOTS.index(pointer["slot"])]
        apply_definitions(store, layout)
        _check_views(store, layout)
        identity = _store_identity(store.config)
        record = read_json(layout.slot_record(slot)) if layout.slot_record(slot).exists() else {}
        holds = {"model_version": version, "users": table.num_rows, "store": identity}
        reused = {key: record.get(key) for key in holds} == holds
        index = record.get("index") if reused else None
        rebuild = features.indexed and (index is None or not (layout.index_folder / index["file"]).exists())
        # The index builds beside the online write: faiss runs in C++ without the GIL while the
        # write is mostly Python. Files of a build whose publish fails are named by nothing and
        # deleted after the next cut-over.
        with ThreadPoolExecutor(1) as pool:
            building = pool.submit(_build_index, layout, serving, slot, table["user_id"], vectors) if rebuild else None
            if reused and not _still_holds(store, layout, slot, table):
                reused = False  # e.g. the online store was emptied or replaced since: write it again
            if not reused:
                _wait_until_retired(pointer, serving.retire_grace_s)
                _write_slot(store, layout, slot, table, published_at, progress, chunk_users, stages)
            with _timed(stages, "verify"):
                verify_slot(store, layout, slot, table)
            with _timed(stages, "index_wait"):
                if building is not None:
                    index = building.result()
        if features.indexed:
            holds["index"] = index
        write_json_atomic(layout.slot_record(slot), holds)
        layout.mean_file(version).parent.mkdir(parents=True, exist_ok=True)
        save_array_atomic(layout.mean_file(version), vectors.mean(axis=0, dtype=np.float64).astype(np.float32))
        history = ([_summary(pointer)] + pointer.get("history", []))[:HISTORY] if pointer else []
        new_pointer = {
            "slot": slot,
            "model_version": version,  # for user_interest: the interest version
            "users": table.num_rows,
            "dim": int(vectors.shape[1]),
            "online_store": store.config.online_store.type,
            "published_at": published_at.isoformat(),
            "source": source,
            "history": history,
        }
        if features.indexed:
            new_pointer["index"] = holds["index"]
        # The cut-over: the stable feature service (one registry write), then the pointer (one
        # atomic rename); if the pointer cannot be written, the service goes back.
        _point_service(store, layout, slot)
        fault_point("publish.cut_over")  # a test seam (faults.py); nothing when unset
        new_pointer["cut_over_at"] = datetime.now(UTC).isoformat()  # when the old slot stopped being live
        try:
            write_json_atomic(layout.pointer, new_pointer)
        except BaseException:
            if pointer is not None:
                _point_service(store, layout, pointer["slot"])
            raise
        _remove_unused_indexes(layout)
    seconds = time.perf_counter() - started
    log.info("serving %s %s from slot %s (%d users, %.1f s)", features.name, version, slot, table.num_rows, seconds)
    return {
        "model_version": version,
        "slot": slot,
        "users": table.num_rows,
        "rewritten": not reused,
        "seconds": round(seconds, 3),
        "users_per_s": round(table.num_rows / seconds, 1) if seconds else None,
        "index": index,  # the similar-users index (its build_s overlaps the online write)
        "index_wait_s": stages.get("index_wait", 0.0),  # of `seconds`: waiting for the index after the write
        # of `seconds`: slot_table, slot_parquet, write_order, online_write, record_interval, verify,
        # index_wait (the steps this publish ran); the rest is definitions, records and the cut-over
        "stages_s": stages,
        "online_store": store.config.online_store.type,
    }


def connection_errors() -> tuple[type[BaseException], ...]:
    """What an unreachable online store raises (Redis' own errors do not derive from the builtins')."""
    errors: tuple[type[BaseException], ...] = (ConnectionError, TimeoutError)
    with contextlib.suppress(ImportError):
        import redis

        errors += (redis.ConnectionError, redis.TimeoutError)
    return errors


def unreachable(store, exc: BaseException) -> str:
    """`the online store <which> is unreachable (<why>)`, no credentials."""
    why = (str(exc).strip() or type(exc).__name__).splitlines()[0]
    return f"the online store {_store_identity(store.config)} is unreachable ({why})"


def _retrying(store, what: str, call: Callable[[], object], consequence: str):
    """call(), tried ATTEMPTS times with a doubling wait while the online store does not answer;
    then one OnlineStoreUnavailable saying what happened, what `consequence` it had and the fix."""
    errors, started = connection_errors(), time.monotonic()
    for attempt in range(1, ATTEMPTS + 1):
        try:
            return call()
        except errors as exc:
            if attempt == ATTEMPTS:
                raise OnlineStoreUnavailable(
                    f"{unreachable(store, exc)} while {what}, {ATTEMPTS} tries over "
                    f"{time.monotonic() - started:.0f} s: {consequence}; start it (or fix serving.redis_url / "
                    f"${REDIS_URL_ENV}) and run the same command again"
                ) from None
            wait = BACKOFF_S * 2 ** (attempt - 1)
            log.warning("%s while %s: try %d of %d in %.1f s", unreachable(store, exc), what, attempt + 1,
                        ATTEMPTS, wait)  # fmt: skip
            time.sleep(wait)
    raise AssertionError("unreachable")


UNCHANGED = "nothing was cut over, the served version is unchanged"


def _check_views(store, layout: Layout) -> None:
    """Both slots' views are defined (a project's feature_repo/ may predate a feature set)."""
    defined = {view.name for view in store.list_feature_views()}
    if missing := [layout.view(slot) for slot in SLOTS if layout.view(slot) not in defined]:
        raise ServingError(
            f"{layout.repo}: no Feast feature view {' or '.join(missing)}: its definitions predate "
            f"{layout.features.name}; copy feature_repo/definitions.py from this version of userlens"
        )


def _still_holds(store, layout: Layout, slot: str, table: pa.Table) -> bool:
    """Whether the online store still holds the slot rows `table` (a sample, as verify_slot reads)."""
    import sqlite3

    try:
        verify_slot(store, layout, slot, table)
    except OnlineStoreUnavailable:
        raise
    except (ServingError, sqlite3.OperationalError) as exc:  # wrong rows; no table (a new, empty database)
        log.warning("the online store does not hold what slot %s should (%s): writing it again", slot, exc)
        return False
    return True


def _point_service(store, layout: Layout, slot: str) -> None:
    """The feature service named like the set (`user_embeddings`, ...) now serves this slot's
    view: what plain Feast clients ask for, by a name that never changes."""
    from feast import FeatureService

    view = store.get_feature_view(layout.view(slot))
    store.apply([FeatureService(name=layout.features.name, features=[view],
                                description=f"The served {layout.features.name} version (slot {slot}).")])  # fmt: skip


def _wait_until_retired(pointer: dict | None, grace_s: float) -> None:
    """Before the standby slot is rewritten: it stopped being live at the last cut-over, and
    Feast clients may read it for up to REGISTRY_TTL_S after; wait until `grace_s` have passed."""
    if pointer is None or grace_s <= 0:
        return
    cut_over = datetime.fromisoformat(pointer.get("cut_over_at") or pointer["published_at"])
    left = grace_s - (datetime.now(UTC) - cut_over).total_seconds()
    if left > 0:
        log.info("waiting %.1fs for Feast clients to leave the slot that was live until the last cut-over", left)
        time.sleep(left)


def _build_index(layout: Layout, serving: ServingParams, slot: str, user_ids: pa.Array, vectors: np.ndarray) -> dict:
    from userlens import vector_index

    index = vector_index.build(layout.index_folder, f"{layout.features.name}-{slot}", user_ids, vectors,
                               serving.similar_recall, serving.similar_exact_below)  # fmt: skip
    log.info("similar-users index for slot %s: %s", slot, index)
    return index


def _remove_unused_indexes(layout: Layout) -> None:
    """Keep the index files the pointer and the slot records name (the standby one serves a rollback)."""
    from userlens import vector_index

    named = [read_pointer(layout)] + [read_json(p) for p in map(layout.slot_record, SLOTS) if p.exists()]
    keep = {entry["index"]["file"] for entry in named if entry and entry.get("index")}
    vector_index.remove_unlisted(layout.index_folder, keep, prefix=layout.features.name)


def _summary(pointer: dict) -> dict:
    return {key: pointer[key] for key in ("slot", "model_version", "users", "published_at")}


def _chunk_written(slot: str, written: int, total: int) -> None:
    """Called after each chunk a publish writes: the seam where tests inject a failure half-way."""
    fault_point("publish.chunk")  # a test seam (faults.py); nothing when unset


@contextlib.contextmanager
def _timed(stages: dict[str, float], name: str):
    start = time.perf_counter()
    try:
        yield
    finally:
        stages[name] = round(time.perf_counter() - start, 3)


def _write_slot(store, layout: Layout, slot: str, table: pa.Table, at: datetime, progress: bool, chunk: int,
                stages: dict[str, float]) -> None:  # fmt: skip
    """Slot Parquet (the view's offline source) + online rows, in chunks, in Feast's storage format.

    Each chunk goes to the online store in bulk (online_store.py: Feast's own upsert on sqlite,
    the HSETs of Feast's own writer on Redis), as the bytes `encoded_columns` builds straight
    from Arrow. verify_slot then reads a sample back through Feast's get_online_features.
    Recording the interval afterwards lets `refresh` continue with materialize_incremental.
    """
    from tqdm import tqdm

    from userlens.online_store import table_for

    layout.slot_record(slot).unlink(missing_ok=True)  # from here on the slot holds nothing trusted
    path = layout.slot_parquet(slot)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _timed(stages, "slot_parquet"):
        write_parquet_atomic(path, table)
    view = store.get_feature_view(layout.view(slot))
    online = table_for(store, view)
    with _timed(stages, "write_order"):
        if (order := online.write_order(table["user_id"])) is not None:
            table = table.take(order)
    total = table.num_rows
    with _timed(stages, "online_write"), tqdm(total=total, desc=f"materialize {view.name}", unit="user",
                                              disable=not progress) as bar:  # fmt: skip
        for start in range(0, total, chunk):
            part = table.slice(start, chunk)
            rows = encoded_columns(view, part, layout.features)
            _retrying(store, f"writing slot {slot}", lambda rows=rows: online.write(rows, at), UNCHANGED)
            bar.update(part.num_rows)
            _chunk_written(slot, start + part.num_rows, total)
    with _timed(stages, "record_interval"):
        store.registry.apply_materialization(view, store.project, at - timedelta(seconds=1), at + timedelta(seconds=1))


def verify_slot(store, layout: Layout, slot: str, table: pa.Table, sample: int = VERIFY_SAMPLE) -> None:
    """Read up to `sample` users (always the first and the last) back: same version, same bits.

    Through get_online_features, Feast's standard read, so what userlens wrote is checked by Feast's own reader.
    """
    n = table.num_rows
    rows = np.unique(np.linspace(0, n - 1, min(n, sample)).round().astype(np.int64))
    vector, version_column = layout.features.vector, layout.features.version
    ids = table["user_id"].take(rows).to_pylist()
    expected = list_vectors(table[vector].take(rows))
    version = table[version_column][0].as_py()
    features = (vector, version_column)
    got = _retrying(store, f"reading slot {slot} back", lambda: _read_online(store, layout.view(slot), ids, features),
                    UNCHANGED)  # fmt: skip
    bad = [
        uid
        for i, uid in enumerate(ids)
        if got[version_column][i] != version
        or got[vector][i] is None
        or not np.array_equal(np.asarray(got[vector][i], np.float32), expected[i])
    ]
    if bad:
        raise ServingError(
            f"slot {slot}: {len(bad)} of {len(ids)} users read back do not hold {version} (e.g. {bad[:3]}); "
            "the served version is unchanged"
        )


def _lock(layout: Layout):
    """One publish or refresh at a time per store (a second one fails fast)."""
    path = layout.state / ".publish.lock"
    return file_lock(path, busy=lambda: ServingError(f"another publish or refresh is running ({path})"))


def _read_online(store, view: str, user_ids: list[str], features: Sequence[str]) -> dict[str, list]:
    """One get_online_features call on one view."""
    response = store.get_online_features(features=[f"{view}:{f}" for f in features], entity_rows={"user_id": user_ids})
    return response.to_dict()


# --- pointer, state, incremental refresh -------------------------------------------------------


def read_pointer(layout: Layout) -> dict | None:
    return read_json(layout.pointer) if layout.pointer.exists() else None


def serving_state(project: Project, params: Params) -> dict | None:
    """The serving pointer: slot, model_version, users, dim, online_store, published_at, history."""
    return read_pointer(Layout.of(project.root / params.serving.repo))


def refresh(project: Project, params: Params, embeddings: Path | None = None, progress: bool = False) -> dict:
    """Bring the served embeddings up to date with a re-export of the *served* version (refresh_set).

    `embeddings` defaults to the export in data/embeddings/ that holds the served version."""
    layout = Layout.of(project.root / params.serving.repo)

    def make_table(version: str, at: datetime) -> pa.Table:
        path = Path(embeddings) if embeddings else _export_of(project, version)
        return slot_table(path, version, project.sequences_dir, at)

    return refresh_set(layout, params.serving, make_table, progress)


def refresh_set(
    layout: Layout, serving: ServingParams, make_table: Callable[[str, datetime], pa.Table], progress: bool = False
) -> dict:
    """Bring the served slot up to date with `make_table(served version, now)`: users with new rows.

    Rows whose vector or scalars changed (and new users) get a new timestamp in the slot Parquet;
    Feast's materialize_incremental then writes only those to the online store, so every other
    user's served row stays as it was, bit for bit.
    """
    features = layout.features
    started = time.perf_counter()
    with _lock(layout):
        pointer = read_pointer(layout)
        if pointer is None:
            raise ServingError(
                f"nothing is served yet ({layout.pointer} missing): run `{features.publish_command}` first"
            )
        version, slot = pointer["model_version"], pointer["slot"]
        store = open_store(layout, serving)
        # Changed rows must fall inside the window materialize_incremental reads: [last end, now].
        since = store.get_feature_view(layout.view(slot)).most_recent_end_time
        since = since if since is None or since.tzinfo else since.replace(tzinfo=UTC)
        now = datetime.now(UTC) if since is None else max(datetime.now(UTC), since)
        new = pl.from_arrow(make_table(version, now))
        old = pl.read_parquet(layout.slot_parquet(slot))
        columns = [features.vector, *features.scalars]
        joined = new.join(old.select("user_id", *columns), on="user_id", how="left", suffix="_old")
        differs = pl.any_horizontal([pl.col(c).ne_missing(pl.col(f"{c}_old")) for c in columns])
        changed = joined.filter(differs).select(new.columns)
        merged = pl.concat([old.join(changed, on="user_id", how="anti"), changed])
        merged_table = merged.to_arrow().cast(features.schema)
        # Rows of the slot Parquet newer than the last materialisation: a refresh that wrote the
        # Parquet and then failed (or was killed) before the online write; written now.
        pending = since is not None and old.height > 0 and old["event_timestamp"].max() >= since
        # An online store that lost the served rows (emptied, a new sqlite file): the whole slot again.
        lost = not _still_holds(store, layout, slot, old.to_arrow())
        if lost:
            apply_definitions(store, layout)  # the tables of a new, empty database
            _write_slot(store, layout, slot, merged_table, now, progress, 10_000, {})
            verify_slot(store, layout, slot, merged_table)
        elif changed.height or pending:
            if changed.height:
                write_parquet_atomic(layout.slot_parquet(slot), merged_table)
                fault_point("refresh.written")  # a test seam (faults.py); nothing when unset
            output = contextlib.nullcontext() if progress else contextlib.redirect_stdout(io.StringIO())
            with output:  # materialize_incremental prints its progress
                _retrying(store, f"refreshing slot {slot}", lambda: store.materialize_incremental(
                    end_date=now + timedelta(seconds=1), feature_views=[layout.view(slot)]),
                    "the served slot holds some of the changed users; the next refresh writes the rest")  # fmt: skip
        if lost or changed.height or pending:
            pointer.update(users=merged.height, refreshed_at=utc_now())
            record = {"model_version": version, "users": merged.height, "store": _store_identity(store.config),
                      **({"index": pointer.get("index")} if features.indexed else {})}  # fmt: skip
            if features.indexed:  # rebuilt whole: seconds at 1M users, and never a stale neighbour
                pointer["index"] = record["index"] = _build_index(
                    layout, serving, slot, merged_table["user_id"], list_vectors(merged_table[features.vector])
                )
            write_json_atomic(layout.slot_record(slot), record)
            write_json_atomic(layout.pointer, pointer)
            _remove_unused_indexes(layout)
    seconds = time.perf_counter() - started
    return {"model_version": version, "slot": slot, "changed": changed.height, "users": merged.height,
            "seconds": round(seconds, 3)}  # fmt: skip


def _export_of(project: Project, version: str) -> Path:
    for path in sorted(project.embeddings_dir.glob("*.parquet")):
        if export_version(path) == version:
            return path
    raise ServingError(f"no export of the served version {version} in {project.relative(project.embeddings_dir)}")
