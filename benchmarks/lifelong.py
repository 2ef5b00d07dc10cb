"""Lifelong users (issue 10): refresh cost, summariser throughput and the CTR table.

Works in the quality benchmark's scratch project of the dataset (benchmarks/quality.py makes
it: data stages, a trained Barlow Twins encoder), on the validated interactions.

    python benchmarks/lifelong.py --dataset ml-100k             # all three parts
    python benchmarks/lifelong.py --dataset ciao --parts refresh,throughput
    python benchmarks/lifelong.py --llm-sample 32               # LLM partitions timed

- refresh: 1 % of the users get new events (their last 20 % of events are held back, then
  appended) vs a full rebuild of log + partitions + summaries, side by side in one run: wall
  time and summariser calls for both; the LLM's refresh is timed for real on the same events
  (its starting state built for the refreshed users only), its full rebuild is projected from
  the measured LLM time per summary (and labelled so).
- throughput: partitions/s of the template summariser (all partitions) and of the LLM on the
  CPU (a sample, batched), and on CUDA when there is a GPU;
- ctr: `userlens fuse` with the template summaries (AUC / log loss per variant, paired).
"""

from __future__ import annotations

import argparse
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

PARTS = ("refresh", "throughput", "ctr")


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
    from userlens.lifelong.summaries import TemplateSummariser, _item_lookup, _view
    from userlens.project import Project
    from userlens.stages import load_canonical

    proj = Project(project)
    tables, _ = load_canonical(proj)
    closed = pipeline.partition_store(proj, params).closed()
    lookup = _item_lookup(tables.items)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=list(DATASETS), default="ml-100k")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {', '.join(PARTS)}")
    parser.add_argument("--llm-sample", type=int, default=32, help="partitions the LLM summarises (0: no LLM)")
    args = parser.parse_args()
    parts = args.parts.split(",")
    from userlens import stages
    from userlens.lifelong import pipeline
    from userlens.project import Project

    project = OUT / f"quality-{args.dataset}-project"
    overrides = dataset_overrides(prepare(project, args.dataset))
    proj = Project(project)
    params = proj.load_params(overrides=overrides)
    llm = None
    if args.llm_sample and {"refresh", "throughput"} & set(parts):
        from userlens.lifelong.summaries import make_summariser

        settings = params.lifelong
        llm = make_summariser(settings.summary.model_copy(update={"summariser": "llm"}), settings.llm.model,
                              settings.llm.device)  # fmt: skip
    # Parts run separately add to (or replace their part of) the dataset's results file.
    path = OUT / f"lifelong-{args.dataset}.json"
    result = json.loads(path.read_text()) if path.exists() else {}
    result.update(dataset=args.dataset, machine=machine())
    pipeline.sync_log(proj, params)
    pipeline.partitions(proj, params)
    if "refresh" in parts:
        result["refresh"] = refresh_study(project, params, llm)
    if "throughput" in parts:
        result["throughput"] = throughput_study(project, params, llm, args.llm_sample)
    if "ctr" in parts:
        if not (project / "data/models/barlow_twins/encoder.pt").exists():
            stages.pretrain(proj, params, progress=False)
        result["ctr"] = pipeline.fuse(proj, params, progress=False)
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
    if ctr := result.get("ctr"):
        from userlens.lifelong.evaluate import markdown

        lines.append(markdown(ctr))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
