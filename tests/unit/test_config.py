"""Connection settings: sources, precedence, secrets and validation."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest

from esfm import cluster as local_cluster
from esfm.config import (
    DEFAULT_URL,
    ConnectionSettings,
    create_client,
    load_config_file,
    resolve_settings,
)
from esfm.errors import ConfigError


@pytest.fixture(autouse=True)
def empty_home(tmp_path, monkeypatch) -> Path:
    """An ESFM_HOME with no local cluster, so the user's own state never leaks in."""
    home = tmp_path / "esfm-home"
    home.mkdir()
    monkeypatch.setenv("ESFM_HOME", str(home))
    return home


def _config(tmp_path: Path, body: str, mode: int = 0o600) -> Path:
    path = tmp_path / "esfm.toml"
    path.write_text(body)
    os.chmod(path, mode)
    return path


def test_defaults_without_sources():
    settings = resolve_settings(environ={})

    assert settings.url == DEFAULT_URL
    assert settings.username is None
    assert settings.verify_certs is True
    assert settings.request_timeout == 30.0


def _write_stopped_state(home: Path, document_changes: dict | None = None) -> Path:
    finished_pid = 2**22 + 1  # above the default Linux pid_max, so never live
    document = {
        "format": 1,
        "name": "default",
        "version": "9.5.0",
        "es_home": "/nonexistent/elasticsearch-9.5.0",
        "java_home": "/usr/lib/jvm/x",
        "user": None,
        "security": False,
        "started_at": "2025-01-01T00:00:00+00:00",
        "nodes": [
            {
                "index": 0,
                "name": "default-node-0",
                "http_port": 19555,
                "transport_port": 19655,
                "url": "http://127.0.0.1:19555",
                "config_path": "/x/config",
                "data_path": "/x/data",
                "log_path": "/x/logs",
                "pid": finished_pid,
            }
        ],
    }
    document.update(document_changes or {})
    path = local_cluster.state_path("default", home)
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(document))
    return path


def test_stopped_local_cluster_ignored(empty_home):
    _write_stopped_state(empty_home)

    settings = resolve_settings(environ={})

    assert settings.url == DEFAULT_URL


def test_broken_state_file_ignored(empty_home):
    path = local_cluster.state_path("default", empty_home)
    path.parent.mkdir(parents=True)
    path.write_text("{broken")

    settings = resolve_settings(environ={})

    assert settings.url == DEFAULT_URL


def test_config_file_values(tmp_path):
    path = _config(
        tmp_path,
        '[connection]\nurl = "https://es.test:9243"\nusername = "alice"\n'
        'password = "s3cret"\nrequest_timeout = 12\n',
    )

    settings = resolve_settings(config_file=str(path), environ={})

    assert settings.url == "https://es.test:9243"
    assert settings.username == "alice"
    assert settings.password == "s3cret"
    assert settings.request_timeout == 12.0


def test_config_file_from_env(tmp_path):
    path = _config(tmp_path, '[connection]\nurl = "http://from-file:9200"\n')

    settings = resolve_settings(environ={"ESFM_CONFIG": str(path)})

    assert settings.url == "http://from-file:9200"


def test_env_beats_config_file(tmp_path):
    path = _config(
        tmp_path, '[connection]\nurl = "http://from-file:9200"\nusername = "file"\n'
    )

    settings = resolve_settings(
        config_file=str(path),
        environ={"ESFM_URL": "http://from-env:9200", "ESFM_USERNAME": "env"},
    )

    assert settings.url == "http://from-env:9200"
    assert settings.username == "env"


def test_override_beats_env(tmp_path):
    path = _config(tmp_path, '[connection]\nurl = "http://from-file:9200"\n')

    settings = resolve_settings(
        config_file=str(path),
        environ={"ESFM_URL": "http://from-env:9200"},
        url="http://from-option:9200",
        username=None,
    )

    assert settings.url == "http://from-option:9200"
    assert settings.username is None


def test_env_beats_stopped_state(empty_home):
    _write_stopped_state(empty_home)

    settings = resolve_settings(environ={"ESFM_URL": "http://from-env:9200"})

    assert settings.url == "http://from-env:9200"


