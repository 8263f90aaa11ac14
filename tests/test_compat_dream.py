"""paradec.compat.dream.diffusion_generate (Dream's arguments and return shapes) and
paradec.compat.llada.generate (LLaDA's sampler, cfg_scale and remasking) on paradec's engine,
against loops written from Dream's and LLaDA's published samplers (tiny random models, CPU)."""

from __future__ import annotations

import math

import pytest
import torch

import paradec
from paradec import ConfigError, GenerationConfig, InputError
from paradec.api import build_layout
from paradec.compat import dream, llada as llada_compat
from paradec.models.attention import PROMPT

from tiny import tiny_checkpoint

IDS = [[10, 11, 12, 13, 14], [20, 21, 22, 23, 24]]


@pytest.fixture(scope="module")
def dream_model(tmp_path_factory):
    root, _, _ = tiny_checkpoint(tmp_path_factory.mktemp("dream"), "dream", seed=33)
    return paradec.load(root)


@pytest.fixture(scope="module")
def llada(tmp_path_factory):
    root, _, _ = tiny_checkpoint(tmp_path_factory.mktemp("llada"), "llada", seed=34)
    return paradec.load(root)


def _logits(model, x: torch.Tensor, prompt_len: int, segments: torch.Tensor) -> torch.Tensor:
    """[T, V] float32 logits of every position of one sequence under full attention."""
    seg = torch.cat((torch.full((prompt_len,), PROMPT), segments))
    positions = torch.arange(len(x))
    with torch.no_grad():
        return model.module(x[None], positions[None], seg[None], "canvas", logits_at=positions[None])[0].float()


def dream_reference(model, prompt: list[int], max_new: int, steps: int, alg: str):
    """Dream's greedy ``_sample`` loop (confidence algorithms), the mask id barred as paradec bars it."""
    mask = model.spec.mask_id
    x = torch.tensor(prompt + [mask] * max_new)
    segments = build_layout(model, GenerationConfig(mode="ao", answer_len=max_new)).segments
    timesteps = torch.linspace(1, 1e-3, steps + 1)
    history = []
    for i in range(steps):
        masked = (x == mask).nonzero()[:, 0]
        if len(masked):
            logits = _logits(model, x, len(prompt), segments)[masked]
            logits[:, mask] = -math.inf
            probs = torch.softmax(logits, -1)
            confidence, x0 = probs.max(-1)
            if alg == "topk_margin":
                top2 = probs.topk(2, -1).values
                confidence = top2[:, 0] - top2[:, 1]
            elif alg == "entropy":
                confidence = (probs * torch.log(probs + 1e-10)).sum(-1)
            t, s = timesteps[i], timesteps[i + 1]
            n = int(len(masked) * (1 - s / t)) if i < steps - 1 else len(masked)
            if n > 0:
                pick = confidence.topk(n).indices
                x[masked[pick]] = x0[pick]
        history.append(x.clone())
    return x, history


def llada_reference(model, prompt: list[int], steps: int, gen_length: int, block_length: int, cfg_scale: float = 0.0):
    """LLaDA's greedy ``generate`` (low_confidence remasking), the mask id barred as paradec bars it."""
    mask, p = model.spec.mask_id, len(prompt)
    x = torch.tensor(prompt + [mask] * gen_length)
    segments = build_layout(model, GenerationConfig(mode="block", answer_len=gen_length, block_len=block_length,
                                                    cache="none")).segments
    blocks = gen_length // block_length
    per_block = steps // blocks
    for b in range(blocks):
        base, rest = divmod(block_length, per_block)
        counts = [base + 1] * rest + [base] * (per_block - rest)
        for i in range(per_block):
            logits = _logits(model, x, p, segments)
            if cfg_scale > 0:
                un = x.clone()
                un[:p] = mask
                un_logits = _logits(model, un, p, segments)
                logits = un_logits + (cfg_scale + 1) * (logits - un_logits)
            logits[:, mask] = -math.inf
            x0 = logits.argmax(-1)
            confidence = torch.softmax(logits, -1).gather(1, x0[:, None])[:, 0]
            allowed = (x == mask) & (torch.arange(len(x)) < p + (b + 1) * block_length)
            confidence = torch.where(allowed, confidence, -math.inf)
            if counts[i]:
                pick = confidence.topk(counts[i]).indices
                x[pick] = x0[pick]
    return x


