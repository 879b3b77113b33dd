"""Training of the factorization machine on MovieLens, and saving the result.

The schedule follows the classic recipe (k=120, Adam, batch 1024, 10 epochs,
learning rate x0.1 after epoch 7, truncated-normal init with std 0.01, seeded
random 90/10 split). The recipe's lr 1e-3 and weight decay 1e-5 are replaced
by lr 2e-3 and the L2 strength 0.05 described below, both chosen by the RMSE
on the early-stopping set. Other changes make it fast on a CPU:

* Batches are slices of one random permutation that index the encoded
  feature tensors directly, with no DataLoader and no per-example Python.
* ``FusedTrainer`` keeps embeddings and linear weights in one table, reads
  each distinct row of a batch once, computes the FM gradient by hand and
  sums it per row. ``LazyAdam`` then updates only those rows, as
  ``torch.optim.SparseAdam`` does. The unit tests check the gradient against
  autograd on ``FactorizationMachine``.
* Adam's ``weight_decay`` would touch every row at every step, so L2
  regularization is a loss term on the touched rows instead (see
  ``FactorizationMachine.forward_with_penalty``). Its strength
  ``weight_decay`` is per occurrence and averaged over the batch, so its
  scale differs from Adam's ``weight_decay``. bench/README.md lists the
  values tried.
* Early stopping watches a held-out part of the training split, never the
  validation split, and restores the best epoch.
"""

from __future__ import annotations

import dataclasses
import datetime
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
import torch.nn.functional as F

from esfm import __version__
from esfm.artifacts import weights_digest
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
    lr: float = 2e-3
    weight_decay: float = 0.05
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

    @property
    def model_id(self) -> str:
        """The content-derived id that ``save`` writes into ``config.json``."""
        return model_id_for(self.dataset.name, _export_numpy(self.model))

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


def choose_held_out_users(
    user_ids: np.ndarray, fraction: float, seed: int
) -> np.ndarray:
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


class LazyAdam:
    """Adam that updates only the rows a batch touches (like SparseAdam).

    Row moments decay only when the row is touched, and bias correction uses
    the global step count, as in ``torch.optim.SparseAdam``.
    """

    def __init__(
        self,
        table: torch.Tensor,
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
    ) -> None:
        self.table = table
        self.lr = lr
        self.beta1, self.beta2 = betas
        self.eps = eps
        self.step_count = 0
        self.exp_avg = torch.zeros_like(table)
        self.exp_avg_sq = torch.zeros_like(table)

    def step(self, rows: torch.Tensor, grad: torch.Tensor) -> None:
        """Apply one Adam step to ``table[rows]`` with gradient ``grad``."""
        self.step_count += 1
        correction1 = 1 - self.beta1**self.step_count
        correction2 = 1 - self.beta2**self.step_count
        exp_avg = self.exp_avg.index_select(0, rows)
        exp_avg_sq = self.exp_avg_sq.index_select(0, rows)
        exp_avg.mul_(self.beta1).add_(grad, alpha=1 - self.beta1)
        exp_avg_sq.mul_(self.beta2).addcmul_(grad, grad, value=1 - self.beta2)
        self.exp_avg.index_copy_(0, rows, exp_avg)
        self.exp_avg_sq.index_copy_(0, rows, exp_avg_sq)
        denominator = exp_avg_sq.div_(correction2).sqrt_().add_(self.eps)
        update = exp_avg.div_(denominator).mul_(self.lr / correction1)
        self.table.index_add_(0, rows, update, alpha=-1.0)


