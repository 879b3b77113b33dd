"""Cold-start serving latency and throughput against a live Elasticsearch node.

Measures top-k cold-start queries over every movie of a model, for:

* ``one_round_trip``: esfm's ``Recommender`` with cached metadata vectors, one
  kNN search on the exact (``flat``) ``rank_vector`` per query;
* ``two_round_trip``: the classic flow, an ``mget`` of the metadata documents,
  the sum in the client, then the same kNN search;
* ``hnsw`` and ``int8_hnsw``: the one-round-trip path on copies of the index
  whose ``rank_vector`` uses those ``index_options`` (built as ``serve-*``
  indices, force-merged to one segment), with recall@k against exact;
* ``numpy``: the same ranking in process, ``b_M + V_M v_U`` from
  ``TrainedModel.movie_side()``, the floor without any network.

Each run has 1 or more client threads, each with its own client and
``Recommender``, and stops after ``--queries`` queries or ``--seconds``, which
comes first. Client and server share the same machine, so their CPU use
competes. Usage::

    .venv/bin/python bench/serve.py --model /path/to/model --url http://127.0.0.1:9270
"""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import json
import logging
import os
import platform
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

# OpenBLAS's own thread pool would oversubscribe the CPUs when several client
# threads run, so each client thread uses one BLAS thread.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402

from esfm import indexing  # noqa: E402
from esfm.artifacts import TrainedModel  # noqa: E402
from esfm.config import create_client, resolve_settings  # noqa: E402
from esfm.documents import count_documents, document_id, iter_documents  # noqa: E402
from esfm.mappings import latest_version  # noqa: E402
from esfm.project import PACKAGED_PROJECT  # noqa: E402
from esfm.query import Recommender  # noqa: E402
from esfm.server import cluster_errors, server_info  # noqa: E402
from esfm.templates import load_templates  # noqa: E402
from esfm.validate import compare_ranking  # noqa: E402

logger = logging.getLogger("bench.serve")

RESULTS_DIR = Path(__file__).resolve().parent / "results"
APPROXIMATE_OPTIONS = ("hnsw", "int8_hnsw")
AGES = ("1", "18", "25", "35", "45", "50", "56")
GENDERS = ("M", "F")

# A query function takes a cold-start profile and returns [(movie_id, value)].
QueryFunction = Callable[[dict[str, str]], list[tuple[str, float]]]


def cold_start_profiles(model: TrainedModel) -> list[dict[str, str]]:
    """Return every gender x age x occupation profile in the model's vocabulary."""
    known = set(model.features)
    occupations = sorted(
        (value for kind, value in model.features if kind == "occupation"), key=int
    )
    profiles = []
    for gender, age, occupation in itertools.product(GENDERS, AGES, occupations):
        profile = {"gender": gender, "age": age, "occupation": occupation}
        if all((kind, value) in known for kind, value in profile.items()):
            profiles.append(profile)
    return profiles


# -- query paths -----------------------------------------------------------


def one_round_trip(url: str, index: str, k: int) -> QueryFunction:
    recommender = Recommender(_client(url), index)

    def query(profile: dict[str, str]) -> list[tuple[str, float]]:
        outcome = recommender.profile_outcome(profile, k=k)
        return [(item.movie_id, item.rank_value) for item in outcome.recommendations]

    return query


def two_round_trip(url: str, index: str, k: int) -> QueryFunction:
    """Fetch the metadata documents on every query, as a cache-less client does."""
    client = _client(url)
    template = load_templates(PACKAGED_PROJECT / "templates")["cold_start"]
    params = {"_source_includes": "rank_vector"}
    if server_info(client).excludes_source_vectors:
        # elasticsearch-py 9.5 has no argument for this query parameter.
        params["_source_exclude_vectors"] = "false"
    headers = {"accept": "application/json", "content-type": "application/json"}

    def query(profile: dict[str, str]) -> list[tuple[str, float]]:
        ids = [document_id(kind, value) for kind, value in profile.items()]
        response = client.perform_request(
            "POST", f"/{index}/_mget", params=params, headers=headers, body={"ids": ids}
        )
        docs = response.body["docs"]
        total = np.zeros(len(docs[0]["_source"]["rank_vector"]) - 1, np.float32)
        for doc in docs:
            total += np.asarray(doc["_source"]["rank_vector"][:-1], np.float32)
        body = template.render(
            {"query_vector": [float(x) for x in total] + [1.0], "k": k}
        )
        hits = client.search(index=index, body=body)["hits"]["hits"]
        return [(hit["_source"]["value"], _dot(hit["_score"])) for hit in hits]

    return query