def test_env_request_timeout_and_verify():
    settings = resolve_settings(
        environ={"ESFM_REQUEST_TIMEOUT": "2.5", "ESFM_VERIFY_CERTS": "false"}
    )

    assert settings.request_timeout == 2.5
    assert settings.verify_certs is False


def test_invalid_request_timeout():
    with pytest.raises(ConfigError) as caught:
        resolve_settings(environ={"ESFM_REQUEST_TIMEOUT": "soon"})

    assert "invalid request timeout 'soon'" in caught.value.message
    assert caught.value.exit_code == 2


def test_secrets_masked_in_repr():
    settings = ConnectionSettings(
        username="alice", password="s3cret", api_key="k3y", bearer_token="t0ken"
    )

    for text in (repr(settings), str(settings)):
        assert "s3cret" not in text
        assert "k3y" not in text
        assert "t0ken" not in text
        assert "password='***'" in text
        assert "username='alice'" in text


def test_secrets_masked_in_describe():
    described = ConnectionSettings(username="alice", password="s3cret").describe()

    assert described["password"] == "set"
    assert described["api_key"] is None
    assert described["username"] == "alice"
    assert "s3cret" not in json.dumps(described)


def test_secret_never_logged(caplog):
    settings = resolve_settings(
        environ={"ESFM_USERNAME": "alice", "ESFM_PASSWORD": "s3cret"}
    )

    with caplog.at_level(logging.DEBUG, logger="esfm.config"):
        create_client(settings).close()

    assert "connecting with" in caplog.text
    assert "s3cret" not in caplog.text


def test_world_readable_file_warns(tmp_path, caplog):
    path = _config(tmp_path, '[connection]\nurl = "http://x:9200"\n', mode=0o644)

    with caplog.at_level(logging.WARNING, logger="esfm.config"):
        load_config_file(path)

    assert "readable by other users" in caplog.text
    assert f"chmod 600 {path}" in caplog.text


def test_private_file_does_not_warn(tmp_path, caplog):
    path = _config(tmp_path, '[connection]\nurl = "http://x:9200"\n', mode=0o600)

    with caplog.at_level(logging.WARNING, logger="esfm.config"):
        load_config_file(path)

    assert caplog.records == []


@pytest.mark.parametrize(
    "url",
    [
        "localhost:9200",
        "ftp://x:9200",
        "127.0.0.1",
        "http://127.0.0.1:99999",
        "http://127.0.0.1:abc",
        "http://[::1",
        "http://",
    ],
)
def test_invalid_url_rejected(url):
    with pytest.raises(ConfigError) as caught:
        resolve_settings(environ={}, url=url)

    assert f"invalid cluster URL {url!r}" in caught.value.message
    assert "http://HOST:PORT" in caught.value.hint


def test_unknown_keys_rejected(tmp_path):
    path = _config(tmp_path, '[connection]\nurl = "http://x:9200"\nhots = "x"\n')

    with pytest.raises(ConfigError) as caught:
        load_config_file(path)

    assert "unknown key(s) hots" in caught.value.message
    assert "valid keys:" in caught.value.hint
    assert "url" in caught.value.hint


def test_password_without_username(tmp_path):
    with pytest.raises(ConfigError) as caught:
        resolve_settings(environ={"ESFM_PASSWORD": "s3cret"})

    assert "password is set but no username" in caught.value.message
    assert "s3cret" not in str(caught.value)


def test_invalid_toml_rejected(tmp_path):
    path = _config(tmp_path, "[connection\nurl = 1\n")

    with pytest.raises(ConfigError) as caught:
        load_config_file(path)

    assert "invalid TOML" in caught.value.message


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError) as caught:
        load_config_file(tmp_path / "absent.toml")

    assert "cannot read config file" in caught.value.message
    assert "--config" in caught.value.hint


def test_connection_must_be_table(tmp_path):
    path = _config(tmp_path, 'connection = "http://x:9200"\n')

    with pytest.raises(ConfigError) as caught:
        load_config_file(path)

    assert "must be a table, not str" in caught.value.message


def test_url_with_password_rejected():
    with pytest.raises(ConfigError) as caught:
        resolve_settings(environ={}, url="http://elastic:hunter2pass@127.0.0.1:9200")
    assert "contains credentials" in caught.value.message
    assert "hunter2pass" not in str(caught.value)
    assert "ESFM_PASSWORD" in caught.value.hint
