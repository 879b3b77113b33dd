"""Factorization machine maths checked against naive loops and autograd."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from esfm.model import FactorizationMachine, FMConfig, PairwiseInteraction
from esfm.train import FusedTrainer, TrainConfig


def naive_pairwise(vectors: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    batch, fields, _ = vectors.shape
    result = torch.zeros(batch, dtype=torch.float64)
    for b in range(batch):
        for i in range(fields):
            for j in range(i + 1, fields):
                dot = torch.dot(vectors[b, i], vectors[b, j])
                result[b] += dot * value[b, i] * value[b, j]
    return result


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pairwise_equals_double_sum(seed):
    generator = torch.Generator().manual_seed(seed)
    vectors = torch.randn(6, 7, 5, generator=generator, dtype=torch.float64)
    value = torch.rand(6, 7, generator=generator, dtype=torch.float64)
    fast = PairwiseInteraction()(vectors, value)
    assert torch.allclose(fast, naive_pairwise(vectors, value), atol=1e-10)


def test_forward_equals_formula():
    torch.manual_seed(0)
    model = FactorizationMachine(FMConfig(n_features=12, k=4, init_std=0.3))
    index = torch.tensor([[0, 3, 5, 12], [1, 2, 11, 4]])
    value = torch.tensor([[1.0, 1.0, 0.5, 0.0], [1.0, 1.0, 1.0, 0.25]])
    weights = model.export_weights()
    expected = []
    for rows, xs in zip(index.tolist(), value.tolist(), strict=True):
        logit = float(weights["global_bias"][0])
        for position, (row, x) in enumerate(zip(rows, xs, strict=True)):
            if row == 12:
                continue
            logit += x * float(weights["linear"][row])
            for other, x_other in zip(
                rows[position + 1 :], xs[position + 1 :], strict=True
            ):
                if other == 12:
                    continue
                dot = torch.dot(weights["embedding"][row], weights["embedding"][other])
                logit += float(dot) * x * x_other
        expected.append(torch.sigmoid(torch.tensor(logit)) * 5.5)
    predicted = model(index, value)
    assert torch.allclose(predicted, torch.stack(expected), atol=1e-6)


def test_output_inside_rating_scale():
    model = FactorizationMachine(FMConfig(n_features=5, k=3, init_std=0.5))
    predicted = model(torch.randint(0, 5, (50, 3)), torch.ones(50, 3))
    assert (predicted > 0).all()
    assert (predicted < 5.5).all()


def test_padding_row_stays_zero():
    model = FactorizationMachine(FMConfig(n_features=5, k=3))
    padding = model.embedding.table.weight[5]
    assert (padding == 0).all()
    assert model.export_weights()["embedding"].shape == (5, 3)
    assert model.export_weights()["linear"].shape == (5,)


def test_config_is_frozen():
    config = FMConfig(n_features=5)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.k = 3  # type: ignore[misc]


@pytest.mark.parametrize("one_hot", [False, True])
def test_fused_gradient_matches_autograd(one_hot):
    torch.manual_seed(3)
    model = FactorizationMachine(
        FMConfig(n_features=20, k=6, init_std=0.2, sparse=False)
    )
    with torch.no_grad():
        model.linear.global_bias.fill_(0.3)
    weight_decay = 0.05
    trainer = FusedTrainer(
        model, TrainConfig(weight_decay=weight_decay), one_hot=one_hot
    )
    index = torch.tensor([[0, 4, 9, 20], [1, 4, 9, 17], [0, 5, 20, 20]])
    value = torch.tensor([[1.0, 1.0, 0.5, 0.0], [1.0, 1.0, 0.5, 0.5], [1, 1, 0, 0.0]])
    if one_hot:
        index = index[:, :3].clone()
        index[2, 2] = 7
        value = torch.ones(3, 3)
    target = torch.tensor([4.0, 2.0, 5.0])

    predicted, penalty = model.forward_with_penalty(index, value)
    loss = ((predicted - target).pow(2).sum() + weight_decay * penalty) / 3
    loss.backward()
    rows, grad, bias_grad, squared_error = trainer.gradients(index, value, target)

    summed = torch.zeros(21, 7)
    summed[rows] = grad
    expected_error = (predicted - target).pow(2).sum().detach()
    assert torch.allclose(squared_error, expected_error, atol=1e-5)
    assert torch.allclose(
        summed[:20, :6], model.embedding.table.weight.grad[:20], atol=1e-6
    )
    assert torch.allclose(
        summed[:20, 6], model.linear.weight.table.weight.grad[:20, 0], atol=1e-6
    )
    assert torch.allclose(bias_grad.view(1), model.linear.global_bias.grad, atol=1e-6)
