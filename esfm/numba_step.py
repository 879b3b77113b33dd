"""The factorization machine's lazy Adam training step as one Numba kernel.

``run_batches`` runs the same step as ``esfm.train.train_step``: the FM
gradient of a batch summed per distinct feature row, then Adam on those rows
only. It keeps the state layout of ``FusedTrainer`` (``[param | exp_avg |
second moment]`` per row), so the two are interchangeable between batches.

The torch step builds intermediate tensors of ``[slots, k]`` and gathers the
touched rows into a copy before scattering them back. This kernel walks each
example once, keeps the example's summed embedding ``S_b`` in a ``k``-vector,
adds each slot's gradient into a compact buffer of the batch's distinct rows,
and updates the rows in place. On the 2-core machine of bench/README.md a
batch of 1024 MovieLens ratings at k=120 took about 0.35 ms, against about
1.5 ms for the torch step through ``torch.compile``.

The kernel runs on one thread and adds in a fixed order, so a seed gives the
same weights bit for bit on one machine. It does not promise the torch
step's last bits: it adds in another order and may fuse multiply-adds.
"""

from __future__ import annotations

import logging
import math

import numba
import numpy as np

logger = logging.getLogger(__name__)

BETA1 = 0.9
BETA2 = 0.999
EPS = 1e-8

# Reassociation lets LLVM vectorize the sums over k, and contraction lets it
# use fused multiply-adds. The flags that assume no NaN or infinity stay off,
# because the caller detects divergence from a NaN or infinite error.
_FASTMATH = {"reassoc", "contract", "nsz", "arcp"}


class Workspace:
    """Scratch buffers of ``run_batches`` for one trainer.

    ``position[r]`` is row ``r``'s slot in the compact gradient buffer while a
    batch runs, and -1 otherwise. The kernel leaves it all -1 when it returns.
    """

    def __init__(self, n_rows: int, k: int, max_slots: int) -> None:
        capacity = max(1, min(n_rows, max_slots))
        self.position = np.full(n_rows, -1, dtype=np.int64)
        self.rows = np.zeros(capacity, dtype=np.int64)
        self.grad = np.zeros((capacity, k + 1), dtype=np.float32)
        # Per distinct row: sum of d_b x_i^2 and the number of active slots.
        self.extra = np.zeros((capacity, 2), dtype=np.float32)
        self.summed = np.zeros(k, dtype=np.float32)

    def fits(self, n_rows: int, k: int, max_slots: int) -> bool:
        """Return whether the buffers fit a table and batch of these sizes."""
        return (
            len(self.position) == n_rows
            and len(self.summed) == k
            and len(self.rows) >= min(n_rows, max_slots)
        )


