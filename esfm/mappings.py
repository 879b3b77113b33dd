"""Versioned index mappings: ``mappings/<name>/v<N>.json`` files.

Each file contains ``version``, ``description``, ``settings`` and ``mappings``.
Vector dims may be written as ``"${k}"`` or ``"${k+1}"`` and are filled in
from the model; a literal number must match the model. The checksum of a
version is the SHA-256 of its file bytes, recorded in the index ``_meta`` so
that an edited file is detected after it was applied.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import re
from pathlib import Path
from typing import Any

from esfm.errors import MappingError

VERSION_FILE = re.compile(r"^v(\d+)\.json$")
MAPPING_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
DIMS_PLACEHOLDERS = {"${k}": 0, "${k+1}": 1}

# Field types esfm can fill; anything else in a mapping file is
# more likely a typo than an intent.
KNOWN_FIELD_TYPES = {
    "keyword",
    "text",
    "float",
    "half_float",
    "double",
    "integer",
    "long",
    "short",
    "byte",
    "boolean",
    "date",
    "dense_vector",
    "object",
    "nested",
    "constant_keyword",
}
REQUIRED_FIELDS = {
    "feature_type": "keyword",
    "value": "keyword",
    "bias": None,
    "embedding": "dense_vector",
    "rank_vector": "dense_vector",
}


@dataclasses.dataclass(frozen=True)
class MappingVersion:
    """One mapping file, parsed and checked."""

    name: str
    version: int
    path: Path
    checksum: str
    description: str
    settings: dict[str, Any]
    mappings: dict[str, Any]

    def render(self, k: int) -> dict[str, Any]:
        """Return the ``mappings`` body with vector dims filled in for ``k``.

        Raises:
            MappingError: a literal ``dims`` that does not match the model.
        """
        body = copy.deepcopy(self.mappings)
        for field_name, field in body["properties"].items():
            if field.get("type") != "dense_vector":
                continue
            expected = k + (1 if field_name == "rank_vector" else 0)
            dims = field.get("dims")
            if isinstance(dims, str):
                field["dims"] = k + DIMS_PLACEHOLDERS[dims]
            elif dims != expected:
                raise MappingError(
                    f"{self.path}: properties.{field_name}.dims is {dims}, but the "
                    f"model needs {expected} (k={k})",
                    hint='write "${k}" or "${k+1}" to take dims from the model',
                )
        return body


def load_mapping_file(name: str, path: Path) -> MappingVersion:
    """Parse and validate one mapping version file."""
    match = VERSION_FILE.match(path.name)
    if not match:
        raise MappingError(
            f"mapping file {str(path)!r} is not named v<N>.json",
            hint="rename it, for example to v2.json",
        )
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise MappingError(
            f"cannot read mapping file {str(path)!r}: {exc.strerror}"
        ) from exc
    try:
        document = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MappingError(
            f"invalid JSON in mapping file {str(path)!r}: {exc}"
        ) from exc
    if not isinstance(document, dict):
        raise MappingError(f"{path}: the top level must be a JSON object")

    version = document.get("version")
    # bool is an int subclass, and True == 1 would pass the comparison.
    if isinstance(version, bool) or version != int(match.group(1)):
        raise MappingError(
            f"{path}: version is {version!r}, but the file name gives "
            f"{int(match.group(1))}",
            hint="make the version field match the file name",
        )
    for key in ("settings", "mappings"):
        if not isinstance(document.get(key, {}), dict):
            raise MappingError(f"{path}: {key!r} must be a JSON object")
    mappings = document.get("mappings")
    if not isinstance(mappings, dict) or not isinstance(
        mappings.get("properties"), dict
    ):
        raise MappingError(f"{path}: mappings.properties is missing")

    _check_properties(path, mappings["properties"])
    return MappingVersion(
        name=name,
        version=version,
        path=path,
        checksum=hashlib.sha256(raw).hexdigest(),
        description=str(document.get("description", "")),
        settings=document.get("settings", {}),
        mappings=mappings,
    )


def _check_properties(path: Path, properties: dict[str, Any]) -> None:
    for field_name, field in properties.items():
        if not isinstance(field, dict):
            raise MappingError(f"{path}: properties.{field_name} must be an object")
        field_type = field.get("type", "object")
        if field_type not in KNOWN_FIELD_TYPES:
            raise MappingError(
                f"{path}: properties.{field_name} has unknown type {field_type!r}",
                hint=f"use one of: {', '.join(sorted(KNOWN_FIELD_TYPES))}",
            )
        if field_type == "dense_vector":
            dims = field.get("dims")
            valid = dims in DIMS_PLACEHOLDERS or (
                isinstance(dims, int) and not isinstance(dims, bool) and dims > 0
            )
            if not valid:
                raise MappingError(
                    f"{path}: properties.{field_name}.dims is {dims!r}",
                    hint='use a positive integer, "${k}" or "${k+1}"',
                )
            if "index_options" not in field:
                raise MappingError(
                    f"{path}: properties.{field_name} has no index_options",
                    hint='set it explicitly, e.g. {"type": "flat"}: the server '
                    "default quantizes vectors and differs between versions",
                )
    for field_name, field_type in REQUIRED_FIELDS.items():
        if field_name not in properties:
            raise MappingError(f"{path}: required field {field_name!r} is missing")
        if field_type and properties[field_name].get("type") != field_type:
            raise MappingError(
                f"{path}: properties.{field_name} must have type {field_type!r}"
            )


def load_versions(mappings_dir: Path, name: str) -> list[MappingVersion]:
    """Load every version of mapping ``name``, checking for gaps and duplicates.

    Raises:
        MappingError: no such mapping, a bad file, a duplicate or missing version.
    """
    if not MAPPING_NAME.match(name):
        raise MappingError(
            f"invalid mapping name {name!r}",
            hint="use lowercase letters, digits, '_' or '-', such as recsys",
        )
    folder = mappings_dir / name
    if not folder.is_dir():
        raise MappingError(
            f"mapping {name!r} not found: {str(folder)!r} is not a folder",
            hint="check --mapping, or create the folder with esfm init",
        )
    versions = [
        load_mapping_file(name, path)
        for path in sorted(folder.iterdir())
        if path.suffix == ".json"
    ]
    if not versions:
        raise MappingError(f"mapping folder {str(folder)!r} has no v<N>.json files")

    versions.sort(key=lambda item: item.version)
    numbers = [item.version for item in versions]
    duplicates = sorted({n for n in numbers if numbers.count(n) > 1})
    if duplicates:
        raise MappingError(f"{folder}: duplicate mapping version(s) {duplicates}")
    expected = list(range(1, len(numbers) + 1))
    if numbers != expected:
        missing = sorted(set(range(1, max(numbers) + 1)) - set(numbers))
        raise MappingError(
            f"{folder}: mapping versions have a gap, missing v{missing[0]}",
            hint="versions must be numbered 1, 2, 3, ... without gaps",
        )
    return versions


def latest_version(mappings_dir: Path, name: str) -> MappingVersion:
    return load_versions(mappings_dir, name)[-1]


def get_version(mappings_dir: Path, name: str, version: int) -> MappingVersion:
    for item in load_versions(mappings_dir, name):
        if item.version == version:
            return item
    raise MappingError(f"mapping {name!r} has no version {version}")
