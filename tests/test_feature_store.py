"""The Feast online store with the real Feast (sqlite, and a real redis-server where installed).

Every test builds a small project (a few hundred users, d=16): params.yaml, a copy of
feature_repo/ and export Parquets written by the real export function.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from click.testing import CliRunner

from conftest import REPO, set_params
from test_vector_index import exact_neighbours
from userlens import feature_sets, feature_store, serving, vector_index
from userlens.cli import cli
from userlens.embeddings import export_embeddings
from userlens.errors import DataError, ServingError
from userlens.feast_values import encoded_columns, entity_keys, online_rows
from userlens.project import Project

pytestmark = pytest.mark.integration

USERS, DIM = 300, 16


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def redis_url():
    """A real redis-server on a free loopback port, without persistence; killed afterwards."""
    binary = shutil.which("redis-server", path=f"{os.environ.get('PATH', '')}:/usr/sbin:/usr/bin")
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail("redis-server is not installed; .ci/run installs it (apt-get install redis-server)")
        pytest.skip("redis-server is not installed (Debian package redis-server); CI installs it")
    port = free_port()
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        import redis

        client = redis.Redis(port=port)
        for _ in range(100):
            try:
                client.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.kill()
        proc.wait()


def make_serving_project(root: Path, serving: dict | None = None) -> Project:
    root.mkdir(parents=True)
    shutil.copy(REPO / "params.yaml", root / "params.yaml")
    shutil.copytree(REPO / "feature_repo", root / "feature_repo", ignore=shutil.ignore_patterns("__pycache__"))
    # No grace period by default: these stores are read by userlens, which follows the pointer.
    set_params(root, {"serving": {"retire_grace_s": 0, **(serving or {})}})
    return Project(root)


def redis_serving(url: str) -> dict:
    """Serving settings for the module's redis-server, emptied first (one server per module)."""
    import redis

    redis.Redis.from_url(url).flushdb()
    return {"online_store": "redis", "redis_url": url}


@pytest.fixture(params=["sqlite", "redis"])
def store_project(request, tmp_path) -> Project:
    serving = redis_serving(request.getfixturevalue("redis_url")) if request.param == "redis" else None
    return make_serving_project(tmp_path / "project", serving)


@pytest.fixture
def sqlite_project(tmp_path) -> Project:
    return make_serving_project(tmp_path / "project")


@pytest.fixture
def redis_project(tmp_path, redis_url) -> Project:
    return make_serving_project(tmp_path / "project", redis_serving(redis_url))


def write_export(project: Project, version: str, seed: int, users: int = USERS) -> tuple[Path, list[str], np.ndarray]:
    vectors = np.random.default_rng(seed).standard_normal((users, DIM)).astype(np.float32)
    ids = [f"user-{i:04d}" for i in range(users)]
    path = project.root / "registry" / f"{version}.parquet"
    export_embeddings(path, ids, [vectors[:100], vectors[100:]], version, datetime.now(UTC))
    return path, ids, vectors


def reader(project: Project, fallback: str = "mean") -> serving.UserEmbeddings:
    return serving.reader(project, project.load_params(), fallback)


def publish(project: Project, version: str, path: Path, **kwargs) -> dict:
    return feature_store.publish(project, project.load_params(), version, path, **kwargs)


def test_publish_then_get_returns_the_exported_bits(sqlite_project):
    path, ids, vectors = write_export(sqlite_project, "v1", seed=1)
    summary = publish(sqlite_project, "v1", path)
    assert summary["users"] == USERS and summary["model_version"] == "v1" and summary["online_store"] == "sqlite"

    store = reader(sqlite_project)
    order = [5, 0, 299, 17]
    got, found, version = store.get([ids[i] for i in order] + ["nobody"])
    assert version == "v1"
    assert found.tolist() == [True, True, True, True, False]
    assert got.dtype == np.float32 and got.shape == (5, DIM)
    assert got[:4].tobytes() == vectors[order].tobytes()  # bitwise
    np.testing.assert_array_equal(got[4], vectors.mean(axis=0, dtype=np.float64).astype(np.float32))

    assert np.all(reader(sqlite_project, "zeros").get(["nobody"])[0] == 0)
    assert np.isnan(reader(sqlite_project, "none").get(["nobody"])[0]).all()
    assert reader(sqlite_project, "none").get_one("nobody") == (None, False, "v1")
    one, known, _ = store.get_one(ids[7])
    assert known and one.tobytes() == vectors[7].tobytes()

    state = feature_store.serving_state(sqlite_project, sqlite_project.load_params())
    assert state["slot"] == "blue" and state["dim"] == DIM and state["users"] == USERS