def _run_batches(
    state,
    bias_state,
    index,
    value,
    target,
    batch_size,
    first_batch,
    stop_batch,
    step_count,
    lr,
    scale,
    weight_decay,
    rowwise,
    position,
    rows,
    grad,
    extra,
    summed,
    errors,
):
    """Run optimizer steps on batches ``first_batch`` to ``stop_batch - 1``.

    Batch ``j`` is examples ``j * batch_size`` up to the next multiple, of
    ``index [n, F]`` (int64 rows), ``value [n, F]`` (float32 ``x_i``) and
    ``target [n]``. ``state`` and ``bias_state`` are updated in place.
    ``step_count`` is the number of steps run before ``first_batch``, for
    Adam's bias correction.

    Each batch's summed squared error goes into ``errors[j - first_batch]``.
    The kernel stops after the first batch whose error is NaN or infinite and
    returns how many batches it ran.

    Slots with ``x_i = 0`` (padding) neither contribute nor count as touching
    their row.
    """
    n, fields = index.shape
    k = summed.shape[0]
    width = k + 1
    second = 2 * width
    one = np.float32(1.0)
    beta1 = np.float32(BETA1)
    beta2 = np.float32(BETA2)
    eps = np.float32(EPS)
    scale32 = np.float32(scale)
    for batch in range(first_batch, stop_batch):
        start = batch * batch_size
        stop = min(start + batch_size, n)
        count = stop - start

        # The batch's distinct rows, in order of first use.
        distinct = 0
        for b in range(start, stop):
            for f in range(fields):
                if value[b, f] == 0:
                    continue
                row = index[b, f]
                if position[row] < 0:
                    position[row] = distinct
                    rows[distinct] = row
                    for j in range(width):
                        grad[distinct, j] = 0
                    extra[distinct, 0] = 0
                    extra[distinct, 1] = 0
                    distinct += 1

        # Forward pass and gradient of (sum_b (y_b - t_b)^2) / B, per row.
        squared_error = 0.0
        bias_grad = 0.0
        for b in range(start, stop):
            for j in range(k):
                summed[j] = 0
            logit = bias_state[0]
            squares = np.float32(0.0)
            for f in range(fields):
                x = value[b, f]
                if x == 0:
                    continue
                row = index[b, f]
                norm = np.float32(0.0)
                for j in range(k):
                    weight = state[row, j]
                    summed[j] += x * weight
                    norm += weight * weight
                logit += x * state[row, k]
                squares += x * x * norm
            total = np.float32(0.0)
            for j in range(k):
                total += summed[j] * summed[j]
            logit += np.float32(0.5) * (total - squares)
            probability = one / (one + np.exp(-logit))
            error = probability * scale32 - target[b]
            squared_error += error * error
            d_logit = (np.float32(2.0 / count) * error * scale32 * probability) * (
                one - probability
            )
            bias_grad += d_logit
            for f in range(fields):
                x = value[b, f]
                if x == 0:
                    continue
                slot = position[index[b, f]]
                scaled = d_logit * x
                for j in range(k):
                    grad[slot, j] += scaled * summed[j]
                grad[slot, k] += scaled
                extra[slot, 0] += scaled * x
                extra[slot, 1] += 1

        errors[batch - first_batch] = squared_error
        if not math.isfinite(squared_error):
            for slot in range(distinct):
                position[rows[slot]] = -1
            return batch - first_batch + 1

        # Adam on the touched rows, with the bias correction of step t.
        t = step_count + batch - first_batch + 1
        step_size = np.float32(lr / (1.0 - BETA1**t))
        correction = np.float32(1.0 - BETA2**t)
        decay = np.float32(2.0 * weight_decay / count)
        for slot in range(distinct):
            row = rows[slot]
            position[row] = -1
            param = state[row, :width]
            average = state[row, width:second]
            moment = state[row, second:]
            g = grad[slot]
            # grad_v = sum d x S - (sum d x^2) v + decay * count * v, and
            # grad_w = sum d x + decay * count * w.
            active = decay * extra[slot, 1]
            shrink = active - extra[slot, 0]
            g_linear = g[k] + active * param[k]
            if rowwise:
                mean_square = np.float32(0.0)
                for j in range(k):
                    g_j = g[j] + shrink * param[j]
                    mean_square += g_j * g_j
                moment[0] = beta2 * moment[0] + (one - beta2) * (
                    mean_square / np.float32(k)
                )
                rate = step_size / (np.sqrt(moment[0] / correction) + eps)
                for j in range(k):
                    g_j = g[j] + shrink * param[j]
                    average[j] = beta1 * average[j] + (one - beta1) * g_j
                    param[j] -= average[j] * rate
                linear_moment = 1
            else:
                for j in range(k):
                    g_j = g[j] + shrink * param[j]
                    average[j] = beta1 * average[j] + (one - beta1) * g_j
                    moment[j] = beta2 * moment[j] + (one - beta2) * g_j * g_j
                    param[j] -= (
                        average[j] / (np.sqrt(moment[j] / correction) + eps) * step_size
                    )
                linear_moment = k
            average[k] = beta1 * average[k] + (one - beta1) * g_linear
            moment[linear_moment] = beta2 * moment[linear_moment] + (one - beta2) * (
                g_linear * g_linear
            )
            param[k] -= (
                average[k]
                / (np.sqrt(moment[linear_moment] / correction) + eps)
                * step_size
            )

        g_bias = np.float32(bias_grad)
        average = beta1 * bias_state[1] + (one - beta1) * g_bias
        moment = beta2 * bias_state[2] + (one - beta2) * g_bias * g_bias
        bias_state[1] = average
        bias_state[2] = moment
        bias_state[0] -= average / (np.sqrt(moment / correction) + eps) * step_size
    return stop_batch - first_batch


# NumPy's error model leaves out Python's zero check on every division, which
# kept the Adam loops from vectorizing.
_OPTIONS = {"nogil": True, "fastmath": _FASTMATH, "error_model": "numpy"}


def _cached_kernel():
    try:
        return numba.njit(cache=True, **_OPTIONS)(_run_batches)
    except RuntimeError as error:
        # Numba raises this when neither __pycache__ beside this file nor its
        # user-wide cache folder is writable.
        logger.warning(
            "cannot cache the Numba training kernel (%s), so each process "
            "compiles it anew (about 1.5 s); set NUMBA_CACHE_DIR to a writable "
            "folder to keep it",
            error,
        )
        return uncached_kernel()


def uncached_kernel():
    """Return ``run_batches`` compiled in memory, without Numba's disk cache."""
    return numba.njit(**_OPTIONS)(_run_batches)


def clear_cache() -> None:
    """Remove the machine code of ``run_batches`` from Numba's disk cache."""
    cache = getattr(run_batches, "_cache", None)
    if cache is not None:
        cache.flush()


run_batches = _cached_kernel()
