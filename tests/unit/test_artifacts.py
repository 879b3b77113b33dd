"""NumPy model loading: validation, agreement with torch, and ranking."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from esfm.artifacts import TrainedModel
from esfm.data import build_vocabulary, movie_feature_table, user_feature_table
from esfm.errors import ModelError, QueryError
from esfm.train import TrainConfig, save_model, train

SMALL = dict(k=8, epochs=3, batch_size=64, lr=2e-2, weight_decay=1e-3, threads=1)


@pytest.fixture(params=[False, True], ids=["movie-only", "genres"])
def saved(request, synthetic_dataset, tmp_path):
    result = train(synthetic_dataset, TrainConfig(**SMALL, genres=request.param))
    path = save_model(result, tmp_path / "model")
    return result, path


def torch_predictions(result, user: int, include_user: bool):
    dataset = result.dataset
    vocabulary = build_vocabulary(dataset, genres=result.config.genres)
    _, user_index, user_value = user_feature_table(
        dataset.users.loc[[user]], vocabulary, include_user=include_user
    )
    movie_ids, movie_index, movie_value = movie_feature_table(dataset, vocabulary)
    count = len(movie_ids)
    index = np.concatenate([np.repeat(user_index, count, axis=0), movie_index], axis=1)
    value = np.concatenate([np.repeat(user_value, count, axis=0), movie_value], axis=1)
    with torch.no_grad():
        predicted = result.model(torch.from_numpy(index), torch.from_numpy(value))
    return [str(movie) for movie in movie_ids], predicted.numpy()


def profile_of(dataset, user: int, include_user: bool) -> dict[str, str]:
    row = dataset.users.loc[user]
    profile = {
        "age": row["age"],
        "gender": row["gender"],
        "occupation": row["occupation"],
    }
    if include_user:
        profile["user"] = str(user)
    return profile


def test_load_attributes(saved):
    result, path = saved
    model = TrainedModel.load(path)
    assert model.model_id == result.model_id
    assert model.k == 8
    assert model.features == list(result.vocabulary.features)
    assert model.embedding.shape == (len(model.features), 8)
    assert model.embedding.dtype == np.float32
    assert model.linear.shape == (len(model.features),)
    assert isinstance(model.global_bias, float)
    assert model.movies["1"]["title"] == "Movie 1 (2000)"
    assert set(model.users["1"]) == {"age", "gender", "occupation"}
    assert model.metrics["best_epoch"] >= 1


@pytest.mark.parametrize("include_user", [True, False])
def test_predict_matches_torch(saved, include_user):
    result, path = saved
    model = TrainedModel.load(path)
    movie_ids, expected = torch_predictions(result, 7, include_user)
    profile = profile_of(result.dataset, 7, include_user)
    predicted = model.predict(profile, movie_ids)
    assert np.allclose(predicted, expected, atol=1e-5)


def test_rank_order_equals_predict_order(saved):
    result, path = saved
    model = TrainedModel.load(path)
    profile = profile_of(result.dataset, 3, include_user=True)
    ranked = model.rank(profile, k=len(model.movies))
    ranked_ids = [movie for movie, _ in ranked]
    predicted = model.predict(profile, ranked_ids)
    assert len(ranked_ids) == len(model.movies)
    assert np.all(np.diff(predicted.astype(np.float64)) <= 1e-6)


def test_rank_value_is_logit_minus_user_terms(saved):
    result, path = saved
    model = TrainedModel.load(path)
    profile = profile_of(result.dataset, 3, include_user=False)
    ranked = dict(model.rank(profile, k=5))
    movie_ids = list(ranked)
    predicted = model.predict(profile, movie_ids).astype(np.float64)
    logit = np.log(predicted / (model.rating_scale - predicted))
    rank_values = np.array([ranked[movie] for movie in movie_ids])
    offsets = logit - rank_values
    assert np.allclose(offsets, offsets[0], atol=1e-4)


def test_rank_exclude_and_k(saved):
    _, path = saved
    model = TrainedModel.load(path)
    profile = {"gender": "F"}
    top = model.rank(profile, k=3)
    excluded = model.rank(profile, k=3, exclude={top[0][0]})
    assert len(top) == 3
    assert top[0][0] not in [movie for movie, _ in excluded]
    assert excluded[0] == top[1]
    assert model.rank(profile, k=0) == []


def test_rank_ties_break_by_movie_id(synthetic_dataset, tmp_path):
    result = train(synthetic_dataset, TrainConfig(**SMALL))
    path = save_model(result, tmp_path / "model")
    weights = load_file(path / "model.safetensors")
    model = TrainedModel.load(path)
    rows = [model.feature_row("movie", movie) for movie in ("5", "9", "2")]
    for row in rows[1:]:
        weights["embedding"][row] = weights["embedding"][rows[0]]
        weights["linear"][row] = weights["linear"][rows[0]] + 100.0
    weights["linear"][rows[0]] += 100.0
    save_file(weights, path / "model.safetensors")
    # Edited weights no longer match the digest in the model id.
    config = json.loads((path / "config.json").read_text())
    config["model_id"] = "hand-edited"
    (path / "config.json").write_text(json.dumps(config))
    ranked = TrainedModel.load(path).rank({"age": "25"}, k=3)
    assert [movie for movie, _ in ranked] == ["2", "5", "9"]
    assert ranked[0][1] == ranked[1][1] == ranked[2][1]


def test_movie_side_and_profile_vector(saved):
    result, path = saved
    model = TrainedModel.load(path)
    side = model.movie_side()
    assert side.vectors.shape == (len(model.movies), 8)
    assert side.bias.dtype == np.float32
    assert side.movie_ids[:3] == ["1", "2", "3"]
    profile = {"age": "18", "gender": "M"}
    expected = (
        model.embedding[model.feature_row("age", "18")]
        + model.embedding[model.feature_row("gender", "M")]
    )
    assert np.allclose(model.profile_vector(profile), expected)
    if not result.config.genres:
        row = model.feature_row("movie", "1")
        assert np.array_equal(side.vectors[0], model.embedding[row])
        assert side.bias[0] == model.linear[row]


def test_unknown_values_raise_query_error(saved):
    _, path = saved
    model = TrainedModel.load(path)
    with pytest.raises(QueryError, match="unknown age '99'"):
        model.feature_row("age", "99")
    with pytest.raises(QueryError, match="invalid profile key 'movie'"):
        model.rank({"movie": "1"}, k=3)
    with pytest.raises(QueryError, match="unknown movie '9999'"):
        model.predict({"age": "18"}, ["9999"])


def test_loading_does_not_import_torch(saved):
    _, path = saved
    code = (
        "import sys\n"
        "from esfm.artifacts import TrainedModel\n"
        f"model = TrainedModel.load({str(path)!r})\n"
        "model.rank({'age': '18'}, k=3)\n"
        "print('torch' in sys.modules)\n"
    )
    completed = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert completed.stdout.strip() == "False"


# -- invalid model directories ------------------------------------------------


def load_error(path) -> str:
    with pytest.raises(ModelError) as caught:
        TrainedModel.load(path)
    return str(caught.value)


def test_missing_file(saved):
    _, path = saved
    (path / "vocabulary.json").unlink()
    assert "lacks vocabulary.json" in load_error(path)


def test_missing_directory(tmp_path):
    assert "does not exist" in load_error(tmp_path / "nothing")


def test_truncated_weights(saved):
    _, path = saved
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    message = load_error(path)
    assert "cannot load weights" in message
    assert "model.safetensors" in message


def test_invalid_json(saved):
    _, path = saved
    (path / "config.json").write_text("{ not json")
    assert "invalid JSON in" in load_error(path)


def test_shape_disagrees_with_vocabulary(saved):
    _, path = saved
    vocabulary = json.loads((path / "vocabulary.json").read_text())
    vocabulary["features"].pop()
    (path / "vocabulary.json").write_text(json.dumps(vocabulary))
    message = load_error(path)
    assert "disagree with the vocabulary" in message


def test_nan_weights(saved):
    _, path = saved
    weights = load_file(path / "model.safetensors")
    weights["embedding"][3, 2] = np.nan
    save_file(weights, path / "model.safetensors")
    message = load_error(path)
    assert "'embedding'" in message
    assert "NaN or infinite" in message


def test_wrong_k_in_config(saved):
    _, path = saved
    config = json.loads((path / "config.json").read_text())
    config["k"] = 16
    (path / "config.json").write_text(json.dumps(config))
    assert "k=16" in load_error(path)


def test_edited_weights_rejected(saved):
    _, path = saved
    weights = load_file(path / "model.safetensors")
    weights["embedding"] *= 1.5
    save_file(weights, path / "model.safetensors")
    assert "do not match model id" in load_error(path)