def test_slot_rows_carry_scalars_from_sequences(sqlite_project):
    path, ids, _ = write_export(sqlite_project, "v1", seed=1, users=3)
    seq = sqlite_project.sequences_dir
    seq.mkdir(parents=True)
    pl.DataFrame(
        {"user_index": [0, 1, 2], "user_id": ids, "n_history": [4, 1, 2], "n_future": [1, 0, 1]}
    ).write_parquet(seq / "users.parquet")
    pl.DataFrame(
        {
            "user_index": [0, 1, 2],
            "history_timestamp": [[1, 2, 3, 4], [50], [7, 8]],
            "future_timestamp": [[9], [], [10]],
        }
    ).write_parquet(seq / "sequences.parquet")
    table = feature_sets.slot_table(path, "v1", seq, datetime.now(UTC))
    assert table["n_events"].to_pylist() == [5, 1, 3]
    assert table["last_event_at"].to_pylist() == [9, 50, 10]


def slot_with_nulls(project: Project, at: datetime):
    """Five users' slot table, some scalars null, and the project's store with the views applied."""
    path, ids, _ = write_export(project, "v1", seed=1, users=5)
    seq = project.sequences_dir
    seq.mkdir(parents=True)
    pl.DataFrame({"user_index": [0, 1], "user_id": ids[:2], "n_history": [4, 0], "n_future": [1, 0]}).write_parquet(
        seq / "users.parquet"
    )
    pl.DataFrame(
        {"user_index": [0, 1], "history_timestamp": [[1, 2], []], "future_timestamp": [[9], []]}
    ).write_parquet(seq / "sequences.parquet")
    table = feature_sets.slot_table(path, "v1", seq, at)
    assert table["n_events"].null_count == 3 and table["last_event_at"].null_count == 4
    params = project.load_params()
    layout = feature_store.Layout.of(project.root / params.serving.repo)
    (project.root / "data" / "feast").mkdir(parents=True)
    store = feature_store.open_store(layout, params.serving)
    feature_store.apply_definitions(store, layout)
    return table, store


def test_online_rows_are_what_write_to_online_store_would_write(sqlite_project):
    """The encoded rows equal Feast's own conversion in write_to_online_store (nulls included), byte for byte."""
    at = datetime(2024, 5, 1, 12, tzinfo=UTC)
    table, store = slot_with_nulls(sqlite_project, at)
    view = store.get_feature_view("user_embeddings_blue")
    feast_rows = store._get_provider()._prep_rows_to_write_for_ingestion(view, table.to_pandas())
    ours = online_rows(encoded_columns(view, table, feature_sets.EMBEDDINGS), at)
    assert len(ours) == len(feast_rows) == 5
    for (key, values, ts, created), (fkey, fvalues, fts, fcreated) in zip(ours, feast_rows, strict=True):
        assert key.SerializeToString() == fkey.SerializeToString()
        assert list(values) == list(fvalues)
        assert {k: v.SerializeToString() for k, v in values.items()} == {
            k: v.SerializeToString() for k, v in fvalues.items()
        }
        assert ts == fts.replace(tzinfo=UTC) and created is None and fcreated is None


def stored_rows(store, view) -> list:
    """Everything the online store holds for `view`, as raw stored values, in a stable order."""
    config = store.config
    if config.online_store.type == "sqlite":
        conn = store._get_provider().online_store._get_conn(config)
        columns = "entity_key, feature_name, value, value_text, vector_value, event_ts, created_ts"
        sql = f"SELECT {columns} FROM {config.project}_{view.name} ORDER BY entity_key, feature_name"
        return conn.execute(sql).fetchall()
    client = store._get_provider().online_store._get_client(config.online_store)
    return sorted((key, sorted(client.hgetall(key).items())) for key in client.keys("*"))


