"""``esfm demo``: the whole main job in one command."""

from __future__ import annotations

import os
from pathlib import Path

import click
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

from esfm import cluster, index_templates
from esfm.artifacts import TrainedModel
from esfm.cli.common import console, handle_errors, project_option
from esfm.cli.index_cmds import print_validation
from esfm.cli.query_cmds import print_outcome
from esfm.config import create_client, resolve_settings
from esfm.data import load_movielens
from esfm.errors import ConfigError, ModelError, ValidationFailed
from esfm.mappings import latest_version
from esfm.migrate import apply_migration, plan_migration
from esfm.project import discover_project
from esfm.query import Recommender
from esfm.templates import load_templates, push_templates
from esfm.train import TrainConfig, save_model, train
from esfm.validate import validate_index

DEMO_USERS = (
    ("a man aged 18-24", {"gender": "M", "age": "18-24"}),
    ("a woman aged 50-55", {"gender": "F", "age": "50-55"}),
)


def _connect(url: str | None):
    if url or os.environ.get("ESFM_URL"):
        return create_client(resolve_settings(url=url))
    state = cluster.read_state()
    if state is None or not state.is_running():
        console.print("[bold]1. starting a local Elasticsearch node[/]")
        state = cluster.start(
            on_progress=lambda event: console.print(f"   {event.message}", style="dim")
        )
    else:
        console.print(f"[bold]1. using the local node at {state.url}[/]")
    return create_client(resolve_settings(url=state.url))


def _model(data: str | None, out: Path, retrain: bool) -> TrainedModel:
    if out.exists() and not retrain:
        try:
            model = TrainedModel.load(out)
            console.print(f"[bold]2. reusing model {model.model_id}[/] from {out}")
            return model
        except ModelError as exc:
            console.print(f"   {out} is not a usable model ({exc.message}); retraining")
    if not data:
        raise ConfigError(
            "no dataset given",
            hint="pass --data DIR (or set ESFM_DATA); to download MovieLens 1M: "
            "esfm data fetch movielens-1m --dest data/",
        )
    dataset = load_movielens(data)
    config = TrainConfig()
    console.print(
        f"[bold]2. training on {data}[/] (k={config.k}, {config.epochs} epochs)"
    )

    def report(epoch: dict) -> None:
        console.print(
            f"   epoch {epoch['epoch']}/{epoch['epochs']}: train RMSE "
            f"{epoch['train_rmse']:.4f}, validation RMSE {epoch['valid_rmse']:.4f} "
            f"({epoch['seconds']:.1f} s)"
        )

    save_model(train(dataset, config, on_epoch=report), out)
    return TrainedModel.load(out)


@click.command("demo")
@click.option("--data", envvar="ESFM_DATA", help="MovieLens folder [env ESFM_DATA].")
@click.option(
    "--out",
    default="models/ml1m",
    show_default=True,
    type=click.Path(file_okay=False),
    help="Model directory to write, or reuse if it exists.",
)
@click.option("--retrain", is_flag=True, help="Train even if --out contains a model.")
@click.option("--alias", default="recsys", show_default=True)
@click.option("--url", help="Use this cluster instead of the local node.")
@click.option("--stop", is_flag=True, help="Stop the local node at the end.")
@project_option
@handle_errors
def demo(data, out, retrain, alias, url, stop, project) -> None:
    """Start a node, train, migrate, push templates, query two new users, validate."""
    client = _connect(url)
    model = _model(data, Path(out), retrain)
    found = discover_project(project)

    console.print("[bold]3. pushing index templates for recsys-*[/]")
    for pushed in index_templates.push_definitions(
        client, index_templates.load_definitions(found.root)
    ):
        console.print(
            f"   {pushed.kind} template {pushed.name} v{pushed.version}: "
            f"{pushed.status}"
        )

    console.print(f"[bold]4. migrating model {model.model_id} behind alias {alias}[/]")
    plan = plan_migration(
        client, model, latest_version(found.mappings_dir, "recsys"), alias=alias
    )
    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    ) as progress:
        task = progress.add_task(f"   bulk {plan.index}", total=plan.doc_count)
        result = apply_migration(
            client,
            plan,
            model,
            on_progress=lambda done, total: progress.update(task, completed=done),
        )
    console.print(f"   alias {alias} -> {result.index} ({result.action})")

    console.print("[bold]5. pushing search templates[/]")
    for pushed in push_templates(client, load_templates(found.templates_dir)):
        where = "stored script" if pushed.stored_script else "rendered locally"
        console.print(f"   {pushed.script_id}: {pushed.status} ({where})")

    console.print("[bold]6. cold-start recommendations[/]")
    recommender = Recommender(client, alias, templates_dir=found.templates_dir)
    for title, profile in DEMO_USERS:
        outcome = recommender.cold_start_outcome(**profile, k=10)
        print_outcome(f"top 10 for {title}", outcome, verbose=True)

    console.print("[bold]7. validating the cluster against the model[/]")
    report = validate_index(client, alias, model)
    print_validation(report)
    if stop:
        cluster.stop()
        console.print("stopped the local node")
    elif url is None and not os.environ.get("ESFM_URL"):
        console.print(
            "the local node is still running: query it with `esfm query`, "
            "stop it with `esfm cluster stop`"
        )
    if not report.ok:
        raise ValidationFailed(f"{alias} disagrees with model {model.model_id}")


COMMANDS = [demo]
