"""Versioned mustache search templates: files, parameters, rendering and storage.

A template file ``templates/<name>.mustache`` starts with a mustache comment
header::

    {{!
    name: cold_start
    version: 1
    description: Rank movies for a profile vector.
    param query_vector: vector required
    param k: int = 10 min 1 max 10000
    }}

Where the cluster has ``lang-mustache``, ``push`` stores each template as a
stored script ``esfm-<name>-v<version>`` and searches run it server-side.
Where it has not, the same source is rendered here with pystache, using
Elasticsearch's semantics: ``{{var}}`` is JSON-string escaped, and
``{{#toJson}}param{{/toJson}}`` and ``{{#join}}param{{/join}}`` are provided.
Either way, every pushed version is recorded in the ``esfm-templates`` index so
that all operators see the same versions.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import hashlib
import json
import logging
import math
import re
import secrets
from pathlib import Path
from typing import Any

import elasticsearch
import orjson
import pystache
from elasticsearch import Elasticsearch

from esfm.errors import TemplateError
from esfm.server import cluster_errors, ensure_system_index, server_info

logger = logging.getLogger(__name__)

REGISTRY_INDEX = "esfm-templates"
REGISTRY_MAPPINGS = {
    "properties": {
        "name": {"type": "keyword"},
        "version": {"type": "integer"},
        "description": {"type": "text"},
        "checksum": {"type": "keyword"},
        "source": {"type": "text", "index": False},
        "pushed_at": {"type": "date"},
    }
}
HEADER = re.compile(r"\A\{\{!(?P<body>.*?)\}\}\n?", re.DOTALL)
PARAM_LINE = re.compile(
    r"^param\s+(?P<name>[a-z_][a-z0-9_]*)\s*:\s*(?P<type>[a-z\[\]]+)"
    r"(?:\s*=\s*(?P<default>\S+))?(?P<rest>.*)$"
)
PARAM_TYPES = ("int", "float", "str", "bool", "vector", "list[str]")
MAX_LIST_LENGTH = 10_000
# The default index.max_result_window, the most one search can return.
MAX_REGISTRY_ENTRIES = 10_000


@dataclasses.dataclass(frozen=True)
class TemplateParam:
    """One declared template parameter."""

    name: str
    type: str
    default: Any = None
    required: bool = False
    minimum: float | None = None
    maximum: float | None = None

    def coerce(self, template: str, value: Any) -> Any:
        """Check ``value`` against the declared type and bounds; return it typed.

        Strings from the command line are parsed; everything else must already
        have the right Python type.
        """

        def invalid(expected: str) -> TemplateError:
            return TemplateError(
                f"template {template!r}: parameter {self.name!r} must be {expected}, "
                f"got {value!r}"
            )

        if self.type == "int":
            if isinstance(value, str) and re.fullmatch(r"-?\d+", value.strip()):
                value = int(value)
            if isinstance(value, bool) or not isinstance(value, int):
                raise invalid("an integer")
        elif self.type == "float":
            if isinstance(value, str):
                try:
                    value = float(value)
                except ValueError:
                    raise invalid("a number") from None
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise invalid("a number")
            if not math.isfinite(value):
                raise invalid("a finite number")
            value = float(value)
        elif self.type == "bool":
            if isinstance(value, str) and value.lower() in ("true", "false"):
                value = value.lower() == "true"
            if not isinstance(value, bool):
                raise invalid("true or false")
        elif self.type == "str":
            if not isinstance(value, str):
                raise invalid("a string")
        elif self.type == "vector":
            if isinstance(value, str):
                try:
                    value = json.loads(value)
                except json.JSONDecodeError:
                    raise invalid("a JSON list of numbers") from None
            if not isinstance(value, list | tuple) or not all(
                isinstance(x, int | float) and not isinstance(x, bool) for x in value
            ):
                raise invalid("a list of numbers")
            value = [float(x) for x in value]
            if not all(math.isfinite(x) for x in value):
                raise invalid("a list of finite numbers")
        elif self.type == "list[str]":
            if isinstance(value, str):
                value = [item for item in value.split(",") if item]
            if not isinstance(value, list | tuple) or not all(
                isinstance(x, str) for x in value
            ):
                raise invalid("a list of strings")
            value = list(value)
        if isinstance(value, list) and len(value) > MAX_LIST_LENGTH:
            raise invalid(f"a list of at most {MAX_LIST_LENGTH} items")
        if self.minimum is not None and value < self.minimum:
            raise invalid(f"at least {self.minimum:g}")
        if self.maximum is not None and value > self.maximum:
            raise invalid(f"at most {self.maximum:g}")
        return value


@dataclasses.dataclass(frozen=True)
class SearchTemplate:
    """A parsed template file."""

    name: str
    version: int
    description: str
    params: dict[str, TemplateParam]
    source: str

    @property
    def script_id(self) -> str:
        return f"esfm-{self.name}-v{self.version}"

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.source.encode("utf-8")).hexdigest()

    def resolve_params(self, values: dict[str, Any]) -> dict[str, Any]:
        """Fill defaults and check every parameter; unknown names are rejected."""
        unknown = sorted(set(values) - set(self.params))
        if unknown:
            raise TemplateError(
                f"template {self.name!r} has no parameter(s) {', '.join(unknown)}",
                hint=f"its parameters: {', '.join(sorted(self.params))}",
            )
        resolved: dict[str, Any] = {}
        for name, param in self.params.items():
            if name in values and values[name] is not None:
                resolved[name] = param.coerce(self.name, values[name])
            elif param.required:
                raise TemplateError(
                    f"template {self.name!r}: missing required parameter {name!r}"
                )
            else:
                resolved[name] = param.default
        return resolved

    def sample_params(self) -> dict[str, Any]:
        """Return a value for every required parameter, to test-render with."""
        samples = {
            "int": 1,
            "float": 0.0,
            "str": "",
            "bool": False,
            "vector": [0.0],
            "list[str]": [],
        }
        values = {}
        for name, param in self.params.items():
            if param.required:
                value = samples[param.type]
                if param.minimum is not None and param.type in ("int", "float"):
                    value = max(value, param.minimum)
                values[name] = value
        return values

    def render(self, values: dict[str, Any]) -> dict[str, Any]:
        """Render the search body locally, with Elasticsearch's mustache semantics."""
        return self.render_resolved(self.resolve_params(values))

    def render_resolved(self, params: dict[str, Any]) -> dict[str, Any]:
        """Render with parameters that ``resolve_params`` already checked."""
        text = render_mustache(self.source, params)
        try:
            return orjson.loads(text)
        except orjson.JSONDecodeError as exc:
            raise TemplateError(
                f"template {self.name!r} v{self.version} rendered invalid JSON: {exc}",
                hint=f"inspect it with: esfm templates render {self.name}",
            ) from exc


