"""Commands that change or inspect indices: init, migrate, alias-swap, rollback,
status, validate, lock and templates."""

from __future__ import annotations

import json

import click
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn
from rich.table import Table

from esfm import aliases, history, indexing
from esfm import lock as locks
from esfm.artifacts import TrainedModel
from esfm.cli.common import (
    alias_option,
    connection_options,
    console,
    handle_errors,
    json_option,
    print_json,
    project_option,
)
from esfm.errors import EsfmError, MigrationError, ValidationFailed
from esfm.mappings import get_version, latest_version
from esfm.migrate import apply_migration, plan_migration
from esfm.project import discover_project, init_project
from esfm.templates import (
    get_template,
    load_templates,
    push_templates,
    registry_entries,
)
from esfm.validate import ValidationReport, require_valid, validate_index

model_option = click.option(
    "--model",
    "model_dir",
    required=True,
    type=click.Path(file_okay=False),
    help="Model directory written by esfm train.",
)


@click.command("init")
@click.argument("directory", type=click.Path(file_okay=False))
@handle_errors
def init(directory: str) -> None:
    """Create a project folder with the default mappings/ and templates/."""
    project = init_project(directory)
    console.print(f"created {project.mappings_dir} and {project.templates_dir}")


def print_validation(report: ValidationReport) -> None:
    table = Table(title=f"validation of {report.index} against {report.model_id}")
    table.add_column("check")
    table.add_column("result")
    table.add_column("detail")
    for check in report.checks:
        table.add_row(
            check.name, "[green]ok[/]" if check.ok else "[red]FAIL[/]", check.detail
        )
    console.print(table)
    if report.mismatches:
        mismatches = Table(title="ranking mismatches")
        for column in ("profile", "position", "cluster", "model", "detail"):
            mismatches.add_column(column)
        for item in report.mismatches[:50]:
            mismatches.add_row(
                json.dumps(item.profile),
                str(item.position + 1),
                str(item.cluster),
                str(item.model),
                item.detail,
            )
        console.print(mismatches)


def _bulk_progress() -> Progress:
    return Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )


@click.command("migrate")
@model_option
@click.option("--mapping", default="recsys", show_default=True, help="Mapping name.")
@click.option("--mapping-version", type=int, help="Mapping version [default: latest].")
@alias_option
@click.option(
    "--replicas", type=click.IntRange(min=0), help="Override number_of_replicas."
)
@click.option("--shards", type=click.IntRange(min=1), help="Override number_of_shards.")
@click.option(
    "--plan", "plan_only", is_flag=True, help="Print the plan; change nothing."
)
@click.option(
    "--lock-wait",
    type=float,
    default=0,
    show_default=True,
    help="Seconds to wait for another migration's lock.",
)
@project_option
@connection_options
@json_option
@handle_errors
def migrate(
    model_dir,
    mapping,
    mapping_version,
    alias,
    replicas,
    shards,
    plan_only,
    lock_wait,
    project,
    client,
    as_json,
) -> None:
    """Build a new versioned index from a model, validate it, then swap the alias."""
    model = TrainedModel.load(model_dir)
    mappings_dir = discover_project(project).mappings_dir
    version = (
        get_version(mappings_dir, mapping, mapping_version)
        if mapping_version
        else latest_version(mappings_dir, mapping)
    )
    plan = plan_migration(
        client,
        model,
        version,
        alias=alias,
        model_path=str(model_dir),
        replicas=replicas,
        shards=shards,
    )
    if plan_only:
        if as_json:
            print_json(plan.to_dict())
            return
        console.print(f"[bold]plan for alias {alias}[/] (nothing was changed):")
        for number, step in enumerate(plan.steps, start=1):
            console.print(f"  {number}. {step}")
        return

    if as_json:
        result = apply_migration(client, plan, model, lock_wait=lock_wait)
    else:
        for step in plan.steps:
            console.print(f"- {step}")
        with _bulk_progress() as progress:
            task = progress.add_task(f"bulk {plan.index}", total=plan.doc_count)
            result = apply_migration(
                client,
                plan,
                model,
                lock_wait=lock_wait,
                on_progress=lambda done, total: progress.update(task, completed=done),
            )
    if as_json:
        print_json(
            {
                "alias": result.alias,
                "index": result.index,
                "previous_index": result.previous_index,
                "action": result.action,
                "indexed": result.indexed,
                "validation": result.validation.to_dict()
                if result.validation
                else None,
            }
        )
        return
    if result.validation is not None:
        print_validation(result.validation)
    if result.action == "noop":
        console.print(f"alias [bold]{alias}[/] already points at {result.index}")
    else:
        console.print(
            f"alias [bold]{alias}[/] -> [green]{result.index}[/] "
            f"(was {result.previous_index or 'none'}; {result.action}, "
            f"{result.indexed} documents indexed)"
        )


