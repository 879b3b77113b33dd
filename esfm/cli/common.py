"""Shared pieces of the click layer: console, JSON output and the error boundary."""

from __future__ import annotations

import functools
import json
import logging
import sys
from collections.abc import Callable
from typing import Any

import click
from rich.console import Console
from rich.logging import RichHandler

from esfm.errors import EsfmError

console = Console()
err_console = Console(stderr=True)

F = Callable[..., Any]


def json_option(func: F) -> F:
    """Add ``--json``: print one JSON document on stdout in place of tables."""
    return click.option(
        "--json", "as_json", is_flag=True, help="Print machine-readable JSON."
    )(func)


def print_json(payload: Any) -> None:
    """Write ``payload`` as JSON on stdout, with no rich markup."""
    click.echo(json.dumps(payload, indent=2, sort_keys=True, default=str))


def handle_errors(func: F) -> F:
    """Turn library errors into a red message and the error's exit code.

    This is the only place where an EsfmError becomes an exit status, so the
    library itself never exits.
    """

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except EsfmError as exc:
            err_console.print(f"[bold red]error:[/] {exc.message}", highlight=False)
            if exc.hint:
                err_console.print(f"[yellow]hint:[/] {exc.hint}", highlight=False)
            sys.exit(exc.exit_code)

    return wrapper


def configure_logging(verbose: int) -> None:
    """Send library logs to stderr through rich: WARNING, INFO with -v, DEBUG -vv."""
    level = logging.WARNING
    if verbose == 1:
        level = logging.INFO
    elif verbose >= 2:
        level = logging.DEBUG
    logging.basicConfig(
        level=level,
        format="%(message)s",
        handlers=[RichHandler(console=err_console, show_path=False)],
        force=True,
    )
    # The transport logs every request at INFO; keep it for -vv only.
    logging.getLogger("elastic_transport").setLevel(
        logging.DEBUG if verbose >= 2 else logging.WARNING
    )


def connection_options(func: F) -> F:
    """Add cluster connection options and pass a ready ``client`` keyword.

    Secrets have no options on purpose: they come from ESFM_PASSWORD,
    ESFM_API_KEY, ESFM_BEARER_TOKEN or the config file, so they never appear
    in shell history or process listings.
    """

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from esfm.config import create_client, resolve_settings

        settings = resolve_settings(
            config_file=kwargs.pop("config_file"),
            url=kwargs.pop("url"),
            username=kwargs.pop("username"),
            ca_certs=kwargs.pop("ca_certs"),
            ssl_fingerprint=kwargs.pop("ssl_fingerprint"),
        )
        kwargs["client"] = create_client(settings)
        return func(*args, **kwargs)

    options = [
        click.option(
            "--url",
            metavar="URL",
            help="Cluster URL [env ESFM_URL; default: the local cluster, "
            "else http://127.0.0.1:9200].",
        ),
        click.option(
            "--username", help="Basic-auth user; password from ESFM_PASSWORD."
        ),
        click.option(
            "--ca-certs",
            type=click.Path(exists=True, dir_okay=False),
            help="CA certificate file for HTTPS [env ESFM_CA_CERTS].",
        ),
        click.option(
            "--ssl-fingerprint",
            metavar="SHA256",
            help="Pin the server certificate's SHA-256 fingerprint.",
        ),
        click.option(
            "--config",
            "config_file",
            type=click.Path(dir_okay=False),
            help="TOML file with a [connection] table [env ESFM_CONFIG].",
        ),
    ]
    for option in reversed(options):
        wrapper = option(wrapper)
    return wrapper  # type: ignore[return-value]


def project_option(func: F) -> F:
    return click.option(
        "--project",
        type=click.Path(file_okay=False),
        help="Project folder with mappings/ and templates/ [env ESFM_PROJECT; "
        "default: the current folder if it has mappings/, else the built-in one].",
    )(func)


def alias_option(func: F) -> F:
    return click.option(
        "--alias",
        default="recsys",
        show_default=True,
        help="Alias that serves queries.",
    )(func)
