"""Root ``esfm`` group; each command lives in the module of its concept."""

from __future__ import annotations

import signal
import sys

import click

from esfm import __version__
from esfm.cli.common import configure_logging


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="Log INFO (-v) or DEBUG (-vv).")
@click.version_option(__version__, prog_name="esfm")
def cli(verbose: int) -> None:
    """Train a factorization machine and serve it from Elasticsearch."""
    configure_logging(verbose)


def _register() -> None:
    from esfm.cli import (
        cluster_cmds,
        demo_cmds,
        explore_cmds,
        index_cmds,
        query_cmds,
        train_cmds,
    )

    for module in (
        cluster_cmds,
        train_cmds,
        index_cmds,
        query_cmds,
        demo_cmds,
        explore_cmds,
    ):
        for command in module.COMMANDS:
            cli.add_command(command)


_register()


def exit_on_sigterm(signum: int, frame: object) -> None:
    """Raise SystemExit for SIGTERM, so cleanup code runs as for Ctrl-C.

    Without this handler SIGTERM ends the process at once, so the cleanup of
    a model save, which puts the old model back, never runs.
    """
    sys.exit(128 + signum)


def main() -> None:
    signal.signal(signal.SIGTERM, exit_on_sigterm)
    cli(prog_name="esfm")
