"""Commands that change or inspect indices: init, migrate, alias-swap, rollback,
prune, status, validate, lock, templates and index-templates."""

from __future__ import annotations

import json

import click
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn
from rich.table import Table

from esfm import aliases, history, index_templates, indexing, retention
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
from esfm.drift import DriftDetected, DriftReport, check_drift
from esfm.errors import EsfmError, MigrationError, ValidationFailed
from esfm.mappings import get_version, latest_version
from esfm.migrate import MigrationPlan, apply_migration, ensure_ready, plan_migration
from esfm.project import discover_project, init_project
from esfm.templates import (
    diff_templates,
    get_template,
    load_templates,
    push_templates,
    registry_entries,
    search_template_drift,
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


def _drift_report(client, alias: str, mapping: str, project: str | None) -> DriftReport:
    root = discover_project(project)
    report = check_drift(client, alias, root.mappings_dir, mapping)
    report.template_drift = index_templates.template_drift(
        client, index_templates.load_definitions(root.root)
    )
    report.template_drift.extend(
        search_template_drift(client, load_templates(root.templates_dir))
    )
    return report


def _print_plan(plan: MigrationPlan) -> None:
    console.print(
        f"[bold]plan for alias {plan.alias}[/] ({plan.mode}; nothing was changed):"
    )
    for number, step in enumerate(plan.steps, start=1):
        console.print(f"  {number}. {step}")


@click.command("migrate")
@click.option(
    "--model",
    "model_dir",
    type=click.Path(file_okay=False),
    help="Model directory written by esfm train (required unless --check).",
)
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
    "--check",
    is_flag=True,
    help="Report pending mapping versions and drift; exit 1 if there are any. "
    "Changes nothing.",
)
@click.option(
    "--lock-wait",
    type=float,
    default=0,
    show_default=True,
    help="Seconds to wait for another migration's lock.",
)
@click.option(
    "--bulk-chunk-size",
    type=click.IntRange(min=1),
    default=indexing.DEFAULT_CHUNK_SIZE,
    show_default=True,
    envvar="ESFM_BULK_CHUNK_SIZE",
    help="Documents per bulk request [env ESFM_BULK_CHUNK_SIZE].",
)
@click.option(
    "--bulk-timeout",
    metavar="DURATION",
    help="How long each bulk item waits for an unavailable shard, e.g. 30s "
    "[default: the server's, 1m].",
)
@click.option(
    "--bulk-retries",
    type=click.IntRange(min=0),
    default=5,
    show_default=True,
    help="Retries of bulk items rejected with 429 or 5xx; backoff doubles from 1 s.",
)
@click.option(
    "--wait-for-active-shards",
    default="1",
    show_default=True,
    help="Shard copies that must be active before the swap: a number or 'all'.",
)
@click.option(
    "--keep",
    type=click.IntRange(min=1),
    help="After the swap, delete all but the newest N esfm indices of the alias "
    "(never the live one or the rollback target) [default: delete nothing].",
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
    check,
    lock_wait,
    bulk_chunk_size,
    bulk_timeout,
    bulk_retries,
    wait_for_active_shards,
    keep,
    project,
    client,
    as_json,
) -> None:
    """Apply a model and the latest mapping: in place when only fields are added,
    else build a new versioned index, check and validate it, then swap the alias."""
    if check:
        _run_check(client, alias, mapping, project, as_json)
        return
    if not model_dir:
        raise EsfmError("missing option --model", hint="pass --model DIR, or --check")
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
        bulk_chunk_size=bulk_chunk_size,
        bulk_timeout=bulk_timeout,
        bulk_max_retries=bulk_retries,
        wait_for_active_shards=wait_for_active_shards,
        keep=keep,
    )
    if plan_only:
        if as_json:
            print_json(plan.to_dict())
        else:
            _print_plan(plan)
        return

    if as_json:
        result = apply_migration(client, plan, model, lock_wait=lock_wait)
    else:
        for step in plan.steps:
            console.print(f"- {step}")
        with _bulk_progress() as progress:
            tasks: list = []

            def on_progress(done: int, total: int) -> None:
                # The bar appears with the first bulk chunk, so a run that
                # loads nothing (no-op, in place, or lock taken) shows none.
                if not tasks:
                    tasks.append(progress.add_task(f"bulk {plan.index}", total=total))
                progress.update(tasks[0], completed=done)

            result = apply_migration(
                client, plan, model, lock_wait=lock_wait, on_progress=on_progress
            )
    if as_json:
        print_json(
            {
                "alias": result.alias,
                "index": result.index,
                "previous_index": result.previous_index,
                "action": result.action,
                "mode": plan.mode,
                "indexed": result.indexed,
                "pruned": result.pruned,
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
    elif result.action == "in-place":
        console.print(
            f"added {', '.join(sorted(plan.added_fields)) or 'no fields'} to "
            f"[green]{result.index}[/] in place; mapping now v{plan.mapping.version}"
        )
    else:
        console.print(
            f"alias [bold]{alias}[/] -> [green]{result.index}[/] "
            f"(was {result.previous_index or 'none'}; {result.action}, "
            f"{result.indexed} documents indexed)"
        )
    for index in result.pruned:
        console.print(f"deleted old index {index} (--keep {keep})")


def _run_check(client, alias: str, mapping: str, project, as_json: bool) -> None:
    report = _drift_report(client, alias, mapping, project)
    if as_json:
        print_json(report.to_dict())
    elif report.ok:
        console.print(
            f"alias {alias}: {report.index} is at {mapping} v{report.live_version}, "
            "no pending versions, no drift"
        )
    if not report.ok:
        problems = report.problems()
        raise DriftDetected(
            f"alias {alias}: {len(problems)} problem(s): " + "; ".join(problems),
            report=report,
            hint=f"see esfm status --alias {alias}; apply pending versions with "
            "esfm migrate --model DIR",
        )


@click.command("alias-swap")
@alias_option
@click.option("--index", "index", required=True, help="Index to point the alias at.")
@model_option
@connection_options
@json_option
@handle_errors
def alias_swap(alias, index, model_dir, client, as_json) -> None:
    """Validate the --index index against a model, then point the alias at it."""
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
    """Point the alias back at the index it served before the last move.

    The target must be a complete esfm index that passes the readiness checks
    (health, active primaries, document count); --model also validates it."""
    current = aliases.alias_target(client, alias)
    if current is None:
        raise MigrationError(f"alias {alias!r} does not exist; nothing to roll back")
    if target is None:
        target = retention.rollback_target(client, alias, current)
        if target is None:
            raise MigrationError(
                f"esfm has no record of an index before {current} for alias {alias!r}",
                hint="name one with --to INDEX",
            )

    if not client.indices.exists(index=target):
        raise MigrationError(
            f"rollback target {target} does not exist",
            hint=f"list the indices esfm recorded with: esfm status --alias {alias}",
        )
    if indexing.read_meta(client, target).get("state") != indexing.STATE_COMPLETE:
        raise MigrationError(f"rollback target {target} is not a complete esfm index")
    target_meta = indexing.read_meta(client, target)
    if "doc_count" in target_meta:
        ensure_ready(client, target, expected_docs=int(target_meta["doc_count"]))
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


@click.command("prune")
@alias_option
@click.option(
    "--keep",
    type=click.IntRange(min=1),
    default=retention.DEFAULT_KEEP,
    show_default=True,
    help="Number of newest esfm indices of the alias to keep.",
)
@click.option("--yes", is_flag=True, help="Delete; without it, only list.")
@click.option(
    "--lock-wait",
    type=float,
    default=0,
    show_default=True,
    help="Seconds to wait for a running migration's lock.",
)
@connection_options
@json_option
@handle_errors
def prune(alias, keep, yes, lock_wait, client, as_json) -> None:
    """List, and with --yes delete, old esfm indices of an alias.

    The live index and the rollback target are always kept."""
    plan = retention.plan_prune(client, alias, keep=keep)
    deleted = retention.apply_prune(client, plan, lock_wait=lock_wait) if yes else []
    if as_json:
        print_json({**plan.to_dict(), "deleted": deleted})
        return
    console.print(
        f"alias [bold]{alias}[/]: live {plan.live or '(none)'}, rollback target "
        f"{plan.rollback_target or '(none)'}, keeping {len(plan.kept)}"
    )
    for index in plan.kept:
        console.print(f"  keep    {index}")
    for index in plan.delete:
        verb = "delete "
        if yes:
            verb = "deleted" if index in deleted else "kept   "
        note = (
            " (half-built by an interrupted migrate)"
            if index in plan.incomplete
            else ""
        )
        console.print(f"  {verb} {index}{note}")
    if plan.delete and not yes:
        console.print(f"nothing deleted; rerun with --yes to delete {len(plan.delete)}")
    if not plan.delete:
        console.print("nothing to delete")


@click.command("status")
@alias_option
@click.option("--mapping", default="recsys", show_default=True, help="Mapping name.")
@project_option
@connection_options
@json_option
@handle_errors
def status(alias, mapping, project, client, as_json) -> None:
    """Show the index behind the alias, pending versions, drift and the history."""
    current = aliases.alias_target(client, alias)
    meta = indexing.read_meta(client, current) if current else {}
    entries = history.entries(client, alias, size=20)
    report = _drift_report(client, alias, mapping, project)
    incomplete = retention.incomplete_indices(client, alias)
    if as_json:
        print_json(
            {
                "alias": alias,
                "index": current,
                "incomplete_indices": incomplete,
                "meta": meta,
                "drift": report.to_dict(),
                "history": entries,
            }
        )
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
    if report.ok:
        console.print("  drift: none (mapping files, live mapping and templates agree)")
    for problem in report.problems():
        console.print(f"  [yellow]drift:[/] {problem}", highlight=False)
    for index in incomplete:
        console.print(
            f"  [yellow]half-built:[/] {index} was left by an interrupted migrate; "
            "the next migrate of that model rebuilds it, `esfm prune --yes` "
            "deletes it",
            highlight=False,
        )
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
    if held is None:
        console.print(f"no lock on {alias}")
        return
    console.print(json.dumps(held, indent=2))
    if locks.is_stale(held):
        console.print(
            "the lock is stale (expired, or its process on this host exited); "
            "the next esfm migrate takes it over"
        )


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


@templates_group.command("diff")
@project_option
@connection_options
@json_option
@handle_errors
def templates_diff(project, client, as_json) -> None:
    """Compare the template files with the versions pushed to the cluster."""
    templates = load_templates(discover_project(project).templates_dir)
    diffs = diff_templates(client, templates)
    if as_json:
        print_json([diff.to_dict() for diff in diffs])
        return
    table = Table("name", "version", "state", "stored script")
    for diff in diffs:
        stored = ""
        if diff.stored_script is not None:
            stored = "same" if diff.stored_script else "DIFFERS"
        table.add_row(diff.name, str(diff.version), diff.state, stored)
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


@click.group("index-templates")
def index_templates_group() -> None:
    """Manage the versioned index and component templates for recsys-*."""


@index_templates_group.command("push")
@project_option
@connection_options
@json_option
@handle_errors
def index_templates_push(project, client, as_json) -> None:
    """Put every definition whose version or checksum the cluster lacks."""
    definitions = index_templates.load_definitions(discover_project(project).root)
    outcomes = index_templates.push_definitions(client, definitions)
    if as_json:
        print_json([outcome.__dict__ for outcome in outcomes])
        return
    for outcome in outcomes:
        console.print(
            f"{outcome.kind} template {outcome.name} v{outcome.version}: "
            f"{outcome.status}"
        )


@index_templates_group.command("list")
@project_option
@connection_options
@json_option
@handle_errors
def index_templates_list(project, client, as_json) -> None:
    """List the definitions and whether the cluster matches them."""
    definitions = index_templates.load_definitions(discover_project(project).root)
    rows = []
    for definition in definitions:
        findings = index_templates.template_drift(client, [definition])
        rows.append(
            {
                "kind": definition.kind,
                "name": definition.name,
                "version": definition.version,
                "state": "; ".join(findings) if findings else "pushed",
            }
        )
    if as_json:
        print_json(rows)
        return
    table = Table("kind", "name", "version", "state")
    for row in rows:
        table.add_row(row["kind"], row["name"], str(row["version"]), row["state"])
    console.print(table)


COMMANDS = [
    init,
    migrate,
    alias_swap,
    rollback,
    prune,
    status,
    validate,
    lock_group,
    templates_group,
    index_templates_group,
]
