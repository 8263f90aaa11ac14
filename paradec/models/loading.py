"""Loading diffusion LMs from Hugging Face checkpoint directories, without remote code.

A directory holds ``config.json``, the weights as one ``model.safetensors`` or several shards
with ``model.safetensors.index.json``, and tokenizer files. The checkpoint's own parameter names
are mapped onto paradec's modules; a missing, extra or mis-shaped weight is an error, never a
silent drop or a random initialisation.

No code a checkpoint ships is ever run: an ``auto_map`` (in config.json or tokenizer_config.json)
naming a ``modeling_*.py`` or ``tokenization_*.py`` is ignored with one log line, transformers is
always called with ``trust_remote_code=False``, and a tokenizer whose class lives in such a file
loads as the standard tokenizer its files describe (``tokenizer.json`` as a fast tokenizer,
``vocab.json`` + ``merges.txt`` as Qwen2's byte-level BPE, which is what Dream publishes).
"""

from __future__ import annotations

import difflib
import json
import logging
import os
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import torch
from safetensors import SafetensorError, safe_open

from paradec.errors import CheckpointError, ConfigError, InputError
from paradec.models import dream, llada
from paradec.models.spec import DEFAULT_SUMMARY_HEADER, DEFAULT_THINK_HEADER, ModelSpec
from paradec.models.cache import PromptCache
from paradec.models.transformer import DiffusionTransformer
from paradec.models.transformer_config import TransformerConfig

FAMILIES: dict[str, ModuleType] = {t: fam for fam in (llada, dream) for t in fam.MODEL_TYPES}
CONFIGS_DIR = Path(__file__).parent / "configs"
BUILTIN_DIR = Path(__file__).parent / "builtin"
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")
END_OF_TURN_TOKENS = ("<|eot_id|>", "<|im_end|>", "<|endoftext|>")
# The strings load(dtype=...) takes besides a torch.dtype.
DTYPES: dict[str, torch.dtype] = {
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
}
# Remote-code tokenizer classes known to be Qwen2's byte-level BPE under another name.
QWEN2_BPE_CLASSES = ("DreamTokenizer",)

logger = logging.getLogger(__name__)
_remote_code_noted: set[str] = set()  # checkpoint directories whose auto_map was already logged