# --- Dream ------------------------------------------------------------------------------------------
def test_dream_shapes_and_history(dream_model):
    ids = torch.tensor(IDS)
    out = dream.diffusion_generate(dream_model, ids, max_new_tokens=12, steps=5, alg="entropy", output_history=True,
                                   return_dict_in_generate=True)
    assert out.sequences.shape == (2, 5 + 12) and out["sequences"] is out.sequences and out[0] is out.sequences
    assert len(out.history) == 5 and all(h.shape == (2, 17) for h in out.history)
    assert torch.equal(out.history[-1], out.sequences) and torch.equal(out.sequences[:, :5], ids)
    mask = dream_model.spec.mask_id
    for before, after in zip(out.history, out.history[1:]):  # a committed token stays
        assert ((before == after) | (before == mask)).all() and (after == mask).sum() < (before == mask).sum()
    assert (out.sequences != mask).all()
    assert "history=<5 steps>" in repr(out)
    plain = dream.diffusion_generate(dream_model, ids, max_new_tokens=12, steps=5, alg="entropy")
    assert isinstance(plain, torch.Tensor) and torch.equal(plain, out.sequences)
    no_history = dream.diffusion_generate(dream_model, ids, max_new_tokens=12, steps=5, alg="entropy",
                                          return_dict_in_generate=True)
    assert no_history.history is None
    with pytest.warns(UserWarning, match="only the sequences come back"):
        dream.diffusion_generate(dream_model, ids, max_new_tokens=4, steps=2, alg="entropy", output_history=True)


def test_dream_history_keeps_its_length_when_steps_exceed_the_tokens(dream_model):
    out = dream.diffusion_generate(dream_model, torch.tensor(IDS[:1]), max_new_tokens=4, steps=9, alg="maskgit_plus",
                                   output_history=True, return_dict_in_generate=True)
    assert len(out.history) == 9 and all(torch.equal(h, out.sequences) for h in out.history[4:])


@pytest.mark.parametrize("alg", ["maskgit_plus", "topk_margin", "entropy"])
@pytest.mark.parametrize("max_new, steps", [(16, 4), (16, 8)])
def test_dream_algorithms_match_dreams_loop(dream_model, alg, max_new, steps):
    out = dream.diffusion_generate(dream_model, torch.tensor(IDS), max_new_tokens=max_new, steps=steps, alg=alg,
                                   output_history=True, return_dict_in_generate=True)
    for row, prompt in enumerate(IDS):
        x, history = dream_reference(dream_model, prompt, max_new, steps, alg)
        assert out.sequences[row].tolist() == x.tolist()
        assert [h[row].tolist() for h in out.history] == [h.tolist() for h in history]


def test_dream_origin_is_random_order_on_the_linspace_schedule(dream_model):
    from paradec.decoding.schedule import group_schedule

    out = dream.diffusion_generate(dream_model, torch.tensor(IDS), max_new_tokens=16, steps=8, alg="origin",
                                   temperature=0.6, output_history=True, return_dict_in_generate=True, seed=4)
    mask = dream_model.spec.mask_id
    committed = [int((h[0, 5:] != mask).sum()) for h in out.history]
    quotas = group_schedule(16, 8, None, "linspace")
    assert committed == [sum(quotas[:i + 1]) for i in range(8)]
    again = dream.diffusion_generate(dream_model, torch.tensor(IDS), max_new_tokens=16, steps=8, alg="origin",
                                     temperature=0.6, seed=4)
    assert torch.equal(again, out.sequences)


def test_dream_sampling_num_return_sequences_and_seeds(dream_model):
    ids = torch.tensor(IDS)
    kw = dict(max_new_tokens=8, steps=4, alg="maskgit_plus", temperature=0.8, top_p=0.9, top_k=20)
    many = dream.diffusion_generate(dream_model, ids, num_return_sequences=3, seed=50, **kw)
    assert many.shape == (6, 13)
    for b in range(2):
        for i in range(3):  # row b * n + i is prompt b's sample i, seed + b * n + i
            one = dream.diffusion_generate(dream_model, ids[b:b + 1], seed=50 + 3 * b + i, **kw)
            assert torch.equal(one[0], many[3 * b + i])
    torch.manual_seed(123)  # seed=None draws from torch's global generator, as Dream's sampling does
    first = dream.diffusion_generate(dream_model, ids, **kw)
    torch.manual_seed(123)
    assert torch.equal(dream.diffusion_generate(dream_model, ids, **kw), first)