def test_the_bulk_writer_stores_what_feasts_own_writer_stores(store_project):
    """Byte for byte on sqlite and Redis, nulls included; then Feast's get_online_features reads it back."""
    from feast.infra.key_encoding_utils import serialize_entity_key

    from userlens.online_store import FeastTable, table_for

    at = datetime(2024, 5, 1, 12, tzinfo=UTC)
    table, store = slot_with_nulls(store_project, at)
    view = store.get_feature_view("user_embeddings_blue")
    rows = encoded_columns(view, table, feature_sets.EMBEDDINGS)
    fast = table_for(store, view)
    assert type(fast) is not FeastTable  # the bulk path, not the provider's
    FeastTable(store, view).write(rows, at)  # Feast's own online_write_batch
    feasts = stored_rows(store, view)
    assert len(feasts) == (20 if store.config.online_store.type == "sqlite" else 5)
    if store.config.online_store.type == "sqlite":
        store._get_provider().online_store._get_conn(store.config).execute(f"DELETE FROM userlens_{view.name}")
    else:
        store._get_provider().online_store._get_client(store.config.online_store).flushdb()
    fast.write(rows, at)
    assert stored_rows(store, view) == feasts
    got = store.get_online_features(features=[f"{view.name}:{f}" for f in feature_sets.EMBEDDINGS.features],
                                    entity_rows=[{"user_id": u} for u in rows.user_ids]).to_dict()  # fmt: skip
    assert got["model_version"] == ["v1"] * 5 and got["n_events"] == table["n_events"].to_pylist()
    assert [np.asarray(v, np.float32).tobytes() for v in got["embedding"]] == [
        np.asarray(v, np.float32).tobytes() for v in table["embedding"].to_pylist()
    ]
    # ... and the bulk reader reads the stored bytes, Feast's reader's values
    assert fast.read(rows.user_ids, ["model_version"]) == FeastTable(store, view).read(rows.user_ids, ["model_version"])
    for uid in ["", "u", "ünïcødé-ユーザー", "x" * 300]:
        key = entity_keys([uid])[0]
        assert fast.keys([uid]) == [serialize_entity_key(key, entity_key_serialization_version=3)]


def test_the_bulk_writer_upserts_as_feasts_own_writer_does(store_project):
    """Unusual ids and texts, then new rows over some of them: the same rows as Feast's writer leaves.

    The chunks hold every kind of column the sqlite writer packs apart (online_store._packed):
    one value for all rows, bytes of one length (vectors; the last chunk's keys and texts), and
    the rest (varied keys, nulls, texts of several lengths, non-ASCII, quotes, NUL)."""
    from dataclasses import replace

    from feast.protos.feast.types.Value_pb2 import Value as ValueProto

    from userlens.online_store import FeastTable, table_for

    def with_versions(rows, texts: list[str]):
        values = [ValueProto(string_val=t).SerializeToString() for t in texts]
        return replace(rows, values={**rows.values, "model_version": values},
                       texts={**rows.texts, "model_version": texts})  # fmt: skip

    at = datetime(2024, 5, 1, 12, tzinfo=UTC)
    table, store = slot_with_nulls(store_project, at)
    view = store.get_feature_view("user_embeddings_blue")
    first = encoded_columns(view, table, feature_sets.EMBEDDINGS)
    first = replace(first, user_ids=["", "ünïcødé-ユーザー", "x" * 300, "a'b", "user-4"])
    later = datetime(2024, 5, 2, tzinfo=UTC)
    second = replace(first, user_ids=["x" * 300, "new", ""],
                     values={name: column[2:0:-1] + column[:1] for name, column in first.values.items()},
                     texts={name: column[2:0:-1] + column[:1] for name, column in first.texts.items()})  # fmt: skip
    second = with_versions(second, ["ユーザー-v2", "v2-ü ' \x00", "v2-ü ' \x00"])
    third = replace(first, user_ids=["p1", "p2", "p3"], values={n: c[:3] for n, c in first.values.items()},
                    texts={n: c[:3] for n, c in first.texts.items()})  # fmt: skip
    third = with_versions(third, ["ü-1", "ü-2", "ü-3"])
    fourth = replace(third, user_ids=["e1", "e2"], values={n: c[:2] for n, c in third.values.items()},
                     texts={n: c[:2] for n, c in third.texts.items()})  # fmt: skip
    fourth = with_versions(fourth, ["", ""])
    fourth.values["model_version"][1], fourth.texts["model_version"][1] = b"", None  # texts: "" and NULL
    empty = replace(first, user_ids=[], values={n: [] for n in first.values}, texts={n: [] for n in first.texts})
    stored = []
    for writer in (FeastTable(store, view), table_for(store, view)):
        if store.config.online_store.type == "sqlite":
            store._get_provider().online_store._get_conn(store.config).execute(f"DELETE FROM userlens_{view.name}")
        else:
            store._get_provider().online_store._get_client(store.config.online_store).flushdb()
        writer.write(first, at)
        writer.write(second, later)
        writer.write(third, later)
        writer.write(fourth, later)
        if type(writer) is not FeastTable:
            writer.write(empty, later)  # nothing to write: nothing changes
        stored.append(stored_rows(store, view))
    assert stored[1] == stored[0]
    assert len(stored[0]) == (44 if store.config.online_store.type == "sqlite" else 11)
    users = ["", "new", "user-4", "x" * 300, "p2", "e1"]
    got = store.get_online_features(features=[f"{view.name}:model_version"],
                                    entity_rows=[{"user_id": u} for u in users]).to_dict()  # fmt: skip
    assert got["model_version"] == ["v2-ü ' \x00", "v2-ü ' \x00", "v1", "ユーザー-v2", "ü-2", ""]


