"""Index lifecycle against a real node: in-place mapping changes, drift,
readiness checks, racing swaps, retention, index templates, the migration
lock across real CLI processes, and queries during a migration."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
from click.testing import CliRunner

from esfm import aliases, drift, history, index_templates, indexing, lock, retention
from esfm.artifacts import TrainedModel
from esfm.cli.main import cli
from esfm.data import load_movielens
from esfm.errors import MigrationError
from esfm.mappings import latest_version, load_versions
from esfm.migrate import (
    MODE_IN_PLACE,
    MODE_NEW_INDEX,
    apply_migration,
    ensure_ready,
    plan_migration,
)
from esfm.project import PACKAGED_PROJECT
from esfm.query import Recommender
from esfm.templates import load_templates, push_templates
from esfm.train import TrainConfig, save_model, train

ESFM_CLI = Path(sys.executable).with_name("esfm")
QUERY_LIMIT = 5000
QUERY_TIME_LIMIT_S = 300


def _data_dir() -> Path:
    root = os.environ.get("ESFM_TEST_DATA")
    if not root:
        pytest.fail("ESFM_TEST_DATA is not set: point it at a folder with ml-100k/")
    return Path(root) / "ml-100k"


def _train(dataset, seed: int, out: Path) -> Path:
    config = TrainConfig(k=16, epochs=2, batch_size=2048, lr=5e-3, seed=seed)
    save_model(train(dataset, config), out)
    return out


@pytest.fixture(scope="module")
def dataset():
    return load_movielens(_data_dir())


@pytest.fixture(scope="module")
def model_a_dir(dataset, tmp_path_factory) -> Path:
    return _train(dataset, 11, tmp_path_factory.mktemp("models") / "a")


@pytest.fixture(scope="module")
def model_b_dir(dataset, tmp_path_factory) -> Path:
    return _train(dataset, 12, tmp_path_factory.mktemp("models") / "b")


@pytest.fixture(scope="module")
def model_a(model_a_dir) -> TrainedModel:
    return TrainedModel.load(model_a_dir)


@pytest.fixture(scope="module")
def model_b(model_b_dir) -> TrainedModel:
    return TrainedModel.load(model_b_dir)


@pytest.fixture
def alias() -> str:
    return f"lc-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def project(tmp_path, unique_prefix) -> Path:
    """A project with v1 of the shipped mapping and its own index templates.

    The templates match only this test's prefix, so pushing them leaves the
    cluster's ``recsys-*`` indices alone.
    """
    root = tmp_path / "project"
    (root / "mappings" / "recsys").mkdir(parents=True)
    shutil.copy(
        PACKAGED_PROJECT / "mappings" / "recsys" / "v1.json",
        root / "mappings" / "recsys" / "v1.json",
    )
    shutil.copytree(PACKAGED_PROJECT / "templates", root / "templates")
    (root / "index_templates").mkdir()
    name = f"{unique_prefix}tpl"
    for definition in index_templates.default_definitions(f"{unique_prefix}*", name):
        document = {
            "kind": definition.kind,
            "name": definition.name,
            "version": definition.version,
            "body": definition.body,
        }
        path = root / "index_templates" / f"{definition.name}.json"
        path.write_text(json.dumps(document))
    return root


@pytest.fixture
def cleanup_templates(es_client, project):
    yield
    for definition in reversed(index_templates.load_definitions(project)):
        if definition.kind == index_templates.KIND_INDEX:
            es_client.options(ignore_status=404).indices.delete_index_template(
                name=definition.name
            )
        else:
            es_client.options(ignore_status=404).cluster.delete_component_template(
                name=definition.name
            )


def _write_version(project: Path, version: int, edit) -> None:
    folder = project / "mappings" / "recsys"
    document = json.loads((folder / f"v{version - 1}.json").read_text())
    document["version"] = version
    edit(document)
    (folder / f"v{version}.json").write_text(json.dumps(document, indent=2))


def _add_popularity(document: dict) -> None:
    document["mappings"]["properties"]["popularity"] = {"type": "float"}


def _text(result) -> str:
    """Return CLI output with rich's line wrapping undone."""
    return " ".join(result.output.split())


def _url(es_client) -> str:
    return str(es_client.transport.node_pool.all()[0].base_url)


def _migrate(es_client, model, project: Path, alias: str, **options):
    mapping = latest_version(project / "mappings", "recsys")
    plan = plan_migration(es_client, model, mapping, alias=alias, **options)
    return plan, apply_migration(es_client, plan, model)


