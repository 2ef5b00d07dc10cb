"""Feast online store: materialization throughput and lookup latency, sqlite and Redis.

For each online store x users x dims, in a fresh process (for its peak memory): write a
synthetic export Parquet, publish it (the real `feature_store.publish`: slot Parquet, the bulk
writes of online_store.py in chunks of 10,000 users, read-back check through Feast, the
similar-users index, the cut-over) and time it; up to COMPARE_UP_TO users also time the same
rows through Feast's `write_to_online_store` and its own `materialize()` for comparison. Then
lookup latency p50/p99 for 1, 100 and 1,000 random known users through the SDK
(`UserEmbeddings.get`, the bulk read of online_store.py, and a plain `get_online_features`),
through `feast serve` over HTTP by the stable feature service name `user_embeddings`, and the
floor: the same rows read straight from the store (sqlite3 / redis-py, pre-serialised keys,
stored bytes only).

    python benchmarks/feature_store.py                                       # everything
    python benchmarks/feature_store.py --users 10000 --dims 64 --stores sqlite
    python benchmarks/feature_store.py --users 1000000 \
        --embeddings benchmarks/out/export-project/data/embeddings/barlow_twins.parquet

With --embeddings, the first --users users of a real export (its ids, vectors and width) instead
of standard-normal ones: the index then has the structure of a trained encoder's vectors.

Redis: a redis-server the script starts on a free loopback port (no persistence).
Writes benchmarks/out/feature_store.json (feature_store-trained.json with --embeddings) and
prints the Markdown tables for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import OUT, REPO, emit, machine, run_worker  # noqa: E402

BATCHES = {1: 300, 100: 100, 1000: 30}  # batch size -> timed repetitions
COMPARE_UP_TO = 100_000  # Feast materialize() is timed too up to this many users (it is slow)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_project(root: Path, store: str, redis_url: str | None) -> Path:
    import yaml

    shutil.rmtree(root, ignore_errors=True)
    (root / "data" / "feast").mkdir(parents=True)
    shutil.copytree(REPO / "feature_repo", root / "feature_repo", ignore=shutil.ignore_patterns("__pycache__"))
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["serving"].update(online_store=store, redis_url=redis_url)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return root


def percentiles(samples: list[float]) -> dict:
    ms = np.asarray(samples) * 1000
    return {"p50_ms": round(float(np.percentile(ms, 50)), 3), "p99_ms": round(float(np.percentile(ms, 99)), 3)}


def timed(fn, batches: list[list[str]]) -> dict:
    fn(batches[0])  # warm-up: connections, registry, caches
    samples = []
    for ids in batches:
        start = time.perf_counter()
        fn(ids)
        samples.append(time.perf_counter() - start)
    return percentiles(samples)


def raw_reader(store, slot: str):
    """The floor: the stored bytes of the same rows, keys serialised beforehand."""
    from feast.infra.key_encoding_utils import serialize_entity_key
    from feast.protos.feast.types.EntityKey_pb2 import EntityKey
    from feast.protos.feast.types.Value_pb2 import Value

    config, view = store.config, f"user_embeddings_{slot}"
    version = config.entity_key_serialization_version

    def entity(uid: str) -> EntityKey:
        return EntityKey(join_keys=["user_id"], entity_values=[Value(string_val=uid)])

    def key(uid: str) -> bytes:
        return serialize_entity_key(entity(uid), entity_key_serialization_version=version)

    if config.online_store.type == "redis":
        import redis
        from feast.infra.online_stores.redis import RedisOnlineStore, _mmh3, _redis_key

        nodes, kwargs = RedisOnlineStore._parse_connection_string(config.online_store.connection_string)
        client = redis.Redis(host=nodes[0]["host"], port=int(nodes[0]["port"]), **kwargs)
        fields = [_mmh3(f"{view}:{name}") for name in ("embedding", "model_version")]

        def prepare(ids):
            return [_redis_key(config.project, entity(u), entity_key_serialization_version=version) for u in ids]

        def read(keys):
            pipe = client.pipeline(transaction=False)
            for k in keys:
                pipe.hmget(k, fields)
            return pipe.execute()

        return prepare, read
    import sqlite3

    conn = sqlite3.connect(str(config.repo_path / config.online_store.path))
    table = f"{config.project}_{view}"

    def read(keys):
        marks = ",".join("?" * len(keys))
        sql = f"SELECT entity_key, feature_name, value FROM {table} WHERE entity_key IN ({marks}) AND feature_name IN ('embedding', 'model_version')"  # noqa: E501
        return conn.execute(sql, keys).fetchall()

    return (lambda ids: [key(u) for u in ids]), read


def http_reader(project, params, slot: str):
    """Start `feast serve` on a free port; return (post(ids), stop())."""
    from userlens import serving

    port = free_port()
    cmd, env = serving.serve_command(project, params, "127.0.0.1", port)
    proc = subprocess.Popen(cmd, env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)

    def post(ids):
        body = json.dumps({"feature_service": "user_embeddings", "entities": {"user_id": ids}})  # the stable name
        conn.request("POST", "/get-online-features", body, {"Content-Type": "application/json"})
        response = conn.getresponse()
        data = response.read()
        if response.status != 200:
            raise RuntimeError(f"feast serve answered {response.status}: {data[:300]!r}")
        return data

    deadline = time.monotonic() + 120
    while True:
        try:
            post(["warm-up"])
            break
        except (OSError, http.client.HTTPException):
            conn.close()
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError("feast serve did not start") from None
            time.sleep(0.5)

    def stop():
        conn.close()
        proc.terminate()
        proc.wait(timeout=30)

    return post, stop


def sqlite_write_order(store, project, params, slot: str) -> dict:
    """The served slot's rows written again into the other (empty) slot's table, in export order
    and in the order of their stored keys (what publish does), in one run: users/s of each; and
    sqlite's own floor for the same rows: copied by one INSERT ... SELECT (with Feast's upsert)
    from a table that already holds them, nothing bound from Python, nothing cut out."""
    import pyarrow.parquet as pq

    from userlens import feature_store
    from userlens.feast_values import encoded_columns
    from userlens.feature_sets import EMBEDDINGS
    from userlens.online_store import SqliteTable

    layout = feature_store.Layout.of(project.root / params.serving.repo)
    table = pq.read_table(layout.slot_parquet(slot))
    other = feature_store.SLOTS[1 - feature_store.SLOTS.index(slot)]

    class PlainInsert(SqliteTable):  # what an emptied slot table would allow: no conflict clause
        UPSERT = ""

    view = store.get_feature_view(f"user_embeddings_{other}")
    at, out = datetime.now(UTC), {}
    order = SqliteTable(store, view).write_order(table["user_id"])
    in_order = table if order is None else table.take(order)
    for name, rows, writer in (("export order", table, SqliteTable(store, view)),
                               ("key order", in_order, SqliteTable(store, view)),
                               ("key order plain insert", in_order, PlainInsert(store, view))):  # fmt: skip
        writer.conn.execute(f"DELETE FROM {writer.table}")
        writer.conn.commit()
        start = time.perf_counter()
        for first in range(0, rows.num_rows, 10_000):  # publish's chunk size
            writer.write(encoded_columns(writer.view, rows.slice(first, 10_000), EMBEDDINGS), at)
        out[f"sqlite_write_{name.replace(' ', '_')}_users_per_s"] = round(rows.num_rows / (time.perf_counter() - start))
    conn, table = writer.conn, writer.table
    conn.execute("CREATE TEMP TABLE written AS SELECT * FROM " + table)
    conn.execute(f"DELETE FROM {table}")
    conn.commit()
    start = time.perf_counter()
    with conn:  # WHERE 1: not sqlite's transfer shortcut, which copies whole records without an upsert
        conn.execute(f"INSERT INTO {table} SELECT * FROM written WHERE 1 {SqliteTable.UPSERT}")
    out["sqlite_write_engine_floor_users_per_s"] = round(rows.num_rows / (time.perf_counter() - start))
    conn.execute("DROP TABLE written")
    conn.execute(f"DELETE FROM {table}")
    conn.commit()
    return out


def worker(spec: str) -> None:
    import pyarrow.parquet as pq

    from userlens import feature_store, serving
    from userlens.embeddings import export_embeddings
    from userlens.io import list_vectors
    from userlens.project import Project

    cfg = json.loads(spec)
    users, dim = cfg["users"], cfg["dim"]
    project = Project(make_project(Path(cfg["root"]), cfg["store"], cfg.get("redis_url")))
    params = project.load_params()
    rng = np.random.default_rng(0)
    path = project.root / "export.parquet"
    if cfg.get("embeddings"):  # a real export's first users: its ids, its vectors
        real = pq.read_table(cfg["embeddings"]).slice(0, users)
        ids, dim = real["user_id"].to_pylist(), len(real["embedding"][0])
        result_dim = {"dim": dim, "users": len(ids)}
        chunks = (list_vectors(real["embedding"].slice(s, 100_000)) for s in range(0, len(ids), 100_000))
    else:
        ids = [f"user-{i:07d}" for i in rng.permutation(users)]  # an export's order is not its ids' order
        result_dim = {}
        chunks = (rng.standard_normal((min(100_000, users - s), dim), dtype=np.float32)
                  for s in range(0, users, 100_000))  # fmt: skip
    export_embeddings(path, ids, chunks, "bench-v1", datetime.now(UTC))
    users = len(ids)

    published = feature_store.publish(project, params, "bench-v1", path)
    result = {**cfg, **result_dim, "publish_s": published["seconds"], "users_per_s": published["users_per_s"],
              "index_build_s": published["index"]["build_s"], "index_wait_s": published["index_wait_s"],
              "index_probes": published["index"]["probes"], "stages_s": published["stages_s"]}  # fmt: skip
    result.pop("redis_url", None)
    slot = published["slot"]
    store = feature_store.open_store(feature_store.Layout.of(project.root / params.serving.repo), params.serving)
    if users <= COMPARE_UP_TO and cfg["store"] == "sqlite":  # the rows in export order vs in key order
        result.update(sqlite_write_order(store, project, params, slot))
    if users <= COMPARE_UP_TO:  # the same rows through write_to_online_store and materialize(), for the record
        layout = feature_store.Layout.of(project.root / params.serving.repo)
        frame = pq.read_table(layout.slot_parquet(slot)).to_pandas()
        start = time.perf_counter()
        for first in range(0, users, 10_000):  # publish's chunk size
            store.write_to_online_store(f"user_embeddings_{slot}", frame.iloc[first : first + 10_000])
        result["write_to_online_store_users_per_s"] = round(users / (time.perf_counter() - start), 1)
        del frame
        at = datetime.now(UTC)
        start = time.perf_counter()
        store.materialize(at - timedelta(days=1), at, feature_views=[f"user_embeddings_{slot}"])
        result["feast_materialize_users_per_s"] = round(users / (time.perf_counter() - start), 1)

    sdk = serving.reader(project, params)
    view = f"user_embeddings_{slot}"
    refs = [f"{view}:embedding", f"{view}:model_version"]
    prepare, raw = raw_reader(store, slot)
    post, stop = http_reader(project, params, slot)
    latency = {}
    try:
        for size, reps in BATCHES.items():
            batches = [[ids[i] for i in rng.choice(users, size, replace=False)] for _ in range(reps + 1)]
            keyed = [prepare(b) for b in batches]
            row = {
                "UserEmbeddings.get": timed(sdk.get, batches),
                "get_online_features": timed(
                    lambda b: store.get_online_features(features=refs, entity_rows={"user_id": b}).to_dict(), batches
                ),
                "feast serve (HTTP)": timed(post, batches),
                "raw store read": timed(raw, keyed),
            }
            floor = row["raw store read"]["p50_ms"]
            for name in list(row):
                row[name]["ratio_p50"] = round(row[name]["p50_ms"] / floor, 1) if floor else None
            latency[str(size)] = row
    finally:
        stop()
    emit({**result, "latency": latency})


def start_redis() -> tuple[subprocess.Popen, str]:
    binary = shutil.which("redis-server", path=f"{os.environ.get('PATH', '')}:/usr/sbin:/usr/bin")
    if binary is None:
        raise SystemExit("redis-server not found (Debian package redis-server); or run with --stores sqlite")
    port = free_port()
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
                            stdout=subprocess.DEVNULL)  # fmt: skip
    time.sleep(0.5)
    return proc, f"redis://127.0.0.1:{port}/0"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--dims", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--stores", nargs="+", choices=["sqlite", "redis"], default=["sqlite", "redis"])
    parser.add_argument("--embeddings", type=Path, help="publish a real export's first --users users (its ids "
                        "and vectors; --dims is then its width) instead of standard-normal vectors")  # fmt: skip
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker)
        return
    if args.embeddings and not args.embeddings.exists():
        raise SystemExit(f"{args.embeddings}: no such export")
    vectors = "trained" if args.embeddings else "gaussian"
    dims = [0] if args.embeddings else args.dims  # 0: the export's own width
    redis_proc, redis_url = start_redis() if "redis" in args.stores else (None, None)
    results = []
    try:
        for store in args.stores:
            for users in args.users:
                for dim in dims:
                    print(f"{store}: {users:,} users x {dim} ...", file=sys.stderr)
                    if redis_proc is not None:
                        import redis

                        redis.Redis.from_url(redis_url).flushall()
                    spec = {"store": store, "users": users, "dim": dim, "redis_url": redis_url,
                            "root": str(OUT / "feature-store-project"), "vectors": vectors,
                            "embeddings": str(args.embeddings.resolve()) if args.embeddings else None}  # fmt: skip
                    results.append(run_worker(Path(__file__).resolve(), json.dumps(spec)))
    finally:
        if redis_proc is not None:
            redis_proc.kill()
        shutil.rmtree(OUT / "feature-store-project", ignore_errors=True)
    OUT.mkdir(exist_ok=True)
    name = "feature_store.json" if vectors == "gaussian" else f"feature_store-{vectors}.json"
    (OUT / name).write_text(json.dumps({"machine": machine(), "results": results}, indent=2))
    print(f"Machine: {machine()}\n")
    print("| store | vectors | users | dim | publish s | users/s | index build s (beside the write) | of which "
          "waiting for the index s | users/s without that wait | write_to_online_store users/s | Feast materialize() "
          "users/s | peak MiB |")  # fmt: skip
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        write, feast = r.get("write_to_online_store_users_per_s"), r.get("feast_materialize_users_per_s")
        print(f"| {r['store']} | {r['vectors']} | {r['users']:,} | {r['dim']} | {r['publish_s']:.1f} | "
              f"{r['users_per_s']:,.0f} | "
              f"{r['index_build_s']:.1f} | {r['index_wait_s']:.1f} | "
              f"{r['users'] / (r['publish_s'] - r['index_wait_s']):,.0f} | "
              f"{f'{write:,.0f}' if write else 'n/a'} | {f'{feast:,.0f}' if feast else 'n/a'} | "
              f"{r['peak_rss_mib']:,.0f} |")  # fmt: skip
    steps = ["slot_table", "slot_parquet", "write_order", "online_write", "verify", "index_wait"]
    print("\nPublish by step, s (the index builds beside slot_parquet .. verify; index_wait: after them):\n")
    print("| store | vectors | users | " + " | ".join(steps) + " | rest | total | index build (probes) |")
    print("|---|---|---:|" + "---:|" * (len(steps) + 3))
    for r in results:
        split = [r["stages_s"].get(step, 0.0) for step in steps]
        print(f"| {r['store']} | {r['vectors']} | {r['users']:,} | " + " | ".join(f"{t:.1f}" for t in split)
              + f" | {r['publish_s'] - sum(split):.1f} | {r['publish_s']:.1f} | "
              f"{r['index_build_s']:.1f} ({r['index_probes']}) |")  # fmt: skip
    if ordered := [r for r in results if "sqlite_write_key_order_users_per_s" in r]:
        print("\nsqlite rows rewritten into an empty slot table, in one run (users/s):\n")
        print("| vectors | users | dim | in export order | in stored-key order (publish) | ratio | key order, plain "
              "INSERT | sqlite's floor (INSERT ... SELECT) | publish's writer / floor |\n"
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|")  # fmt: skip
        for r in ordered:
            slow, fast = r["sqlite_write_export_order_users_per_s"], r["sqlite_write_key_order_users_per_s"]
            plain = r["sqlite_write_key_order_plain_insert_users_per_s"]
            floor = r["sqlite_write_engine_floor_users_per_s"]
            print(f"| {r['vectors']} | {r['users']:,} | {r['dim']} | {slow:,} | {fast:,} | {fast / slow:.1f}x | "
                  f"{plain:,} | {floor:,} | {fast / floor:.2f} |")  # fmt: skip
    print("\n| store | vectors | users | dim | batch | path | p50 ms | p99 ms | p50 / floor |")
    print("|---|---|---:|---:|---:|---|---:|---:|---:|")
    for r in results:
        for size, row in r["latency"].items():
            for path, t in row.items():
                print(f"| {r['store']} | {r['vectors']} | {r['users']:,} | {r['dim']} | {size} | {path} | "
                      f"{t['p50_ms']:.2f} | {t['p99_ms']:.2f} | {t['ratio_p50']} |")  # fmt: skip


if __name__ == "__main__":
    main()
