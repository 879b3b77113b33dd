"""Index lifecycle scenarios under query load, against a live Elasticsearch node.

Each scenario runs while a background thread sends cold-start queries through
``esfm.query.Recommender`` and records, per query, whether it failed and which
index served it. A query is *stale* when it started after the scenario's alias
change returned but was served by another index than the one the alias then
pointed at. Scenarios, in order, on one fresh alias:

1. ``migrate new model``: build, check, validate and swap to a second model;
2. ``in-place mapping v2``: a mapping version that only adds a field;
3. ``rollback``: ``esfm rollback`` (the real CLI) back to the first model;
4. ``killed migrate + rerun``: ``esfm migrate`` killed with SIGKILL during the
   bulk load, then run again to completion;
5. ``racing swaps``: two threads swap the alias at the same moment.

Usage::

    .venv/bin/python bench/lifecycle_scenarios.py --url http://127.0.0.1:9270 \\
        --data "$ESFM_TEST_DATA/ml-100k"

Everything the run creates (indices, history entries stay) is deleted at the
end. Models are trained with k=16 for 2 epochs, about 10 s each.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from esfm import aliases
from esfm.artifacts import TrainedModel
from esfm.config import create_client, resolve_settings
from esfm.data import load_movielens
from esfm.mappings import latest_version
from esfm.migrate import apply_migration, index_name, plan_migration
from esfm.project import PACKAGED_PROJECT
from esfm.query import Recommender
from esfm.templates import load_templates, push_templates
from esfm.train import TrainConfig, save_model, train

ESFM_CLI = Path(sys.executable).with_name("esfm")
POST_CHANGE_QUERIES = 50
MAX_QUERIES = 20000
MAX_SECONDS = 600


class QueryLoop(threading.Thread):
    """Send cold-start queries until stopped; record ``(after, index, error)``."""

    def __init__(self, client, alias: str) -> None:
        super().__init__(daemon=True)
        self.recommender = Recommender(
            client, alias, templates_dir=PACKAGED_PROJECT / "templates"
        )
        self.changed = threading.Event()
        self.halt = threading.Event()
        self.records: list[tuple[bool, str | None, str | None]] = []

    def run(self) -> None:
        deadline = time.monotonic() + MAX_SECONDS
        while not self.halt.is_set() and len(self.records) < MAX_QUERIES:
            if time.monotonic() > deadline:
                break
            after = self.changed.is_set()
            try:
                outcome = self.recommender.cold_start_outcome(gender="M", age="35")
                self.records.append((after, outcome.index, None))
            except Exception as exc:  # every failure counts, whatever its type
                self.records.append((after, None, repr(exc)))

    def finish(self) -> None:
        """Wait for enough queries after the change, then stop the thread."""
        self.changed.set()
        while sum(1 for after, _, _ in self.records if after) < POST_CHANGE_QUERIES:
            if not self.is_alive():
                break
            time.sleep(0.02)
        self.halt.set()
        self.join()


def run_scenario(client, alias: str, name: str, action: Callable[[], str]) -> dict:
    """Run ``action`` under query load; it returns the outcome text."""
    loop = QueryLoop(client, alias)
    loop.start()
    while not loop.records and loop.is_alive():
        time.sleep(0.02)
    try:
        outcome = action()
    except Exception as exc:  # reported in the table, not raised
        outcome = f"FAILED: {exc!r}"
    loop.finish()
    live = aliases.alias_target(client, alias)
    failed = [error for _, _, error in loop.records if error]
    stale = [
        index
        for after, index, error in loop.records
        if after and not error and index != live
    ]
    return {
        "scenario": name,
        "queries": len(loop.records),
        "failed": len(failed),
        "stale": len(stale),
        "outcome": outcome,
        "first_error": failed[0] if failed else None,
    }


def _train(dataset, seed: int, out: Path) -> Path:
    config = TrainConfig(k=16, epochs=2, batch_size=2048, lr=5e-3, seed=seed)
    save_model(train(dataset, config), out)
    return out


def _migrate(client, model_dir: Path, project: Path, alias: str) -> str:
    model = TrainedModel.load(model_dir)
    mapping = latest_version(project / "mappings", "recsys")
    plan = plan_migration(client, model, mapping, alias=alias)
    result = apply_migration(client, plan, model)
    return f"{plan.mode}: {result.action}, alias on {result.index}"


def _cli(url: str, *args: str) -> list[str]:
    return [str(ESFM_CLI), *args, "--url", url]


def _killed_then_rerun(client, url: str, model_dir: Path, alias: str) -> str:
    model = TrainedModel.load(model_dir)
    mapping = latest_version(PACKAGED_PROJECT / "mappings", "recsys")
    target = index_name(alias, mapping.version, model.model_id)
    before = aliases.alias_target(client, alias)
    args = _cli(url, "migrate", "--model", str(model_dir), "--alias", alias)
    process = subprocess.Popen(
        [*args, "--bulk-chunk-size", "10"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    while process.poll() is None:
        if client.indices.exists(index=target):
            stats = client.indices.stats(index=target, metric="indexing")["indices"]
            done = stats.get(target, {}).get("primaries", {}).get("indexing", {})
            if done.get("index_total", 0) >= 500:
                process.send_signal(signal.SIGKILL)
                break
        time.sleep(0.02)
    process.wait()
    kept = aliases.alias_target(client, alias) == before
    rerun = subprocess.run([*args, "--json"], capture_output=True, text=True)
    if rerun.returncode != 0:
        return f"rerun FAILED: {rerun.stderr.strip()[:200]}"
    action = json.loads(rerun.stdout)["action"]
    return (
        f"killed (rc {process.returncode}); alias kept on old index: {kept}; "
        f"rerun: {action}"
    )


def _race(client, alias: str) -> str:
    current = aliases.alias_target(client, alias)
    contenders = [f"{alias}-race-{side}" for side in ("a", "b")]
    for name in contenders:
        client.indices.create(index=name)
    barrier = threading.Barrier(2)
    errors: list[str] = []

    def swap(target: str) -> None:
        barrier.wait()
        try:
            aliases.swap_alias(client, alias, target, expected=current)
        except Exception as exc:  # counted below
            errors.append(type(exc).__name__)

    threads = [threading.Thread(target=swap, args=(name,)) for name in contenders]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    winner = aliases.alias_target(client, alias)
    # Point the alias back at the model index before the query loop runs
    # against one of the empty race indices.
    aliases.swap_alias(client, alias, current, expected=winner)
    return f"{2 - len(errors)} won, {len(errors)} rejected ({', '.join(errors)})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default=os.environ.get("ESFM_URL"), required=False)
    parser.add_argument(
        "--data",
        type=Path,
        required=True,
        help="MovieLens 100K folder (ratings, users and movies files).",
    )
    options = parser.parse_args()
    if not options.url:
        parser.error("--url or ESFM_URL is required")

    client = create_client(resolve_settings(url=options.url))
    alias = f"bench-lc-{uuid.uuid4().hex[:8]}"
    work = Path(tempfile.mkdtemp(prefix="esfm-bench-"))
    project = work / "project"
    shutil.copytree(PACKAGED_PROJECT / "mappings", project / "mappings")
    dataset = load_movielens(options.data)
    models = [_train(dataset, seed, work / f"model-{seed}") for seed in (1, 2, 3)]
    push_templates(client, load_templates(PACKAGED_PROJECT / "templates"))
    rows = []
    try:
        _migrate(client, models[0], project, alias)
        rows.append(
            run_scenario(
                client,
                alias,
                "migrate new model",
                lambda: _migrate(client, models[1], project, alias),
            )
        )

        v1 = json.loads((project / "mappings/recsys/v1.json").read_text())
        v1["version"] = 2
        v1["mappings"]["properties"]["popularity"] = {"type": "float"}
        (project / "mappings/recsys/v2.json").write_text(json.dumps(v1))
        rows.append(
            run_scenario(
                client,
                alias,
                "in-place mapping v2",
                lambda: _migrate(client, models[1], project, alias),
            )
        )

        def rollback() -> str:
            done = subprocess.run(
                _cli(options.url, "rollback", "--alias", alias, "--json"),
                capture_output=True,
                text=True,
            )
            if done.returncode:
                return f"FAILED: {done.stderr.strip()[:200]}"
            return f"rolled back to {json.loads(done.stdout)['index']}"

        rows.append(run_scenario(client, alias, "rollback", rollback))
        rows.append(
            run_scenario(
                client,
                alias,
                "killed migrate + rerun",
                lambda: _killed_then_rerun(client, options.url, models[2], alias),
            )
        )
        rows.append(
            run_scenario(client, alias, "racing swaps", lambda: _race(client, alias))
        )
    finally:
        # Wildcard deletes are off by default (action.destructive_requires_name).
        created = list(client.indices.get(index=f"{alias}-*", allow_no_indices=True))
        if created:
            client.indices.delete(index=",".join(created))
        shutil.rmtree(work, ignore_errors=True)

    print("| scenario | queries sent | failed | stale | outcome |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['scenario']} | {row['queries']} | {row['failed']} | "
            f"{row['stale']} | {row['outcome']} |"
        )
    for row in rows:
        if row["first_error"]:
            print(f"{row['scenario']}: first error {row['first_error']}")


if __name__ == "__main__":
    main()
