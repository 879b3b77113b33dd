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


def _print_error(message: str, hint: str | None) -> None:
    from esfm.config import redact

    # markup=False: a message may quote server text with [brackets].
    err_console.print(
        f"error: {redact(message)}", style="bold red", highlight=False, markup=False
    )
    if hint:
        err_console.print(
            f"hint: {redact(hint)}", style="yellow", highlight=False, markup=False
        )


def handle_errors(func: F) -> F:
    """Turn library errors into a red message and the error's exit code.

    This is the only place where an EsfmError becomes an exit status, so the
    library itself never exits. Client exceptions that escaped the library's
    own translation are translated here too, so no traceback (which could
    quote request details) reaches the terminal. Known secrets are removed
    from every message.
    """

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        import elasticsearch

        from esfm.server import translate_error

        try:
            return func(*args, **kwargs)
        except EsfmError as exc:
            _print_error(exc.message, exc.hint)
            sys.exit(exc.exit_code)
        except (elasticsearch.ApiError, elasticsearch.TransportError) as exc:
            logging.getLogger(__name__).debug("untranslated client error: %r", exc)
            error = translate_error(exc, "request failed", _client_url(kwargs))
            _print_error(error.message, error.hint)
            sys.exit(error.exit_code)

    return wrapper


def _client_url(kwargs: dict[str, Any]) -> str:
    client = kwargs.get("client")
    try:
        return str(client.transport.node_pool.all()[0].base_url)  # type: ignore[union-attr]
    except (AttributeError, IndexError):
        return "the cluster"


def configure_logging(verbose: int) -> None:
    """Send library logs to stderr through rich: WARNING, INFO with -v, DEBUG -vv."""
    level = logging.WARNING
    if verbose == 1:
        level = logging.INFO
    elif verbose >= 2:
        level = logging.DEBUG
    from esfm.config import RedactingFilter

    handler = RichHandler(console=err_console, show_path=False)
    # Filters on a handler see records from every logger, the client's too.
    handler.addFilter(RedactingFilter())
    logging.basicConfig(
        level=level,
        format="%(message)s",
        handlers=[handler],
        force=True,
    )
    # The transport logs every request at INFO and each retry at WARNING
    # with a full traceback; keep both for -vv only, because the error
    # boundary reports the final failure in one message.
    logging.getLogger("elastic_transport").setLevel(
        logging.DEBUG if verbose >= 2 else logging.ERROR
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

    # Settings errors are raised here, outside the command's own
    # handle_errors, so this wrapper needs the boundary as well.
    wrapper = handle_errors(wrapper)

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
