"""Training of the factorization machine on MovieLens, and saving the result.

The schedule follows the classic recipe (k=120, Adam at lr 1e-3, batch 1024,
10 epochs, learning rate x0.1 after epoch 7, truncated-normal init with std
0.01, seeded random 90/10 split) with changes that make it fast on a CPU:

* Batches are slices of one random permutation that index the encoded
  feature tensors directly, with no DataLoader and no per-example Python.
* The embedding tables emit sparse gradients and ``torch.optim.SparseAdam``
  updates only the rows that a batch touches. Adam's ``weight_decay`` would
  touch every row at every step, so L2 regularization is a loss term on the
  touched rows instead (``FactorizationMachine.forward_with_penalty``). Its
  strength ``weight_decay`` is per occurrence and per example, so its scale
  differs from Adam's ``weight_decay``; the default was chosen on the
  early-stopping set (see bench/README.md).
* Early stopping watches a held-out part of the training split, never the
  validation split, and restores the best epoch.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import logging
import math
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from esfm import __version__
from esfm.data import (
    EncodedRatings,
    MovieLensDataset,
    Vocabulary,
    build_vocabulary,
    encode_ratings,
    vocabulary_document,
)
from esfm.errors import ConfigError, ModelError, TrainingError
from esfm.model import FactorizationMachine, FMConfig

logger = logging.getLogger(__name__)

EpochCallback = Callable[[dict[str, Any]], None]
BatchCallback = Callable[[dict[str, Any]], None]

_EVAL_BATCH = 65536
MODEL_FILES = ("model.safetensors", "vocabulary.json", "config.json", "metrics.json")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Training settings; every field is recorded in ``config.json``.

    Attributes:
        k: embedding dimension.
        epochs: maximum number of epochs.
        batch_size: examples per optimizer step.
        lr: initial Adam learning rate.
        weight_decay: L2 strength on the rows a batch touches, per occurrence
            and averaged over the batch (see the module docstring).
        lr_decay_epoch: the learning rate is multiplied by ``lr_decay`` after
            this epoch (1-based); 0 disables the decay.
        lr_decay: learning-rate factor applied after ``lr_decay_epoch``.
        init_std: standard deviation of the truncated-normal initialization.
        seed: seeds the splits, the initialization and the batch order.
        threads: torch intra-op threads; None keeps torch's default.
        patience: stop after this many epochs without improvement on the
            early-stopping set; None trains all epochs.
        valid_fraction: share of ratings held out for the validation RMSE.
        early_stopping_fraction: share of the remaining training ratings held
            out to choose the best epoch; 0 disables early stopping.
        genres: add movie genres as movie-side features.
        cold_start_holdout: share of users held out entirely (with all their
            ratings) for ``esfm evaluate``; 0 trains on all users.
    """

    k: int = 120
    epochs: int = 10
    batch_size: int = 1024
    lr: float = 1e-3
    weight_decay: float = 1e-5
    lr_decay_epoch: int = 7
    lr_decay: float = 0.1
    init_std: float = 0.01
    seed: int = 0
    threads: int | None = None
    patience: int | None = 2
    valid_fraction: float = 0.1
    early_stopping_fraction: float = 0.05
    genres: bool = False
    cold_start_holdout: float = 0.0

    def validate(self) -> None:
        """Raise ConfigError naming the first invalid setting."""
        checks = [
            ("k", self.k >= 1, "a positive integer"),
            ("epochs", self.epochs >= 1, "a positive integer"),
            ("batch_size", self.batch_size >= 1, "a positive integer"),
            ("lr", self.lr > 0 and math.isfinite(self.lr), "a positive number"),
            ("weight_decay", self.weight_decay >= 0, "zero or more"),
            ("lr_decay_epoch", self.lr_decay_epoch >= 0, "zero or more"),
            ("lr_decay", self.lr_decay > 0, "a positive number"),
            ("init_std", self.init_std > 0, "a positive number"),
            ("threads", self.threads is None or self.threads >= 1, "1 or more"),
            ("patience", self.patience is None or self.patience >= 1, "1 or more"),
            ("valid_fraction", 0 < self.valid_fraction < 1, "between 0 and 1"),
            (
                "early_stopping_fraction",
                0 <= self.early_stopping_fraction < 1,
                "from 0 to below 1",
            ),
            (
                "cold_start_holdout",
                0 <= self.cold_start_holdout < 1,
                "from 0 to below 1",
            ),
        ]
        for name, ok, expected in checks:
            if not ok:
                raise ConfigError(
                    f"invalid {name} {getattr(self, name)!r}: must be {expected}"
                )