# -- in place versus new index ----------------------------------------------


def test_additive_version_applies_in_place(
    es_client, model_a, model_a_dir, project, alias
):
    _, first = _migrate(es_client, model_a, project, alias)
    _write_version(project, 2, _add_popularity)

    runner = CliRunner()
    args = ["--alias", alias, "--url", _url(es_client), "--project", str(project)]
    shown = runner.invoke(
        cli, ["migrate", "--model", str(model_a_dir), "--plan", *args]
    )
    assert shown.exit_code == 0, shown.output
    assert "in-place" in _text(shown)
    assert "put_mapping on the live index" in _text(shown)
    # --plan must leave the live mapping as it was.
    assert "popularity" not in drift.live_mappings(es_client, first.index)["properties"]

    plan, result = _migrate(es_client, model_a, project, alias)
    assert plan.mode == MODE_IN_PLACE
    assert sorted(plan.added_fields) == ["popularity"]
    assert result.action == "in-place"
    assert aliases.alias_target(es_client, alias) == first.index
    live = drift.live_mappings(es_client, first.index)
    assert live["properties"]["popularity"] == {"type": "float"}
    meta = indexing.read_meta(es_client, first.index)
    assert meta["mapping_version"] == 2
    assert meta["state"] == indexing.STATE_COMPLETE
    assert history.entries(es_client, alias)[0]["action"] == "put-mapping"


@pytest.mark.parametrize(
    ("field", "key", "value"),
    [
        ("rank_vector", "similarity", "dot_product"),
        ("embedding", "index_options", {"type": "int8_flat"}),
        ("bias", "type", "double"),
    ],
)
def test_breaking_version_needs_new_index(
    es_client, model_a, project, alias, field, key, value
):
    _, first = _migrate(es_client, model_a, project, alias)

    def edit(document):
        document["mappings"]["properties"][field][key] = value
        _add_popularity(document)

    _write_version(project, 2, edit)
    mapping = latest_version(project / "mappings", "recsys")
    plan = plan_migration(es_client, model_a, mapping, alias=alias)
    assert plan.mode == MODE_NEW_INDEX
    assert plan.index != first.index
    assert plan.reasons == [f"{field}.{key} changed"]
    assert any("a new index is needed" in step for step in plan.steps)


def test_other_model_needs_new_index(es_client, model_a, model_b, project, alias):
    _migrate(es_client, model_a, project, alias)
    _write_version(project, 2, _add_popularity)
    plan, result = _migrate(es_client, model_b, project, alias)
    assert plan.mode == MODE_NEW_INDEX
    assert result.action == "create"
    live = drift.live_mappings(es_client, result.index)
    assert live["properties"]["popularity"] == {"type": "float"}


# -- drift --------------------------------------------------------------------


def _check(es_client, project: Path, alias: str):
    runner = CliRunner()
    return runner.invoke(
        cli,
        [
            "migrate",
            "--check",
            "--alias",
            alias,
            "--url",
            _url(es_client),
            "--project",
            str(project),
        ],
    )


def test_check_clean_then_pending(
    es_client, model_a, project, alias, cleanup_templates
):
    _migrate(es_client, model_a, project, alias)
    index_templates.push_definitions(
        es_client, index_templates.load_definitions(project)
    )
    push_templates(es_client, load_templates(project / "templates"))
    clean = _check(es_client, project, alias)
    assert clean.exit_code == 0, clean.output
    assert "no pending versions, no drift" in _text(clean)

    _write_version(project, 2, _add_popularity)
    pending = _check(es_client, project, alias)
    assert pending.exit_code == 1
    assert "pending mapping version(s) v2 (live is v1)" in _text(pending)


def test_check_finds_unpushed_search_template(es_client, model_a, project, alias):
    _migrate(es_client, model_a, project, alias)
    # The registry is shared by the whole cluster, so a fresh name is the
    # only version that no other test has pushed.
    fresh = f"check_{uuid.uuid4().hex[:8]}"
    (project / "templates" / f"{fresh}.mustache").write_text(
        f"{{{{!\nname: {fresh}\nversion: 3\n}}}}\n{{}}\n"
    )
    result = _check(es_client, project, alias)
    assert result.exit_code == 1
    assert f"search template {fresh} v3 is not pushed" in _text(result)


