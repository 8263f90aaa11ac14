"""paradec.models.saving as the trainer uses it: checkpoints that load identically, bf16 export;
and loading's refusal of truncated or garbage weights files (tiny LLaDA, tied LLaDA and Dream)."""

from __future__ import annotations

import random
import shutil

import pytest
import torch
from safetensors import safe_open

import paradec
from paradec.models import AttentionSpec, build
from paradec.models.loading import load_tokenizer
from paradec.models.saving import save_checkpoint

from tiny import dream_config, llada_config, tiny_checkpoint, write_tokenizer



@pytest.fixture(params=["llada", "dream", "llada-tied"])
def built(request, tmp_path):
    vocab = write_tokenizer(tmp_path / "tokenizer")
    tokenizer = load_tokenizer(tmp_path / "tokenizer")
    if request.param == "dream":
        config = dream_config(vocab)
    else:
        config = llada_config(vocab, weight_tying=request.param == "llada-tied")
    return build(config, seed=4, tokenizer=tokenizer), config


def _args(model, seed=0):
    spec = AttentionSpec.from_lengths("isolated", 4, [5, 5], 3)
    positions = torch.arange(spec.total_len)
    ids = torch.randint(5, 60, (spec.total_len,), generator=torch.Generator().manual_seed(seed))
    return ids[None], positions[None], spec.segment_ids(positions)[None], "isolated"


def test_saved_checkpoint_loads_identically(built, tmp_path):
    model, config = built
    root = save_checkpoint(model.module, config, tmp_path / "ckpt", model.tokenizer, metadata={"step": "7"})
    assert sorted(p.name for p in root.iterdir() if p.suffix == ".tmp") == []
    loaded = paradec.load(root)
    ours, theirs = dict(model.module.named_parameters()), dict(loaded.module.named_parameters())
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert torch.equal(loaded(*_args(model)), model(*_args(model)))
    assert loaded.spec == model.spec
    with safe_open(root / "model.safetensors", framework="pt") as f:
        assert f.metadata() == {"step": "7"}


def test_bf16_export_is_smaller_and_loads(built, tmp_path):
    model, config = built
    fp32 = save_checkpoint(model.module, config, tmp_path / "fp32", model.tokenizer)
    bf16 = save_checkpoint(model.module, config, tmp_path / "bf16", model.tokenizer, dtype=torch.bfloat16)
    size = lambda root: (root / "model.safetensors").stat().st_size  # noqa: E731
    assert size(bf16) < 0.6 * size(fp32)
    with safe_open(bf16 / "model.safetensors", framework="pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    loaded = paradec.load(bf16)  # fp32 on the CPU
    for name, param in loaded.module.named_parameters():
        assert torch.equal(param, dict(model.module.named_parameters())[name].bfloat16().float()), name
    assert paradec.load(bf16, dtype=torch.bfloat16).dtype == torch.bfloat16


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root, _, _ = tiny_checkpoint(tmp_path_factory.mktemp("saved"), "llada", seed=8)
    return root


@pytest.mark.parametrize("keep", [0, 4, 100, 0.5, -1])
def test_a_truncated_weights_file_is_a_checkpoint_error(saved, tmp_path, keep):
    root = shutil.copytree(saved, tmp_path / "ckpt")
    weights = root / "model.safetensors"
    data = weights.read_bytes()
    n = int(len(data) * keep) if isinstance(keep, float) else keep % len(data) if keep < 0 else keep
    weights.write_bytes(data[:n])
    with pytest.raises(paradec.CheckpointError, match="corrupt or partial"):
        paradec.load(root)


@pytest.mark.parametrize("garbage", [
    random.Random(0).randbytes(4096),
    (12).to_bytes(8, "little") + b"not json!!!!" + bytes(64),  # a plausible length, then no header
], ids=["random-bytes", "no-header"])
def test_garbage_weights_are_a_checkpoint_error(saved, tmp_path, garbage):
    root = shutil.copytree(saved, tmp_path / "ckpt")
    (root / "model.safetensors").write_bytes(garbage)
    with pytest.raises(paradec.CheckpointError, match="corrupt or partial"):
        paradec.load(root)