@dataclass
class DiffusionModel:
    """A loaded masked-diffusion LM: the native module, its tokenizer and its spec."""

    module: DiffusionTransformer
    spec: ModelSpec
    tokenizer: object | None = None  # a transformers tokenizer; None for shape-only models
    generation: dict = field(default_factory=dict)  # the checkpoint's own generation defaults
    headers: dict = field(default_factory=dict, repr=False, compare=False)  # header text -> ids, read once
    engine: object | None = field(default=None, init=False, repr=False, compare=False)  # paradec.engine_for sets it

    @property
    def device(self) -> torch.device:
        return self.module.embed.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.module.embed.weight.dtype

    def prefill(
        self, prompt_ids: torch.Tensor, lengths: torch.Tensor, reserve: int = 0, check_inputs: bool = True
    ) -> PromptCache:
        return self.module.prefill(prompt_ids, lengths, reserve, check_inputs)

    def forward(self, *args, **kwargs) -> torch.Tensor:
        return self.module(*args, **kwargs)

    __call__ = forward

    def think_header_ids(self, i: int) -> list[int]:
        """Token ids of think block i's header (i counted from 1)."""
        return self._header_ids(self.spec.think_header.format(i=i))

    def summary_header_ids(self) -> list[int]:
        return self._header_ids(self.spec.summary_header)

    def _header_ids(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise InputError("this model was built without a tokenizer, so it has no header tokens")
        if text not in self.headers:  # get_vocab() builds a dict of the whole vocabulary: ~10 ms at 126k
            self.headers[text] = header_ids(self.tokenizer, text)
        return list(self.headers[text])


def header_ids(tokenizer, text: str) -> list[int]:
    """A header's token ids: the one token when the tokenizer holds the header whole (a special
    token such as ``<summary>``), else the header's plain-text tokens."""
    vocab = tokenizer.get_vocab()
    if text in vocab:
        return [vocab[text]]
    return tokenizer.encode(text, add_special_tokens=False)


def reference_config(name: str) -> dict:
    """The published config.json of a reference checkpoint shipped with paradec
    (``llada-8b-instruct``, ``dream-v0-instruct-7b``), for models of exact shape."""
    path = CONFIGS_DIR / f"{name}.json"
    if not path.exists():
        known = sorted(p.stem for p in CONFIGS_DIR.glob("*.json"))
        raise ConfigError(f"unknown reference config {name!r}; known: {known}")
    return json.loads(path.read_text())


def family_of(config: dict, source: str) -> ModuleType:
    model_type = str(config.get("model_type", "")).lower()
    if model_type not in FAMILIES:
        raise CheckpointError(
            f"{source}: unknown model_type {config.get('model_type')!r}; paradec reads {sorted(FAMILIES)}"
        )
    return FAMILIES[model_type]


def build(
    config: dict,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int | None = 0,
    tokenizer=None,
    source: str = "config",
) -> DiffusionModel:
    """A model of the config's exact shape with random weights (or none, on ``meta``)."""
    device = parse_device(device)
    dtype = parse_dtype(dtype) or torch.float32
    family = family_of(config, source)
    cfg = family.transformer_config(config, source)
    if seed is not None:
        torch.manual_seed(seed)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # parameters are born in their dtype: no fp32 copy of 8B weights
    try:
        with torch.device(device):
            module = DiffusionTransformer(cfg, family.SHIFT_LOGITS)
    finally:
        torch.set_default_dtype(default_dtype)
    if device.type != "meta":
        _init_random(module)
    module.eval()
    spec = _spec(config, cfg, family, tokenizer, source)
    return DiffusionModel(module=module, spec=spec, tokenizer=tokenizer, generation=_generation(config, source))


def _init_random(module: DiffusionTransformer) -> None:
    for name, param in module.named_parameters():
        if name.endswith("norm.weight"):
            torch.nn.init.ones_(param)
        else:
            torch.nn.init.normal_(param, std=0.02)


def load(
    path: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str | None = None,
) -> DiffusionModel:
    """Load a LLaDA- or Dream-format checkpoint directory.

    path: a checkpoint directory, or the name of a model shipped with paradec
    (``paradec.models.builtin_models()``, e.g. ``"paradec-tiny"``). device: ``"cpu"``, ``"cuda"``,
    ``"cuda:1"`` or a torch.device. dtype: the parameters' dtype, a torch.dtype or one of
    ``"bfloat16"``/``"bf16"``, ``"float16"``/``"fp16"``/``"half"``, ``"float32"``/``"fp32"``/``"float"``;
    default bf16 on CUDA and fp32 on CPU. Code shipped in the checkpoint is never run.
    """
    root = resolve(path)
    device = parse_device(device)
    dtype = parse_dtype(dtype)
    config_path = root / "config.json"
    if not root.is_dir():
        raise CheckpointError(_not_a_directory(path, root))
    if not config_path.exists():
        raise CheckpointError(f"{config_path}: missing (a checkpoint directory needs config.json)")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{config_path}: not valid JSON ({err})") from err
    if not isinstance(config, dict):
        raise CheckpointError(f"{config_path}: not a JSON object")
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    source = str(config_path)
    family = family_of(config, source)
    cfg = family.transformer_config(config, source)
    tokenizer = load_tokenizer(root)

    with torch.device("meta"):
        module = DiffusionTransformer(cfg, family.SHIFT_LOGITS)
    state = _read_weights(root, family.checkpoint_names(cfg), module, device, dtype)
    if cfg.tie_embeddings:
        state["lm_head.weight"] = state["embed.weight"]
    module.load_state_dict(state, strict=True, assign=True)
    if cfg.tie_embeddings:
        module.lm_head.weight = module.embed.weight
    module.rope.reset(device)
    module.eval()
    spec = _spec(config, cfg, family, tokenizer, source)
    return DiffusionModel(module=module, spec=spec, tokenizer=tokenizer, generation=_generation(config, source))


def builtin_models() -> list[str]:
    """Names of the models shipped inside the package."""
    return sorted(p.name for p in BUILTIN_DIR.iterdir() if (p / "config.json").exists()) if BUILTIN_DIR.is_dir() else []


def resolve(path: str | Path) -> Path:
    """A checkpoint directory: ``path`` itself, or the built-in model of that name."""
    if isinstance(path, os.PathLike):
        path = os.fspath(path)
    if not isinstance(path, str) or not path.strip():
        got = repr(path) if isinstance(path, str) else f"a {type(path).__name__}"
        raise InputError(
            f"path must be a checkpoint directory (a str or pathlib.Path) or the name of a built-in model "
            f"({builtin_models()}), got {got}"
        )
    root = Path(path)
    if not root.exists() and path in builtin_models():
        return BUILTIN_DIR / path
    return root


def _not_a_directory(path: str | Path, root: Path) -> str:
    """Why ``root`` is not a checkpoint directory, with what the caller may have meant."""
    builtins = builtin_models()
    if root.is_file():
        parent = root.parent
        hint = f"; pass its folder, {str(parent)!r}" if (parent / "config.json").exists() else ""
        return f"{root} is a file, not a checkpoint directory (the folder with config.json, weights, tokenizer){hint}"
    name = str(path)
    close = [] if "/" in name or os.sep in name else difflib.get_close_matches(name, builtins, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return (
        f"{root}: not a checkpoint directory (no such folder) nor the name of a built-in model "
        f"(built-in: {', '.join(builtins) or 'none'}){hint}"
    )


def parse_dtype(dtype: torch.dtype | str | None, name: str = "dtype") -> torch.dtype | None:
    """A floating torch.dtype from a torch.dtype or one of ``DTYPES``' names; None stays None."""
    if dtype is None:
        return None
    accepted = f"a floating torch.dtype (torch.bfloat16, torch.float16, torch.float32) or one of {list(DTYPES)}"
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise ConfigError(f"{name}={dtype} cannot hold model weights; {name} must be {accepted}")
        return dtype
    if isinstance(dtype, str):
        key = dtype.strip().lower().removeprefix("torch.")
        if key in DTYPES:
            return DTYPES[key]
        raise ConfigError(f"{name}={dtype!r} is not a dtype paradec knows; {name} must be {accepted}")
    raise ConfigError(f"{name} must be {accepted}, got a {type(dtype).__name__} ({dtype!r})")


def parse_device(device: str | torch.device | int, name: str = "device") -> torch.device:
    """A torch.device from a string such as ``"cpu"``, ``"cuda"``, ``"cuda:1"`` or a torch.device; a
    CUDA device must exist on this machine."""
    accepted = "'cpu', 'cuda', 'cuda:N' or a torch.device"
    if isinstance(device, torch.device):
        dev = device
    elif isinstance(device, (str, int)) and not isinstance(device, bool):
        try:
            dev = torch.device(device)
        except (RuntimeError, TypeError, ValueError) as err:
            raise ConfigError(f"{name}={device!r} is not a device torch knows; {name} must be {accepted}") from err
    else:
        raise ConfigError(f"{name} must be {accepted}, got a {type(device).__name__} ({device!r})")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch is built without CUDA" if torch.version.cuda is None else "no GPU is visible"
            raise ConfigError(
                f"{name}={device!r}: CUDA is not available on this machine ({why}, torch {torch.__version__}); "
                f"use {name}='cpu'"
            )
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise ConfigError(f"{name}={device!r}: this machine has {count} CUDA device(s), numbered 0 to {count - 1}")
    return dev


def load_tokenizer(root: Path):
    """The checkpoint's tokenizer from its local files, never running code the checkpoint ships and
    never asking whether to.

    A tokenizer of a class transformers has, with no ``auto_map``, loads through AutoTokenizer. One
    whose class lives in the checkpoint's own code (an ``auto_map``, or a class name transformers does
    not know) loads as the standard tokenizer its files hold: ``tokenizer.json`` as a fast tokenizer
    (LLaDA), ``vocab.json`` + ``merges.txt`` as Qwen2's byte-level BPE (Dream's DreamTokenizer is
    Qwen2's tokenizer renamed); special tokens, the chat template and eos/pad/mask come from
    tokenizer_config.json either way."""
    from transformers import AutoTokenizer, PretrainedConfig, PreTrainedTokenizerFast, Qwen2TokenizerFast

    root = Path(root)
    if not any((root / name).exists() for name in TOKENIZER_FILES):
        raise CheckpointError(f"{root}: no tokenizer files (expected one of {list(TOKENIZER_FILES)})")
    tok_config = _read_json_object(root / "tokenizer_config.json")
    class_name = tok_config.get("tokenizer_class")
    known = class_name is None or _transformers_tokenizer_class(class_name) is not None
    remote = "auto_map" in tok_config
    has_bpe = (root / "vocab.json").exists() and (root / "merges.txt").exists()
    if remote or not known:
        if (root / "tokenizer.json").exists():
            cls, how = PreTrainedTokenizerFast, "tokenizer.json as a fast tokenizer"
        elif known and class_name is not None:
            cls, how = _transformers_tokenizer_class(class_name), f"transformers' own {class_name}"
        elif has_bpe:
            cls, how = Qwen2TokenizerFast, "vocab.json + merges.txt as Qwen2 byte-level BPE"
        else:
            _note_remote_code(root, tok_config, None)
            what = f"tokenizer_class {class_name!r}" if class_name else "the tokenizer's auto_map"
            raise CheckpointError(
                f"{root}: {what} names code shipped in the checkpoint, which paradec never runs, and there is "
                f"no tokenizer.json, nor vocab.json + merges.txt, to load as a standard tokenizer instead"
            )
        # Loading an unknown class's vocab.json + merges.txt as Qwen2's BPE is a guess: say so louder.
        guess = cls is Qwen2TokenizerFast and class_name not in QWEN2_BPE_CLASSES
        _note_remote_code(root, tok_config, how, warn=guess)
    else:
        _note_remote_code(root, tok_config, None)
    try:
        if remote or not known:
            tokenizer = cls.from_pretrained(root, local_files_only=True, trust_remote_code=False)
        else:
            # An empty config keeps AutoTokenizer from reading config.json (and its auto_map).
            tokenizer = AutoTokenizer.from_pretrained(
                root, local_files_only=True, trust_remote_code=False, config=PretrainedConfig()
            )
    except (ValueError, OSError, TypeError, KeyError) as err:
        raise CheckpointError(f"{root}: the tokenizer does not load ({type(err).__name__}: {err})") from err
    # A copy saved later (save_checkpoint) must not point at code files it does not carry.
    getattr(tokenizer, "init_kwargs", {}).pop("auto_map", None)
    if getattr(tokenizer, "_auto_map", None) is not None:
        tokenizer._auto_map = None
    return tokenizer


def _transformers_tokenizer_class(name: str):
    """transformers' own tokenizer class of that name, or None; never the checkpoint's code."""
    from transformers.models.auto.tokenization_auto import tokenizer_class_from_name

    if not isinstance(name, str):
        return None
    try:
        return tokenizer_class_from_name(name)
    except Exception:  # a class whose optional dependency is missing, say
        return None


def _read_json_object(path: Path) -> dict:
    """A JSON file that must hold an object; {} when the file is absent."""
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: not a JSON object")
    return data


def _note_remote_code(root: Path, tok_config: dict, how: str | None, warn: bool = False) -> None:
    """One log line per checkpoint directory (and process) saying which ``auto_map`` is ignored."""
    maps = []
    if "auto_map" in tok_config:
        maps.append(f"tokenizer_config.json {_auto_map_text(tok_config['auto_map'])}")
    try:
        config = json.loads((root / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        config = {}
    if isinstance(config, dict) and "auto_map" in config:
        maps.append(f"config.json {_auto_map_text(config['auto_map'])}")
    key = str(root.resolve())
    if not maps or key in _remote_code_noted:
        return
    _remote_code_noted.add(key)
    loaded = f"; the tokenizer loads from {how}" if how else ""
    (logger.warning if warn else logger.info)(
        "%s: ignoring auto_map in %s: paradec never runs code shipped in a checkpoint%s",
        root, " and ".join(maps), loaded,
    )


def _auto_map_text(auto_map) -> str:
    """The code an auto_map names, e.g. ``(tokenization_dream.DreamTokenizer)``."""
    if isinstance(auto_map, dict):
        values = auto_map.values()
    elif isinstance(auto_map, (list, tuple)):
        values = auto_map
    else:
        values = [auto_map]
    names = []
    for v in values:
        names += [x for x in (v if isinstance(v, (list, tuple)) else [v]) if isinstance(x, str)]
    return f"({', '.join(dict.fromkeys(names))})" if names else ""


def _shard_files(root: Path) -> dict[str, Path]:
    """Checkpoint name -> the shard file that holds it, as the index (or single file) says."""
    index_path = root / INDEX_FILE
    if index_path.exists():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as err:
            raise CheckpointError(f"{index_path}: not a safetensors index with a 'weight_map' ({err})") from err
        files = {name: root / shard for name, shard in weight_map.items()}
        for shard in sorted(set(files.values())):
            if not shard.exists():
                raise CheckpointError(f"{index_path}: names shard {shard.name}, which is missing")
        return files
    single = root / SINGLE_FILE
    if single.exists():
        with _open_weights(single) as f:
            return {name: single for name in f.keys()}
    others = sorted(p.name for p in root.iterdir() if p.suffix in (".bin", ".pt", ".pth"))
    hint = f"; found {others}, which paradec does not read (convert to safetensors)" if others else ""
    raise CheckpointError(f"{root}: no {SINGLE_FILE} and no {INDEX_FILE}{hint}")


def _read_weights(
    root: Path,
    names: dict[str, tuple[str, int]],
    module: DiffusionTransformer,
    device: torch.device,
    dtype: torch.dtype,
) -> dict[str, torch.Tensor]:
    """paradec parameter -> tensor, checkpoint tensors concatenated where paradec fuses them."""
    files = _shard_files(root)
    missing = sorted(set(names) - set(files))
    extra = sorted(set(files) - set(names))
    if missing:
        raise CheckpointError(f"{root}: {len(missing)} weights missing, e.g. {_some(missing)}")
    if extra:
        raise CheckpointError(
            f"{root}: {len(extra)} weights this model has no place for, e.g. "
            f"{_some([f'{n} ({files[n].name})' for n in extra])}"
        )
    targets = dict(module.named_parameters(remove_duplicate=False))
    parts: dict[str, dict[int, torch.Tensor]] = {}
    for shard in sorted(set(files.values())):
        with _open_weights(shard) as f:
            stored = set(f.keys())
            for name in (n for n in names if files[n] == shard):
                if name not in stored:
                    raise CheckpointError(f"{shard}: the index places {name} here, but the file lacks it")
                target, part = names[name]
                expected = tuple(targets[target].shape)
                sizes = module.cfg.fused_parts(target)
                if sizes is not None:
                    expected = (sizes[part], *expected[1:])
                shape = tuple(f.get_slice(name).get_shape())
                if shape != expected:
                    raise CheckpointError(f"{shard.name}: {name} has shape {shape}, the config implies {expected}")
                try:
                    tensor = f.get_tensor(name)
                except SafetensorError as err:
                    raise CheckpointError(f"{shard}: {name} cannot be read ({err}); the file is corrupt or partial") from err
                parts.setdefault(target, {})[part] = tensor.to(device=device, dtype=dtype)
    return {target: torch.cat([p[i] for i in sorted(p)]) if len(p) > 1 else p[0] for target, p in parts.items()}


@contextmanager
def _open_weights(path: Path):
    """``safe_open`` on the CPU, a corrupt or partial file reported as a CheckpointError."""
    try:
        handle = safe_open(path, framework="pt", device="cpu")
    except SafetensorError as err:
        raise CheckpointError(f"{path}: not a readable safetensors file ({err}); corrupt or partial?") from err
    with handle as f:
        yield f


def _some(items: Sequence[str], n: int = 5) -> str:
    return ", ".join(items[:n]) + (f" … (+{len(items) - n} more)" if len(items) > n else "")


def _spec(config: dict, cfg: TransformerConfig, family: ModuleType, tokenizer, source: str) -> ModelSpec:
    mask_id = config.get("mask_token_id")
    if mask_id is None and tokenizer is not None:
        mask_id = tokenizer.mask_token_id
    if mask_id is None:
        raise CheckpointError(f"{source}: no mask_token_id in config.json and no mask token in the tokenizer")
    stop_ids = _stop_ids(config, tokenizer)
    if not stop_ids:
        raise CheckpointError(f"{source}: no eos_token_id in config.json and no EOS token in the tokenizer")
    pad_id = config.get("pad_token_id")
    if tokenizer is not None and tokenizer.pad_token_id is not None:
        pad_id = tokenizer.pad_token_id
    if pad_id == mask_id:
        raise CheckpointError(
            f"{source}: the pad id equals the mask id ({mask_id}); padding would read as masked positions"
        )
    if mask_id in stop_ids:
        raise CheckpointError(f"{source}: the mask id {mask_id} is also an EOS/EOT id")
    headers = config.get("paradec", {})
    return ModelSpec(
        family=family.__name__.rsplit(".", 1)[-1],
        vocab_size=cfg.vocab_size,
        mask_id=int(mask_id),
        stop_ids=stop_ids,
        pad_id=None if pad_id is None else int(pad_id),
        shift_logits=family.SHIFT_LOGITS,
        max_length=cfg.max_length,
        think_header=headers.get("think_header", DEFAULT_THINK_HEADER),
        summary_header=headers.get("summary_header", DEFAULT_SUMMARY_HEADER),
    )


def _generation(config: dict, source: str) -> dict:
    """``config.json``'s ``paradec.generation``: GenerationConfig fields the checkpoint was made
    for (its canvas, say), validated here so a bad value is named with its file."""
    from paradec.config import GenerationConfig

    defaults = dict(config.get("paradec", {}).get("generation", {}))
    try:
        GenerationConfig.build(None, **defaults)
    except ConfigError as err:
        raise CheckpointError(f"{source}: paradec.generation: {err}") from err
    return defaults


def _stop_ids(config: dict, tokenizer) -> tuple[int, ...]:
    """EOS ids from config.json, then the tokenizer's EOS and end-of-turn tokens it defines."""
    ids: list[int] = []
    eos = config.get("eos_token_id")
    ids += eos if isinstance(eos, list) else [] if eos is None else [eos]
    if tokenizer is not None:
        if tokenizer.eos_token_id is not None:
            ids.append(tokenizer.eos_token_id)
        vocab = tokenizer.get_vocab()
        ids += [vocab[t] for t in END_OF_TURN_TOKENS if t in vocab]
    return tuple(dict.fromkeys(int(i) for i in ids))
