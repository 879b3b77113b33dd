"""Train esfm on MovieLens 1M with the default settings and record the figures.

Records, per seed, the validation RMSE (random 90/10 split), the best epoch,
the training seconds per epoch and the peak resident memory, writes them as
JSON to bench/results/ and prints a table.

Usage:
    python bench/train_ml1m.py [--data DIR] [--seeds 0 1 2] [--threads 1]
        [--optimizer adam] [--kernel torch-compile] [--genres]
        [--user-dropout 0.1]

``--data`` defaults to ``$ESFM_TEST_DATA/ml-1m``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from esfm.data import load_movielens
from esfm.train import (
    KERNELS,
    OPTIMIZER_DEFAULTS,
    TrainConfig,
    library_versions,
    train,
)

RESULTS = Path(__file__).resolve().parent / "results"


def peak_rss_mib() -> float:
    """Peak resident set size of this process in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def default_data_dir() -> Path | None:
    root = os.environ.get("ESFM_TEST_DATA")
    return Path(root) / "ml-1m" if root else None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=default_data_dir())
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=TrainConfig.threads)
    parser.add_argument(
        "--optimizer", choices=sorted(OPTIMIZER_DEFAULTS), default=TrainConfig.optimizer
    )
    parser.add_argument("--kernel", choices=KERNELS, default=TrainConfig.kernel)
    parser.add_argument("--genres", action="store_true", help="add genre features")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--user-dropout", type=float, default=TrainConfig.user_dropout)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    console = Console(width=None if sys.stdout.isatty() else 120)
    if args.data is None:
        console.print("pass --data DIR or set ESFM_TEST_DATA")
        return 2

    started = time.perf_counter()
    dataset = load_movielens(args.data)
    load_seconds = time.perf_counter() - started

    runs = []
    for seed in args.seeds:
        settings = {
            "seed": seed,
            "threads": args.threads,
            "genres": args.genres,
            "user_dropout": args.user_dropout,
            "optimizer": args.optimizer,
            "kernel": args.kernel,
        }
        if args.epochs is not None:
            settings["epochs"] = args.epochs
        config = TrainConfig(**settings)
        started = time.perf_counter()
        result = train(dataset, config)
        total = time.perf_counter() - started
        metrics = result.metrics
        runs.append(
            {
                "seed": seed,
                "valid_rmse": metrics["valid_rmse"],
                "best_epoch": metrics["best_epoch"],
                "epochs_run": len(metrics["epochs"]),
                "seconds_per_epoch": metrics["seconds_per_epoch"],
                "cpu_seconds_per_epoch": metrics["cpu_seconds_per_epoch"],
                "ratings_per_second": metrics["n_train"] / metrics["seconds_per_epoch"],
                "total_seconds": total,
                "kernel": metrics["kernel"],
                "compile_seconds": metrics["compile_seconds"],
                "config": dataclasses.asdict(config),
            }
        )
        console.print(
            f"seed {seed}: validation RMSE {metrics['valid_rmse']:.4f} "
            f"(best epoch {metrics['best_epoch']}), "
            f"{metrics['seconds_per_epoch']:.2f} s/epoch"
        )

    rmse = [run["valid_rmse"] for run in runs]
    report = {
        "benchmark": "train_ml1m",
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "load_average": os.getloadavg(),
        },
        "versions": library_versions(),
        "load_seconds": load_seconds,
        "runs": runs,
        "valid_rmse_mean": statistics.fmean(rmse),
        "valid_rmse_stdev": statistics.stdev(rmse) if len(rmse) > 1 else 0.0,
        "peak_rss_mib": peak_rss_mib(),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = RESULTS / f"train_ml1m-{stamp}.json"
    path.write_text(json.dumps(report, indent=2))

    table = Table(
        title=f"esfm ({args.optimizer}, {args.kernel} kernel) on MovieLens 1M "
        "(90/10 random split)"
    )
    for column in (
        "seed",
        "valid RMSE",
        "best epoch",
        "s/epoch",
        "CPU s/epoch",
        "ratings/s",
        "compile s",
    ):
        table.add_column(column, justify="right")
    for run in runs:
        table.add_row(
            str(run["seed"]),
            f"{run['valid_rmse']:.4f}",
            str(run["best_epoch"]),
            f"{run['seconds_per_epoch']:.2f}",
            f"{run['cpu_seconds_per_epoch']:.2f}",
            f"{run['ratings_per_second']:,.0f}",
            "-" if run["compile_seconds"] is None else f"{run['compile_seconds']:.1f}",
        )
    table.add_row(
        "mean", f"{report['valid_rmse_mean']:.4f}", "", "", "", "", "", end_section=True
    )
    console.print(table)
    console.print(f"peak RSS {report['peak_rss_mib']:.0f} MiB; wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
