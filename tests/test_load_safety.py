"""paradec.load never runs code a checkpoint ships and never asks whether to; its parameters'
type mistakes are named.

The checkpoints here are laid out as Dream and LLaDA publish theirs: an ``auto_map`` in
config.json naming ``modeling_*.py`` / ``configuration_*.py``, and (Dream) a tokenizer_config.json
whose ``DreamTokenizer`` lives in ``tokenization_dream.py`` over plain ``vocab.json`` +
``merges.txt``. Every such code file, if imported, leaves a file behind and sets an environment
variable; no test may find either.
"""

from __future__ import annotations

import builtins
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import paradec
from paradec.errors import CheckpointError, ConfigError, InputError, ParadecError
from paradec.models import build, builtin_models
from paradec.models import loading
from paradec.models.loading import DTYPES, load_tokenizer, parse_device, parse_dtype

from tiny import dream_config, dream_weights, tiny_checkpoint, write_checkpoint


RAN_VAR = "PARADEC_TEST_CHECKPOINT_CODE_RAN"
# Qwen2's pre-tokenizer split, as its published tokenizer.json has it.
QWEN2_SPLIT = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
# A few merges over the 256 byte symbols: ids 256.. in this order. "1 2" is one GPT-2 would apply
# to "12"; Qwen2 splits digits apart first, so it never does.
MERGES = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("Ġ", "a"), ("i", "s"), ("Ġ", "is"), ("1", "2")]
# Dream's special tokens (a subset, in its order): <|endoftext|> is EOS and pad, <|mask|> the mask.
DREAM_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|beginoftext|>", "<|mask|>"]
FIRST_SPECIAL = 256 + len(MERGES)
SPECIAL_ID = {tok: FIRST_SPECIAL + i for i, tok in enumerate(DREAM_SPECIALS)}
CHAT_TEMPLATE = (  # Dream's (Qwen2.5's) template, without tools
    "{% if messages[0]['role'] == 'system' %}{{ '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{% else %}{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{% for message in messages %}{% if message['role'] != 'system' %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table, which byte-level BPE vocabularies are written in."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def _vocab() -> dict[str, int]:
    """Byte b has id b; merge i has id 256 + i."""
    symbol = _bytes_to_unicode()
    vocab = {symbol[b]: b for b in range(256)}
    for a, b in MERGES:
        vocab[a + b] = len(vocab)
    return vocab


def _code_file(root: Path, name: str, body: str = "") -> None:
    """A Python file in the checkpoint that, imported, leaves a trace file and sets RAN_VAR."""
    trace = root / "traces" / f"{name}.ran"
    (root / name).write_text(
        f"import os, pathlib\npathlib.Path({str(trace)!r}).parent.mkdir(exist_ok=True)\n"
        f"pathlib.Path({str(trace)!r}).write_text('imported')\nos.environ[{RAN_VAR!r}] = {name!r}\n{body}"
    )


def _traces(root: Path) -> list[str]:
    return sorted(p.name for p in (root / "traces").glob("*")) if (root / "traces").exists() else []


def write_dream_tokenizer(root: Path, tokenizer_class: str = "DreamTokenizer") -> None:
    """vocab.json, merges.txt, tokenizer_config.json and tokenization_dream.py, as Dream publishes them."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "vocab.json").write_text(json.dumps(_vocab(), ensure_ascii=False))
    (root / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in MERGES), encoding="utf-8")
    added = {
        str(i): {"content": tok, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                 "special": True}
        for tok, i in SPECIAL_ID.items()
    }
    config = {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "auto_map": {"AutoTokenizer": ["tokenization_dream.DreamTokenizer", None]},
        "bos_token": "<|beginoftext|>",
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|endoftext|>",
        "errors": "replace",
        "mask_token": "<|mask|>",
        "model_max_length": 131072,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": tokenizer_class,
        "unk_token": None,
    }
    (root / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    _code_file(root, "tokenization_dream.py",
               "from transformers import PreTrainedTokenizer\nclass DreamTokenizer(PreTrainedTokenizer):\n    pass\n")


def write_dream_checkpoint(root: Path) -> Path:
    """A tiny Dream checkpoint with Dream's tokenizer files and its remote-code files."""
    write_dream_tokenizer(root)
    vocab = {"<|mask|>": SPECIAL_ID["<|mask|>"], "<|endoftext|>": SPECIAL_ID["<|endoftext|>"]}
    vocab_size = FIRST_SPECIAL + len(DREAM_SPECIALS) + 3  # Dream's embedding is padded past its last token too
    config = dream_config(vocab, vocab_size=vocab_size, bos_token_id=SPECIAL_ID["<|endoftext|>"])
    config["auto_map"] = {"AutoConfig": "configuration_dream.DreamConfig", "AutoModel": "modeling_dream.DreamModel"}
    write_checkpoint(root, config, dream_weights(config, torch.Generator().manual_seed(0)), tokenizer=False)
    _code_file(root, "configuration_dream.py")
    _code_file(root, "modeling_dream.py")
    _code_file(root, "generation_utils.py")
    return root


def _qwen2_reference():
    """Qwen2's tokenizer built by hand with the tokenizers library from the same vocab and merges."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    ref = Tokenizer(models.BPE(_vocab(), MERGES))
    ref.normalizer = normalizers.NFC()
    ref.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    ref.decoder = decoders.ByteLevel()
    ref.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in DREAM_SPECIALS])
    return ref


@pytest.fixture
def no_stdin(monkeypatch):
    """Any attempt to ask the user fails the test."""
    class Closed:
        def __getattr__(self, name):
            raise AssertionError(f"paradec touched stdin (sys.stdin.{name})")

    def ask(*args):
        raise AssertionError(f"paradec prompted: {args}")

    monkeypatch.setattr(builtins, "input", ask)
    monkeypatch.setattr(sys, "stdin", Closed())
    monkeypatch.delenv(RAN_VAR, raising=False)


@pytest.fixture(scope="module")
def dream_dir(tmp_path_factory):
    return write_dream_checkpoint(tmp_path_factory.mktemp("dream-layout"))


def _auto_map_records(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "paradec.models.loading" and "auto_map" in r.getMessage()]


def test_dream_layout_loads_without_running_its_code(dream_dir, no_stdin, caplog, monkeypatch):
    monkeypatch.setattr(loading, "_remote_code_noted", set())  # as if no test had loaded dream_dir yet
    caplog.set_level(logging.INFO, logger="paradec.models.loading")
    model = paradec.load(dream_dir)
    assert _traces(dream_dir) == [] and RAN_VAR not in os.environ
    assert not any(m.startswith("transformers_modules") for m in sys.modules)
    assert type(model.tokenizer).__module__.startswith("transformers.")
    assert model.spec.family == "dream"
    assert model.spec.mask_id == SPECIAL_ID["<|mask|>"]
    assert model.spec.pad_id == SPECIAL_ID["<|endoftext|>"]
    assert set(model.spec.stop_ids) == {SPECIAL_ID["<|endoftext|>"], SPECIAL_ID["<|im_end|>"]}
    # One line says what was ignored, naming the code of both files; a second load says nothing more.
    [record] = _auto_map_records(caplog)
    message = record.getMessage()
    assert "tokenization_dream.DreamTokenizer" in message and "modeling_dream.DreamModel" in message
    assert "Qwen2" in message and record.levelno == logging.INFO
    paradec.load(dream_dir)
    assert len(_auto_map_records(caplog)) == 1
    assert _traces(dream_dir) == []


def test_dream_tokenizer_is_qwen2_byte_level_bpe(dream_dir, no_stdin):
    tok = load_tokenizer(dream_dir)
    ref = _qwen2_reference()
    # Hand-counted ids pin what Qwen2's BPE does: no prefix space on the first word, digits split
    # before merging (so the "1 2" merge never applies), special tokens whole.
    assert tok("the the")["input_ids"] == [116, 257, 258]
    assert tok.encode("12", add_special_tokens=False) == [49, 50]
    text = "<|im_start|>user\nthe 12<|im_end|>"
    assert tok.encode(text, add_special_tokens=False) == [
        SPECIAL_ID["<|im_start|>"], 117, 115, 101, 114, 10, 116, 257, 32, 49, 50, SPECIAL_ID["<|im_end|>"]]
    texts = ["the cat is a thesis", " the  is\n\n\tthe 2024 x", "Héllo wörld ü 日本語 🙂", "it's 3.14, isn't it?",
             "a<|mask|><|mask|>b<|endoftext|>", "<|im_start|>assistant\nis the<|im_end|>\n"]
    for text in texts:
        ids = tok.encode(text, add_special_tokens=False)
        assert ids == ref.encode(text, add_special_tokens=False).ids, text
        assert tok.decode(ids) == text
    assert tok.decode([SPECIAL_ID["<|mask|>"], 116, 257], skip_special_tokens=True) == "the"
    assert (tok.mask_token, tok.mask_token_id) == ("<|mask|>", SPECIAL_ID["<|mask|>"])
    assert (tok.eos_token_id, tok.pad_token_id) == (SPECIAL_ID["<|endoftext|>"],) * 2
    assert tok.bos_token_id == SPECIAL_ID["<|beginoftext|>"]
    assert tok.convert_tokens_to_ids("<|im_end|>") == SPECIAL_ID["<|im_end|>"]
    assert len(tok) == FIRST_SPECIAL + len(DREAM_SPECIALS)
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert chat == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


def test_a_saved_copy_does_not_point_at_code_it_lacks(dream_dir, no_stdin, tmp_path):
    tok = load_tokenizer(dream_dir)
    tok.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert "auto_map" not in saved
    again = load_tokenizer(tmp_path)
    text = "the 12<|mask|> is"
    assert again.encode(text, add_special_tokens=False) == tok.encode(text, add_special_tokens=False)


def test_load_with_stdin_closed_finishes_without_a_prompt(dream_dir, tmp_path):
    """The whole load in a fresh interpreter whose stdin is closed: a prompt would read EOF (or hang
    until the timeout); neither may happen, and no checkpoint file may be imported."""
    script = (
        "import json, sys, paradec\n"
        f"m = paradec.load({str(dream_dir)!r})\n"
        "print(json.dumps([m.spec.mask_id, m.tokenizer.encode('the 12', add_special_tokens=False)]))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != RAN_VAR}
    env |= {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    run = subprocess.run([sys.executable, "-c", script], stdin=subprocess.DEVNULL, capture_output=True, text=True,
                         timeout=120, cwd=tmp_path, env=env)
    output = run.stdout + run.stderr
    assert run.returncode == 0, output
    assert "[y/N]" not in output and "trust_remote_code" not in output
    assert json.loads(run.stdout.strip().splitlines()[-1]) == [SPECIAL_ID["<|mask|>"], [116, 257, 32, 49, 50]]
    assert _traces(dream_dir) == []
    assert not (tmp_path / "hf" / "modules").exists()


@pytest.mark.parametrize("auto_map", [True, False])
def test_llada_layout_loads_its_tokenizer_json(tmp_path, no_stdin, caplog, auto_map):
    """LLaDA's layout: tokenizer.json under a tokenizer class transformers does not have."""
    caplog.set_level(logging.INFO, logger="paradec.models.loading")
    root, config, _ = tiny_checkpoint(tmp_path, "llada")
    reference = load_tokenizer(root)  # the plain fast tokenizer tiny.py wrote
    tok_config = json.loads((root / "tokenizer_config.json").read_text())
    tok_config["tokenizer_class"] = "LLaDATokenizer"
    if auto_map:
        tok_config["auto_map"] = {"AutoTokenizer": ["tokenization_llada.LLaDATokenizer", None]}
        config["auto_map"] = {"AutoConfig": "configuration_llada.LLaDAConfig",
                              "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM"}
    (root / "tokenizer_config.json").write_text(json.dumps(tok_config))
    (root / "config.json").write_text(json.dumps(config))
    for name in ("tokenization_llada.py", "configuration_llada.py", "modeling_llada.py"):
        _code_file(root, name)
    model = paradec.load(root)
    assert _traces(root) == [] and RAN_VAR not in os.environ
    from transformers import PreTrainedTokenizerFast

    assert isinstance(model.tokenizer, PreTrainedTokenizerFast)
    text = "the 1 + 2 = 3 ? <|mask|> <summary> is <|eot_id|>"
    assert model.tokenizer.encode(text, add_special_tokens=False) == reference.encode(text, add_special_tokens=False)
    assert model.tokenizer.decode(reference.encode("a b c", add_special_tokens=False)) == "a b c"
    assert model.spec.mask_id == config["mask_token_id"] == model.tokenizer.mask_token_id
    assert len(_auto_map_records(caplog)) == (1 if auto_map else 0)


def test_unknown_class_over_bpe_files_is_a_warned_guess(tmp_path, no_stdin, caplog):
    write_dream_tokenizer(tmp_path, tokenizer_class="SomeLabTokenizer")
    tok = load_tokenizer(tmp_path)
    assert tok.encode("the the", add_special_tokens=False) == [116, 257, 258]
    [record] = _auto_map_records(caplog)
    assert record.levelno == logging.WARNING and "Qwen2" in record.getMessage()
    assert _traces(tmp_path) == []


def test_custom_tokenizer_without_standard_files_is_refused(tmp_path, no_stdin):
    write_dream_tokenizer(tmp_path)
    (tmp_path / "merges.txt").unlink()
    with pytest.raises(CheckpointError, match="never runs"):
        load_tokenizer(tmp_path)
    assert _traces(tmp_path) == []


# --- type mistakes in load()'s parameters -----------------------------------------------------


@pytest.mark.parametrize("name", sorted(DTYPES))
def test_dtype_strings(name):
    expected = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
    canonical = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}
    assert parse_dtype(name) == expected[canonical.get(name, name)]
    assert parse_dtype(name.upper()) == parse_dtype(name)