def numpy_floor(model: TrainedModel, k: int) -> QueryFunction:
    side = model.movie_side()

    def query(profile: dict[str, str]) -> list[tuple[str, float]]:
        scores = side.bias + side.vectors @ model.profile_vector(profile)
        top = np.argpartition(-scores, k)[:k]
        top = top[np.lexsort((top, -scores[top]))]
        return [(side.movie_ids[i], float(scores[i])) for i in top]

    return query


def _dot(score: float) -> float:
    from esfm.query import rank_value_from_score

    return rank_value_from_score(float(score))


def _client(url: str):
    return create_client(resolve_settings(url=url))


# -- approximate index copies ----------------------------------------------


def build_copy(client, model: TrainedModel, option: str, rebuild: bool) -> str:
    """Create ``serve-<option>-<model_id>`` with ``rank_vector`` on ``option``.

    An existing complete copy of the same model is reused unless ``rebuild``.
    """
    index = f"serve-{option.replace('_', '-')}-{model.model_id}"
    exists = client.indices.exists(index=index)
    if exists and not rebuild:
        meta = indexing.read_meta(client, index)
        if meta.get("state") == indexing.STATE_COMPLETE:
            logger.info("reusing %s", index)
            return index
    if exists:
        client.indices.delete(index=index)
    mapping = latest_version(PACKAGED_PROJECT / "mappings", "recsys")
    mappings = mapping.render(model.k)
    mappings["properties"]["rank_vector"]["index_options"] = {"type": option}
    meta = {
        "model_id": model.model_id,
        "mapping_version": mapping.version,
        "bench": f"rank_vector {option}",
    }
    indexing.create_index(
        client, index, mappings=mappings, settings=dict(mapping.settings), meta=meta
    )
    indexing.bulk_load(
        client, index, iter_documents(model), total=count_documents(model)
    )
    indexing.finish_index(client, index, meta, refresh_interval="1s")
    with cluster_errors(client, f"force-merging {index}"):
        client.indices.forcemerge(index=index, max_num_segments=1)
    logger.info("built %s", index)
    return index


def recall_at_k(
    query: QueryFunction, exact: QueryFunction, profiles: list[dict[str, str]]
) -> float:
    """Return the mean share of the exact top-k that ``query`` also returns."""
    shares = []
    for profile in profiles:
        want = {movie for movie, _ in exact(profile)}
        got = {movie for movie, _ in query(profile)}
        shares.append(len(want & got) / len(want))
    return statistics.fmean(shares)


def agreement(
    model: TrainedModel, query: QueryFunction, profiles: list[dict[str, str]], k: int
) -> tuple[int, int]:
    """Count profiles whose ranking equals the model's, and whose ids do.

    The first count uses ``compare_ranking``, which also requires each rank
    value to match the model's within 1e-4. The second compares only the
    ordered movie ids, the useful test for quantized indices whose scores are
    approximate by design.
    """
    exact = 0
    same_ids = 0
    for profile in profiles:
        ranking = query(profile)
        exact += compare_ranking(model, profile, ranking, k) is None
        want = [movie for movie, _ in model.rank(profile, k)]
        same_ids += [movie for movie, _ in ranking] == want
    return exact, same_ids


# -- load ------------------------------------------------------------------


