"""paradec.train.trainer in one process: TrainConfig's checks and learning-rate schedule, the packed
dataset and its stateless batch order, a short run that writes a checkpoint which loads and
decodes, generation defaults taken from the data, refusals of data the model cannot hold,
fine-tuning from given weights, and resuming (bitwise equal to an uninterrupted run; every broken
checkpoint named)."""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import replace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import paradec
from paradec.models.loading import load_tokenizer
from paradec.train import trainer as trainer_module
from paradec.train.recipe import tiny_model_config
from paradec.train.tasks import arith
from paradec.train.trainer import PackedDataset, TrainConfig, train

from train.common import FMT, TINY, loss_log, train_config, trainer_state



@pytest.fixture(scope="module")
def trained(task_data, tmp_path_factory):
    """4 uninterrupted steps (checkpoints at 2 and 4)."""
    config = train_config(task_data, tmp_path_factory.mktemp("run") / "straight")
    return config, train(config)


# --- the config -------------------------------------------------------------------------------


@pytest.mark.parametrize("field, value", [
    ("steps", dict(steps=0)), ("batch_size", dict(batch_size=0)), ("save_every", dict(save_every=True)),
    ("lr", dict(lr=2.0)), ("warmup", dict(steps=10, warmup=11)), ("warmup", dict(warmup=-1)),
    ("min_lr", dict(min_lr=1.5)), ("attention", dict(attention="x")), ("max_minutes", dict(max_minutes=0)),
    ("model", dict(model={})),
])
def test_train_config_names_the_bad_field(field, value):
    base = dict(data="d", tokenizer="t", out="o", model={"model_type": "llada"}, steps=100, warmup=10)
    TrainConfig(**base)  # the base is valid
    with pytest.raises(paradec.ConfigError, match=field):
        TrainConfig(**(base | value))


def test_learning_rate_warms_up_then_decays_to_min_lr():
    config = TrainConfig(data="d", tokenizer="t", out="o", model={"model_type": "llada"}, steps=100, warmup=10,
                         lr=1e-3, min_lr=0.1)
    lrs = [config.lr_at(s) for s in range(101)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3) and lrs[10] == pytest.approx(1e-3)
    assert all(a <= b for a, b in zip(lrs[:10], lrs[1:10]))
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[100] == pytest.approx(1e-4)


def test_train_config_types_are_checked(task_data, tmp_path):
    for bad in (dict(lr="1e-3"), dict(grad_clip=None), dict(seed=-1), dict(model="config.json")):
        name = next(iter(bad))
        with pytest.raises(paradec.ConfigError, match=name):
            train_config(task_data, tmp_path, **bad)


# --- the dataset ------------------------------------------------------------------------------


def test_a_file_that_is_not_a_dataset_is_a_config_error(trained, tmp_path):
    _, out = trained
    with pytest.raises(paradec.ConfigError, match="not a paradec dataset"):
        PackedDataset(out / "model.safetensors")  # has metadata, not a dataset's
    with pytest.raises(paradec.ConfigError, match="does not exist"):
        PackedDataset(tmp_path / "none.safetensors")


def test_a_dataset_file_without_metadata_is_a_config_error(tmp_path):
    path = tmp_path / "bare.safetensors"
    save_file({"ids": torch.zeros(2, 3, dtype=torch.int32)}, path)
    with pytest.raises(paradec.ConfigError, match="not a paradec dataset"):
        PackedDataset(path)


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    """Dataset files of n rows (one token each) for the batch-order tests."""
    root, out = tmp_path_factory.mktemp("datasets"), {}
    for n in (1, 3, 7, 40):
        rows = torch.arange(n, dtype=torch.int32)[:, None]
        tensors = {"ids": rows, "segments": torch.zeros(n, 1, dtype=torch.int8),
                   "roles": torch.full((n, 1), 2, dtype=torch.int8)}
        save_file(tensors, root / f"{n}.safetensors", metadata={"paradec": json.dumps({"kind": "nap", "mask_id": 1})})
        out[n] = PackedDataset(root / f"{n}.safetensors")
    return out


