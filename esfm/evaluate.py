"""Evaluation of a trained model: validation RMSE and cold-start metrics.

Cold-start protocol (``cold_start_metrics``):

* A seeded 10% of the users is held out entirely, with all their ratings,
  before training (``esfm train --cold-start-holdout 0.1``), so training never
  uses their ids. ``config.json`` stores the held-out user ids under
  ``cold_start.held_out_users``, so ``esfm evaluate`` scores the same users.
* Each held-out user is scored from metadata only: the profile is
  ``{age, gender, occupation}``.
* RMSE is over all ratings of the held-out users.
* Ranking: for each held-out user, the movies that user rated are ordered by
  the model's rank value (equal to ordering by predicted rating). A movie is
  relevant when rated 4 or more. NDCG@10 uses binary gains and the ideal
  order of the user's own relevant movies; Recall@10 is the share of the
  user's relevant movies found in the top 10. Users without a relevant movie
  are skipped. Ties are broken by ascending movie id.
* Baselines, fitted on the ratings of the training users only:
  ``movie_bias`` predicts ``mean + b_movie`` with
  ``b_movie = sum(r - mean) / (count + 25)``, and ranks by that prediction;
  ``popularity`` ranks by the number of training ratings and predicts no
  ratings, so it has no RMSE.

For a model trained on all users there are no held-out users, so
``evaluate_model`` reports only the validation RMSE recomputed on the
validation split that training used (the same seed and fraction).
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from esfm.artifacts import MovieSide, TrainedModel
from esfm.data import MovieLensDataset, load_movielens
from esfm.errors import ModelError

logger = logging.getLogger(__name__)

RELEVANT_RATING = 4.0
CUTOFF = 10
MOVIE_BIAS_DAMPING = 25.0


def _user_terms(
    model: TrainedModel, profiles: list[dict[str, str]]
) -> tuple[np.ndarray, np.ndarray]:
    """Return per-profile v_U ``[u, k]`` and the user-only logit terms ``[u]``."""
    embedding = model.embedding.astype(np.float64)
    linear = model.linear.astype(np.float64)
    vectors = np.zeros((len(profiles), model.k))
    constant = np.full(len(profiles), model.global_bias, dtype=np.float64)
    for position, profile in enumerate(profiles):
        rows = [model.feature_row(kind, value) for kind, value in profile.items()]
        user_vectors = embedding[rows]
        vectors[position] = user_vectors.sum(axis=0)
        constant[position] += linear[rows].sum() + 0.5 * (
            (vectors[position] ** 2).sum() - (user_vectors**2).sum()
        )
    return vectors, constant


def predict_pairs(
    model: TrainedModel,
    profiles: list[dict[str, str]],
    profile_index: np.ndarray,
    movie_ids: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Predict ratings and rank values for many (profile, movie) pairs.

    Args:
        model: the loaded model.
        profiles: distinct user profiles.
        profile_index: ``[n]`` position in ``profiles`` of each pair.
        movie_ids: ``[n]`` movie id (int or str) of each pair.

    Returns:
        ``(ratings [n], rank_values [n])``; the rank value is
        ``b_M + <v_U, v_M>``, the part of the logit that depends on the movie.
    """
    side: MovieSide = model.movie_side()
    lookup = pd.Index([int(movie) for movie in side.movie_ids])
    positions = lookup.get_indexer(np.asarray(movie_ids, dtype=np.int64))
    if (positions < 0).any():
        missing = np.asarray(movie_ids)[positions < 0][0]
        raise ModelError(
            f"movie {missing} is not in model {model.model_id}",
            hint="evaluate with the dataset the model was trained on",
        )
    vectors, constant = _user_terms(model, profiles)
    rank_values = side.bias[positions].astype(np.float64) + np.einsum(
        "ij,ij->i",
        vectors[profile_index],
        side.vectors[positions].astype(np.float64),
    )
    logit = constant[profile_index] + rank_values
    ratings = model.rating_scale / (1.0 + np.exp(-logit))
    return ratings, rank_values


