"""Faults, as one suite (issue 13): each test injects one fault into real userlens processes and
asserts that nothing is lost and that production is still served bit for bit.

One prepared project per module (sequences built, a tiny Barlow Twins model trained with the CLI,
registered, promoted and published to the sqlite online store, a second version registered beside
it), copied per test. Kills are real SIGKILLs of `userlens` CLI processes started in their own
session, at points a test can see: a checkpoint file appearing, or, where the work between two
visible files takes milliseconds, a named point of the fault seam (src/userlens/faults.py) that
holds the process until the test has killed it or done its concurrent part.

Before each fault the test records the production fingerprint: what a client is served (every
user's vector, found flag and version through serving.UserEmbeddings, and through Feast's
get_online_features on the stable feature service `user_embeddings`), the production alias and
the bytes of the production version's registry files. After the fault it counts the bytes that
differ. With $USERLENS_FAULT_LOG set (benchmarks/faults.py), each test appends one JSON line
{fault, injected, recovered, production_bytes_changed} to that file.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from conftest import build_sequences_project, set_params

pytestmark = pytest.mark.integration

FAULT_LOG = "USERLENS_FAULT_LOG"
PRETRAIN = {"steps": 6, "eval_every": 3}  # two rounds: a checkpoint, then a round to be killed in
SECOND = "barlow_twins-second"  # a second registered version (the first one's encoder, other vectors)


# --- the prepared project -------------------------------------------------------------------------


@dataclass
class Prepared:
    root: Path
    v1: str  # production, served
    v2: str  # registered, not served
    user_ids: list[str]
    v1_vectors: np.ndarray
    v2_vectors: np.ndarray


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Prepared:
    from userlens import release
    from userlens.embeddings import export_embeddings, read_embeddings
    from userlens.io import read_json
    from userlens.project import Project
    from userlens.registry import Registry
    from userlens.train import ENCODER

    root = build_sequences_project(tmp_path_factory.mktemp("faults") / "prepared")
    # No grace period: these stores are read by userlens, which follows the pointer.
    set_params(root, {"pretrain": PRETRAIN, "serving": {"retire_grace_s": 0}})
    cli_ok(root, "pretrain", "--no-progress")
    project = Project(root)
    params = project.load_params()
    model_dir = project.model_dir("barlow_twins")
    manifest = read_json(model_dir / "manifest.json")
    v1 = manifest["model_version"]
    ids, v1_vectors = read_embeddings(project.embeddings_dir / "barlow_twins.parquet")
    registry = Registry(project)
    common = {"checkpoint": model_dir / ENCODER, "params": params, "raw_dvc_hash": manifest["raw_dvc_hash"],
              "git_revision": None, "files": {"items.parquet": project.sequences_dir / "items.parquet"},
              "extra": {"dataset": params.data.dataset}}  # fmt: skip
    registry.register(v1, embeddings=project.embeddings_dir / "barlow_twins.parquet", metrics={}, **common)
    v2_vectors = (v1_vectors + np.float32(0.5)).astype(np.float32)
    second = root / "second.parquet"
    export_embeddings(second, ids, [v2_vectors], SECOND, datetime.now(UTC))
    registry.register(SECOND, embeddings=second, metrics={}, **common)
    second.unlink()
    assert release.promote(project, params, v1, force=True)["promoted"]
    return Prepared(root, v1, SECOND, ids, v1_vectors, v2_vectors)


@pytest.fixture
def project(prepared, tmp_path) -> Path:
    """A copy of the prepared project, for one fault: its slot records name the copy's online
    store, as if it had been published here (a slot is reused only on the store it was written to)."""
    copy = Path(shutil.copytree(prepared.root, tmp_path / "project", symlinks=True))
    for record in (copy / "data/feast/slots").glob("*.json"):
        record.write_text(record.read_text().replace(str(prepared.root.resolve()), str(copy.resolve())))
    return copy


# --- processes ------------------------------------------------------------------------------------


def cli(project: Path, *args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "userlens", "--project", str(project), *args]
    env = {**os.environ, **(env or {})}
    return subprocess.run(command, cwd=project, capture_output=True, text=True, env=env, timeout=timeout)


def cli_ok(project: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    done = cli(project, *args, env=env)
    assert done.returncode == 0, f"userlens {' '.join(args)} failed ({done.returncode}):\n{done.stderr[-3000:]}"
    return done


def clear_error(done: subprocess.CompletedProcess, *needles: str) -> str:
    """A failure reported as one `error:` line (no traceback) holding every needle; returns the line."""
    assert done.returncode not in (0, None), done.stdout[-2000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, done.stderr[-3000:]
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


class Started:
    """A `userlens` CLI process in its own session (killed whole with os.killpg), output in files."""

    def __init__(self, project: Path, *args: str, fault: str | None = None, env: dict | None = None):
        self.folder = project.parent / f"run-{time.monotonic_ns()}"
        self.folder.mkdir()
        self.marker = self.folder / "fault-reached"
        extra = {"USERLENS_FAULT_AT": fault, "USERLENS_FAULT_MARKER": str(self.marker)} if fault else {}
        self.out, self.err = open(self.folder / "stdout", "w"), open(self.folder / "stderr", "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "userlens", "--project", str(project), *args],
                                     cwd=project, stdout=self.out, stderr=self.err, start_new_session=True,
                                     env={**os.environ, **(env or {}), **extra})  # fmt: skip

    @property
    def stderr(self) -> str:
        return (self.folder / "stderr").read_text()

    def wait_for(self, condition, what: str, timeout: float = 240) -> None:
        """Poll `condition()` until it holds; fail if the process ends first."""
        deadline = time.monotonic() + timeout
        while not condition():
            if self.proc.poll() is not None:
                pytest.fail(f"the process ended ({self.proc.returncode}) before {what}:\n{self.stderr[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"no {what} after {timeout} s:\n{self.stderr[-3000:]}")
            time.sleep(0.01)

    def at_fault_point(self) -> None:
        self.wait_for(self.marker.exists, "the fault point")

    def release(self) -> None:
        self.marker.unlink()

    def kill(self) -> bool:
        """SIGKILL the whole session; True when it died of it (it was still running)."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        return self.proc.returncode == -signal.SIGKILL

    def finish(self, timeout: float = 300) -> subprocess.CompletedProcess:
        self.proc.wait(timeout=timeout)
        self.out.close(), self.err.close()
        stdout = (self.folder / "stdout").read_text()
        return subprocess.CompletedProcess(self.proc.args, self.proc.returncode, stdout, self.stderr)

    def close(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.out.close(), self.err.close()


@pytest.fixture
def started():
    """Start userlens processes; every one still running is killed afterwards."""
    runs: list[Started] = []

    def start(*args, **kwargs) -> Started:
        runs.append(Started(*args, **kwargs))
        return runs[-1]

    try:
        yield start
    finally:
        for run in runs:
            run.close()


# --- the production fingerprint ---------------------------------------------------------------------


def fingerprint(project: Path, user_ids: list[str]) -> dict[str, bytes]:
    """What production is: the bytes served to clients, the production alias and its registry files."""
    from userlens import feature_store, serving
    from userlens.project import Project

    proj = Project(project)
    params = proj.load_params()
    parts = {}
    vectors, found, version = serving.reader(proj, params, "none").get(user_ids)
    parts["served"] = version.encode() + found.tobytes() + vectors.tobytes()
    store = feature_store.open_store(feature_store.Layout.of(project / params.serving.repo), params.serving)
    got = store.get_online_features(features=store.get_feature_service("user_embeddings"),
                                    entity_rows=[{"user_id": u} for u in user_ids]).to_dict()  # fmt: skip
    parts["feast"] = json.dumps(got["model_version"]).encode() + b"".join(
        np.asarray(v if v is not None else [], np.float32).tobytes() for v in got["embedding"]
    )
    alias = json.loads((proj.registry_dir / "production.json").read_text())["version"]
    parts["alias"] = alias.encode()
    for path in sorted((proj.registry_dir / "versions" / alias).iterdir()):
        parts[f"registry/{path.name}"] = path.read_bytes()
    return parts


def bytes_changed(before: dict[str, bytes], after: dict[str, bytes]) -> int:
    """Bytes that differ, position by position, plus any difference in length (a part gone: all of it)."""
    total = 0
    for key in before.keys() | after.keys():
        a = np.frombuffer(before.get(key, b""), np.uint8)
        b = np.frombuffer(after.get(key, b""), np.uint8)
        n = min(len(a), len(b))
        total += int((a[:n] != b[:n]).sum()) + abs(len(a) - len(b))
    return total


def record(fault: str, injected: bool, recovered: bool, changed: int, **extra) -> None:
    """One line for benchmarks/faults.py (when it runs the suite)."""
    if path := os.environ.get(FAULT_LOG):
        line = {"fault": fault, "injected": injected, "recovered": recovered, "production_bytes_changed": changed}
        with open(path, "a") as fh:
            fh.write(json.dumps({**line, **extra}) + "\n")


def served(project: Path, user_ids: list[str]) -> tuple[np.ndarray, np.ndarray, str]:
    from userlens import serving
    from userlens.project import Project

    proj = Project(project)
    return serving.reader(proj, proj.load_params(), "none").get(user_ids)


def pointer(project: Path, name: str = "serving.json") -> dict:
    return json.loads((project / "data/feast" / name).read_text())


def service_slot(project: Path) -> str:
    """The slot the stable feature service `user_embeddings` names, as a fresh Feast client sees it."""
    from feast import FeatureStore

    store = FeatureStore(repo_path=str(project / "feature_repo"))
    (view,) = [p.name for p in store.get_feature_service("user_embeddings").feature_view_projections]
    return view.rsplit("_", 1)[1]


def embeddings_of(path: Path) -> tuple[list[str], np.ndarray, set[str]]:
    from userlens.embeddings import read_embeddings

    ids, vectors = read_embeddings(path)
    return ids, vectors, set(pl.read_parquet(path, columns=["model_version"])["model_version"].unique())


# --- training: SIGKILL during pretraining and during export, a damaged checkpoint ------------------


def test_pretraining_killed_after_a_checkpoint_resumes_to_the_uninterrupted_result(prepared, project, started):
    models, export = project / "data/models/barlow_twins", project / "data/embeddings/barlow_twins.parquet"
    shutil.rmtree(models)
    export.unlink()
    before = fingerprint(project, prepared.user_ids)
    run = started(project, "pretrain", "--no-progress")
    run.wait_for((models / "checkpoint.pt").exists, "the first checkpoint")
    injected = run.kill()  # in the second round: its checkpoint, the export are still to come
    after = fingerprint(project, prepared.user_ids)
    resumed = cli(project, "-v", "pretrain", "--no-progress")
    ids, vectors, versions = embeddings_of(export)
    recovered = resumed.returncode == 0 and vectors.tobytes() == prepared.v1_vectors.tobytes()
    record("SIGKILL during pretraining", injected, recovered, bytes_changed(before, after))
    assert injected, "pretraining ended before it could be killed"
    assert bytes_changed(before, after) == 0
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming after step 3" in resumed.stderr
    assert ids == prepared.user_ids and versions == {prepared.v1}
    assert vectors.tobytes() == prepared.v1_vectors.tobytes()  # bit for bit the uninterrupted run's
    assert bytes_changed(before, fingerprint(project, prepared.user_ids)) == 0


def test_a_kill_during_the_export_leaves_the_previous_export_whole(prepared, project, started):
    export = project / "data/embeddings/barlow_twins.parquet"
    previous = export.read_bytes()
    before = fingerprint(project, prepared.user_ids)
    run = started(project, "pretrain", "--no-progress", fault="export")
    run.at_fault_point()  # the export's first row group is in its temporary file
    leftovers = list(export.parent.glob(".barlow_twins.parquet.*.tmp"))
    injected = run.kill() and len(leftovers) == 1
    after = fingerprint(project, prepared.user_ids)
    kept = export.read_bytes() == previous
    again = cli(project, "pretrain", "--no-progress")
    ids, vectors, versions = embeddings_of(export)
    recovered = again.returncode == 0 and vectors.tobytes() == prepared.v1_vectors.tobytes()
    record("SIGKILL during export", injected, recovered, bytes_changed(before, after))
    assert injected and kept  # the half-written file was never renamed over the complete one
    assert bytes_changed(before, after) == 0
    assert again.returncode == 0, again.stderr[-3000:]
    assert ids == prepared.user_ids and versions == {prepared.v1} and recovered


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_a_damaged_checkpoint_is_set_aside_and_training_restarts_from_step_0(prepared, project, damage):
    """The safe restart: the run is seeded, so it ends where an uninterrupted one does."""
    checkpoint = project / "data/models/barlow_twins/checkpoint.pt"
    good = checkpoint.read_bytes()
    bad = np.random.default_rng(0).bytes(len(good)) if damage == "garbage" else good[: len(good) // 2]
    checkpoint.write_bytes(bad)
    before = fingerprint(project, prepared.user_ids)
    done = cli(project, "-v", "pretrain", "--no-progress")
    _, vectors, versions = embeddings_of(project / "data/embeddings/barlow_twins.parquet")
    recovered = done.returncode == 0 and vectors.tobytes() == prepared.v1_vectors.tobytes()
    changed = bytes_changed(before, fingerprint(project, prepared.user_ids))
    record(f"damaged checkpoint ({damage})", True, recovered, changed)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert f"{checkpoint} is unreadable" in done.stderr and "training again from step 0" in done.stderr
    assert "resuming" not in done.stderr
    assert (checkpoint.parent / "checkpoint.pt.unreadable").read_bytes() == bad  # kept, not resumed
    assert versions == {prepared.v1} and vectors.tobytes() == prepared.v1_vectors.tobytes()
    assert changed == 0


# --- publishing: SIGKILL mid-publish and mid-cut-over, two runs at once ------------------------------


def test_a_kill_during_publish_keeps_the_old_version_served_and_the_next_publish_succeeds(prepared, project, started):
    before = fingerprint(project, prepared.user_ids)
    live = pointer(project)["slot"]
    run = started(project, "promote", prepared.v2, "--force", "--no-progress", fault="publish.chunk")
    run.at_fault_point()  # the new version's rows are in the standby slot, nothing is cut over
    injected = run.kill()
    after = fingerprint(project, prepared.user_ids)
    assert pointer(project)["slot"] == live and service_slot(project) == live
    again = cli(project, "promote", prepared.v2, "--force", "--no-progress")
    vectors, found, version = served(project, prepared.user_ids)
    recovered = again.returncode == 0 and version == prepared.v2 and vectors.tobytes() == prepared.v2_vectors.tobytes()
    record("SIGKILL during publish", injected, recovered, bytes_changed(before, after))
    assert injected and bytes_changed(before, after) == 0
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"{prepared.v2} is in production" in again.stdout
    assert found.all() and recovered
    assert service_slot(project) == pointer(project)["slot"] != live


def test_a_kill_inside_the_cut_over_is_repaired_by_the_next_publish(prepared, project, started):
    """Between the stable feature service's move and the pointer's rename (one Feast registry
    write): userlens readers and the alias stay on the old version, the feature service is ahead
    on the new, complete slot until the next publish points it back (its `feast apply` of
    feature_repo/definitions.py puts the stable service on the pointer's slot)."""
    before = fingerprint(project, prepared.user_ids)
    live = pointer(project)["slot"]
    run = started(project, "promote", prepared.v2, "--force", "--no-progress", fault="publish.cut_over")
    run.at_fault_point()
    injected = run.kill()
    after = fingerprint(project, prepared.user_ids)
    userlens_side = {k: v for k, v in after.items() if k != "feast"}
    ahead = service_slot(project) != live
    again = cli(project, "materialize", "--no-progress")  # the production version, again
    final = fingerprint(project, prepared.user_ids)
    recovered = again.returncode == 0 and bytes_changed(before, final) == 0
    repaired = bytes_changed(before, final)
    record("SIGKILL inside the cut-over (service moved, pointer not)", injected, recovered,
           bytes_changed(before, after), served_ahead=True, repaired_bytes_changed=repaired)  # fmt: skip
    assert injected
    assert bytes_changed({k: v for k, v in before.items() if k != "feast"}, userlens_side) == 0
    assert ahead  # the window: Feast clients of the stable name see the new, verified slot
    assert again.returncode == 0, again.stderr[-3000:]
    assert recovered and service_slot(project) == pointer(project)["slot"]


def test_two_runs_at_once_the_second_is_refused_naming_the_lock(prepared, project, started):
    before = fingerprint(project, prepared.user_ids)
    first = started(project, "promote", prepared.v2, "--force", "--no-progress", fault="publish.chunk")
    first.at_fault_point()  # holds data/.userlens.lock, half-way through its publish
    second = cli(project, "materialize", "--no-progress")
    third = cli(project, "promote", prepared.v2, "--force", "--no-progress")
    during = fingerprint(project, prepared.user_ids)
    first.release()
    done = first.finish()
    vectors, _, version = served(project, prepared.user_ids)
    recovered = done.returncode == 0 and version == prepared.v2 and vectors.tobytes() == prepared.v2_vectors.tobytes()
    record("two runs at once", True, recovered, bytes_changed(before, during))
    for refused in (second, third):
        clear_error(refused, "another userlens run", f"pid {first.proc.pid}", "data/.userlens.lock", "wait for it")
    assert bytes_changed(before, during) == 0
    assert done.returncode == 0, done.stderr[-3000:]
    assert recovered and json.loads((project / "data/registry/production.json").read_text())["version"] == prepared.v2


def test_a_refresh_during_a_training_run_succeeds_and_serves_the_refreshed_rows(prepared, project, started):
    """A scheduled refresh (materialize --incremental) while a new candidate trains and exports:
    both succeed; production is the refreshed version, whole, and nothing of the candidate."""
    from userlens.embeddings import export_embeddings

    refreshed = prepared.v1_vectors.copy()
    refreshed[:10] += np.float32(1.0)  # ten users with new events
    reexport = project / "data/embeddings/production.parquet"
    export_embeddings(reexport, prepared.user_ids, [refreshed], prepared.v1, datetime.now(UTC))
    before = fingerprint(project, prepared.user_ids)
    training = started(project, "--set", "pretrain.seed=7", "pretrain", "--no-progress", fault="export")
    training.at_fault_point()  # trained, half-way through exporting the new candidate
    refresh = cli(project, "materialize", "--incremental", "--embeddings", str(reexport), "--no-progress")
    training.release()
    trained = training.finish()
    vectors, found, version = served(project, prepared.user_ids)
    after = fingerprint(project, prepared.user_ids)
    n = len(refreshed)
    expected = {**before, "served": prepared.v1.encode() + np.ones(n, bool).tobytes() + refreshed.tobytes(),
                "feast": json.dumps([prepared.v1] * n).encode() + refreshed.tobytes()}  # fmt: skip
    changed = bytes_changed(expected, after)  # production: exactly the refreshed rows, the same alias and files
    _, candidate, candidate_versions = embeddings_of(project / "data/embeddings/barlow_twins.parquet")
    recovered = refresh.returncode == 0 and trained.returncode == 0
    record("a refresh during a training run", True, recovered, changed)
    assert refresh.returncode == 0, refresh.stderr[-3000:]
    assert "10 users changed" in refresh.stdout
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert version == prepared.v1 and found.all() and vectors.tobytes() == refreshed.tobytes()
    assert changed == 0  # to userlens readers and Feast clients; alias and registry untouched
    assert prepared.v1 not in candidate_versions and candidate.tobytes() != refreshed.tobytes()


def test_a_kill_during_a_refresh_loses_no_update(prepared, project, started):
    """Killed after the changed rows went into the slot Parquet, before the online write: served
    as before; the next refresh finds nothing changed against that Parquet, yet writes them."""
    from userlens.embeddings import export_embeddings

    refreshed = prepared.v1_vectors.copy()
    refreshed[-5:] -= np.float32(1.0)
    reexport = project / "data/embeddings/production.parquet"
    export_embeddings(reexport, prepared.user_ids, [refreshed], prepared.v1, datetime.now(UTC))
    before = fingerprint(project, prepared.user_ids)
    args = ("materialize", "--incremental", "--embeddings", str(reexport), "--no-progress")
    run = started(project, *args, fault="refresh.written")
    run.at_fault_point()
    injected = run.kill()
    after = fingerprint(project, prepared.user_ids)
    again = cli(project, *args)
    vectors, found, version = served(project, prepared.user_ids)
    recovered = again.returncode == 0 and version == prepared.v1 and vectors.tobytes() == refreshed.tobytes()
    record("SIGKILL during a refresh", injected, recovered, bytes_changed(before, after))
    assert injected and bytes_changed(before, after) == 0
    assert again.returncode == 0, again.stderr[-3000:]
    assert "0 users changed" in again.stdout  # the Parquet already has them ...
    assert found.all() and recovered  # ... and the online store now too


# --- registry: SIGKILL during its writes, a truncated file ------------------------------------------


def new_candidate(project: Path, version: str) -> None:
    """The trained candidate under another version name, with the metrics and gate decision
    `userlens register` reads (as evaluate and gate would leave them)."""
    from userlens.embeddings import export_embeddings
    from userlens.io import write_json_atomic

    models = project / "data/models/barlow_twins"
    manifest = json.loads((models / "manifest.json").read_text())
    write_json_atomic(models / "manifest.json", {**manifest, "model_version": version})
    export = project / "data/embeddings/barlow_twins.parquet"
    ids, vectors, _ = embeddings_of(export)
    export_embeddings(export, ids, [vectors], version, datetime.now(UTC))
    write_json_atomic(project / "reports/metrics.json", {})
    write_json_atomic(project / "reports/gate.json", {"model_version": version, "passed": False,
                                                       "reasons": ["a test candidate"]})  # fmt: skip


def test_a_kill_during_register_leaves_the_registry_readable(prepared, project, started):
    new_candidate(project, "barlow_twins-third")
    before = fingerprint(project, prepared.user_ids)
    run = started(project, "register", fault="registry.register")
    run.at_fault_point()  # the version's staging folder holds its encoder only
    staging = [p.name for p in (project / "data/registry/versions").iterdir() if p.name.startswith(".")]
    injected = run.kill() and len(staging) == 1
    after = fingerprint(project, prepared.user_ids)
    models = json.loads(cli_ok(project, "models", "--json").stdout)
    again = cli(project, "register")
    listed = json.loads(cli_ok(project, "models", "--json").stdout)
    recovered = again.returncode == 0 and "barlow_twins-third" in [m["version"] for m in listed]
    record("SIGKILL during a registry write (register)", injected, recovered, bytes_changed(before, after))
    assert injected and bytes_changed(before, after) == 0
    assert sorted(m["version"] for m in models) == sorted([prepared.v1, prepared.v2])  # no half version
    assert [m["version"] for m in models if m["production"]] == [prepared.v1]
    assert again.returncode == 0, again.stderr[-3000:]
    assert recovered and [m["version"] for m in listed if m["production"]] == [prepared.v1]
    files = {p.name for p in (project / "data/registry/versions/barlow_twins-third").iterdir()}
    assert {"encoder.pt", "embeddings.parquet", "manifest.json", "metrics.json", "params.yaml"} <= files
    assert bytes_changed(before, fingerprint(project, prepared.user_ids)) == 0


def test_a_kill_during_the_alias_write_keeps_the_alias_and_the_next_promote_completes(prepared, project, started):
    """Publish, then alias: the kill falls after a complete publish, so the store is ahead of the
    alias (the documented crash state); the alias and the registry are intact and readable."""
    alias = project / "data/registry/production.json"
    alias_bytes = alias.read_bytes()
    before = fingerprint(project, prepared.user_ids)
    run = started(project, "promote", prepared.v2, "--force", "--no-progress", fault="registry.alias")
    run.at_fault_point()  # the new alias is in its temporary file, not yet renamed
    injected = run.kill()
    alias_kept = alias.read_bytes() == alias_bytes
    after = fingerprint(project, prepared.user_ids)
    registry_part = {k: v for k, v in after.items() if k not in ("served", "feast")}
    ahead = served(project, prepared.user_ids)[2]
    models = json.loads(cli_ok(project, "models", "--json").stdout)
    again = cli(project, "promote", prepared.v2, "--force", "--no-progress")
    vectors, _, version = served(project, prepared.user_ids)
    recovered = again.returncode == 0 and version == prepared.v2 and vectors.tobytes() == prepared.v2_vectors.tobytes()
    changed = bytes_changed({k: v for k, v in before.items() if k not in ("served", "feast")}, registry_part)
    record("SIGKILL during a registry write (production alias)", injected, recovered, bytes_changed(before, after),
           served_ahead=True, registry_bytes_changed=changed)  # fmt: skip
    assert injected and alias_kept and changed == 0
    assert list(alias.parent.glob(".production.json.*.tmp"))  # the unrenamed write, ignored by readers
    assert [m["version"] for m in models if m["production"]] == [prepared.v1]
    assert ahead == prepared.v2  # published before the kill
    assert again.returncode == 0, again.stderr[-3000:]
    assert recovered and json.loads(alias.read_text())["version"] == prepared.v2


@pytest.mark.parametrize("damaged", ["production.json", "manifest.json"])
def test_a_truncated_registry_file_is_named_and_production_is_still_served(prepared, project, damaged):
    path = (project / "data/registry" / damaged if damaged == "production.json"
            else project / "data/registry/versions" / prepared.v1 / damaged)  # fmt: skip
    good = path.read_bytes()
    before = fingerprint(project, prepared.user_ids)
    path.write_bytes(good[: len(good) // 2])
    models = cli(project, "models")
    promote = cli(project, "promote", prepared.v2, "--force", "--no-progress")
    lookup = cli(project, "lookup", prepared.user_ids[3], "--json")
    still = fingerprint_served(project, prepared.user_ids)
    clear_error(models, str(path), "damaged", "restore it")
    clear_error(promote, str(path))  # refused before it published anything
    assert lookup.returncode == 0, lookup.stderr[-3000:]
    answer = json.loads(lookup.stdout)
    assert answer["model_version"] == prepared.v1
    assert np.array(answer["users"][0]["embedding"], np.float32).tobytes() == prepared.v1_vectors[3].tobytes()
    assert bytes_changed({k: before[k] for k in still}, still) == 0  # served as before, from the online store
    if damaged == "production.json":  # the fix the message names: remove it, promote the served version
        path.unlink()
        fixed = cli(project, "promote", prepared.v1, "--force", "--no-progress")
    else:  # restore it from a backup
        path.write_bytes(good)
        fixed = cli(project, "models")
    changed = bytes_changed(before, fingerprint(project, prepared.user_ids))
    record(f"truncated registry file ({damaged})", True, fixed.returncode == 0, changed)
    assert fixed.returncode == 0, fixed.stderr[-3000:]
    assert changed == 0


def fingerprint_served(project: Path, user_ids: list[str]) -> dict[str, bytes]:
    """The served part of the fingerprint alone (readable while the registry is not)."""
    vectors, found, version = served(project, user_ids)
    return {"served": version.encode() + found.tobytes() + vectors.tobytes()}


# --- the online store: a missing sqlite file, Redis going away mid-publish ---------------------------


@pytest.mark.parametrize("recreate", [["materialize"], ["materialize", "--incremental"]])
def test_a_missing_online_store_file_is_reported_and_recreated_without_the_registry(prepared, project, recreate):
    """A publish (into the standby slot) or a refresh (of the served slot) writes it again; a
    second publish flips back to the slot whose record says it holds the version, and finds it
    is not in the new file: it writes it again too, instead of failing its read-back."""
    before = fingerprint(project, prepared.user_ids)
    registry_files = {p: p.read_bytes() for p in (project / "data/registry").rglob("*") if p.is_file()}
    database = project / "data/feast/online.db"
    database.unlink()
    lookup = cli(project, "lookup", prepared.user_ids[0])
    again = cli(project, *recreate, "--no-progress")
    if again.returncode == 0 and recreate == ["materialize"]:
        again = cli(project, *recreate, "--no-progress")  # into the first slot again: its record is stale
        assert "writing it again" in again.stderr, again.stderr[-3000:]
    after = fingerprint(project, prepared.user_ids)
    registry_after = {p: p.read_bytes() for p in (project / "data/registry").rglob("*") if p.is_file()}
    record(f"missing online-store file (recreated by {' '.join(recreate)})", True, again.returncode == 0,
           bytes_changed(before, after))  # fmt: skip
    clear_error(lookup, str(database), "missing", "userlens materialize")
    assert again.returncode == 0, again.stderr[-3000:]
    assert database.exists() and bytes_changed(before, after) == 0
    assert registry_after == registry_files  # the registry was not touched


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RedisServer:
    """A real redis-server on a loopback port with an append-only file (fsync on every write), so a
    SIGKILL loses nothing and a restart on the same port and folder serves the same data."""

    def __init__(self, folder: Path):
        self.binary = shutil.which("redis-server", path=f"{os.environ.get('PATH', '')}:/usr/sbin:/usr/bin")
        if self.binary is None:
            if os.environ.get("CI"):
                pytest.fail("redis-server is not installed; .ci/run installs it (apt-get install redis-server)")
            pytest.skip("redis-server is not installed (Debian package redis-server); CI installs it")
        self.folder, self.port, self.proc = folder, free_port(), None
        folder.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        import redis

        self.proc = subprocess.Popen([self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir",
                                      str(self.folder), "--save", "", "--appendonly", "yes", "--appendfsync",
                                      "always"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        client, deadline = redis.Redis(port=self.port), time.monotonic() + 30
        while True:
            try:
                if client.ping():
                    return
            except (redis.ConnectionError, redis.BusyLoadingError):
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise
                time.sleep(0.02)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.kill()


@pytest.fixture
def redis_server(tmp_path):
    server = RedisServer(tmp_path / "redis")
    try:
        yield server
    finally:
        server.close()


@pytest.mark.parametrize("redis_returns", ["after the failure", "during the retries"])
def test_redis_going_away_mid_publish(prepared, project, redis_server, started, redis_returns):
    """Killed after the first chunk of a publish: tries with backoff, then one clear failure with
    nothing cut over; or, back during the tries, the same publish completes."""
    from userlens.embeddings import export_embeddings

    redis_server.start()
    set_params(project, {"serving": {"online_store": "redis", "redis_url": redis_server.url}})
    cli_ok(project, "materialize", "--no-progress")  # production, now served from Redis
    ids = [*prepared.user_ids, *(f"extra-{i:05d}" for i in range(10_100))]  # two chunks of 10,000
    vectors = np.random.default_rng(3).standard_normal((len(ids), prepared.v1_vectors.shape[1]), np.float32)
    big = project / "experiment.parquet"
    export_embeddings(big, ids, [vectors], "experiment", datetime.now(UTC))
    before = fingerprint(project, prepared.user_ids)
    live = pointer(project)["slot"]
    run = started(project, "materialize", "--embeddings", str(big), "--no-progress", fault="publish.chunk")
    run.at_fault_point()  # 10,000 users in the standby slot
    redis_server.kill()
    run.release()
    if redis_returns == "during the retries":
        run.wait_for(lambda: "try 2 of 3" in run.stderr, "a retry")
        redis_server.start()
        done = run.finish()
        got, found, version = served(project, ids)
        recovered = done.returncode == 0 and version == "experiment" and got.tobytes() == vectors.tobytes()
        changed = bytes_changed({"served": vectors.tobytes()}, {"served": got.tobytes()})  # against what was asked
        record("Redis away mid-publish, back during the retries", True, recovered, changed,
               note="the publish completed: the new version is served whole, as asked")  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        assert "unreachable" in done.stderr and "try 2 of 3" in done.stderr
        assert found.all() and recovered and service_slot(project) == pointer(project)["slot"] != live
        return
    done = run.finish()
    lookup = cli(project, "lookup", prepared.user_ids[0])  # while Redis is down
    cut_over = pointer(project)["slot"] != live or service_slot(project) != live
    redis_server.start()  # back, with what it held
    after = fingerprint(project, prepared.user_ids)
    again = cli(project, "materialize", "--embeddings", str(big), "--no-progress")
    got, found, version = served(project, ids)
    recovered = again.returncode == 0 and version == "experiment" and got.tobytes() == vectors.tobytes()
    record("Redis away mid-publish (stays away, then returns)", True, recovered, bytes_changed(before, after))
    line = clear_error(done, f"redis:127.0.0.1:{redis_server.port}", "unreachable", "3 tries",
                       "nothing was cut over", "start it")  # fmt: skip
    assert done.stderr.count("try ") == 2, done.stderr[-3000:]  # two retries, with a doubling wait
    assert "try 2 of 3 in 1.0 s" in done.stderr and "try 3 of 3 in 2.0 s" in done.stderr, line
    clear_error(lookup, "unreachable", "start it")
    assert not cut_over  # pointer and stable feature service still name the old slot
    assert bytes_changed(before, after) == 0
    assert again.returncode == 0, again.stderr[-3000:]
    assert found.all() and recovered


# --- model files that carry code, feast serve's address ---------------------------------------------


class Payload:
    """Unpickling this runs a shell command (pickle's __reduce__): what a hostile model file does."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_model_file_carrying_a_pickle_payload_is_refused_by_every_loader(prepared, project, tmp_path):
    import torch

    from userlens import finetune, release, train
    from userlens.config import Params
    from userlens.errors import UserlensError
    from userlens.project import Project
    from userlens.registry import ModelVersion, Registry, RegistryError

    marker = tmp_path / "the-payload-ran"
    evil = tmp_path / "evil.pt"
    weights = torch.load(project / "data/models/barlow_twins/encoder.pt", weights_only=True)["model"]
    torch.save({"model": weights, "hook": Payload(marker)}, evil)
    proj = Project(project)
    params = proj.load_params()
    before = fingerprint(project, prepared.user_ids)
    refused = []

    def refuses(what, call, error=UserlensError, match="weights_only"):
        with pytest.raises(error, match=match):
            call()
        assert not marker.exists(), f"{what} ran the payload"
        refused.append(what)

    # registry load: registering it, and loading a registered version that holds it
    registry = Registry(proj)
    refuses("register", lambda: registry.register("barlow_twins-evil", checkpoint=evil,
            embeddings=registry.get(prepared.v1).embeddings, metrics={}, params=Params(), raw_dvc_hash=None,
            git_revision=None))  # fmt: skip
    copy = Path(shutil.copytree(registry.get(prepared.v1).path, tmp_path / "evil-version"))
    shutil.copyfile(evil, copy / "encoder.pt")
    tampered = ModelVersion(prepared.v1, copy, registry.get(prepared.v1).manifest)
    refuses("registry load", tampered.load_weights, RegistryError)
    refuses("a registered version's encoder (refresh, lifelong, conditioned LM)",
            lambda: release.encoder_of(proj, tampered), RegistryError)  # fmt: skip
    production = registry.get(prepared.v1).checkpoint
    good = production.read_bytes()
    shutil.copyfile(evil, production)
    try:
        refuses("refresh: re-export with the production encoder", lambda: release.reexport(proj, params))
    finally:
        production.write_bytes(good)
    candidate = proj.model_dir("barlow_twins") / "encoder.pt"
    shutil.copyfile(evil, candidate)
    refuses("the trained candidate's encoder", lambda: release.candidate_encoder(proj, params))
    refuses("fine-tune", lambda: finetune.load_encoder(candidate.parent, params.model, None), RegistryError)
    checkpoint = tmp_path / "resume"
    checkpoint.mkdir()
    shutil.copyfile(evil, checkpoint / train.CHECKPOINT)
    assert train._read_checkpoint(checkpoint, "test") is None  # not resumed: training from step 0
    assert not marker.exists()
    refused.append("resume from a checkpoint")
    new_candidate(project, "barlow_twins-evil")  # and through the CLI: one line, no traceback
    shutil.copyfile(evil, candidate)
    done = cli(project, "register")
    clear_error(done, str(candidate), "weights_only", "refused")
    assert not marker.exists()
    refused.append("userlens register")
    changed = bytes_changed(before, fingerprint(project, prepared.user_ids))
    # ... and the payload is live: loading it the unsafe way runs it (so the refusals above mean something)
    subprocess.run([sys.executable, "-c", f"import torch; torch.load({str(evil)!r}, weights_only=False)"],
                   capture_output=True)  # fmt: skip
    record("model file with a pickle payload", True, True, changed, loaders_refused=len(refused))
    assert marker.exists(), "the crafted payload does not run code: the test proves nothing"
    assert changed == 0


def listening(pid: int, port: int) -> set[str]:
    """The addresses the process (or its children: gunicorn workers) listens on at `port`."""
    import psutil

    parent = psutil.Process(pid)
    found = set()
    for proc in [parent, *parent.children(recursive=True)]:
        try:
            connections = proc.net_connections(kind="inet")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        found |= {c.laddr.ip for c in connections if c.status == psutil.CONN_LISTEN and c.laddr.port == port}
    return found


def other_address() -> str | None:
    """An address of this machine that is not loopback, if it has one."""
    import psutil

    for addresses in psutil.net_if_addrs().values():
        for address in addresses:
            if address.family == socket.AF_INET and not address.address.startswith("127."):
                return address.address
    return None


@pytest.mark.parametrize("host", [None, "0.0.0.0"])
def test_feast_serve_binds_to_loopback_unless_told_otherwise(prepared, project, started, host):
    port = free_port()
    run = started(project, "serve", "--port", str(port), *(["--host", host] if host else []))
    run.wait_for(lambda: listening(run.proc.pid, port), f"feast serve listening on port {port}", timeout=120)
    addresses = listening(run.proc.pid, port)
    remote = other_address()
    reachable = None
    if remote:
        with socket.socket() as sock:
            sock.settimeout(2)
            reachable = sock.connect_ex((remote, port)) == 0
    record(f"feast serve address ({host or 'default'})", True, True, 0, listening=sorted(addresses))
    if host is None:
        assert addresses == {"127.0.0.1"}
        assert reachable in (None, False)  # not from another interface
    else:
        assert addresses == {"0.0.0.0"}
        assert reachable in (None, True)
    with socket.create_connection(("127.0.0.1", port), timeout=5):
        pass
