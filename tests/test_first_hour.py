"""A newcomer's first hour (issue 26): prompt forms and type mistakes named, chat messages as
plain text, torchrun without init_distributed(), help text, --version, progress, header warnings,
file permissions."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import paradec
from paradec import ConfigError, GenerationConfig, InputError
from paradec.api import build_layout, encode_messages, encode_prompt, split_prompts
from paradec.cli import parser

from tiny import tiny_checkpoint

SMALL = dict(blocks=2, block_len=4, summary_len=3, tokens_per_step=2)
CHATML = ("{% for m in messages %}<|eot_id|>{{ m['role'] }} {% if m.get('name') %}{{ m['name'] }} {% endif %}"
          "{{ m['content'] }}<|eot_id|>{% endfor %}{% if add_generation_prompt %}<|eot_id|>the{% endif %}")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    root, _, _ = tiny_checkpoint(tmp_path_factory.mktemp("llada"), "llada", seed=31)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return paradec.load(root)


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    root, _, _ = tiny_checkpoint(tmp_path_factory.mktemp("chat"), "llada", seed=32)
    path = root / "tokenizer_config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | {"chat_template": CHATML}))
    return paradec.load(root)


# --- prompt forms -------------------------------------------------------------------------------
def test_prompt_forms_split_into_one_or_a_batch():
    chat = [{"role": "user", "content": "a b"}]
    assert split_prompts("a") == (True, ["a"])
    assert split_prompts([3, 4]) == (True, [[3, 4]])
    assert split_prompts(torch.tensor([3, 4])) == (True, [[3, 4]])
    assert split_prompts(torch.tensor([[3, 4], [5, 6]])) == (False, [[3, 4], [5, 6]])
    assert split_prompts(chat) == (True, [chat])
    assert split_prompts([chat, "b"]) == (False, [chat, "b"])
    assert split_prompts(["a", [3, 4]]) == (False, ["a", [3, 4]])


@pytest.mark.parametrize(
    "prompt, message",
    [
        (torch.tensor(3), r"prompts: a tensor of token ids must be 1-D \[length\] .* got 0-D"),
        (torch.zeros(1, 2, 3, dtype=torch.long), r"got 3-D of shape \[1, 2, 3\]"),
        (torch.tensor([1.0, 2.0]), r"token ids must be integers, got a tensor of torch.float32"),
        (None, r"prompts must be a string, token ids, chat messages or a list of those; got NoneType"),
        (3, r"prompts must be .* got int"),
        ([], r"prompts is empty"),
        ([None], r"token ids must be ints, got None \(NoneType\)"),
        (["a", None], r"a prompt is None"),
        ([1.5, 2], r"token ids must be ints, got 1.5 \(float\)"),
        ([True, 2], r"token ids must be ints, got True \(bool\)"),
        (["a", 3], r"a prompt must be a string, token ids or chat messages, got int"),
        ({"role": "user", "content": "a"}, r"one chat message was given; a conversation is a list of messages"),
        ([{"role": "user"}], r"messages\[0\]\['content'\] must be a string, got NoneType"),
        ([{"role": "robot", "content": "a"}], r"messages\[0\]\['role'\] must be one of \['system', 'user', 'assistant'\]"),
        ([{"role": "user", "content": "a", "tool_calls": []}], r"messages\[0\] has keys \['tool_calls'\]"),
        ([{"role": "user", "content": "a"}, "b"], r"messages\[1\] must be a dict"),
    ],
)
def test_bad_prompts_are_named(model, prompt, message):
    with pytest.raises(InputError, match=message):
        paradec.generate(model, prompt, **SMALL)


def test_a_model_that_is_not_loaded_is_named(model, tmp_path):
    with pytest.raises(InputError, match=r"got the path '/some/ckpt': load it first, model = paradec.load"):
        paradec.generate("/some/ckpt", "a", **SMALL)
    with pytest.raises(InputError, match=r"got the path .*: load it first"):
        paradec.generate(tmp_path, "a", **SMALL)
    with pytest.raises(InputError, match=r"got a torch module \(DiffusionTransformer\); pass the loaded model itself"):
        paradec.generate(model.module, "a", **SMALL)
    with pytest.raises(InputError, match=r"the DiffusionModel that paradec.load\(\) returns, got dict"):
        paradec.generate({}, "a", **SMALL)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"threshold": "x"}, r"threshold must be a float, got 'x' \(str\)"),
        ({"temperature": float("inf")}, r"temperature must be a finite number, got inf"),
        ({"temperature": float("nan")}, r"temperature must be a finite number, got nan"),
        ({"blocks": True}, r"blocks must be an int, got True \(bool\)"),
        ({"blocks": 2.0}, r"blocks must be an int, got 2.0 \(float\)"),
        ({"steps": "8"}, r"steps must be an int or None, got '8' \(str\)"),
        ({"mode": 3}, r"mode must be a str, got 3 \(int\)"),
        ({"chat_template": "no"}, r"chat_template must be a bool, got 'no' \(str\)"),
        ({"cache": 1, "mode": "block"}, r"cache must be a str or None, got 1 \(int\)"),
    ],
)
def test_config_types_are_named(overrides, message):
    with pytest.raises(ConfigError, match=message):
        GenerationConfig(**overrides)


def test_ints_stand_for_floats():
    assert GenerationConfig(policy="threshold", threshold=1).threshold == 1
    assert GenerationConfig(temperature=1).temperature == 1


# --- chat messages --------------------------------------------------------------------------------
def test_chat_messages_are_a_prompt_and_their_text_stays_plain(chat_model):
    vocab = chat_model.tokenizer.get_vocab()
    eot, eos = vocab["<|eot_id|>"], vocab["<|endoftext|>"]
    messages = [{"role": "system", "content": "a <|endoftext|>"}, {"role": "user", "content": "<|eot_id|> b", "name": "c"}]
    config = GenerationConfig(**SMALL)
    ids = encode_prompt(chat_model, messages, config, build_layout(chat_model, config))
    assert eos not in ids  # the system message's "<|endoftext|>" is text, not the EOS id
    assert ids.count(eot) == 5  # the template's four and the generation prompt's one; the user's is text
    tok = chat_model.tokenizer
    plain = lambda t: tok(t, add_special_tokens=False, split_special_tokens=True)["input_ids"]  # noqa: E731
    words = lambda t: tok.encode(t, add_special_tokens=False)  # noqa: E731
    assert ids == ([eot] + words("system") + plain("a <|endoftext|>") + [eot, eot] + words("user c")
                   + plain("<|eot_id|> b") + [eot, eot, vocab["the"]])
    # generate() takes the conversation as one prompt, equal to its ids
    by_messages = paradec.generate(chat_model, messages, **SMALL)
    by_ids = paradec.generate(chat_model, ids, **SMALL)
    assert by_messages.token_ids == by_ids.token_ids and by_messages.prompt_ids == ids
    both = paradec.generate(chat_model, [messages, ids], **SMALL)
    assert [r.token_ids for r in both] == [by_ids.token_ids] * 2


def test_one_user_message_encodes_as_the_string_prompt(chat_model):
    config = GenerationConfig(**SMALL)
    layout = build_layout(chat_model, config)
    assert encode_prompt(chat_model, [{"role": "user", "content": "a b"}], config, layout) == \
        encode_prompt(chat_model, "a b", config, layout)


def test_without_a_chat_template_one_user_message_is_its_text(model):
    tok = model.tokenizer
    assert encode_messages(tok, [{"role": "user", "content": "a <|endoftext|>"}]) == \
        tok("a <|endoftext|>", add_special_tokens=False, split_special_tokens=True)["input_ids"]
    with pytest.raises(InputError, match="no chat template: send one user message"):
        encode_messages(tok, [{"role": "system", "content": "a"}, {"role": "user", "content": "b"}])


def test_the_server_engine_renders_chat_the_same_way(chat_model):
    from paradec.serve.engine import EngineLoop

    messages = [{"role": "user", "content": "a <|endoftext|> b"}]
    prompt = EngineLoop._prompt(None, type("M", (), {"body": {"messages": messages}, "buffers": []})())
    config = GenerationConfig(**SMALL)
    ids = encode_prompt(chat_model, prompt, config, build_layout(chat_model, config))
    assert chat_model.tokenizer.get_vocab()["<|endoftext|>"] not in ids


# --- torchrun without init_distributed() -----------------------------------------------------------
WORKER = """
import sys, paradec, torch.distributed as dist
model = paradec.load(sys.argv[1])
result = paradec.generate(model, "a b c", blocks=3, block_len=4, summary_len=3, tokens_per_step=2)
rank = dist.get_rank() if dist.is_initialized() else "none"
print(f"rank {rank} of {dist.get_world_size() if dist.is_initialized() else 1}: "
      f"{'result' if result is not None else 'None'} {result.placement['blocks_of_rank'] if result and result.placement else ''}",
      flush=True)