def ranking_metrics(
    users: np.ndarray,
    movies: np.ndarray,
    ratings: np.ndarray,
    scores: np.ndarray,
    *,
    cutoff: int = CUTOFF,
) -> dict[str, float]:
    """Return mean NDCG@cutoff and Recall@cutoff over users (see module doc).

    Within each user, higher ``scores`` rank first; ties go to the lower
    movie id.
    """
    order = np.lexsort((movies, -scores, users))
    users, ratings = users[order], ratings[order]
    boundaries = np.flatnonzero(np.diff(users)) + 1
    starts = np.concatenate([[0], boundaries])
    stops = np.concatenate([boundaries, [len(users)]])
    discounts = 1.0 / np.log2(np.arange(2, cutoff + 2))
    ndcg, recall = [], []
    for start, stop in zip(starts, stops, strict=True):
        relevant = ratings[start:stop] >= RELEVANT_RATING
        n_relevant = int(relevant.sum())
        if n_relevant == 0:
            continue
        top = relevant[:cutoff]
        dcg = float((top * discounts[: len(top)]).sum())
        ideal = float(discounts[: min(n_relevant, cutoff)].sum())
        ndcg.append(dcg / ideal)
        recall.append(float(top.sum()) / n_relevant)
    return {
        f"ndcg@{cutoff}": float(np.mean(ndcg)) if ndcg else math.nan,
        f"recall@{cutoff}": float(np.mean(recall)) if recall else math.nan,
        "users": len(ndcg),
    }


def _rmse(predicted: np.ndarray, actual: np.ndarray) -> float:
    return float(np.sqrt(np.mean((predicted - actual) ** 2)))


def baseline_metrics(
    train_ratings: pd.DataFrame, test_ratings: pd.DataFrame
) -> dict[str, dict[str, Any]]:
    """Score the movie-bias and popularity baselines on ``test_ratings``."""
    mean = float(train_ratings["rating"].mean())
    grouped = train_ratings.groupby("movie")["rating"]
    movie_bias = (grouped.sum() - mean * grouped.count()) / (
        grouped.count() + MOVIE_BIAS_DAMPING
    )
    counts = grouped.count()
    movies = test_ratings["movie"].to_numpy()
    users = test_ratings["user"].to_numpy()
    actual = test_ratings["rating"].to_numpy(dtype=np.float64)

    bias_prediction = mean + movie_bias.reindex(movies).fillna(0.0).to_numpy()
    popularity = counts.reindex(movies).fillna(0).to_numpy(dtype=np.float64)
    return {
        "movie_bias": {
            "rmse": _rmse(bias_prediction, actual),
            **ranking_metrics(users, movies, actual, bias_prediction),
        },
        "popularity": {
            "rmse": None,
            **ranking_metrics(users, movies, actual, popularity),
        },
        "global_mean": {"rmse": _rmse(np.full(len(actual), mean), actual)},
    }


def cold_start_metrics(
    model: TrainedModel, dataset: MovieLensDataset, held_out_users: list[int]
) -> dict[str, Any]:
    """Score held-out users from metadata only, with both baselines.

    Args:
        model: a model trained without ``held_out_users``.
        dataset: the full dataset, including the held-out users.
        held_out_users: ids of users whose ratings training never saw.
    """
    held = np.asarray(sorted(held_out_users), dtype=np.int64)
    is_held = dataset.ratings["user"].isin(held)
    test = dataset.ratings[is_held]
    train = dataset.ratings[~is_held]
    users = dataset.users.loc[held]
    profiles = [
        {"age": row.age, "gender": row.gender, "occupation": row.occupation}
        for row in users.itertuples()
    ]
    profile_index = pd.Index(held).get_indexer(test["user"].to_numpy())
    predicted, rank_values = predict_pairs(
        model, profiles, profile_index, test["movie"].to_numpy()
    )
    actual = test["rating"].to_numpy(dtype=np.float64)
    model_metrics = {
        "rmse": _rmse(predicted, actual),
        **ranking_metrics(
            test["user"].to_numpy(), test["movie"].to_numpy(), actual, rank_values
        ),
    }
    return {
        "held_out_users": len(held),
        "held_out_ratings": len(test),
        "model": model_metrics,
        "baselines": baseline_metrics(train, test),
    }


