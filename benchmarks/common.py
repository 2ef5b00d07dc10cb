"""Helpers shared by the benchmark scripts: machine description, subprocess runs with peak memory."""

from __future__ import annotations

import json
import os
import platform
import resource
import shutil
import subprocess
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parent / "out"


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{cpu}, {os.cpu_count()} cores, {mem_gib:.0f} GiB RAM, Python {platform.python_version()}"


def run_worker(script: Path, *args: str) -> dict:
    """Run `script --worker ...` in a fresh process; it prints one JSON line with its results."""
    done = subprocess.run([sys.executable, str(script), "--worker", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"worker {args} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def emit(result: dict) -> None:
    print(json.dumps({**result, "peak_rss_mib": round(peak_rss_mib(), 1)}))


REPO = Path(__file__).resolve().parents[1]


def scratch_project(root: Path) -> Path:
    """A fresh userlens project for a benchmark: the repository's settings, git and DVC."""
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    for name in ("params.yaml", "dvc.yaml", ".gitignore", ".dvcignore"):
        shutil.copy(REPO / name, root / name)
    for folder in ("flows", "feature_repo"):  # the flow `userlens run` loads; the Feast definitions
        shutil.copytree(REPO / folder, root / folder, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=root, check=True)
    return root


def userlens(*args: str) -> None:
    """Run the userlens CLI (as a person would), failing loudly."""
    done = subprocess.run([sys.executable, "-m", "userlens", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"userlens {' '.join(args)} failed:\n{done.stderr[-3000:]}")


def synthetic_sequences(project: Path, users: int, settings: list[str]) -> None:
    """data/sequences of `users` synthetic users in a scratch project (the real data stages, as a
    person runs them); kept when the project already holds that many. `settings`: --set KEY=VALUE."""
    marker = project / "data/sequences/manifest.json"
    if marker.exists() and json.loads(marker.read_text())["n_users"] == users:
        return
    scratch_project(project)
    sets = [f"data.synthetic.n_users={users}", *settings, "dvc.push=false"]
    base = ["--project", str(project), "--dataset", f"synthetic-{users}"] + [a for s in sets for a in ("--set", s)]
    for verb in (["fetch", "--no-progress"], ["ingest"], ["validate"], ["sequences"]):
        userlens(*base, *verb)
