"""The user-conditioned LM (issue 11) on a real dataset: `userlens condition` with the
repository's user_llm settings, in the quality benchmark's scratch project of the dataset
(benchmarks/quality.py makes it; its trained Barlow Twins candidate is the encoder).

    python benchmarks/user_llm.py --dataset ml-100k
    python benchmarks/user_llm.py --dataset ml-100k --set user_llm.mode=soft_prompt

Writes benchmarks/out/user_llm-<dataset>[-<tag>].json and .md: per task, the headline metric of
the LM without the user, with the user's last N events in the prompt, and conditioned.
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=list(DATASETS), default="ml-100k")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="user_llm settings to change (e.g. user_llm.mode=soft_prompt)")  # fmt: skip
    parser.add_argument("--tag", default="", help="suffix of the results files")
    args = parser.parse_args()
    from userlens import stages
    from userlens.llm.pipeline import condition, markdown
    from userlens.project import Project

    project = OUT / f"quality-{args.dataset}-project"
    overrides = dataset_overrides(prepare(project, args.dataset))
    overrides.update({key: yaml.safe_load(value) for key, value in (o.split("=", 1) for o in args.overrides)})
    proj = Project(project)
    params = proj.load_params(overrides=overrides)
    if not (proj.model_dir("barlow_twins") / "encoder.pt").exists():
        stages.pretrain(proj, params, progress=False)
    result = {**condition(proj, params, progress=True), "dataset": args.dataset, "machine": machine()}
    name = f"user_llm-{args.dataset}" + (f"-{args.tag}" if args.tag else "")
    (OUT / f"{name}.json").write_text(json.dumps(result, indent=2, default=str))
    text = f"Dataset: {args.dataset}. Machine: {result['machine']}\n\n" + markdown(result)
    (OUT / f"{name}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
