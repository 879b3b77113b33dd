"""Checks that what the cluster serves is exactly what the model predicts.

Two families of checks: the index itself (document count, vector dims, a
sample of stored vectors compared bit for bit) and the rankings (the
cluster's top-k for many profiles compared with the model's own top-k
computed in process).
"""

from __future__ import annotations

import dataclasses
import logging
import random
from typing import Any

import numpy as np
from elasticsearch import Elasticsearch

from esfm.aliases import resolve_index
from esfm.artifacts import TrainedModel
from esfm.documents import iter_documents
from esfm.errors import QueryError, ValidationFailed
from esfm.query import Recommender
from esfm.server import cluster_errors, server_info

logger = logging.getLogger(__name__)

AGES = ("1", "18", "25", "35", "45", "50", "56")
GENDERS = ("M", "F")
# Two rank values closer than this (relative to their size) count as a tie:
# Elasticsearch and NumPy sum the float32 dot product in different orders.
TIE_TOLERANCE = 1e-5
VALUE_TOLERANCE = 1e-4


@dataclasses.dataclass
class Check:
    """One validation check and its outcome."""

    name: str
    ok: bool
    detail: str


@dataclasses.dataclass
class RankingMismatch:
    """A profile whose cluster ranking differs from the model's."""

    profile: dict[str, str]
    position: int
    cluster: str | None
    model: str | None
    detail: str


@dataclasses.dataclass
class ValidationReport:
    """All checks of one index against one model."""

    index: str
    model_id: str
    checks: list[Check] = dataclasses.field(default_factory=list)
    mismatches: list[RankingMismatch] = dataclasses.field(default_factory=list)
    profiles_checked: int = 0

    @property
    def ok(self) -> bool:
        return all(check.ok for check in self.checks) and not self.mismatches

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "model_id": self.model_id,
            "ok": self.ok,
            "profiles_checked": self.profiles_checked,
            "checks": [dataclasses.asdict(check) for check in self.checks],
            "mismatches": [dataclasses.asdict(item) for item in self.mismatches],
        }


def _close(a: float, b: float, tolerance: float) -> bool:
    return abs(a - b) <= tolerance * max(1.0, abs(a), abs(b))


def check_index(
    client: Elasticsearch, index: str, model: TrainedModel, *, sample: int = 50
) -> list[Check]:
    """Compare document count, dims and a sample of stored vectors with the model."""
    checks = []
    with cluster_errors(client, f"counting documents in {index}"):
        client.indices.refresh(index=index)
        count = int(client.count(index=index)["count"])
        mapping = client.indices.get_mapping(index=index)[index]["mappings"]
    expected = len(model.features)
    checks.append(
        Check(
            "document count",
            count == expected,
            f"{count} in index, {expected} in model",
        )
    )

    properties = mapping.get("properties", {})
    for field, dims in (("embedding", model.k), ("rank_vector", model.k + 1)):
        actual = properties.get(field, {}).get("dims")
        checks.append(
            Check(
                f"{field} dims", actual == dims, f"{actual} in mapping, {dims} expected"
            )
        )

    expected_docs = list(iter_documents(model))
    picked = random.Random(0).sample(expected_docs, min(sample, len(expected_docs)))
    source: Any = True
    if server_info(client).excludes_source_vectors:
        source = {"exclude_vectors": False}
    with cluster_errors(client, f"reading sample documents from {index}"):
        response = client.search(
            index=index,
            query={"ids": {"values": [doc["_id"] for doc in picked]}},
            source=source,
            size=len(picked),
        )
    stored = {hit["_id"]: hit["_source"] for hit in response["hits"]["hits"]}
    differing = []
    for doc in picked:
        got = stored.get(doc["_id"])
        if got is None:
            differing.append(f"{doc['_id']} missing")
            continue
        stored_rank = np.asarray(got.get("rank_vector"), dtype=np.float32)
        if not np.array_equal(stored_rank, np.asarray(doc["rank_vector"], np.float32)):
            differing.append(f"{doc['_id']}.rank_vector")
        # Cosine fields are normalized at index time and rescaled on read, so
        # embedding may differ from the model by float32 rounding only.
        stored_embedding = np.asarray(got.get("embedding"), dtype=np.float32)
        if stored_embedding.shape != (model.k,) or not np.allclose(
            stored_embedding, doc["embedding"], rtol=1e-5, atol=1e-7
        ):
            differing.append(f"{doc['_id']}.embedding")
        if np.float32(got.get("bias")) != np.float32(doc["bias"]):
            differing.append(f"{doc['_id']}.bias")
    checks.append(
        Check(
            "stored vectors",
            not differing,
            f"{len(picked) - len(set(d.split('.')[0] for d in differing))} of "
            f"{len(picked)} sampled documents equal the model"
            + (f"; differing: {', '.join(differing[:5])}" if differing else ""),
        )
    )
    return checks


