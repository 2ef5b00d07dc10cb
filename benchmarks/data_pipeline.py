"""Data pipeline speed: ingest + validate + sequences against a bare polars floor.

For each dataset, in one run: the userlens stages (each timed; the whole in a fresh process
for its peak memory), once per Great Expectations engine (validation.engine: duckdb, GX's SQL
engine on in-memory DuckDB tables, and pandas), and, in another fresh process, the floor a
hand-written script would need at least: read the same raw interactions with polars, sort by
user and time, group into per-user lists. The ratio stages/floor is the figure. Every side
runs `--rounds` times, interleaved, and the table shows medians, so that all sides see the
same machine load.

    python benchmarks/data_pipeline.py                     # ML-100K (if present), synthetic 1M and 20M
    python benchmarks/data_pipeline.py --datasets synthetic-1m
    python benchmarks/data_pipeline.py --datasets synthetic-20m   # + each expectation timed on both engines

Writes benchmarks/out/data_pipeline.json and prints the Markdown table for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import OUT, REPO, emit, machine, run_worker, scratch_project  # noqa: E402

ML100K = REPO.parent / "shared" / "data" / "ml-100k"
ENGINES = ("duckdb", "pandas")  # validation.engine: the default first
# mean_events_per_user 100: 10k users -> ~1M, 200k users -> ~20M interactions
DATASETS = {
    "ml-100k": {"source": "movielens", "dataset": "ml-100k", "data_dir": str(ML100K)},
    "synthetic-1m": {
        "source": "synthetic",
        "dataset": "synthetic-1m",
        "synthetic": {"n_users": 10_000, "n_items": 5_000, "mean_events_per_user": 100},
    },
    "synthetic-20m": {
        "source": "synthetic",
        "dataset": "synthetic-20m",
        "synthetic": {"n_users": 200_000, "n_items": 50_000, "mean_events_per_user": 100},
    },
}


def make_project(root: Path, data: dict) -> Path:
    import yaml

    scratch_project(root)
    params = yaml.safe_load((root / "params.yaml").read_text())
    synthetic = data.pop("synthetic", {})
    params["data"].update(data)
    params["data"]["synthetic"].update(synthetic)
    params["dvc"]["push"] = False  # pushing copies the data again: not part of what is measured
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return root


def worker_fetch(project: Path) -> None:
    from userlens import stages
    from userlens.project import Project

    proj = Project(project)
    params = proj.load_params()
    start = time.perf_counter()
    stages.fetch_raw(proj, params, progress=False)
    fetched = time.perf_counter()
    stages.version_raw(proj, params)
    emit({"fetch_s": fetched - start, "dvc_add_s": time.perf_counter() - fetched})


def worker_stages(project: Path, engine: str) -> None:
    from userlens import stages
    from userlens.project import Project

    proj = Project(project)
    params = proj.load_params().with_overrides({"validation.engine": engine})
    import great_expectations  # noqa: F401  (import time is start-up, not validation work)

    timings = {}
    start = time.perf_counter()
    for name, fn in (
        ("ingest", stages.ingest),
        ("validate", stages.validate),
        ("sequences", stages.build_sequences),
    ):
        began = time.perf_counter()
        result = fn(proj, params)
        timings[f"{name}_s"] = time.perf_counter() - began
        if name == "ingest":
            timings["interactions"] = result["rows"]["interactions"]
    emit({**timings, "stages_s": time.perf_counter() - start})


def worker_expectations(project: Path, engine: str) -> None:
    """Each interactions expectation timed alone on one GX engine (after ingest): where validate's time goes."""
    from userlens import gx_engines, validation
    from userlens.project import Project
    from userlens.stages import load_canonical

    proj = Project(project)
    params = proj.load_params().validation
    tables, _ = load_canonical(proj)
    started = time.perf_counter()
    frame = validation._with_quarantine(validation._with_missing_items(tables.interactions, tables.items), tables,
                                        params)  # fmt: skip
    prepare_s = time.perf_counter() - started
    context = validation._context(Path(tempfile.mkdtemp()))
    started = time.perf_counter()
    runner = gx_engines.engine(engine, context, {"interactions": frame})
    batch, parameters = runner.batch("interactions")
    batch = batch.get_batch(batch_parameters=parameters)
    load_s = time.perf_counter() - started
    queries: list[str] = []
    if engine == "duckdb":  # every SQL statement GX sends, to count what one expectation costs
        from sqlalchemy import event
        from sqlalchemy.engine import Engine

        event.listen(Engine, "before_cursor_execute", lambda *a: queries.append(a[2]))  # every engine GX opens
    # (GROUP BY queries below: over the table, not GX's reflection of pg_catalog)
    timings = []
    for expectation in validation.interactions_expectations(params, tables.rating_scale, int(time.time()),
                                                            gx_engines.DIALECTS[engine]):  # fmt: skip
        queries.clear()
        began = time.perf_counter()
        batch.validate(expectation, result_format=validation.RESULT_FORMAT)
        column = getattr(expectation, "column", None) or ", ".join(getattr(expectation, "column_list", []))
        grouped = sum("GROUP BY" in q.upper() and "PG_" not in q.upper() for q in queries)
        timings.append({"expectation": expectation.expectation_type, "column": column,
                        "seconds": time.perf_counter() - began, "sql_queries": len(queries),
                        "group_by_queries": grouped})  # fmt: skip
    options = duplicate_check_options(runner, batch) if engine == "duckdb" else None
    runner.close()
    emit({"engine": engine, "rows": frame.height, "derived_columns_s": prepare_s, "load_s": load_s,
          "expectations": timings, "duplicate_check_options": options})  # fmt: skip


