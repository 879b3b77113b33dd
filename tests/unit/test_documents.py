from __future__ import annotations

import numpy as np
import pytest

from esfm.artifacts import TrainedModel
from esfm.documents import document_id, iter_documents, max_rank_vector_norm
from esfm.query import rank_value_from_score
from esfm.train import TrainConfig, save_model, train
from esfm.validate import compare_ranking, validation_profiles

SMALL = dict(k=8, epochs=2, batch_size=64, lr=2e-2, threads=1)


@pytest.fixture(params=[False, True], ids=["movie-only", "genres"])
def model(request, synthetic_dataset, tmp_path) -> TrainedModel:
    result = train(synthetic_dataset, TrainConfig(**SMALL, genres=request.param))
    return TrainedModel.load(save_model(result, tmp_path / "model"))


def max_inner_product_score(dot: float) -> float:
    """The score Elasticsearch gives a max_inner_product match."""
    return dot + 1.0 if dot >= 0 else 1.0 / (1.0 - dot)


def test_one_document_per_feature(model):
    docs = list(iter_documents(model))
    assert len(docs) == len(model.features)
    assert len({doc["_id"] for doc in docs}) == len(docs)
    assert docs[0]["_id"] == document_id(*model.features[0])


def test_rank_vector_dot_is_rank_value(model):
    docs = {doc["_id"]: doc for doc in iter_documents(model)}
    profile = {"age": "25", "gender": "F"}
    query = np.append(model.profile_vector(profile), np.float32(1.0))
    for movie_id, value in model.rank(profile, 5):
        rank_vector = np.asarray(docs[f"movie:{movie_id}"]["rank_vector"], np.float32)
        assert float(rank_vector @ query) == pytest.approx(value, rel=1e-5, abs=1e-6)


def test_movie_documents_carry_metadata(model):
    docs = {doc["_id"]: doc for doc in iter_documents(model)}
    movie_id = next(value for kind, value in model.features if kind == "movie")
    doc = docs[f"movie:{movie_id}"]
    assert doc["title"] == model.movies[movie_id]["title"]
    assert doc["genres"] == list(model.movies[movie_id]["genres"])
    user_id = next(value for kind, value in model.features if kind == "user")
    assert docs[f"user:{user_id}"]["gender"] == model.users[user_id]["gender"]


def test_script_score_offset_bounds_scores(model):
    bound = max_rank_vector_norm(model)
    side = model.movie_side()
    rank = np.concatenate([side.vectors, side.bias[:, None]], axis=1)
    query = np.append(model.profile_vector({"age": "18", "gender": "M"}), 1.0)
    offset = float(np.linalg.norm(query)) * bound
    assert (rank @ query + offset >= 0).all()


@pytest.mark.parametrize("dot", [-3.5, -0.25, 0.0, 0.4, 7.0])
def test_score_inversion(dot):
    assert rank_value_from_score(max_inner_product_score(dot)) == pytest.approx(dot)


def test_compare_ranking_accepts_model_order(model):
    profile = {"age": "35", "gender": "M"}
    expected = model.rank(profile, 5)
    assert compare_ranking(model, profile, expected, 5) is None


def test_compare_ranking_flags_swap(model):
    profile = {"age": "35", "gender": "M"}
    expected = model.rank(profile, 5)
    # Swap the first adjacent pair that is not a tie.
    i = next(i for i in range(4) if abs(expected[i][1] - expected[i + 1][1]) > 1e-4)
    swapped = list(expected)
    swapped[i], swapped[i + 1] = swapped[i + 1], swapped[i]
    mismatch = compare_ranking(model, profile, swapped, 5)
    assert mismatch is not None
    assert mismatch.position == i


def test_compare_ranking_flags_wrong_value(model):
    profile = {"age": "35", "gender": "M"}
    expected = model.rank(profile, 3)
    wrong = [(expected[0][0], expected[0][1] + 0.5), *expected[1:]]
    mismatch = compare_ranking(model, profile, wrong, 3)
    assert mismatch is not None
    assert "rank value" in mismatch.detail


def test_validation_profiles_cover_age_gender(model):
    profiles = validation_profiles(model, occupations=2, known_users=3)
    pairs = {(p["age"], p["gender"]) for p in profiles if "user" not in p}
    assert len(pairs) == 14
    assert sum("user" in p for p in profiles) == 3