def test_check_finds_edited_file(es_client, model_a, project, alias):
    _migrate(es_client, model_a, project, alias)
    path = project / "mappings" / "recsys" / "v1.json"
    document = json.loads(path.read_text())
    document["description"] = "edited after it was applied"
    path.write_text(json.dumps(document))

    report = drift.check_drift(es_client, alias, project / "mappings")
    assert [item.version for item in report.edited] == [1]
    assert (
        report.edited[0].file_checksum
        == load_versions(project / "mappings", "recsys")[0].checksum
    )
    result = _check(es_client, project, alias)
    assert result.exit_code == 1
    assert "was edited after it was applied" in _text(result)


def test_check_finds_hand_changed_mapping(es_client, model_a, project, alias):
    _, first = _migrate(es_client, model_a, project, alias)
    es_client.indices.put_mapping(
        index=first.index, properties={"hand_added": {"type": "keyword"}}
    )
    report = drift.check_drift(es_client, alias, project / "mappings")
    assert report.live_diffs == ["hand_added (not in file)"]
    assert report.pending == []

    runner = CliRunner()
    status = runner.invoke(
        cli,
        [
            "status",
            "--alias",
            alias,
            "--url",
            _url(es_client),
            "--project",
            str(project),
        ],
    )
    assert status.exit_code == 0, status.output
    assert "hand_added (not in file)" in _text(status)
    assert _check(es_client, project, alias).exit_code == 1


# -- readiness and racing swaps -------------------------------------------------


def test_ready_rejects_wrong_count(es_client, model_a, project, alias):
    _, first = _migrate(es_client, model_a, project, alias)
    with pytest.raises(MigrationError, match="documents, expected") as info:
        ensure_ready(es_client, first.index, expected_docs=first.indexed + 1)
    assert info.value.index == first.index


def _race_swaps(
    es_client, alias: str, current: str, targets: list[str]
) -> dict[str, MigrationError | None]:
    """Start one swap per target at the same moment; return each one's error."""
    barrier = threading.Barrier(len(targets))
    outcomes: dict[str, MigrationError | None] = {}

    def swap(target: str) -> None:
        barrier.wait()
        try:
            aliases.swap_alias(es_client, alias, target, expected=current)
            outcomes[target] = None
        except MigrationError as exc:
            outcomes[target] = exc

    threads = [threading.Thread(target=swap, args=(name,)) for name in targets]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return outcomes


def test_racing_swaps_one_wins(es_client, alias):
    start = f"{alias}-start"
    es_client.indices.create(index=start, aliases={alias: {}})
    indices = [start]
    for round_number in range(5):
        current = aliases.alias_target(es_client, alias)
        contenders = [f"{alias}-r{round_number}-{side}" for side in ("a", "b")]
        for name in contenders:
            es_client.indices.create(index=name)
            indices.append(name)
        outcomes = _race_swaps(es_client, alias, current, contenders)

        winners = [name for name, error in outcomes.items() if error is None]
        losers = [error for error in outcomes.values() if error is not None]
        assert len(winners) == 1
        assert len(losers) == 1
        assert "no longer points at" in losers[0].message
        assert aliases.alias_target(es_client, alias) == winners[0]
    es_client.indices.delete(index=",".join(indices))


# -- retention ------------------------------------------------------------------


def _fake_esfm_index(es_client, alias: str, number: int, created: str) -> str:
    index = f"{alias}-v1-model{number}"
    indexing.create_index(
        es_client,
        index,
        mappings={"properties": {"value": {"type": "keyword"}}},
        settings={"number_of_replicas": 0},
        meta={"model_id": f"model{number}", "created": created},
    )
    # A finished migrate marks its index complete; prune treats others as
    # half-built leftovers.
    es_client.indices.put_mapping(
        index=index,
        meta={
            "esfm": {
                "model_id": f"model{number}",
                "created": created,
                "state": indexing.STATE_COMPLETE,
            }
        },
    )
    return index