def _json_string_escape(value: Any) -> str:
    if not isinstance(value, str):
        value = (
            json.dumps(value) if isinstance(value, list | dict | bool) else str(value)
        )
    return json.dumps(value, ensure_ascii=False)[1:-1]


def _lookup(params: dict[str, Any], path: str) -> Any:
    value: Any = params
    for part in path.strip().split("."):
        if isinstance(value, dict) and part in value:
            value = value[part]
        else:
            raise TemplateError(
                f"template refers to unknown parameter {path.strip()!r}"
            )
    return value


def _no_tags(text: str) -> str:
    # A joined value is plain text, not JSON, so a "{{" in it cannot be
    # escaped the JSON way. Removing the tag opener keeps it inert.
    while "{{" in text:
        text = text.replace("{{", "{")
    return text


_RENDERER = pystache.Renderer(escape=_json_string_escape, missing_tags="strict")


@functools.lru_cache(maxsize=64)
def _parse_cached(source: str) -> pystache.parsed.ParsedTemplate:
    # Parsing costs about as much as rendering, and template sources are few.
    return pystache.parse(source)


_TO_JSON_MARKER = re.compile("\x00([0-9a-f]{16}):([0-9]+)\x00")


def render_mustache(source: str, params: dict[str, Any]) -> str:
    """Render ``source`` like Elasticsearch's mustache script engine does."""
    # pystache renders a lambda's result again as a template and Elasticsearch
    # does not, so toJson returns a marker that the JSON replaces afterwards.
    # The random nonce leaves values that look like a marker unchanged.
    nonce = secrets.token_hex(8)
    dumped: list[str] = []

    def to_json(text: str) -> str:
        try:
            dumped.append(orjson.dumps(_lookup(params, text)).decode())
        except TypeError as exc:
            raise TemplateError(
                f"{{{{#toJson}}}} failed to encode {text.strip()!r}: {exc}"
            ) from exc
        return f"\x00{nonce}:{len(dumped) - 1}\x00"

    def join(text: str) -> str:
        value = _lookup(params, text)
        if not isinstance(value, list):
            raise TemplateError(f"{{{{#join}}}} needs a list, {text.strip()!r} is not")
        return _no_tags(",".join(str(item) for item in value))

    context = dict(params)
    context["toJson"] = to_json
    context["join"] = join
    try:
        text = _RENDERER.render(_parse_cached(source), context)
    except pystache.context.KeyNotFoundError as exc:
        raise TemplateError(f"template refers to an unknown parameter: {exc}") from exc
    except pystache.parser.ParsingError as exc:
        raise TemplateError(f"template has invalid mustache syntax: {exc}") from exc
    if not dumped:
        return text

    def replace(match: re.Match[str]) -> str:
        if match.group(1) != nonce:
            return match.group(0)
        return dumped[int(match.group(2))]

    return _TO_JSON_MARKER.sub(replace, text)