# TODO: this step is about 4x faster per epoch than the DataLoader recipe on a
# 2-core CPU (bench/README.md), short of 10x. About a third of its time is
# LazyAdam's index_select/index_copy_/index_add_ on the touched rows. A
# torch.compile of the Adam step (inductor, CPU) ran in 0.32 ms per batch
# against about 0.55 ms eager, but it compiles for about 25 s per process and
# rounds differently from eager, so it is not used.
class FusedTrainer:
    """Training state and the hand-derived FM gradient step.

    ``table[:, :k]`` contains the embeddings and ``table[:, k]`` the linear
    weights, so one gather serves both. The last row is the zero padding row.
    The gradient is derived from the FM formula by hand, and the unit tests
    check it against autograd on ``FactorizationMachine``.
    """

    def __init__(
        self, model: FactorizationMachine, config: TrainConfig, *, one_hot: bool
    ) -> None:
        self.k = model.config.k
        self.scale = model.config.rating_scale
        self.weight_decay = config.weight_decay
        with torch.no_grad():
            self.table = torch.cat(
                [model.embedding.table.weight, model.linear.weight.table.weight],
                dim=1,
            ).contiguous()
            self.bias = model.linear.global_bias.detach().clone().view(1, 1)
        self.padding_row = model.config.n_features
        self.one_hot = one_hot
        self.rows_optimizer = LazyAdam(self.table, config.lr)
        self.bias_optimizer = LazyAdam(self.bias, config.lr)
        self._bias_row = torch.zeros(1, dtype=torch.int64)

    @property
    def lr(self) -> float:
        return self.rows_optimizer.lr

    def set_lr(self, lr: float) -> None:
        self.rows_optimizer.lr = lr
        self.bias_optimizer.lr = lr

    def _distinct_rows(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``torch.unique(index, return_inverse=True)`` without a sort.

        Marking the touched rows of the table and counting them with a cumsum
        gives the same sorted rows and positions in O(table rows + len(index)).
        """
        touched = torch.zeros(len(self.table), dtype=torch.int64)
        touched.index_fill_(0, index, 1)
        position = touched.cumsum(0).sub_(1)
        rows = touched.nonzero().view(-1)
        return rows, position.index_select(0, index)

    def gradients(
        self, index: torch.Tensor, value: torch.Tensor, target: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Compute the gradient of one batch, summed per touched table row.

        The loss is ``(sum_b (y_b - t_b)^2 + weight_decay * penalty) / B``
        with the penalty of ``FactorizationMachine.forward_with_penalty``.
        The per-slot gradient ``d_b x_i (S_b - x_i v_i) + decay v_i`` (with
        ``S_b = sum_i x_i v_i``) is summed per row r as
        ``sum d_b x_i S_b - (sum d_b x_i^2) v_r + decay * count_r * v_r``,
        so no ``[B, F, k]`` tensor is built.

        Returns:
            ``(rows [U], grad [U, k + 1], bias_grad [1, 1], squared_error)``:
            the distinct table rows of the batch, their gradients, the
            gradient of the global bias and the summed squared error.
        """
        batch, fields = index.shape
        k = self.k
        rows, flat = self._distinct_rows(index.reshape(-1))
        inverse = flat.view(batch, fields)
        table = self.table.index_select(0, rows)
        vectors = table[:, :k]
        norms = torch.linalg.vecdot(vectors, vectors)
        weights = table[:, k]
        slot_weights = weights.index_select(0, flat).view(batch, fields)
        slot_norms = norms.index_select(0, flat).view(batch, fields)
        if self.one_hot:
            # Every x_i is 1, so the products with x are skipped.
            summed = F.embedding_bag(inverse, vectors, mode="sum")
            linear = slot_weights.sum(dim=1)
            squares = slot_norms.sum(dim=1)
        else:
            summed = F.embedding_bag(
                inverse, vectors, mode="sum", per_sample_weights=value
            )
            linear = (slot_weights * value).sum(dim=1)
            squares = (slot_norms * value * value).sum(dim=1)
        pairwise = 0.5 * (torch.linalg.vecdot(summed, summed) - squares)
        probability = torch.sigmoid(self.bias.view(1) + linear + pairwise)
        error = probability * self.scale - target
        squared_error = torch.dot(error, error)

        # d loss / d logit of the squared error through sigmoid(.) * scale.
        d_logit = (2.0 / batch) * error * self.scale * probability * (1 - probability)
        slot = d_logit.unsqueeze(1).expand(batch, fields)
        if not self.one_hot:
            slot = slot * value
        # One index_add sums every per-slot term per row. Columns: d_b x_i S_b
        # (k), d_b x_i (the linear weight's gradient), d_b x_i^2 and whether
        # the slot is active (x_i != 0), the last two for the terms in v_r.
        per_slot = torch.empty(batch, fields, k + 3)
        torch.mul(summed.unsqueeze(1), slot.unsqueeze(2), out=per_slot[:, :, :k])
        per_slot[:, :, k] = slot
        if self.one_hot:
            per_slot[:, :, k + 1] = slot
            per_slot[:, :, k + 2] = 1.0
        else:
            per_slot[:, :, k + 1] = slot * value
            per_slot[:, :, k + 2] = value != 0
        sums = torch.zeros(len(rows), k + 3).index_add_(
            0, flat, per_slot.view(-1, k + 3)
        )
        decay = 2.0 * self.weight_decay / batch
        # Per-row factor on the row's own weights: decay * count_r for both
        # parts, minus sum d_b x_i^2 for the embedding part only.
        factor = (decay * sums[:, k + 2]).unsqueeze(1).repeat(1, k + 1)
        factor[:, :k].sub_(sums[:, k + 1].unsqueeze(1))
        grad = torch.addcmul(sums[:, : k + 1], table, factor)
        return rows, grad, d_logit.sum().view(1, 1), squared_error

    def step(
        self, index: torch.Tensor, value: torch.Tensor, target: torch.Tensor
    ) -> float:
        """Run one optimizer step; return the summed squared error.

        A non-finite error skips the update, so the caller can stop cleanly.
        """
        rows, grad, bias_grad, squared_error = self.gradients(index, value, target)
        error_value = float(squared_error)
        if not math.isfinite(error_value):
            return error_value
        self.rows_optimizer.step(rows, grad)
        self.bias_optimizer.step(self._bias_row, bias_grad)
        self.table[self.padding_row].zero_()
        return error_value

    def copy_to(self, model: FactorizationMachine) -> None:
        """Write the current weights into ``model``."""
        with torch.no_grad():
            model.embedding.table.weight.copy_(self.table[:, : self.k])
            model.linear.weight.table.weight.copy_(self.table[:, self.k :])
            model.linear.global_bias.copy_(self.bias.view(1))


def _raise_diverged(error: float, epoch: int, batch: int) -> None:
    raise TrainingError(
        f"training diverged: squared error is {error} at epoch {epoch}, batch {batch}; "
        "nothing was saved",
        hint="lower --lr or raise --weight-decay, then train again",
    )


def _train_epoch(
    trainer: FusedTrainer,
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
    with torch.no_grad():
        for batch in range(batches):
            rows = order[batch * config.batch_size : (batch + 1) * config.batch_size]
            error = trainer.step(
                data.index.index_select(0, rows),
                data.value.index_select(0, rows),
                data.rating.index_select(0, rows),
            )
            if not math.isfinite(error):
                _raise_diverged(error, epoch, batch + 1)
            squared_error += error
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
    one_hot = bool((encoded.value == 1).all())
    trainer = FusedTrainer(model, config, one_hot=one_hot)
    use_early_stopping = len(stop_data) > 0
    history: list[dict[str, Any]] = []
    best_score = math.inf
    best_epoch = 0
    best_state = None
    stale = 0

    for epoch in range(1, config.epochs + 1):
        started = time.perf_counter()
        cpu_started = time.process_time()
        train_rmse = _train_epoch(
            trainer, train_data, config, generator, epoch, on_batch
        )
        train_seconds = time.perf_counter() - started
        cpu_seconds = time.process_time() - cpu_started
        trainer.copy_to(model)
        model.eval()
        stop_rmse = rmse(model, stop_data.index, stop_data.value, stop_data.rating)
        valid_rmse = rmse(model, valid_data.index, valid_data.value, valid_data.rating)
        lr = trainer.lr
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
            "cpu_seconds": cpu_seconds,
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
            trainer.set_lr(trainer.lr * config.lr_decay)

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
        "cpu_seconds_per_epoch": float(np.mean([r["cpu_seconds"] for r in history])),
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


def _export_numpy(model: FactorizationMachine) -> dict[str, np.ndarray]:
    return {
        name: tensor.numpy().astype(np.float32)
        for name, tensor in model.export_weights().items()
    }


def model_id_for(dataset_name: str, weights: dict[str, np.ndarray]) -> str:
    """Derive the model id from the dataset name and a hash of the weights.

    ``TrainedModel.load`` checks the same digest, so edited weights are caught.
    """
    return f"{dataset_name}-{weights_digest(weights)[:12]}"


def model_documents(result: TrainResult) -> tuple[dict[str, np.ndarray], dict]:
    """Return the weights and the JSON documents of the model directory."""
    from safetensors.numpy import save

    weights = _export_numpy(result.model)
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
        "optimizer": "lazy_adam",
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
