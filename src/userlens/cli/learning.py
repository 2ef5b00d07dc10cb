"""The learning commands: pretrain, baselines, evaluate, sweep, and `run` (the whole pipeline)."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import click

from userlens.cli import Context, _hide_expected_tracebacks, cli, load_flow
from userlens.project import Project


@cli.command()
@click.option("--no-progress", is_flag=True, help="No progress bars (e.g. in logs).")
@click.pass_obj
def pretrain(obj: Context, no_progress):
    """Train the Barlow Twins user encoder on data/sequences; export its user embeddings.

    The budget is `pretrain.steps` optimiser steps of `pretrain.batch_size` users. Checkpoints
    every `pretrain.eval_every` steps in data/models/barlow_twins/ and resumes from there after
    a crash (same settings and data only). Uses CUDA when present.

    \b
    Examples:
      userlens pretrain
      userlens --set pretrain.steps=2000 --set pretrain.batch_size=64 pretrain
      userlens --set pretrain.selection=probe pretrain     # keep the round with the best validation probe
    """
    from userlens import stages

    manifest = stages.pretrain(obj.project, obj.params(), progress=not no_progress)
    if not manifest:  # a torchrun process other than rank 0: it exports nothing
        return
    selection = manifest["selection"]
    click.echo(
        f"barlow_twins {manifest['model_version']}: {manifest['steps_run']} steps, exported step "
        f"{selection['step']} ({selection['reason']}); embeddings in data/embeddings/barlow_twins.parquet"
    )


@cli.command()
@click.option("--no-progress", is_flag=True, help="No progress bars (e.g. in logs).")
@click.pass_obj
def baselines(obj: Context, no_progress):
    """Train the comparison methods: dual encoder (same budget as pretrain), ALS, handcrafted, random.

    \b
    Examples:
      userlens baselines
      userlens --set baselines.als_factors=32 baselines
    """
    from userlens import stages

    summary = stages.train_baselines(obj.project, obj.params(), progress=not no_progress)
    if not summary:  # a torchrun process other than rank 0
        return
    click.echo(
        "embeddings in data/embeddings/: " + ", ".join(f"{m} ({s['model_version']})" for m, s in summary.items())
    )


@cli.command()
@click.option("--no-progress", is_flag=True, help="No progress bars (e.g. in logs).")
@click.pass_obj
def evaluate(obj: Context, no_progress):
    """Probe every method's frozen embeddings on the downstream tasks with 1-100 % labels.

    Writes reports/metrics.json, reports/report.md and reports/label_curves.png.

    \b
    Examples:
      userlens evaluate
      userlens --set evaluate.seeds=10 --set "evaluate.probes=[logreg]" evaluate
    """
    from userlens import stages

    stages.evaluate(obj.project, obj.params(), progress=not no_progress)
    click.echo((obj.project.reports_dir / "report.md").read_text())


@cli.command()
@click.pass_obj
def sweep(obj: Context):
    """Search Barlow Twins recipes on validation users only, in parallel on Dask.

    Trains every entry of `sweep.candidates` (name -> settings overrides, on top of the
    current settings) on data/sequences as the Prefect flow `recipe_sweep`, each in its own
    Dask worker (a local cluster of `sweep.workers` processes, or the scheduler at
    `sweep.address`), scores each on the validation users' labels only (never a test user),
    and writes reports/sweep.json and reports/sweep.md with the selected recipe.

    \b
    Examples:
      userlens sweep
      userlens --set sweep.address=tcp://scheduler:8786 sweep
      userlens --set 'sweep.candidates={"a": {}, "b": {"pretrain.lambd": 0.05}}' sweep
    """
    if not obj.debug:
        _hide_expected_tracebacks()
    run_sweep = load_flow(obj.project, "run", "sweep_pipeline")
    run_sweep(project_dir=str(obj.project.root), overrides=obj.overrides, params_file=str(obj.params_file))
    click.echo((obj.project.reports_dir / "sweep.md").read_text())


@cli.command()
@click.option("--no-progress", is_flag=True, help="No progress bars (e.g. in logs).")
@click.option("--json", "as_json", is_flag=True, help="Print the run summary as JSON.")
@click.pass_obj
def run(obj: Context, no_progress, as_json):
    """Run the whole pipeline as the Prefect flow `training_pipeline`.

    With no PREFECT_API_URL set, Prefect starts a temporary local server for the run; with
    one set, the run shows in that server's UI.

    \b
    Examples:
      userlens run
      userlens --source movielens --data-dir ../shared/data/ml-100k run
    """
    flow = load_flow(obj.project)
    if not obj.debug:
        _hide_expected_tracebacks()
    summary = flow(
        project_dir=str(obj.project.root),
        overrides=obj.overrides,
        progress=not no_progress,
        params_file=str(obj.params_file),
    )
    if as_json:
        click.echo(json.dumps(summary, indent=2, default=str))
    else:
        click.echo(obj.project.data_summary.read_text())
        click.echo(
            f"Results in {obj.project.root}:\n"
            "  reports/report.md, reports/label_curves.png   downstream evaluation of every method\n"
            "  data/embeddings/<method>.parquet              user embeddings\n"
            "  data/models/<method>/curves.csv               training curves\n"
            "  data/sequences/                               training sequences\n"
            "  reports/data_summary.md, reports/data_docs/   data summary and validation (GX Data Docs)\n"
            "  reports/gate.json, reports/run_report.md      gate decision, run report (also Prefect artifacts)\n"
            "  data/registry/                                model versions and the production alias"
        )
        _echo_release(obj.project, summary)


def _echo_release(project: Project, summary: dict) -> None:
    """What the run released: the gate decision, where the report is, and a lookup that works."""
    from userlens.run_report import example_user

    decision = summary["gate"]
    click.secho(decision["summary"], fg="green" if decision["passed"] else "yellow")
    if "promote" in summary:
        click.echo(summary["promote"]["message"])
    else:
        click.echo("production and the online store are unchanged")
    if "interest" in summary:
        click.echo(f"user_interest {summary['interest']['version']} is served beside it (lookup --interest)")
    click.echo(f"report: {project.relative(project.run_report)}")
    if "promote" not in summary and not decision.get("production_version"):
        click.echo("nothing is served yet: `userlens models` lists the candidate; `userlens promote VERSION --force`")
        return
    user = example_user(project)
    if user is not None:
        where = "" if project.root == Path.cwd().resolve() else f" --project {os.path.relpath(project.root)}"
        click.echo(f"try:    {_invocation()}{where} lookup {user}")


def _invocation() -> str:
    """How this shell reaches the CLI: `userlens` when it is on PATH, else the script's path (e.g. .venv/bin)."""
    script = Path(sys.executable).parent / "userlens"
    on_path = shutil.which("userlens")
    if on_path and Path(on_path).resolve() == script.resolve():
        return "userlens"
    return os.path.relpath(script) if script.exists() else f"{os.path.relpath(sys.executable)} -m userlens"