def parse_template(path: Path) -> SearchTemplate:
    """Parse a ``.mustache`` file with its header."""
    try:
        source = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise TemplateError(f"cannot read template file {str(path)!r}: {exc}") from exc
    return parse_template_source(source, path)


def parse_template_source(source: str, path: Path) -> SearchTemplate:
    """Parse template ``source``; ``path`` names it in errors and gives its name."""
    match = HEADER.match(source)
    if not match:
        raise TemplateError(
            f"template file {str(path)!r} has no {{{{! ... }}}} header",
            hint="start the file with a header naming name, version and params",
        )
    fields: dict[str, str] = {}
    params: dict[str, TemplateParam] = {}
    for number, line in enumerate(match.group("body").splitlines(), start=1):
        line = line.strip()
        if not line:
            continue
        if line.startswith("param "):
            param = _parse_param(path, number, line)
            params[param.name] = param
            continue
        key, sep, value = line.partition(":")
        if not sep:
            raise TemplateError(f"{path}: header line {number} is not 'key: value'")
        fields[key.strip()] = value.strip()
    for key in ("name", "version"):
        if key not in fields:
            raise TemplateError(f"{path}: header has no {key!r}")
    if fields["name"] != path.stem:
        raise TemplateError(
            f"{path}: header name {fields['name']!r} differs from the file name"
        )
    if not fields["version"].isdigit() or int(fields["version"]) < 1:
        raise TemplateError(
            f"{path}: version {fields['version']!r} is not a positive integer"
        )
    template = SearchTemplate(
        name=fields["name"],
        version=int(fields["version"]),
        description=fields.get("description", ""),
        params=params,
        source=source,
    )
    try:
        template.render(template.sample_params())
    except TemplateError as exc:
        raise TemplateError(
            f"{path}: the template does not render with its default parameters: "
            f"{exc.message}",
            hint="fix the mustache tags or the JSON around them",
        ) from exc
    return template


def _parse_param(path: Path, number: int, line: str) -> TemplateParam:
    match = PARAM_LINE.match(line)
    if not match or match.group("type") not in PARAM_TYPES:
        raise TemplateError(
            f"{path}: header line {number} {line!r} is not a valid parameter",
            hint=f"write 'param NAME: TYPE [= DEFAULT] [required] [min N] [max N]' "
            f"with TYPE one of {', '.join(PARAM_TYPES)}",
        )
    words = match.group("rest").split()
    options: dict[str, Any] = {"required": "required" in words}
    for bound, key in (("min", "minimum"), ("max", "maximum")):
        if bound in words:
            position = words.index(bound)
            try:
                options[key] = float(words[position + 1])
            except (IndexError, ValueError):
                raise TemplateError(
                    f"{path}: header line {number}: {bound} needs a number"
                ) from None
    param = TemplateParam(name=match.group("name"), type=match.group("type"), **options)
    if match.group("default") is not None:
        try:
            default = json.loads(match.group("default"))
        except json.JSONDecodeError:
            raise TemplateError(
                f"{path}: header line {number}: default {match.group('default')!r} "
                "is not JSON"
            ) from None
        param = dataclasses.replace(param, default=param.coerce(path.stem, default))
    return param


def load_templates(templates_dir: Path) -> dict[str, SearchTemplate]:
    """Parse every ``*.mustache`` file of the project."""
    if not templates_dir.is_dir():
        raise TemplateError(f"templates folder {str(templates_dir)!r} not found")
    return {
        path.stem: parse_template(path)
        for path in sorted(templates_dir.glob("*.mustache"))
    }


def get_template(templates_dir: Path, name: str) -> SearchTemplate:
    templates = load_templates(templates_dir)
    if name not in templates:
        raise TemplateError(
            f"unknown template {name!r}",
            hint=f"available: {', '.join(sorted(templates)) or 'none'}",
        )
    return templates[name]


