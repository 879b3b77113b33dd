"""Shared data fixtures: MovieLens from $ESFM_TEST_DATA and a synthetic dataset."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from esfm.data import AGE_BUCKETS, OCCUPATIONS, MovieLensDataset

GENRES = ["Action", "Comedy", "Drama", "Horror", "Romance"]


def _movielens_dir(name: str) -> Path:
    root = os.environ.get("ESFM_TEST_DATA")
    if not root:
        pytest.skip(f"ESFM_TEST_DATA is not set; it must name a folder with {name}/")
    path = Path(root) / name
    if not path.is_dir():
        pytest.skip(f"{path} does not exist; ESFM_TEST_DATA must contain {name}/")
    return path


@pytest.fixture(scope="session")
def ml100k_dir() -> Path:
    """The MovieLens 100K folder under $ESFM_TEST_DATA."""
    return _movielens_dir("ml-100k")


@pytest.fixture(scope="session")
def ml1m_dir() -> Path:
    """The MovieLens 1M folder under $ESFM_TEST_DATA."""
    return _movielens_dir("ml-1m")


def make_synthetic_dataset(
    n_users: int = 60, n_movies: int = 40, per_user: int = 15, seed: int = 0
) -> MovieLensDataset:
    """Build random users, movies and ratings with a learnable structure."""
    rng = np.random.default_rng(seed)
    ages = list(AGE_BUCKETS)
    occupations = list(OCCUPATIONS)
    users = pd.DataFrame(
        {
            "age": [ages[i % len(ages)] for i in range(n_users)],
            "gender": ["F" if i % 2 else "M" for i in range(n_users)],
            "occupation": [occupations[i % len(occupations)] for i in range(n_users)],
        },
        index=pd.Index(np.arange(1, n_users + 1), name="user", dtype="int64"),
    )
    movies = pd.DataFrame(
        {
            "title": [f"Movie {i} (2000)" for i in range(1, n_movies + 1)],
            "genres": [
                sorted(rng.choice(GENRES, size=1 + i % 3, replace=False).tolist())
                for i in range(n_movies)
            ],
        },
        index=pd.Index(np.arange(1, n_movies + 1), name="movie", dtype="int64"),
    )
    user_taste = rng.normal(size=(n_users, 3))
    movie_taste = rng.normal(size=(n_movies, 3))
    rows = []
    for user in range(n_users):
        for movie in rng.choice(n_movies, size=per_user, replace=False):
            score = 3.0 + user_taste[user] @ movie_taste[movie] * 0.7
            rating = float(np.clip(np.rint(score + rng.normal(0, 0.3)), 1, 5))
            rows.append((user + 1, int(movie) + 1, rating))
    ratings = pd.DataFrame(rows, columns=["user", "movie", "rating"])
    ratings["rating"] = ratings["rating"].astype(np.float32)
    return MovieLensDataset("synthetic", ratings, users, movies)


@pytest.fixture
def synthetic_dataset() -> MovieLensDataset:
    """A small in-memory dataset that needs no MovieLens files."""
    return make_synthetic_dataset()
