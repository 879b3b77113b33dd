from __future__ import annotations

import json
from pathlib import Path

import pytest

from esfm.errors import MappingError
from esfm.mappings import latest_version, load_versions
from esfm.project import PACKAGED_PROJECT

SHIPPED = PACKAGED_PROJECT / "mappings"


def write_version(folder: Path, number: int, **changes) -> Path:
    document = json.loads((SHIPPED / "recsys" / "v1.json").read_text())
    document["version"] = number
    document.update(changes)
    path = folder / "recsys" / f"v{number}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document))
    return path


def test_shipped_mapping_renders_dims():
    version = latest_version(SHIPPED, "recsys")
    body = version.render(120)
    assert body["properties"]["embedding"]["dims"] == 120
    assert body["properties"]["rank_vector"]["dims"] == 121
    assert body["properties"]["rank_vector"]["similarity"] == "max_inner_product"
    assert body["properties"]["rank_vector"]["index_options"] == {"type": "flat"}


def test_checksum_changes_with_file(tmp_path):
    path = write_version(tmp_path, 1)
    before = load_versions(tmp_path, "recsys")[0].checksum
    path.write_text(path.read_text().replace("keyword", "keyword", 1) + " ")
    after = load_versions(tmp_path, "recsys")[0].checksum
    assert before != after


def test_invalid_json_names_file(tmp_path):
    path = write_version(tmp_path, 1)
    path.write_text("{not json")
    with pytest.raises(MappingError, match="invalid JSON.*v1.json"):
        load_versions(tmp_path, "recsys")


def test_version_gap_rejected(tmp_path):
    write_version(tmp_path, 1)
    write_version(tmp_path, 3)
    with pytest.raises(MappingError, match="gap, missing v2"):
        load_versions(tmp_path, "recsys")


def test_version_field_must_match_name(tmp_path):
    path = write_version(tmp_path, 1)
    document = json.loads(path.read_text())
    document["version"] = 2
    path.write_text(json.dumps(document))
    with pytest.raises(MappingError, match="file name gives 1"):
        load_versions(tmp_path, "recsys")


def test_unknown_field_type_rejected(tmp_path):
    path = write_version(tmp_path, 1)
    document = json.loads(path.read_text())
    document["mappings"]["properties"]["title"]["type"] = "txet"
    path.write_text(json.dumps(document))
    with pytest.raises(MappingError, match="unknown type 'txet'"):
        load_versions(tmp_path, "recsys")


def test_literal_dims_must_match_model(tmp_path):
    path = write_version(tmp_path, 1)
    document = json.loads(path.read_text())
    document["mappings"]["properties"]["embedding"]["dims"] = 64
    path.write_text(json.dumps(document))
    version = load_versions(tmp_path, "recsys")[0]
    assert version.render(64)["properties"]["embedding"]["dims"] == 64
    with pytest.raises(MappingError, match="dims is 64, but the model needs 120"):
        version.render(120)


def test_missing_index_options_rejected(tmp_path):
    path = write_version(tmp_path, 1)
    document = json.loads(path.read_text())
    del document["mappings"]["properties"]["rank_vector"]["index_options"]
    path.write_text(json.dumps(document))
    with pytest.raises(MappingError, match="no index_options"):
        load_versions(tmp_path, "recsys")


def test_unknown_mapping_name(tmp_path):
    with pytest.raises(MappingError, match="mapping 'nope' not found"):
        load_versions(tmp_path, "nope")
