"""Cold-start evaluation: ranking metrics, baselines and evaluate_model."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from esfm.artifacts import TrainedModel
from esfm.data import load_movielens
from esfm.errors import ModelError
from esfm.evaluate import (
    baseline_metrics,
    cold_start_metrics,
    evaluate_model,
    ranking_metrics,
)
from esfm.train import TrainConfig, save_model, train

SMALL = dict(k=8, epochs=3, batch_size=64, lr=2e-2, weight_decay=1e-3, threads=1)


def test_ranking_metrics_by_hand():
    users = np.array([1, 1, 1, 1, 2, 2])
    movies = np.array([10, 11, 12, 13, 10, 11])
    ratings = np.array([5.0, 1.0, 4.0, 2.0, 3.0, 4.0])
    scores = np.array([0.9, 0.8, 0.1, 0.5, 0.2, 0.1])
    metrics = ranking_metrics(users, movies, ratings, scores, cutoff=2)
    # User 1: order 10 (rel), 11, 13, 12 (rel); top 2 contains one of 2 relevant.
    ndcg_user1 = 1.0 / (1.0 + 1.0 / math.log2(3))
    # User 2: order 10, 11 (rel); one relevant at rank 2.
    ndcg_user2 = (1.0 / math.log2(3)) / 1.0
    assert metrics["ndcg@2"] == pytest.approx((ndcg_user1 + ndcg_user2) / 2)
    assert metrics["recall@2"] == pytest.approx((0.5 + 1.0) / 2)
    assert metrics["users"] == 2


def test_ranking_ties_go_to_lower_movie_id():
    users = np.array([1, 1])
    movies = np.array([20, 10])
    ratings = np.array([1.0, 5.0])
    metrics = ranking_metrics(users, movies, ratings, np.zeros(2), cutoff=1)
    assert metrics["ndcg@1"] == 1.0


def test_users_without_relevant_movies_skipped():
    metrics = ranking_metrics(
        np.array([1, 2]), np.array([1, 1]), np.array([2.0, 5.0]), np.zeros(2)
    )
    assert metrics["users"] == 1


def test_movie_bias_baseline_formula():
    train_ratings = pd.DataFrame(
        {"user": [1, 2, 3], "movie": [1, 1, 2], "rating": [5.0, 5.0, 2.0]}
    )
    test_ratings = pd.DataFrame({"user": [4, 4], "movie": [1, 2], "rating": [4.0, 3.0]})
    metrics = baseline_metrics(train_ratings, test_ratings)
    mean = 4.0
    bias_1 = (10.0 - 2 * mean) / (2 + 25)
    bias_2 = (2.0 - mean) / (1 + 25)
    expected = math.sqrt(((mean + bias_1 - 4.0) ** 2 + (mean + bias_2 - 3.0) ** 2) / 2)
    assert metrics["movie_bias"]["rmse"] == pytest.approx(expected)
    assert metrics["popularity"]["rmse"] is None
    assert metrics["popularity"]["ndcg@10"] == 1.0
    assert metrics["global_mean"]["rmse"] == pytest.approx(math.sqrt(0.5))


def test_cold_start_uses_metadata_only(synthetic_dataset, tmp_path):
    result = train(synthetic_dataset, TrainConfig(**SMALL, cold_start_holdout=0.2))
    model = TrainedModel.load(save_model(result, tmp_path / "model"))
    held = result.held_out_users
    metrics = cold_start_metrics(model, synthetic_dataset, held)
    assert metrics["held_out_users"] == len(held)
    ratings = synthetic_dataset.ratings
    assert metrics["held_out_ratings"] == int(ratings["user"].isin(held).sum())

    user = held[0]
    row = synthetic_dataset.users.loc[user]
    profile = {
        "age": row["age"],
        "gender": row["gender"],
        "occupation": row["occupation"],
    }
    own = ratings[ratings["user"] == user]
    predicted = model.predict(profile, [str(m) for m in own["movie"]])
    assert np.isfinite(predicted).all()
    for name in ("rmse", "ndcg@10", "recall@10"):
        assert 0 <= metrics["model"][name] < 5
    assert set(metrics["baselines"]) == {"movie_bias", "popularity", "global_mean"}


def test_evaluate_model_reproduces_validation(ml100k_dir, tmp_path):
    dataset = load_movielens(ml100k_dir)
    config = TrainConfig(
        k=16,
        epochs=2,
        batch_size=1024,
        lr=5e-3,
        weight_decay=0.02,
        cold_start_holdout=0.1,
        seed=4,
    )
    result = train(dataset, config)
    path = save_model(result, tmp_path / "model")
    report = evaluate_model(path, ml100k_dir)
    assert report["valid_rmse"] == pytest.approx(result.metrics["valid_rmse"], abs=1e-4)
    cold = report["cold_start"]
    assert cold["held_out_users"] == 94
    assert cold["model"]["rmse"] < cold["baselines"]["global_mean"]["rmse"]


def test_evaluate_model_without_holdout(tmp_path, ml100k_dir):
    dataset = load_movielens(ml100k_dir)
    result = train(dataset, TrainConfig(**{**SMALL, "epochs": 1, "batch_size": 4096}))
    path = save_model(result, tmp_path / "model")
    report = evaluate_model(path, ml100k_dir)
    assert report["cold_start"] is None
    assert report["dataset"] == "ml-100k"
    assert report["valid_rmse"] == pytest.approx(result.metrics["valid_rmse"], abs=1e-4)


def test_evaluate_rejects_changed_ratings(tmp_path, ml100k_dir):
    dataset = load_movielens(ml100k_dir).subset_users(range(1, 101))
    result = train(dataset, TrainConfig(**SMALL))
    path = save_model(result, tmp_path / "model")
    with pytest.raises(ModelError, match=r"was trained on \d+ ratings"):
        evaluate_model(path, ml100k_dir)


def test_evaluate_rejects_other_dataset(synthetic_dataset, tmp_path, ml100k_dir):
    result = train(synthetic_dataset, TrainConfig(**SMALL))
    path = save_model(result, tmp_path / "model")
    with pytest.raises(ModelError, match="was trained on synthetic"):
        evaluate_model(path, ml100k_dir)
