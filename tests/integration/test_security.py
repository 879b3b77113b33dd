"""esfm against one local node with x-pack security: TLS, passwords, tokens, keys.

The node comes from ``esfm.cluster.start(security=True)``. Extra users and
roles live in the file realm (``bin/elasticsearch-users`` and ``roles.yml``),
because the integ-test distribution has no ``analysis-common`` module and so
cannot create the ``.security`` index that native users and API keys need.
API key tests therefore skip on that distribution with the server's reason.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import elasticsearch
import pytest
from click.testing import CliRunner, Result

from esfm import cluster as local_cluster
from esfm.cli.main import cli
from esfm.config import create_client, resolve_settings
from esfm.errors import ClusterError
from esfm.server import cluster_errors
from esfm.templates import REGISTRY_INDEX

SECURED_HEAP = "512m"
QUERY_USER = "esfm-query"
NO_INDEX_USER = "esfm-noindex"


class SecuredNode:
    """The running secured node and what clients need to reach it."""

    def __init__(self, state: local_cluster.ClusterState, home: Path) -> None:
        self.state = state
        self.home = home
        self.url = state.url
        self.ca_certs = state.ca_certs or ""
        self.fingerprint = state.ssl_fingerprint or ""
        self.password = local_cluster.read_password_file(Path(state.password_file))

    def admin(self) -> elasticsearch.Elasticsearch:
        return elasticsearch.Elasticsearch(
            self.url, basic_auth=("elastic", self.password), ca_certs=self.ca_certs
        )


def _add_file_user(node: SecuredNode, username: str, password: str, role: str) -> None:
    config = Path(node.state.nodes[0].config_path)
    tool = Path(node.state.es_home) / "bin" / "elasticsearch-users"
    environment = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "ES_JAVA_HOME": node.state.java_home,
        "ES_PATH_CONF": str(config),
    }
    # NOTE: elasticsearch-users takes the password on argv only; this is a
    # throwaway user of a test node on 127.0.0.1.
    subprocess.run(
        [str(tool), "useradd", username, "-p", password, "-r", role],
        env=environment,
        check=True,
        capture_output=True,
    )
    owner = config.stat()
    for name in ("users", "users_roles"):
        os.chown(config / name, owner.st_uid, owner.st_gid)


def _wait_for_login(node: SecuredNode, username: str, password: str) -> None:
    # The file realm rereads its files every few seconds.
    client = elasticsearch.Elasticsearch(
        node.url, basic_auth=(username, password), ca_certs=node.ca_certs
    )
    deadline = time.monotonic() + 60
    while True:
        try:
            client.security.authenticate()
            return
        except elasticsearch.AuthenticationException:
            if time.monotonic() > deadline:
                raise
            time.sleep(1)


ROLES_YML = f"""
esfm_query:
  cluster: ["monitor"]
  indices:
    - names: ["esfm-*", "{REGISTRY_INDEX}"]
      privileges: ["read", "view_index_metadata"]
esfm_no_index:
  cluster: ["monitor"]