def test_prune_keeps_live_and_rollback(es_client, alias):
    names = [
        _fake_esfm_index(es_client, alias, n, f"2026-01-0{n}T00:00:00+00:00")
        for n in range(1, 6)
    ]
    foreign = f"{alias}-vip-v1-other"
    es_client.indices.create(index=foreign, mappings={"_meta": {"esfm": {}}})
    # The oldest index is live and the second oldest is its rollback target.
    aliases.swap_alias(es_client, alias, names[1], expected=None)
    aliases.swap_alias(es_client, alias, names[0], expected=names[1])
    history.record(
        es_client,
        alias=alias,
        index=names[0],
        previous_index=names[1],
        action="rollback",
        meta={},
    )

    plan = retention.plan_prune(es_client, alias, keep=2)
    assert plan.live == names[0]
    assert plan.rollback_target == names[1]
    assert plan.kept == [names[4], names[3], names[1], names[0]]
    assert plan.delete == [names[2]]

    runner = CliRunner()
    args = ["prune", "--alias", alias, "--keep", "2", "--url", _url(es_client)]
    listed = runner.invoke(cli, args)
    assert listed.exit_code == 0, listed.output
    assert "rerun with --yes" in _text(listed)
    assert es_client.indices.exists(index=names[2])

    deleted = runner.invoke(cli, [*args, "--yes", "--json"])
    assert deleted.exit_code == 0, deleted.output
    assert json.loads(deleted.output)["deleted"] == [names[2]]
    assert not es_client.indices.exists(index=names[2])
    for kept in plan.kept:
        assert es_client.indices.exists(index=kept)
    assert es_client.indices.exists(index=foreign)
    assert history.entries(es_client, alias)[0]["action"] == "delete"
    es_client.indices.delete(index=",".join([*plan.kept, foreign]))


def test_prune_waits_for_migration_lock(es_client, alias):
    names = [
        _fake_esfm_index(es_client, alias, n, f"2026-02-0{n}T00:00:00+00:00")
        for n in range(1, 3)
    ]
    aliases.swap_alias(es_client, alias, names[1], expected=None)
    plan = retention.plan_prune(es_client, alias, keep=1)
    assert plan.delete == [names[0]]
    with lock.held(es_client, f"migrate:{alias}"):
        with pytest.raises(MigrationError, match="another migration holds lock"):
            retention.apply_prune(es_client, plan)
    assert es_client.indices.exists(index=names[0])
    assert retention.apply_prune(es_client, plan) == [names[0]]
    es_client.indices.delete(index=names[1])


def test_migrate_keep_prunes_after_swap(es_client, model_a, model_b, project, alias):
    _, first = _migrate(es_client, model_a, project, alias)
    _, second = _migrate(es_client, model_b, project, alias)
    _write_version(project, 2, _add_popularity)
    _, third = _migrate(es_client, model_a, project, alias, keep=1)
    # keep=1 still keeps the rollback target, the index before the swap.
    assert third.pruned == [first.index]
    assert es_client.indices.exists(index=second.index)
    assert not es_client.indices.exists(index=first.index)


# -- index templates ------------------------------------------------------------


def test_index_templates_push_and_drift(
    es_client, project, unique_prefix, cleanup_templates
):
    definitions = index_templates.load_definitions(project)
    assert [d.kind for d in definitions] == ["component", "index"]
    assert index_templates.template_drift(es_client, definitions) == [
        f"component template {unique_prefix}tpl-settings v1 is not pushed",
        f"index template {unique_prefix}tpl v1 is not pushed",
    ]

    runner = CliRunner()
    args = ["--url", _url(es_client), "--project", str(project), "--json"]
    pushed = runner.invoke(cli, ["index-templates", "push", *args])
    assert pushed.exit_code == 0, pushed.output
    assert [o["status"] for o in json.loads(pushed.output)] == ["created", "created"]
    again = index_templates.push_definitions(es_client, definitions)
    assert [o.status for o in again] == ["unchanged", "unchanged"]
    assert index_templates.template_drift(es_client, definitions) == []

    index = f"{unique_prefix}from-template"
    es_client.indices.create(index=index)
    settings = es_client.indices.get_settings(index=index)[index]["settings"]["index"]
    assert settings["number_of_replicas"] == "1"
    assert settings["refresh_interval"] == "1s"
    es_client.indices.delete(index=index)

    component = definitions[0]
    live = index_templates.read_live(es_client, component)
    es_client.cluster.put_component_template(
        name=component.name,
        template={
            "settings": {
                "number_of_shards": 1,
                "number_of_replicas": 2,
                "refresh_interval": "1s",
            }
        },
        version=live["version"],
        meta=live["_meta"],
    )
    assert index_templates.template_drift(es_client, definitions) == [
        f"component template {component.name} was changed on the cluster: "
        "template.settings.number_of_replicas"
    ]
    listed = runner.invoke(cli, ["index-templates", "list", *args])
    assert "changed on the cluster" in _text(listed)

    path = project / "index_templates" / f"{component.name}.json"
    document = json.loads(path.read_text())
    document["version"] = 2
    path.write_text(json.dumps(document))
    newer = index_templates.load_definitions(project)
    assert index_templates.template_drift(es_client, newer)[0].startswith(
        f"component template {component.name}: cluster has v1, the definition is v2"
    )
    assert [o.status for o in index_templates.push_definitions(es_client, newer)] == [
        "updated",
        "unchanged",
    ]
    assert index_templates.template_drift(es_client, newer) == []


