"""Mapping comparison and change classification, without a cluster."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from esfm import drift
from esfm.mappings import load_mapping_file
from esfm.project import PACKAGED_PROJECT

V1 = PACKAGED_PROJECT / "mappings" / "recsys" / "v1.json"


def _rendered(k: int = 16) -> dict:
    return load_mapping_file("recsys", V1).render(k)


def _as_cluster_returns(mappings: dict) -> dict:
    """Drop the defaults that GET _mapping leaves out, as Elasticsearch 9.5 does."""
    live = copy.deepcopy(mappings)
    for field in live["properties"].values():
        if field.get("type") == "dense_vector":
            field.pop("element_type", None)
    return live


def test_diff_ignores_omitted_defaults():
    rendered = _rendered()
    assert (
        drift.diff_mappings(
            rendered["properties"], _as_cluster_returns(rendered)["properties"]
        )
        == []
    )


def test_diff_reports_changed_parameter():
    rendered = _rendered()
    live = _as_cluster_returns(rendered)
    live["properties"]["rank_vector"]["similarity"] = "dot_product"
    live["properties"]["embedding"]["dims"] = 8
    paths = drift.diff_mappings(rendered["properties"], live["properties"])
    assert paths == ["embedding.dims", "rank_vector.similarity"]


def test_diff_reports_fields_on_one_side():
    rendered = _rendered()
    live = _as_cluster_returns(rendered)
    live["properties"]["popularity"] = {"type": "float"}
    del live["properties"]["genres"]
    paths = drift.diff_mappings(rendered["properties"], live["properties"])
    assert paths == ["genres (missing in cluster)", "popularity (not in file)"]


def test_diff_descends_into_subfields():
    rendered = _rendered()
    live = _as_cluster_returns(rendered)
    live["properties"]["title"]["fields"]["raw"]["type"] = "text"
    paths = drift.diff_mappings(rendered["properties"], live["properties"])
    assert paths == ["title.fields.raw.type"]


def test_diff_element_type_counts_when_not_default():
    rendered = _rendered()
    live = _as_cluster_returns(rendered)
    live["properties"]["embedding"]["element_type"] = "byte"
    paths = drift.diff_mappings(rendered["properties"], live["properties"])
    assert paths == ["embedding.element_type"]


def test_classify_identical_is_none():
    rendered = _rendered()
    change = drift.classify_change(_as_cluster_returns(rendered), rendered)
    assert change.kind == drift.CHANGE_NONE
    assert change.added == {}
    assert change.reasons == []


def test_classify_new_field_is_additive():
    live = _as_cluster_returns(_rendered())
    new = _rendered()
    new["properties"]["popularity"] = {"type": "float"}
    change = drift.classify_change(live, new)
    assert change.kind == drift.CHANGE_ADDITIVE
    assert change.added == {"popularity": {"type": "float"}}
    assert change.reasons == []


@pytest.mark.parametrize(
    ("field", "key", "value", "reason"),
    [
        ("embedding", "dims", 32, "embedding.dims changed"),
        ("rank_vector", "similarity", "dot_product", "rank_vector.similarity changed"),
        (
            "embedding",
            "index_options",
            {"type": "hnsw"},
            "embedding.index_options changed",
        ),
        ("bias", "type", "double", "bias.type changed"),
    ],
)
def test_classify_breaking_changes(field, key, value, reason):
    live = _as_cluster_returns(_rendered())
    new = _rendered()
    new["properties"][field][key] = value
    new["properties"]["popularity"] = {"type": "float"}
    change = drift.classify_change(live, new)
    assert change.kind == drift.CHANGE_BREAKING
    assert change.reasons == [reason]


def test_classify_removed_field_is_breaking():
    live = _as_cluster_returns(_rendered())
    new = _rendered()
    del new["properties"]["occupation"]
    change = drift.classify_change(live, new)
    assert change.kind == drift.CHANGE_BREAKING
    assert change.reasons == ["occupation removed"]


def test_classify_dynamic_change_is_breaking():
    live = _as_cluster_returns(_rendered())
    new = _rendered()
    new["dynamic"] = "true"
    change = drift.classify_change(live, new)
    assert change.kind == drift.CHANGE_BREAKING
    assert change.reasons == ["dynamic changed"]


def test_classify_ignores_meta():
    live = _as_cluster_returns(_rendered())
    live["_meta"] = {"esfm": {"state": "complete"}}
    change = drift.classify_change(live, _rendered())
    assert change.kind == drift.CHANGE_NONE


def test_classify_new_subfield_is_breaking():
    live = _as_cluster_returns(_rendered())
    new = _rendered()
    new["properties"]["title"]["fields"]["prefix"] = {"type": "keyword"}
    change = drift.classify_change(live, new)
    assert change.kind == drift.CHANGE_BREAKING
    assert change.reasons == ["title.fields.prefix added"]


def _versions(tmp_path: Path, edit: bool) -> dict:
    folder = tmp_path / "recsys"
    folder.mkdir()
    document = json.loads(V1.read_text())
    (folder / "v1.json").write_text(json.dumps(document))
    original = load_mapping_file("recsys", folder / "v1.json")
    if edit:
        document["description"] = "edited after it was applied"
        (folder / "v1.json").write_text(json.dumps(document))
    return {1: load_mapping_file("recsys", folder / "v1.json")}, original.checksum


def test_edited_file_found_in_meta(tmp_path):
    versions, applied = _versions(tmp_path, edit=True)
    meta = {"mapping_version": 1, "mapping_checksum": applied}
    edited = drift._edited_files(versions, meta, [], "recsys-v1-m")
    assert len(edited) == 1
    assert edited[0].version == 1
    assert edited[0].applied_checksum == applied
    assert edited[0].file_checksum == versions[1].checksum
    assert edited[0].seen_in == "index recsys-v1-m"


def test_edited_file_found_in_history(tmp_path):
    versions, applied = _versions(tmp_path, edit=True)
    entries = [
        {
            "mapping_version": 1,
            "mapping_checksum": applied,
            "action": "migrate",
            "index": "recsys-v1-old",
        }
    ]
    edited = drift._edited_files(versions, {}, entries, "recsys-v1-m")
    assert [item.seen_in for item in edited] == ["esfm-history (migrate recsys-v1-old)"]


def test_unedited_file_is_not_reported(tmp_path):
    versions, applied = _versions(tmp_path, edit=False)
    meta = {"mapping_version": 1, "mapping_checksum": applied}
    entries = [{"mapping_version": 1, "mapping_checksum": applied}]
    assert drift._edited_files(versions, meta, entries, "recsys-v1-m") == []


def test_report_problems_and_ok():
    clean = drift.DriftReport("recsys", "recsys", "recsys-v1-m", 1, 1)
    assert clean.ok
    assert clean.problems() == []
    report = drift.DriftReport(
        "recsys",
        "recsys",
        "recsys-v1-m",
        1,
        3,
        pending=[2, 3],
        live_diffs=["bias.type"],
    )
    assert not report.ok
    assert report.problems() == [
        "pending mapping version(s) v2, v3 (live is v1)",
        "live mapping of recsys-v1-m differs from v1: bias.type",
    ]