@cli.command()
@click.option("--publish", is_flag=True, help="Then serve the version's latents as user_context (Feast), when "
              "its encoder is the production one.")  # fmt: skip
@click.option("--stage", is_flag=True, help="As the pipelines run it (dvc.yaml): a no-op, exit 0, unless "
              "user_llm.enabled (reports/user_llm.json then says it is off).")  # fmt: skip
@click.option("--no-progress", is_flag=True, help="No progress bars (e.g. in logs).")
@click.pass_obj
def condition(obj: Context, publish, stage, no_progress):
    """Train a language model conditioned on the user encoder (User-LLM) and score it.

    \b
    The LM (user_llm.llm.model: SmolLM2-135M-Instruct by default, or a local model folder)
    stays frozen; the conditioning (user_llm.mode: soft_prompt or cross_attention, k latents
    from a Perceiver or the pooled embedding) trains on the train users' questions
    (user_llm.tasks). On held-out users it is scored against the same LM without the user
    and with the user's last N events in the prompt -> reports/user_llm.json and .md; the
    trained parts and every user's latents -> data/user_llm/<version>/. Reads the trained
    Barlow Twins candidate; --publish serves the latents (`userlens ask` reads them) once
    that candidate is in production.

    \b
    Examples:
      userlens condition
      userlens condition --publish
      userlens --set user_llm.mode=cross_attention --set user_llm.latents=4 condition
      userlens --set user_llm.llm.model=/models/Qwen2.5-0.5B-Instruct condition
    """
    from userlens.errors import UserlensError
    from userlens.io import utc_now, write_json_atomic
    from userlens.llm.pipeline import candidate_version
    from userlens.llm.pipeline import condition as run_condition
    from userlens.llm.serving import not_servable, publish_context

    params = obj.params()
    if stage and not params.user_llm.enabled:
        message = "user_llm.enabled is off: no conditioned LM trained (`userlens condition` trains one anyway)"
        write_json_atomic(obj.project.reports_dir / "user_llm.json",
                          {"enabled": False, "reason": message, "created_at": utc_now()})  # fmt: skip
        click.echo(message)
        return
    if publish and (reason := not_servable(obj.project, candidate_version(obj.project))):
        raise UserlensError(f"--publish: {reason}")  # said before minutes of training, not after
    result = run_condition(obj.project, params, progress=not no_progress)
    click.echo((obj.project.reports_dir / "user_llm.md").read_text().rstrip())
    click.echo(f"\n({result['seconds']:.0f}s; reports/user_llm.json, data/user_llm/{result['version']}/)")
    if publish:
        done = publish_context(obj.project, params, result["version"], progress=not no_progress)
        click.echo(f"serving user_context {done['model_version']} from slot {done['slot']} ({done['users']:,} users)")