# -- the lock across real CLI processes -----------------------------------------


def _cli(*args: str) -> list[str]:
    return [str(ESFM_CLI), *args]


def test_concurrent_cli_migrations_one_proceeds(es_client, model_a_dir, alias):
    args = _cli(
        "migrate",
        "--model",
        str(model_a_dir),
        "--alias",
        alias,
        "--url",
        _url(es_client),
        "--bulk-chunk-size",
        "20",
        "--json",
    )
    processes = [
        subprocess.Popen(
            args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    outputs = [process.communicate(timeout=600) for process in processes]
    codes = [process.returncode for process in processes]
    assert sorted(codes) == [0, 1], outputs
    loser_stderr = outputs[codes.index(1)][1]
    assert "another migration holds lock" in " ".join(loser_stderr.split())
    winner = json.loads(outputs[codes.index(0)][0])
    assert winner["action"] == "create"
    assert aliases.alias_target(es_client, alias) == winner["index"]
    assert lock.read_lock(es_client, f"migrate:{alias}") is None


def test_concurrent_cli_migrations_wait(es_client, model_a_dir, alias):
    args = _cli(
        "migrate",
        "--model",
        str(model_a_dir),
        "--alias",
        alias,
        "--url",
        _url(es_client),
        "--bulk-chunk-size",
        "20",
        "--lock-wait",
        "300",
        "--json",
    )
    processes = [
        subprocess.Popen(
            args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    outputs = [process.communicate(timeout=600) for process in processes]
    assert [process.returncode for process in processes] == [0, 0], outputs
    actions = sorted(json.loads(stdout)["action"] for stdout, _ in outputs)
    assert actions == ["create", "noop"]


def test_expired_lock_released_by_force(es_client, alias):
    name = f"migrate:{alias}"
    lock.acquire(es_client, name, ttl_seconds=-60)
    url = _url(es_client)
    refused = subprocess.run(
        _cli("lock", "release", "--alias", alias, "--url", url),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert refused.returncode == 1
    assert "rerun with --force" in refused.stderr
    assert lock.read_lock(es_client, name) is not None

    released = subprocess.run(
        _cli("lock", "release", "--alias", alias, "--force", "--url", url),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert released.returncode == 0, released.stderr
    assert lock.read_lock(es_client, name) is None


# -- zero downtime ----------------------------------------------------------------


class QueryLoop(threading.Thread):
    """Send cold-start queries until stopped, recording each outcome.

    Each record is ``(started_after_swap, served_index, error)``.
    """

    def __init__(self, es_client, alias: str, swapped: threading.Event) -> None:
        super().__init__(daemon=True)
        self.recommender = Recommender(
            es_client, alias, templates_dir=PACKAGED_PROJECT / "templates"
        )
        self.swapped = swapped
        self.stop = threading.Event()
        self.records: list[tuple[bool, str | None, str | None]] = []

    def run(self) -> None:
        deadline = time.monotonic() + QUERY_TIME_LIMIT_S
        while not self.stop.is_set() and len(self.records) < QUERY_LIMIT:
            if time.monotonic() > deadline:
                break
            after_swap = self.swapped.is_set()
            try:
                outcome = self.recommender.cold_start_outcome(gender="F", age="25")
                self.records.append((after_swap, outcome.index, None))
            except Exception as exc:  # every failure counts, whatever its type
                self.records.append((after_swap, None, repr(exc)))


def test_queries_during_migration(es_client, model_a, model_b, project, alias):
    from esfm.templates import load_templates, push_templates

    push_templates(es_client, load_templates(PACKAGED_PROJECT / "templates"))
    _, first = _migrate(es_client, model_a, project, alias)
    swapped = threading.Event()
    loop = QueryLoop(es_client, alias, swapped)
    loop.start()
    while not loop.records:
        time.sleep(0.05)

    _, second = _migrate(es_client, model_b, project, alias)
    swapped.set()
    while sum(1 for after, _, _ in loop.records if after) < 20:
        assert loop.is_alive(), "the query loop ended before 20 post-swap queries"
        time.sleep(0.05)
    loop.stop.set()
    loop.join()

    errors = [error for _, _, error in loop.records if error]
    assert errors == []
    before = [index for after, index, _ in loop.records if not after]
    after = [index for was_after, index, _ in loop.records if was_after]
    assert set(before) <= {first.index, second.index}
    assert set(after) == {second.index}