"""


@pytest.fixture(scope="module")
def secured(request, esfm_test_home: Path, es_cache_dir: Path) -> SecuredNode:
    name = f"pytest-{os.getpid()}-sec"
    try:
        state = local_cluster.start(
            name=name,
            security=True,
            heap=SECURED_HEAP,
            http_port=local_cluster.find_free_http_port(1, start=23000),
            home=esfm_test_home,
            cache_dir=es_cache_dir,
        )
    except local_cluster.LocalClusterError as exc:
        pytest.fail(f"cannot start the secured local node: {exc}", pytrace=False)
    request.addfinalizer(lambda: local_cluster.stop(name, home=esfm_test_home))
    node = SecuredNode(state, esfm_test_home)

    config = Path(state.nodes[0].config_path)
    with open(config / "roles.yml", "a", encoding="utf-8") as roles:
        roles.write(ROLES_YML)
    node.query_password = uuid.uuid4().hex
    node.noindex_password = uuid.uuid4().hex
    _add_file_user(node, QUERY_USER, node.query_password, "esfm_query")
    _add_file_user(node, NO_INDEX_USER, node.noindex_password, "esfm_no_index")
    _wait_for_login(node, QUERY_USER, node.query_password)
    _wait_for_login(node, NO_INDEX_USER, node.noindex_password)
    # The token service needs a license above basic.
    node.admin().license.post_start_trial(acknowledge=True)
    return node


@pytest.fixture
def cli_env(secured: SecuredNode, tmp_path: Path) -> Iterator[dict[str, str]]:
    """Environment for CLI runs: an empty ESFM_HOME and no inherited secrets."""
    environment = {
        "ESFM_HOME": str(tmp_path / "home"),
        "ESFM_URL": secured.url,
        "ESFM_CA_CERTS": secured.ca_certs,
    }
    for variable in ("ESFM_USERNAME", "ESFM_PASSWORD", "ESFM_API_KEY"):
        environment.setdefault(variable, "")
    environment["ESFM_BEARER_TOKEN"] = ""
    environment["ESFM_SSL_FINGERPRINT"] = ""
    environment["ESFM_CONFIG"] = ""
    yield environment


def _run(args: list[str], env: dict[str, str]) -> Result:
    return CliRunner().invoke(cli, args, env=env, catch_exceptions=False)


def _status(env: dict[str, str], *extra: str) -> Result:
    alias = f"esfm-sec-{uuid.uuid4().hex[:8]}"
    return _run(["-vv", "status", "--alias", alias, "--json", *extra], env)


def _create_api_key(client, **body) -> dict:
    try:
        return client.security.create_api_key(**body)
    except elasticsearch.BadRequestError as exc:
        if "pattern_capture" in str(exc):
            pytest.skip(
                "this distribution lacks the analysis-common module, so the "
                f".security index for API keys cannot be created: {exc.message}"
            )
        raise


# --------------------------------------------------------------------------
# The node itself


def test_state_file_has_no_password(secured):
    text = Path(secured.state.path).read_text()
    assert secured.password not in text
    assert secured.state.password_file in text


def test_secret_files_are_private(secured):
    for path in (secured.state.path, secured.state.password_file):
        assert Path(path).stat().st_mode & 0o777 == 0o600


def test_node_listens_on_loopback_https(secured):
    assert secured.url.startswith("https://127.0.0.1:")


def test_status_reports_security(secured):
    report = local_cluster.status(secured.state.name, home=secured.home)
    assert report.running
    assert report.health is not None
    assert report.security


# --------------------------------------------------------------------------
# Ways to authenticate


def test_basic_auth_with_ca_file(secured, cli_env):
    cli_env.update(ESFM_USERNAME="elastic", ESFM_PASSWORD=secured.password)
    result = _status(cli_env)
    assert result.exit_code == 0, result.output
    assert secured.password not in result.output


def test_basic_auth_with_fingerprint(secured, cli_env):
    cli_env.update(ESFM_USERNAME="elastic", ESFM_PASSWORD=secured.password)
    cli_env["ESFM_CA_CERTS"] = ""
    result = _status(cli_env, "--ssl-fingerprint", secured.fingerprint)
    assert result.exit_code == 0, result.output


def test_bearer_token_from_password_grant(secured, cli_env):
    token = secured.admin().security.get_token(
        grant_type="password", username="elastic", password=secured.password
    )["access_token"]
    cli_env["ESFM_BEARER_TOKEN"] = token
    result = _status(cli_env)
    assert result.exit_code == 0, result.output
    assert token not in result.output


def test_api_key_authenticates(secured, cli_env):
    key = _create_api_key(secured.admin(), name="esfm-test")
    cli_env["ESFM_API_KEY"] = key["encoded"]
    result = _status(cli_env)
    assert result.exit_code == 0, result.output
    assert key["encoded"] not in result.output
    assert key["api_key"] not in result.output


def test_config_file_credentials(secured, cli_env, tmp_path):
    config = tmp_path / "esfm.toml"
    config.write_text(
        f'[connection]\nusername = "elastic"\npassword = "{secured.password}"\n'
    )
    config.chmod(0o600)
    cli_env["ESFM_CONFIG"] = str(config)
    result = _status(cli_env)
    assert result.exit_code == 0, result.output
    assert secured.password not in result.output


# --------------------------------------------------------------------------
# Failures: one clear message, non-zero exit, no secret in the output


def test_wrong_password_is_clear(secured, cli_env):
    wrong = "wrong-" + uuid.uuid4().hex
    cli_env.update(ESFM_USERNAME="elastic", ESFM_PASSWORD=wrong)
    result = _status(cli_env)
    assert result.exit_code != 0
    assert "authentication failed" in result.output
    assert "ESFM_PASSWORD" in result.output
    assert wrong not in result.output
    assert "Traceback" not in result.output


def test_expired_api_key_is_clear(secured, cli_env):
    key = _create_api_key(secured.admin(), name="esfm-expiring", expiration="1s")
    cli_env["ESFM_API_KEY"] = key["encoded"]
    deadline = time.monotonic() + 30
    while True:
        result = _status(cli_env)
        if result.exit_code != 0 or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert result.exit_code != 0
    assert "expired" in result.output
    assert "ESFM_API_KEY" in result.output
    assert key["encoded"] not in result.output


def test_wrong_fingerprint_is_clear(secured, cli_env):
    cli_env.update(ESFM_USERNAME="elastic", ESFM_PASSWORD=secured.password)
    cli_env["ESFM_CA_CERTS"] = ""
    result = _status(cli_env, "--ssl-fingerprint", "ab" * 32)
    assert result.exit_code != 0
    assert "fingerprint" in result.output
    assert secured.password not in result.output


def test_wrong_ca_is_clear(secured, cli_env, tmp_path):
    # A CA that esfm did not use to sign the node certificate.
    other_ca = local_cluster.ensure_certificates(
        Path(secured.state.es_home), secured.state.java_home, tmp_path / "other"
    )
    cli_env.update(ESFM_USERNAME="elastic", ESFM_PASSWORD=secured.password)
    cli_env["ESFM_CA_CERTS"] = str(other_ca)
    result = _status(cli_env)
    assert result.exit_code != 0
    assert "not signed by a trusted CA" in result.output
    assert "--ca-certs" in result.output


def test_http_to_https_port_is_clear(secured, cli_env):
    cli_env["ESFM_URL"] = secured.url.replace("https://", "http://")
    # Without -v, because -vv logs the client's retries with tracebacks.
    result = _run(["status", "--alias", "esfm-sec-http", "--json"], cli_env)
    assert result.exit_code != 0
    assert "Traceback" not in result.output
    assert "error:" in result.output


def test_missing_index_privilege_is_clear(secured, cli_env):
    cli_env.update(ESFM_USERNAME=NO_INDEX_USER, ESFM_PASSWORD=secured.noindex_password)
    result = _run(["templates", "push"], cli_env)
    assert result.exit_code != 0
    assert "lacks a privilege" in result.output
    assert "docs/security.md" in result.output
    assert secured.noindex_password not in result.output


# --------------------------------------------------------------------------
# Least privilege: a query-only user reads but cannot write


def test_query_user_can_read(secured, cli_env):
    cli_env.update(ESFM_USERNAME=QUERY_USER, ESFM_PASSWORD=secured.query_password)
    result = _run(["templates", "list", "--json"], cli_env)
    assert result.exit_code == 0, result.output
    assert isinstance(json.loads(result.output), list)


def test_query_user_cannot_write(secured, cli_env):
    cli_env.update(ESFM_USERNAME=QUERY_USER, ESFM_PASSWORD=secured.query_password)
    result = _run(["templates", "push"], cli_env)
    assert result.exit_code != 0
    assert "lacks a privilege" in result.output


def test_query_only_api_key_cannot_write(secured):
    key = _create_api_key(
        secured.admin(),
        name="esfm-query-only",
        role_descriptors={
            "query": {
                "indices": [
                    {"names": ["esfm-*"], "privileges": ["read", "view_index_metadata"]}
                ]
            }
        },
    )
    client = create_client(
        resolve_settings(
            url=secured.url, api_key=key["encoded"], ca_certs=secured.ca_certs
        )
    )
    with pytest.raises(ClusterError) as caught:
        with cluster_errors(client, "creating a test index"):
            client.indices.create(index=f"esfm-deny-{uuid.uuid4().hex[:8]}")
    assert "lacks a privilege" in caught.value.message


# --------------------------------------------------------------------------
# Restart of a secured cluster


def test_secured_restart_keeps_credentials(esfm_test_home: Path, es_cache_dir: Path):
    # A cluster of its own, because stopping the module's node would end the
    # other tests. The second start reuses the keystore, certificates and
    # password file of the first, which the service account owns as root.
    name = f"pytest-{os.getpid()}-sec-restart"
    options = {
        "name": name,
        "security": True,
        "heap": SECURED_HEAP,
        "http_port": local_cluster.find_free_http_port(1, start=24000),
        "home": esfm_test_home,
        "cache_dir": es_cache_dir,
    }
    try:
        first = local_cluster.start(**options)
        local_cluster.stop(name, home=esfm_test_home)
        second = local_cluster.start(**options)
        password_mode = Path(second.password_file).stat().st_mode & 0o777
        password = local_cluster.read_password_file(Path(second.password_file))
        client = elasticsearch.Elasticsearch(
            second.url, basic_auth=("elastic", password), ca_certs=second.ca_certs
        )
        user = client.security.authenticate()
        client.close()
    finally:
        local_cluster.stop(name, home=esfm_test_home)
        local_cluster.wipe(name, home=esfm_test_home)

    assert second.password_file == first.password_file
    assert password_mode == 0o600
    assert second.ca_certs == first.ca_certs
    assert second.ssl_fingerprint == first.ssl_fingerprint
    assert user["username"] == "elastic"
    assert list((esfm_test_home / "clusters").glob("*.lock")) == []