def duplicate_check_options(runner, batch) -> dict:
    """The duplicate check otherwise, on the same DuckDB table: the query of userlens' check run by
    DuckDB alone (the least that check costs, without GX around it); the exact four-column GROUP BY
    alone, without the hash pre-filter (what that query ran before); and GX's built-in
    ExpectCompoundColumnsToBeUnique, which userlens used before that (it joins every row back to
    its group's count, once per metric; timed only: on SQL it would miss copies without a rating)."""
    from userlens.gx_engines import _EVENT, DIALECTS, ExpectNoDuplicateEvents
    from userlens.validation import RESULT_FORMAT

    duck = runner.connection.driver_connection
    queries = {
        "query_alone_in_duckdb_s": ExpectNoDuplicateEvents().unexpected_rows_query.replace("{batch}", "interactions"),
        "exact_group_by_alone_in_duckdb_s": (
            f"SELECT {_EVENT}, count(*) FROM interactions GROUP BY ALL HAVING count(*) > 1"
        ),
    }
    timings = {name: [] for name in queries}
    for _ in range(3):  # alternated, medians: the two differ by less than this machine's noise
        for name, query in queries.items():
            began = time.perf_counter()
            duck.execute(f"SELECT count(*) FROM ({query})").fetchall()
            timings[name].append(time.perf_counter() - began)
    timings = {name: median(times) for name, times in timings.items()}
    began = time.perf_counter()
    compound, arguments = DIALECTS["pandas"].duplicate_events  # GX's built-in check, as the pandas engine runs it
    batch.validate(compound(**arguments), result_format=RESULT_FORMAT)
    return {**timings, "gx_compound_columns_unique_s": time.perf_counter() - began}


def worker_floor(project: Path, source: str) -> None:
    """Read + sort + group the raw interactions with polars, nothing else."""
    import polars as pl

    raw = project / "data" / "raw"
    start = time.perf_counter()
    if source == "movielens":
        frame = pl.read_csv(
            next(raw.glob("*/u.data")),
            separator="\t",
            has_header=False,
            new_columns=["user_id", "item_id", "rating", "timestamp"],
        )
    else:
        frame = pl.read_parquet(next(raw.glob("*/interactions.parquet")))
    grouped = (
        frame.sort(["user_id", "timestamp"], maintain_order=True)
        .group_by("user_id", maintain_order=True)
        .agg(pl.col("item_id"), pl.col("timestamp"), pl.col("rating"))
    )
    emit({"floor_s": time.perf_counter() - start, "floor_users": grouped.height})


