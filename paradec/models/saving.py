"""Writing a model as a Hugging Face-style checkpoint directory that ``paradec.load`` reads:
``config.json`` in the family's own format, ``model.safetensors`` under the family's own
parameter names (fused q/k/v and gate/up split back into their parts), and the tokenizer."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from paradec.models.loading import SINGLE_FILE, family_of
from paradec.models.transformer import DiffusionTransformer


def checkpoint_state(module: DiffusionTransformer, config: dict, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Checkpoint name -> tensor (on the CPU, in ``dtype`` or the module's), the inverse of loading."""
    family = family_of(config, "config")
    cfg = family.transformer_config(config, "config")
    params = dict(module.named_parameters(remove_duplicate=False))
    out = {}
    for name, (target, part) in family.checkpoint_names(cfg).items():
        tensor = params[target].detach()
        sizes = cfg.fused_parts(target)
        if sizes is not None:
            tensor = tensor.split(list(sizes))[part]
        out[name] = tensor.to(device="cpu", dtype=dtype or tensor.dtype).contiguous()
    return out


def save_checkpoint(module: DiffusionTransformer, config: dict, root: str | Path, tokenizer=None,
                    dtype: torch.dtype | None = None, metadata: dict[str, str] | None = None) -> Path:
    """Writes config.json, model.safetensors (``metadata`` in its header) and the tokenizer.
    Each file is written under a temporary name and renamed, so a reader never sees half a file."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    weights = root / SINGLE_FILE
    save_tensors(checkpoint_state(module, config, dtype), weights, metadata=metadata)
    _tmp(root / "config.json").write_text(json.dumps(config, indent=1) + "\n")
    os.replace(_tmp(root / "config.json"), root / "config.json")
    if tokenizer is not None:
        tokenizer.save_pretrained(root)
    return root


def save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """A safetensors file written under a temporary name and renamed, with the permissions of
    any file this process creates (safetensors itself leaves 0600, unreadable to a group)."""
    save_file(tensors, _tmp(path), metadata=metadata)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(_tmp(path), 0o666 & ~umask)
    os.replace(_tmp(path), path)


def _tmp(path: Path) -> Path:
    return path.with_name(path.name + ".tmp")