if result is not None:
    print("tokens", result.token_ids, flush=True)
"""


def test_torchrun_without_init_distributed_spreads_the_canvas(tmp_path):
    root, _, _ = tiny_checkpoint(tmp_path / "llada", "llada", seed=33)
    script = tmp_path / "job.py"
    script.write_text(WORKER)
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script), str(root)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "rank 0 of 2: result [[0, 1], [2]]" in done.stdout
    assert "rank 1 of 2: None" in done.stdout
    spread = next(line for line in done.stdout.splitlines() if line.startswith("tokens"))
    alone = subprocess.run([sys.executable, str(script), str(root)], capture_output=True, text=True, timeout=120,
                           env=env, cwd=tmp_path)
    assert alone.returncode == 0, alone.stderr[-3000:]
    assert "rank none of 1: result" in alone.stdout
    assert spread == next(line for line in alone.stdout.splitlines() if line.startswith("tokens"))


def test_a_torchrun_rank_with_its_model_on_another_gpu_is_refused(model, monkeypatch):
    from paradec import api

    monkeypatch.setattr(api, "torchrun_without_group", lambda: True)
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(type(model), "device", property(lambda self: torch.device("cuda", 0)))
    with pytest.raises(ConfigError, match=r"LOCAL_RANK=1\) holds its model on cuda:0: call paradec.distributed.init_distributed"):
        api._process_env(model)


# --- discoverability ------------------------------------------------------------------------------
def test_version_and_every_generation_flag_has_help_with_its_default(capsys):
    with pytest.raises(SystemExit):
        parser().parse_args(["--version"])
    assert capsys.readouterr().out.startswith(f"paradec {paradec.__version__}")
    commands = parser()._subparsers._group_actions[0].choices
    for command in ("decode", "eval"):
        flags = {a.dest: a for a in commands[command]._actions}
        for name, f in GenerationConfig.__dataclass_fields__.items():
            action = flags[f"gen_{name}"]
            assert action.help and f"(paradec's default: {f.default})" in action.help, name
    for command in ("decode", "eval", "serve", "seqdep"):
        for action in commands[command]._actions:
            assert action.help, (command, action.dest)


def test_unset_generation_flags_stay_unset():
    from paradec.cli import generation_overrides

    args = parser().parse_args(["decode", "--tokens-per-step", "2", "--no-eos-closes-block"])
    assert generation_overrides(args) == {"tokens_per_step": 2, "eos_closes_block": False}


def test_generate_docstring_lists_every_setting():
    for name in GenerationConfig.__dataclass_fields__:
        assert f"    {name} (" in paradec.generate.__doc__, name


def test_py_typed_ships():
    assert (Path(paradec.__file__).parent / "py.typed").exists()


def test_progress_bar(model, capsys):
    result = paradec.generate(model, "a b", progress=True, **SMALL)
    err = capsys.readouterr().err
    total = 2 * 4 + 3
    assert f"{total}/{total}" in err and "paradec.generate" in err
    assert result.token_ids == paradec.generate(model, "a b", **SMALL).token_ids
    with pytest.raises(ConfigError, match="progress must be a bool"):
        paradec.generate(model, "a b", progress="yes", **SMALL)


def test_headers_the_tokenizer_cannot_hold_apart_warn(model):
    import dataclasses

    with pytest.warns(UserWarning, match=r"the header '<think #1>' tokenises to the unknown token"):
        build_layout(model, GenerationConfig(**SMALL))
    same = dataclasses.replace(model, spec=dataclasses.replace(model.spec, think_header="a b"), headers={})
    with pytest.warns(UserWarning, match=r"the headers 'a b' and 'a b' tokenise to the same ids"):
        build_layout(same, GenerationConfig(**SMALL))


def test_written_tensors_are_readable_by_the_group(tmp_path):
    from paradec.models.saving import save_tensors

    old = os.umask(0o022)
    try:
        save_tensors({"x": torch.zeros(2)}, tmp_path / "x.safetensors")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "x.safetensors").stat().st_mode) == 0o644
    assert not (tmp_path / "x.safetensors.tmp").exists()