@click.command("alias-swap")
@alias_option
@click.option("--index", "index", required=True, help="Index to point the alias at.")
@model_option
@connection_options
@json_option
@handle_errors
def alias_swap(alias, index, model_dir, client, as_json) -> None:
    """Validate INDEX against a model, then move the alias to it atomically."""
    model = TrainedModel.load(model_dir)
    current = aliases.alias_target(client, alias)
    if current == index:
        raise MigrationError(f"alias {alias!r} already points at {index}")
    report = require_valid(client, index, model)
    aliases.swap_alias(client, alias, index, expected=current)
    history.record(
        client,
        alias=alias,
        index=index,
        previous_index=current,
        action="alias-swap",
        meta=indexing.read_meta(client, index),
    )
    if as_json:
        print_json(
            {
                "alias": alias,
                "index": index,
                "previous_index": current,
                "validation": report.to_dict(),
            }
        )
    else:
        console.print(f"alias [bold]{alias}[/] -> [green]{index}[/] (was {current})")


@click.command("rollback")
@alias_option
@click.option(
    "--to", "target", help="Index to roll back to [default: the previous one]."
)
@click.option(
    "--model",
    "model_dir",
    type=click.Path(file_okay=False),
    help="Validate the target against this model before swapping.",
)
@connection_options
@json_option
@handle_errors
def rollback(alias, target, model_dir, client, as_json) -> None:
    """Point the alias back at the index it served before the last move."""
    current = aliases.alias_target(client, alias)
    if current is None:
        raise MigrationError(f"alias {alias!r} does not exist; nothing to roll back")
    if target is None:
        for entry in history.entries(client, alias):
            if entry["index"] == current and entry.get("previous_index"):
                target = entry["previous_index"]
                break
        if target is None:
            raise MigrationError(
                f"esfm has no record of an index before {current} for alias {alias!r}",
                hint="name one with --to INDEX",
            )
    if not client.indices.exists(index=target):
        raise MigrationError(f"rollback target {target} no longer exists")
    if indexing.read_meta(client, target).get("state") != indexing.STATE_COMPLETE:
        raise MigrationError(f"rollback target {target} is not a complete esfm index")
    if model_dir:
        require_valid(client, target, TrainedModel.load(model_dir))
    aliases.swap_alias(client, alias, target, expected=current)
    history.record(
        client,
        alias=alias,
        index=target,
        previous_index=current,
        action="rollback",
        meta=indexing.read_meta(client, target),
    )
    if as_json:
        print_json({"alias": alias, "index": target, "previous_index": current})
    else:
        console.print(
            f"alias [bold]{alias}[/] rolled back to [green]{target}[/] (was {current})"
        )


@click.command("status")
@alias_option
@connection_options
@json_option
@handle_errors
def status(alias, client, as_json) -> None:
    """Show the index behind the alias, its metadata and the alias history."""
    current = aliases.alias_target(client, alias)
    meta = indexing.read_meta(client, current) if current else {}
    entries = history.entries(client, alias, size=20)
    if as_json:
        print_json({"alias": alias, "index": current, "meta": meta, "history": entries})
        return
    console.print(f"alias [bold]{alias}[/] -> {current or '[red](missing)[/]'}")
    for key in (
        "model_id",
        "mapping_name",
        "mapping_version",
        "mapping_checksum",
        "doc_count",
        "created",
        "state",
    ):
        if key in meta:
            console.print(f"  {key}: {meta[key]}")
    if entries:
        table = Table(title="history (newest first)")
        for column in ("at", "action", "index", "previous_index", "model_id"):
            table.add_column(column)
        for entry in entries:
            table.add_row(
                *(
                    str(entry.get(c) or "")
                    for c in ("at", "action", "index", "previous_index", "model_id")
                )
            )
        console.print(table)