def worker_output_io(project: Path, source: str) -> None:
    """The least Parquet I/O the stages' outputs cost, with polars' writer, on the raw
    interactions: write them once (data/canonical), read them back twice (validate and
    sequences each load them in their own process), write the per-user lists (the floor's
    grouping, as data/sequences holds them). What the stage design adds to the floor; with the
    stages' codec (polars' default, zstd) and, as the options, lz4 and no compression."""
    import polars as pl

    if source == "movielens":
        emit({"skipped": "movielens raw is text; the synthetic rows measure this"})
        return
    frame = pl.read_parquet(next((project / "data" / "raw").glob("*/interactions.parquet")))
    frame = frame.select("user_id", "item_id", "timestamp", "rating")
    timings = output_io(pl, frame, project, "zstd")
    options = {}
    for codec in ("lz4", "uncompressed"):
        other = output_io(pl, frame, project, codec)
        options[codec] = {"output_io_s": sum(v for k, v in other.items() if k.endswith("_s")), **other}
    sizes = {"zstd_files_mib": timings.pop("files_mib")}
    emit({**timings, "output_io_s": sum(timings.values()), **sizes, "codecs": options})


def output_io(pl, frame, project: Path, codec: str) -> dict:
    scratch = Path(tempfile.mkdtemp(dir=project))
    timings = {}
    began = time.perf_counter()
    frame.write_parquet(scratch / "interactions.parquet", compression=codec)
    timings["write_canonical_s"] = time.perf_counter() - began
    began = time.perf_counter()
    for _ in range(2):
        canonical = pl.read_parquet(scratch / "interactions.parquet")
    timings["read_canonical_twice_s"] = time.perf_counter() - began
    grouped = (
        canonical.sort(["user_id", "timestamp"], maintain_order=True)
        .group_by("user_id", maintain_order=True)
        .agg(pl.col("item_id"), pl.col("timestamp"), pl.col("rating"))
    )
    began = time.perf_counter()
    grouped.write_parquet(scratch / "sequences.parquet", compression=codec)
    timings["write_lists_s"] = time.perf_counter() - began
    files_mib = sum(f.stat().st_size for f in scratch.iterdir()) / 2**20
    shutil.rmtree(scratch)
    return {**timings, "files_mib": round(files_mib, 1)}


def measure(name: str, data: dict, workdir: Path, rounds: int, breakdown: bool = False) -> list[dict]:
    """Every side `rounds` times, interleaved (floor, output I/O, each engine; then again), each in
    a fresh process: on a shared machine one run of each can land in a slow minute that the
    others miss, so the table takes each side's median (peak memory: the largest)."""
    project = make_project(workdir / name, dict(data))
    script = Path(__file__).resolve()
    fetch = run_worker(script, "fetch", str(project))
    floors, outputs, pipelines = [], [], {engine: [] for engine in ENGINES}

    def run(kind: str, argument: str) -> dict:
        os.sync()  # the last worker's files written back first, not during this one's timing
        return run_worker(script, kind, str(project), argument)

    for _ in range(rounds):
        floors.append(run("floor", data["source"]))
        outputs.append(run("output_io", data["source"]))
        for engine in ENGINES:
            pipelines[engine].append(run("stages", engine))
    floor_s = median(f["floor_s"] for f in floors)
    output_io = {k: median(o[k] for o in outputs) for k in outputs[0] if k.endswith("_s")}
    if "codecs" in outputs[0]:
        output_io["codecs"] = {
            codec: {k: median(o["codecs"][codec][k] for o in outputs) for k in values}
            for codec, values in outputs[0]["codecs"].items()
        }
        output_io["zstd_files_mib"] = outputs[0]["zstd_files_mib"]
    rows = []
    for engine, runs in pipelines.items():
        stages = {k: median(r[k] for r in runs) for k in ("ingest_s", "validate_s", "sequences_s", "stages_s")}
        rows.append({
            "dataset": name,
            "engine": engine,
            "interactions": runs[0]["interactions"],
            **stages,
            "stages_peak_mib": max(r["peak_rss_mib"] for r in runs),
            "floor_s": floor_s,
            "floor_peak_mib": max(f["peak_rss_mib"] for f in floors),
            "output_io_s": output_io.get("output_io_s"),
            "output_io": output_io,
            "ratio": stages["stages_s"] / floor_s,
            "rounds": {"floor_s": [f["floor_s"] for f in floors], "stages_s": [r["stages_s"] for r in runs]},
            "fetch_s": fetch["fetch_s"],
            "dvc_add_s": fetch["dvc_add_s"],
        })  # fmt: skip
    if breakdown:
        rows[0]["expectations"] = {e: run_worker(script, "expectations", str(project), e) for e in ENGINES}
    return rows