@pytest.mark.parametrize("dtype", ["bfloat16", "fp16", torch.float32, None])
def test_load_takes_dtype_strings(dtype):
    model = paradec.load("paradec-tiny", dtype=dtype)
    assert model.dtype == (parse_dtype(dtype) or torch.float32)


@pytest.mark.parametrize("dtype", ["bfloat", "int8", "float8", torch.int64, torch.bool, 16, 1.0, True])
def test_bad_dtype_is_named(dtype):
    with pytest.raises(ConfigError, match="dtype") as err:
        paradec.load("paradec-tiny", dtype=dtype)
    assert "bf16" in str(err.value) and "torch.bfloat16" in str(err.value)


def test_build_takes_the_same_dtype_strings():
    config = dream_config({"<|mask|>": 1, "<|endoftext|>": 0})
    assert build(config, dtype="bf16").dtype == torch.bfloat16
    with pytest.raises(ConfigError, match="dtype"):
        build(config, dtype="bf17")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:0", torch.device("cuda", 1)])
def test_cuda_without_a_gpu_is_named(device):
    with pytest.raises(ConfigError, match="device=.*CUDA is not available.*device='cpu'"):
        paradec.load("paradec-tiny", device=device)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_missing_cuda_index_is_named():
    with pytest.raises(ConfigError, match="device='cuda:99'.*CUDA device"):
        paradec.load("paradec-tiny", device="cuda:99")


