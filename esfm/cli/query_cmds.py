"""Commands that read recommendations: query, recommend, similar."""

from __future__ import annotations

import click
from rich.table import Table

from esfm.cli.common import (
    alias_option,
    connection_options,
    console,
    handle_errors,
    json_option,
    print_json,
    project_option,
)
from esfm.errors import QueryError
from esfm.project import discover_project
from esfm.query import QueryOutcome, Recommender

TEMPLATES = ("cold_start",)


def print_outcome(
    title: str,
    outcome: QueryOutcome,
    verbose: bool,
    value_label: str = "rank value",
) -> None:
    table = Table(title=title)
    table.add_column("#", justify="right")
    table.add_column("movie", justify="right")
    table.add_column("title")
    table.add_column("genres")
    table.add_column(value_label, justify="right")
    for position, item in enumerate(outcome.recommendations, start=1):
        table.add_row(
            str(position),
            item.movie_id,
            item.title or "",
            "|".join(item.genres),
            f"{item.rank_value:.4f}",
        )
    console.print(table)
    if verbose:
        console.print(
            f"index {outcome.index}, template path: {outcome.path} "
            f"({'stored script' if outcome.path == 'stored' else 'rendered locally'}"
            f"), {outcome.round_trips} round trip(s)",
            style="dim",
        )


def outcome_json(outcome: QueryOutcome) -> dict:
    return {
        "index": outcome.index,
        "path": outcome.path,
        "round_trips": outcome.round_trips,
        "query_movie": outcome.query_movie,
        "recommendations": [item.to_dict() for item in outcome.recommendations],
    }


common_query_options = [
    alias_option,
    click.option(
        "-k",
        "k",
        type=int,
        default=10,
        show_default=True,
        help="Number of movies to return (1 to 10000).",
    ),
    click.option("--verbose", is_flag=True, help="Say which template path was used."),
    project_option,
    connection_options,
    json_option,
]


def query_options(func):
    for option in reversed(common_query_options):
        func = option(func)
    return func


@click.command("query")
@click.option(
    "--template",
    "template",
    default="cold_start",
    show_default=True,
    help="Search template to run.",
)
@click.option("--gender", help="M or F.")
@click.option("--age", help='Age bucket code (18), range ("18-24", "56+") or age.')
@click.option("--occupation", help="Occupation code (0-20) or name.")
@click.option("--exclude", multiple=True, help="Movie id to leave out; repeatable.")
@click.option(
    "--genre", "genres", multiple=True, help="Only movies of this genre; repeatable."
)
@click.option(
    "--method",
    type=click.Choice(["knn", "script_score"]),
    default="knn",
    show_default=True,
    help="kNN on rank_vector, or painless script_score.",
)
@query_options
@handle_errors
def query(
    template,
    gender,
    age,
    occupation,
    exclude,
    genres,
    method,
    alias,
    k,
    verbose,
    project,
    client,
    as_json,
) -> None:
    """Cold-start recommendations for a new user from metadata alone."""
    if template not in TEMPLATES:
        raise QueryError(
            f"template {template!r} is not a cold-start template for esfm query",
            hint="use --template cold_start; see also esfm similar and esfm recommend",
        )
    recommender = Recommender(
        client,
        alias,
        templates_dir=discover_project(project).templates_dir,
        method=method,
    )
    outcome = recommender.cold_start_outcome(
        gender=gender,
        age=age,
        occupation=occupation,
        k=k,
        exclude=list(exclude),
        genres=list(genres),
    )
    if as_json:
        print_json(outcome_json(outcome))
        return
    described = ", ".join(
        f"{name} {value}"
        for name, value in (
            ("gender", gender),
            ("age", age),
            ("occupation", occupation),
        )
        if value
    )
    print_outcome(f"top {k} for a new user ({described})", outcome, verbose)


@click.command("recommend")
@click.option(
    "--user", "user_id", required=True, help="MovieLens user id seen in training."
)
@click.option("--exclude", multiple=True, help="Movie id to leave out; repeatable.")
@query_options
@handle_errors
def recommend(user_id, exclude, alias, k, verbose, project, client, as_json) -> None:
    """Recommendations for a known user: user vector plus metadata vectors."""
    recommender = Recommender(
        client, alias, templates_dir=discover_project(project).templates_dir
    )
    outcome = recommender.known_user(user_id, k=k, exclude=list(exclude))
    if as_json:
        print_json(outcome_json(outcome))
    else:
        print_outcome(f"top {k} for user {user_id}", outcome, verbose)


@click.command("similar")
@click.argument("title")
@click.option(
    "--genre", "genres", multiple=True, help="Only movies of this genre; repeatable."
)
@query_options
@handle_errors
def similar(title, genres, alias, k, verbose, project, client, as_json) -> None:
    """Movies closest to TITLE by cosine on the movie embeddings."""
    recommender = Recommender(
        client, alias, templates_dir=discover_project(project).templates_dir
    )
    outcome = recommender.similar(title, k=k, genres=list(genres))
    if as_json:
        print_json(outcome_json(outcome))
    else:
        movie_id, matched = outcome.query_movie or ("?", title)
        print_outcome(
            f"{k} movies closest to {matched!r} (movie {movie_id})",
            outcome,
            verbose,
            value_label="cosine",
        )


COMMANDS = [query, recommend, similar]
