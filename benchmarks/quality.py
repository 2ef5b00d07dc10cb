"""Downstream quality on real data: Barlow Twins vs the dual encoder and simple baselines.

Runs the real stages (fetch -> ... -> sequences once, then pretrain, baselines, evaluate per
variant) in a scratch project under benchmarks/out/quality-<dataset>-project, and writes
benchmarks/out/quality-<dataset>-<variant>.json plus the Markdown for BENCHMARKS.md.

    python benchmarks/quality.py                           # ML-100K, the settings of params.yaml
    python benchmarks/quality.py --dataset ciao            # Ciao (../shared/data/ciao, generic format)
    python benchmarks/quality.py --study batch             # Barlow Twins vs dual encoder at batch 32..256
    python benchmarks/quality.py --study ablation          # lambda, augmentations, width, sequence length
    python benchmarks/quality.py --study finetune          # encoder + head fine-tuned, beside the probes
    python benchmarks/quality.py --study buckets           # random vs length-bucketed pretraining batches
    python benchmarks/quality.py --set pretrain.steps=100  # any override, for a quick look

Targets (issue 9): at <= 10 % labels Barlow Twins >= +8 % relative over the dual encoder on at
least two of three tasks, and ahead of ALS and the handcrafted profile on at least two of three.
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
from userlens.report import geometry_table  # noqa: E402

SHARED = REPO.parent / "shared" / "data"
DATASETS = {  # name -> (folder that must exist, CLI settings of the data stages)
    "ml-100k": (SHARED / "ml-100k", ["--source", "movielens", "--dataset", "ml-100k",
                                     "--data-dir", str(SHARED / "ml-100k")]),
    "ciao": (SHARED / "ciao", ["--interactions", str(SHARED / "ciao" / "interactions.csv"),
                               "--set", f"data.items={SHARED / 'ciao' / 'items.csv'}", "--set", "data.dataset=ciao"]),
}  # fmt: skip
TASKS = ("favourite_category", "gender", "age_bucket", "rating_tendency", "taste_breadth")
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
    # batches of users of about one history length (issue 12): quality and pretraining time
    "buckets": {"random-batches": {}, "length-buckets-8": {"pretrain.length_buckets": 8}},
}


def prepare(project: Path, dataset: str = "ml-100k", settings: list[str] | None = None) -> list[str]:
    """A scratch project with the dataset (or the data these CLI settings name) taken through
    the data stages (reused when present); returns the CLI settings that name the data."""
    settings = settings or DATASETS[dataset][1]
    if (project / "data/sequences/manifest.json").exists():
        refresh_settings(project)
        return settings
    scratch_project(project)
    base = ["--project", str(project), *settings, "--set", "dvc.push=false"]
    for verb in ("fetch", "ingest", "validate", "sequences"):
        userlens(*base, verb)
    return settings


def refresh_settings(project: Path) -> None:
    """The repository's current params.yaml, flows and Feast definitions in a reused scratch project."""
    import shutil

    shutil.copy(REPO / "params.yaml", project / "params.yaml")
    for folder in ("flows", "feature_repo"):
        shutil.copytree(REPO / folder, project / folder, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("__pycache__"))  # fmt: skip


def run_variant(project: Path, overrides: dict) -> dict:
    """pretrain, baselines and evaluate with these overrides on the project's sequences (the
    data settings only name the snapshot; the data stages ran in `prepare`)."""
    from userlens import stages
    from userlens.project import Project

    proj = Project(project)
    params = proj.load_params().with_overrides(overrides)
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


