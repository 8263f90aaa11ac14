"""``python -m paradec.train`` (paradec.train.__main__): data, fit and export end to end (export as
its own process, through the module's entry point), and fit's default warm-up with few steps."""

from __future__ import annotations

import json
import subprocess
import sys

import torch

import paradec
from paradec.train.__main__ import main

from train.common import ENV, loss_log



def _cli(*args, cwd):
    done = subprocess.run([sys.executable, "-m", "paradec.train", *map(str, args)], capture_output=True, text=True,
                          timeout=120, env=ENV, cwd=cwd)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_cli_data_fit_export(tmp_path, capsys):
    # data and fit run in this process (data still builds its chunk in a spawned worker process);
    # export runs as `python -m paradec.train`, so the module's entry point is covered too.
    data = tmp_path / "data"
    main(["data", "--out", str(data), "--problems", "30"])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary == {"nap": {"kept": 30, "rejected": {}}, "longcot": {"kept": 30, "rejected": {}}}
    assert json.loads((data / "curation.json").read_text())["nap"]["kept"] == 30
    ckpt, dest = tmp_path / "ckpt", tmp_path / "dest"
    main(["fit", "--data", str(data / "nap.safetensors"), "--tokenizer", str(data / "tokenizer"), "--out", str(ckpt),
          "--layers", "1", "--width", "32", "--heads", "2", "--mlp", "64", "--steps", "2", "--batch-size", "2",
          "--warmup", "1"])
    assert [line["step"] for line in loss_log(ckpt)] == [2]
    out = _cli("export", ckpt, dest, "--dtype", "bf16", cwd=tmp_path)
    assert "exported" in out and not (dest / "trainer_state.pt").exists()
    assert (dest / "model.safetensors").stat().st_size < 0.6 * (ckpt / "model.safetensors").stat().st_size
    exported, source = paradec.load(dest), paradec.load(ckpt)
    for (name, p), (_, q) in zip(exported.module.named_parameters(), source.module.named_parameters()):
        assert torch.equal(p, q.bfloat16().float()), name


def test_cli_fit_with_few_steps_and_the_default_warmup(task_data, tmp_path):
    main(["fit", "--data", str(task_data / "nap.safetensors"), "--tokenizer", str(task_data / "tokenizer"),
          "--out", str(tmp_path / "ckpt"), "--layers", "1", "--width", "32", "--heads", "2", "--mlp", "64",
          "--steps", "2", "--batch-size", "2"])
    assert (tmp_path / "ckpt" / "model.safetensors").exists()
