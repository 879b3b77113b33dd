"""Training of the factorization machine on MovieLens, and saving the result.

The schedule follows the classic recipe (k=120, Adam, batch 1024, 10 epochs,
learning rate x0.1 after epoch 7, truncated-normal init with std 0.01, seeded
random 90/10 split). The recipe's Adam with lr 1e-3 and weight decay 1e-5 is
replaced by a lazy row-wise Adam with lr 3e-3 and the L2 strength 0.065
described below (or a lazy Adam with lr 2e-3 and 0.05), chosen by the RMSE on
the early-stopping set. Other changes make it fast on a CPU:

* Each epoch gathers the encoded feature tensors once in a random order, and
  its batches are slices of them, with no DataLoader and no per-example
  Python.
* ``FusedTrainer`` keeps embeddings, linear weights and their Adam moments
  in one table, reads each distinct row of a batch once, computes the FM
  gradient by hand, sums it per row and updates only those rows, as
  ``torch.optim.SparseAdam`` does. The unit tests check the gradient against
  autograd on ``FactorizationMachine``.
* The step runs as one Numba kernel by default (``esfm.numba_step``), which
  walks the batch without building ``[slots, k]`` tensors and updates the
  rows in place. The same step in torch tensor operations, eager or through
  ``torch.compile``, is kept as the reference that the kernel is tested
  against.
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

import contextlib
import dataclasses
import datetime
import errno
import glob
import json
import logging
import math
import numbers
import os
import platform
import re
import shutil
import signal
import stat
import tempfile
import time
from collections.abc import Callable, Iterator
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
from esfm.lock import process_is_running
from esfm.model import FactorizationMachine, FMConfig

logger = logging.getLogger(__name__)

EpochCallback = Callable[[dict[str, Any]], None]
BatchCallback = Callable[[dict[str, Any]], None]

_EVAL_BATCH = 65536
MODEL_FILES = ("model.safetensors", "vocabulary.json", "config.json", "metrics.json")


# Elasticsearch's dense_vector takes at most 4096 dimensions, and rank_vector
# has k + 1 of them.
MAX_K = 4095
MAX_THREADS = 1024

# Ways to run the training step: the Numba kernel, the torch step through
# torch.compile, and the eager torch step.
KERNELS = ("numba", "torch-compile", "torch")

# With a progress callback, the Numba kernel runs this many batches per call
# between callbacks, which keeps the callback's Python cost out of each step.
_BATCHES_PER_CALL = 32

# Learning rate and L2 strength of each optimizer, chosen by the
# early-stopping RMSE on MovieLens 1M (bench/README.md lists the runs).
OPTIMIZER_DEFAULTS = {
    "rowwise_adam": {"lr": 3e-3, "weight_decay": 0.065},
    "adam": {"lr": 2e-3, "weight_decay": 0.05},
}


_INTEGER_FIELDS = (
    "k",
    "epochs",
    "batch_size",
    "lr_decay_epoch",
    "seed",
    "threads",
    "patience",
)
_OPTIONAL = ("threads", "patience")
_REAL_FIELDS = (
    "lr",
    "weight_decay",
    "lr_decay",
    "init_std",
    "valid_fraction",
    "early_stopping_fraction",
    "cold_start_holdout",
    "user_dropout",
)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Training settings; every field is recorded in ``config.json``.

    Attributes:
        k: embedding dimension.
        epochs: maximum number of epochs.
        batch_size: examples per optimizer step.
        optimizer: ``rowwise_adam`` (one second moment per embedding row,
            see ``rowwise_adam_rows``) or ``adam`` (one per weight, about
            0.002 lower validation RMSE and a third slower per epoch).
        lr: initial learning rate. None takes the optimizer's default from
            ``OPTIMIZER_DEFAULTS``.
        weight_decay: L2 strength on the rows a batch touches, per occurrence
            and averaged over the batch (see the module docstring). None
            takes the optimizer's default.
        lr_decay_epoch: the learning rate is multiplied by ``lr_decay`` after
            this epoch (1-based); 0 disables the decay.
        lr_decay: learning-rate factor applied after ``lr_decay_epoch``.
        init_std: standard deviation of the truncated-normal initialization.
        seed: seeds the splits, the initialization and the batch order.
        threads: torch intra-op threads during training, used by the torch
            kernels and the RMSE passes; None keeps torch's default. The
            Numba kernel always runs on one thread. One thread is the default
            because the step's tensors are small: with two threads each
            compiled torch step took about 1.6 times as long on the 2-core
            machine of bench/README.md.
        patience: stop after this many epochs without improvement on the
            early-stopping set; None trains all epochs.
        valid_fraction: share of ratings held out for the validation RMSE.
        early_stopping_fraction: share of the remaining training ratings held
            out to choose the best epoch; 0 disables early stopping.
        genres: add movie genres as movie-side features.
        cold_start_holdout: share of users held out entirely (with all their
            ratings) for ``esfm evaluate``; 0 trains on all users.
        kernel: how the training step runs: ``numba`` (the fused Numba
            kernel of ``esfm.numba_step``), ``torch-compile`` (the torch step
            through ``torch.compile``, which needs a C++ compiler) or
            ``torch`` (the eager torch step). All three compute the same
            update and differ in rounding. Where compiling fails, training
            warns and runs the eager torch step.
        user_dropout: share of training ratings, drawn anew each epoch, whose
            user-id feature is left out, so that the metadata embeddings
            learn to rate without it. It lowers the cold-start RMSE and
            raises the validation RMSE of known users (bench/README.md).
    """

    k: int = 120
    epochs: int = 10
    batch_size: int = 1024
    optimizer: str = "rowwise_adam"
    lr: float | None = None
    weight_decay: float | None = None
    lr_decay_epoch: int = 7
    lr_decay: float = 0.1
    init_std: float = 0.01
    seed: int = 0
    threads: int | None = 1
    patience: int | None = 2
    valid_fraction: float = 0.1
    early_stopping_fraction: float = 0.05
    genres: bool = False
    cold_start_holdout: float = 0.0
    kernel: str = "numba"
    user_dropout: float = 0.0

    def __post_init__(self) -> None:
        # An unhashable optimizer is left for validate() to reject.
        defaults = {}
        if isinstance(self.optimizer, str):
            defaults = OPTIMIZER_DEFAULTS.get(self.optimizer, {})
        for name, value in defaults.items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)
        # NumPy scalars become Python numbers, so that config.json and torch
        # take them. Other types are left for validate() to reject.
        for name in _INTEGER_FIELDS:
            value = getattr(self, name)
            if isinstance(value, numbers.Integral) and not isinstance(value, bool):
                object.__setattr__(self, name, int(value))
        for name in _REAL_FIELDS:
            value = getattr(self, name)
            if isinstance(value, numbers.Real) and not isinstance(value, bool):
                with contextlib.suppress(OverflowError):
                    object.__setattr__(self, name, float(value))
        if isinstance(self.genres, np.bool_):
            object.__setattr__(self, "genres", bool(self.genres))

    def _check_types(self) -> None:
        for name in _INTEGER_FIELDS:
            value = getattr(self, name)
            if type(value) is not int and not (value is None and name in _OPTIONAL):
                raise ConfigError(f"invalid {name} {value!r}: must be an integer")
        for name in _REAL_FIELDS:
            value = getattr(self, name)
            if type(value) is not float:
                raise ConfigError(f"invalid {name} {value!r}: must be a number")
        if type(self.genres) is not bool:
            raise ConfigError(f"invalid genres {self.genres!r}: must be True or False")

    def validate(self) -> None:
        """Raise ConfigError naming the first invalid setting."""
        for name in ("optimizer", "kernel"):
            value = getattr(self, name)
            if not isinstance(value, str):
                raise ConfigError(f"invalid {name} {value!r}: must be a string")
        if self.optimizer not in OPTIMIZER_DEFAULTS:
            raise ConfigError(
                f"invalid optimizer {self.optimizer!r}: must be one of "
                + ", ".join(OPTIMIZER_DEFAULTS)
            )
        if self.kernel not in KERNELS:
            raise ConfigError(
                f"invalid kernel {self.kernel!r}: must be one of " + ", ".join(KERNELS)
            )
        self._check_types()
        checks = [
            ("k", 1 <= self.k <= MAX_K, f"an integer from 1 to {MAX_K}"),
            ("epochs", self.epochs >= 1, "a positive integer"),
            ("batch_size", self.batch_size >= 1, "a positive integer"),
            ("lr", self.lr > 0 and math.isfinite(self.lr), "a positive number"),
            (
                "weight_decay",
                self.weight_decay >= 0 and math.isfinite(self.weight_decay),
                "a finite number, zero or more",
            ),
            ("lr_decay_epoch", self.lr_decay_epoch >= 0, "zero or more"),
            (
                "lr_decay",
                self.lr_decay > 0 and math.isfinite(self.lr_decay),
                "a positive number",
            ),
            (
                "init_std",
                self.init_std > 0 and math.isfinite(self.init_std),
                "a positive number",
            ),
            (
                "threads",
                self.threads is None or 1 <= self.threads <= MAX_THREADS,
                f"from 1 to {MAX_THREADS}",
            ),
            ("seed", 0 <= self.seed < 2**32, "an integer from 0 to 2**32 - 1"),
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
            ("user_dropout", 0 <= self.user_dropout < 1, "from 0 to below 1"),
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


@contextlib.contextmanager
def _torch_threads(threads: int | None) -> Iterator[None]:
    """Set torch's intra-op threads for the block, then restore them."""
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


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


_BETAS = (0.9, 0.999)
_EPS = 1e-8


def distinct_rows(
    index: torch.Tensor, n_rows: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``torch.unique(index, return_inverse=True)`` without a sort.

    Marking the touched rows of a table of ``n_rows`` rows and counting them
    with a cumsum gives the same sorted rows and positions in
    O(n_rows + len(index)).
    """
    touched = torch.zeros(n_rows, dtype=torch.int64)
    touched.index_fill_(0, index, 1)
    position = touched.cumsum(0).sub_(1)
    rows = touched.nonzero().view(-1)
    return rows, position.index_select(0, index)


def fm_gradients(
    table: torch.Tensor,
    bias: torch.Tensor,
    flat: torch.Tensor,
    value: torch.Tensor,
    target: torch.Tensor,
    *,
    scale: float,
    weight_decay: float,
    one_hot: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Compute the gradient of one batch, summed per distinct table row.

    ``table`` contains the batch's distinct rows ``[v, w]`` (``[U, k + 1]``) and
    ``flat`` the position in ``table`` of every slot of the ``[B, F]`` batch.
    The loss is ``(sum_b (y_b - t_b)^2 + weight_decay * penalty) / B`` with
    the penalty of ``FactorizationMachine.forward_with_penalty``. The
    per-slot gradient ``d_b x_i (S_b - x_i v_i) + decay v_i`` (with
    ``S_b = sum_i x_i v_i``) is summed per row r as
    ``sum d_b x_i S_b - (sum d_b x_i^2) v_r + decay * count_r * v_r``, so no
    ``[B, F, k]`` tensor of embeddings is built.

    Returns:
        ``(grad [U, k + 1], bias_grad [1], squared_error)``: the gradients of
        the rows and of the global bias, and the summed squared error.
    """
    batch, fields = value.shape
    k = table.shape[1] - 1
    inverse = flat.view(batch, fields)
    vectors = table[:, :k]
    norms = torch.linalg.vecdot(vectors, vectors)
    slot_weights = table[:, k].index_select(0, flat).view(batch, fields)
    slot_norms = norms.index_select(0, flat).view(batch, fields)
    if one_hot:
        # Every x_i is 1, so the products with x are skipped.
        summed = F.embedding_bag(inverse, vectors, mode="sum")
        linear = slot_weights.sum(dim=1)
        squares = slot_norms.sum(dim=1)
    else:
        summed = F.embedding_bag(inverse, vectors, mode="sum", per_sample_weights=value)
        linear = (slot_weights * value).sum(dim=1)
        squares = (slot_norms * value * value).sum(dim=1)
    pairwise = 0.5 * (torch.linalg.vecdot(summed, summed) - squares)
    probability = torch.sigmoid(bias + linear + pairwise)
    error = probability * scale - target
    squared_error = torch.dot(error, error)

    # d loss / d logit of the squared error through sigmoid(.) * scale.
    d_logit = (2.0 / batch) * error * scale * probability * (1 - probability)
    slot = d_logit.unsqueeze(1).expand(batch, fields)
    if not one_hot:
        slot = slot * value
    # One index_add sums every per-slot term per row. Columns: d_b x_i S_b
    # (k), d_b x_i (the linear weight's gradient), d_b x_i^2 and whether the
    # slot is active (x_i != 0), the last two for the terms in v_r.
    if one_hot:
        scalars = torch.stack([slot, slot, torch.ones_like(slot)], dim=2)
    else:
        scalars = torch.stack([slot, slot * value, (value != 0).to(slot.dtype)], 2)
    per_slot = torch.cat([summed.unsqueeze(1) * slot.unsqueeze(2), scalars], dim=2)
    sums = torch.zeros(table.shape[0], k + 3).index_add_(
        0, flat, per_slot.view(-1, k + 3)
    )
    decay = 2.0 * weight_decay / batch
    # Per-row factor on the row's own weights: decay * count_r for both
    # parts, minus sum d_b x_i^2 for the embedding part only.
    grad = sums[:, : k + 1] + table * (decay * sums[:, k + 2 :])
    grad = torch.cat([grad[:, :k] - vectors * sums[:, k + 1 : k + 2], grad[:, k:]], 1)
    return grad, d_logit.sum().view(1), squared_error


def _adam_step(
    state: torch.Tensor,
    grad: torch.Tensor,
    schedule: torch.Tensor,
    squares: torch.Tensor,
    per_column: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """Return ``[param | exp_avg | exp_avg_sq]`` after one Adam step.

    ``squares`` is the squared gradient in the layout of ``exp_avg_sq``, and
    ``per_column`` spreads ``exp_avg_sq`` to one value per column of ``grad``.
    """
    beta1, beta2 = _BETAS
    width = grad.shape[1]
    exp_avg = state[:, width : 2 * width] * beta1 + grad * (1 - beta1)
    exp_avg_sq = state[:, 2 * width :] * beta2 + squares * (1 - beta2)
    denominator = (per_column(exp_avg_sq) / schedule[1]).sqrt() + _EPS
    param = state[:, :width] - exp_avg / denominator * schedule[0]
    return torch.cat([param, exp_avg, exp_avg_sq], dim=1)


def adam_rows(
    state: torch.Tensor, grad: torch.Tensor, schedule: torch.Tensor
) -> torch.Tensor:
    """Return ``state = [param | exp_avg | exp_avg_sq]`` after one Adam step.

    ``schedule`` is ``[lr / (1 - beta1^t), 1 - beta2^t]``. Moments decay only
    when the row is touched, and bias correction uses the global step count,
    as in ``torch.optim.SparseAdam``.
    """
    return _adam_step(state, grad, schedule, grad * grad, lambda moment: moment)


def rowwise_adam_rows(
    state: torch.Tensor, grad: torch.Tensor, schedule: torch.Tensor
) -> torch.Tensor:
    """Return the state of ``[v, w]`` rows after one row-wise Adam step.

    ``state`` is ``[param (k + 1) | exp_avg (k + 1) | s_v | s_w]``. The first
    moment is kept per element as in Adam. The second moment of the embedding
    ``v`` is one number per row, a moving average of the mean squared gradient
    over the row's elements, as in ``partial_rowwise_adam`` of FBGEMM's
    ``fbgemm_gpu/codegen/genscript/optimizers.py``. The linear weight ``w``
    keeps its own second moment. This shrinks each row's state from
    ``3 (k + 1)`` to ``2 (k + 1) + 2`` numbers, and with it the memory traffic
    of the step, by about a third.
    """
    k = grad.shape[1] - 1
    squares = grad * grad
    squares = torch.cat([squares[:, :k].mean(dim=1, keepdim=True), squares[:, k:]], 1)

    def per_column(moment: torch.Tensor) -> torch.Tensor:
        return torch.cat([moment[:, :1].expand(-1, k), moment[:, 1:]], dim=1)

    return _adam_step(state, grad, schedule, squares, per_column)


def train_step(
    state: torch.Tensor,
    bias_state: torch.Tensor,
    index: torch.Tensor,
    value: torch.Tensor,
    target: torch.Tensor,
    schedule: torch.Tensor,
    *,
    scale: float,
    weight_decay: float,
    one_hot: bool,
    rowwise: bool,
) -> torch.Tensor:
    """Run one lazy Adam step on a batch and return its summed squared error.

    Each row of ``state`` contains ``[v, w]`` and its optimizer state (see
    ``adam_rows`` and, with ``rowwise``, ``rowwise_adam_rows``), so one
    gather and one scatter of each distinct row of the batch serve the
    gradient and the update. ``bias_state`` is the ``[1, 3]`` Adam state of
    the global bias. Both are updated in place.
    """
    width = (state.shape[1] - 2) // 2 if rowwise else state.shape[1] // 3
    rows, flat = distinct_rows(index.reshape(-1), state.shape[0])
    gathered = state.index_select(0, rows)
    grad, bias_grad, squared_error = fm_gradients(
        gathered[:, :width],
        bias_state[0, :1],
        flat,
        value,
        target,
        scale=scale,
        weight_decay=weight_decay,
        one_hot=one_hot,
    )
    update = rowwise_adam_rows if rowwise else adam_rows
    state.index_copy_(0, rows, update(gathered, grad, schedule))
    bias_state.copy_(adam_rows(bias_state, bias_grad.view(1, 1), schedule))
    return squared_error


def _compiled_step() -> Callable[..., torch.Tensor]:
    # The number of distinct rows changes with every batch, so shapes are
    # dynamic from the first call. The step breaks into graphs at nonzero(),
    # and both ways to avoid that break measured slower (bench/README.md).
    return torch.compile(train_step, dynamic=True)


class FusedTrainer:
    """Training state of the factorization machine and its optimizer step.

    ``table[:, :k]`` contains the embeddings and ``table[:, k]`` the linear
    weights, next to their Adam moments in the same rows of ``state``. The
    last row is the zero padding row. The gradient is derived from the FM
    formula by hand (``fm_gradients``), and the unit tests check it against
    autograd on ``FactorizationMachine``.

    ``kernel`` (one of ``KERNELS``) chooses how the step runs. Where the
    Numba kernel or ``torch.compile`` fails to compile, for example without
    a C++ compiler, the trainer logs a warning and runs the eager torch step.
    """

    def __init__(
        self,
        model: FactorizationMachine,
        config: TrainConfig,
        *,
        one_hot: bool,
        kernel: str = "torch",
    ) -> None:
        self.k = model.config.k
        self.scale = model.config.rating_scale
        self.weight_decay = config.weight_decay
        self.one_hot = one_hot
        self.lr = config.lr
        self.step_count = 0
        self.rowwise = config.optimizer == "rowwise_adam"
        width = self.k + 1
        with torch.no_grad():
            weights = torch.cat(
                [model.embedding.table.weight, model.linear.weight.table.weight],
                dim=1,
            )
            columns = 2 * width + 2 if self.rowwise else 3 * width
            self.state = torch.zeros(len(weights), columns)
            self.state[:, :width] = weights
            self.bias_state = torch.zeros(1, 3)
            self.bias_state[0, 0] = model.linear.global_bias.detach()
        self.kernel = kernel
        self._step = _compiled_step() if kernel == "torch-compile" else train_step
        self._numba_kernel = None
        self._workspace = None

    @property
    def table(self) -> torch.Tensor:
        """Return the ``[rows, k + 1]`` view of the weights ``[v, w]``."""
        return self.state[:, : self.k + 1]

    def set_lr(self, lr: float) -> None:
        self.lr = lr

    def gradients(
        self, index: torch.Tensor, value: torch.Tensor, target: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return ``(rows, grad, bias_grad, squared_error)`` of one batch.

        ``rows`` are the distinct table rows of the batch and ``grad`` their
        summed gradients (see ``fm_gradients``); nothing is updated.
        """
        rows, flat = distinct_rows(index.reshape(-1), len(self.state))
        grad, bias_grad, squared_error = fm_gradients(
            self.table.index_select(0, rows),
            self.bias_state[0, :1],
            flat,
            value,
            target,
            scale=self.scale,
            weight_decay=self.weight_decay,
            one_hot=self.one_hot,
        )
        return rows, grad, bias_grad, squared_error

    def _schedule(self) -> torch.Tensor:
        beta1, beta2 = _BETAS
        step = self.step_count + 1
        return torch.tensor([self.lr / (1 - beta1**step), 1 - beta2**step])

    def _run_torch(
        self,
        state: torch.Tensor,
        bias_state: torch.Tensor,
        index: torch.Tensor,
        value: torch.Tensor,
        target: torch.Tensor,
    ) -> torch.Tensor:
        with torch.no_grad():
            return self._step(
                state,
                bias_state,
                index,
                value,
                target,
                self._schedule(),
                scale=self.scale,
                weight_decay=self.weight_decay,
                one_hot=self.one_hot,
                rowwise=self.rowwise,
            )

    def _run_numba(
        self,
        state: torch.Tensor,
        bias_state: torch.Tensor,
        index: torch.Tensor,
        value: torch.Tensor,
        target: torch.Tensor,
        batch_size: int,
        first: int,
        stop: int,
    ) -> np.ndarray:
        from esfm import numba_step

        # The kernel does not check bounds, so the buffers must fit the batch
        # and every row index must be in the table.
        used = index[first * batch_size : stop * batch_size]
        if len(used) and (int(used.min()) < 0 or int(used.max()) >= len(state)):
            raise TrainingError(
                f"feature rows from {int(used.min())} to {int(used.max())} are "
                f"outside the table of {len(state)} rows",
                hint="encode the ratings with the vocabulary the model was built on",
            )
        slots = batch_size * index.shape[1]
        workspace = self._workspace
        if workspace is None or not workspace.fits(len(state), self.k, slots):
            workspace = self._workspace = numba_step.Workspace(
                len(state), self.k, slots
            )
        if self._numba_kernel is None:
            self._numba_kernel = numba_step.run_batches
        errors = np.zeros(stop - first, dtype=np.float64)
        ran = self._numba_kernel(
            state.numpy(),
            bias_state.view(-1).numpy(),
            index.numpy(),
            value.numpy(),
            target.numpy(),
            batch_size,
            first,
            stop,
            self.step_count,
            self.lr,
            self.scale,
            self.weight_decay,
            self.rowwise,
            workspace.position,
            workspace.rows,
            workspace.grad,
            workspace.extra,
            workspace.summed,
            errors,
        )
        return errors[:ran]

    def compile_now(
        self, index: torch.Tensor, value: torch.Tensor, target: torch.Tensor
    ) -> float:
        """Compile the step on copies of the state; return the seconds it took.

        Training then times its epochs without the one-time compile (or, for
        the Numba kernel, the load from its on-disk cache). Where compiling
        fails the trainer falls back to the eager torch step.
        """
        if self.kernel == "torch":
            return 0.0
        started = time.perf_counter()
        batch = (self.state.clone(), self.bias_state.clone(), index, value, target)
        try:
            if self.kernel == "numba":
                self._compile_numba(*batch)
            else:
                self._run_torch(*batch)
        except TrainingError:
            raise
        except Exception as exc:  # Numba and inductor raise many types.
            logger.warning(
                "compiling the %s training step failed (%s); training with the "
                "eager torch step, several times slower (--kernel torch skips "
                "the attempt)",
                self.kernel,
                _describe(exc),
            )
            self.kernel = "torch"
            self._step = train_step
        return time.perf_counter() - started

    def _compile_numba(
        self,
        state: torch.Tensor,
        bias_state: torch.Tensor,
        index: torch.Tensor,
        value: torch.Tensor,
        target: torch.Tensor,
    ) -> None:
        from esfm import numba_step

        arguments = (state, bias_state, index, value, target, len(target), 0, 1)
        try:
            self._run_numba(*arguments)
        except TrainingError:
            raise
        except Exception as exc:  # A damaged cache file raises many types.
            logger.warning(
                "loading the Numba training kernel failed (%s); clearing its "
                "entry in Numba's cache and compiling it anew",
                _describe(exc),
            )
            numba_step.clear_cache()
            self._numba_kernel = numba_step.uncached_kernel()
            self._run_numba(*arguments)

    def run_batches(
        self,
        index: torch.Tensor,
        value: torch.Tensor,
        target: torch.Tensor,
        batch_size: int,
        first: int,
        stop: int,
    ) -> np.ndarray:
        """Run the optimizer steps of batches ``first`` to ``stop - 1``.

        Batch ``j`` is rows ``j * batch_size`` up to the next multiple of the
        contiguous tensors ``index``, ``value`` and ``target``. Returns the
        summed squared error of each batch run. The run ends after the first
        batch whose error is NaN or infinite, because the weights are broken
        then: the caller stops and saves nothing.
        """
        if self.kernel == "numba":
            errors = self._run_numba(
                self.state,
                self.bias_state,
                index,
                value,
                target,
                batch_size,
                first,
                stop,
            )
            self.step_count += len(errors)
            return errors
        errors = []
        for batch in range(first, stop):
            rows = slice(batch * batch_size, (batch + 1) * batch_size)
            error = float(
                self._run_torch(
                    self.state, self.bias_state, index[rows], value[rows], target[rows]
                )
            )
            self.step_count += 1
            errors.append(error)
            if not math.isfinite(error):
                break
        return np.asarray(errors, dtype=np.float64)

    def copy_to(self, model: FactorizationMachine) -> None:
        """Write the current weights into ``model``."""
        with torch.no_grad():
            model.embedding.table.weight.copy_(self.table[:, : self.k])
            model.linear.weight.table.weight.copy_(self.table[:, self.k :])
            model.linear.global_bias.copy_(self.bias_state[0, :1])


def _describe(error: BaseException) -> str:
    """Return ``Type: first line`` of the root cause of ``error``."""
    root = error
    while root.__cause__ is not None:
        root = root.__cause__
    lines = [line.strip() for line in str(root).splitlines() if line.strip()]
    return f"{type(root).__name__}: {lines[0] if lines else 'no message'}"


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
    # One gather per epoch, so the batches are contiguous slices of it.
    index = data.index.index_select(0, order)
    value = data.value.index_select(0, order)
    rating = data.rating.index_select(0, order)
    if config.user_dropout > 0:
        # encode_ratings puts the user id in column 0. A slot with x = 0
        # adds nothing to the prediction and gets no gradient.
        keep = torch.rand(len(value), generator=generator) >= config.user_dropout
        value[:, 0] *= keep
    # A batch larger than the data is the whole data, and the clamp keeps the
    # kernel's buffers and row offsets within the data's size.
    size = min(config.batch_size, len(data))
    batches = math.ceil(len(data) / size)
    per_call = batches if on_batch is None else _BATCHES_PER_CALL
    squared_error = 0.0
    seen = 0
    for first in range(0, batches, per_call):
        errors = trainer.run_batches(
            index, value, rating, size, first, min(first + per_call, batches)
        )
        for batch, error in enumerate(errors.tolist(), start=first):
            if not math.isfinite(error):
                _raise_diverged(error, epoch, batch + 1)
            squared_error += error
            seen += min(size, len(rating) - batch * size)
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
    cpus = os.cpu_count() or 1
    if config.threads is not None and config.threads > cpus:
        logger.warning(
            "threads=%d is more than the %d CPUs here, which slows training down",
            config.threads,
            cpus,
        )
    with _torch_threads(config.threads):
        return _fit(dataset, config, on_epoch, on_batch)


def _fit(
    dataset: MovieLensDataset,
    config: TrainConfig,
    on_epoch: EpochCallback | None,
    on_batch: BatchCallback | None,
) -> TrainResult:
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
        if len(keep) == 0:
            raise ConfigError(
                f"invalid cold_start_holdout {config.cold_start_holdout!r}: it "
                f"holds out all {len(held)} users, so none is left to train on",
                hint="hold out a smaller share, such as 0.1",
            )
        training_data = dataset.subset_users(keep)

    vocabulary = build_vocabulary(training_data, genres=config.genres)
    encoded = encode_ratings(training_data, vocabulary)
    split = split_ratings(len(encoded.rating), config)
    if len(split.train) == 0:
        raise ConfigError(
            f"no ratings are left to train on: {len(encoded.rating)} ratings "
            f"minus the validation ({config.valid_fraction}) and early-stopping "
            f"({config.early_stopping_fraction}) shares",
            hint="use more data or smaller shares",
        )
    if len(split.valid) == 0:
        raise ConfigError(
            f"no ratings are left for validation: {len(encoded.rating)} "
            f"rating(s) times valid_fraction {config.valid_fraction} rounds to "
            "none",
            hint="use more data or a larger validation share",
        )
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
    # User dropout zeroes values, which the one-hot torch step would ignore.
    one_hot = bool((encoded.value == 1).all()) and config.user_dropout == 0
    trainer = FusedTrainer(model, config, one_hot=one_hot, kernel=config.kernel)
    size = config.batch_size
    compile_seconds = trainer.compile_now(
        train_data.index[:size], train_data.value[:size], train_data.rating[:size]
    )
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
        "kernel": trainer.kernel,
        "compile_seconds": compile_seconds if trainer.kernel != "torch" else None,
        "threads": torch.get_num_threads(),
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


def check_model_destination(directory: str | os.PathLike[str]) -> Path:
    """Return ``directory`` as an absolute path if a model may be written there.

    A model may go into a missing or empty folder, or replace a model folder:
    one that contains ``config.json`` (with esfm's ``model_id``) and
    ``model.safetensors``, and no files other than model files. Anything else
    is rejected, so a save never deletes other files. A probe folder in the
    nearest existing parent checks that it is writable, and no folder is
    created.

    Raises:
        ModelError: the destination cannot take a model.
    """
    target = Path(os.path.abspath(os.fspath(directory)))
    if not target.name:
        raise ModelError(
            f"cannot write a model to {str(target)!r}",
            hint="choose a folder below it for --out",
        )
    try:
        if target.exists():
            _check_model_folder(target)
        parent = target.parent
        while not parent.exists():
            parent = parent.parent
        # The probe has the staging folder's name, so a name too long for it
        # fails here rather than after training.
        probe = tempfile.mkdtemp(prefix=_staging_prefix(target), dir=parent)
        os.rmdir(probe)
    except OSError as exc:
        hint = "choose a folder you can write to"
        if exc.errno == errno.ENAMETOOLONG:
            hint = "choose a shorter folder name for --out"
        raise ModelError(
            f"cannot create {str(target)!r}: {exc.strerror or exc}", hint=hint
        ) from exc
    return target


def _check_model_folder(target: Path) -> None:
    if not target.is_dir():
        raise ModelError(
            f"{str(target)!r} is a file, not a folder",
            hint="choose a new or existing model folder for --out",
        )
    entries = sorted(entry.name for entry in target.iterdir())
    others = [name for name in entries if name not in MODEL_FILES]
    missing = [
        name for name in ("config.json", "model.safetensors") if name not in entries
    ]
    if others or (entries and missing):
        listed = ", ".join(others[:3]) or ", ".join(entries[:3])
        raise ModelError(
            f"{str(target)!r} is not empty and is not a model folder "
            f"(it contains {listed}); refusing to replace it",
            hint="choose another --out or empty the folder",
        )
    if entries and not _is_esfm_config(target / "config.json"):
        raise ModelError(
            f"{str(target)!r} contains a config.json without an esfm model_id, "
            "so it is another program's model folder; refusing to replace it",
            hint="choose another --out or empty the folder",
        )


def _is_esfm_config(path: Path) -> bool:
    try:
        config = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and isinstance(config.get("model_id"), str)


def _remove(path: Path) -> None:
    if path.is_symlink():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


def _recover_interrupted_saves(target: Path) -> None:
    """Tidy the folders that interrupted saves left beside ``target``.

    A save names its folders ``.NAME.tmp-PID-*`` (the new model being
    written) and ``.NAME.old-PID`` (the model it replaces). Those of a
    process that no longer runs are deleted, except that an old model is
    moved back into place when ``target`` is missing: the save stopped
    between moving the old model aside and moving the new one in.
    """
    name = re.compile(re.escape(f".{target.name}.") + r"(old|tmp)-([0-9]+)(-.*)?")
    stale = []
    for path in target.parent.glob(f".{glob.escape(target.name)}.*-*"):
        match = name.fullmatch(path.name)
        if match and not process_is_running(int(match.group(2))):
            stale.append((match.group(1), path))
    for kind, path in stale:
        if kind == "old" and not os.path.lexists(target):
            logger.warning(
                "restoring %s to %s, after an interrupted save", path, target
            )
            os.replace(path, target)
            continue
        logger.info("removing %s, left by an interrupted save", path)
        _remove(path)


def save_model(result: TrainResult, directory: str | os.PathLike[str]) -> Path:
    """Write the model directory of docs/model-format.md atomically.

    Files go into a temporary sibling directory, each fsynced, and the
    directory is renamed into place. An existing model at ``directory`` is
    renamed aside first and deleted only after the new one is in place, so
    an interrupted save leaves either the old or the new model. A renamed
    old model that an interrupted save could not delete is removed by the
    next save to the same place, or moved back if no model took its place
    (see ``_recover_interrupted_saves``).

    Returns:
        The model directory, as an absolute path.

    Raises:
        ModelError: ``directory`` exists but is not a model directory, or the
            write failed.
    """
    target = check_model_destination(directory)
    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    _recover_interrupted_saves(target)
    _, documents = model_documents(result)

    staging = None
    try:
        with _signals_held():
            staging = Path(tempfile.mkdtemp(prefix=_staging_prefix(target), dir=parent))
            staging.chmod(_folder_mode(parent))
        for name, document in documents.items():
            payload = (
                document
                if isinstance(document, bytes)
                else json.dumps(document, indent=2, sort_keys=True).encode()
            )
            _write_file(staging / name, payload)
        _fsync_directory(staging)
        with _signals_held():
            _replace_directory(staging, target)
    except OSError as exc:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        raise ModelError(
            f"cannot write model directory {str(target)!r}: {exc}",
            hint="check free disk space and permissions",
        ) from exc
    except BaseException:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info("saved model %s to %s", documents["config.json"]["model_id"], target)
    return target


def _staging_prefix(target: Path) -> str:
    return f".{target.name}.tmp-{os.getpid()}-"


def _folder_mode(parent: Path) -> int:
    """Return the mode ``mkdir`` would give a new folder in ``parent``.

    mkdtemp creates its folder with mode 0700. A model folder gets the mode
    of the umask instead, and keeps the setgid bit of a shared parent.
    """
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 & ~umask) | (parent.stat().st_mode & stat.S_ISGID)


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """Hold SIGINT and SIGTERM for the block, so it runs whole.

    A signal that arrives meanwhile is delivered when the block ends, so the
    folder renames of a save are never cut in half.
    """
    signals = {signal.SIGINT, signal.SIGTERM}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _replace_directory(staging: Path, target: Path) -> None:
    old = None
    try:
        if os.path.lexists(target):
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            if os.path.lexists(old):
                _remove(old)
            os.replace(target, old)
        os.replace(staging, target)
    except BaseException:
        # Also on Ctrl-C between the two renames: put the old model back.
        if old is not None and os.path.lexists(old) and not os.path.lexists(target):
            os.replace(old, target)
        raise
    _fsync_directory(target.parent)
    if old is not None:
        _remove(old)