def run_load(
    make_query: Callable[[], QueryFunction],
    profiles: list[dict[str, str]],
    *,
    clients: int,
    queries: int,
    seconds: float,
    warmup: int,
) -> dict[str, Any]:
    """Run ``queries`` queries over ``clients`` threads, stopping after ``seconds``.

    Each thread builds its own query function, warms up on ``warmup`` queries
    (which fill the metadata cache), then waits for the others before timing.
    """
    barrier = threading.Barrier(clients + 1)
    latencies: list[list[float]] = [[] for _ in range(clients)]
    errors: list[BaseException] = []
    per_client = max(1, queries // clients)

    def worker(number: int) -> None:
        try:
            query = make_query()
            for i in range(warmup):
                query(profiles[i % len(profiles)])
        except BaseException as exc:
            errors.append(exc)
            barrier.abort()
            return
        barrier.wait()
        own = latencies[number]
        stop_at = time.perf_counter() + seconds
        for i in range(per_client):
            profile = profiles[(number * 7919 + i) % len(profiles)]
            start = time.perf_counter()
            query(profile)
            own.append(time.perf_counter() - start)
            if start > stop_at:
                break

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(clients)]
    for thread in threads:
        thread.start()
    try:
        barrier.wait()
    except threading.BrokenBarrierError:
        for thread in threads:
            thread.join()
        raise errors[0] from None
    started = time.perf_counter()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    if errors:
        raise errors[0]
    load = os.getloadavg()[0]
    merged = np.array([value for own in latencies for value in own]) * 1000.0
    return {
        "clients": clients,
        "queries": int(merged.size),
        "wall_s": wall,
        "qps": merged.size / wall,
        "p50_ms": float(np.percentile(merged, 50)),
        "p99_ms": float(np.percentile(merged, 99)),
        "mean_ms": float(merged.mean()),
        "load_1min_after": load,
    }


def paired_rounds(
    paths: dict[str, tuple[Callable[[], QueryFunction], int]],
    profiles: list[dict[str, str]],
    clients: int,
    rounds: int,
    *,
    queries: int,
    seconds: float,
    warmup: int,
) -> dict[str, Any]:
    """Run the one- and two-round-trip paths in alternating short rounds.

    Load from other processes changes within minutes on a shared machine, so
    a ratio of two runs minutes apart measures that change too. Alternating
    the paths exposes both to the same load, and the median over the rounds
    is the figure to compare with the goal.
    """
    ratios = []
    for _ in range(rounds):
        qps = {}
        for name in ("one_round_trip", "two_round_trip"):
            result = run_load(
                paths[name][0],
                profiles,
                clients=clients,
                queries=max(1, queries // rounds),
                seconds=seconds / rounds,
                warmup=warmup,
            )
            qps[name] = result["qps"]
        ratios.append(qps["one_round_trip"] / qps["two_round_trip"])
    return {
        "ratios": ratios,
        "median": statistics.median(ratios),
        "min": min(ratios),
        "max": max(ratios),
    }


# -- report ----------------------------------------------------------------


def hardware() -> dict[str, Any]:
    model_name = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model_name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpus_available": len(os.sched_getaffinity(0)),
        "cpu": model_name,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "note": "client and server share these CPUs",
        "load_average_1_5_15min": list(os.getloadavg()),
    }