def table(rows: list[dict]) -> str:
    lines = [
        "| dataset | GX engine | interactions | ingest s | validate s | sequences s | total s | peak MiB "
        "| floor s | floor peak MiB | total / floor |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['dataset']} | {r['engine']} | {r['interactions']:,} | {r['ingest_s']:.2f} | {r['validate_s']:.2f} | "
            f"{r['sequences_s']:.2f} | {r['stages_s']:.2f} | {r['stages_peak_mib']:,.0f} | {r['floor_s']:.2f} | "
            f"{r['floor_peak_mib']:,.0f} | {r['ratio']:.1f}x |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", default=",".join(DATASETS), help="comma-separated: " + ", ".join(DATASETS))
    parser.add_argument(
        "--breakdown",
        default="synthetic-20m",
        help="the dataset whose interactions expectations are also timed one by one (none: skip)",
    )
    parser.add_argument(
        "--rounds", type=int, default=3, help="interleaved runs of every side; the table shows medians (default 3)"
    )
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        kind, project, *rest = args.worker
        workers = {"fetch": worker_fetch, "stages": worker_stages, "floor": worker_floor,
                   "expectations": worker_expectations, "output_io": worker_output_io}  # fmt: skip
        workers[kind](Path(project), *rest)
        return
    rows = []
    with tempfile.TemporaryDirectory(prefix="userlens-bench-") as tmp:
        for name in args.datasets.split(","):
            if name == "ml-100k" and not (ML100K / "u.data").exists():
                print(f"skipping ml-100k: not found at {ML100K}", file=sys.stderr)
                continue
            print(f"measuring {name} ...", file=sys.stderr)
            rows += measure(name, DATASETS[name], Path(tmp), args.rounds, breakdown=name == args.breakdown)
    OUT.mkdir(exist_ok=True)
    result = {"machine": machine(), "rows": rows}
    (OUT / "data_pipeline.json").write_text(json.dumps(result, indent=2))
    print(f"Machine: {result['machine']}\n")
    print(table(rows))
    for r in rows:
        for engine, b in r.get("expectations", {}).items():
            print(
                f"\n{r['dataset']}, GX engine {engine}: derived columns {b['derived_columns_s']:.2f} s, "
                f"tables ready for GX {b['load_s']:.2f} s; each interactions expectation alone:\n"
            )
            print("| expectation | column(s) | s | SQL queries (GROUP BY) |\n|---|---|---:|---:|")
            for e in b["expectations"]:
                sql = f"{e['sql_queries']} ({e['group_by_queries']})" if engine == "duckdb" else "-"
                print(f"| {e['expectation']} | {e['column']} | {e['seconds']:.2f} | {sql} |")
            if options := b.get("duplicate_check_options"):
                print(
                    "\nThe duplicate check otherwise, same table (s): "
                    + ", ".join(f"{k.removesuffix('_s').replace('_', ' ')} {v:.2f}" for k, v in options.items())
                )
    for r in rows:
        if r["engine"] == ENGINES[0] and (codecs := r["output_io"].get("codecs")):
            io = r["output_io"]
            print(
                f"\n{r['dataset']}, the stage outputs' Parquet I/O (s; files MiB): zstd, the stages' codec, "
                f"{io['output_io_s']:.2f} ({io['zstd_files_mib']:,.0f} MiB); "
                + "; ".join(f"{c} {v['output_io_s']:.2f} ({v['files_mib']:,.0f} MiB)" for c, v in codecs.items())
            )
    print(
        "\nSetup, not in the totals (s): "
        + ", ".join(
            f"{r['dataset']} fetch {r['fetch_s']:.1f} + dvc add {r['dvc_add_s']:.1f}"
            for r in rows
            if r["engine"] == ENGINES[0]
        )
    )


if __name__ == "__main__":
    main()