@pytest.mark.parametrize("device", ["gpu0", "cuda0", "", None, 1.5, ["cpu"]])
def test_bad_device_is_named(device):
    with pytest.raises(ConfigError, match="device") as err:
        paradec.load("paradec-tiny", device=device)
    assert "'cpu'" in str(err.value)


def test_cpu_devices_load():
    assert paradec.load("paradec-tiny", device=torch.device("cpu")).device.type == "cpu"
    assert parse_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize("path", [5, None, b"/tmp", ["paradec-tiny"], "", "  "])
def test_path_of_the_wrong_type_is_named(path):
    with pytest.raises(InputError, match="path must be a checkpoint directory"):
        paradec.load(path)


def test_missing_directory_names_path_and_builtins(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(CheckpointError) as err:
        paradec.load(missing)
    message = str(err.value)
    assert str(missing) in message and "not a checkpoint directory (no such folder)" in message
    assert all(name in message for name in builtin_models())
    with pytest.raises(CheckpointError, match="did you mean 'paradec-tiny'"):
        paradec.load("paradec-tinyy")


def test_a_file_instead_of_its_directory_is_named(tmp_path):
    root, _, _ = tiny_checkpoint(tmp_path / "ckpt", "llada")
    with pytest.raises(CheckpointError, match="is a file.*pass its folder"):
        paradec.load(root / "config.json")


def test_all_are_paradec_errors():
    for cls in (ConfigError, InputError, CheckpointError):
        assert issubclass(cls, ParadecError)