def validation_profiles(
    model: TrainedModel, *, occupations: int = 3, known_users: int = 10, seed: int = 0
) -> list[dict[str, str]]:
    """List every age x gender pair, with a few occupations, and some known users."""
    rng = random.Random(seed)
    all_occupations = sorted(
        {
            value
            for feature_type, value in model.features
            if feature_type == "occupation"
        },
        key=lambda value: (len(value), value),
    )
    profiles: list[dict[str, str]] = []
    for age in AGES:
        for gender in GENDERS:
            profiles.append({"age": age, "gender": gender})
            for occupation in rng.sample(
                all_occupations, min(occupations, len(all_occupations))
            ):
                profiles.append(
                    {"age": age, "gender": gender, "occupation": occupation}
                )
    users = sorted(model.users)
    for user in rng.sample(users, min(known_users, len(users))):
        profiles.append(
            {"user": user, **{key: str(v) for key, v in model.users[user].items()}}
        )
    return profiles


def compare_ranking(
    model: TrainedModel,
    profile: dict[str, str],
    cluster: list[tuple[str, float]],
    k: int,
) -> RankingMismatch | None:
    """Compare one cluster ranking with the model's; near-ties may swap."""
    expected = model.rank(profile, k)
    side = model.movie_side()
    rows = {movie_id: i for i, movie_id in enumerate(side.movie_ids)}
    v_u = model.profile_vector(profile)

    def exact(movie_id: str) -> float:
        i = rows[movie_id]
        return float(np.float32(side.bias[i]) + np.dot(side.vectors[i], v_u))

    if len(cluster) != len(expected):
        return RankingMismatch(
            profile,
            len(cluster),
            None,
            None,
            f"cluster returned {len(cluster)} movies, model {len(expected)}",
        )
    for position, ((got, got_value), (want, want_value)) in enumerate(
        zip(cluster, expected, strict=True)
    ):
        if got not in rows:
            return RankingMismatch(profile, position, got, want, "not a model movie")
        if not _close(got_value, exact(got), VALUE_TOLERANCE):
            return RankingMismatch(
                profile,
                position,
                got,
                want,
                f"rank value {got_value:.6f} from the cluster, {exact(got):.6f} "
                "from the model",
            )
        if got != want and not _close(exact(got), want_value, TIE_TOLERANCE):
            return RankingMismatch(
                profile,
                position,
                got,
                want,
                f"cluster ranks {got} ({exact(got):.6f}), model ranks {want} "
                f"({want_value:.6f})",
            )
    return None


def check_rankings(
    client: Elasticsearch,
    index: str,
    model: TrainedModel,
    *,
    k: int = 10,
    profiles: list[dict[str, str]] | None = None,
) -> tuple[list[RankingMismatch], int]:
    """Run each profile against the cluster and the model; return mismatches."""
    recommender = Recommender(client, index, require_pushed=False)
    profiles = profiles if profiles is not None else validation_profiles(model)
    mismatches = []
    for profile in profiles:
        try:
            outcome = recommender.profile_outcome(profile, k=k)
        except QueryError as exc:
            # A feature of the model that the index lacks is a mismatch to
            # report, not a reason to stop checking the other profiles.
            mismatches.append(RankingMismatch(profile, 0, None, None, exc.message))
            continue
        cluster = [(item.movie_id, item.rank_value) for item in outcome.recommendations]
        mismatch = compare_ranking(model, profile, cluster, k)
        if mismatch is not None:
            mismatches.append(mismatch)
    return mismatches, len(profiles)


def validate_index(
    client: Elasticsearch, index: str, model: TrainedModel, *, k: int = 10
) -> ValidationReport:
    """Run every check of ``index`` (or an alias) against ``model``."""
    index = resolve_index(client, index)
    report = ValidationReport(index=index, model_id=model.model_id)
    report.checks.extend(check_index(client, index, model))
    report.mismatches, report.profiles_checked = check_rankings(
        client, index, model, k=k
    )
    report.checks.append(
        Check(
            "rankings",
            not report.mismatches,
            f"{report.profiles_checked - len(report.mismatches)} of "
            f"{report.profiles_checked} profiles agree on the top {k}",
        )
    )
    logger.info(
        "validation of %s against %s: %s",
        index,
        model.model_id,
        "passed" if report.ok else "FAILED",
    )
    return report


def require_valid(
    client: Elasticsearch, index: str, model: TrainedModel
) -> ValidationReport:
    """Validate, raising ``ValidationFailed`` unless every check passed."""
    report = validate_index(client, index, model)
    if not report.ok:
        failed = [check.name for check in report.checks if not check.ok]
        raise ValidationFailed(
            f"index {index} disagrees with model {model.model_id}: {', '.join(failed)}",
            mismatches=report.mismatches,
            hint="the alias was not moved; inspect with esfm validate --index",
        )
    return report
