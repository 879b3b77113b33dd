"""The train, evaluate and data commands through click's CliRunner."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from esfm.cli.main import cli
from tests.unit.test_data import write_ml1m


def test_data_info_json(tmp_path):
    folder = write_ml1m(tmp_path / "ml-1m")
    result = CliRunner().invoke(cli, ["data", "info", str(folder), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["dataset"] == "ml-1m"
    assert summary["ratings"] == 4


def test_data_info_reports_bad_line(tmp_path):
    folder = write_ml1m(tmp_path / "ml-1m", ratings="1::1::5::1\n1::2::x::2\n")
    result = CliRunner().invoke(cli, ["data", "info", str(folder)])
    assert result.exit_code == 1
    assert "malformed line 2" in result.output


def test_train_without_data_fails(monkeypatch, tmp_path):
    monkeypatch.delenv("ESFM_DATA", raising=False)
    result = CliRunner().invoke(cli, ["train", "--out", str(tmp_path / "m")])
    assert result.exit_code == 2
    assert "no dataset given" in result.output


def test_train_then_evaluate(ml100k_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("ESFM_DATA", str(ml100k_dir))
    out = tmp_path / "model"
    options = ["--k", "4", "--epochs", "1", "--batch-size", "4096", "--lr", "0.01"]
    runner = CliRunner()
    trained = runner.invoke(
        cli,
        ["train", "--out", str(out), *options, "--cold-start-holdout", "0.1", "--json"],
    )
    assert trained.exit_code == 0, trained.output
    metrics = json.loads(trained.output)
    assert metrics["model_id"].startswith("ml-100k-")
    assert (out / "model.safetensors").is_file()

    config = json.loads((out / "config.json").read_text())
    assert config["kernel"] == "numba"
    assert json.loads((out / "metrics.json").read_text())["kernel"] == "numba"

    evaluated = runner.invoke(cli, ["evaluate", "--model", str(out), "--json"])
    assert evaluated.exit_code == 0, evaluated.output
    report = json.loads(evaluated.output)
    assert report["model_id"] == metrics["model_id"]
    assert report["cold_start"]["held_out_users"] == 94

    table = runner.invoke(cli, ["evaluate", "--model", str(out)])
    assert table.exit_code == 0, table.output
    assert "cold start: model" in table.output


def test_train_help_matches_defaults():
    from esfm.train import OPTIMIZER_DEFAULTS, TrainConfig

    result = CliRunner().invoke(cli, ["train", "--help"])
    defaults = TrainConfig()
    text = " ".join(result.output.split())
    assert f"[default: {defaults.batch_size}]" in text
    assert f"[default: {defaults.optimizer}]" in text
    assert f"[default: {defaults.threads}]" in text
    assert f"[default: {defaults.kernel}]" in text
    for name, settings in OPTIMIZER_DEFAULTS.items():
        assert f"{settings['lr']:g} with {name}" in text
        assert f"{settings['weight_decay']:g} with {name}" in text
    assert f"[default: {defaults.patience}]" in text
    assert f"[default: {defaults.k}]" in text
    assert f"[default: {defaults.epochs}]" in text


def test_train_rejects_bad_out_before_training(tmp_path):
    folder = write_ml1m(tmp_path / "ml-1m")
    a_file = tmp_path / "notes.txt"
    a_file.write_text("not a model")
    full = tmp_path / "full"
    full.mkdir()
    (full / "other.txt").write_text("keep me")
    # A config.json alone does not make a folder a model to replace.
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "config.json").write_text("{}")
    (mixed / "notes.txt").write_text("keep me too")
    cases = [
        (a_file, "is a file, not a folder"),
        (a_file / "sub", "cannot create"),
        (full, "is not empty and is not a model folder (it contains other.txt)"),
        (mixed, "is not empty and is not a model folder (it contains notes.txt)"),
        (Path("/"), "cannot write a model to '/'"),
    ]
    for out, message in cases:
        result = CliRunner().invoke(
            cli, ["train", "--data", str(folder), "--out", str(out), "--epochs", "1"]
        )
        output = " ".join(result.output.split())  # rich wraps long lines
        assert result.exit_code == 1, result.output
        assert message in output
        assert "epoch" not in output
    assert (full / "other.txt").read_text() == "keep me"
    assert (mixed / "notes.txt").read_text() == "keep me too"


def test_train_rejects_current_folder_as_out(tmp_path, monkeypatch):
    folder = write_ml1m(tmp_path / "ml-1m")
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(
        cli, ["train", "--data", str(folder), "--out", ".", "--epochs", "1"]
    )
    output = " ".join(result.output.split())
    assert result.exit_code == 1, result.output
    assert "is not empty and is not a model folder" in output
    assert "epoch" not in output


def test_train_kernel_choice(tmp_path):
    folder = write_ml1m(tmp_path / "ml-1m")
    runner = CliRunner()
    rejected = runner.invoke(
        cli,
        [
            "train",
            "--data",
            str(folder),
            "--out",
            str(tmp_path / "m"),
            "--kernel",
            "cuda",
        ],
    )
    assert rejected.exit_code == 2
    assert "'cuda' is not one of 'numba', 'torch-compile', 'torch'" in rejected.output
    assert not (tmp_path / "m").exists()
