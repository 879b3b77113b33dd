"""Trainer: determinism, divergence, early stopping and atomic saving."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

import esfm.train as train_module
from esfm.data import load_movielens
from esfm.errors import ConfigError, ModelError, TrainingError
from esfm.model import FactorizationMachine, FMConfig
from esfm.train import (
    MODEL_FILES,
    FusedTrainer,
    TrainConfig,
    distinct_rows,
    save_model,
    split_ratings,
    train,
)

SMALL = dict(k=8, epochs=3, batch_size=64, lr=1e-2, weight_decay=1e-3, threads=1)


def test_same_seed_same_rmse(synthetic_dataset):
    first = train(synthetic_dataset, TrainConfig(**SMALL, seed=5))
    second = train(synthetic_dataset, TrainConfig(**SMALL, seed=5))
    assert round(first.metrics["valid_rmse"], 4) == round(
        second.metrics["valid_rmse"], 4
    )
    assert first.model_id == second.model_id


def test_other_seed_other_model(synthetic_dataset):
    first = train(synthetic_dataset, TrainConfig(**SMALL, seed=1))
    second = train(synthetic_dataset, TrainConfig(**SMALL, seed=2))
    assert first.model_id != second.model_id


def test_ml100k_beats_global_mean(ml100k_dir):
    dataset = load_movielens(ml100k_dir)
    config = TrainConfig(k=16, epochs=4, batch_size=1024, lr=5e-3, weight_decay=0.02)
    result = train(dataset, config)
    valid = result.metrics["valid_rmse"]
    spread = float(dataset.ratings["rating"].std())
    assert valid < spread - 0.1
    assert result.metrics["epochs"][0]["train_rmse"] > result.metrics["train_rmse"]


def test_ml100k_deterministic(ml100k_dir):
    dataset = load_movielens(ml100k_dir)
    subset = dataset.subset_users(range(1, 201))
    config = TrainConfig(k=8, epochs=2, batch_size=512, lr=5e-3, seed=3)
    rmse = [round(train(subset, config).metrics["valid_rmse"], 4) for _ in range(2)]
    assert rmse[0] == rmse[1]


def test_nan_rating_raises_training_error(synthetic_dataset, tmp_path):
    ratings = synthetic_dataset.ratings.copy()
    ratings.loc[ratings.index[::3], "rating"] = np.nan
    broken = type(synthetic_dataset)(
        "synthetic", ratings, synthetic_dataset.users, synthetic_dataset.movies
    )
    with pytest.raises(TrainingError, match="squared error is nan at epoch 1, batch 1"):
        train(broken, TrainConfig(**SMALL))
    assert list(tmp_path.iterdir()) == []


def test_huge_lr_diverges_or_stays_finite(synthetic_dataset):
    # Output is squashed by a sigmoid, so even lr=1e3 keeps the loss finite;
    # the result must then still contain only finite weights.
    result = train(synthetic_dataset, TrainConfig(**{**SMALL, "lr": 1e3}))
    for tensor in result.model.export_weights().values():
        assert np.isfinite(tensor.numpy()).all()


def test_invalid_config_rejected(synthetic_dataset):
    with pytest.raises(ConfigError, match="invalid batch_size 0"):
        train(synthetic_dataset, TrainConfig(batch_size=0))
    with pytest.raises(ConfigError, match="invalid valid_fraction"):
        TrainConfig(valid_fraction=1.5).validate()


@pytest.mark.parametrize(
    ("setting", "value"),
    [
        ("seed", -1),
        ("seed", 2**70),
        ("threads", 10**20),
        ("k", 10**20),
        ("k", 4096),
        ("weight_decay", float("inf")),
    ],
)
def test_out_of_range_setting_rejected(setting, value):
    with pytest.raises(ConfigError, match=f"invalid {setting} "):
        TrainConfig(**{setting: value}).validate()


def test_holdout_of_every_user_rejected(synthetic_dataset):
    config = TrainConfig(**SMALL, cold_start_holdout=0.9999)
    with pytest.raises(ConfigError, match="none is left to train on"):
        train(synthetic_dataset, config)


def test_split_is_disjoint_and_complete():
    split = split_ratings(1000, TrainConfig(seed=4))
    parts = np.concatenate([split.train, split.early_stopping, split.valid])
    assert len(split.valid) == 100
    assert len(split.early_stopping) == 45
    assert sorted(parts.tolist()) == list(range(1000))


def test_validation_split_independent_of_early_stopping():
    with_stop = split_ratings(500, TrainConfig(seed=2, early_stopping_fraction=0.1))
    without = split_ratings(500, TrainConfig(seed=2, early_stopping_fraction=0.0))
    assert with_stop.valid.tolist() == without.valid.tolist()


def test_early_stopping_restores_best_epoch(synthetic_dataset):
    config = TrainConfig(**{**SMALL, "epochs": 30, "lr": 0.05, "weight_decay": 0.0})
    result = train(synthetic_dataset, TrainConfig(**{**config.__dict__, "patience": 2}))
    metrics = result.metrics
    scores = [epoch["early_stopping_rmse"] for epoch in metrics["epochs"]]
    assert metrics["best_epoch"] == int(np.argmin(scores)) + 1
    assert len(scores) <= metrics["best_epoch"] + 2
    assert (
        metrics["valid_rmse"]
        == metrics["epochs"][metrics["best_epoch"] - 1]["valid_rmse"]
    )


def test_cold_start_users_left_out(synthetic_dataset):
    result = train(synthetic_dataset, TrainConfig(**SMALL, cold_start_holdout=0.2))
    assert len(result.held_out_users) == 12
    users = {value for kind, value in result.vocabulary.features if kind == "user"}
    assert users.isdisjoint(str(user) for user in result.held_out_users)
    assert len(users) == 48


def test_callbacks_receive_progress(synthetic_dataset):
    epochs, batches = [], []
    train(
        synthetic_dataset,
        TrainConfig(**SMALL),
        on_epoch=epochs.append,
        on_batch=batches.append,
    )
    assert [event["epoch"] for event in epochs] == [1, 2, 3]
    assert batches[-1]["batch"] == batches[-1]["batches"]
    assert {"train_rmse", "valid_rmse", "early_stopping_rmse"} <= set(epochs[0])


# -- saving -----------------------------------------------------------------


@pytest.fixture
def trained(synthetic_dataset):
    return train(synthetic_dataset, TrainConfig(**SMALL, genres=True))


def test_save_writes_model_directory(trained, tmp_path):
    path = save_model(trained, tmp_path / "model")
    assert sorted(p.name for p in path.iterdir()) == sorted(MODEL_FILES)
    config = json.loads((path / "config.json").read_text())
    assert config["model_id"] == trained.model_id
    assert config["model_id"].startswith("synthetic-")
    assert config["movie_side_features"] == ["movie", "genre"]
    assert set(config["versions"]) >= {"esfm", "torch", "numpy", "python"}
    assert config["k"] == 8
    metrics = json.loads((path / "metrics.json").read_text())
    assert metrics["best_epoch"] >= 1
    assert {"epoch", "train_rmse", "valid_rmse", "seconds"} <= set(metrics["epochs"][0])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_save_replaces_existing_model(trained, synthetic_dataset, tmp_path):
    target = tmp_path / "model"
    save_model(trained, target)
    other = train(synthetic_dataset, TrainConfig(**SMALL, seed=9))
    save_model(other, target)
    config = json.loads((target / "config.json").read_text())
    assert config["model_id"] == other.model_id
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_crash_mid_save_leaves_old_model(
    trained, synthetic_dataset, tmp_path, monkeypatch
):
    target = tmp_path / "model"
    save_model(trained, target)
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    real_write = train_module._write_file
    calls = []

    def failing_write(path, payload):
        calls.append(path.name)
        if len(calls) == 3:
            real_write(path, payload[: len(payload) // 2])
            raise OSError(28, "No space left on device")
        real_write(path, payload)

    monkeypatch.setattr(train_module, "_write_file", failing_write)
    other = train(synthetic_dataset, TrainConfig(**SMALL, seed=9))
    with pytest.raises(ModelError, match="No space left on device"):
        save_model(other, target)
    after = {p.name: p.read_bytes() for p in target.iterdir()}
    assert after == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_crash_on_first_save_leaves_nothing(trained, tmp_path, monkeypatch):
    def failing_write(path, payload):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(train_module, "_write_file", failing_write)
    with pytest.raises(ModelError):
        save_model(trained, tmp_path / "model")
    assert list(tmp_path.iterdir()) == []


def test_failed_rename_restores_old_model(trained, tmp_path, monkeypatch):
    target = tmp_path / "model"
    save_model(trained, target)
    before = (target / "config.json").read_bytes()
    real_replace = os.replace

    def failing_replace(source, destination):
        # Moving the new model in fails; moving the old one aside and back works.
        if ".tmp-" in os.path.basename(source):
            raise OSError(18, "Invalid cross-device link")
        return real_replace(source, destination)

    monkeypatch.setattr(train_module.os, "replace", failing_replace)
    with pytest.raises(ModelError):
        save_model(trained, target)
    assert (target / "config.json").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_save_refuses_non_model_folder(trained, tmp_path):
    target = tmp_path / "documents"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    with pytest.raises(ModelError, match="is not a model folder"):
        save_model(trained, target)
    assert (target / "notes.txt").read_text() == "keep me"


def test_distinct_rows_match_unique():
    cases = [
        torch.tensor([7]),
        torch.tensor([30, 0, 30, 29, 0]),
        torch.randint(0, 31, (500,), generator=torch.Generator().manual_seed(1)),
    ]
    for index in cases:
        rows, inverse = distinct_rows(index, 31)
        expected_rows, expected_inverse = torch.unique(index, return_inverse=True)
        assert rows.tolist() == expected_rows.tolist()
        assert inverse.tolist() == expected_inverse.tolist()


def test_rowwise_adam_matches_its_formula():
    torch.manual_seed(0)
    k = 3
    state = torch.rand(2, 2 * (k + 1) + 2)
    grad = torch.randn(2, k + 1)
    lr, step = 0.01, 4
    schedule = torch.tensor([lr / (1 - 0.9**step), 1 - 0.999**step])
    updated = train_module.rowwise_adam_rows(state, grad, schedule)

    param, exp_avg = state[:, : k + 1], state[:, k + 1 : 2 * k + 2]
    row_sq, weight_sq = state[:, -2], state[:, -1]
    expected_avg = 0.9 * exp_avg + 0.1 * grad
    expected_row_sq = 0.999 * row_sq + 0.001 * (grad[:, :k] ** 2).mean(dim=1)
    expected_weight_sq = 0.999 * weight_sq + 0.001 * grad[:, k] ** 2
    second = torch.cat(
        [expected_row_sq.unsqueeze(1).expand(-1, k), expected_weight_sq[:, None]], 1
    )
    expected_param = param - schedule[0] * expected_avg / (
        (second / schedule[1]).sqrt() + 1e-8
    )
    assert torch.allclose(updated[:, : k + 1], expected_param, atol=1e-6)
    assert torch.allclose(updated[:, k + 1 : 2 * k + 2], expected_avg, atol=1e-6)
    assert torch.allclose(updated[:, -2], expected_row_sq, atol=1e-7)
    assert torch.allclose(updated[:, -1], expected_weight_sq, atol=1e-7)


@pytest.mark.parametrize("optimizer", ["adam", "rowwise_adam"])
def test_each_optimizer_learns(synthetic_dataset, optimizer):
    config = TrainConfig(**{**SMALL, "epochs": 4}, optimizer=optimizer)
    result = train(synthetic_dataset, config)
    history = result.metrics["epochs"]
    assert history[-1]["train_rmse"] < history[0]["train_rmse"]
    assert result.config.optimizer == optimizer


def test_optimizer_defaults_fill_unset_settings():
    assert TrainConfig().lr == train_module.OPTIMIZER_DEFAULTS["rowwise_adam"]["lr"]
    adam = TrainConfig(optimizer="adam")
    assert adam.weight_decay == train_module.OPTIMIZER_DEFAULTS["adam"]["weight_decay"]
    assert TrainConfig(optimizer="adam", lr=0.5).lr == 0.5


def test_unknown_optimizer_rejected(synthetic_dataset):
    with pytest.raises(ConfigError, match="invalid optimizer 'sgd'"):
        train(synthetic_dataset, TrainConfig(**SMALL, optimizer="sgd"))


@pytest.mark.parametrize("kernel", ["numba", "torch-compile"])
def test_kernel_matches_eager_torch(synthetic_dataset, kernel):
    eager = train(synthetic_dataset, TrainConfig(**SMALL, kernel="torch"))
    other = train(synthetic_dataset, TrainConfig(**SMALL, kernel=kernel))
    assert other.metrics["kernel"] == kernel
    assert eager.metrics["kernel"] == "torch"
    assert eager.metrics["compile_seconds"] is None
    # The kernels add in another order than eager torch, so the weights
    # agree to rounding, not bit for bit.
    assert other.metrics["valid_rmse"] == pytest.approx(
        eager.metrics["valid_rmse"], abs=1e-4
    )


def _trainers(optimizer, one_hot):
    torch.manual_seed(4)
    model = FactorizationMachine(FMConfig(n_features=20, k=6, init_std=0.2))
    config = TrainConfig(optimizer=optimizer, lr=0.05, weight_decay=0.1)
    return [
        FusedTrainer(model, config, one_hot=one_hot, kernel=kernel)
        for kernel in ("torch", "numba")
    ]


@pytest.mark.parametrize("optimizer", ["rowwise_adam", "adam"])
@pytest.mark.parametrize("one_hot", [True, False])
def test_numba_steps_match_torch_steps(optimizer, one_hot):
    torch_trainer, numba_trainer = _trainers(optimizer, one_hot)
    generator = torch.Generator().manual_seed(7)
    index = torch.randint(0, 20, (10, 4), generator=generator)
    value = torch.ones(10, 4)
    if not one_hot:
        # Weighted slots, and padding slots (row 20, x = 0) as genres have.
        value = torch.rand(10, 4, generator=generator) + 0.5
        index[::3, 3] = 20
        value[::3, 3] = 0.0
    target = torch.rand(10, generator=generator) * 4 + 1
    # Three batches of 4, 4 and 2 ratings, with the rate cut after the first.
    expected = torch_trainer.run_batches(index, value, target, 4, 0, 1)
    actual = numba_trainer.run_batches(index, value, target, 4, 0, 1)
    for trainer in (torch_trainer, numba_trainer):
        trainer.set_lr(0.01)
    expected = np.concatenate(
        [expected, torch_trainer.run_batches(index, value, target, 4, 1, 3)]
    )
    actual = np.concatenate(
        [actual, numba_trainer.run_batches(index, value, target, 4, 1, 3)]
    )
    assert numba_trainer.step_count == torch_trainer.step_count == 3
    assert actual == pytest.approx(expected, rel=1e-5)
    assert torch.allclose(numba_trainer.state, torch_trainer.state, atol=1e-5)
    assert torch.allclose(numba_trainer.bias_state, torch_trainer.bias_state, atol=1e-6)
    # The padding row stays zero, weights and moments alike.
    assert not numba_trainer.state[20].any()


def test_numba_stops_at_first_nan_batch():
    _, trainer = _trainers("rowwise_adam", True)
    index = torch.randint(0, 20, (12, 3), generator=torch.Generator().manual_seed(1))
    target = torch.full((12,), 3.0)
    target[5] = float("nan")
    errors = trainer.run_batches(index, torch.ones(12, 3), target, 4, 0, 3)
    assert len(errors) == 2
    assert np.isfinite(errors[0])
    assert np.isnan(errors[1])
    assert trainer.step_count == 2


def test_numba_rejects_rows_outside_table():
    _, trainer = _trainers("rowwise_adam", True)
    index = torch.tensor([[0, 5, 21]])
    before = trainer.state.clone()
    with pytest.raises(TrainingError, match="outside the table of 21 rows"):
        trainer.run_batches(index, torch.ones(1, 3), torch.ones(1), 1, 0, 1)
    assert torch.equal(trainer.state, before)


def test_numba_workspace_grows_with_batch():
    # Compiling on a small first batch must not leave buffers too small for
    # the real batches, because the kernel does not check bounds.
    _, trainer = _trainers("adam", True)
    index = torch.arange(20).repeat(3).view(12, 5) % 20
    value, target = torch.ones(12, 5), torch.full((12,), 4.0)
    trainer.compile_now(index[:1], value[:1], target[:1])
    assert trainer.step_count == 0
    errors = trainer.run_batches(index, value, target, 12, 0, 1)
    assert np.isfinite(errors).all()
    assert len(trainer._workspace.rows) >= 20


def test_unknown_kernel_rejected(synthetic_dataset):
    with pytest.raises(ConfigError, match="invalid kernel 'cuda'"):
        train(synthetic_dataset, TrainConfig(**SMALL, kernel="cuda"))


def test_failed_compile_falls_back_to_eager(synthetic_dataset, monkeypatch, caplog):
    # A fake, because the test cannot take the C++ compiler away: the
    # compiled step is replaced by one that fails as inductor does without one.
    def broken_compile():
        def step(*args, **kwargs):
            # Dynamo wraps the compiler's error, as BackendCompilerFailed does.
            cause = RuntimeError("Compiler: g++ is not found")
            raise RuntimeError("backend='inductor' raised:") from cause

        return step

    monkeypatch.setattr(train_module, "_compiled_step", broken_compile)
    with caplog.at_level("WARNING", logger="esfm.train"):
        result = train(synthetic_dataset, TrainConfig(**SMALL, kernel="torch-compile"))
    assert result.metrics["kernel"] == "torch"
    assert result.metrics["compile_seconds"] is None
    assert "g++ is not found" in caplog.text
    assert "--kernel torch" in caplog.text
    assert np.isfinite(result.metrics["valid_rmse"])


def test_training_restores_torch_threads(synthetic_dataset):
    before = torch.get_num_threads()
    train(synthetic_dataset, TrainConfig(**SMALL))
    assert torch.get_num_threads() == before


def test_saved_config_names_the_optimizer(synthetic_dataset, tmp_path):
    result = train(synthetic_dataset, TrainConfig(**SMALL, optimizer="adam"))
    config = json.loads(
        (save_model(result, tmp_path / "m") / "config.json").read_text()
    )
    assert config["optimizer"] == "adam"
    assert config["lr"] == SMALL["lr"]


def test_save_removes_stale_old_model(trained, tmp_path):
    target = tmp_path / "model"
    save_model(trained, target)
    # A save killed while deleting the replaced model leaves this folder.
    leftover = tmp_path / ".model.old-999999999"
    leftover.mkdir()
    (leftover / "config.json").write_text("{}")
    save_model(trained, target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_user_dropout_spares_user_rows(synthetic_dataset):
    def user_row_norm(dropout):
        config = TrainConfig(**{**SMALL, "lr": 0.05}, user_dropout=dropout)
        result = train(synthetic_dataset, config)
        rows = [
            row
            for row, (kind, _) in enumerate(result.vocabulary.features)
            if kind == "user"
        ]
        embedding = result.model.export_weights()["embedding"][rows]
        return float(embedding.norm(dim=1).mean()), result

    trained, plain = user_row_norm(0.0)
    spared, dropped = user_row_norm(0.95)
    # Initial rows have a norm of about 0.01 * sqrt(k) = 0.03.
    assert spared < 0.5 * trained
    assert dropped.model_id != plain.model_id
    assert dropped.model_id == user_row_norm(0.95)[1].model_id
    assert np.isfinite(dropped.metrics["valid_rmse"])


@pytest.mark.parametrize("dropout", [-0.1, 1.0, float("nan")])
def test_invalid_user_dropout_rejected(dropout):
    with pytest.raises(ConfigError, match="invalid user_dropout"):
        TrainConfig(user_dropout=dropout).validate()


def test_batch_larger_than_data_is_one_batch(synthetic_dataset):
    batches = []
    config = TrainConfig(**{**SMALL, "batch_size": 10**20, "epochs": 1})
    result = train(synthetic_dataset, config, on_batch=batches.append)
    assert [event["batches"] for event in batches] == [1]
    assert np.isfinite(result.metrics["valid_rmse"])


# -- interrupted and unusual saves ----------------------------------------


def test_save_follows_umask(trained, tmp_path):
    previous = os.umask(0o022)
    try:
        path = save_model(trained, tmp_path / "model")
    finally:
        os.umask(previous)
    assert path.stat().st_mode & 0o777 == 0o755


def test_save_removes_stale_staging_folder(trained, tmp_path):
    # A save killed while writing leaves its staging folder, named by its PID.
    leftover = tmp_path / ".model.tmp-999999999-abc"
    leftover.mkdir()
    (leftover / "config.json").write_text("{}")
    save_model(trained, tmp_path / "model")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_failed_save_restores_orphaned_old_model(
    trained, synthetic_dataset, tmp_path, monkeypatch
):
    target = tmp_path / "model"
    save_model(trained, target)
    before = (target / "config.json").read_bytes()
    # A save killed between its two renames leaves no model, only this folder.
    os.replace(target, tmp_path / ".model.old-999999999")

    def failing_write(path, payload):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(train_module, "_write_file", failing_write)
    with pytest.raises(ModelError):
        save_model(trained, target)
    assert (target / "config.json").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_save_through_symlink_leaves_no_link(trained, tmp_path):
    real = tmp_path / "v1"
    save_model(trained, real)
    link = tmp_path / "current"
    link.symlink_to(real)
    save_model(trained, link)
    assert link.is_dir()
    assert not link.is_symlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["current", "v1"]


def test_destination_checks_create_nothing(tmp_path):
    target = tmp_path / "a" / "b" / "model"
    assert train_module.check_model_destination(target) == target
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("length", [240, 300])
def test_destination_name_too_long(tmp_path, length):
    # 240 characters fit a folder name but not the staging folder's name.
    with pytest.raises(ModelError, match="cannot create") as caught:
        train_module.check_model_destination(tmp_path / ("m" * length))
    assert "shorter folder name" in caught.value.hint


def test_save_keeps_setgid_of_shared_parent(trained, tmp_path):
    import stat

    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o2770)
    path = save_model(trained, shared / "model")
    assert path.stat().st_mode & stat.S_ISGID
    assert (path / "config.json").stat().st_gid == shared.stat().st_gid


def test_lone_config_file_is_not_a_model(trained, tmp_path):
    target = tmp_path / "other-tool"
    target.mkdir()
    (target / "config.json").write_text('{"theirs": true}')
    with pytest.raises(ModelError, match="is not a model folder"):
        save_model(trained, target)
    assert (target / "config.json").read_text() == '{"theirs": true}'


def test_other_programs_model_folder_kept(trained, tmp_path):
    # The layout of a Hugging Face save_pretrained folder.
    target = tmp_path / "bert"
    target.mkdir()
    (target / "config.json").write_text('{"model_type": "bert"}')
    (target / "model.safetensors").write_bytes(b"weights")
    with pytest.raises(ModelError, match="without an esfm model_id"):
        save_model(trained, target)
    assert (target / "model.safetensors").read_bytes() == b"weights"


def test_empty_validation_split_rejected(synthetic_dataset):
    tiny = type(synthetic_dataset)(
        "tiny",
        synthetic_dataset.ratings.head(4),
        synthetic_dataset.users,
        synthetic_dataset.movies,
    )
    with pytest.raises(ConfigError, match="no ratings are left for validation"):
        train(tiny, TrainConfig(**SMALL))


_SIGTERM_SCRIPT = """
import signal, sys, time
import esfm.train as train_module
from esfm.cli.main import exit_on_sigterm
from esfm.train import TrainConfig, save_model, train
from tests.conftest import make_synthetic_dataset

