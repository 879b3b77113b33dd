"""Commands `esfm train`, `esfm evaluate` and `esfm data` over the library."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from esfm.cli.common import console, handle_errors, json_option, print_json
from esfm.errors import ConfigError

_DATA_HELP = "MovieLens folder (ml-1m or ml-100k files); defaults to $ESFM_DATA."


def _data_option(func: Any) -> Any:
    return click.option(
        "--data",
        "data_dir",
        envvar="ESFM_DATA",
        type=click.Path(file_okay=False, path_type=Path),
        help=_DATA_HELP,
    )(func)


def _require_data(data_dir: Path | None) -> Path:
    if data_dir is None:
        raise ConfigError(
            "no dataset given",
            hint="pass --data DIR or set ESFM_DATA to a MovieLens folder",
        )
    return data_dir


def _format(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def _epoch_table(metrics: dict[str, Any]) -> Table:
    table = Table(title="Training")
    for column in ("epoch", "train RMSE", "early-stop RMSE", "valid RMSE", "lr", "s"):
        table.add_column(column, justify="right")
    for record in metrics["epochs"]:
        marker = " *" if record["epoch"] == metrics["best_epoch"] else ""
        table.add_row(
            f"{record['epoch']}{marker}",
            _format(record["train_rmse"]),
            _format(record["early_stopping_rmse"]),
            _format(record["valid_rmse"]),
            f"{record['lr']:.0e}",
            f"{record['seconds']:.1f}",
        )
    return table


def check_model_destination(out: Path) -> None:
    """Raise ModelError now if --out cannot take a model, before training starts."""
    from esfm.train import check_model_destination as check

    check(out)


@click.command()
@_data_option
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    default=Path("models/ml1m"),
    show_default=True,
    help="Model directory to write; an existing model there is replaced.",
)
@click.option("--k", type=int, default=120, show_default=True, help="Embedding size.")
@click.option("--epochs", type=int, default=10, show_default=True, help="Max epochs.")
@click.option(
    "--batch-size",
    type=int,
    default=None,
    help="Ratings per optimizer step.  [default: 1024]",
)
@click.option(
    "--optimizer",
    type=click.Choice(["rowwise_adam", "adam"]),
    default="rowwise_adam",
    show_default=True,
    help="rowwise_adam keeps one second moment per embedding row and runs "
    "faster; adam keeps one per weight and reaches a slightly lower RMSE.",
)
@click.option(
    "--lr",
    type=float,
    default=None,
    help="Initial learning rate.  [default: 0.003 with rowwise_adam, 0.002 with adam]",
)
@click.option(
    "--weight-decay",
    type=float,
    default=None,
    help="L2 strength on the feature rows of each batch, per occurrence and "
    "averaged over the batch.  [default: 0.065 with rowwise_adam, 0.05 with "
    "adam]",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Random seed.")
@click.option(
    "--threads",
    type=int,
    default=1,
    show_default=True,
    help="Torch CPU threads while training, for the torch kernels and the RMSE "
    "passes (the numba kernel runs on one); the step's tensors are small, so "
    "more threads often run slower.",
)
@click.option(
    "--kernel",
    type=click.Choice(["numba", "torch-compile", "torch"]),
    default="numba",
    show_default=True,
    help="How the training step runs: numba is a fused Numba kernel and the "
    "fastest; torch-compile runs the torch step through torch.compile (needs a "
    "C++ compiler); torch runs it eagerly, several times slower.",
)
@click.option(
    "--patience",
    type=int,
    default=None,
    help="Epochs without improvement on the early-stopping set before "
    "stopping.  [default: 2]",
)
@click.option(
    "--genres/--no-genres",
    default=None,
    help="Add movie genres as movie-side features.  [default: --no-genres]",
)
@click.option(
    "--cold-start-holdout",
    type=float,
    default=0.0,
    show_default=True,
    help="Share of users to hold out entirely for `esfm evaluate` (0.1 = 10%).",
)
@click.option(
    "--user-dropout",
    type=float,
    default=0.0,
    show_default=True,
    help="Share of training ratings per epoch whose user id is left out "
    "(0.1 = 10%); better cold-start ratings, slightly worse ones for known "
    "users.",
)
@json_option
@handle_errors
def train(
    data_dir: Path | None,
    out: Path,
    k: int,
    epochs: int,
    batch_size: int | None,
    optimizer: str,
    lr: float | None,
    weight_decay: float | None,
    seed: int,
    threads: int,
    kernel: str,
    patience: int | None,
    genres: bool | None,
    cold_start_holdout: float,
    user_dropout: float,
    as_json: bool,
) -> None:
    """Train a factorization machine on MovieLens and save it to --out."""
    from esfm.data import load_movielens
    from esfm.train import TrainConfig
    from esfm.train import train as train_model

    settings: dict[str, Any] = {
        "k": k,
        "epochs": epochs,
        "seed": seed,
        "threads": threads,
        "kernel": kernel,
        "optimizer": optimizer,
        "cold_start_holdout": cold_start_holdout,
        "user_dropout": user_dropout,
    }
    overrides = {
        "batch_size": batch_size,
        "lr": lr,
        "weight_decay": weight_decay,
        "patience": patience,
        "genres": genres,
    }
    settings.update(
        {key: value for key, value in overrides.items() if value is not None}
    )
    config = TrainConfig(**settings)
    config.validate()
    check_model_destination(out)
    dataset = load_movielens(_require_data(data_dir))

    with Progress(
        TextColumn("epoch {task.fields[epoch]}/{task.fields[epochs]}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("train RMSE {task.fields[train]}"),
        TextColumn("valid RMSE {task.fields[valid]}"),
        TimeElapsedColumn(),
        console=console,
        transient=as_json,
        disable=as_json,
    ) as progress:
        task = progress.add_task(
            "train", total=None, epoch=1, epochs=epochs, train="-", valid="-"
        )

        def on_batch(event: dict[str, Any]) -> None:
            progress.update(
                task,
                total=event["batches"],
                completed=event["batch"],
                epoch=event["epoch"],
                train=f"{event['train_rmse']:.4f}",
            )

        def on_epoch(event: dict[str, Any]) -> None:
            progress.update(task, valid=f"{event['valid_rmse']:.4f}")

        result = train_model(dataset, config, on_epoch=on_epoch, on_batch=on_batch)
    path = result.save(out)
    model_id = result.model_id
    if as_json:
        print_json({"model_id": model_id, "path": str(path), **result.metrics})
        return
    console.print(_epoch_table(result.metrics))
    console.print(
        f"saved model [bold]{model_id}[/] to {path} "
        f"(best epoch {result.metrics['best_epoch']}, "
        f"validation RMSE {result.metrics['valid_rmse']:.4f})"
    )


def _metrics_table(result: dict[str, Any]) -> Table:
    table = Table(title=f"Model {result['model_id']} on {result['dataset']}")
    table.add_column("scorer")
    for column in ("RMSE", "NDCG@10", "Recall@10"):
        table.add_column(column, justify="right")
    table.add_row("validation split", _format(result["valid_rmse"]), "-", "-")
    cold = result["cold_start"]
    if cold is not None:
        rows = [("cold start: model", cold["model"])]
        rows += [(f"cold start: {name}", m) for name, m in cold["baselines"].items()]
        for name, metrics in rows:
            table.add_row(
                name,
                _format(metrics.get("rmse")),
                _format(metrics.get("ndcg@10")),
                _format(metrics.get("recall@10")),
            )
    return table


@click.command()
@click.option(
    "--model",
    "model_dir",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Model directory written by `esfm train`.",
)
@_data_option
@json_option
@handle_errors
def evaluate(model_dir: Path, data_dir: Path | None, as_json: bool) -> None:
    """Report validation RMSE and, for --cold-start-holdout models, cold start."""
    from esfm.evaluate import evaluate_model

    result = evaluate_model(model_dir, _require_data(data_dir))
    if as_json:
        print_json(result)
        return
    console.print(_metrics_table(result))
    if result["cold_start"] is None:
        console.print(
            "no cold-start metrics: the model was trained on all users; "
            "train with --cold-start-holdout 0.1 to get them"
        )


@click.group()
def data() -> None:
    """Download and inspect MovieLens datasets."""


@data.command()
@click.argument("name", type=click.Choice(["movielens-1m", "movielens-100k"]))
@click.option(
    "--dest",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Folder that receives ml-1m/ or ml-100k/.",
)
@handle_errors
def fetch(name: str, dest: Path) -> None:
    """Download a MovieLens dataset from files.grouplens.org."""
    from esfm.data import fetch_movielens

    with Progress(
        TextColumn(name),
        BarColumn(),
        DownloadColumn(),
        TimeRemainingColumn(),
        console=console,
    ) as progress:
        task = progress.add_task("download", total=None)

        def on_progress(received: int, total: int | None) -> None:
            progress.update(task, completed=received, total=total)

        path = fetch_movielens(name, dest, on_progress)
    console.print(f"extracted {name} to {path}")


@data.command()
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@json_option
@handle_errors
def info(directory: Path, as_json: bool) -> None:
    """Load a MovieLens folder, validate it and print its counts."""
    from esfm.data import load_movielens

    summary = load_movielens(directory).summary()
    if as_json:
        print_json(summary)
        return
    table = Table(title=f"{summary['dataset']} in {directory}")
    table.add_column("field")
    table.add_column("value", justify="right")
    for key in ("ratings", "users", "movies", "rated_movies", "mean_rating"):
        table.add_row(key, _format(summary[key]))
    for rating, count in summary["rating_counts"].items():
        table.add_row(f"rating {rating}", str(count))
    table.add_row("genres", str(len(summary["genres"])))
    console.print(table)


COMMANDS = [train, evaluate, data]
