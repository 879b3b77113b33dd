"""Commands that draw pictures of a trained model: explore tsne."""

from __future__ import annotations

import click

from esfm.cli.common import console, handle_errors, json_option, print_json
from esfm.explore import OVERLAP_RULES, parse_genres, plot_movie_tsne


@click.group("explore")
def explore() -> None:
    """Draw pictures of a trained model (needs the explore extra)."""


@explore.command("tsne")
@click.option(
    "--model",
    "model_dir",
    required=True,
    type=click.Path(file_okay=False),
    help="Model directory written by esfm train.",
)
@click.option(
    "--genres",
    required=True,
    help='Comma-separated genres to colour, e.g. "Children\'s,Horror,Documentary".',
)
@click.option(
    "-o",
    "--output",
    required=True,
    type=click.Path(dir_okay=False),
    help="PNG file to write.",
)
@click.option(
    "--overlap",
    type=click.Choice(OVERLAP_RULES),
    default="first",
    show_default=True,
    help="Colour of a movie with several chosen genres: the first listed, "
    "or a category of its own.",
)
@click.option(
    "--perplexity",
    type=float,
    default=30.0,
    show_default=True,
    help="t-SNE perplexity, roughly the number of neighbours each movie keeps.",
)
@click.option("--seed", type=int, default=0, show_default=True, help="t-SNE seed.")
@json_option
@handle_errors
def tsne(model_dir, genres, output, overlap, perplexity, seed, as_json) -> None:
    """Map the movie embeddings to 2-D with t-SNE, coloured by genre.

    One run over 3,883 movies took about two minutes on two CPU cores.
    """
    with console.status("running t-SNE"):
        plot = plot_movie_tsne(
            model_dir,
            parse_genres(genres),
            output,
            overlap=overlap,
            perplexity=perplexity,
            seed=seed,
        )
    if as_json:
        print_json(plot.to_dict())
        return
    counts = ", ".join(f"{name} {count}" for name, count in plot.counts.items())
    console.print(f"wrote {plot.path}: {plot.movies} movies ({counts})")


COMMANDS = [explore]
