"""The native model layer against a float64 reference, and its caching/isolation contracts."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

import paradec
from paradec.models import AttentionSpec, build, count_parameters, reference_config
from paradec.models.attention import PAD
from paradec.models.cache import PromptCache

from reference import isolated_allowed, reference_logits
from tiny import tiny_checkpoint

FAMILIES = ["llada", "dream"]
# fp32 against fp64 over two tiny layers: differences are ~1e-6; 1e-4 leaves room for
# summation order while catching any real mistake (a wrong rotation or mask moves logits by ~1e-1).
FP32 = dict(rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module", params=FAMILIES)
def tiny(request, tmp_path_factory):
    root, config, weights = tiny_checkpoint(tmp_path_factory.mktemp(request.param), request.param, seed=1)
    return request.param, paradec.load(root), config, weights


def _shifted(family: str, logits: torch.Tensor) -> torch.Tensor:
    """What each position's prediction is under the family's convention ([T, V])."""
    if family == "dream":
        return torch.cat([logits[:1], logits[:-1]], dim=0)
    return logits


def _layout(prompt_len: int, block_lens: list[int], summary_len: int, mode: str = "isolated"):
    spec = AttentionSpec.from_lengths(mode, prompt_len, block_lens, summary_len)
    positions = torch.arange(spec.total_len)
    return spec, positions, spec.segment_ids(positions)


@pytest.mark.parametrize("mode", ["canvas", "isolated"])
def test_forward_matches_float64_reference(tiny, mode):
    family, model, config, weights = tiny
    spec, positions, segments = _layout(5, [4, 3, 4], 3, mode)
    ids = torch.randint(5, config["vocab_size"], (spec.total_len,), generator=torch.Generator().manual_seed(2))
    allowed = torch.ones(len(ids), len(ids), dtype=torch.bool) if mode == "canvas" else isolated_allowed(segments)
    expected = _shifted(family, reference_logits(family, config, weights, ids, positions, allowed))
    got = model(ids[None], positions[None], segments[None], mode)[0]
    torch.testing.assert_close(got.double(), expected, **FP32)


def test_logits_only_for_positions_asked(tiny):
    family, model, config, _ = tiny
    spec, positions, segments = _layout(6, [5, 5], 4)
    ids = torch.randint(5, config["vocab_size"], (spec.total_len,))
    full = model(ids[None], positions[None], segments[None], "isolated")[0]
    wanted = torch.tensor([[7, 12, 16, 19]])
    part = model(ids[None], positions[None], segments[None], "isolated", logits_at=wanted)
    assert part.shape == (1, 4, config["vocab_size"])
    torch.testing.assert_close(part[0], full[wanted[0]], **FP32)


def _batch(model, config, prompt_lens, block_lens, summary_len, seed=0):
    """Right-padded prompts and canvases for a batch of different prompt lengths."""
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(5, config["vocab_size"], (p,), generator=g) for p in prompt_lens]
    canvas_len = sum(block_lens) + summary_len
    canvases = torch.randint(5, config["vocab_size"], (len(prompt_lens), canvas_len), generator=g)
    return prompts, canvases


@pytest.mark.parametrize("prompt_lens", [[7], [4, 9, 6]])
@pytest.mark.parametrize("reserve", [0, 5, 64])  # concatenated; too small, so concatenated; in place
def test_cached_prompt_equals_uncached_under_isolated(tiny, prompt_lens, reserve):
    family, model, config, _ = tiny
    block_lens, summary_len = [4, 5], 3
    prompts, canvases = _batch(model, config, prompt_lens, block_lens, summary_len)
    b, p_max = len(prompts), max(prompt_lens)
    prompt_ids = torch.zeros(b, p_max, dtype=torch.long)
    for i, p in enumerate(prompts):
        prompt_ids[i, : len(p)] = p
    cache = model.prefill(prompt_ids, torch.tensor(prompt_lens), reserve=reserve)
    assert cache.num_tokens == p_max and cache.batch_size == b and cache.capacity == p_max + reserve
    prompt_kv = cache.kv[..., :p_max, :].clone()

    canvas_len = canvases.shape[1]
    positions = torch.stack([torch.arange(p, p + canvas_len) for p in prompt_lens])
    segments = torch.stack(
        [AttentionSpec.from_lengths("isolated", p, block_lens, summary_len).segment_ids(positions[i])
         for i, p in enumerate(prompt_lens)]
    )
    cached = model(canvases, positions, segments, "isolated", cache=cache)  # [B, C, V]
    again = model(canvases, positions, segments, "isolated", cache=cache)
    assert torch.equal(cached, again) and torch.equal(cache.kv[..., :p_max, :], prompt_kv)

    for i, p in enumerate(prompt_lens):
        spec = AttentionSpec.from_lengths("isolated", p, block_lens, summary_len)
        full_pos = torch.arange(spec.total_len)
        ids = torch.cat([prompts[i], canvases[i]])
        full = model(ids[None], full_pos[None], spec.segment_ids(full_pos)[None], "isolated")[0]
        # Every canvas position, including the first one after the prompt: a shifted model
        # reads that one from the cached prompt's last hidden state.
        torch.testing.assert_close(cached[i], full[p:], **FP32)


def test_dense_forward_equals_masked_where_every_key_is_seen(tiny):
    """``dense=True`` drops the mask: the same logits where the mask is all true (canvas, one
    request, over a cached prompt), an error naming it where it is not."""
    family, model, config, _ = tiny
    prompts, canvases = _batch(model, config, [7], [4, 5], 3, seed=4)
    cache = model.prefill(prompts[0][None], torch.tensor([7]), reserve=12)
    positions = torch.arange(7, 7 + canvases.shape[1])[None]
    segments = AttentionSpec.from_lengths("canvas", 7, [4, 5], 3).segment_ids(positions[0])[None]
    masked = model(canvases, positions, segments, "canvas", cache=cache)
    dense = model(canvases, positions, segments, "canvas", cache=cache, dense=True)
    torch.testing.assert_close(dense, masked, **FP32)
    with pytest.raises(paradec.InputError, match="dense=True"):
        model(canvases, positions, segments, "isolated", cache=cache, dense=True)  # blocks see only their own
    padded = segments.clone()
    padded[0, -1] = PAD
    with pytest.raises(paradec.InputError, match="dense=True"):
        model(canvases, positions, padded, "canvas", cache=cache, dense=True)


def test_forward_into_cache_slots_equals_appending(tiny):
    """``slots=``: the input's k/v written into given slots of a static cache whose every slot
    is a key (in any order) gives the logits of appending them after the cached prompt."""
    family, model, config, _ = tiny
    prompts, canvases = _batch(model, config, [7], [4, 5], 3, seed=5)
    t = canvases.shape[1]
    cache = model.prefill(prompts[0][None], torch.tensor([7]), reserve=t)
    positions = torch.arange(7, 7 + t)[None]
    segments = AttentionSpec.from_lengths("isolated", 7, [4, 5], 3).segment_ids(positions[0])[None]
    appended = model(canvases, positions, segments, "isolated", cache=cache)
    slots = 7 + torch.randperm(t, generator=torch.Generator().manual_seed(0))
    key_segments = torch.cat((cache.segments, torch.empty_like(segments)), 1)
    key_segments[:, slots] = segments
    static = PromptCache(cache.kv.clone(), key_segments, cache.lengths, cache.last_hidden)
    torch.testing.assert_close(model(canvases, positions, segments, "isolated", cache=static, slots=slots), appended,
                               **FP32)
    with pytest.raises(paradec.InputError, match="slots"):  # the prompt's segments alone cover 7 of 7 + t slots
        model(canvases, positions, segments, "isolated", cache=cache, slots=slots)


def test_isolated_blocks_equal_separate_forwards(tiny):
    family, model, config, _ = tiny
    prompt_len, block_lens = 6, [5, 3, 4]
    spec, positions, segments = _layout(prompt_len, block_lens, 0)
    ids = torch.randint(5, config["vocab_size"], (spec.total_len,))
    together = model(ids[None], positions[None], segments[None], "isolated")[0]
    for j, (start, end) in enumerate(spec.blocks):
        # Prompt + block j alone, at the block's own absolute positions.
        # A shifted model predicts a block's first position from the previous block's last
        # token, so it is asked from the second position on (the first is a header in practice).
        first = start + 1 if model.spec.shift_logits else start
        keep = torch.cat([torch.arange(prompt_len), torch.arange(start, end)])
        alone = model(ids[keep][None], positions[keep][None], segments[keep][None], "isolated",
                      logits_at=torch.arange(first, end)[None])[0]
        torch.testing.assert_close(alone, together[first:end], **FP32)


def test_dream_shift_reads_previous_position(tmp_path):
    root, config, weights = tiny_checkpoint(tmp_path, "dream", seed=3)
    model = paradec.load(root)
    assert model.spec.shift_logits
    spec, positions, segments = _layout(4, [6], 0, "canvas")
    ids = torch.randint(5, config["vocab_size"], (spec.total_len,))
    logits = model(ids[None], positions[None], segments[None], "canvas")[0]
    raw = reference_logits("dream", config, weights, ids, positions, torch.ones(10, 10, dtype=torch.bool))
    torch.testing.assert_close(logits[5].double(), raw[4], **FP32)
    torch.testing.assert_close(logits[0].double(), raw[0], **FP32)


def test_llada_does_not_shift(tmp_path):
    root, config, weights = tiny_checkpoint(tmp_path, "llada", seed=3)
    model = paradec.load(root)
    assert not model.spec.shift_logits
    spec, positions, segments = _layout(4, [6], 0, "canvas")
    ids = torch.randint(5, config["vocab_size"], (spec.total_len,))
    logits = model(ids[None], positions[None], segments[None], "canvas")[0]
    raw = reference_logits("llada", config, weights, ids, positions, torch.ones(10, 10, dtype=torch.bool))
    torch.testing.assert_close(logits[5].double(), raw[5], **FP32)


def test_grouped_query_attention_equals_expanded_heads(tmp_path):
    """A GQA model equals the MHA model whose k/v heads are the GQA heads repeated per group."""
    root, config, weights = tiny_checkpoint(tmp_path / "gqa", "dream", seed=4)
    assert config["num_key_value_heads"] < config["num_attention_heads"]
    group = config["num_attention_heads"] // config["num_key_value_heads"]
    hd = config["hidden_size"] // config["num_attention_heads"]
    expanded = dict(weights)
    for name, tensor in weights.items():
        if ".k_proj." in name or ".v_proj." in name:
            heads = tensor.reshape(config["num_key_value_heads"], hd, *tensor.shape[1:])
            expanded[name] = heads.repeat_interleave(group, dim=0).reshape(-1, *tensor.shape[1:])
    from tiny import write_checkpoint

    mha_config = config | {"num_key_value_heads": config["num_attention_heads"]}
    mha_root = write_checkpoint(tmp_path / "mha", mha_config, expanded)
    gqa, mha = paradec.load(root), paradec.load(mha_root)
    spec, positions, segments = _layout(5, [4, 4], 2)
    ids = torch.randint(5, config["vocab_size"], (spec.total_len,))
    args = (ids[None], positions[None], segments[None], "isolated")
    torch.testing.assert_close(gqa(*args), mha(*args), **FP32)


@pytest.mark.parametrize("family", FAMILIES)
def test_sharded_checkpoint_with_index_loads_the_same(tmp_path, family):
    one, config, _ = tiny_checkpoint(tmp_path / "one", family, seed=5)
    three, _, _ = tiny_checkpoint(tmp_path / "three", family, seed=5, shards=3)
    assert (three / "model.safetensors.index.json").exists()
    a, b = paradec.load(one), paradec.load(three)
    for (name, pa), (_, pb) in zip(a.module.named_parameters(), b.module.named_parameters()):
        assert torch.equal(pa, pb), name


def test_tied_head_shares_the_embedding(tmp_path):
    root, config, weights = tiny_checkpoint(tmp_path, "llada", seed=6, weight_tying=True)
    assert "model.transformer.ff_out.weight" not in weights
    model = paradec.load(root)
    assert model.module.lm_head.weight is model.module.embed.weight
    spec, positions, segments = _layout(4, [4], 0, "canvas")
    ids = torch.randint(5, config["vocab_size"], (spec.total_len,))
    raw = reference_logits("llada", config, weights, ids, positions, torch.ones(8, 8, dtype=torch.bool))
    torch.testing.assert_close(model(ids[None], positions[None], segments[None], "canvas")[0].double(), raw, **FP32)


def test_bf16_forward_close_to_fp32(tmp_path):
    root, config, _ = tiny_checkpoint(tmp_path, "llada", seed=7)
    fp32, bf16 = paradec.load(root, dtype=torch.float32), paradec.load(root, dtype=torch.bfloat16)
    assert bf16.dtype == torch.bfloat16
    spec, positions, segments = _layout(6, [5, 5], 3)
    ids = torch.randint(5, config["vocab_size"], (spec.total_len,))
    args = (ids[None], positions[None], segments[None], "isolated")
    ref, low = fp32(*args).double(), bf16(*args).double()
    # bf16 keeps 8 bits of mantissa: relative error of a few 1e-3 per op, ~1e-2 through the stack.
    assert ((low - ref).norm() / ref.norm()).item() < 3e-2


def test_spec_facts_come_from_the_checkpoint(tiny):
    family, model, config, _ = tiny
    vocab = model.tokenizer.get_vocab()
    assert model.spec.mask_id == config["mask_token_id"] == vocab["<|mask|>"]
    assert model.spec.eos_id == config["eos_token_id"]
    assert vocab["<|eot_id|>"] in model.spec.stop_ids
    assert model.spec.max_length == 256
    assert model.spec.shift_logits == (family == "dream")
    # <summary> is a token of this tokenizer, "<think #2>" is not: plain-text header.
    assert model.summary_header_ids() == [vocab["<summary>"]]
    header = model.think_header_ids(2)
    assert len(header) > 1 and model.spec.mask_id not in header


@pytest.mark.parametrize(
    "name, billions", [("llada-8b-instruct", 8.02), ("dream-v0-instruct-7b", 7.62)]
)
def test_meta_models_have_published_parameter_counts(name, billions):
    model = build(reference_config(name), device="meta", dtype=torch.bfloat16)
    assert model.module.embed.weight.is_meta
    assert abs(count_parameters(model.module) / 1e9 - billions) < 0.01


def test_padding_rows_do_not_change_real_rows(tiny):
    """A padded row in a batch sees only real keys; padding never leaks into results."""
    family, model, config, _ = tiny
    spec, positions, segments = _layout(5, [4], 0)
    ids = torch.randint(5, config["vocab_size"], (spec.total_len,))
    alone = model(ids[None], positions[None], segments[None], "isolated")[0]
    padded_ids = torch.cat([ids, torch.zeros(3, dtype=torch.long)])
    padded_pos = torch.cat([positions, torch.full((3,), -1)])
    padded_seg = torch.cat([segments, torch.full((3,), PAD)])
    got = model(padded_ids[None], padded_pos[None], padded_seg[None], "isolated",
                logits_at=positions[None])[0]
    torch.testing.assert_close(got, alone, **FP32)


ROOT = Path(paradec.__file__).parent.parent


def _models_privates() -> set[str]:
    """Private names that paradec/models/ defines: methods of its classes and its modules'
    own functions, classes and variables (``_name``, not ``__dunder__``)."""
    names = set()
    for path in (ROOT / "paradec" / "models").rglob("*.py"):
        tree = ast.parse(path.read_text())
        top = list(tree.body)
        for node in tree.body:
            if isinstance(node, ast.ClassDef):
                top += [n for n in node.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
        for node in top:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                names.update(t.id for t in targets if isinstance(t, ast.Name))
    return {n for n in names if n.startswith("_") and not n.startswith("__")}


def test_nothing_outside_models_reaches_a_private_of_models():
    """Decoding, serving and the benchmarks use the models' public methods (``run_layers``,
    ``gather_rows``, the helpers of ``paradec.models.cache`` …): no ``x._name`` access and no
    ``from paradec.models… import _name`` for a private name that paradec/models/ defines.
    (An object's own ``self._name`` is its own business.)"""
    privates = _models_privates()
    assert {"_check", "_qkv"} <= privates  # the scan sees methods
    models = ROOT / "paradec" / "models"
    offenders = []
    for path in [*(ROOT / "paradec").rglob("*.py"), *(ROOT / "benchmarks").glob("*.py")]:
        if models in path.parents:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in privates:
                if not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")):
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} .{node.attr}")
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("paradec.models"):
                offenders += [f"{path.relative_to(ROOT)}:{node.lineno} import {a.name}"
                              for a in node.names if a.name.startswith("_")]
    assert not offenders, offenders


def test_fused_input_kinds_are_no_coarser_than_dynamos_guards():
    """``layers._kind``: inputs that dynamo compiles apart (sizes of 0 and 1, stride order,
    dtype, grad mode) are kinds apart, so a kind that met the recompile limit never sends one
    that compiled eager; sizes past 1 (dynamic) are one kind."""
    from paradec.models import layers

    x = torch.randn(2, 4, 8, 16)
    kind = lambda *args: layers._kind(layers.apply_rotary, args)  # noqa: E731
    with torch.no_grad():
        base = kind(x)
        assert base == kind(torch.randn(3, 5, 9, 16))
        others = [kind(x[:1]), kind(x[:, :, :0]), kind(x.transpose(1, 2)), kind(x.bfloat16()), kind(x[..., ::2]),
                  kind(x.clone().requires_grad_())]
    with torch.enable_grad():
        others.append(kind(x))
    assert len({base, *others}) == len(others) + 1