def dataset_overrides(settings: list[str]) -> dict:
    """The data settings of a CLI argument list, as dotted overrides (so the stages name the same snapshot)."""
    flags = {"--source": "data.source", "--dataset": "data.dataset", "--data-dir": "data.data_dir",
             "--interactions": "data.interactions"}  # fmt: skip
    out, pairs = {}, list(zip(settings[::2], settings[1::2], strict=True))
    for flag, value in pairs:
        if flag == "--set":
            key, raw = value.split("=", 1)
            out[key] = yaml.safe_load(raw)
        else:
            out[flags[flag]] = value
    if "data.interactions" in out:
        out.setdefault("data.source", "generic")
    return out


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
    lines, over_de = [], []
    for task in tasks:
        gains = {f: gain(results, task, f, probe) for f in SCARCE if f in results[task]["barlow_twins"][probe]}
        met = all(g >= 0.08 for g in gains.values())
        over_de += [task] if met else []
        shown = ", ".join(f"{float(f):.0%}: {g:+.1%}" for f, g in gains.items())
        lines.append(f"- {task}: BT vs dual encoder at <= 10 % labels {shown} -> {'met' if met else 'NOT met'}")
    lines.append(f"- >= +8 % over the dual encoder at every fraction <= 10 % on {len(over_de)} of {len(tasks)} tasks "
                 f"({', '.join(over_de) or 'none'}) -> {'met' if len(over_de) >= 2 else 'NOT met'}")  # fmt: skip
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
             "| variant | " + " | ".join(f"{t} BT | {t} DE" for t in tasks) + " | steps | minutes |",
             "|---|" + "---:|---:|" * len(tasks) + "---:|---:|"]  # fmt: skip
    for name, run in runs.items():
        r = run["results"]
        cells = " | ".join(f"{r[t]['barlow_twins'][probe][fraction]['mean']:.3f} | "
                           f"{r[t]['dual_encoder'][probe][fraction]['mean']:.3f}" for t in tasks)  # fmt: skip
        lines.append(f"| {name} | {cells} | {run['barlow_twins']['steps_run']} | {run['seconds'] / 60:.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=list(DATASETS), default="ml-100k")
    parser.add_argument("--study", choices=list(STUDIES), default="default")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    folder = DATASETS[args.dataset][0]
    if not folder.exists():
        sys.exit(f"{args.dataset} not found at {folder} (private data, not in the repository)")
    extra = {k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in args.sets)}
    project = OUT / f"quality-{args.dataset}-project"
    data_settings = prepare(project, args.dataset)
    extra = {**dataset_overrides(data_settings), **extra}
    runs = {}
    for name, overrides in STUDIES[args.study].items():
        print(f"running {name} ...", file=sys.stderr)
        runs[name] = run_variant(project, {**overrides, **extra})
        (OUT / f"quality-{args.dataset}-{name}.json").write_text(json.dumps(runs[name], indent=2, default=str))
    print(f"Dataset: {args.dataset}. Machine: {machine()}\n")
    if args.study == "default":
        run = runs["default"]
        print(quality_tables(run))
        print("\nTargets:\n" + "\n".join(targets(run)))
        print("\n" + "\n".join(geometry_table(run["results"]["geometry"])))
        bt, de = run["barlow_twins"], run["dual_encoder"]
        print(f"\nBT: {bt['steps_run']} steps of {bt['batch_size']} ({bt['selection']['reason']}); "
              f"dual encoder: {de['steps_run']} steps; {run['seconds'] / 60:.1f} min in all")  # fmt: skip
    elif args.study == "finetune":
        run = runs["finetune"]
        print(quality_tables(run, probe="finetune"))
        print("\nTargets (fine-tuned):\n" + "\n".join(targets(run, probe="finetune")))
        print(f"\n{run['seconds'] / 60:.1f} min in all (pretraining reused when already done)")
    elif args.study == "buckets":
        print(study_table(runs))
        print("\n" + buckets_table(runs["random-batches"], runs["length-buckets-8"]))
    else:
        print(study_table(runs))


def buckets_table(random: dict, buckets: dict, probe: str = "logreg") -> str:
    """Barlow Twins with length buckets against random batches, paired over the same splits."""
    from userlens.report import paired_comparison

    tasks = [t for t in TASKS if t in random["results"]]
    merged = {t: {"buckets": buckets["results"][t]["barlow_twins"], "random": random["results"][t]["barlow_twins"]}
              for t in tasks}  # fmt: skip
    compared = paired_comparison(merged, "buckets", "random", probe)
    lines = ["| task | labels | random batches | length buckets | difference | paired t p |",
             "|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    for task in tasks:
        for fraction in SCARCE:
            c = compared[task][fraction]
            p = "n/a" if c["t_pvalue"] is None else f"{c['t_pvalue']:.2g}"
            lines.append(f"| {task} | {float(fraction):.0%} | {c['mean_b']:.3f} | {c['mean_a']:.3f} | "
                         f"{c['mean_diff']:+.3f} | {p} |")  # fmt: skip
    seconds = (random["barlow_twins"]["seconds"], buckets["barlow_twins"]["seconds"])
    lines.append(f"\nBarlow Twins pretraining: {seconds[0]:.0f} s with random batches, {seconds[1]:.0f} s with "
                 f"length buckets ({seconds[0] / seconds[1]:.2f}x), same steps; one pretraining seed each, "
                 "5 evaluation splits")  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    main()
