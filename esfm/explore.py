"""Pictures of a trained model: a t-SNE map of the movie embeddings by genre.

Needs the optional ``explore`` extra (scikit-learn and matplotlib), imported
only when a picture is drawn, so the rest of esfm runs without them.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from esfm.artifacts import TrainedModel
from esfm.errors import EsfmError, QueryError

logger = logging.getLogger(__name__)

# Colour rules for a movie with several of the chosen genres. "first" takes the
# chosen genre listed first, and "several" puts the movie in a category of its own.
OVERLAP_RULES = ("first", "several")
SEVERAL_LABEL = "several of these"
OTHER_LABEL = "other genres"
# The tab10 palette has 10 distinct colours, so a tenth genre would repeat one.
MAX_GENRES = 9
TSNE_METRIC = "cosine"


@dataclasses.dataclass(frozen=True)
class GenreColouring:
    """A colour category per movie and the rule that chose it.

    Attributes:
        labels: one category per movie, or None for a movie with none of the
            chosen genres.
        categories: the categories in legend order: the chosen genres, then
            ``SEVERAL_LABEL`` under the "several" rule.
        rule: the overlap rule as a legend title.
    """

    labels: list[str | None]
    categories: list[str]
    rule: str

    def counts(self) -> dict[str, int]:
        """Return the number of movies in each category, with OTHER_LABEL."""
        counts = {category: 0 for category in self.categories}
        others = 0
        for label in self.labels:
            if label is None:
                others += 1
            else:
                counts[label] += 1
        counts[OTHER_LABEL] = others
        return counts


@dataclasses.dataclass(frozen=True)
class TsnePlot:
    """A written t-SNE picture: its path, model, category counts and settings."""

    path: Path
    model_id: str
    movies: int
    counts: dict[str, int]
    rule: str
    perplexity: float
    seed: int

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "path": str(self.path)}


def parse_genres(text: str) -> list[str]:
    """Split a comma-separated genre list, dropping blanks and repeats."""
    genres: list[str] = []
    for part in text.split(","):
        genre = part.strip()
        if genre and genre not in genres:
            genres.append(genre)
    return genres


def colour_by_genre(
    movie_genres: list[list[str]], chosen: list[str], overlap: str = "first"
) -> GenreColouring:
    """Assign each movie one colour category from the ``chosen`` genres.

    Raises:
        QueryError: ``chosen`` is empty or too long, or ``overlap`` is unknown.
    """
    if not chosen:
        raise QueryError("no genres chosen", hint='pass --genres "Horror,Comedy"')
    if len(chosen) > MAX_GENRES:
        raise QueryError(
            f"{len(chosen)} genres chosen, at most {MAX_GENRES} have distinct colours",
            hint="choose fewer genres",
        )
    if overlap not in OVERLAP_RULES:
        raise QueryError(
            f"unknown overlap rule {overlap!r}", hint=f"use one of {OVERLAP_RULES}"
        )
    labels: list[str | None] = []
    for genres in movie_genres:
        matched = [genre for genre in chosen if genre in genres]
        if not matched:
            labels.append(None)
        elif len(matched) == 1 or overlap == "first":
            labels.append(matched[0])
        else:
            labels.append(SEVERAL_LABEL)
    if overlap == "first":
        categories = list(chosen)
        rule = "several chosen genres: the first listed wins"
    else:
        categories = [*chosen, SEVERAL_LABEL]
        rule = "several chosen genres: own category"
    return GenreColouring(labels, categories, rule)


def check_genres(model: TrainedModel, chosen: list[str]) -> None:
    """Raise QueryError for a chosen genre that no movie of the model has."""
    known = sorted(
        {genre for movie in model.movies.values() for genre in _genres(movie)}
    )
    unknown = [genre for genre in chosen if genre not in known]
    if unknown:
        raise QueryError(
            f"unknown genre {unknown[0]!r}: no movie of model {model.model_id} has it",
            hint=f"valid genres: {', '.join(known)}",
        )


def _genres(movie: dict[str, Any]) -> list[str]:
    return list(movie.get("genres") or [])


def tsne_coordinates(
    vectors: np.ndarray, *, perplexity: float = 30.0, seed: int = 0
) -> np.ndarray:
    """Embed ``vectors`` ``[n, k]`` in two dimensions with t-SNE, cosine metric.

    Cosine is the metric of ``esfm similar``, so neighbours on the map are the
    movies that command calls similar.

    Raises:
        QueryError: ``perplexity`` is not below the number of movies.
    """
    count = int(vectors.shape[0])
    if not 0 < perplexity < count:
        raise QueryError(
            f"invalid perplexity {perplexity:g}: it must be above 0 and below the "
            f"number of movies ({count})",
            hint="use --perplexity 30, or fewer for small models",
        )
    manifold = _import_optional("sklearn.manifold")
    tsne = manifold.TSNE(
        n_components=2,
        perplexity=perplexity,
        metric=TSNE_METRIC,
        init="pca",
        learning_rate="auto",
        random_state=seed,
    )
    return np.asarray(tsne.fit_transform(vectors.astype(np.float64)))


def draw_tsne(
    coordinates: np.ndarray,
    colouring: GenreColouring,
    path: Path,
    *,
    title: str,
    note: str,
) -> None:
    """Write a scatter plot of ``coordinates`` ``[n, 2]`` coloured by category.

    Movies of no chosen genre are drawn first, small and grey, then the
    categories from the largest to the smallest, so small ones stay visible.
    """
    figure_module = _import_optional("matplotlib.figure")
    colormaps = _import_optional("matplotlib").colormaps
    palette = colormaps["tab10"]
    figure = figure_module.Figure(figsize=(11, 7.5), dpi=150, layout="constrained")
    axes = figure.add_subplot()
    labels = np.array(
        [OTHER_LABEL if label is None else label for label in colouring.labels]
    )
    counts = colouring.counts()

    others = labels == OTHER_LABEL
    axes.scatter(
        coordinates[others, 0],
        coordinates[others, 1],
        s=3,
        c="#c8c8c8",
        alpha=0.5,
        linewidths=0,
        label=f"{OTHER_LABEL} ({counts[OTHER_LABEL]})",
        zorder=1,
    )
    colours = {category: palette(i) for i, category in enumerate(colouring.categories)}
    drawn = sorted(colouring.categories, key=lambda category: -counts[category])
    for position, category in enumerate(drawn):
        selected = labels == category
        axes.scatter(
            coordinates[selected, 0],
            coordinates[selected, 1],
            s=14,
            color=colours[category],
            alpha=0.85,
            linewidths=0.3,
            edgecolors="white",
            label=f"{category} ({counts[category]})",
            zorder=2 + position,
        )

    handles, legend_labels = axes.get_legend_handles_labels()
    # Legend in the order of --genres, the grey background entry last.
    order = [legend_labels.index(f"{c} ({counts[c]})") for c in colouring.categories]
    order.append(0)
    legend = axes.legend(
        [handles[i] for i in order],
        [legend_labels[i] for i in order],
        title=colouring.rule,
        loc="upper left",
        bbox_to_anchor=(1.01, 1.0),
        markerscale=2.0,
        frameon=False,
    )
    legend.get_title().set_fontsize("small")
    axes.set_title(title)
    axes.set_xticks([])
    axes.set_yticks([])
    axes.set_xlabel(note, fontsize="small", color="#555555")
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)


def plot_movie_tsne(
    model_dir: str | os.PathLike[str],
    genres: list[str],
    output: str | os.PathLike[str],
    *,
    overlap: str = "first",
    perplexity: float = 30.0,
    seed: int = 0,
) -> TsnePlot:
    """Draw the t-SNE map of a model's movie embeddings ``v_M``, coloured by genre.

    Every movie of the vocabulary is embedded, so the map is the same for any
    choice of ``genres``. Movies with none of them are drawn in grey.

    Raises:
        ModelError: the model directory cannot be loaded.
        QueryError: a genre, the overlap rule or the perplexity is invalid.
        EsfmError: scikit-learn or matplotlib is not installed.
    """
    model = TrainedModel.load(model_dir)
    check_genres(model, genres)
    side = model.movie_side()
    movie_genres = [_genres(model.movies[movie_id]) for movie_id in side.movie_ids]
    colouring = colour_by_genre(movie_genres, genres, overlap)

    logger.info(
        "t-SNE of %d movie embeddings of model %s", len(side.movie_ids), model.model_id
    )
    coordinates = tsne_coordinates(side.vectors, perplexity=perplexity, seed=seed)

    path = Path(output)
    note = (
        "t-SNE axes have no units: only which movies lie close together carries "
        f"meaning ({TSNE_METRIC} distance, perplexity {perplexity:g}, seed {seed})"
    )
    title = f"Movie embeddings of model {model.model_id}, {len(side.movie_ids)} movies"
    draw_tsne(coordinates, colouring, path, title=title, note=note)
    logger.info("wrote %s", path)
    return TsnePlot(
        path=path,
        model_id=model.model_id,
        movies=len(side.movie_ids),
        counts=colouring.counts(),
        rule=colouring.rule,
        perplexity=perplexity,
        seed=seed,
    )


def _import_optional(name: str) -> Any:
    import importlib

    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise EsfmError(
            f"module {name} is not installed, and esfm explore needs it",
            hint="install the extra: pip install 'esfm[explore]'",
        ) from exc
