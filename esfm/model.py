"""Second-order factorization machine in PyTorch, built from small named parts.

Reference: S. Rendle, "Factorization Machines", ICDM 2010. The pairwise term
uses the O(kn) identity from that paper (Lemma 3.1):

    sum_{i<j} <v_i, v_j> x_i x_j
        = 0.5 * sum_f [(sum_i v_if x_i)^2 - sum_i v_if^2 x_i^2]
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn


@dataclasses.dataclass(frozen=True)
class FMConfig:
    """Shape and output settings of a factorization machine.

    Attributes:
        n_features: vocabulary size n; one extra padding row is added after it.
        k: embedding dimension.
        init_std: standard deviation of the truncated-normal initialization
            (truncated at two standard deviations).
        rating_scale: the output is ``sigmoid(logit) * rating_scale``.
        sparse: emit sparse gradients for the embedding tables, for
            ``torch.optim.SparseAdam``.
    """

    n_features: int
    k: int = 120
    init_std: float = 0.01
    rating_scale: float = 5.5
    sparse: bool = True


class FeatureEmbedding(nn.Module):
    """Lookup of one vector of size ``dim`` per feature row.

    Row ``n_features`` is a padding row: it stays zero and gets no gradient,
    so padded slots contribute nothing.
    """

    def __init__(self, n_features: int, dim: int, *, sparse: bool) -> None:
        super().__init__()
        self.table = nn.Embedding(
            n_features + 1, dim, padding_idx=n_features, sparse=sparse
        )

    def reset_parameters(self, std: float) -> None:
        with torch.no_grad():
            nn.init.trunc_normal_(self.table.weight, std=std, a=-2 * std, b=2 * std)
            self.table.weight[self.table.padding_idx].zero_()

    def forward(self, index: torch.Tensor) -> torch.Tensor:
        """Map ``index [B, F]`` (int64) to ``[B, F, dim]``."""
        return self.table(index)


class LinearTerm(nn.Module):
    """``global_bias + sum_i x_i w_i`` for every example."""

    def __init__(self, n_features: int, *, sparse: bool) -> None:
        super().__init__()
        self.global_bias = nn.Parameter(torch.zeros(1))
        self.weight = FeatureEmbedding(n_features, 1, sparse=sparse)

    def forward(self, index: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """Map ``index [B, F]`` and ``value [B, F]`` to ``[B]``."""
        weights = self.weight(index).squeeze(-1)
        return self.global_bias + (weights * value).sum(dim=1)


class PairwiseInteraction(nn.Module):
    """Second-order term ``sum_{i<j} <v_i, v_j> x_i x_j`` in O(kF) per example."""

    def forward(self, vectors: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """Compute ``0.5 * sum_f [(sum_i x_i v_if)^2 - sum_i x_i^2 v_if^2]``.

        Args:
            vectors: ``[B, F, k]`` embeddings ``v_i`` of the active features.
            value: ``[B, F]`` feature values ``x_i``.

        Returns:
            ``[B]`` pairwise interaction per example.
        """
        scaled = vectors * value.unsqueeze(-1)
        square_of_sum = scaled.sum(dim=1).pow(2)
        sum_of_squares = scaled.pow(2).sum(dim=1)
        return 0.5 * (square_of_sum - sum_of_squares).sum(dim=1)


class FactorizationMachine(nn.Module):
    """Rating model ``sigmoid(linear + pairwise) * rating_scale``."""

    def __init__(self, config: FMConfig) -> None:
        super().__init__()
        self.config = config
        self.linear = LinearTerm(config.n_features, sparse=config.sparse)
        self.embedding = FeatureEmbedding(
            config.n_features, config.k, sparse=config.sparse
        )
        self.pairwise = PairwiseInteraction()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Draw embeddings and linear weights from a truncated normal; zero bias."""
        self.embedding.reset_parameters(self.config.init_std)
        self.linear.weight.reset_parameters(self.config.init_std)
        with torch.no_grad():
            self.linear.global_bias.zero_()

    def logit(self, index: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """Return the FM score before the sigmoid, ``[B]``."""
        vectors = self.embedding(index)
        return self.linear(index, value) + self.pairwise(vectors, value)

    def forward(self, index: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """Predict ratings for a batch of feature rows.

        ``y = sigmoid(w_0 + sum_i x_i w_i + sum_{i<j} <v_i, v_j> x_i x_j) * s``
        with ``s = config.rating_scale`` (Rendle 2010, equation 1, squashed to
        the rating range).

        Args:
            index: ``[B, F]`` int64 feature rows; ``config.n_features`` marks
                an empty slot.
            value: ``[B, F]`` float32 feature values ``x_i`` (1 for one-hot
                features, ``1 / number of genres`` for genres, 0 in empty
                slots).

        Returns:
            ``[B]`` float32 predicted ratings in ``(0, rating_scale)``.
        """
        return torch.sigmoid(self.logit(index, value)) * self.config.rating_scale

    def forward_with_penalty(
        self, index: torch.Tensor, value: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``forward(index, value)`` and the L2 penalty of the batch.

        The penalty is ``sum_b sum_i (w_i^2 + ||v_i||^2)`` over the feature
        rows of the batch, counted once per occurrence; padding rows are zero.
        It reuses the looked-up rows, so the gradient stays sparse.
        """
        vectors = self.embedding(index)
        weights = self.linear.weight(index).squeeze(-1)
        logit = (
            self.linear.global_bias
            + (weights * value).sum(dim=1)
            + self.pairwise(vectors, value)
        )
        penalty = vectors.pow(2).sum() + weights.pow(2).sum()
        rating = torch.sigmoid(logit) * self.config.rating_scale
        return rating, penalty

    def export_weights(self) -> dict[str, torch.Tensor]:
        """Return ``global_bias [1]``, ``linear [n]`` and ``embedding [n, k]``.

        The padding row is dropped, so row ``i`` is vocabulary feature ``i``.
        """
        n = self.config.n_features
        return {
            "global_bias": self.linear.global_bias.detach().clone().float(),
            "linear": self.linear.weight.table.weight[:n, 0].detach().clone().float(),
            "embedding": self.embedding.table.weight[:n].detach().clone().float(),
        }
