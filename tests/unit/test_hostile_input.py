"""Hostile and broken input: each case gives one clear error and changes nothing.

Each ``*_CASES`` table lists its cases by id, with the input and
the words that the error message must contain. Servers
that the cluster cases need listen on 127.0.0.1 only and are started here.
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.numpy import load_file, save_file

from esfm.artifacts import TrainedModel
from esfm.config import create_client, resolve_settings
from esfm.data import load_movielens, normalize_profile
from esfm.errors import (
    ClusterError,
    DataError,
    EsfmError,
    MappingError,
    ModelError,
    QueryError,
    TemplateError,
)
from esfm.mappings import load_versions
from esfm.project import PACKAGED_PROJECT
from esfm.query import check_k
from esfm.server import server_info
from esfm.templates import get_template
from esfm.train import TrainConfig, save_model, train

USERS = "1::F::1::10::48067\n2::M::56::16::70072\n"
MOVIES = "1::Toy Story (1995)::Animation\n2::Jumanji (1995)::Adventure\n"
RATINGS = "1::1::5::978300760\n2::2::3::978302109\n"
TEMPLATES = PACKAGED_PROJECT / "templates"
MAPPING = json.loads((PACKAGED_PROJECT / "mappings" / "recsys" / "v1.json").read_text())


def _ml1m(tmp_path: Path, **files: bytes | str) -> Path:
    folder = tmp_path / "ml-1m"
    folder.mkdir()
    contents = {"users.dat": USERS, "movies.dat": MOVIES, "ratings.dat": RATINGS}
    contents.update(files)
    for name, text in contents.items():
        data = text.encode("latin-1") if isinstance(text, str) else text
        (folder / name).write_bytes(data)
    return folder


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------
# MovieLens files


def data_case(**files: bytes | str) -> Callable[[Path], Path]:
    def build(tmp_path: Path) -> Path:
        return _ml1m(tmp_path, **files)

    return build


DATA_CASES = {
    "truncated-line": (data_case(**{"ratings.dat": RATINGS + "1::2::"}), "line 3"),
    "malformed-number": (data_case(**{"ratings.dat": "1::1::five::1\n"}), "line 1"),
    "wrong-separator": (data_case(**{"ratings.dat": "1,1,5,978300760\n"}), "::"),
    "utf16-encoding": (
        data_case(**{"ratings.dat": RATINGS.encode("utf-16")}),
        "ratings.dat",
    ),
    "rating-above-5": (data_case(**{"ratings.dat": "1::1::6::1\n"}), "6"),
    "rating-below-1": (data_case(**{"ratings.dat": "1::1::0::1\n"}), "0"),
    "unknown-user": (data_case(**{"ratings.dat": "99::1::5::1\n"}), "99"),
    "empty-ratings": (data_case(**{"ratings.dat": ""}), "empty"),
    "empty-users": (data_case(**{"users.dat": ""}), "users.dat"),
    "duplicate-rating": (
        data_case(**{"ratings.dat": "1::1::5::1\n1::1::4::2\n"}),
        "1",
    ),
    "binary-garbage": (data_case(**{"movies.dat": b"\x00\xff\xfe" * 50}), "movies"),
}


@pytest.mark.parametrize("case", sorted(DATA_CASES), ids=sorted(DATA_CASES))
def test_movielens_case(tmp_path, case):
    build, expected = DATA_CASES[case]
    folder = build(tmp_path)
    before = _snapshot(folder)
    with pytest.raises(DataError) as caught:
        load_movielens(folder)
    assert expected in caught.value.message
    assert _snapshot(folder) == before


# --------------------------------------------------------------------------
# Mapping files


def _write_mapping(folder: Path, number: int, document: dict | str) -> None:
    text = document if isinstance(document, str) else json.dumps(document)
    (folder / f"v{number}.json").write_text(text)


def _mapping_with(**changes) -> dict:
    document = json.loads(json.dumps(MAPPING))
    document.update(changes)
    return document


def _field_type(name: str, field: dict) -> dict:
    document = json.loads(json.dumps(MAPPING))
    document["mappings"]["properties"][name] = field
    return document


MAPPING_CASES = {
    "invalid-json": ([(1, '{"version": 1,')], "invalid JSON"),
    "unknown-field-type": (
        [(1, _field_type("title", {"type": "txet"}))],
        "unknown type 'txet'",
    ),
    "version-gap": ([(1, MAPPING), (3, _mapping_with(version=3))], "missing v2"),
    "version-not-file-name": ([(1, _mapping_with(version=2))], "file name"),
    "bool-version": ([(1, _mapping_with(version=True))], "version"),
    "bad-dims": (
        [(1, _field_type("embedding", {"type": "dense_vector", "dims": -3}))],
        "dims",
    ),
    "top-level-list": ([(1, "[]")], "JSON object"),
}


@pytest.mark.parametrize("case", sorted(MAPPING_CASES), ids=sorted(MAPPING_CASES))
def test_mapping_case(tmp_path, case):
    files, expected = MAPPING_CASES[case]
    folder = tmp_path / "mappings" / "recsys"
    folder.mkdir(parents=True)
    for number, document in files:
        _write_mapping(folder, number, document)
    before = _snapshot(folder)
    with pytest.raises(MappingError) as caught:
        load_versions(tmp_path / "mappings", "recsys")
    assert expected in caught.value.message
    assert _snapshot(folder) == before


def test_mapping_duplicate_version(tmp_path):
    folder = tmp_path / "mappings" / "recsys"
    folder.mkdir(parents=True)
    _write_mapping(folder, 1, MAPPING)
    (folder / "v01.json").write_text(json.dumps(MAPPING))
    with pytest.raises(MappingError) as caught:
        load_versions(tmp_path / "mappings", "recsys")
    assert "duplicate" in caught.value.message


def test_mapping_dims_not_matching_model(tmp_path):
    folder = tmp_path / "mappings" / "recsys"
    folder.mkdir(parents=True)
    field = dict(MAPPING["mappings"]["properties"]["embedding"], dims=7)
    _write_mapping(folder, 1, _field_type("embedding", field))
    version = load_versions(tmp_path / "mappings", "recsys")[0]
    with pytest.raises(MappingError) as caught:
        version.render(16)
    assert "the model needs 16" in caught.value.message


def test_mapping_name_traversal(tmp_path):
    (tmp_path / "outside").mkdir()
    _write_mapping(tmp_path / "outside", 1, MAPPING)
    (tmp_path / "mappings").mkdir()
    with pytest.raises(MappingError) as caught:
        load_versions(tmp_path / "mappings", "../outside")
    assert "invalid mapping name" in caught.value.message


# --------------------------------------------------------------------------
# Model directories


@pytest.fixture
def model_dir(synthetic_dataset, tmp_path_factory) -> Path:
    config = TrainConfig(k=4, epochs=1, batch_size=64, lr=1e-2, threads=1)
    return save_model(train(synthetic_dataset, config), tmp_path_factory.mktemp("m"))


def _copy_model(model_dir: Path, tmp_path: Path) -> Path:
    target = tmp_path / "model"
    target.mkdir()
    for path in model_dir.iterdir():
        (target / path.name).write_bytes(path.read_bytes())
    return target


def _truncate_weights(path: Path) -> None:
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])


def _nan_weights(path: Path) -> None:
    weights = path / "model.safetensors"
    tensors = load_file(weights)
    name = next(n for n, t in tensors.items() if t.size > 1)
    broken = tensors[name].copy()
    broken.flat[0] = np.nan
    tensors[name] = broken
    save_file(tensors, weights)


def _drop_vocabulary_row(path: Path) -> None:
    vocabulary_path = path / "vocabulary.json"
    vocabulary = json.loads(vocabulary_path.read_text())
    key = next(k for k, v in vocabulary.items() if isinstance(v, list) and v)
    vocabulary[key] = vocabulary[key][:-1]
    vocabulary_path.write_text(json.dumps(vocabulary))


MODEL_CASES = {
    "missing-weights": (lambda p: (p / "model.safetensors").unlink(), "lacks"),
    "missing-config": (lambda p: (p / "config.json").unlink(), "lacks"),
    "truncated-weights": (_truncate_weights, "model.safetensors"),
    "nan-weights": (_nan_weights, "NaN"),
    "vocabulary-not-weights": (_drop_vocabulary_row, ""),
    "config-not-json": (lambda p: (p / "config.json").write_text("{"), "config.json"),
}


@pytest.mark.parametrize("case", sorted(MODEL_CASES), ids=sorted(MODEL_CASES))
def test_model_case(model_dir, tmp_path, case):
    damage, expected = MODEL_CASES[case]
    path = _copy_model(model_dir, tmp_path)
    damage(path)
    before = _snapshot(path)
    with pytest.raises(ModelError) as caught:
        TrainedModel.load(path)
    assert expected in caught.value.message
    assert _snapshot(path) == before


# --------------------------------------------------------------------------
# Templates and query values


def test_template_unknown_name():
    with pytest.raises(TemplateError) as caught:
        get_template(TEMPLATES, "drop_everything")
    assert "drop_everything" in caught.value.message


TEMPLATE_PARAM_CASES = {
    "missing-required": ({}, "query_vector"),
    "k-not-int": ({"query_vector": [0.1], "k": "ten"}, "integer"),
    "k-zero": ({"query_vector": [0.1], "k": 0}, "at least"),
    "k-huge": ({"query_vector": [0.1], "k": 10**9}, "at most"),
    "vector-nan": ({"query_vector": [float("nan")]}, "finite"),
    "vector-of-strings": ({"query_vector": ["1"]}, "numbers"),
    "unknown-param": ({"query_vector": [0.1], "script": "x"}, "script"),
}


@pytest.mark.parametrize(
    "case", sorted(TEMPLATE_PARAM_CASES), ids=sorted(TEMPLATE_PARAM_CASES)
)
def test_template_param_case(case):
    values, expected = TEMPLATE_PARAM_CASES[case]
    template = get_template(TEMPLATES, "cold_start")
    with pytest.raises(TemplateError) as caught:
        template.render(values)
    assert expected in caught.value.message


INJECTIONS = [
    '"]}}, "script": {"source": "x"}, "x": [{"a": "',
    "}}{{#toJson}}query_vector{{/toJson}}",
    '\\"}, {"match_all": {}}',
    "</script>\u0000\u202e",
]


@pytest.mark.parametrize("payload", INJECTIONS, ids=range(len(INJECTIONS)))
def test_template_injection_stays_a_value(payload):
    template = get_template(TEMPLATES, "cold_start")
    body = template.render({"query_vector": [0.5, 0.5], "exclude_movies": [payload]})
    clean = template.render({"query_vector": [0.5, 0.5], "exclude_movies": ["1"]})
    must_not = body["query"]["knn"]["filter"]["bool"]["must_not"]
    assert must_not == [{"terms": {"value": [payload]}}]
    assert set(body) == set(clean)
    assert set(body["query"]["knn"]) == set(clean["query"]["knn"])


@settings(max_examples=60, deadline=None)
@given(st.lists(st.text(max_size=30), max_size=4))
def test_template_strings_never_change_structure(values):
    template = get_template(TEMPLATES, "cold_start")
    body = template.render({"query_vector": [1.0], "exclude_movies": values})
    assert (
        body["query"]["knn"]["filter"]["bool"]["must_not"][0]["terms"]["value"]
        == values
    )


PROFILE_CASES = {
    "gender-unknown": ({"gender": "X"}, "gender"),
    "age-negative": ({"age": "-5"}, "age"),
    "age-text": ({"age": "old"}, "age"),
    "occupation-21": ({"occupation": "21"}, "occupation"),
    "occupation-name": ({"occupation": "astronaut"}, "occupation"),
    "gender-quote": ({"gender": 'M"}'}, "gender"),
}


@pytest.mark.parametrize("case", sorted(PROFILE_CASES), ids=sorted(PROFILE_CASES))
def test_profile_case(case):
    values, expected = PROFILE_CASES[case]
    with pytest.raises(QueryError) as caught:
        normalize_profile(**values)
    assert expected in caught.value.message


@settings(max_examples=200, deadline=None)
@given(
    gender=st.one_of(st.none(), st.text(max_size=8)),
    age=st.one_of(st.none(), st.text(max_size=8), st.integers(-10, 200)),
    occupation=st.one_of(st.none(), st.text(max_size=12), st.integers(-5, 40)),
)
def test_profile_parser_total(gender, age, occupation):
    # Any input either normalizes to known codes or raises QueryError.
    try:
        profile = normalize_profile(gender=gender, age=age, occupation=occupation)
    except QueryError:
        return
    assert set(profile) <= {"gender", "age", "occupation"}
    assert all(isinstance(value, str) for value in profile.values())


@pytest.mark.parametrize("k", [0, -1, 10**7, True, "10"], ids=str)
def test_query_k_invalid(k):
    with pytest.raises(QueryError):
        check_k(k)


@settings(max_examples=50, deadline=None)
@given(st.text(alphabet=st.characters(codec="latin-1"), max_size=60))
def test_ratings_line_parser_total(tmp_path_factory, line):
    # An arbitrary ratings line either loads or raises DataError.
    folder = _ml1m(tmp_path_factory.mktemp("h"), **{"ratings.dat": line + "\n"})
    try:
        load_movielens(folder)
    except DataError:
        pass


# --------------------------------------------------------------------------
# Cluster: loopback servers started by this module


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def silent_server() -> Iterator[int]:
    """A TCP server on 127.0.0.1 that accepts connections and never responds."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    yield server.getsockname()[1]
    server.close()