def test_dream_alg_temp_ranks_by_a_draw(dream_model):
    ids = torch.tensor(IDS[:1])
    kw = dict(max_new_tokens=12, steps=4, alg="entropy", temperature=0.5, output_history=True,
              return_dict_in_generate=True, seed=8)
    plain = dream.diffusion_generate(dream_model, ids, **kw)
    drawn = [dream.diffusion_generate(dream_model, ids, alg_temp=t, **kw) for t in (0.5, 50.0)]
    again = dream.diffusion_generate(dream_model, ids, alg_temp=50.0, **kw)
    assert torch.equal(again.sequences, drawn[1].sequences)
    orders = [[(h != dream_model.spec.mask_id).tolist() for h in r.history] for r in [plain] + drawn]
    assert orders[1] != orders[0] or orders[2] != orders[0]
    assert dream.diffusion_generate(dream_model, ids, alg_temp=0.0, **kw).history[1].tolist() == plain.history[1].tolist()


def test_dream_left_padding_decodes_each_row_as_alone(dream_model):
    pad = dream_model.spec.pad_id if dream_model.spec.pad_id is not None else 0
    ids = torch.tensor([[pad, pad, 30, 31, 32], [20, 21, 22, 23, 24]])
    attention = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    out = dream.diffusion_generate(dream_model, ids, attention_mask=attention, max_new_tokens=8, steps=4,
                                   alg="maskgit_plus")
    alone = dream.diffusion_generate(dream_model, torch.tensor([[30, 31, 32]]), max_new_tokens=8, steps=4,
                                     alg="maskgit_plus")
    assert out.shape == (2, 13) and torch.equal(out[0, :5], ids[0]) and torch.equal(out[0, 5:], alone[0, 3:])
    with pytest.raises(InputError, match="only left padding"):
        dream.diffusion_generate(dream_model, ids, attention_mask=torch.tensor([[1, 1, 1, 0, 0], [1] * 5]),
                                 max_new_tokens=4, steps=2)


def test_dream_generation_config_and_lengths(dream_model):
    ids = torch.tensor(IDS)
    config = {"max_new_tokens": 6, "steps": 3, "alg": "topk_margin"}
    from_config = dream.diffusion_generate(dream_model, ids, config)
    assert torch.equal(from_config, dream.diffusion_generate(dream_model, ids, max_new_tokens=6, steps=3,
                                                             alg="topk_margin"))

    class Config:  # an object with attributes, like DreamGenerationConfig
        max_new_tokens, steps, alg = 6, 3, "entropy"

    assert dream.diffusion_generate(dream_model, ids, Config(), steps=2).shape == (2, 11)  # kwargs win
    assert dream.diffusion_generate(dream_model, ids, max_length=9, steps=2, alg="entropy").shape == (2, 9)
    with pytest.warns(UserWarning, match="default `max_length` \\(=20\\)"):
        assert dream.diffusion_generate(dream_model, ids, steps=4, alg="entropy").shape == (2, 25)
    assert dream.diffusion_generate(dream_model, ids[0], max_new_tokens=3, steps=3).shape == (1, 8)


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(eps=1e-2), ConfigError, r"eps=0.01: paradec's linspace schedule ends at Dream's default"),
    (dict(alg="greedy"), ConfigError, r"alg must be one of \['origin', 'maskgit_plus', 'topk_margin', 'entropy'\]"),
    (dict(generation_logits_hook_func=lambda s, x, l: l), ConfigError, r"generation_logits_hook_func: paradec's"),
    (dict(mask_token_id=3), ConfigError, r"mask_token_id=3 but this checkpoint's mask id is 1"),
    (dict(top_p=0.9), ConfigError, r"top_p/top_k at temperature=0"),
    (dict(top_k=5), ConfigError, r"top_p/top_k at temperature=0"),
    (dict(alg_temp=0.5, temperature=0.5), ConfigError, r"alg='origin' decodes in a random order"),
    (dict(alg="entropy", alg_temp=0.5), ConfigError, r"alg_temp at temperature=0"),
    (dict(use_cache=True), ConfigError, r"unknown diffusion_generate arguments \['use_cache'\]"),
    (dict(max_length=5), ConfigError, r"input length 5 leaves no room: max_length=5"),
    (dict(num_return_sequences=2, alg="entropy"), ConfigError, r"num_return_sequences=2 would return 2 identical"),
])
def test_dream_refusals_are_named(dream_model, kwargs, error, message):
    kw = dict(max_new_tokens=4, steps=2) | kwargs
    if "max_length" in kwargs:
        kw.pop("max_new_tokens")
    with pytest.raises(error, match=message):
        dream.diffusion_generate(dream_model, torch.tensor(IDS), **kw)


