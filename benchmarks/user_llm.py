"""The user-conditioned LM (issue 11) on a real dataset: `userlens condition` per variant, in
the quality benchmark's scratch project of the dataset (benchmarks/quality.py makes it; its
trained Barlow Twins candidate is the encoder). Every variant asks the same seeded test users.

    python benchmarks/user_llm.py --dataset ml-100k                      # the comparison below
    python benchmarks/user_llm.py --dataset ml-100k --variants cross-attention
    python benchmarks/user_llm.py --set user_llm.eval_users=100          # any user_llm override (wins)
    python benchmarks/user_llm.py --dataset ciao --variants cross-attention --set user_llm.eval_users=40 \
        --set 'user_llm.tasks=[favourite_category,preference]' --set 'user_llm.text_prompt_events=[50,200]'
                                               # Ciao's items have no titles: no next_item

Variants: cross-attention to the pooled embedding (k = 1; it also scores the LM without the
user and with the user's last N = 10, 50, 200 events in the prompt), cross-attention to a
Perceiver's k = 4 and k = 16 latents, a soft prompt from the pooled embedding, and
cross-attention with LoRA (rank 8) on the LM's attention. Writes
benchmarks/out/user_llm-<dataset>-<variant>.json and user_llm-<dataset>.md: per task the
headline metric, and per query the prompt tokens, GFLOPs (torch's FLOP counter) and latency.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import OUT, machine  # noqa: E402
from quality import DATASETS, dataset_overrides, prepare  # noqa: E402

CROSS = {"user_llm.mode": "cross_attention"}
VARIANTS = {  # name -> user_llm overrides
    "cross-attention": {**CROSS, "user_llm.perceiver": False, "user_llm.latents": 1,
                        "user_llm.text_prompt_events": [10, 50, 200]},
    "cross-attention-perceiver-4": {**CROSS, "user_llm.perceiver": True, "user_llm.latents": 4,
                                    "user_llm.text_prompt_events": []},
    "cross-attention-perceiver-16": {**CROSS, "user_llm.perceiver": True, "user_llm.latents": 16,
                                     "user_llm.text_prompt_events": []},
    "soft-prompt": {"user_llm.mode": "soft_prompt", "user_llm.perceiver": False, "user_llm.latents": 1,
                    "user_llm.text_prompt_events": []},
    "cross-attention-lora": {**CROSS, "user_llm.perceiver": False, "user_llm.latents": 1,
                             "user_llm.text_prompt_events": [], "user_llm.lora.rank": 8},
}  # fmt: skip


def table(dataset: str, results: dict[str, dict]) -> str:
    """One table over the variants: the baselines once (from the run that scored them), then
    each variant's conditioned row; headline metric per task, cost per query (mean over tasks)."""
    from userlens.llm.pipeline import method_row
    from userlens.llm.tasks import HEADLINE

    first = next(iter(results.values()))
    tasks = list(first["scores"])
    rows = {}
    for name, result in results.items():
        methods = dict.fromkeys(m for t in tasks for m in result["scores"][t])  # a probe answers one task
        for method, by_task in ((m, {t: result["scores"][t].get(m) for t in tasks}) for m in methods):
            label = f"{method} [{name}]" if method.startswith("conditioned") else method
            label += f", k = {result['latents']}" if method.startswith("conditioned") else ""
            rows.setdefault(label, (by_task, result))
    lines = [f"Dataset: {dataset}. Machine: {first['machine']}. LM: {first['language_model']}; encoder "
             f"{first['encoder']}; {first['users']['train']} train / {first['users']['test']} test users "
             f"(the same in every variant).", "",
             "| method | " + " | ".join(f"{t} {HEADLINE[t]}" for t in tasks)
             + " | prompt tokens | GFLOPs / query | ms / query (CPU) |",
             "|---|" + "---:|" * (len(tasks) + 3)]  # fmt: skip
    lines += [method_row(label, tasks, [by_task[t] for t in tasks]) for label, (by_task, _) in rows.items()]
    lines += ["", "| variant | training steps | seconds | steps/s | selected step |", "|---|---:|---:|---:|---:|"]
    for name, result in results.items():
        t = result["training"]
        lines.append(f"| {name} | {t['steps']} | {t['seconds']:.0f} | {t['steps'] / max(t['seconds'], 1e-9):.3f} | "
                     f"{t['selected_step']} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=list(DATASETS), default="ml-100k")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="user_llm settings for every variant (e.g. user_llm.eval_users=100)")  # fmt: skip
    args = parser.parse_args()
    from userlens import stages
    from userlens.llm.pipeline import condition
    from userlens.project import Project

    project = OUT / f"quality-{args.dataset}-project"
    base = dataset_overrides(prepare(project, args.dataset))
    sets = {key: yaml.safe_load(value) for key, value in (o.split("=", 1) for o in args.overrides)}
    proj = Project(project)
    if not (proj.model_dir("barlow_twins") / "encoder.pt").exists():
        stages.pretrain(proj, proj.load_params(overrides=base), progress=False)
    for name in args.variants.split(","):
        params = proj.load_params(overrides={**base, **VARIANTS[name], **sets})  # --set wins
        result = {**condition(proj, params, progress=True), "dataset": args.dataset, "machine": machine()}
        (OUT / f"user_llm-{args.dataset}-{name}.json").write_text(json.dumps(result, indent=2, default=str))
    results = {name: json.loads(path.read_text()) for name in VARIANTS
               if (path := OUT / f"user_llm-{args.dataset}-{name}.json").exists()}  # fmt: skip
    text = table(args.dataset, results)
    (OUT / f"user_llm-{args.dataset}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