@click.command("validate")
@model_option
@alias_option
@click.option("--index", help="Validate this index instead of the alias.")
@click.option(
    "-k",
    "k",
    type=click.IntRange(1, 1000),
    default=10,
    show_default=True,
    help="Length of the rankings to compare.",
)
@connection_options
@json_option
@handle_errors
def validate(model_dir, alias, index, k, client, as_json) -> None:
    """Compare the index and its rankings with the model; exit 1 on any mismatch."""
    model = TrainedModel.load(model_dir)
    report = validate_index(client, index or alias, model, k=k)
    if as_json:
        print_json(report.to_dict())
    else:
        print_validation(report)
    if not report.ok:
        raise ValidationFailed(
            f"{index or alias} disagrees with model {model.model_id}",
            mismatches=report.mismatches,
        )


@click.group("lock")
def lock_group() -> None:
    """Inspect or release the migration lock."""


@lock_group.command("show")
@alias_option
@connection_options
@handle_errors
def lock_show(alias, client) -> None:
    """Show who holds the migration lock of an alias."""
    held = locks.read_lock(client, f"migrate:{alias}")
    console.print(json.dumps(held, indent=2) if held else f"no lock on {alias}")


@lock_group.command("release")
@alias_option
@click.option("--force", is_flag=True, help="Required: you checked the owner is gone.")
@connection_options
@handle_errors
def lock_release(alias, force, client) -> None:
    """Break a lock left by a killed migration (look at `esfm lock show` first)."""
    name = f"migrate:{alias}"
    held = locks.read_lock(client, name)
    if held is None:
        console.print(f"no lock on {alias}")
        return
    if not force:
        raise EsfmError(
            f"lock {name} is held by {held.get('user')}@{held.get('host')} pid "
            f"{held.get('pid')} since {held.get('acquired_at')}",
            hint="if that process is gone, rerun with --force",
        )
    locks.release(client, name)
    console.print(f"released lock {name}")


@click.group("templates")
def templates_group() -> None:
    """Manage the versioned search templates."""


@templates_group.command("push")
@project_option
@connection_options
@json_option
@handle_errors
def templates_push(project, client, as_json) -> None:
    """Store every template version on the cluster and in its registry."""
    results = push_templates(
        client, load_templates(discover_project(project).templates_dir)
    )
    if as_json:
        print_json([result.__dict__ for result in results])
        return
    for result in results:
        where = (
            "stored script"
            if result.stored_script
            else "registry only (no lang-mustache: rendered locally)"
        )
        console.print(f"{result.script_id}: {result.status}, {where}")


@templates_group.command("list")
@project_option
@connection_options
@json_option
@handle_errors
def templates_list(project, client, as_json) -> None:
    """List template versions in the files and on the cluster."""
    files = load_templates(discover_project(project).templates_dir)
    pushed = {
        entry["name"] + f"-v{entry['version']}": entry
        for entry in registry_entries(client)
    }
    rows = []
    for template in files.values():
        entry = pushed.get(f"{template.name}-v{template.version}")
        state = (
            "not pushed"
            if entry is None
            else ("pushed" if entry["checksum"] == template.checksum else "DIFFERS")
        )
        rows.append(
            {"name": template.name, "version": template.version, "state": state}
        )
    if as_json:
        print_json(rows)
        return
    table = Table("name", "version", "state")
    for row in rows:
        table.add_row(row["name"], str(row["version"]), row["state"])
    console.print(table)


@templates_group.command("render")
@click.argument("name")
@click.option(
    "--param",
    "params",
    multiple=True,
    metavar="KEY=VALUE",
    help="Template parameter; repeat for several.",
)
@project_option
@handle_errors
def templates_render(name, params, project) -> None:
    """Print the request body a template renders to, without a cluster."""
    values = {}
    for item in params:
        key, sep, value = item.partition("=")
        if not sep:
            raise EsfmError(f"invalid --param {item!r}", hint="write --param KEY=VALUE")
        values[key] = value
    template = get_template(discover_project(project).templates_dir, name)
    print_json(template.render(values))


COMMANDS = [
    init,
    migrate,
    alias_swap,
    rollback,
    status,
    validate,
    lock_group,
    templates_group,
]
