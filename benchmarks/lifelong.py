"""Lifelong users (issue 10): refresh cost, summariser throughput, CTR, lifelong vs truncated.

Works in the quality benchmark's scratch project of the dataset (benchmarks/quality.py makes
it: data stages, a trained Barlow Twins encoder), on the validated interactions; results go to
benchmarks/out/lifelong-<dataset>.json (parts run separately are merged there).

    python benchmarks/lifelong.py --dataset ml-100k             # refresh, throughput, ctr, truncation
    python benchmarks/lifelong.py --dataset ciao --parts ctr,truncation --llm-sample 0
    python benchmarks/lifelong.py --llm-sample 32               # LLM partitions timed
    python benchmarks/lifelong.py --parts drift                 # the CTR table on planted drift (synthetic)
    python benchmarks/lifelong.py --parts ctr --ctr-users 250 --ctr-seeds 10 [--ctr-summaries llm]

- refresh: 1 % of the users get new events (their last 20 % of events are held back, then
  appended) vs a full rebuild of log + partitions + summaries, side by side in one run: wall
  time and summariser calls for both; the LLM's refresh is timed for real on the same events
  (its starting state built for the refreshed users only), its full rebuild is projected from
  the measured LLM time per summary (and labelled so).
- throughput: partitions/s of the template summariser (all partitions) and of the LLM on the
  CPU (a sample, batched), and on CUDA when there is a GPU;
- ctr: `userlens fuse` with the template summaries (AUC / log loss per variant, paired); or
  with the LLM's (`--ctr-summaries llm`; on 2 CPU cores ~5 s a partition, so `--ctr-users N`
  runs both on a seeded sample of N users -> lifelong-<dataset>-<N>users.json);
- truncation: the downstream tasks with user_interest (whole history) vs the truncated history;
- drift: the CTR table on a synthetic source with planted drift -> lifelong-drift.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import OUT, machine  # noqa: E402
from quality import DATASETS, dataset_overrides, prepare  # noqa: E402

PARTS = ("refresh", "throughput", "ctr", "truncation")  # on --dataset; and "drift" (synthetic)


class Counting:
    """Wraps a summariser and counts what it is asked to write."""

    def __init__(self, inner):
        self.inner, self.identity, self.calls, self.seconds = inner, inner.identity, 0, 0.0

    def summarise(self, requests, progress=None):
        started = time.perf_counter()
        out = self.inner.summarise(requests, progress)
        self.calls, self.seconds = self.calls + len(requests), self.seconds + time.perf_counter() - started
        return out


def lifelong_cycle(folder: Path, batches: list[pl.DataFrame], summariser, params, items, scale, users=None) -> dict:
    """Append each batch to a fresh log in `folder`, updating partitions and summaries after each;
    the figures of the LAST batch (wall time, summariser calls). `users`: summarise only these
    users' partitions (the LLM's state is built for the refreshed users alone: nobody else's
    summaries take part in their refresh, and summarising everyone would take hours here)."""
    from userlens.lifelong.log import EventLog
    from userlens.lifelong.partitions import Partitions
    from userlens.lifelong.summaries import Summaries

    log, parts, summaries = EventLog(folder / "log"), Partitions(folder / "partitions"), Summaries(folder / "sum")
    for batch in batches:
        counted = Counting(summariser)
        started = time.perf_counter()
        log.append(batch, {})
        change = parts.update(log, params.lifelong.partition)
        closed = parts.closed() if users is None else parts.closed(users)
        summaries.update(closed, parts.rule_hash, counted, items, scale, params.lifelong.summary, False)
        seconds = time.perf_counter() - started
    return {"seconds": seconds, "calls": counted.calls, "summariser_seconds": counted.seconds,
            "touched_users": change["touched_users"], "partitions": parts.closed().height}  # fmt: skip


def refresh_study(project: Path, params, llm) -> dict:
    from userlens.lifelong.summaries import TemplateSummariser
    from userlens.project import Project
    from userlens.stages import validated_interactions

    events, tables, _ = validated_interactions(Project(project))
    rng = np.random.default_rng(0)
    users = events["user_id"].unique().sort()
    chosen = users.gather(rng.choice(len(users), max(1, len(users) // 100), replace=False))
    ranked = events.with_columns(
        late=(pl.col("timestamp").rank("ordinal").over("user_id") > pl.len().over("user_id") * 0.8)
        & pl.col("user_id").is_in(chosen.implode())
    )
    old, new = ranked.filter(~pl.col("late")).drop("late"), ranked.filter("late").drop("late")
    out = {"users": len(users), "refreshed_users": len(chosen), "new_events": new.height, "events": events.height}
    summarisers = {"template": TemplateSummariser()} | ({"llm": llm} if llm is not None else {})
    for name, summariser in summarisers.items():
        with tempfile.TemporaryDirectory() as tmp:
            only = chosen.to_list() if name == "llm" else None
            incremental = lifelong_cycle(Path(tmp) / "inc", [old, new], summariser, params, tables.items,
                                         tables.rating_scale, only)  # fmt: skip
            full = None
            if name == "template":  # the LLM's full rebuild would take hours on 2 cores: projected below
                full = lifelong_cycle(Path(tmp) / "full", [events], summariser, params, tables.items,
                                      tables.rating_scale)  # fmt: skip
        out[name] = {"refresh": incremental, "full": full}
    template = out["template"]
    out["template"]["wall_ratio"] = template["refresh"]["seconds"] / template["full"]["seconds"]
    out["template"]["call_ratio"] = template["refresh"]["calls"] / template["full"]["calls"]
    if "llm" in out:
        per_call = out["llm"]["refresh"]["summariser_seconds"] / max(out["llm"]["refresh"]["calls"], 1)
        full_calls = template["full"]["calls"]  # the same partitions, whichever summariser
        out["llm"]["full_projected_seconds"] = per_call * full_calls
        out["llm"]["wall_ratio_projected"] = out["llm"]["refresh"]["seconds"] / out["llm"]["full_projected_seconds"]
        out["llm"]["call_ratio"] = out["llm"]["refresh"]["calls"] / full_calls
    return out


def throughput_study(project: Path, params, llm, sample: int) -> dict:
    from userlens.lifelong import pipeline
    from userlens.lifelong.summaries import TemplateSummariser, _view, item_lookup
    from userlens.project import Project
    from userlens.stages import load_canonical

    proj = Project(project)
    tables, _ = load_canonical(proj)
    closed = pipeline.partition_store(proj, params).closed()
    lookup = item_lookup(tables.items)
    requests = [(None, _view(row, lookup, tables.rating_scale)) for row in closed.iter_rows(named=True)]
    out = {}
    started = time.perf_counter()
    TemplateSummariser().summarise(requests)
    out["template"] = {"partitions": len(requests), "per_second": len(requests) / (time.perf_counter() - started)}
    if llm is not None:
        picked = [requests[i] for i in np.random.default_rng(0).choice(len(requests), sample, replace=False)]
        started = time.perf_counter()
        texts = llm.summarise(picked)
        seconds = time.perf_counter() - started
        out["llm"] = {"partitions": sample, "per_second": sample / seconds, "device": str(llm.model.device),
                      "batch_size": params.lifelong.summary.batch_size,
                      "max_new_tokens": params.lifelong.summary.max_new_tokens, "example": texts[0]}  # fmt: skip
    return out


def truncation_study(project: Path, params) -> dict:
    """The downstream tasks of `userlens evaluate` with user_interest (every user's WHOLE history,
    through partitions) against the representations of the truncated history (the last
    sequences.max_length events): Barlow Twins, the handcrafted profile, and both with it.

    user_interest is trained (CTR objective, lifelong.ctr) on half the users; the tasks keep
    the labels of the other half only, so no probe test user's future trained the fusion."""
    import torch

    from userlens.baselines import handcrafted_profile, item_category_matrix
    from userlens.config import EvaluateParams
    from userlens.embeddings import read_embeddings
    from userlens.evaluate import build_tasks, evaluate_methods
    from userlens.lifelong import ctr
    from userlens.lifelong.evaluate import history_inputs
    from userlens.lifelong.interest import SERVED_VARIANT
    from userlens.project import Project
    from userlens.release import candidate_encoder
    from userlens.stages import load_canonical

    proj = Project(project)
    settings = params.lifelong
    tables, _ = load_canonical(proj)
    inputs, user_ids, sequences, _ = history_inputs(proj, params, tables, candidate_encoder(proj, params), False)
    order = np.random.default_rng(0).permutation(len(user_ids))
    fusion_users, probe_users = np.sort(order[: len(order) // 2]), np.sort(order[len(order) // 2 :])
    base = handcrafted_profile(proj.sequences_dir)
    features = ctr.UserFeatures(ctr.standardised(base), None, inputs)
    categories = torch.from_numpy(item_category_matrix(proj.sequences_dir).toarray())
    data = ctr.examples(sequences, tables.rating_scale)
    model = ctr.fit(SERVED_VARIANT, data, features, categories, fusion_users, settings.ctr, settings.fusion.dim,
                    settings.fusion.max_partitions, seed=0)  # fmt: skip
    with torch.no_grad():
        interest = model.fusion.eval()(inputs).numpy()
    ids, bt = read_embeddings(proj.embeddings_dir / "barlow_twins.parquet")
    assert ids == user_ids, "the Barlow Twins export is for other users than data/sequences"
    tasks = {name: dataclasses.replace(task, labels=np.where(np.isin(np.arange(len(task.labels)), fusion_users), -1,
                                                             task.labels))
             for name, task in build_tasks(proj.sequences_dir).items()}  # fmt: skip
    methods = {
        "barlow_twins (truncated)": bt,
        "handcrafted (truncated)": base,
        "user_interest (whole history)": interest,
        "barlow_twins + user_interest": np.concatenate([bt, interest], axis=1),
        "handcrafted + user_interest": np.concatenate([base, interest], axis=1),
    }
    evaluation = EvaluateParams(**{**params.evaluate.model_dump(), "probes": ["logreg"]})
    results = evaluate_methods(methods, tasks, evaluation, progress=False)
    events = sequences["history_item_index"].list.len() + sequences["future_item_index"].list.len()
    return {"results": results, "probe_users": len(probe_users), "fusion_users": len(fusion_users),
            "max_length": params.sequences.max_length,
            "truncated_users": int((events > params.sequences.max_length).sum())}  # fmt: skip


DRIFT = {"n_users": 600, "n_items": 300, "n_categories": 6, "mean_events_per_user": 150, "drift": 1.0}


def drift_study() -> dict:
    """The CTR table on the synthetic source with planted drift (every user's taste moves fully
    to a second mixture), in its own scratch project (repository defaults otherwise), and how
    much a single score says there: the user's share of the item's category in the whole
    history vs in its last 40 events (AUC of that number alone)."""
    from sklearn.metrics import roc_auc_score

    from common import scratch_project, userlens
    from userlens import stages
    from userlens.lifelong import pipeline
    from userlens.lifelong.evaluate import evaluate_interest
    from userlens.project import Project

    project = OUT / "lifelong-drift-project"
    settings = [f"--set=data.synthetic.{key}={value}" for key, value in DRIFT.items()] + ["--set=dvc.push=false"]
    if not (project / "data/sequences/manifest.json").exists():
        scratch_project(project)
        for verb in ("fetch", "ingest", "validate", "sequences"):
            userlens("--project", str(project), *settings, verb)
    proj = Project(project)
    params = proj.load_params(overrides={f"data.synthetic.{k}": v for k, v in DRIFT.items()})
    if not (project / "data/models/barlow_twins/encoder.pt").exists():
        stages.pretrain(proj, params, progress=False)
    pipeline.sync_log(proj, params)
    pipeline.partitions(proj, params)
    result = evaluate_interest(proj, params, progress=False)
    sequences = pl.read_parquet(proj.sequences_dir / "sequences.parquet").sort("user_index")
    items = pl.read_parquet(proj.sequences_dir / "items.parquet").sort("item_index")
    primary = np.array([c[0] if len(c) else -1 for c in items["category_index"].to_list()])
    shares: dict[str, list[float]] = {"whole history": [], "last 40 events": []}
    labels = []
    for history, future, ratings in sequences.select("history_item_index", "future_item_index",
                                                     "future_rating").iter_rows():  # fmt: skip
        for name, kept in (("whole history", history), ("last 40 events", history[-40:])):
            counts = np.bincount(primary[kept], minlength=primary.max() + 1) / max(len(kept), 1)
            shares[name] += [counts[primary[i]] for i in future]
        labels += [r >= 4 for r in ratings]
    result["single_score_auc"] = {name: float(roc_auc_score(labels, s)) for name, s in shares.items()}
    return {**result, "dataset": f"synthetic with planted drift ({DRIFT})"}


def user_sample(source: Path, dataset: str, users: int) -> tuple[Path, list[str]]:
    """A scratch project on a seeded sample of `users` users of the dataset's validated
    interactions (all their events, in the generic format), and its CLI data settings. The LLM
    summaries the full project has written are copied in as its cache: same partitions, same
    prompts, so the same cache keys, and nothing is generated twice."""
    import shutil

    name = f"{dataset}-{users}users"
    folder, project = OUT / f"{name}-sample", OUT / f"quality-{name}-project"  # both gitignored: private data
    settings = ["--interactions", str(folder / "interactions.parquet"), "--set",
                f"data.items={folder / 'items.parquet'}", "--set", f"data.dataset={name}"]  # fmt: skip
    if not (folder / "items.parquet").exists():
        canonical = source / "data/canonical"
        interactions = pl.read_parquet(canonical / "interactions.parquet")
        chosen = interactions.select(pl.col("user_id").unique().sort()).sample(users, seed=0)
        folder.mkdir(parents=True, exist_ok=True)
        interactions.join(chosen, on="user_id", how="semi").write_parquet(folder / "interactions.parquet")
        pl.read_parquet(canonical / "items.parquet").write_parquet(folder / "items.parquet")
    prepare(project, name, settings)
    cache = project / "data/lifelong" / name / "summaries"
    if not cache.exists():
        shutil.copytree(source / "data/lifelong" / dataset / "summaries", cache)
    return project, settings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=list(DATASETS), default="ml-100k")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {', '.join(PARTS)}")
    parser.add_argument("--llm-sample", type=int, default=32, help="partitions the LLM summarises (0: no LLM)")
    parser.add_argument("--ctr-summaries", choices=["template", "llm"], default="template",
                        help="ctr: summaries by the template or by the LLM (then encoded by the LM's states); "
                        "the LLM's are cached as they are written, so a stopped run continues")  # fmt: skip
    parser.add_argument("--ctr-users", type=int, default=0,
                        help="ctr: on a seeded sample of this many users (0: all)")  # fmt: skip
    parser.add_argument("--ctr-seeds", type=int, help="ctr: user splits (default: lifelong.ctr.seeds)")
    args = parser.parse_args()
    parts = args.parts.split(",")
    if "drift" in parts:
        drift = drift_study()
        (OUT / "lifelong-drift.json").write_text(json.dumps(drift, indent=2, default=str))
        print(drift_report(drift))
        if parts == ["drift"]:
            return
    from userlens import stages
    from userlens.lifelong import pipeline
    from userlens.project import Project

    project = OUT / f"quality-{args.dataset}-project"
    settings = prepare(project, args.dataset)
    name = args.dataset
    if args.ctr_users:
        if parts != ["ctr"]:
            parser.error("--ctr-users goes with --parts ctr")
        project, settings = user_sample(project, args.dataset, args.ctr_users)
        name = f"{args.dataset}-{args.ctr_users}users"
    overrides = dataset_overrides(settings)
    proj = Project(project)
    if args.ctr_seeds:
        overrides["lifelong.ctr.seeds"] = args.ctr_seeds
    params = proj.load_params(overrides=overrides)
    llm = None
    if args.llm_sample and {"refresh", "throughput"} & set(parts):
        from userlens.lifelong.summaries import make_summariser

        settings = params.lifelong
        llm = make_summariser(settings.summary.model_copy(update={"summariser": "llm"}), settings.llm.model,
                              settings.llm.device)  # fmt: skip
    # Parts run separately add to (or replace their part of) the dataset's results file.
    path = OUT / f"lifelong-{name}.json"
    result = json.loads(path.read_text()) if path.exists() else {}
    result.update(dataset=name, machine=machine())
    pipeline.sync_log(proj, params)
    pipeline.partitions(proj, params)
    if "refresh" in parts:
        result["refresh"] = refresh_study(project, params, llm)
    if "throughput" in parts:
        result["throughput"] = throughput_study(project, params, llm, args.llm_sample)
    if "ctr" in parts:
        if not (project / "data/models/barlow_twins/encoder.pt").exists():
            stages.pretrain(proj, params, progress=False)
        if args.ctr_summaries == "llm":
            llm_params = params.with_overrides(
                {"lifelong.summary.summariser": "llm", "lifelong.fusion.text_encoder": "lm"}
            )
            result["ctr_llm"] = pipeline.fuse(proj, llm_params, progress=True)
        else:
            result["ctr"] = pipeline.fuse(proj, params, progress=False)
    if "truncation" in parts:
        result["truncation"] = truncation_study(project, params)
    path.write_text(json.dumps(result, indent=2, default=str))
    print(report(result))


def report(result: dict) -> str:
    lines = [f"Dataset: {result['dataset']}. Machine: {result['machine']}", ""]
    if refresh := result.get("refresh"):
        lines += [f"**Refresh** ({refresh['refreshed_users']} of {refresh['users']:,} users get "
                  f"{refresh['new_events']:,} new events; {refresh['events']:,} events in all)", "",
                  "| summariser | refresh s | full rebuild s | wall ratio | refresh calls | full calls | call ratio |",
                  "|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
        t = refresh["template"]
        cells = [f"{t['refresh']['seconds']:.2f}", f"{t['full']['seconds']:.2f}", f"{t['wall_ratio']:.1%}",
                 str(t["refresh"]["calls"]), f"{t['full']['calls']:,}", f"{t['call_ratio']:.1%}"]  # fmt: skip
        lines.append("| template | " + " | ".join(cells) + " |")
        if "llm" in refresh:
            m = refresh["llm"]
            cells = [f"{m['refresh']['seconds']:.1f}", f"{m['full_projected_seconds']:.0f} (projected)",
                     f"{m['wall_ratio_projected']:.1%} (projected)", str(m["refresh"]["calls"]),
                     f"{t['full']['calls']:,}", f"{m['call_ratio']:.1%}"]  # fmt: skip
            lines.append("| LLM (CPU) | " + " | ".join(cells) + " |")
        lines.append("")
    if throughput := result.get("throughput"):
        lines += ["**Summariser throughput**", "", "| summariser | partitions | partitions/s |", "|---|---:|---:|"]
        lines.append(
            f"| template | {throughput['template']['partitions']:,} | {throughput['template']['per_second']:,.0f} |"
        )
        if llm := throughput.get("llm"):
            lines.append(f"| LLM on {llm['device']} (batch {llm['batch_size']}, <= {llm['max_new_tokens']} new tokens) "
                         f"| {llm['partitions']} | {llm['per_second']:.2f} |")  # fmt: skip
            lines += ["", f'Example LLM summary: "{llm["example"]}"']
        lines.append("")
    for key in ("ctr", "ctr_llm"):
        if ctr := result.get(key):
            from userlens.lifelong.evaluate import markdown

            lines.append(markdown(ctr))
    if "ctr" in result and "ctr_llm" in result:
        lines += llm_vs_template(result["ctr"], result["ctr_llm"])
    if truncation := result.get("truncation"):
        lines += truncation_table(truncation)
    return "\n".join(lines)


def llm_vs_template(template: dict, llm: dict) -> list[str]:
    """The interest variants with LLM summaries vs with template summaries, paired over the same splits."""
    from scipy import stats

    lines = ["**LLM vs template summaries** (same users, same splits; AUC, paired t-test over splits)", ""]
    for variant in (v for v in llm["variants"] if "interest" in v):
        ours, theirs = llm["variants"][variant]["auc"]["per_seed"], template["variants"][variant]["auc"]["per_seed"]
        gain, p = 100 * (sum(ours) - sum(theirs)) / len(ours), stats.ttest_rel(ours, theirs).pvalue
        lines.append(f"- {variant}: LLM {gain:+.2f} AUC points vs template (p = {p:.3f})")
    return lines + [""]


def drift_report(drift: dict) -> str:
    from userlens.lifelong.evaluate import markdown

    single = ", ".join(f"{name} {auc:.3f}" for name, auc in drift["single_score_auc"].items())
    scores = f"\nSingle-score AUC (the user's share of the item's category): {single}\n"
    return f"Machine: {machine()}\n\n" + markdown(drift) + scores


def truncation_table(truncation: dict) -> list[str]:
    from scipy import stats

    results = truncation["results"]
    methods = list(next(iter(results.values())))
    lines = [f"**Lifelong vs truncated** ({truncation['probe_users']} probe users; user_interest trained on "
             f"{truncation['fusion_users']} others; {truncation['truncated_users']} users have more than "
             f"max_length = {truncation['max_length']} events). Test accuracy (logreg) at 5 % / 100 % of labels; "
             "next_item: HR@k", "", "| representation | " + " | ".join(results) + " |",
             "|---|" + "---:|" * len(results)]  # fmt: skip
    for method in methods:
        cells = []
        for by_method in results.values():
            entry = by_method[method]
            if "logreg" in entry:
                cells.append(" / ".join(f"{entry['logreg'][k]['mean']:.3f}" for k in ("0.05", "1.0")))
            else:
                cells.append(f"{_headline(entry)['mean']:.3f}")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    lines.append("")
    for task, by_method in results.items():  # paired over seeds, at 100 % of labels
        best = max(methods[:2], key=lambda m: _headline(by_method[m])["mean"])
        ours, theirs = _headline(by_method["user_interest (whole history)"]), _headline(by_method[best])
        p = stats.ttest_rel(ours["per_seed"], theirs["per_seed"]).pvalue
        gain = ours["mean"] - theirs["mean"]
        lines.append(f"- {task}: user_interest {gain:+.3f} vs {best} (paired t-test p = {p:.3f})")
    return lines + [""]


def _headline(entry: dict) -> dict:
    """A task's figure at 100 % of labels (logreg accuracy) or its HR@k."""
    return entry["logreg"]["1.0"] if "logreg" in entry else entry[next(k for k in entry if k.startswith("hr@"))]


if __name__ == "__main__":
    main()