target = sys.argv[1]
result = train(make_synthetic_dataset(), TrainConfig(k=4, epochs=1, batch_size=64))
save_model(result, target)
real_write = train_module._write_file

def slow_write(path, payload):
    real_write(path, payload)
    print("writing", flush=True)
    time.sleep(30)

train_module._write_file = slow_write
signal.signal(signal.SIGTERM, exit_on_sigterm)
other = train(make_synthetic_dataset(), TrainConfig(k=4, epochs=1, seed=1))
save_model(other, target)
"""


def test_sigterm_mid_save_keeps_old_model(tmp_path):
    import signal
    import subprocess
    import sys
    from pathlib import Path

    target = tmp_path / "model"
    root = Path(__file__).resolve().parents[2]
    process = subprocess.Popen(
        [sys.executable, "-c", _SIGTERM_SCRIPT, str(target)],
        cwd=root,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout.readline().strip() == "writing"
        before = (target / "config.json").read_bytes()
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 128 + signal.SIGTERM
    finally:
        process.kill()
    assert (target / "config.json").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_damaged_numba_cache_compiles_anew(synthetic_dataset, monkeypatch, caplog):
    # A fake, because a damaged cache file cannot be made on purpose without
    # knowing Numba's file layout: the cached kernel fails as it did when a
    # truncated cache file was loaded.
    import pickle

    from esfm import numba_step

    def damaged(*args):
        raise pickle.UnpicklingError("pickle data was truncated")

    cleared = []
    monkeypatch.setattr(numba_step, "run_batches", damaged)
    monkeypatch.setattr(numba_step, "clear_cache", lambda: cleared.append(True))
    with caplog.at_level("WARNING", logger="esfm.train"):
        result = train(synthetic_dataset, TrainConfig(**SMALL))
    assert result.metrics["kernel"] == "numba"
    assert cleared == [True]
    assert "pickle data was truncated" in caplog.text


def test_unwritable_numba_cache_runs_uncached(monkeypatch, caplog):
    # A fake, because root can write to every cache folder that Numba tries:
    # njit raises as it does when none is writable.
    from esfm import numba_step

    real_njit = numba_step.numba.njit

    def njit(**options):
        if options.get("cache"):
            raise RuntimeError("cannot cache function '_run_batches': no locator")
        return real_njit(**options)

    monkeypatch.setattr(numba_step.numba, "njit", njit)
    with caplog.at_level("WARNING", logger="esfm.numba_step"):
        kernel = numba_step._cached_kernel()
    assert "NUMBA_CACHE_DIR" in caplog.text
    assert kernel.py_func is numba_step._run_batches


@pytest.mark.parametrize(
    ("setting", "value", "expected"),
    [
        ("k", True, "must be an integer"),
        ("k", "8", "must be an integer"),
        ("batch_size", 1000.5, "must be an integer"),
        ("epochs", 1.5, "must be an integer"),
        ("threads", 1.5, "must be an integer"),
        ("lr", "0.1", "must be a number"),
        ("user_dropout", True, "must be a number"),
        ("genres", "no", "must be True or False"),
        ("optimizer", ["adam"], "must be a string"),
        ("lr_decay", float("inf"), "must be a positive number"),
        ("init_std", float("inf"), "must be a positive number"),
    ],
)
def test_setting_of_wrong_type_rejected(setting, value, expected):
    with pytest.raises(ConfigError, match=f"invalid {setting} .*{expected}"):
        TrainConfig(**{setting: value}).validate()


def test_numpy_scalars_become_python_numbers(synthetic_dataset):
    config = TrainConfig(
        **{**SMALL, "seed": np.int64(3), "lr": np.float32(0.01)},
        genres=np.bool_(True),
    )
    config.validate()
    assert type(config.seed) is int
    assert type(config.lr) is float
    assert config.genres is True
    assert np.isfinite(train(synthetic_dataset, config).metrics["valid_rmse"])