def test_the_redis_writer_expires_keys_as_feast_does_and_stops_at_an_error_reply(redis_project):
    """key_ttl_seconds: every hash expires as after Feast's writer. A reply refusing one key
    (WRONGTYPE) fails the write, and the connection it used, replies unread, serves nothing stale."""
    import redis

    from userlens.online_store import FeastTable, table_for

    at = datetime(2024, 5, 1, 12, tzinfo=UTC)
    table, store = slot_with_nulls(redis_project, at)
    store.config.online_store.key_ttl_seconds = 3600
    view = store.get_feature_view("user_embeddings_blue")
    rows = encoded_columns(view, table, feature_sets.EMBEDDINGS)
    client = store._get_provider().online_store._get_client(store.config.online_store)
    feasts, fast = FeastTable(store, view), table_for(store, view)
    expiring = []
    for writer in (feasts, fast):
        client.flushdb()
        writer.write(rows, at)
        expiring.append(sorted(key for key in client.keys("*") if 3500 < client.ttl(key) <= 3600))
    assert len(expiring[0]) == 5 and expiring[1] == expiring[0]
    feasts_rows = stored_rows(store, view)

    client.flushdb()
    first = fast.keys(rows.user_ids[:1])[0] + fast.project  # the user's hash, as the writer names it
    client.set(first, b"not a hash")
    with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
        fast.write(rows, at)
    client.delete(first)
    fast.write(rows, at)
    assert stored_rows(store, view) == feasts_rows
    assert fast.read(rows.user_ids, ["model_version"]) == feasts.read(rows.user_ids, ["model_version"])


def test_sqlite_rows_are_written_in_the_order_of_their_stored_keys(sqlite_project):
    """A B-tree insert then lands beside the previous one (shuffled ids write 3.5x slower)."""
    import pyarrow as pa

    from userlens.online_store import SqliteTable, table_for

    params = sqlite_project.load_params()
    layout = feature_store.Layout.of(sqlite_project.root / params.serving.repo)
    layout.state.mkdir(parents=True, exist_ok=True)
    store = feature_store.open_store(layout, params.serving)
    feature_store.apply_definitions(store, layout)
    writer = table_for(store, store.get_feature_view("user_embeddings_blue"))
    assert isinstance(writer, SqliteTable)
    ids = [f"user-{i}" for i in np.random.default_rng(0).permutation(500)] + ["ü", "zz", "a" * 40]
    order = writer.write_order(pa.chunked_array([ids])).to_pylist()
    assert sorted(order) == list(range(len(ids)))
    keys = writer.keys([ids[i] for i in order])
    assert keys == sorted(keys)