class _Version8Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        if self.path.startswith("/_nodes"):
            body = {"nodes": {"n1": {"version": "8.17.0"}}}
        else:
            body = {"language_contexts": []}
        payload = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("X-Elastic-Product", "Elasticsearch")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def version8_server() -> Iterator[int]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Version8Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def _client(url: str, timeout: float = 5.0):
    return create_client(resolve_settings(url=url, request_timeout=timeout, environ={}))


def test_cluster_unreachable():
    url = f"http://127.0.0.1:{_free_port()}"
    with pytest.raises(ClusterError) as caught:
        server_info(_client(url))
    assert "cannot reach" in caught.value.message
    assert url in caught.value.message


def test_cluster_timeout(silent_server):
    with pytest.raises(ClusterError) as caught:
        server_info(_client(f"http://127.0.0.1:{silent_server}", timeout=0.5))
    assert "timed out" in caught.value.message
    assert "ESFM_REQUEST_TIMEOUT" in (caught.value.hint or "")


def test_cluster_wrong_major(version8_server):
    with pytest.raises(ClusterError) as caught:
        server_info(_client(f"http://127.0.0.1:{version8_server}"))
    assert "8.17.0" in caught.value.message
    assert "9.x" in caught.value.message


def test_all_errors_are_esfm_errors():
    # The table's expected classes share the root that the CLI boundary catches.
    for error in (ClusterError, DataError, MappingError, ModelError, QueryError):
        assert issubclass(error, EsfmError)
