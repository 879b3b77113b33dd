"""Index documents built from a trained model: one per feature value.

Movie documents carry the whole movie side of the model (the movie and, when
the model has them, its genre features): ``embedding`` is ``v_M``, ``bias`` is
``b_M`` and ``rank_vector`` is ``[v_M, b_M]``. All other documents carry their
own ``v_i``, ``w_i`` and ``[v_i, w_i]``. A query vector ``[v_U, 1]`` then
scores each movie by ``b_M + <v_U, v_M>``, the FM rank value.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from esfm.artifacts import TrainedModel

MOVIE = "movie"
USER_SIDE_TYPES = ("user", "age", "gender", "occupation")


def document_id(feature_type: str, value: str) -> str:
    """Return the explicit ``_id`` of a feature's document, so retries overwrite."""
    return f"{feature_type}:{value}"


def _vector(values: np.ndarray) -> list[float]:
    # float() of a float32 gives the float64 with the same value, and
    # Elasticsearch stores float32 again, so the round trip is exact.
    return [float(x) for x in values.astype(np.float32)]


def iter_documents(model: TrainedModel) -> Iterator[dict[str, Any]]:
    """Yield one document source per feature, ``_id`` under the ``_id`` key."""
    movie_side = model.movie_side()
    movie_rows = {movie_id: i for i, movie_id in enumerate(movie_side.movie_ids)}

    for row, (feature_type, value) in enumerate(model.features):
        doc: dict[str, Any] = {
            "_id": document_id(feature_type, value),
            "feature_type": feature_type,
            "value": value,
        }
        if feature_type == MOVIE:
            i = movie_rows[value]
            vector = movie_side.vectors[i]
            bias = np.float32(movie_side.bias[i])
            movie = model.movies.get(value, {})
            doc["title"] = movie.get("title")
            doc["genres"] = list(movie.get("genres", []))
        else:
            if feature_type == "user":
                doc.update(model.users.get(value, {}))
            vector = model.embedding[row]
            bias = np.float32(model.linear[row])
        doc["bias"] = float(bias)
        doc["embedding"] = _vector(vector)
        doc["rank_vector"] = _vector(np.append(vector, bias))
        yield doc


def count_documents(model: TrainedModel) -> int:
    return len(model.features)


def max_rank_vector_norm(model: TrainedModel) -> float:
    """Return the largest L2 norm of any movie's ``rank_vector``.

    ``script_score`` rejects negative scores, so the painless ranking adds
    ``|q| * max_norm``, an upper bound of ``-<q, r>`` by Cauchy-Schwarz.
    """
    side = model.movie_side()
    rank = np.concatenate([side.vectors, side.bias[:, None]], axis=1)
    return float(np.linalg.norm(rank.astype(np.float64), axis=1).max())