@dataclasses.dataclass(frozen=True)
class PushResult:
    """The outcome of pushing one template version."""

    name: str
    version: int
    script_id: str
    stored_script: bool
    status: str


def _registry_doc(template: SearchTemplate) -> dict[str, Any]:
    return {
        "name": template.name,
        "version": template.version,
        "description": template.description,
        "checksum": template.checksum,
        "source": template.source,
        "pushed_at": dt.datetime.now(dt.UTC).isoformat(),
    }


def push_templates(
    client: Elasticsearch, templates: dict[str, SearchTemplate]
) -> list[PushResult]:
    """Record each template version in the registry, and store it as a script.

    A version already in the registry with different source is rejected: edit
    the file's version number instead of changing a pushed version.
    """
    info = server_info(client)
    ensure_system_index(client, REGISTRY_INDEX, REGISTRY_MAPPINGS)
    results = []
    for template in templates.values():
        registered = registry_entry(client, template.script_id)
        if registered and registered["checksum"] != template.checksum:
            raise TemplateError(
                f"template {template.name!r} v{template.version} was pushed before "
                "with different source",
                hint=f"raise the version in {template.name}.mustache and push again",
            )
        status = "unchanged" if registered else "registered"
        if info.has_mustache:
            with cluster_errors(client, f"storing script {template.script_id}"):
                client.put_script(
                    id=template.script_id,
                    script={"lang": "mustache", "source": template.source},
                )
        if not registered:
            with cluster_errors(client, f"registering {template.script_id}"):
                client.index(
                    index=REGISTRY_INDEX,
                    id=template.script_id,
                    document=_registry_doc(template),
                    op_type="create",
                    refresh="wait_for",
                )
        logger.info(
            "template %s: %s%s",
            template.script_id,
            status,
            ", stored script" if info.has_mustache else "",
        )
        results.append(
            PushResult(
                template.name,
                template.version,
                template.script_id,
                info.has_mustache,
                status,
            )
        )
    return results


def registry_entry(client: Elasticsearch, script_id: str) -> dict[str, Any] | None:
    """Return the registry document of one template version, or None."""
    with cluster_errors(client, f"reading template {script_id}"):
        try:
            return client.get(index=REGISTRY_INDEX, id=script_id)["_source"]
        except elasticsearch.NotFoundError:
            return None


def registry_entries(client: Elasticsearch) -> list[dict[str, Any]]:
    """Return every registry document, sorted by name, then version.

    The registry index gets a dynamic mapping on first push, where ``name`` is a
    text field that cannot be sorted on, so the sort happens here.
    """
    with cluster_errors(client, f"listing {REGISTRY_INDEX}"):
        if not client.indices.exists(index=REGISTRY_INDEX):
            return []
        response = client.search(index=REGISTRY_INDEX, size=MAX_REGISTRY_ENTRIES)
    hits = response["hits"]["hits"]
    if len(hits) == MAX_REGISTRY_ENTRIES:
        # NOTE: versions past the first MAX_REGISTRY_ENTRIES are left out.
        logger.warning(
            "%s has more than %d versions; only %d are read",
            REGISTRY_INDEX,
            MAX_REGISTRY_ENTRIES,
            MAX_REGISTRY_ENTRIES,
        )
    entries = [hit["_source"] for hit in hits]
    return sorted(entries, key=lambda entry: (entry["name"], int(entry["version"])))


def pushed_template(client: Elasticsearch, name: str, version: int) -> SearchTemplate:
    """Return the template version as pushed to the cluster's registry."""
    script_id = f"esfm-{name}-v{version}"
    entry = registry_entry(client, script_id)
    if entry is None:
        raise TemplateError(
            f"template {name!r} v{version} is not pushed to this cluster",
            hint="run: esfm templates push",
        )
    return parse_template_source(entry["source"], Path(f"{name}.mustache"))


def search_with_template(
    client: Elasticsearch,
    index: str,
    template: SearchTemplate,
    params: dict[str, Any],
    *,
    force_local: bool = False,
) -> tuple[dict[str, Any], str]:
    """Run ``template`` against ``index``; return the response and the path used.

    The path is ``"stored"`` (server-side mustache) or ``"local"`` (rendered
    here and sent as a plain search, always so with ``force_local``).
    """
    resolved = template.resolve_params(params)
    if server_info(client).has_mustache and not force_local:
        with cluster_errors(client, f"searching {index} with {template.script_id}"):
            response = client.search_template(
                index=index, id=template.script_id, params=resolved
            )
        return dict(response), "stored"
    body = template.render_resolved(resolved)
    with cluster_errors(client, f"searching {index} with {template.name}"):
        response = client.search(index=index, body=body)
    return dict(response), "local"