@settings(max_examples=25, deadline=None)
@given(batch=st.integers(1, 50), seed=st.integers(0, 2**32))
@pytest.mark.parametrize("n", [1, 3, 7, 40])
def test_batches_cover_each_row_once_per_epoch(datasets, n, batch, seed):
    dataset = datasets[n]
    steps = max(2, -(-3 * n // batch))  # through at least three epochs
    order = torch.cat([dataset.batch_indices(seed, s, batch) for s in range(steps)]).tolist()
    assert len(order) == steps * batch
    for epoch in range(len(order) // n):
        assert sorted(order[epoch * n : (epoch + 1) * n]) == list(range(n)), epoch
    # Stateless: steps asked out of order (as on resume) get the same rows.
    backwards = [dataset.batch_indices(seed, s, batch).tolist() for s in reversed(range(steps))]
    assert sum(reversed(backwards), []) == order


def test_the_task_dataset_batches_are_real_rows(task_data):
    dataset = PackedDataset(task_data / "nap.safetensors")
    assert len(dataset) == 40 and dataset.meta["kind"] == "nap"
    epoch = torch.cat([dataset.batch_indices(0, s, 8) for s in range(5)])
    assert sorted(epoch.tolist()) == list(range(40))
    longcot = PackedDataset(task_data / "longcot.safetensors")
    assert len(longcot) == 40 and longcot.meta["kind"] == "longcot"
    assert (dataset.roles == 1).any() and not (longcot.roles == 1).any()


# --- training ---------------------------------------------------------------------------------


def test_training_writes_a_checkpoint_that_loads_and_decodes(trained):
    config, out = trained
    log = loss_log(out)
    assert [line["step"] for line in log] == [1, 2, 3, 4]
    assert all(math.isfinite(line["loss"]) and line["loss"] > 0 for line in log)
    assert [line["lr"] for line in log] == [config.lr_at(s) for s in range(4)]
    assert trainer_state(out)["step"] == 4
    with safe_open(out / "model.safetensors", framework="pt") as f:
        assert f.metadata()["step"] == "4"
    assert json.loads((out / "train_config.json").read_text())["dataset"]["kind"] == "nap"
    model = paradec.load(out)
    question = arith.test_problems()[0].question
    result = paradec.generate(model, question, blocks=2, block_len=8, summary_len=4)
    assert len(result.blocks) == 2 and len(result.token_ids) == 2 * 9 + 5
    assert model.spec.mask_id not in result.token_ids


def test_generation_defaults_follow_the_data(task_data, trained, tmp_path):
    _, nap_out = trained
    assert paradec.load(nap_out).generation == {"blocks": 4, "block_len": FMT.block_len, "summary_len": FMT.summary_len}
    longcot = train(train_config(task_data, tmp_path / "lc", data=str(task_data / "longcot.safetensors"), steps=1))
    model = paradec.load(longcot)
    assert model.generation == {"mode": "ao", "answer_len": FMT.longcot_len(4)}
    assert paradec.generate(model, "Tom has 5 pens . How many pens does Tom have now ?").blocks == []


def test_a_mask_id_that_differs_from_the_data_is_refused(task_data, tmp_path):
    tokenizer = load_tokenizer(task_data / "tokenizer")
    model = tiny_model_config(tokenizer, **TINY) | {"mask_token_id": 2}
    with pytest.raises(paradec.ConfigError, match="mask id differs"):
        train(train_config(task_data, tmp_path / "x", model=model))


def test_rows_longer_than_the_model_are_refused(task_data, tmp_path):
    tokenizer = load_tokenizer(task_data / "tokenizer")
    model = tiny_model_config(tokenizer, **TINY) | {"max_sequence_length": 64}
    with pytest.raises(paradec.ConfigError, match="maximum length 64"):
        train(train_config(task_data, tmp_path / "x", model=model))


def test_fine_tuning_starts_from_the_given_weights(task_data, trained, tmp_path):
    _, start = trained
    out = train(train_config(task_data, tmp_path / "ft", model={}, init_from=str(start), steps=1, lr=1e-9, warmup=0))
    a, b = paradec.load(start).module.state_dict(), paradec.load(out).module.state_dict()
    for k in a:  # one step at lr 1e-9 moves no weight by more than ~1e-9 (Adam's step <= lr)
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)


# --- resuming ---------------------------------------------------------------------------------


class _Interrupted(Exception):
    pass


def test_resumed_run_equals_an_uninterrupted_one(trained, tmp_path, monkeypatch):
    config, straight = trained
    save = trainer_module._save

    def save_then_die(cfg, model, model_config, optimizer, step, out, env):
        save(cfg, model, model_config, optimizer, step, out, env)
        if step == 2:
            raise _Interrupted

    monkeypatch.setattr(trainer_module, "_save", save_then_die)
    with pytest.raises(_Interrupted):
        train(replace(config, out=str(tmp_path / "cut")))
    monkeypatch.undo()
    assert trainer_state(tmp_path / "cut")["step"] == 2
    resumed = train(replace(config, out=str(shutil.copytree(tmp_path / "cut", tmp_path / "copy")), resume=True))
    # Same batches, noise, schedule and optimizer state: the CPU run is bitwise reproducible.
    a, b = paradec.load(straight).module.state_dict(), paradec.load(resumed).module.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    sa, sb = trainer_state(straight)["optimizer"]["state"], trainer_state(resumed)["optimizer"]["state"]
    assert all(torch.equal(sa[i][k], sb[i][k]) for i in sa for k in sa[i])
    timeless = lambda out: [{k: v for k, v in line.items() if k not in ("seconds", "tokens_per_s")}  # noqa: E731
                            for line in loss_log(out)]
    assert timeless(resumed) == timeless(straight)  # steps 1-2 from the cut run, 3-4 resumed


def test_resume_without_trainer_state_is_a_checkpoint_error(trained, tmp_path):
    config, out = trained
    copy = shutil.copytree(out, tmp_path / "copy")
    (copy / "trainer_state.pt").unlink()
    with pytest.raises(paradec.CheckpointError, match="trainer_state.pt"):
        train(replace(config, out=str(copy), resume=True))
    with pytest.raises(paradec.CheckpointError, match="no checkpoint"):
        train(replace(config, out=str(tmp_path / "empty"), resume=True))


def test_resume_from_an_interrupted_save_is_a_checkpoint_error(trained, tmp_path):
    config, out = trained
    copy = shutil.copytree(out, tmp_path / "copy")
    weights = copy / "model.safetensors"
    save_file(load_file(weights), weights, metadata={"step": "3"})  # weights of step 3, state of step 4
    with pytest.raises(paradec.CheckpointError, match="interrupted"):
        train(replace(config, out=str(copy), resume=True))


def test_resume_over_weights_without_a_step_is_a_checkpoint_error(trained, tmp_path):
    config, out = trained
    copy = shutil.copytree(out, tmp_path / "copy")
    weights = copy / "model.safetensors"
    save_file(load_file(weights), weights)  # no metadata at all
    with pytest.raises(paradec.CheckpointError):
        train(replace(config, out=str(copy), resume=True))


def test_a_corrupt_trainer_state_is_a_checkpoint_error(trained, tmp_path):
    config, out = trained
    copy = shutil.copytree(out, tmp_path / "copy")
    (copy / "trainer_state.pt").write_bytes(b"not a zip")
    with pytest.raises(paradec.CheckpointError, match="corrupt or partial"):
        train(replace(config, out=str(copy), resume=True, steps=6))