@dataclasses.dataclass
class TrainResult:
    """A trained model with what is needed to save and evaluate it."""

    model: FactorizationMachine
    vocabulary: Vocabulary
    dataset: MovieLensDataset
    config: TrainConfig
    metrics: dict[str, Any]
    held_out_users: list[int]

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write the model directory; see ``save_model``."""
        return save_model(self, directory)


@dataclasses.dataclass(frozen=True)
class Split:
    """Row positions of the encoded ratings used for each purpose."""

    train: np.ndarray
    early_stopping: np.ndarray
    valid: np.ndarray


def split_ratings(n: int, config: TrainConfig) -> Split:
    """Shuffle ``range(n)`` with the seed and cut validation and early-stopping.

    The validation part is the first ``valid_fraction`` of the permutation, so
    it is the same with or without early stopping.
    """
    order = np.random.default_rng(config.seed).permutation(n)
    n_valid = int(round(n * config.valid_fraction))
    valid, rest = order[:n_valid], order[n_valid:]
    n_stop = int(round(len(rest) * config.early_stopping_fraction))
    return Split(train=rest[n_stop:], early_stopping=rest[:n_stop], valid=valid)


def choose_held_out_users(user_ids: np.ndarray, fraction: float, seed: int):
    """Return the seeded ``fraction`` of ``user_ids`` held out for cold start."""
    ids = np.sort(np.asarray(user_ids, dtype=np.int64))
    count = int(round(len(ids) * fraction))
    order = np.random.default_rng([seed, 1]).permutation(len(ids))
    return np.sort(ids[order[:count]])


def _configure_threads(threads: int | None) -> None:
    if threads is not None:
        torch.set_num_threads(threads)


def rmse(
    model: FactorizationMachine,
    index: torch.Tensor,
    value: torch.Tensor,
    rating: torch.Tensor,
) -> float:
    """Return the root mean squared error of ``model`` on encoded ratings."""
    if len(rating) == 0:
        return float("nan")
    total = 0.0
    with torch.inference_mode():
        for start in range(0, len(rating), _EVAL_BATCH):
            stop = start + _EVAL_BATCH
            predicted = model(index[start:stop], value[start:stop])
            total += float((predicted - rating[start:stop]).pow(2).sum())
    return math.sqrt(total / len(rating))


class _Tensors:
    """Encoded ratings of one split as torch tensors."""

    def __init__(self, encoded: EncodedRatings, rows: np.ndarray) -> None:
        self.index = torch.from_numpy(np.ascontiguousarray(encoded.index[rows]))
        self.value = torch.from_numpy(np.ascontiguousarray(encoded.value[rows]))
        self.rating = torch.from_numpy(np.ascontiguousarray(encoded.rating[rows]))

    def __len__(self) -> int:
        return len(self.rating)


def _optimizers(
    model: FactorizationMachine, config: TrainConfig
) -> list[torch.optim.Optimizer]:
    sparse = [model.embedding.table.weight, model.linear.weight.table.weight]
    return [
        torch.optim.SparseAdam(sparse, lr=config.lr),
        torch.optim.Adam([model.linear.global_bias], lr=config.lr),
    ]


def _check_finite(loss: torch.Tensor, epoch: int, batch: int) -> None:
    if not torch.isfinite(loss):
        raise TrainingError(
            f"training diverged: loss is {float(loss)} at epoch {epoch}, "
            f"batch {batch}; nothing was saved",
            hint="lower --lr or raise --weight-decay, then train again",
        )


def _train_epoch(
    model: FactorizationMachine,
    optimizers: list[torch.optim.Optimizer],
    data: _Tensors,
    config: TrainConfig,
    generator: torch.Generator,
    epoch: int,
    on_batch: BatchCallback | None,
) -> float:
    order = torch.randperm(len(data), generator=generator)
    batches = math.ceil(len(data) / config.batch_size)
    squared_error = 0.0
    seen = 0
    model.train()
    for batch in range(batches):
        rows = order[batch * config.batch_size : (batch + 1) * config.batch_size]
        index = data.index[rows]
        value = data.value[rows]
        target = data.rating[rows]

        predicted, penalty = model.forward_with_penalty(index, value)
        error = (predicted - target).pow(2).sum()
        loss = (error + config.weight_decay * penalty) / len(rows)
        _check_finite(loss, epoch, batch + 1)

        for optimizer in optimizers:
            optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for optimizer in optimizers:
            optimizer.step()

        squared_error += float(error.detach())
        seen += len(rows)
        if on_batch is not None:
            on_batch(
                {
                    "epoch": epoch,
                    "batch": batch + 1,
                    "batches": batches,
                    "train_rmse": math.sqrt(squared_error / seen),
                }
            )
    return math.sqrt(squared_error / seen)


def _snapshot(model: FactorizationMachine) -> dict[str, torch.Tensor]:
    return {name: tensor.clone() for name, tensor in model.state_dict().items()}


def train(
    dataset: MovieLensDataset,
    config: TrainConfig | None = None,
    *,
    on_epoch: EpochCallback | None = None,
    on_batch: BatchCallback | None = None,
) -> TrainResult:
    """Train a factorization machine on ``dataset``.

    Args:
        dataset: ratings and metadata, from ``esfm.data.load_movielens``.
        config: training settings; ``TrainConfig()`` by default.
        on_epoch: called after each epoch with ``epoch``, ``epochs``,
            ``train_rmse``, ``early_stopping_rmse``, ``valid_rmse``, ``lr``,
            ``seconds`` and ``best`` (whether this epoch is the best so far).
        on_batch: called after each optimizer step with ``epoch``, ``batch``,
            ``batches`` and the running ``train_rmse`` of the epoch.

    Returns:
        The model at its best epoch (the last one without early stopping).

    Raises:
        ConfigError: a setting is invalid.
        TrainingError: the loss became NaN or infinite.
    """
    config = config or TrainConfig()
    config.validate()
    _configure_threads(config.threads)
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)

    held_out: list[int] = []
    training_data = dataset
    if config.cold_start_holdout > 0:
        held = choose_held_out_users(
            dataset.users.index.to_numpy(), config.cold_start_holdout, config.seed
        )
        held_out = [int(user) for user in held]
        keep = np.setdiff1d(dataset.users.index.to_numpy(), held)
        training_data = dataset.subset_users(keep)

    vocabulary = build_vocabulary(training_data, genres=config.genres)
    encoded = encode_ratings(training_data, vocabulary)
    split = split_ratings(len(encoded.rating), config)
    train_data = _Tensors(encoded, split.train)
    stop_data = _Tensors(encoded, split.early_stopping)
    valid_data = _Tensors(encoded, split.valid)
    logger.info(
        "training on %s: %d train, %d early-stopping, %d validation ratings, "
        "%d features",
        dataset.name,
        len(train_data),
        len(stop_data),
        len(valid_data),
        vocabulary.size,
    )

    model = FactorizationMachine(
        FMConfig(
            n_features=vocabulary.size,
            k=config.k,
            init_std=config.init_std,
            sparse=True,
        )
    )
    optimizers = _optimizers(model, config)
    use_early_stopping = len(stop_data) > 0
    history: list[dict[str, Any]] = []
    best_score = math.inf
    best_epoch = 0
    best_state = None
    stale = 0

    for epoch in range(1, config.epochs + 1):
        started = time.perf_counter()
        train_rmse = _train_epoch(
            model, optimizers, train_data, config, generator, epoch, on_batch
        )
        train_seconds = time.perf_counter() - started
        model.eval()
        stop_rmse = rmse(model, stop_data.index, stop_data.value, stop_data.rating)
        valid_rmse = rmse(model, valid_data.index, valid_data.value, valid_data.rating)
        lr = optimizers[0].param_groups[0]["lr"]
        score = stop_rmse if use_early_stopping else -epoch
        improved = score < best_score
        if improved:
            best_score, best_epoch, stale = score, epoch, 0
            if use_early_stopping:
                best_state = _snapshot(model)
        else:
            stale += 1
        record = {
            "epoch": epoch,
            "train_rmse": train_rmse,
            "early_stopping_rmse": stop_rmse if use_early_stopping else None,
            "valid_rmse": valid_rmse,
            "lr": lr,
            "seconds": train_seconds,
        }
        history.append(record)
        logger.info(
            "epoch %d: train RMSE %.4f, early-stopping RMSE %.4f, "
            "validation RMSE %.4f, %.1f s",
            epoch,
            train_rmse,
            stop_rmse,
            valid_rmse,
            train_seconds,
        )
        if on_epoch is not None:
            on_epoch({**record, "epochs": config.epochs, "best": improved})

        if config.patience is not None and use_early_stopping:
            if stale >= config.patience:
                logger.info("early stop after epoch %d, best %d", epoch, best_epoch)
                break
        if config.lr_decay_epoch and epoch == config.lr_decay_epoch:
            for optimizer in optimizers:
                for group in optimizer.param_groups:
                    group["lr"] *= config.lr_decay

    if best_state is not None:
        model.load_state_dict(best_state)
    _check_weights(model)
    best = history[best_epoch - 1]
    metrics = {
        "epochs": history,
        "best_epoch": best_epoch,
        "valid_rmse": best["valid_rmse"],
        "early_stopping_rmse": best["early_stopping_rmse"],
        "train_rmse": best["train_rmse"],
        "n_train": len(train_data),
        "n_early_stopping": len(stop_data),
        "n_valid": len(valid_data),
        "seconds_per_epoch": float(np.mean([r["seconds"] for r in history])),
    }
    return TrainResult(model, vocabulary, training_data, config, metrics, held_out)


def _check_weights(model: FactorizationMachine) -> None:
    for name, tensor in model.export_weights().items():
        if not torch.isfinite(tensor).all():
            raise TrainingError(
                f"trained weights {name!r} contain NaN or infinite values; "
                "nothing was saved",
                hint="lower --lr or raise --weight-decay, then train again",
            )


# ---------------------------------------------------------------------------
# Saving


def library_versions() -> dict[str, str]:
    """Return the esfm, torch, numpy and Python versions."""
    import safetensors

    return {
        "esfm": __version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "safetensors": safetensors.__version__,
        "python": platform.python_version(),
    }


def model_id_for(dataset_name: str, weights: dict[str, np.ndarray]) -> str:
    """Derive the model id from the dataset name and a hash of the weights."""
    digest = hashlib.sha256()
    for name in sorted(weights):
        digest.update(name.encode())
        digest.update(np.ascontiguousarray(weights[name]).tobytes())
    return f"{dataset_name}-{digest.hexdigest()[:12]}"


def model_documents(result: TrainResult) -> tuple[dict[str, np.ndarray], dict]:
    """Return the weights and the JSON documents of the model directory."""
    from safetensors.numpy import save

    weights = {
        name: tensor.numpy().astype(np.float32)
        for name, tensor in result.model.export_weights().items()
    }
    model_id = model_id_for(result.dataset.name, weights)
    settings = dataclasses.asdict(result.config)
    config = {
        **settings,
        "dataset": result.dataset.name,
        "model_id": model_id,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "versions": library_versions(),
        "rating_scale": result.model.config.rating_scale,
        "n_features": result.vocabulary.size,
        "movie_side_features": ["movie", "genre"]
        if result.config.genres
        else ["movie"],
        "user_side_features": ["user", "age", "gender", "occupation"],
        "regularization": "l2_on_touched_rows",
        "optimizer": "SparseAdam",
        "cold_start": {
            "holdout_fraction": result.config.cold_start_holdout,
            "seed": result.config.seed,
            "held_out_users": [str(user) for user in result.held_out_users],
        },
    }
    documents = {
        "model.safetensors": save(weights, metadata={"model_id": model_id}),
        "vocabulary.json": vocabulary_document(result.dataset, result.vocabulary),
        "config.json": config,
        "metrics.json": result.metrics,
    }
    return weights, documents


def _write_file(path: Path, payload: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(payload)
        handle.flush()
        os.fsync(handle.fileno())


def _fsync_directory(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _looks_like_model(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


def save_model(result: TrainResult, directory: str | os.PathLike[str]) -> Path:
    """Write the model directory of docs/model-format.md atomically.

    Files go into a temporary sibling directory, each fsynced, and the
    directory is renamed into place. An existing model at ``directory`` is
    renamed aside first and deleted only after the new one is in place, so
    an interrupted save leaves either the old or the new model.

    Returns:
        The model directory.

    Raises:
        ModelError: ``directory`` exists but is not a model directory, or the
            write failed.
    """
    target = Path(directory)
    if target.exists() and not _looks_like_model(target):
        if not target.is_dir() or any(target.iterdir()):
            raise ModelError(
                f"{str(target)!r} exists and is not a model directory; "
                "refusing to replace it",
                hint="choose another --out or remove the folder",
            )
    target.parent.mkdir(parents=True, exist_ok=True)
    _, documents = model_documents(result)

    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        for name, document in documents.items():
            payload = (
                document
                if isinstance(document, bytes)
                else json.dumps(document, indent=2, sort_keys=True).encode()
            )
            _write_file(staging / name, payload)
        _fsync_directory(staging)
        _replace_directory(staging, target)
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise ModelError(
            f"cannot write model directory {str(target)!r}: {exc}",
            hint="check free disk space and permissions",
        ) from exc
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info("saved model %s to %s", documents["config.json"]["model_id"], target)
    return target


def _replace_directory(staging: Path, target: Path) -> None:
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        if old.exists():
            shutil.rmtree(old)
        os.replace(target, old)
    try:
        os.replace(staging, target)
    except BaseException:
        if old is not None:
            os.replace(old, target)
        raise
    _fsync_directory(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