def test_cut_over_abort_and_rollback(store_project, monkeypatch):
    """v1, v2 served in turn; a v3 publish that dies half-way leaves v2 whole; rollback serves v1 again."""
    exports = {v: write_export(store_project, v, seed=i) for i, v in enumerate(["v1", "v2", "v3"], start=1)}
    ids = exports["v1"][1]
    store = reader(store_project)

    similar = serving.SimilarUsers(store_project.root / "feature_repo", store_project.load_params().serving)

    def served(expected: str) -> None:
        got, found, version = store.get(ids)
        assert version == expected and found.all()
        assert got.tobytes() == exports[expected][2].tobytes()
        neighbours, version = similar.of(ids[3], k=5)  # from the index of the same version
        assert version == expected
        assert [user for user, _ in neighbours] == [ids[i] for i in exact_neighbours(exports[expected][2], 3, 5)]

    assert publish(store_project, "v1", exports["v1"][0])["slot"] == "blue"
    served("v1")
    assert publish(store_project, "v2", exports["v2"][0])["slot"] == "green"
    served("v2")

    def die_half_way(slot, written, total):
        if written < total:
            raise RuntimeError("injected failure")

    monkeypatch.setattr(feature_store, "_chunk_written", die_half_way)
    with pytest.raises(RuntimeError, match="injected"):
        publish(store_project, "v3", exports["v3"][0], chunk_users=100)
    monkeypatch.undo()
    served("v2")  # the v3 rows went into the standby slot (blue), which nobody reads
    blue = store._read({"slot": "blue", "model_version": "v3", "dim": DIM}, ids)[1]
    assert 0 < blue.sum() < USERS  # ... and it really was half-written
    v2_index = feature_store.serving_state(store_project, store_project.load_params())["index"]

    def no_index(*args, **kwargs):
        raise RuntimeError("injected index failure")

    monkeypatch.setattr(vector_index, "build", no_index)  # everything written and read back, then this
    with pytest.raises(RuntimeError, match="injected index"):
        publish(store_project, "v3", exports["v3"][0])
    monkeypatch.undo()
    served("v2")

    rollback = publish(store_project, "v1", exports["v1"][0])  # the previous version's Parquet again
    assert rollback["slot"] == "blue" and rollback["rewritten"]  # blue held half of v3: rewritten
    served("v1")
    again = publish(store_project, "v2", exports["v2"][0])  # green still fully holds v2: flip only
    assert again["slot"] == "green" and not again["rewritten"]
    served("v2")
    state = feature_store.serving_state(store_project, store_project.load_params())
    assert state["index"] == v2_index  # ... and its index too
    index_files = sorted(p.name for p in (store_project.root / "data" / "feast" / "index").glob("*.faiss"))
    records = [json.loads(p.read_text())["index"]["file"] for p in store_project.root.glob("data/feast/slots/*.json")]
    assert index_files == sorted(records) and len(index_files) == 2  # the live one and the standby's
    history = feature_store.serving_state(store_project, store_project.load_params())["history"]
    assert [h["model_version"] for h in history] == ["v1", "v2", "v1"]


def test_a_batch_never_mixes_versions(sqlite_project):
    """Rows left in a slot by an older version count as not found, not as the served version."""
    path1, ids, _ = write_export(sqlite_project, "v1", seed=1)
    publish(sqlite_project, "v1", path1)  # blue: v1 for all users
    path2, _, _ = write_export(sqlite_project, "v2", seed=2, users=100)
    publish(sqlite_project, "v2", path2)  # green: v2 for 100 users
    path3, _, v3 = write_export(sqlite_project, "v3", seed=3, users=50)
    publish(sqlite_project, "v3", path3)  # blue: v3 for 50 users, v1 rows for the other 250 remain
    got, found, version = reader(sqlite_project, "none").get(ids)
    assert version == "v3" and found.sum() == 50 and found[:50].all()
    assert got[:50].tobytes() == v3.tobytes() and np.isnan(got[50:]).all()


