"""The query API: cold-start, known-user and similar-item recommendations.

``Recommender`` caches the metadata vectors it fetched, keyed on the concrete
index behind the alias. Every search response names the index each hit came
from. When that differs from the cached one, the alias was swapped, so the
cache is dropped and the query runs again against the new index. In the
steady state a cold-start query is one round trip.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
from elasticsearch import Elasticsearch

from esfm import aliases
from esfm.data import normalize_genre, normalize_profile
from esfm.documents import MOVIE, USER_SIDE_TYPES, document_id
from esfm.errors import QueryError
from esfm.project import discover_project
from esfm.server import cluster_errors, server_info
from esfm.templates import (
    SearchTemplate,
    load_templates,
    registry_entry,
    search_with_template,
)

logger = logging.getLogger(__name__)

MAX_K = 10_000
METHODS = ("knn", "script_score")
# Templates that rank by b_M + <v_U, v_M> on rank_vector, so script_score can
# stand in for them.
RANKING_TEMPLATES = ("cold_start", "known_user")


@dataclasses.dataclass(frozen=True)
class Recommendation:
    """One ranked movie.

    ``rank_value`` is the FM rank value ``b_M + <v_U, v_M>`` recovered from the
    search score; ``score`` is the score as Elasticsearch returned it.
    """

    movie_id: str
    title: str | None
    genres: tuple[str, ...]
    score: float
    rank_value: float

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "genres": list(self.genres)}


def score_from_rank_value(rank_value: float) -> float:
    """Apply the ``max_inner_product`` score transform of Elasticsearch.

    Elasticsearch 9 scores a dot product ``d`` as ``d + 1`` when ``d >= 0`` and
    ``1 / (1 - d)`` otherwise, so that scores stay positive and keep the order
    of ``d``.
    """
    if rank_value >= 0.0:
        return rank_value + 1.0
    return 1.0 / (1.0 - rank_value)


def rank_value_from_score(score: float) -> float:
    """Recover the dot product from a score, the inverse of ``score_from_rank_value``.

    Raises:
        QueryError: ``score`` is not positive, so no dot product maps to it.
    """
    if not score > 0.0:
        raise QueryError(
            f"invalid max_inner_product score {score!r}: scores are positive",
            hint="check that rank_vector uses max_inner_product similarity",
        )
    if score >= 1.0:
        return score - 1.0
    return 1.0 - 1.0 / score


def cosine_from_score(score: float) -> float:
    """Invert the ``cosine`` score transform ``(1 + cos) / 2`` of Elasticsearch."""
    return 2.0 * score - 1.0


def check_k(k: int) -> int:
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_K:
        raise QueryError(
            f"invalid k {k!r}: it must be an integer from 1 to {MAX_K}",
            hint="pass -k 10, for example",
        )
    return k


@dataclasses.dataclass
class QueryOutcome:
    """Recommendations plus how they were obtained.

    ``path`` is ``"stored"``, ``"local"`` or ``"script_score"``. ``template`` is
    the stored script id of the search template, or None for ``script_score``.
    ``query_movie`` is the (movie id, title) that ``similar`` matched its title to.
    """

    recommendations: list[Recommendation]
    index: str
    path: str
    round_trips: int
    template: str | None = None
    query_movie: tuple[str, str | None] | None = None


class Recommender:
    """Recommendations served from the index behind ``alias``.

    Args:
        client: an Elasticsearch client.
        alias: alias or index name that contains the model documents.
        templates_dir: folder of the search templates; the project's by default.
        method: ``"knn"`` (search templates on ``rank_vector``) or
            ``"script_score"`` (painless ``dotProduct``, needs ``lang-painless``).
        require_pushed: use only templates pushed to the cluster. When False
            (as validation before a first push does), the project's template
            files are rendered locally.
    """

    def __init__(
        self,
        client: Elasticsearch,
        alias: str = "recsys",
        *,
        templates_dir: Path | None = None,
        method: str = "knn",
        require_pushed: bool = True,
    ) -> None:
        if method not in METHODS:
            raise QueryError(
                f"unknown ranking method {method!r}", hint=f"use one of {METHODS}"
            )
        aliases.check_single_name(alias)
        self.client = client
        self.alias = alias
        self.method = method
        self.require_pushed = require_pushed
        self._templates_dir = templates_dir or discover_project().templates_dir
        self._templates: dict[str, SearchTemplate] | None = None
        self._checked_templates: set[str] = set()
        self._index: str | None = None
        self._vectors: dict[str, np.ndarray] = {}
        self._sources: dict[str, dict[str, Any]] = {}

    # -- cache -------------------------------------------------------------

    @property
    def index(self) -> str:
        """The concrete index the cache belongs to, resolved on first use."""
        if self._index is None:
            self._index = aliases.resolve_index(self.client, self.alias)
        return self._index

    def invalidate(self) -> None:
        """Drop cached vectors and the resolved index, as after an alias swap."""
        self._index = None
        self._vectors.clear()
        self._sources.clear()

    def _fetch(self, ids: list[str]) -> int:
        """Fetch missing documents into the cache; return round trips used."""
        missing = [doc_id for doc_id in ids if doc_id not in self._vectors]
        if not missing:
            return 0
        source: Any = True
        if server_info(self.client).excludes_source_vectors:
            source = {"exclude_vectors": False}
        with cluster_errors(self.client, f"fetching metadata from {self.alias}"):
            response = self.client.search(
                index=self.alias,
                query={"ids": {"values": missing}},
                source=source,
                size=len(missing),
            )
        for hit in response["hits"]["hits"]:
            self._index = hit["_index"]
            # rank_vector is [v_i, w_i] and stored as given, while the cosine
            # field embedding comes back normalized and rescaled, off by an ulp.
            rank_vector = hit["_source"].get("rank_vector")
            if rank_vector is None:
                raise QueryError(
                    f"document {hit['_id']} in {hit['_index']} has no rank_vector",
                    hint="rebuild the index with esfm migrate",
                )
            self._vectors[hit["_id"]] = np.asarray(rank_vector[:-1], dtype=np.float32)
            self._sources[hit["_id"]] = hit["_source"]
        not_found = [doc_id for doc_id in missing if doc_id not in self._vectors]
        if not_found:
            feature_type, _, value = not_found[0].partition(":")
            raise QueryError(
                f"unknown {feature_type} {value!r}: no document {not_found[0]!r} in "
                f"{self.alias}",
                hint="check the value, or that the alias holds the model you trained",
            )
        return 1

    def profile_vector(self, profile: dict[str, str]) -> tuple[np.ndarray, int]:
        """Return ``v_U``, the sum of the profile's embeddings, and round trips."""
        if not profile:
            raise QueryError(
                "empty profile: give at least one of gender, age and occupation",
                hint="pass gender, age or occupation (--gender, --age, --occupation)",
            )
        ids = [
            document_id(feature_type, profile[feature_type])
            for feature_type in (*USER_SIDE_TYPES, MOVIE)
            if feature_type in profile
        ]
        trips = self._fetch(ids)
        total = np.zeros_like(self._vectors[ids[0]])
        for doc_id in ids:
            total = total + self._vectors[doc_id]
        return total.astype(np.float32), trips

    # -- templates ---------------------------------------------------------

    def _template(self, name: str) -> SearchTemplate:
        if self._templates is None:
            self._templates = load_templates(self._templates_dir)
        if name not in self._templates:
            raise QueryError(f"unknown template {name!r}")
        template = self._templates[name]
        if self.require_pushed and template.script_id not in self._checked_templates:
            entry = registry_entry(self.client, template.script_id)
            if entry is None or entry["checksum"] != template.checksum:
                raise QueryError(
                    f"template {template.script_id} is "
                    f"{'not pushed' if entry is None else 'pushed with other source'}"
                    " on this cluster",
                    hint="run: esfm templates push",
                )
            self._checked_templates.add(template.script_id)
        return template

    # -- queries -----------------------------------------------------------

    def _search(
        self, template_name: str, params: dict[str, Any]
    ) -> tuple[dict[str, Any], str, str | None]:
        if self.method == "script_score" and template_name in RANKING_TEMPLATES:
            return self._script_score(params), "script_score", None
        template = self._template(template_name)
        response, path = search_with_template(
            self.client,
            self.alias,
            template,
            params,
            force_local=not self.require_pushed,
        )
        return response, path, template.script_id

    def _script_score(self, params: dict[str, Any]) -> dict[str, Any]:
        if not server_info(self.client).has_painless:
            raise QueryError(
                "the cluster has no lang-painless module, so script_score is "
                "unavailable",
                hint="use --method knn",
            )
        from esfm.indexing import read_meta

        max_norm = float(read_meta(self.client, self.index)["max_rank_vector_norm"])
        query_vector = params["query_vector"]
        # script_score rejects negative scores; |q|*max|r| bounds -<q, r>.
        offset = math.sqrt(sum(x * x for x in query_vector)) * max_norm
        filters: list[dict[str, Any]] = [{"term": {"feature_type": MOVIE}}]
        if params.get("filter_genres"):
            filters.append({"terms": {"genres": params["genres"]}})
        body = {
            "size": params["k"],
            "_source": ["feature_type", "value", "title", "genres"],
            "query": {
                "script_score": {
                    "query": {
                        "bool": {
                            "filter": filters,
                            "must_not": [
                                {"terms": {"value": params.get("exclude_movies", [])}}
                            ],
                        }
                    },
                    "script": {
                        "source": "dotProduct(params.query_vector, 'rank_vector') "
                        "+ params.offset",
                        "params": {"query_vector": query_vector, "offset": offset},
                    },
                }
            },
        }
        with cluster_errors(self.client, f"script_score search on {self.alias}"):
            response = dict(self.client.search(index=self.alias, body=body))
        response["_esfm_offset"] = offset
        return response

    def _run(
        self,
        template_name: str,
        profile: dict[str, str],
        params: dict[str, Any],
        *,
        round_trips: int = 0,
    ) -> QueryOutcome:
        trips = round_trips
        for attempt in (1, 2):
            vector, fetch_trips = self.profile_vector(profile)
            query_vector = vector.tolist() + [1.0]
            if template_name == "similar_items":
                query_vector = query_vector[:-1]
            response, path, script_id = self._search(
                template_name, {**params, "query_vector": query_vector}
            )
            trips += fetch_trips + 1
            hits = response["hits"]["hits"]
            served_by = {hit["_index"] for hit in hits}
            if served_by and served_by != {self._index} and attempt == 1:
                logger.info(
                    "alias %s moved from %s to %s; refreshing cached vectors",
                    self.alias,
                    self._index,
                    ", ".join(sorted(served_by)),
                )
                self.invalidate()
                continue
            break
        offset = response.get("_esfm_offset")
        recommendations = [
            self._recommendation(hit, offset, template_name) for hit in hits
        ]
        index = self._index or ",".join(sorted(served_by)) or self.alias
        return QueryOutcome(recommendations, index, path, trips, script_id)

    @staticmethod
    def _recommendation(
        hit: dict[str, Any], offset: float | None, template_name: str
    ) -> Recommendation:
        source = hit["_source"]
        score = float(hit["_score"])
        if offset is not None:
            rank_value = score - offset
        elif template_name == "similar_items":
            rank_value = cosine_from_score(score)
        else:
            rank_value = rank_value_from_score(score)
        return Recommendation(
            movie_id=str(source["value"]),
            title=source.get("title"),
            genres=tuple(source.get("genres") or ()),
            score=score,
            rank_value=rank_value,
        )

    def _params(
        self,
        k: int,
        exclude: list[str] | None,
        genres: list[str] | None,
        num_candidates: int | None = None,
    ) -> dict[str, Any]:
        check_k(k)
        if num_candidates is None:
            num_candidates = min(MAX_K, max(100, 2 * k))
        elif (
            isinstance(num_candidates, bool)
            or not isinstance(num_candidates, int)
            or not k <= num_candidates <= MAX_K
        ):
            raise QueryError(
                f"invalid num_candidates {num_candidates!r}: it must be an integer "
                f"from k ({k}) to {MAX_K}",
                hint="leave it unset for max(100, 2 * k)",
            )
        return {
            "k": k,
            "num_candidates": num_candidates,
            "exclude_movies": [str(movie) for movie in exclude or []],
            "filter_genres": bool(genres),
            "genres": [normalize_genre(genre) for genre in genres or []],
        }

    def cold_start_outcome(
        self,
        *,
        gender: str | None = None,
        age: str | int | None = None,
        occupation: str | int | None = None,
        k: int = 10,
        exclude: list[str] | None = None,
        genres: list[str] | None = None,
        num_candidates: int | None = None,
    ) -> QueryOutcome:
        """Rank movies for a user never seen in training, from metadata only.

        ``num_candidates`` is the kNN candidate count per shard, by default
        ``max(100, 2 * k)``. The shipped mapping searches exactly (``flat``), so
        it changes results only on an approximate (HNSW) index.
        """
        profile = normalize_profile(gender=gender, age=age, occupation=occupation)
        params = self._params(k, exclude, genres, num_candidates)
        return self._run("cold_start", profile, params)

    def cold_start(self, **kwargs: Any) -> list[Recommendation]:
        """Same as ``cold_start_outcome``, returning only the recommendations."""
        return self.cold_start_outcome(**kwargs).recommendations

    def profile_outcome(
        self,
        profile: dict[str, str],
        *,
        k: int = 10,
        exclude: list[str] | None = None,
        genres: list[str] | None = None,
        num_candidates: int | None = None,
    ) -> QueryOutcome:
        """Rank movies for an already normalized profile (see ``normalize_profile``).

        Every profile, a ``user`` key included, runs the ``cold_start`` template,
        so validation works with project folders made before ``known_user``.
        """
        params = self._params(k, exclude, genres, num_candidates)
        return self._run("cold_start", profile, params)

    def known_user(
        self,
        user_id: str | int,
        *,
        k: int = 10,
        exclude: list[str] | None = None,
        genres: list[str] | None = None,
        num_candidates: int | None = None,
    ) -> QueryOutcome:
        """Rank movies for a user seen in training: user plus metadata vectors.

        The user document stores the user's age, gender and occupation, so the
        first call for a user costs one extra round trip and later calls none.
        """
        user_doc = document_id("user", str(user_id))
        trips = self._fetch([user_doc])
        source = self._sources[user_doc]
        profile = {"user": str(user_id)}
        for feature_type in ("age", "gender", "occupation"):
            if source.get(feature_type) is not None:
                profile[feature_type] = str(source[feature_type])
        params = self._params(k, exclude, genres, num_candidates)
        return self._run("known_user", profile, params, round_trips=trips)

    def find_movie(self, title: str) -> dict[str, Any]:
        """Return the movie document whose title matches ``title`` best."""
        if not title.strip():
            raise QueryError("empty movie title")
        source: Any = {"excludes": ["embedding", "rank_vector"]}
        with cluster_errors(self.client, f"looking up title {title!r}"):
            response = self.client.search(
                index=self.alias,
                size=1,
                source=source,
                query={
                    "bool": {
                        "filter": [{"term": {"feature_type": MOVIE}}],
                        "should": [
                            {"term": {"title.raw": {"value": title, "boost": 10}}},
                            {"match": {"title": {"query": title, "operator": "and"}}},
                        ],
                        "minimum_should_match": 1,
                    }
                },
            )
        hits = response["hits"]["hits"]
        if not hits:
            raise QueryError(
                f"no movie title matches {title!r} in {self.alias}",
                hint='give the full title with its year, e.g. "Toy Story (1995)"',
            )
        return hits[0]["_source"]

    def similar(
        self,
        title: str,
        *,
        k: int = 10,
        exclude: list[str] | None = None,
        genres: list[str] | None = None,
        num_candidates: int | None = None,
    ) -> QueryOutcome:
        """Find the movies closest to ``title`` by cosine on the movie embedding.

        The movie itself is always excluded. Looking up the title costs one
        round trip on every call.
        """
        movie = self.find_movie(title)
        movie_id = str(movie["value"])
        params = self._params(k, [movie_id, *(exclude or [])], genres, num_candidates)
        outcome = self._run("similar_items", {"movie": movie_id}, params, round_trips=1)
        outcome.query_movie = (movie_id, movie.get("title"))
        return outcome
