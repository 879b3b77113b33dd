"""t-SNE map of movie embeddings: genre colouring, coordinates and the PNG."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from safetensors.numpy import save_file

from esfm.cli.explore_cmds import explore
from esfm.errors import QueryError
from esfm.explore import (
    MAX_GENRES,
    OTHER_LABEL,
    SEVERAL_LABEL,
    colour_by_genre,
    parse_genres,
    plot_movie_tsne,
    tsne_coordinates,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CLUSTERS = {"Horror": 0, "Comedy": 1, "Documentary": 2, "Drama": 3}
PER_CLUSTER = 20
K = 8


def write_model(path: Path, seed: int = 0) -> Path:
    """Write a model directory whose movies form one tight cluster per genre.

    Cluster c lies around 5 * e_c, so cosine neighbours share a genre. Movie 1
    of the Horror cluster is also a Comedy, so it has two genres.
    """
    rng = np.random.default_rng(seed)
    features = [{"feature_type": "gender", "value": "F"}]
    movies = {}
    rows = [rng.normal(0, 0.1, K)]
    movie_id = 0
    for genre, axis in CLUSTERS.items():
        centre = np.zeros(K)
        centre[axis] = 5.0
        for _ in range(PER_CLUSTER):
            movie_id += 1
            genres = [genre]
            if movie_id == 1:
                genres = ["Comedy", "Horror"]
            features.append({"feature_type": "movie", "value": str(movie_id)})
            movies[str(movie_id)] = {"title": f"Movie {movie_id}", "genres": genres}
            rows.append(centre + rng.normal(0, 0.3, K))
    embedding = np.asarray(rows, dtype=np.float32)
    path.mkdir(parents=True)
    save_file(
        {
            "global_bias": np.zeros(1, np.float32),
            "linear": np.zeros(len(features), np.float32),
            "embedding": embedding,
        },
        path / "model.safetensors",
    )
    vocabulary = {"format": 1, "features": features, "movies": movies, "users": {}}
    (path / "vocabulary.json").write_text(json.dumps(vocabulary))
    (path / "config.json").write_text(json.dumps({"k": K, "model_id": "synthetic"}))
    (path / "metrics.json").write_text("{}")
    return path


@pytest.fixture
def model_dir(tmp_path) -> Path:
    return write_model(tmp_path / "model")


def test_parse_genres_drops_blanks_and_repeats():
    assert parse_genres(" Horror, ,Comedy,Horror ") == ["Horror", "Comedy"]
    assert parse_genres("Children's") == ["Children's"]


def test_colour_first_listed_wins():
    colouring = colour_by_genre(
        [["Horror", "Comedy"], ["Comedy"], ["Drama"]], ["Comedy", "Horror"], "first"
    )
    assert colouring.labels == ["Comedy", "Comedy", None]
    assert colouring.categories == ["Comedy", "Horror"]
    assert "first listed" in colouring.rule


def test_colour_several_own_category():
    colouring = colour_by_genre(
        [["Horror", "Comedy"], ["Comedy"], []], ["Comedy", "Horror"], "several"
    )
    assert colouring.labels == [SEVERAL_LABEL, "Comedy", None]
    assert colouring.categories == ["Comedy", "Horror", SEVERAL_LABEL]
    assert colouring.counts() == {
        "Comedy": 1,
        "Horror": 0,
        SEVERAL_LABEL: 1,
        OTHER_LABEL: 1,
    }


@pytest.mark.parametrize(
    ("chosen", "overlap", "message"),
    [
        ([], "first", "no genres chosen"),
        ([f"g{i}" for i in range(MAX_GENRES + 1)], "first", "distinct colours"),
        (["Horror"], "mixed", "unknown overlap rule"),
    ],
)
def test_colour_invalid_input(chosen, overlap, message):
    with pytest.raises(QueryError, match=message):
        colour_by_genre([["Horror"]], chosen, overlap)


def test_tsne_shape_and_seed():
    vectors = np.random.default_rng(1).normal(size=(30, 5)).astype(np.float32)
    first = tsne_coordinates(vectors, perplexity=5, seed=3)
    second = tsne_coordinates(vectors, perplexity=5, seed=3)
    assert first.shape == (30, 2)
    assert np.isfinite(first).all()
    assert np.array_equal(first, second)


@pytest.mark.parametrize("perplexity", [0, 30, -1])
def test_tsne_invalid_perplexity(perplexity):
    vectors = np.ones((30, 4), np.float32)
    with pytest.raises(QueryError, match="invalid perplexity"):
        tsne_coordinates(vectors, perplexity=perplexity)


def test_tsne_keeps_genre_clusters(model_dir):
    from esfm.artifacts import TrainedModel

    side = TrainedModel.load(model_dir).movie_side()
    coordinates = tsne_coordinates(side.vectors, perplexity=10, seed=0)
    labels = np.repeat(np.arange(len(CLUSTERS)), PER_CLUSTER)
    distances = np.linalg.norm(coordinates[:, None] - coordinates[None], axis=2)
    same = labels[:, None] == labels[None]
    off_diagonal = ~np.eye(len(labels), dtype=bool)
    within = distances[same & off_diagonal].mean()
    between = distances[~same].mean()
    assert within < between / 3


def test_plot_writes_png(model_dir, tmp_path):
    output = tmp_path / "out" / "movies.png"
    plot = plot_movie_tsne(
        model_dir, ["Horror", "Comedy"], output, perplexity=10, seed=0
    )
    assert output.read_bytes()[:8] == PNG_MAGIC
    assert plot.path == output
    assert plot.model_id == "synthetic"
    assert plot.movies == len(CLUSTERS) * PER_CLUSTER
    # Movie 1 (Comedy and Horror, in the Horror cluster) goes to Horror.
    assert plot.counts == {
        "Horror": PER_CLUSTER,
        "Comedy": PER_CLUSTER,
        OTHER_LABEL: 2 * PER_CLUSTER,
    }


def test_plot_counts_follow_genre_order(model_dir, tmp_path):
    plot = plot_movie_tsne(
        model_dir, ["Comedy", "Horror"], tmp_path / "movies.png", perplexity=10
    )
    # Listed first now, Comedy takes movie 1 from the Horror cluster.
    assert plot.counts["Comedy"] == PER_CLUSTER + 1
    assert plot.counts["Horror"] == PER_CLUSTER - 1


def test_plot_image_size(model_dir, tmp_path):
    from matplotlib.image import imread

    output = tmp_path / "movies.png"
    plot_movie_tsne(model_dir, ["Drama"], output, perplexity=10)
    height, width, _ = imread(output).shape
    assert (width, height) == (1650, 1125)


def test_plot_unknown_genre(model_dir, tmp_path):
    with pytest.raises(QueryError, match="unknown genre 'Western'") as info:
        plot_movie_tsne(model_dir, ["Horror", "Western"], tmp_path / "x.png")
    assert "Comedy, Documentary, Drama, Horror" in info.value.hint
    assert not (tmp_path / "x.png").exists()


def test_cli_tsne_json(model_dir, tmp_path):
    output = tmp_path / "cli.png"
    result = CliRunner().invoke(
        explore,
        [
            "tsne",
            "--model",
            str(model_dir),
            "--genres",
            "Horror,Comedy",
            "--overlap",
            "several",
            "--perplexity",
            "10",
            "-o",
            str(output),
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    payload = json.loads(result.output)
    assert payload["path"] == str(output)
    assert payload["counts"][SEVERAL_LABEL] == 1
    assert output.is_file()


def test_cli_tsne_unknown_genre(model_dir, tmp_path):
    result = CliRunner().invoke(
        explore,
        ["tsne", "--model", str(model_dir), "--genres", "Noir", "-o", "x.png"],
    )
    assert result.exit_code == 1
    assert "unknown genre 'Noir'" in result.output
