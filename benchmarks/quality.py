"""Downstream quality on MovieLens-100K: Barlow Twins vs the dual encoder and simple baselines.

Runs the real stages (fetch -> ... -> sequences once, then pretrain, baselines, evaluate per
variant) in a scratch project under benchmarks/out/quality-project, and writes
benchmarks/out/quality-<variant>.json plus the Markdown for BENCHMARKS.md.

    python benchmarks/quality.py                          # the default settings (params.yaml)
    python benchmarks/quality.py --study batch            # Barlow Twins vs dual encoder at batch 32..256
    python benchmarks/quality.py --study ablation         # lambda, augmentations, width, sequence length
    python benchmarks/quality.py --study finetune         # encoder + head fine-tuned, beside the probes
    python benchmarks/quality.py --set pretrain.epochs=5  # any override, for a quick look

Targets (issue 3): Barlow Twins >= 8 % relative over the dual encoder on every task at <= 10 %
labels; ahead of ALS and the handcrafted profile on at least two of three tasks.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import OUT, REPO, machine, scratch_project, userlens  # noqa: E402

ML100K = REPO.parent / "shared" / "data" / "ml-100k"
TASKS = ("favourite_category", "gender", "age_bucket", "rating_tendency")
SCARCE = ("0.01", "0.05", "0.1")  # "<= 10 % labels"
METHODS = ("barlow_twins", "dual_encoder", "als", "handcrafted", "random")

STUDIES = {
    "default": {"default": {}},
    "batch": {f"batch-{b}": {"pretrain.batch_size": b} for b in (32, 64, 128, 256)},
    "ablation": {
        "lambda-0.0005": {"pretrain.lambd": 0.0005},
        "lambda-0.05": {"pretrain.lambd": 0.05},
        "no-masking": {"augment.item_mask_rate": 0.0, "augment.segment_mask_prob": 0.0},
        "no-crop-reorder": {"augment.crop_prob": 0.0, "augment.reorder_prob": 0.0},
        "width-128": {"model.d_model": 128},
        "max-length-50": {"sequences.max_length": 50},
    },
    "finetune": {"finetune": {"evaluate.finetune.enabled": True}},  # beside the probes, on the same splits
}


def prepare(project: Path) -> None:
    """A scratch project with ML-100K taken through the data stages (reused when present)."""
    if (project / "data/sequences/manifest.json").exists():
        return
    scratch_project(project)
    base = ["--project", str(project), "--source", "movielens", "--dataset", "ml-100k", "--data-dir", str(ML100K),
            "--set", "dvc.push=false"]  # fmt: skip
    for verb in ("fetch", "ingest", "validate", "sequences"):
        userlens(*base, verb)


def run_variant(project: Path, overrides: dict) -> dict:
    from userlens import stages
    from userlens.project import Project

    proj = Project(project)
    params = proj.load_params().with_overrides(
        {"data.source": "movielens", "data.dataset": "ml-100k", "data.data_dir": str(ML100K), **overrides}
    )
    started = time.perf_counter()
    pretrain = stages.pretrain(proj, params, progress=False)
    baselines = stages.train_baselines(proj, params, progress=False)
    results = stages.evaluate(proj, params, progress=False)
    return {
        "overrides": overrides,
        "seconds": time.perf_counter() - started,
        "barlow_twins": pretrain,
        "dual_encoder": baselines["dual_encoder"],
        "results": results,
    }


def cell(stat: dict) -> str:
    return f"{stat['mean']:.3f} ± {stat['std']:.3f}"


def quality_tables(run: dict, probe: str = "logreg") -> str:
    results = run["results"]
    lines = []
    for task in (t for t in TASKS if t in results):
        fractions = list(results[task]["barlow_twins"][probe])
        lines += [f"**{task}** ({probe} probe, accuracy, mean ± std over seeds)", "",
                  "| method | " + " | ".join(f"{float(f):.0%}" for f in fractions) + " |",
                  "|---|" + "---:|" * len(fractions)]  # fmt: skip
        for method in (m for m in METHODS if probe in results[task].get(m, {})):
            lines.append(f"| {method} | " + " | ".join(cell(results[task][method][probe][f]) for f in fractions) + " |")
        gains = [gain(results, task, f, probe) for f in fractions]
        lines += ["| *BT vs dual encoder* | " + " | ".join(f"{g:+.1%}" for g in gains) + " |", ""]
    if "next_item" in results and probe == "logreg":
        lines += [
            "**next_item** (HR@10 / NDCG@10, full catalogue)",
            "",
            "| method | HR@10 | NDCG@10 |",
            "|---|---:|---:|",
        ]
        for method, entry in results["next_item"].items():
            hr, ndcg = (next(v for k, v in entry.items() if k.startswith(p)) for p in ("hr@", "ndcg@"))
            lines.append(f"| {method} | {cell(hr)} | {cell(ndcg)} |")
    return "\n".join(lines)


def gain(results: dict, task: str, fraction: str, probe: str = "logreg") -> float:
    bt = results[task]["barlow_twins"][probe][fraction]["mean"]
    de = results[task]["dual_encoder"][probe][fraction]["mean"]
    return bt / de - 1


def targets(run: dict, probe: str = "logreg") -> list[str]:
    results = run["results"]
    tasks = [t for t in TASKS if t in results]
    lines = []
    for task in tasks:
        gains = {f: gain(results, task, f, probe) for f in SCARCE if f in results[task]["barlow_twins"][probe]}
        met = all(g >= 0.08 for g in gains.values())
        shown = ", ".join(f"{float(f):.0%}: {g:+.1%}" for f, g in gains.items())
        lines.append(f"- {task}: BT vs dual encoder at <= 10 % labels {shown} -> {'met' if met else 'NOT met'}")
    if any(probe not in results[t][m] for t in tasks for m in ("als", "handcrafted")):
        return lines  # no such probe for the simple baselines (fine-tuning needs an encoder)
    ahead = [
        t for t in tasks
        if all(results[t]["barlow_twins"][probe][f]["mean"] > max(results[t][m][probe][f]["mean"]
               for m in ("als", "handcrafted")) for f in SCARCE if f in results[t]["barlow_twins"][probe])
    ]  # fmt: skip
    lines.append(f"- ahead of ALS and handcrafted at <= 10 % labels on {len(ahead)} of {len(tasks)} tasks "
                 f"({', '.join(ahead) or 'none'}) -> {'met' if len(ahead) >= 2 else 'NOT met'}")  # fmt: skip
    return lines


def study_table(runs: dict[str, dict], probe: str = "logreg", fraction: str = "0.05") -> str:
    tasks = [t for t in TASKS if t in next(iter(runs.values()))["results"]]
    lines = [f"Accuracy at {float(fraction):.0%} labels ({probe}); BT / DE = Barlow Twins / dual encoder", "",
             "| variant | " + " | ".join(f"{t} BT | {t} DE" for t in tasks) + " | BT epochs | minutes |",
             "|---|" + "---:|---:|" * len(tasks) + "---:|---:|"]  # fmt: skip
    for name, run in runs.items():
        r = run["results"]
        cells = " | ".join(f"{r[t]['barlow_twins'][probe][fraction]['mean']:.3f} | "
                           f"{r[t]['dual_encoder'][probe][fraction]['mean']:.3f}" for t in tasks)  # fmt: skip
        lines.append(f"| {name} | {cells} | {run['barlow_twins']['epochs_run']} | {run['seconds'] / 60:.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study", choices=list(STUDIES), default="default")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    if not (ML100K / "u.data").exists():
        sys.exit(f"MovieLens-100K not found at {ML100K}")
    extra = {k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in args.sets)}
    project = OUT / "quality-project"
    prepare(project)
    runs = {}
    for name, overrides in STUDIES[args.study].items():
        print(f"running {name} ...", file=sys.stderr)
        runs[name] = run_variant(project, {**overrides, **extra})
        (OUT / f"quality-{name}.json").write_text(json.dumps(runs[name], indent=2, default=str))
    print(f"Machine: {machine()}\n")
    if args.study == "default":
        run = runs["default"]
        print(quality_tables(run))
        print("\nTargets:\n" + "\n".join(targets(run)))
        print(
            f"\nBT: {run['barlow_twins']['epochs_run']} epochs (best {run['barlow_twins']['best_epoch']}); "
            f"dual encoder: {run['dual_encoder']['epochs_run']} epochs; {run['seconds'] / 60:.1f} min in all"
        )
    elif args.study == "finetune":
        run = runs["finetune"]
        print(quality_tables(run, probe="finetune"))
        print("\nTargets (fine-tuned):\n" + "\n".join(targets(run, probe="finetune")))
        print(f"\n{run['seconds'] / 60:.1f} min in all (pretraining reused when already done)")
    else:
        print(study_table(runs))


if __name__ == "__main__":
    main()
