"""Compare esfm's trainer with the classic FM training recipe on MovieLens 1M.

The recipe baseline is implemented here as it is usually written: a
second-order FM in PyTorch (k=120, sigmoid(.) * 5.5, truncated-normal init
with std 0.01), Adam at lr 1e-3 with weight decay 1e-5, batch 1024 from a
``torch.utils.data.DataLoader`` over a ``TensorDataset``, 10 epochs, learning
rate x0.1 after epoch 7, random 90/10 split. Both trainers use the same
features (user, movie, age, gender, occupation) and the same validation
ratings; the recipe trains on all of the other 90%.

The recipe runs once per ``--recipe-threads`` value (1 and 2 by default)
and the faster run is the baseline of the speedup, so esfm's one-thread
default is not compared with a recipe slowed by a thread count it does not
suit. esfm runs once per ``--optimizers`` value, with its default settings
otherwise, and its one-time compile (Numba's, or the load from its on-disk
cache) is reported in its own column instead of in the epochs.

The cold-start phase trains esfm with 10% of users held out, once per
``--user-dropouts`` value (0 and 0.1 by default), and scores the held-out
users from their metadata against the movie-bias and popularity baselines.

Each phase runs in its own spawned process, so its peak RSS is its own.
``--recipe-epochs N`` runs only N recipe epochs. The recipe's seconds per
epoch are then the mean over those N epochs and its RMSE is the RMSE after N
epochs, and the printed table and a NOTE line state this.

Usage:
    python bench/train_vs_recipe.py [--data DIR] [--recipe-epochs 10]
        [--recipe-threads 1 2] [--optimizers rowwise_adam adam]
        [--user-dropouts 0 0.1]
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import multiprocessing
import os
import platform
import resource
import sys
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
RECIPE_EPOCHS = 10


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _encoded(data_dir: str):
    from esfm.data import build_vocabulary, encode_ratings, load_movielens
    from esfm.train import TrainConfig, split_ratings

    dataset = load_movielens(data_dir)
    vocabulary = build_vocabulary(dataset, genres=False)
    encoded = encode_ratings(dataset, vocabulary)
    split = split_ratings(len(encoded.rating), TrainConfig())
    return dataset, vocabulary, encoded, split


def run_recipe(data_dir: str, epochs: int, threads: int, seed: int) -> dict[str, Any]:
    """Train the classic recipe; return its timings and validation RMSE."""
    import numpy as np
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    _, vocabulary, encoded, split = _encoded(data_dir)
    train_rows = np.concatenate([split.train, split.early_stopping])
    x_train = torch.from_numpy(encoded.index[train_rows])
    y_train = torch.from_numpy(encoded.rating[train_rows])
    x_valid = torch.from_numpy(encoded.index[split.valid])
    y_valid = torch.from_numpy(encoded.rating[split.valid])

    class RecipeFM(nn.Module):
        def __init__(self, n: int, k: int) -> None:
            super().__init__()
            self.bias = nn.Parameter(torch.zeros(1))
            self.linear = nn.Embedding(n, 1)
            self.embedding = nn.Embedding(n, k)
            nn.init.trunc_normal_(self.linear.weight, std=0.01)
            nn.init.trunc_normal_(self.embedding.weight, std=0.01)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            v = self.embedding(x)
            linear = self.bias + self.linear(x).sum(dim=(1, 2))
            pairwise = 0.5 * (v.sum(dim=1).pow(2) - v.pow(2).sum(dim=1)).sum(dim=1)
            return torch.sigmoid(linear + pairwise) * 5.5

    model = RecipeFM(vocabulary.size, 120)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-5)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=7, gamma=0.1)
    loader = DataLoader(
        TensorDataset(x_train, y_train),
        batch_size=1024,
        shuffle=True,
        generator=torch.Generator().manual_seed(seed),
    )
    loss_fn = nn.MSELoss()
    seconds = []
    cpu_seconds = []
    valid_rmse = math.nan
    for _ in range(epochs):
        started = time.perf_counter()
        cpu_started = time.process_time()
        model.train()
        for x, y in loader:
            optimizer.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            optimizer.step()
        scheduler.step()
        seconds.append(time.perf_counter() - started)
        cpu_seconds.append(time.process_time() - cpu_started)
        model.eval()
        with torch.no_grad():
            valid_rmse = float(loss_fn(model(x_valid), y_valid).sqrt())
    return {
        "threads": threads,
        "epochs_timed": epochs,
        "seconds": seconds,
        "seconds_per_epoch": sum(seconds) / len(seconds),
        "cpu_seconds_per_epoch": sum(cpu_seconds) / len(cpu_seconds),
        "n_train": len(y_train),
        "valid_rmse": valid_rmse,
        "peak_rss_mib": _peak_rss_mib(),
    }


def run_esfm(data_dir: str, optimizer: str, seed: int) -> dict[str, Any]:
    """Train esfm with its defaults; return its timings and validation RMSE."""
    from esfm.data import load_movielens
    from esfm.train import TrainConfig, train

    dataset = load_movielens(data_dir)
    result = train(dataset, TrainConfig(optimizer=optimizer, seed=seed))
    metrics = result.metrics
    return {
        "optimizer": optimizer,
        "threads": metrics["threads"],
        "kernel": metrics["kernel"],
        "compile_seconds": metrics["compile_seconds"],
        "epochs_run": len(metrics["epochs"]),
        "best_epoch": metrics["best_epoch"],
        "seconds": [epoch["seconds"] for epoch in metrics["epochs"]],
        "seconds_per_epoch": metrics["seconds_per_epoch"],
        "cpu_seconds_per_epoch": metrics["cpu_seconds_per_epoch"],
        "n_train": metrics["n_train"],
        "valid_rmse": metrics["valid_rmse"],
        "peak_rss_mib": _peak_rss_mib(),
    }


def run_cold_start(data_dir: str, seed: int, user_dropout: float) -> dict[str, Any]:
    """Train esfm with 10% of users held out and score them from metadata."""
    import tempfile

    from esfm.artifacts import TrainedModel
    from esfm.data import load_movielens
    from esfm.evaluate import cold_start_metrics
    from esfm.train import TrainConfig, save_model, train

    dataset = load_movielens(data_dir)
    config = TrainConfig(seed=seed, cold_start_holdout=0.1, user_dropout=user_dropout)
    result = train(dataset, config)
    with tempfile.TemporaryDirectory() as folder:
        model = TrainedModel.load(save_model(result, Path(folder) / "model"))
        metrics = cold_start_metrics(model, dataset, result.held_out_users)
    metrics["valid_rmse"] = result.metrics["valid_rmse"]
    metrics["user_dropout"] = user_dropout
    metrics["peak_rss_mib"] = _peak_rss_mib()
    return metrics


def _in_child(function, *args):
    context = multiprocessing.get_context("spawn")
    with context.Pool(1) as pool:
        return pool.apply(function, args)


def _speed_row(label: str, run: dict[str, Any]) -> list[str]:
    compile_seconds = run.get("compile_seconds")
    return [
        label,
        str(run["threads"]),
        f"{run['seconds_per_epoch']:.2f}",
        f"{run['cpu_seconds_per_epoch']:.2f}",
        f"{run['n_train'] / run['seconds_per_epoch']:,.0f}",
        f"{run['valid_rmse']:.4f}",
        "-" if compile_seconds is None else f"{compile_seconds:.1f}",
        f"{run['peak_rss_mib']:.0f}",
    ]


def _metric(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def main(argv: list[str] | None = None) -> int:
    from rich.console import Console
    from rich.table import Table

    from esfm.train import OPTIMIZER_DEFAULTS, library_versions

    root = os.environ.get("ESFM_TEST_DATA")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data", type=Path, default=Path(root) / "ml-1m" if root else None
    )
    parser.add_argument("--recipe-epochs", type=int, default=RECIPE_EPOCHS)
    parser.add_argument("--recipe-threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument(
        "--optimizers",
        nargs="+",
        choices=sorted(OPTIMIZER_DEFAULTS),
        default=list(OPTIMIZER_DEFAULTS),
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-cold-start", action="store_true")
    parser.add_argument(
        "--user-dropouts",
        type=float,
        nargs="+",
        default=[0.0, 0.1],
        help="train one cold-start model per user-dropout share",
    )
    args = parser.parse_args(argv)
    # Wide enough for the table when the output goes to a file.
    console = Console(width=None if sys.stdout.isatty() else 120)
    if args.data is None:
        console.print("pass --data DIR or set ESFM_TEST_DATA")
        return 2
    data_dir = str(args.data)

    esfm_runs = []
    for optimizer in args.optimizers:
        console.print(f"training esfm ({optimizer}) ...")
        esfm_runs.append(_in_child(run_esfm, data_dir, optimizer, args.seed))
    recipe_runs = []
    for threads in args.recipe_threads:
        console.print(
            f"training the recipe for {args.recipe_epochs} epoch(s) "
            f"with {threads} thread(s) ..."
        )
        recipe_runs.append(
            _in_child(run_recipe, data_dir, args.recipe_epochs, threads, args.seed)
        )
    cold_runs = []
    if not args.no_cold_start:
        for dropout in args.user_dropouts:
            console.print(
                f"training esfm with 10% of users held out, user dropout {dropout} ..."
            )
            cold_runs.append(_in_child(run_cold_start, data_dir, args.seed, dropout))

    baseline = min(recipe_runs, key=lambda run: run["seconds_per_epoch"])
    for run in esfm_runs:
        run["speedup_seconds_per_epoch"] = (
            baseline["seconds_per_epoch"] / run["seconds_per_epoch"]
        )
        run["speedup_cpu_seconds_per_epoch"] = (
            baseline["cpu_seconds_per_epoch"] / run["cpu_seconds_per_epoch"]
        )
        # The recipe also trains on esfm's early-stopping share, so its epochs
        # have about 5% more ratings. This ratio counts per rating, which makes
        # it the fairest of the three.
        run["speedup_ratings_per_second"] = (
            run["n_train"] / run["seconds_per_epoch"]
        ) / (baseline["n_train"] / baseline["seconds_per_epoch"])
    partial = args.recipe_epochs < RECIPE_EPOCHS
    report = {
        "benchmark": "train_vs_recipe",
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "load_average": os.getloadavg(),
        },
        "versions": library_versions(),
        "esfm": esfm_runs,
        "recipe": [{**run, "partial": partial} for run in recipe_runs],
        "baseline_recipe_threads": baseline["threads"],
        "cold_start": cold_runs,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = RESULTS / f"train_vs_recipe-{stamp}.json"
    path.write_text(json.dumps(report, indent=2))

    table = Table(title="Training on MovieLens 1M, same split and machine")
    columns = (
        "trainer",
        "threads",
        "s/epoch",
        "CPU s/epoch",
        "ratings/s",
        "valid RMSE",
        "compile s",
        "RSS MiB",
    )
    for column in columns:
        table.add_column(column, justify="right")
    recipe_label = "recipe"
    if partial:
        recipe_label = f"recipe ({args.recipe_epochs} of {RECIPE_EPOCHS} epochs)"
    for run in recipe_runs:
        table.add_row(*_speed_row(recipe_label, run))
    for run in esfm_runs:
        table.add_row(*_speed_row(f"esfm {run['optimizer']}", run))
    console.print(table)
    for run in esfm_runs:
        console.print(
            f"speedup of esfm {run['optimizer']} over the recipe with "
            f"{baseline['threads']} thread(s), its faster run: "
            f"{run['speedup_seconds_per_epoch']:.1f}x in wall seconds per epoch, "
            f"{run['speedup_cpu_seconds_per_epoch']:.1f}x in CPU seconds per epoch, "
            f"{run['speedup_ratings_per_second']:.1f}x in ratings per second"
        )
    console.print(
        f"load average {report['machine']['load_average'][0]:.1f} on "
        f"{os.cpu_count()} CPUs"
    )
    if partial:
        console.print(
            f"NOTE: the recipe ran {args.recipe_epochs} of {RECIPE_EPOCHS} epochs; "
            "its s/epoch is the mean of those epochs and its RMSE is the RMSE after "
            f"{args.recipe_epochs} epoch(s), not after the full schedule."
        )
    for run in esfm_runs:
        console.print(
            f"esfm {run['optimizer']}: {run['epochs_run']} epochs run, "
            f"best epoch {run['best_epoch']}"
        )

    if cold_runs:
        first = cold_runs[0]
        cold_table = Table(
            title=f"Cold start: {first['held_out_users']} held-out users, "
            f"{first['held_out_ratings']} ratings, metadata only"
        )
        for column in ("scorer", "RMSE", "NDCG@10", "Recall@10", "warm RMSE"):
            cold_table.add_column(column, justify="right")
        rows = [
            (f"esfm FM, user dropout {run['user_dropout']:g}", run["model"], run)
            for run in cold_runs
        ]
        rows += [(name, metrics, None) for name, metrics in first["baselines"].items()]
        for name, metrics, run in rows:
            cold_table.add_row(
                name,
                _metric(metrics.get("rmse")),
                _metric(metrics.get("ndcg@10")),
                _metric(metrics.get("recall@10")),
                "-" if run is None else _metric(run["valid_rmse"]),
            )
        console.print(cold_table)
        console.print(
            "warm RMSE: validation RMSE of the same model on its training users; "
            f"peak RSS {max(run['peak_rss_mib'] for run in cold_runs):.0f} MiB"
        )
    console.print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
