"""Bad checkpoints and bad inputs fail loudly, naming the file, key or parameter."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import paradec
from paradec import CheckpointError, InputError
from paradec.models import AttentionSpec

from tiny import tiny_checkpoint


def _edit_config(root, **changes):
    path = root / "config.json"
    config = json.loads(path.read_text()) | changes
    path.write_text(json.dumps(config))


def _edit_weights(root, edit):
    path = root / "model.safetensors"
    weights = load_file(path)
    edit(weights)
    save_file(weights, path)


def test_unknown_model_type(tmp_path):
    root, _, _ = tiny_checkpoint(tmp_path, "llada")
    _edit_config(root, model_type="gpt2")
    with pytest.raises(CheckpointError, match=r"config.json: unknown model_type 'gpt2'"):
        paradec.load(root)


def test_missing_config_key(tmp_path):
    root, config, _ = tiny_checkpoint(tmp_path, "dream")
    del config["hidden_size"]
    (root / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="config.json: missing key 'hidden_size'"):
        paradec.load(root)


def test_unsupported_option_is_refused(tmp_path):
    root, _, _ = tiny_checkpoint(tmp_path, "llada")
    _edit_config(root, alibi=True)
    with pytest.raises(CheckpointError, match="alibi = True is not supported"):
        paradec.load(root)


def test_missing_weight(tmp_path):
    root, _, _ = tiny_checkpoint(tmp_path, "llada")
    _edit_weights(root, lambda w: w.pop("model.transformer.blocks.1.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"1 weights missing, e.g. model.transformer.blocks.1.up_proj.weight"):
        paradec.load(root)


def test_extra_weight(tmp_path):
    root, _, _ = tiny_checkpoint(tmp_path, "dream")
    _edit_weights(root, lambda w: w.update({"model.layers.0.self_attn.rotary.inv_freq": torch.ones(8)}))
    with pytest.raises(CheckpointError, match=r"no place for, e.g. model.layers.0.self_attn.rotary.inv_freq \(model.safetensors\)"):
        paradec.load(root)


def test_misshaped_weight(tmp_path):
    root, _, _ = tiny_checkpoint(tmp_path, "dream")
    _edit_weights(root, lambda w: w.update({"model.layers.1.mlp.up_proj.weight": torch.ones(95, 64)}))
    with pytest.raises(CheckpointError, match=r"model.layers.1.mlp.up_proj.weight has shape \(95, 64\), the config implies \(96, 64\)"):
        paradec.load(root)


def test_index_names_a_missing_shard(tmp_path):
    root, _, _ = tiny_checkpoint(tmp_path, "llada", shards=2)
    (root / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="names shard model-00002-of-00002.safetensors, which is missing"):
        paradec.load(root)


def test_index_places_a_weight_in_the_wrong_shard(tmp_path):
    root, _, _ = tiny_checkpoint(tmp_path, "llada", shards=2)
    index_path = root / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    name = next(n for n, f in index["weight_map"].items() if f.startswith("model-00001"))
    index["weight_map"][name] = "model-00002-of-00002.safetensors"
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=f"the index places {name} here, but the file lacks it"):
        paradec.load(root)


def test_no_safetensors(tmp_path):
    root, _, _ = tiny_checkpoint(tmp_path, "llada")
    (root / "model.safetensors").rename(root / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"no model.safetensors .* found \['pytorch_model.bin'\]"):
        paradec.load(root)


def test_missing_tokenizer_files(tmp_path):
    root, _, _ = tiny_checkpoint(tmp_path, "dream")
    (root / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match="no tokenizer files"):
        paradec.load(root)


def test_missing_config_file(tmp_path):
    root, _, _ = tiny_checkpoint(tmp_path, "dream")
    (root / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json: missing"):
        paradec.load(root)


def test_pad_id_equal_to_mask_id_is_refused(tmp_path):
    root, config, _ = tiny_checkpoint(tmp_path, "llada")
    _edit_config(root, pad_token_id=config["mask_token_id"])
    (root / "tokenizer_config.json").write_text(
        json.dumps(json.loads((root / "tokenizer_config.json").read_text()) | {"pad_token": "<|mask|>"})
    )
    with pytest.raises(CheckpointError, match=r"pad id equals the mask id \(1\)"):
        paradec.load(root)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    root, _, _ = tiny_checkpoint(tmp_path_factory.mktemp("llada"), "llada")
    return paradec.load(root)


def test_positions_beyond_max_length(model):
    ids = torch.full((1, 4), 10)
    positions = torch.tensor([[0, 1, 2, 256]])
    segments = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(InputError, match="position 256 is beyond the model's maximum length 256"):
        model(ids, positions, segments, "canvas")


def test_ids_outside_vocab(model):
    with pytest.raises(InputError, match=r"input_ids must lie in \[0, 96\)"):
        model(torch.tensor([[5, 96]]), torch.tensor([[0, 1]]), torch.zeros(1, 2, dtype=torch.long), "canvas")


def test_mismatched_shapes(model):
    with pytest.raises(InputError, match="must all be \\[B, T\\]"):
        model(torch.ones(1, 3, dtype=torch.long), torch.arange(4)[None], torch.zeros(1, 3, dtype=torch.long), "canvas")


def test_unknown_attention_mode(model):
    with pytest.raises(InputError, match="attention mode must be one of"):
        model(torch.ones(1, 3, dtype=torch.long), torch.arange(3)[None], torch.zeros(1, 3, dtype=torch.long), "causal")


def test_bad_prefill_lengths(model):
    with pytest.raises(InputError, match="lengths must be"):
        model.prefill(torch.ones(2, 5, dtype=torch.long), torch.tensor([3, 6]))


@pytest.mark.parametrize(
    "blocks, summary, message",
    [
        (((5, 9), (8, 12)), None, r"blocks\[1\] = \[8, 12\) overlaps"),
        (((5, 9), (10, 12)), None, r"blocks\[1\] = \[10, 12\) leaves a gap \[9, 10\)"),
        (((6, 9),), None, r"blocks\[0\] = \[6, 9\) leaves a gap \[5, 6\)"),
        (((5, 9),), (8, 10), r"summary = \[8, 10\) overlaps"),
        (((5, 5),), None, r"blocks\[0\] = \[5, 5\) is empty"),
    ],
)
def test_attention_spec_overlaps_and_gaps(blocks, summary, message):
    with pytest.raises(InputError, match=message):
        AttentionSpec("isolated", 5, blocks, summary)


def test_positions_outside_the_spec():
    spec = AttentionSpec.from_lengths("isolated", 3, [2, 2], 1)
    with pytest.raises(InputError, match="beyond this spec's length 8"):
        spec.segment_ids(torch.arange(9))