TEMPLATE_STATES = ("same", "differs", "only in files", "only on cluster")


@dataclasses.dataclass(frozen=True)
class TemplateDiff:
    """How one template version in the files compares with the cluster registry.

    ``state`` is one of ``TEMPLATE_STATES``. ``stored_script`` is True or False
    when the cluster has ``lang-mustache`` and states whether the stored script
    ``script_id`` has the file's source, and None when there is no file to
    compare or no mustache engine.
    """

    name: str
    version: int
    script_id: str
    state: str
    file_checksum: str | None
    cluster_checksum: str | None
    pushed_at: str | None = None
    stored_script: bool | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def search_template_drift(
    client: Elasticsearch, templates: dict[str, SearchTemplate]
) -> list[str]:
    """Return one sentence per template file version the cluster does not serve.

    A version that was never pushed, or was pushed with another source, is
    drift: queries that need it fail until ``esfm templates push``. Older
    versions left on the cluster are not drift.
    """
    findings = []
    for diff in diff_templates(client, templates):
        if diff.state == "only in files":
            findings.append(
                f"search template {diff.name} v{diff.version} is not pushed "
                "(run: esfm templates push)"
            )
        elif diff.state == "differs" or diff.stored_script is False:
            findings.append(
                f"search template {diff.name} v{diff.version} differs from "
                f"{diff.script_id} on the cluster (give the file a new version)"
            )
    return findings


def stored_script_source(client: Elasticsearch, script_id: str) -> str | None:
    """Return the source of stored script ``script_id``, or None if there is none."""
    with cluster_errors(client, f"reading stored script {script_id}"):
        try:
            response = client.get_script(id=script_id)
        except elasticsearch.NotFoundError:
            return None
    if not response.get("found", True):
        return None
    return response["script"]["source"]


def diff_templates(
    client: Elasticsearch, templates: dict[str, SearchTemplate]
) -> list[TemplateDiff]:
    """Compare template files with the versions in the cluster's registry.

    Each file version and each registry version gets one entry, sorted by name,
    then version. The state is ``same`` when the registry has that version with
    the file's checksum, and ``differs`` when its checksum is another. A file
    version never pushed is ``only in files``, and a registry version without a
    file is ``only on cluster``.
    """
    entries = {
        f"esfm-{entry['name']}-v{entry['version']}": entry
        for entry in registry_entries(client)
    }
    check_scripts = server_info(client).has_mustache
    diffs = []
    for template in templates.values():
        entry = entries.pop(template.script_id, None)
        if entry is None:
            state = "only in files"
        elif entry["checksum"] == template.checksum:
            state = "same"
        else:
            state = "differs"
        stored = None
        # NOTE: unverified against a cluster with lang-mustache.
        if check_scripts:
            source = stored_script_source(client, template.script_id)
            stored = source == template.source
        diffs.append(
            TemplateDiff(
                name=template.name,
                version=template.version,
                script_id=template.script_id,
                state=state,
                file_checksum=template.checksum,
                cluster_checksum=entry["checksum"] if entry else None,
                pushed_at=entry.get("pushed_at") if entry else None,
                stored_script=stored,
            )
        )
    for script_id, entry in entries.items():
        diffs.append(
            TemplateDiff(
                name=entry["name"],
                version=int(entry["version"]),
                script_id=script_id,
                state="only on cluster",
                file_checksum=None,
                cluster_checksum=entry["checksum"],
                pushed_at=entry.get("pushed_at"),
            )
        )
    return sorted(diffs, key=lambda diff: (diff.name, diff.version))


def render_on_cluster(
    client: Elasticsearch, template: SearchTemplate, params: dict[str, Any]
) -> dict[str, Any]:
    """Render ``template`` with the cluster's mustache engine (``_render/template``).

    The parameters are checked and completed with defaults first, exactly as
    for a search, so the result is comparable with ``template.render``.

    Raises:
        TemplateError: the cluster has no ``lang-mustache`` module.
    """
    if not server_info(client).has_mustache:
        raise TemplateError(
            "the cluster has no lang-mustache module, so it cannot render templates",
            hint="compare with a cluster that has lang-mustache installed",
        )
    resolved = template.resolve_params(params)
    # NOTE: unverified against a cluster with lang-mustache. The agreement test
    # in tests/integration/test_serving.py runs it where one is available.
    with cluster_errors(client, f"rendering {template.name} on the cluster"):
        response = client.render_search_template(
            source=template.source, params=resolved
        )
    return dict(response["template_output"])