def print_table(rows: list[dict[str, Any]]) -> None:
    header = (
        "| path | clients | queries | p50 ms | p99 ms | queries/s | round trips "
        "| recall@k | exact agreement | same ids | load |"
    )
    print(header)
    print("|---" * 11 + "|")
    for row in rows:
        recall = "" if row.get("recall") is None else f"{row['recall']:.4f}"
        agree = row.get("agreement") or ""
        print(
            f"| {row['path']} | {row['clients']} | {row['queries']} "
            f"| {row['p50_ms']:.2f} | {row['p99_ms']:.2f} | {row['qps']:.0f} "
            f"| {row['round_trips']} | {recall} | {agree} | {row['same_ids']} "
            f"| {row['load_1min_after']:.1f} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:9270", help="Node URL.")
    parser.add_argument("--model", required=True, help="Model directory.")
    parser.add_argument("--alias", default="recsys", help="Alias of the flat index.")
    parser.add_argument("-k", type=int, default=10, help="Movies per query.")
    parser.add_argument(
        "--clients", default="1,4", help="Comma-separated client thread counts."
    )
    parser.add_argument(
        "--queries", type=int, default=2000, help="Timed queries per run, at most."
    )
    parser.add_argument(
        "--seconds", type=float, default=20.0, help="Time limit per run in seconds."
    )
    parser.add_argument("--warmup", type=int, default=30, help="Queries per thread.")
    parser.add_argument(
        "--rounds",
        type=int,
        default=5,
        help="Alternating one/two round-trip runs for the paired ratio; 0 skips.",
    )
    parser.add_argument(
        "--rebuild", action="store_true", help="Rebuild the serve-* index copies."
    )
    parser.add_argument(
        "--out", default=str(RESULTS_DIR), help="Folder for the JSON results."
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("elastic_transport").setLevel(logging.WARNING)

    model = TrainedModel.load(args.model)
    profiles = cold_start_profiles(model)
    client = _client(args.url)
    flat_index = Recommender(client, args.alias).index
    copies = {
        option: build_copy(client, model, option, args.rebuild)
        for option in APPROXIMATE_OPTIONS
    }
    k = args.k
    paths: dict[str, tuple[Callable[[], QueryFunction], int]] = {
        "one_round_trip": (lambda: one_round_trip(args.url, args.alias, k), 1),
        "two_round_trip": (lambda: two_round_trip(args.url, args.alias, k), 2),
        **{
            option: ((lambda index=index: one_round_trip(args.url, index, k)), 1)
            for option, index in copies.items()
        },
        "numpy": (lambda: numpy_floor(model, k), 0),
    }

    exact = numpy_floor(model, k)
    quality: dict[str, dict[str, Any]] = {}
    for name, (make_query, _) in paths.items():
        query = make_query()
        exact_count, same_ids = agreement(model, query, profiles, k)
        quality[name] = {
            "recall": recall_at_k(query, exact, profiles),
            "agreement": f"{exact_count}/{len(profiles)}",
            "same_ids": f"{same_ids}/{len(profiles)}",
        }
        logger.info("%s: %s", name, quality[name])

    rows = []
    for clients in [int(part) for part in args.clients.split(",")]:
        for name, (make_query, trips) in paths.items():
            logger.info("running %s with %d client(s)", name, clients)
            result = run_load(
                make_query,
                profiles,
                clients=clients,
                queries=args.queries,
                seconds=args.seconds,
                warmup=args.warmup,
            )
            rows.append({"path": name, "round_trips": trips, **result, **quality[name]})

    print(
        f"\ncold-start top-{k} over {len(model.movie_side().movie_ids)} movies, "
        f"model {model.model_id}, flat index {flat_index}, {len(profiles)} profiles; "
        "client and server share "
        f"{hardware()['cpus_available']} CPUs on one machine. The load column is "
        "the 1-minute load average after each run; above the CPU count, other "
        "processes competed for the CPUs.\n"
    )
    print_table(rows)
    ratios = {}
    for clients in sorted({row["clients"] for row in rows}):
        by_path = {row["path"]: row for row in rows if row["clients"] == clients}
        ratio = by_path["one_round_trip"]["qps"] / by_path["two_round_trip"]["qps"]
        floor = by_path["numpy"]["qps"] / by_path["one_round_trip"]["qps"]
        ratios[clients] = {"one_vs_two_round_trips": ratio, "numpy_vs_one": floor}
        print(
            f"\n{clients} client(s): one-round-trip / two-round-trip throughput "
            f"{ratio:.2f}x; numpy / one-round-trip {floor:.0f}x"
        )

    paired = {}
    if args.rounds > 0:
        for clients in sorted({row["clients"] for row in rows}):
            paired[clients] = paired_rounds(
                paths,
                profiles,
                clients,
                args.rounds,
                queries=args.queries,
                seconds=args.seconds,
                warmup=args.warmup,
            )
            summary = paired[clients]
            print(
                f"\n{clients} client(s), {args.rounds} alternating rounds: "
                f"one-round-trip / two-round-trip throughput median "
                f"{summary['median']:.2f}x (from {summary['min']:.2f}x to "
                f"{summary['max']:.2f}x)"
            )

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    path = out / f"serve-{stamp}.json"
    payload = {
        "command": "bench/serve.py "
        + " ".join(
            f"--{key.replace('_', '-')} {value}"
            for key, value in vars(args).items()
            if value not in (False, None)
        ),
        "url": args.url,
        "model_id": model.model_id,
        "flat_index": flat_index,
        "approximate_indices": copies,
        "profiles": len(profiles),
        "k": k,
        "hardware": hardware(),
        "server_version": server_info(client).version_string,
        "rows": rows,
        "ratios": ratios,
        "paired_rounds": paired,
    }
    path.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