def test_refresh_writes_only_changed_users(sqlite_project):
    path, ids, vectors = write_export(sqlite_project, "v1", seed=1)
    sqlite_project.embeddings_dir.mkdir(parents=True)
    publish(sqlite_project, "v1", path)
    changed = vectors.copy()
    changed[:10] += 1.0
    new_ids = [*ids, "newcomer"]
    new_vectors = np.vstack([changed, np.ones((1, DIM), np.float32)])
    export_embeddings(sqlite_project.embeddings_dir / "barlow_twins.parquet", new_ids, [new_vectors], "v1",
                      datetime.now(UTC))  # fmt: skip
    result = feature_store.refresh(sqlite_project, sqlite_project.load_params())
    assert result["changed"] == 11 and result["users"] == USERS + 1
    got, found, _ = reader(sqlite_project).get(new_ids)
    assert found.all() and got.tobytes() == new_vectors.tobytes()
    neighbours, _ = serving.SimilarUsers(sqlite_project.root / "feature_repo").of("newcomer", k=5)
    assert [user for user, _ in neighbours] == [new_ids[i] for i in exact_neighbours(new_vectors, USERS, 5)]


def test_publish_refuses_bad_input(sqlite_project):
    path, _, _ = write_export(sqlite_project, "v1", seed=1)
    with pytest.raises(DataError, match="holds model version"):
        publish(sqlite_project, "v2", path)
    bad = sqlite_project.root / "bad.parquet"
    bad.write_text("not parquet")
    with pytest.raises(DataError, match="not an embeddings export"):
        publish(sqlite_project, "v1", bad)
    with pytest.raises(ServingError, match="nothing is served yet"):
        reader(sqlite_project).get(["x"])