def test_dream_inputs_holding_the_mask_id_are_refused(dream_model):
    with pytest.raises(InputError, match="the prompt holds the mask id"):
        dream.diffusion_generate(dream_model, torch.tensor([[10, dream_model.spec.mask_id, 12]]), max_new_tokens=4,
                                 steps=2)


# --- LLaDA ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("gen_length, block_length, steps", [(16, 16, 16), (16, 4, 8), (12, 4, 12)])
@pytest.mark.parametrize("cfg_scale", [0.0, 1.5])
def test_llada_generate_matches_lladas_loop(llada, gen_length, block_length, steps, cfg_scale):
    x = llada_compat.generate(llada, torch.tensor(IDS), steps=steps, gen_length=gen_length, block_length=block_length,
                              cfg_scale=cfg_scale, mask_id=llada.spec.mask_id)
    assert x.shape == (2, 5 + gen_length)
    for row, prompt in enumerate(IDS):
        assert x[row].tolist() == llada_reference(llada, prompt, steps, gen_length, block_length, cfg_scale).tolist()


def test_llada_cfg_changes_the_tokens(llada):
    kw = dict(steps=8, gen_length=8, block_length=8, mask_id=llada.spec.mask_id)
    assert not torch.equal(llada_compat.generate(llada, torch.tensor(IDS), cfg_scale=3.0, **kw),
                           llada_compat.generate(llada, torch.tensor(IDS), **kw))


def test_llada_random_remasking_and_sampling(llada):
    kw = dict(steps=8, gen_length=8, block_length=8, mask_id=llada.spec.mask_id, remasking="random", seed=3)
    x = llada_compat.generate(llada, torch.tensor(IDS), temperature=0.7, **kw)
    assert x.shape == (2, 13) and (x != llada.spec.mask_id).all()
    assert torch.equal(x, llada_compat.generate(llada, torch.tensor(IDS), temperature=0.7, **kw))
    same = paradec.generate(llada, IDS, mode="random", answer_len=8, steps=8, attention="canvas",
                            eos_closes_block=False, temperature=0.7, seed=3)
    assert x[:, 5:].tolist() == [r.token_ids for r in same]


@pytest.mark.parametrize("kwargs, message", [
    (dict(mask_id=126336), r"mask_id=126336 but this checkpoint's mask id is 1"),
    (dict(gen_length=10, block_length=4), r"gen_length=10 must be a multiple of block_length=4"),
    (dict(steps=6, gen_length=16, block_length=4), r"steps=6 must be a multiple of the 4 blocks"),
    (dict(remasking="random", gen_length=16, block_length=4), r"remasking='random' over several blocks"),
    (dict(remasking="top"), r"remasking must be one of \['low_confidence', 'random'\]"),
    (dict(logits_eos_inf=True), r"logits_eos_inf=True is not supported"),
    (dict(confidence_eos_eot_inf=True), r"confidence_eos_eot_inf=True is not supported"),
    (dict(cfg_scale=-1.0), r"cfg_scale must be >= 0"),
])
def test_llada_refusals_are_named(llada, kwargs, message):
    kw = dict(steps=8, gen_length=8, block_length=8, mask_id=llada.spec.mask_id) | kwargs
    with pytest.raises(ConfigError, match=message):
        llada_compat.generate(llada, torch.tensor(IDS), **kw)


def test_guided_refuses_a_cached_forward(llada):
    guided = llada_compat.Guided(module=llada.module, spec=llada.spec, tokenizer=llada.tokenizer, scale=1.0)
    with pytest.raises(ConfigError, match="cfg_scale needs a forward of the whole prompt every step"):
        paradec.generate(guided, IDS[0], mode="ao", answer_len=4, attention="isolated")
