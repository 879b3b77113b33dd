"""Loading and scoring of a saved model directory with NumPy only.

Serving, indexing and validation use this module; it must not import torch
or the training code, so it runs in processes without them. The file format
and the ranking formula are described in docs/model-format.md.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import math
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from esfm.errors import ModelError, QueryError

logger = logging.getLogger(__name__)

MODEL_FILES = ("model.safetensors", "vocabulary.json", "config.json", "metrics.json")
USER_SIDE_TYPES = ("user", "age", "gender", "occupation")
FEATURE_TYPES = ("user", "movie", "age", "gender", "occupation", "genre")
DEFAULT_RATING_SCALE = 5.5


@dataclasses.dataclass(frozen=True)
class MovieSide:
    """Per-movie ranking terms of docs/model-format.md.

    Attributes:
        movie_ids: movie ids in vocabulary order (ascending numeric id).
        bias: float32 ``[n_movies]`` b_M, the linear and intra-movie pairwise
            terms of the movie-side features.
        vectors: float32 ``[n_movies, k]`` v_M, the x-weighted sum of the
            movie-side embeddings.
    """

    movie_ids: list[str]
    bias: np.ndarray
    vectors: np.ndarray


# Model ids written by esfm train end in 12 hex digits of the weights' digest.
MODEL_ID_SUFFIX = re.compile(r"-([0-9a-f]{12})$")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ModelError(
            f"cannot read {str(path)!r}: {exc.strerror}",
            hint="train the model again with: esfm train --out DIR",
        ) from exc
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(
            f"invalid JSON in {str(path)!r}: {exc}",
            hint="the file is truncated or edited; train the model again",
        ) from exc


def weights_digest(weights: dict[str, np.ndarray]) -> str:
    """Return the SHA-256 hex digest that model ids end with (first 12 digits)."""
    digest = hashlib.sha256()
    for name in sorted(weights):
        digest.update(name.encode())
        digest.update(np.ascontiguousarray(weights[name]).tobytes())
    return digest.hexdigest()


def _check_model_id(path: Path, config: dict[str, Any], weights: dict) -> None:
    model_id = str(config.get("model_id", ""))
    match = MODEL_ID_SUFFIX.search(model_id)
    if match is None:
        return
    if weights_digest(weights)[:12] != match.group(1):
        raise ModelError(
            f"the weights in {str(path)!r} do not match model id {model_id!r}: the "
            "model directory was changed after training",
            hint="train the model again; esfm keys indices on the model id, so "
            "edited weights would be mistaken for the index already built",
        )


def _load_weights(path: Path) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelError(
            f"cannot load weights from {str(path)!r}: {exc}",
            hint="the file is truncated or corrupt; train the model again",
        ) from exc


def _parse_features(path: Path, vocabulary: Any) -> list[tuple[str, str]]:
    if not isinstance(vocabulary, dict) or not isinstance(
        vocabulary.get("features"), list
    ):
        raise ModelError(
            f"{str(path)!r} has no 'features' list",
            hint="train the model again",
        )
    features = []
    for position, entry in enumerate(vocabulary["features"]):
        try:
            feature = (str(entry["feature_type"]), str(entry["value"]))
        except (KeyError, TypeError) as exc:
            raise ModelError(
                f"feature {position} in {str(path)!r} lacks feature_type or value: "
                f"{entry!r}",
                hint="train the model again",
            ) from exc
        if feature[0] not in FEATURE_TYPES:
            raise ModelError(
                f"feature {position} in {str(path)!r} has unknown type {feature[0]!r}",
                hint=f"valid types: {', '.join(FEATURE_TYPES)}",
            )
        features.append(feature)
    if len(set(features)) != len(features):
        raise ModelError(
            f"{str(path)!r} lists a feature twice", hint="train the model again"
        )
    return features


class TrainedModel:
    """A loaded model directory: weights, vocabulary, config and metrics.

    Use ``TrainedModel.load(path)``; the constructor takes validated parts.
    """

    def __init__(
        self,
        *,
        path: Path,
        config: dict[str, Any],
        metrics: dict[str, Any],
        features: list[tuple[str, str]],
        movies: dict[str, dict],
        users: dict[str, dict],
        global_bias: float,
        linear: np.ndarray,
        embedding: np.ndarray,
    ) -> None:
        self.path = path
        self.config = config
        self.metrics = metrics
        self.features = features
        self.movies = movies
        self.users = users
        self.global_bias = global_bias
        self.linear = linear
        self.embedding = embedding
        self.model_id: str = str(config.get("model_id", path.name))
        self.k: int = int(embedding.shape[1])
        self.rating_scale = float(config.get("rating_scale", DEFAULT_RATING_SCALE))
        self._rows = {feature: row for row, feature in enumerate(features)}

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> TrainedModel:
        """Load and validate a model directory.

        Raises:
            ModelError: a file is missing, unreadable or truncated, the tensor
                shapes disagree with the vocabulary or the config, or a weight
                is NaN or infinite. The message names the file.
        """
        directory = Path(path)
        if not directory.is_dir():
            raise ModelError(
                f"model directory {str(directory)!r} does not exist",
                hint="train one with: esfm train --data DIR --out DIR",
            )
        missing = [name for name in MODEL_FILES if not (directory / name).is_file()]
        if missing:
            raise ModelError(
                f"model directory {str(directory)!r} lacks {', '.join(missing)}",
                hint="the save was incomplete or files were deleted; train again",
            )
        config = _read_json(directory / "config.json")
        metrics = _read_json(directory / "metrics.json")
        vocabulary = _read_json(directory / "vocabulary.json")
        for name, document in (("config.json", config), ("metrics.json", metrics)):
            if not isinstance(document, dict):
                raise ModelError(
                    f"{str(directory / name)!r} must hold a JSON object, not "
                    f"{type(document).__name__}",
                    hint="the file was edited or corrupted; train the model again",
                )
        features = _parse_features(directory / "vocabulary.json", vocabulary)
        weights = _load_weights(directory / "model.safetensors")
        global_bias, linear, embedding = _validate_weights(
            directory / "model.safetensors", weights, len(features), config
        )
        _check_model_id(directory / "model.safetensors", config, weights)
        movies = vocabulary.get("movies") or {}
        users = vocabulary.get("users") or {}
        unknown = [
            value
            for feature_type, value in features
            if feature_type == "movie" and value not in movies
        ]
        if unknown:
            raise ModelError(
                f"{str(directory / 'vocabulary.json')!r} has no metadata for "
                f"{len(unknown)} movie(s), first {unknown[0]!r}",
                hint="train the model again",
            )
        model = cls(
            path=directory,
            config=config,
            metrics=metrics,
            features=features,
            movies=movies,
            users=users,
            global_bias=global_bias,
            linear=linear,
            embedding=embedding,
        )
        logger.debug("loaded model %s from %s", model.model_id, directory)
        return model

    # -- lookups -----------------------------------------------------------

    def feature_row(self, feature_type: str, value: str) -> int:
        """Return the weight row of a feature.

        Raises:
            QueryError: the feature is not in the vocabulary.
        """
        row = self._rows.get((feature_type, str(value)))
        if row is None:
            raise QueryError(
                f"unknown {feature_type} {value!r}: model {self.model_id} has no "
                "such feature",
                hint=_known_values_hint(self.features, feature_type),
            )
        return row

    def _profile_rows(self, profile: dict[str, str]) -> list[int]:
        rows = []
        for feature_type, value in profile.items():
            if feature_type not in USER_SIDE_TYPES:
                raise QueryError(
                    f"invalid profile key {feature_type!r}",
                    hint=f"valid keys: {', '.join(USER_SIDE_TYPES)}",
                )
            rows.append(self.feature_row(feature_type, value))
        return rows

    @property
    def genre_features(self) -> bool:
        """Whether movies carry genre features."""
        return any(feature_type == "genre" for feature_type, _ in self.features)

    # -- movie side --------------------------------------------------------

    @functools.cached_property
    def _movie_side(self) -> MovieSide:
        movie_rows = [
            (value, row)
            for row, (feature_type, value) in enumerate(self.features)
            if feature_type == "movie"
        ]
        movie_ids = [value for value, _ in movie_rows]
        rows = np.array([row for _, row in movie_rows], dtype=np.int64)
        linear = self.linear.astype(np.float64)
        embedding = self.embedding.astype(np.float64)
        bias = linear[rows].copy()
        vectors = embedding[rows].copy()
        if self.genre_features:
            sum_of_squares = (embedding[rows] ** 2).sum(axis=1)
            for position, movie_id in enumerate(movie_ids):
                genres = self.movies[movie_id].get("genres") or []
                for genre in genres:
                    row = self._rows.get(("genre", genre))
                    if row is None:
                        continue
                    x = 1.0 / len(genres)
                    bias[position] += x * linear[row]
                    vectors[position] += x * embedding[row]
                    sum_of_squares[position] += x * x * (embedding[row] ** 2).sum()
            bias += 0.5 * ((vectors**2).sum(axis=1) - sum_of_squares)
        return MovieSide(
            movie_ids=movie_ids,
            bias=bias.astype(np.float32),
            vectors=vectors.astype(np.float32),
        )

    def movie_side(self) -> MovieSide:
        """Return b_M and v_M for every movie of the vocabulary."""
        return self._movie_side

    def profile_vector(self, profile: dict[str, str]) -> np.ndarray:
        """Return v_U, the sum of the embeddings of the profile's features.

        Args:
            profile: canonical values keyed by ``user``, ``age``, ``gender`` or
                ``occupation``, as from ``esfm.data.normalize_profile``.

        Raises:
            QueryError: a key is not user-side or a value is unknown.
        """
        rows = self._profile_rows(profile)
        if not rows:
            return np.zeros(self.k, dtype=np.float32)
        return self.embedding[rows].astype(np.float64).sum(axis=0).astype(np.float32)

    # -- scoring -----------------------------------------------------------

    def rank(
        self, profile: dict[str, str], k: int, exclude: set[str] | None = None
    ) -> list[tuple[str, float]]:
        """Return the top ``k`` movies for a profile by ``b_M + <v_U, v_M>``.

        The rank value is computed in float32. Ties go to the movie that comes
        first in vocabulary order (ascending numeric movie id), so the order is
        deterministic. Movies in ``exclude`` are skipped.
        """
        side = self.movie_side()
        user_vector = self.profile_vector(profile)
        scores = side.bias + side.vectors @ user_vector
        keep = np.ones(len(scores), dtype=bool)
        if exclude:
            excluded = {str(movie) for movie in exclude}
            keep = np.array([movie not in excluded for movie in side.movie_ids])
        positions = np.flatnonzero(keep)
        order = np.lexsort((positions, -scores[positions]))[: max(k, 0)]
        return [
            (side.movie_ids[positions[i]], float(scores[positions[i]])) for i in order
        ]

    def predict(self, profile: dict[str, str], movie_ids: list[str]) -> np.ndarray:
        """Return predicted ratings for ``movie_ids`` with the full FM formula.

        Includes the global bias, the user-side linear terms and the pairwise
        terms inside the profile, then applies ``sigmoid(.) * rating_scale``.

        Raises:
            QueryError: a profile value or a movie id is unknown.
        """
        rows = self._profile_rows(profile)
        embedding = self.embedding.astype(np.float64)
        user_vectors = embedding[rows]
        user_vector = user_vectors.sum(axis=0)
        user_term = (
            self.global_bias
            + float(self.linear[rows].astype(np.float64).sum())
            + 0.5 * float((user_vector**2).sum() - (user_vectors**2).sum())
        )
        side = self.movie_side()
        position_of = _movie_positions(side)
        positions = []
        for movie_id in movie_ids:
            position = position_of.get(str(movie_id))
            if position is None:
                raise QueryError(
                    f"unknown movie {movie_id!r}: model {self.model_id} has no such "
                    "movie"
                )
            positions.append(position)
        positions_array = np.array(positions, dtype=np.int64)
        logit = (
            user_term
            + side.bias[positions_array].astype(np.float64)
            + side.vectors[positions_array].astype(np.float64) @ user_vector
        )
        return (self.rating_scale / (1.0 + np.exp(-logit))).astype(np.float32)


@functools.lru_cache(maxsize=8)
def _positions_cache(movie_ids: tuple[str, ...]) -> dict[str, int]:
    return {movie: position for position, movie in enumerate(movie_ids)}


def _movie_positions(side: MovieSide) -> dict[str, int]:
    return _positions_cache(tuple(side.movie_ids))


def _known_values_hint(features: list[tuple[str, str]], feature_type: str) -> str:
    values = [value for kind, value in features if kind == feature_type]
    if not values:
        return f"this model has no {feature_type} features"
    if len(values) > 30:
        return f"{len(values)} {feature_type} values are known, from {values[0]!r}"
    return f"valid {feature_type} values: {', '.join(values)}"


def _validate_weights(
    path: Path, weights: dict[str, np.ndarray], n: int, config: dict[str, Any]
) -> tuple[float, np.ndarray, np.ndarray]:
    missing = [
        name for name in ("global_bias", "linear", "embedding") if name not in weights
    ]
    if missing:
        raise ModelError(
            f"{str(path)!r} lacks tensor(s) {', '.join(missing)}",
            hint="train the model again",
        )
    global_bias = weights["global_bias"]
    linear = weights["linear"]
    embedding = weights["embedding"]
    expected_k = config.get("k")
    shapes_ok = (
        global_bias.shape == (1,)
        and linear.shape == (n,)
        and embedding.ndim == 2
        and embedding.shape[0] == n
        and (expected_k is None or embedding.shape[1] == int(expected_k))
    )
    if not shapes_ok:
        raise ModelError(
            f"tensor shapes in {str(path)!r} disagree with the vocabulary of {n} "
            f"features and k={expected_k}: global_bias {list(global_bias.shape)}, "
            f"linear {list(linear.shape)}, embedding {list(embedding.shape)}",
            hint="model.safetensors and vocabulary.json come from different "
            "trainings; train the model again",
        )
    for name, tensor in (
        ("global_bias", global_bias),
        ("linear", linear),
        ("embedding", embedding),
    ):
        if tensor.dtype != np.float32:
            raise ModelError(
                f"tensor {name!r} in {str(path)!r} is {tensor.dtype}, expected float32",
                hint="train the model again",
            )
        if not np.isfinite(tensor).all():
            count = int((~np.isfinite(tensor)).sum())
            raise ModelError(
                f"tensor {name!r} in {str(path)!r} has {count} NaN or infinite "
                "value(s)",
                hint="train the model again, with a lower --lr if it diverged",
            )
    bias = float(global_bias[0])
    if not math.isfinite(bias):
        raise ModelError(f"global_bias in {str(path)!r} is not finite")
    return bias, linear, embedding
