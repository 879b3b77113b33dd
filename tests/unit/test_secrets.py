"""Secrets never reach logs, JSON output, error messages or the state file."""

from __future__ import annotations

import base64
import logging
import socket

from click.testing import CliRunner

from esfm.cli.main import cli
from esfm.config import RedactingFilter, redact, register_secret, resolve_settings

PASSWORD = "pw-9f3c1e7a-hostile"
API_KEY_SECRET = "key-5b2d8e41-secret"
API_KEY = base64.b64encode(f"keyid123:{API_KEY_SECRET}".encode()).decode()
TOKEN = "tok-71c0aa93-bearer"


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_settings_repr_masks_secrets():
    settings = resolve_settings(
        environ={"ESFM_USERNAME": "u", "ESFM_PASSWORD": PASSWORD},
        url="http://127.0.0.1:1",
    )
    assert PASSWORD not in repr(settings)
    assert PASSWORD not in str(settings.describe())


def test_redact_removes_encoded_forms():
    register_secret(API_KEY)
    register_secret(PASSWORD, "elastic")
    basic = base64.b64encode(f"elastic:{PASSWORD}".encode()).decode()
    text = f"{API_KEY} {API_KEY_SECRET} {PASSWORD} Basic {basic}"
    cleaned = redact(text, environ={})
    assert API_KEY not in cleaned
    assert API_KEY_SECRET not in cleaned
    assert PASSWORD not in cleaned
    assert basic not in cleaned


def test_log_filter_redacts():
    register_secret(TOKEN)
    record = logging.LogRecord(
        "x", logging.INFO, __file__, 1, "token %s", (TOKEN,), None
    )
    RedactingFilter().filter(record)
    assert TOKEN not in record.getMessage()


def _run_cli(args: list[str], env: dict[str, str]):
    return CliRunner().invoke(cli, args, env=env, catch_exceptions=False)


def test_cli_vv_json_output_has_no_secret(tmp_path):
    env = {
        "ESFM_HOME": str(tmp_path),
        "ESFM_URL": f"http://127.0.0.1:{_closed_port()}",
        "ESFM_USERNAME": "elastic",
        "ESFM_PASSWORD": PASSWORD,
        "ESFM_REQUEST_TIMEOUT": "1",
    }
    result = _run_cli(["-vv", "status", "--alias", "a", "--json"], env)
    assert result.exit_code != 0
    assert "cannot reach" in result.output
    assert PASSWORD not in result.output


def test_cli_api_key_not_in_output(tmp_path):
    env = {
        "ESFM_HOME": str(tmp_path),
        "ESFM_URL": f"http://127.0.0.1:{_closed_port()}",
        "ESFM_API_KEY": API_KEY,
    }
    result = _run_cli(["-vv", "status", "--alias", "a"], env)
    assert result.exit_code != 0
    assert API_KEY not in result.output
    assert API_KEY_SECRET not in result.output


def test_secret_options_do_not_exist():
    for option in ("--password", "--api-key", "--bearer-token"):
        result = CliRunner().invoke(cli, ["status", option, "x"])
        assert result.exit_code == 2
        assert "No such option" in result.output


def test_two_credentials_rejected(tmp_path):
    env = {
        "ESFM_HOME": str(tmp_path),
        "ESFM_URL": "http://127.0.0.1:1",
        "ESFM_USERNAME": "elastic",
        "ESFM_PASSWORD": PASSWORD,
        "ESFM_API_KEY": API_KEY,
    }
    result = _run_cli(["status", "--alias", "a"], env)
    assert result.exit_code == 2
    assert "several credentials" in result.output
    assert PASSWORD not in result.output


def test_invalid_fingerprint_rejected(tmp_path):
    env = {"ESFM_HOME": str(tmp_path), "ESFM_URL": "https://127.0.0.1:1"}
    result = _run_cli(["status", "--alias", "a", "--ssl-fingerprint", "00"], env)
    assert result.exit_code == 2
    assert "fingerprint" in result.output
    assert "Traceback" not in result.output