def validation_rmse(model: TrainedModel, dataset: MovieLensDataset) -> dict[str, Any]:
    """Recompute the validation RMSE on the split that training used.

    The split is rebuilt from the seed and fractions in ``model.config`` over
    the ratings of the training users, in file order, so the dataset must be
    the one the model was trained on.
    """
    from esfm.train import TrainConfig, split_ratings

    config = model.config
    held = {
        int(user) for user in config.get("cold_start", {}).get("held_out_users", [])
    }
    ratings = dataset.ratings
    if held:
        ratings = ratings[~ratings["user"].isin(held)].reset_index(drop=True)
    expected = sum(
        int(model.metrics.get(key, 0))
        for key in ("n_train", "n_early_stopping", "n_valid")
    )
    if expected and expected != len(ratings):
        raise ModelError(
            f"model {model.model_id} was trained on {expected} ratings, but the "
            f"dataset has {len(ratings)} ratings of its training users",
            hint="evaluate with the exact dataset files the model was trained on",
        )
    split_config = TrainConfig(
        seed=int(config["seed"]),
        valid_fraction=float(config["valid_fraction"]),
        early_stopping_fraction=float(config["early_stopping_fraction"]),
    )
    valid = ratings.iloc[split_ratings(len(ratings), split_config).valid]
    user_ids = valid["user"].unique()
    profiles = []
    for user in user_ids:
        row = dataset.users.loc[user]
        profiles.append(
            {
                "user": str(user),
                "age": row["age"],
                "gender": row["gender"],
                "occupation": row["occupation"],
            }
        )
    profile_index = pd.Index(user_ids).get_indexer(valid["user"].to_numpy())
    predicted, _ = predict_pairs(model, profiles, profile_index, valid["movie"])
    return {
        "valid_rmse": _rmse(predicted, valid["rating"].to_numpy(dtype=np.float64)),
        "valid_ratings": len(valid),
    }


def evaluate_model(
    model_dir: str | os.PathLike[str], data_dir: str | os.PathLike[str]
) -> dict[str, Any]:
    """Evaluate a saved model on the dataset it was trained on.

    Returns:
        ``model_id``, ``dataset``, ``valid_rmse`` (recomputed), the training
        metrics' ``valid_rmse``, and ``cold_start`` metrics when the model was
        trained with held-out users (None otherwise).

    Raises:
        ModelError: the model directory is invalid, or the dataset differs
            from the one in ``config.json``.
        DataError: the dataset cannot be loaded.
    """
    model = TrainedModel.load(model_dir)
    dataset = load_movielens(data_dir)
    trained_on = model.config.get("dataset")
    if trained_on and trained_on != dataset.name:
        raise ModelError(
            f"model {model.model_id} was trained on {trained_on}, but "
            f"{str(Path(data_dir))!r} holds {dataset.name}",
            hint=f"pass --data pointing at {trained_on}",
        )
    held_out = [
        int(user)
        for user in model.config.get("cold_start", {}).get("held_out_users", [])
    ]
    result: dict[str, Any] = {
        "model_id": model.model_id,
        "dataset": dataset.name,
        "training_valid_rmse": model.metrics.get("valid_rmse"),
        **validation_rmse(model, dataset),
        "cold_start": None,
    }
    if held_out:
        result["cold_start"] = cold_start_metrics(model, dataset, held_out)
    logger.info("evaluated model %s on %s", model.model_id, dataset.name)
    return result
