"""Fault suite summary: faults injected, runs recovered, bytes of production changed.

Runs the fault suite (tests/test_faults.py: real `userlens` processes SIGKILLed at set points,
a real redis-server killed mid-publish and restarted, damaged checkpoints and registry files, a
deleted online store, a model file carrying a pickle payload, two runs at once, `feast serve`'s
address) with $USERLENS_FAULT_LOG set, so that each test appends one JSON line
{fault, injected, recovered, production_bytes_changed}; then prints the table for BENCHMARKS.md
and writes benchmarks/out/faults.json.

"Bytes of production changed" are the bytes that differ between the production fingerprint
before the fault and after it (before any recovery that moves production on purpose): every
user's vector, found flag and version as userlens' serving client reads them and as a Feast
client reads them by the stable feature service `user_embeddings`, the production alias, and the
production version's registry files. Two kills fall where a complete, verified newer version
is already served to some clients (`served ahead`: after the publish and before the alias moves;
inside the cut-over, between the feature service and the pointer); they are listed apart.

    python benchmarks/faults.py
    python benchmarks/faults.py -k redis        # a subset (pytest -k)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import OUT, REPO, machine  # noqa: E402

FAULT_LOG = "USERLENS_FAULT_LOG"  # tests/test_faults.py appends its lines here


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-k", dest="select", help="Only the tests pytest -k selects.")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        log = Path(scratch) / "faults.jsonl"
        command = [sys.executable, "-m", "pytest", "tests/test_faults.py", "-q", "-p", "no:cacheprovider",
                   "--durations=0", "--durations-min=1", *(["-k", args.select] if args.select else [])]  # fmt: skip
        started = time.perf_counter()
        done = subprocess.run(command, cwd=REPO, env={**os.environ, FAULT_LOG: str(log)}, text=True,
                              capture_output=True)  # fmt: skip
        seconds = time.perf_counter() - started
        rows = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    outcome = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else f"pytest exited {done.returncode}"
    held = [r for r in rows if not r.get("served_ahead")]
    summary = {
        "faults": len(rows),
        "faults_injected": sum(r["injected"] for r in rows),
        "runs_recovered": sum(r["recovered"] for r in rows),
        "production_bytes_changed": sum(r["production_bytes_changed"] for r in held),
        "served_ahead_bytes": sum(r["production_bytes_changed"] for r in rows if r.get("served_ahead")),
        "pytest": outcome,
        "seconds": round(seconds, 1),
    }
    result = {"machine": machine(), "platform": platform.platform(), "cpu_count": os.cpu_count(),
              "summary": summary, "faults": rows}  # fmt: skip
    OUT.mkdir(exist_ok=True)
    (OUT / "faults.json").write_text(json.dumps(result, indent=2) + "\n")

    print(f"Machine: {machine()} ({platform.platform()}, {os.cpu_count()} CPUs)\n")
    print("| fault | injected | recovered | bytes of production changed |")
    print("|---|:-:|:-:|---:|")
    for r in rows:
        ahead = " (served ahead: a newer version, whole)" if r.get("served_ahead") else ""
        print(f"| {r['fault']} | {'yes' if r['injected'] else 'NO'} | {'yes' if r['recovered'] else 'NO'} | "
              f"{r['production_bytes_changed']:,}{ahead} |")  # fmt: skip
    print(f"\nFault suite summary: {summary['faults_injected']} of {summary['faults']} faults injected, "
          f"{summary['runs_recovered']} runs recovered, {summary['production_bytes_changed']:,} bytes of production "
          f"changed (must be 0){'' if not summary['served_ahead_bytes'] else ', besides the served-ahead windows'}; "
          f"pytest: {outcome} ({seconds:.0f} s)")  # fmt: skip
    print(done.stdout[-6000:], file=sys.stderr)  # pytest's durations (and failures)
    if done.returncode != 0:
        sys.exit(done.returncode)


if __name__ == "__main__":
    main()
