"""paradec.models.ar: KV-cached decoding of a transformers causal LM from a local directory."""

from __future__ import annotations

import pytest
import torch

from paradec import CheckpointError, InputError
from paradec.models.ar import ARModel

from tiny import tiny_ar_checkpoint



@pytest.fixture(scope="module")
def ar_dir(tmp_path_factory):
    return tiny_ar_checkpoint(tmp_path_factory.mktemp("ar"))


def test_greedy_equals_transformers_generate(ar_dir):
    ar = ARModel.load(ar_dir)
    prompt = [10, 11, 12, 13, 14]
    # No stop ids, so both run the full length.
    ours = ar.generate(prompt, max_new_tokens=20, stop_ids=())
    ref = ar.model.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False,
                            eos_token_id=None, pad_token_id=0, min_new_tokens=20)
    assert ours.token_ids == ref[0, len(prompt):].tolist()
    assert not ours.stopped


def test_sampling_is_seeded(ar_dir):
    ar = ARModel.load(ar_dir)
    prompt = [10, 11, 12]
    a = ar.generate(prompt, 24, temperature=1.5, seed=1, stop_ids=())
    b = ar.generate(prompt, 24, temperature=1.5, seed=1, stop_ids=())
    c = ar.generate(prompt, 24, temperature=1.5, seed=2, stop_ids=())
    greedy = ar.generate(prompt, 24, stop_ids=())
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids or a.token_ids != greedy.token_ids


def test_stops_at_a_stop_id(ar_dir):
    ar = ARModel.load(ar_dir)
    free = ar.generate([10, 11], 12, stop_ids=()).token_ids
    stop = free[4]
    out = ar.generate([10, 11], 12, stop_ids=(stop,))
    assert out.stopped and out.token_ids == free[: free.index(stop) + 1]


def test_bad_input(ar_dir, tmp_path):
    ar = ARModel.load(ar_dir)
    with pytest.raises(InputError, match="input_ids is empty"):
        ar.generate([], 4)
    with pytest.raises(InputError, match="max_new_tokens must be >= 1"):
        ar.generate([3], 0)
    with pytest.raises(InputError, match="exceed the model's maximum length 128"):
        ar.generate([3] * 100, 40)
    with pytest.raises(CheckpointError, match="no config.json"):
        ARModel.load(tmp_path)


def test_a_batch_decodes_as_each_prompt_alone(ar_dir):
    ar = ARModel.load(ar_dir)
    prompts = [[10, 11, 12, 13, 14], [20, 21], [30, 31, 32, 33, 34, 35, 36, 37]]
    for stops in ((), None):  # none (full length) and the model's own (a row may stop early)
        alone = [ar.generate(p, 12, stop_ids=stops) for p in prompts]
        together = ar.generate_batch(prompts, 12, stop_ids=stops)
        assert [(a.token_ids, a.stopped) for a in alone] == [(t.token_ids, t.stopped) for t in together]
    with pytest.raises(InputError, match="prompts must be non-empty id lists"):
        ar.generate_batch([[1], []], 4)
