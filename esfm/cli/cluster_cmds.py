"""``esfm cluster``: start, stop and inspect a local Elasticsearch cluster."""

from __future__ import annotations

from pathlib import Path

import click
from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from esfm import cluster as local_cluster
from esfm.cli.common import console, handle_errors, json_option, print_json

name_option = click.option(
    "--name",
    default="default",
    show_default=True,
    help="Name of the local cluster; its files live in $ESFM_HOME/clusters/NAME.",
)


class ProgressRenderer:
    """Draw library progress events as one rich progress bar per stage."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.tasks: dict[str, TaskID] = {}

    def __call__(self, event: local_cluster.ProgressEvent) -> None:
        task = self.tasks.get(event.stage)
        if task is None:
            task = self.progress.add_task(event.message, total=event.total, count="")
            self.tasks[event.stage] = task
        self.progress.update(
            task,
            description=event.message,
            total=event.total,
            completed=event.completed or 0,
            count=_count_text(event),
        )

    def finish(self) -> None:
        """Mark every stage as complete so no bar is left half-drawn."""
        for task in self.tasks.values():
            total = self.progress.tasks[task].total
            if total is not None:
                self.progress.update(task, completed=total)


class LineRenderer:
    """Print library progress events as plain lines, for output that is not a terminal.

    Each stage prints its message once and then again only when the message
    changes, so counters such as downloaded bytes or unpacked files, which
    update many times a second, do not repeat the line.
    """

    def __init__(self, output: Console) -> None:
        self.output = output
        self.last_messages: dict[str, str] = {}

    def __call__(self, event: local_cluster.ProgressEvent) -> None:
        if self.last_messages.get(event.stage) == event.message:
            return
        self.last_messages[event.stage] = event.message
        self.output.print(event.message, markup=False, highlight=False)

    def finish(self) -> None:
        """Do nothing: every line is complete when it is printed."""


def _count_text(event: local_cluster.ProgressEvent) -> str:
    # Download events count bytes, the others count files or nodes.
    if event.completed is None:
        return ""
    if event.stage == "download":
        return f"{event.completed / 1e6:.1f} MB"
    if event.total is None:
        return str(event.completed)
    return f"{event.completed}/{event.total}"


def _progress() -> Progress:
    return Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    )


@click.group()
def cluster() -> None:
    """Run a local Elasticsearch cluster on 127.0.0.1 for development and tests."""


@cluster.command()
@name_option
@click.option("--nodes", default=1, show_default=True, help="Number of nodes.")
@click.option(
    "--port",
    default=local_cluster.DEFAULT_HTTP_PORT,
    show_default=True,
    help="HTTP port of the first node; node i uses PORT+i, and transport "
    f"ports start at PORT+{local_cluster.TRANSPORT_PORT_OFFSET}.",
)
@click.option(
    "--heap",
    default=None,
    help="JVM heap per node, such as 512m or 1g  [default: 1g for one node, "
    "512m each for several]",
)
@click.option(
    "--version",
    "version",
    default=None,
    help="Elasticsearch version  [default: the version inside --dist, else "
    f"{local_cluster.DEFAULT_VERSION}]",
)
@click.option(
    "--dist",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    envvar="ESFM_ES_DIST",
    help="Local integ-test-zip distribution to use instead of fetching one "
    "with mvn.  [env: ESFM_ES_DIST]",
)
@click.option(
    "--clean", is_flag=True, help="Delete data and logs of a previous run first."
)
@click.option(
    "--timeout",
    default=180.0,
    show_default=True,
    help="Seconds to wait for the cluster to become healthy.",
)
@click.option(
    "--security",
    is_flag=True,
    help="Enable x-pack security: HTTPS with a generated CA, and an elastic "
    "password written to a mode-600 file.",
)
@handle_errors
def start(
    name: str,
    nodes: int,
    port: int,
    heap: str | None,
    version: str | None,
    dist: Path | None,
    clean: bool,
    timeout: float,
    security: bool,
) -> None:
    """Start a local cluster and wait until it is healthy."""
    options = {
        "name": name,
        "nodes": nodes,
        "http_port": port,
        "heap": heap,
        "version": version,
        "wait_timeout": timeout,
        "clean": clean,
        "dist_zip": dist,
        "security": security,
    }
    if console.is_terminal:
        with _progress() as progress:
            renderer = ProgressRenderer(progress)
            state = local_cluster.start(**options, on_progress=renderer)
            renderer.finish()
    else:
        state = local_cluster.start(**options, on_progress=LineRenderer(console))
    # soft_wrap keeps URLs, paths and the fingerprint on one line when the
    # output is not a terminal, so they can be copied.
    console.print(
        f"Local cluster [bold]{name}[/] (Elasticsearch {state.version}, "
        f"{len(state.nodes)} node(s)) is running at {state.url}",
        soft_wrap=True,
    )
    console.print(f"State file: {state.path}", soft_wrap=True)
    if state.security:
        # The password itself is never printed: it stays in its file.
        console.print(f"CA certificate: {state.ca_certs}", soft_wrap=True)
        console.print(
            f"Certificate SHA-256 fingerprint: {state.ssl_fingerprint}",
            soft_wrap=True,
        )
        console.print(
            f"User elastic; password in {state.password_file} (mode 600).",
            soft_wrap=True,
        )
        # Only the cluster named "default" is found without settings.
        if name == "default":
            console.print("esfm commands use these while this cluster runs.")
        else:
            console.print(
                f"Connect esfm with ESFM_URL={state.url} ESFM_USERNAME=elastic "
                f"ESFM_CA_CERTS={state.ca_certs} and ESFM_PASSWORD set to the "
                "contents of the password file.",
                soft_wrap=True,
            )


@cluster.command()
@name_option
@click.option(
    "--timeout",
    default=60.0,
    show_default=True,
    help="Seconds to wait after SIGTERM before sending SIGKILL.",
)
@click.option(
    "--wipe", is_flag=True, help="Also delete the cluster's data, logs and config."
)
@handle_errors
def stop(name: str, timeout: float, wipe: bool) -> None:
    """Stop every node of a local cluster."""
    result = local_cluster.stop(name, timeout=timeout)
    if not result.stopped:
        console.print(f"Local cluster [bold]{name}[/] is not running")
    for node_name in result.killed:
        console.print(
            f"[yellow]node {node_name} did not stop within {timeout:g}s of "
            "SIGTERM and was killed with SIGKILL[/]"
        )
    if result.stopped:
        console.print(
            f"Stopped local cluster [bold]{name}[/] ({len(result.stopped)} node(s))"
        )
    if wipe:
        directory = local_cluster.wipe(name)
        console.print(f"Deleted {directory}")


@cluster.command()
@name_option
@json_option
@handle_errors
def status(name: str, as_json: bool) -> None:
    """Show the nodes, health and version of a local cluster."""
    report = local_cluster.status(name)
    if as_json:
        print_json(report.to_dict())
        return

    health = report.health or {}
    state = health.get("status", "unknown" if report.running else "stopped")
    console.print(
        f"Local cluster [bold]{report.name}[/]: {state}, Elasticsearch "
        f"{report.version}, {report.url}"
    )
    if report.error:
        console.print(f"[yellow]{report.error}[/]")
    table = Table("node", "running", "pid", "http port", "transport port")
    for node in report.nodes:
        table.add_row(
            node.name,
            "yes" if node.running else "no",
            str(node.pid or "-"),
            str(node.http_port),
            str(node.transport_port),
        )
    console.print(table)


@cluster.command()
@name_option
@handle_errors
def wipe(name: str) -> None:
    """Delete the data, logs and config of a stopped local cluster."""
    directory = local_cluster.wipe(name)
    console.print(f"Deleted {directory}")


COMMANDS = [cluster]
