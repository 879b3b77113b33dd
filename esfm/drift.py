"""Compare mapping files, index ``_meta`` and live mappings to find drift.

Three kinds of difference are reported:

* pending versions: mapping files newer than the live index's
  ``_meta.esfm.mapping_version``;
* edited files: a version whose file checksum differs from the checksum
  recorded in the index ``_meta`` or in ``esfm-history`` when it was applied;
* live changes: the index's ``properties`` differ from the file rendered
  for the model's ``k``, for example after a hand-made ``PUT _mapping``.

The pure functions (:func:`diff_mappings`, :func:`classify_change`) need no
cluster; :func:`check_drift` reads the cluster and the files.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from elasticsearch import Elasticsearch

from esfm import aliases, history, indexing
from esfm.errors import MappingError
from esfm.mappings import MappingVersion, load_versions
from esfm.server import cluster_errors

# Values Elasticsearch leaves out of GET _mapping when they are the default,
# per field type (checked against Elasticsearch 9.5).
FIELD_DEFAULTS: dict[str, dict[str, Any]] = {
    "dense_vector": {"element_type": "float", "index": True},
}

# MappingChange.kind values.
CHANGE_ADDITIVE = "additive"
CHANGE_BREAKING = "breaking"
CHANGE_NONE = "none"


class DriftDetected(MappingError):
    """Mapping files and the cluster disagree; ``.report`` has the details."""

    def __init__(self, message: str, *, report: DriftReport, hint: str | None = None):
        super().__init__(message, hint=hint)
        self.report = report


def _normalize_field(field: dict[str, Any]) -> dict[str, Any]:
    field_type = field.get("type", "object")
    defaults = FIELD_DEFAULTS.get(field_type, {})
    return {
        key: value
        for key, value in field.items()
        if not (key in defaults and defaults[key] == value)
    }


def diff_mappings(
    expected: dict[str, Any], live: dict[str, Any], prefix: str = ""
) -> list[str]:
    """Return the dotted paths where two ``properties`` objects differ.

    Both arguments are ``properties`` objects (field name to field mapping).
    A path ends in ``(missing in cluster)`` or ``(not in file)`` when the field
    exists on one side only; otherwise it names the differing parameter.
    Default parameters that Elasticsearch omits are treated as equal.
    """
    paths: list[str] = []
    for name in sorted(set(expected) | set(live)):
        path = f"{prefix}{name}"
        if name not in live:
            paths.append(f"{path} (missing in cluster)")
            continue
        if name not in expected:
            paths.append(f"{path} (not in file)")
            continue
        paths.extend(_diff_field(expected[name], live[name], path))
    return paths


def _diff_field(expected: dict[str, Any], live: dict[str, Any], path: str) -> list[str]:
    want = _normalize_field(expected)
    have = _normalize_field(live)
    paths: list[str] = []
    for key in sorted(set(want) | set(have)):
        if key in ("properties", "fields"):
            paths.extend(
                diff_mappings(want.get(key, {}), have.get(key, {}), f"{path}.{key}.")
            )
        elif want.get(key) != have.get(key):
            paths.append(f"{path}.{key}")
    return paths


@dataclasses.dataclass(frozen=True)
class MappingChange:
    """Relation of a new mapping to the live one.

    ``kind`` is ``none``, ``additive`` (new fields only, so put_mapping can
    apply it in place) or ``breaking`` (needs a new index). ``added`` maps the
    new top-level fields to their mappings, and ``reasons`` lists the paths
    that force a new index.
    """

    kind: str
    added: dict[str, Any]
    reasons: list[str]


def classify_change(
    live_mappings: dict[str, Any], new_mappings: dict[str, Any]
) -> MappingChange:
    """Decide whether ``new_mappings`` can be applied to ``live_mappings`` in place.

    Only new top-level fields count as additive. Breaking are: a changed
    type, ``dims``, ``similarity``, ``index_options`` or other parameter of an
    existing field, a removed field, a new sub-field, and a changed top-level
    key such as ``dynamic``. put_mapping rejects most of these, and esfm does
    not try the few it would accept, so one rule covers them all.
    """
    live_props = live_mappings.get("properties", {})
    new_props = new_mappings.get("properties", {})
    reasons: list[str] = []
    added: dict[str, Any] = {}
    for path in diff_mappings(new_props, live_props):
        field_path, _, side = path.partition(" ")
        if side == "(missing in cluster)" and "." not in field_path:
            added[field_path] = new_props[field_path]
        elif side == "(missing in cluster)":
            reasons.append(f"{field_path} added")
        elif side == "(not in file)":
            reasons.append(f"{field_path} removed")
        else:
            reasons.append(f"{path} changed")
    for key in sorted((set(live_mappings) | set(new_mappings)) - {"properties"}):
        if key == "_meta":
            continue
        if live_mappings.get(key) != new_mappings.get(key):
            reasons.append(f"{key} changed")
    if reasons:
        return MappingChange(CHANGE_BREAKING, added, reasons)
    if added:
        return MappingChange(CHANGE_ADDITIVE, added, [])
    return MappingChange(CHANGE_NONE, {}, [])


@dataclasses.dataclass(frozen=True)
class EditedFile:
    """A mapping version whose file changed after it was applied."""

    version: int
    path: str
    applied_checksum: str
    file_checksum: str
    seen_in: str


@dataclasses.dataclass
class DriftReport:
    """Pending versions and drift of one alias against the mapping files."""

    alias: str
    mapping: str
    index: str | None
    live_version: int | None
    latest_version: int
    pending: list[int] = dataclasses.field(default_factory=list)
    edited: list[EditedFile] = dataclasses.field(default_factory=list)
    live_diffs: list[str] = dataclasses.field(default_factory=list)
    template_drift: list[str] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (
            self.pending or self.edited or self.live_diffs or self.template_drift
        )

    def problems(self) -> list[str]:
        """Return one sentence per finding, for messages and the status view."""
        lines: list[str] = []
        if self.index is None:
            lines.append(f"alias {self.alias} does not exist")
        if self.pending:
            versions = ", ".join(f"v{n}" for n in self.pending)
            live = (
                f"live is v{self.live_version}"
                if self.live_version is not None
                else "no live esfm index"
            )
            lines.append(f"pending mapping version(s) {versions} ({live})")
        for item in self.edited:
            lines.append(
                f"mapping file {item.path} (v{item.version}) was edited after it was "
                f"applied: {item.seen_in} has {item.applied_checksum[:12]}, the file "
                f"{item.file_checksum[:12]}"
            )
        if self.live_diffs:
            lines.append(
                f"live mapping of {self.index} differs from v{self.live_version}: "
                + ", ".join(self.live_diffs)
            )
        lines.extend(self.template_drift)
        return lines

    def to_dict(self) -> dict[str, Any]:
        return {
            **dataclasses.asdict(self),
            "ok": self.ok,
            "problems": self.problems(),
        }


def live_mappings(client: Elasticsearch, index: str) -> dict[str, Any]:
    """Return the ``mappings`` object of ``index`` as the cluster stores it."""
    with cluster_errors(client, f"reading the mapping of {index}"):
        response = client.indices.get_mapping(index=index)
    return dict(response[index]["mappings"])


def _edited_files(
    versions: dict[int, MappingVersion],
    meta: dict[str, Any],
    entries: list[dict[str, Any]],
    index: str,
) -> list[EditedFile]:
    applied: list[tuple[int, str, str]] = []
    if meta.get("mapping_version") and meta.get("mapping_checksum"):
        applied.append(
            (int(meta["mapping_version"]), meta["mapping_checksum"], f"index {index}")
        )
    for entry in entries:
        if entry.get("mapping_version") and entry.get("mapping_checksum"):
            applied.append(
                (
                    int(entry["mapping_version"]),
                    entry["mapping_checksum"],
                    f"esfm-history ({entry.get('action')} {entry.get('index')})",
                )
            )
    edited: list[EditedFile] = []
    reported: set[tuple[int, str]] = set()
    for version, checksum, seen_in in applied:
        current = versions.get(version)
        if current is None or current.checksum == checksum:
            continue
        if (version, checksum) in reported:
            continue
        reported.add((version, checksum))
        edited.append(
            EditedFile(version, str(current.path), checksum, current.checksum, seen_in)
        )
    return edited


def check_drift(
    client: Elasticsearch,
    alias: str,
    mappings_dir: Path,
    mapping: str = "recsys",
) -> DriftReport:
    """Compare the index behind ``alias`` with the files of ``mapping``.

    Only reads. Index templates are not checked here; see
    :func:`esfm.index_templates.template_drift`.
    """
    versions = {item.version: item for item in load_versions(mappings_dir, mapping)}
    latest = max(versions)
    index = aliases.alias_target(client, alias)
    report = DriftReport(alias, mapping, index, None, latest)
    if index is None:
        report.pending = sorted(versions)
        return report

    meta = indexing.read_meta(client, index)
    live_version = meta.get("mapping_version")
    report.live_version = int(live_version) if live_version else None
    report.pending = [n for n in sorted(versions) if n > (report.live_version or 0)]
    entries = [
        entry
        for entry in history.entries(client, alias)
        if entry.get("mapping_name") in (None, mapping)
    ]
    report.edited = _edited_files(versions, meta, entries, index)

    applied = versions.get(report.live_version or 0)
    if applied is not None and meta.get("k"):
        with_cluster = live_mappings(client, index)
        report.live_diffs = diff_mappings(
            applied.render(int(meta["k"]))["properties"],
            with_cluster.get("properties", {}),
        )
    return report