def test_feast_plan_and_apply_from_the_folder(sqlite_project):
    """The feast CLI's own plan and apply, run in the repository folder (one process: one slow feast import)."""
    repo = sqlite_project.root / "feature_repo"
    (sqlite_project.root / "data" / "feast").mkdir(parents=True)  # a clone has it (data/feast/.gitignore)
    script = (
        "from feast.cli.cli import cli\nfor verb in ('plan', 'apply'):\n    cli.main([verb], standalone_mode=False)"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=repo, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("Created feature view user_embeddings_blue") == 2  # planned, then applied
    store = feature_store.open_store(feature_store.Layout.of(repo), sqlite_project.load_params().serving)
    sets = ("user_embeddings", "user_interest", "user_context")
    assert {fs.name for fs in store.list_feature_services()} == {
        *sets,
        *(f"{name}_{slot}_service" for name in sets for slot in ("blue", "green")),
    }
    # After two publishes green is live; a later `feast apply` keeps the stable name on it.
    for seed, version in enumerate(("v1", "v2")):
        publish(sqlite_project, version, write_export(sqlite_project, version, seed=seed)[0])
    again = subprocess.run([sys.executable, "-c", script.replace("('plan', 'apply')", "('apply',)")], cwd=repo,
                           capture_output=True, text=True)  # fmt: skip
    assert again.returncode == 0, again.stderr[-2000:]
    store = feature_store.open_store(feature_store.Layout.of(repo), sqlite_project.load_params().serving)
    service = store.get_feature_service("user_embeddings")
    assert [p.name for p in service.feature_view_projections] == ["user_embeddings_green"]


def test_cli_lookup_and_similar(sqlite_project):
    path, ids, vectors = write_export(sqlite_project, "v1", seed=1)
    runner = CliRunner()
    base = ["--project", str(sqlite_project.root)]
    done = runner.invoke(cli, [*base, "materialize", "--embeddings", str(path), "--no-progress"])
    assert done.exit_code == 0, done.output
    assert "v1" in done.output

    done = runner.invoke(cli, [*base, "lookup", ids[3], "stranger", "--json"])
    assert done.exit_code == 0, done.output
    answer = json.loads(done.output)
    assert answer["model_version"] == "v1"
    assert [u["found"] for u in answer["users"]] == [True, False]
    assert np.array(answer["users"][0]["embedding"], np.float32).tobytes() == vectors[3].tobytes()

    done = runner.invoke(cli, [*base, "similar", ids[3], "-k", "5", "--json"])
    assert done.exit_code == 0, done.output
    got = json.loads(done.stdout)["neighbours"]
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    scores = unit @ unit[3]
    scores[3] = -np.inf
    expected = np.argsort(-scores)[:5]
    assert [n["user_id"] for n in got] == [ids[i] for i in expected]
    np.testing.assert_allclose([n["score"] for n in got], scores[expected], rtol=1e-5)

    done = runner.invoke(cli, [*base, "similar", "stranger"])
    assert done.exit_code == 2 and "unknown user 'stranger'" in done.output and "Traceback" not in done.output


def test_feast_serve_answers_by_the_stable_name_across_a_cut_over_and_a_rollback(tmp_path):
    """Serving code as it runs: a real `feast serve` process asked over HTTP for the feature
    service `user_embeddings` (no userlens code, no pointer file). Every response holds one
    version whole; after a cut-over the new one, within Feast's registry refresh; after a
    rollback the old one again."""
    project = make_serving_project(tmp_path / "project", {"retire_grace_s": 10})
    exports = {v: write_export(project, v, seed=k) for k, v in enumerate(("v1", "v2"))}
    publish(project, "v1", exports["v1"][0])
    port = free_port()
    cmd, env = serving.serve_command(project, project.load_params(), "127.0.0.1", port)
    proc = subprocess.Popen(cmd, env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ids = exports["v1"][1][:20]

    def ask() -> str:
        """One request for 20 users; checks the response is one version, whole; returns it."""
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/get-online-features",
            data=json.dumps({"feature_service": "user_embeddings", "entities": {"user_id": ids}}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=5) as response:
            body = json.loads(response.read())
        values = dict(zip(body["metadata"]["feature_names"], (r["values"] for r in body["results"]), strict=True))
        (version,) = set(values["model_version"])  # one version in the whole batch
        expected = exports[version][2][:20]
        assert np.array(values["embedding"], np.float32).tobytes() == expected.tobytes()
        return version

    def wait_for(version: str) -> None:
        deadline = time.monotonic() + 30  # the server re-reads the registry every 5 s
        while (seen := ask()) != version:
            assert seen in exports and time.monotonic() < deadline, f"still {seen}, not {version}"
            time.sleep(0.2)

    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                assert ask() == "v1"
                break
            except OSError:
                if proc.poll() is not None:
                    pytest.fail(f"feast serve exited: {proc.stderr.read().decode()[-2000:]}")
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        publish(project, "v2", exports["v2"][0])  # cut-over
        wait_for("v2")
        rolled = publish(project, "v1", exports["v1"][0])  # rollback: the old slot, not rewritten
        assert not rolled["rewritten"]
        wait_for("v1")
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_a_slot_that_was_live_is_rewritten_only_after_the_grace_period(tmp_path):
    project = make_serving_project(tmp_path / "project", {"retire_grace_s": 1.5})
    paths = {v: write_export(project, v, seed=k)[0] for k, v in enumerate(("v1", "v2", "v3"))}
    publish(project, "v1", paths["v1"])
    publish(project, "v2", paths["v2"])  # into green, never live: no wait
    started = time.monotonic()
    done = publish(project, "v3", paths["v3"])  # into blue, live until the last cut-over
    assert done["slot"] == "blue" and time.monotonic() - started >= 1.0
    from feast import FeatureStore

    store = FeatureStore(repo_path=str(project.root / "feature_repo"))
    service = store.get_feature_service("user_embeddings")  # the stable name follows the cut-over
    assert [p.name for p in service.feature_view_projections] == ["user_embeddings_blue"]


def test_a_feature_repo_that_predates_a_feature_set_is_refused_clearly(sqlite_project):
    """An upgraded project whose feature_repo/ lacks a set's views: one clear error, nothing served."""
    definitions = sqlite_project.root / "feature_repo" / "definitions.py"
    text = definitions.read_text()
    definitions.write_text(text[: text.index("user_embeddings_blue, user_embeddings_blue_service")])
    path, _, _ = write_export(sqlite_project, "v1", seed=1)
    with pytest.raises(ServingError, match="no Feast feature view user_embeddings_blue or user_embeddings_green"):
        publish(sqlite_project, "v1", path)
    assert not (sqlite_project.root / "data/feast/serving.json").exists()
