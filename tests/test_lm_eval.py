"""paradec's lm-evaluation-harness model class: a two-example local task end to end, the shipped
GSM8K task through ``paradec lm-eval`` from outside the checkout, lm-eval's own batch_size and
device settings, and the Monte-Carlo log-likelihood against exact values."""

from __future__ import annotations

import itertools
import json
import math
import shutil
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval")

import lm_eval  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

import paradec  # noqa: E402
from paradec.errors import ConfigError, InputError  # noqa: E402
from paradec.eval import get_task  # noqa: E402
from paradec.cli import main  # noqa: E402
from paradec.eval.harness import TASKS_DIR, ParadecLM, _batch_size, monte_carlo_loglikelihood  # noqa: E402
from paradec.eval.tasks import gsm8k_test_path  # noqa: E402
from paradec.train.tasks import arith  # noqa: E402

SAMPLE = Path(__file__).parent / "data" / "gsm8k_sample.jsonl"
ARGS = "pretrained=paradec-tiny,device=cpu,blocks=2,tokens_per_step=4"


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


class _OwnTasksOnly(TaskManager):
    """A TaskManager without lm-eval's thousands of built-in task configs: indexing them costs
    ~9 s of CPU per manager, and these tests use only their own."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **{**kwargs, "include_defaults": False})


@pytest.fixture(scope="module")
def lm():
    return ParadecLM(pretrained="paradec-tiny", device="cpu", blocks=2, tokens_per_step=4, mc_num=64, mc_batch=16)


def _local_task(tmp_path: Path, name: str, data: Path) -> Path:
    """The shipped GSM8K config and its loader, renamed and pointed at ``data`` (as its comment
    tells users to)."""
    text = (TASKS_DIR / "paradec_gsm8k_local.yaml").read_text().replace("paradec_gsm8k_local", name)
    text += f"dataset_kwargs:\n  data_files:\n    test: {json.dumps(str(data))}\n"
    folder = tmp_path / "tasks"
    folder.mkdir(exist_ok=True)
    shutil.copy(TASKS_DIR / "gsm8k_local.py", folder)
    (folder / f"{name}.yaml").write_text(text)
    return folder


def test_two_example_task_end_to_end(tmp_path):
    problems = arith.test_problems()[:2]
    data = tmp_path / "two.jsonl"
    data.write_text("".join(json.dumps({"question": p.question, "answer": f"#### {p.answer}"}) + "\n" for p in problems))
    manager = _OwnTasksOnly(include_path=str(_local_task(tmp_path, "two_local", data)))
    out = lm_eval.simple_evaluate(model="paradec", model_args=ARGS, tasks=["two_local"], task_manager=manager,
                                  log_samples=True)
    metrics = out["results"]["two_local"]
    model = paradec.load("paradec-tiny")
    direct = paradec.generate(model, [p.question for p in problems], blocks=2, tokens_per_step=4, chat_template=False)
    expected = sum(arith.check_answer(d.answer, p) for d, p in zip(direct, problems)) / 2
    assert metrics["exact_match,strict-match"] == expected
    strict = [s for s in out["samples"]["two_local"] if s["filter"] == "strict-match"]
    assert sorted(s["resps"][0][0] for s in strict) == sorted(d.summary for d in direct)  # the summary is the text


def test_shipped_gsm8k_task_via_cli_from_another_directory(tmp_path, monkeypatch):
    """``paradec lm-eval`` as a newcomer types it, outside the checkout: the shipped task reads the
    split packaged with paradec; lm-eval hands ``--batch_size`` as the string "3" and its
    ``--device``, which ``--model_args`` also names: merged, the ``--model_args`` values used."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", list(sys.argv))  # paradec lm-eval hands its argv to lm-eval's parser
    monkeypatch.setattr(lm_eval.tasks, "TaskManager", _OwnTasksOnly)  # the command line builds one
    sizes = []
    generate = paradec.generate
    monkeypatch.setattr(paradec, "generate", lambda model, prompts, *a, **k: sizes.append(len(prompts))
                        or generate(model, prompts, *a, **k))
    code = main(["lm-eval", "--model", "paradec", "--model_args", f"{ARGS},batch_size=2", "--tasks",
                 "paradec_gsm8k_local", "--include_path", str(TASKS_DIR), "--limit", "3", "--batch_size", "3",
                 "--device", "cuda:0", "--output_path", str(tmp_path / "out"), "--log_samples"])
    assert code == 0
    assert sizes == [2, 1]  # batch_size=2 from --model_args, not --batch_size 3
    samples_file, = (tmp_path / "out").rglob("samples_paradec_gsm8k_local*.jsonl")
    samples = [json.loads(line) for line in samples_file.read_text().splitlines()]
    samples = [s for s in samples if s["filter"] == "strict-match"]
    lines = gsm8k_test_path().read_text(encoding="utf-8").splitlines()[:3]
    golds = [json.loads(line)["answer"].split("####")[-1].strip() for line in lines]
    assert sorted(s["doc_id"] for s in samples) == [0, 1, 2]
    assert [s["target"] for s in sorted(samples, key=lambda s: s["doc_id"])] == golds


def test_lm_eval_batch_size_and_device_settings(lm):
    """What lm-eval hands beside --model_args (``additional_config``): --batch_size as a string,
    None for what was not set; a setting in both is merged, --model_args winning."""
    cli = {"batch_size": "3", "max_batch_size": None, "device": "cpu"}
    assert ParadecLM.create_from_arg_obj({"pretrained": "paradec-tiny"}, cli).batch_size == 3
    both = ParadecLM.create_from_arg_string("pretrained=paradec-tiny,batch_size=2,device=cpu",
                                            {**cli, "device": "cuda:0"})
    assert both.batch_size == 2 and both.model.device.type == "cpu"
    assert (_batch_size("auto", None), _batch_size("auto:4", None), _batch_size("auto", "5")) == (8, 8, 5)
    assert _batch_size(" 7", None) == 7
    for bad in ("three", "auto:x", "0", 0, True, 2.5):
        with pytest.raises(ConfigError, match="batch_size must be an int >= 1, 'auto' or 'auto:N'"):
            _batch_size(bad, None)
    with pytest.raises(ConfigError, match="max_batch_size"):
        _batch_size("auto", 0)


def test_generate_until_cuts_at_until(lm):
    question = arith.test_problems()[0].question
    full = lm.generate_until([Instance("generate_until", {}, (question, {"until": []}), 0)], disable_tqdm=True)[0]
    assert "####" in full
    cut = lm.generate_until([Instance("generate_until", {}, (question, {"until": ["####"]}), 0)], disable_tqdm=True)[0]
    assert cut == full[: full.index("####")]


def test_sampled_requests_seed_by_position_whatever_the_batch_size():
    """Request n samples with seed + n however the requests are chunked (batch size 1 gave every
    repeat of a prompt one sample); do_sample without a temperature samples at 1.0."""
    question = arith.test_problems()[1].question
    kwargs = {"until": [], "do_sample": True, "temperature": 3.0}  # hot: the tiny model is sure of itself
    requests = [Instance("generate_until", {}, (question, dict(kwargs)), i) for i in range(4)]
    texts = {}
    for batch_size in (1, 3):
        lm = ParadecLM(pretrained="paradec-tiny", device="cpu", blocks=2, tokens_per_step=4, batch_size=batch_size,
                       seed=5, output="canvas")
        texts[batch_size] = lm.generate_until(requests, disable_tqdm=True)
    alone = ["\n\n".join([*r.blocks, r.summary]) for r in
             (paradec.generate(lm.model, question, blocks=2, tokens_per_step=4, temperature=3.0, seed=5 + n)
              for n in range(4))]
    assert texts[1] == texts[3] == alone and len(set(alone)) > 1
    assert lm._config_for({"do_sample": True}).temperature == 1.0  # transformers' and vLLM's default


def test_gen_kwargs_reach_the_decode_or_are_refused_by_name(lm):
    """A request's gen_kwargs decode as ``generate`` does with the same settings: paradec's request
    settings (here mode, tokens_per_step, top_k, top_p, seed) override --model_args; top_k / top_p
    are dropped where decoding is greedy; max_gen_toks caps nap's summary and is block mode's answer
    region; transformers' kwargs at their neutral values pass; anything else is refused by name
    before any request decodes."""
    question = arith.test_problems()[2].question
    cases = [  # gen_kwargs -> the settings generate() gets beside the model's blocks=2, tokens_per_step=4
        ({"until": [], "do_sample": True, "temperature": 2.0, "top_k": 5, "top_p": 0.9, "seed": 11},
         {"temperature": 2.0, "top_k": 5, "top_p": 0.9, "seed": 11}),
        ({"until": [], "do_sample": False, "top_k": 5, "top_p": 0.5, "num_beams": 1}, {}),
        ({"until": [], "max_gen_toks": 3}, {"summary_len": 3}),
        ({"until": [], "max_gen_toks": 256}, {}),  # above the summary's length: the canvas stays the model's
        ({"until": [], "mode": "block", "block_len": 4, "max_gen_toks": 8, "tokens_per_step": 2},
         {"mode": "block", "block_len": 4, "answer_len": 8, "tokens_per_step": 2}),
    ]
    for kwargs, settings in cases:
        text, = lm.generate_until([Instance("generate_until", {}, (question, dict(kwargs)), 0)], disable_tqdm=True)
        alone = paradec.generate(lm.model, question, **{"blocks": 2, "tokens_per_step": 4, "chat_template": False,
                                                        **settings})
        assert text == alone.summary, kwargs
    assert lm._config_for({"max_gen_toks": 3}).summary_len == 3
    assert lm._config_for({"do_sample": True, "top_k": -1}).top_k is None  # vLLM's "off"
    decoded = []
    generate = paradec.generate
    paradec.generate = lambda *a, **k: decoded.append(a) or generate(*a, **k)
    try:
        for bad, name in (({"num_beams": 4}, "num_beams=4"), ({"typical_p": 0.5}, "typical_p=0.5"),
                          ({"rank_timeout_s": 1.0}, "rank_timeout_s=1.0"),
                          ({"num_return_sequences": 2}, "num_return_sequences=2")):
            requests = [Instance("generate_until", {}, (question, {"until": []}), 0),
                        Instance("generate_until", {}, (question, {"until": [], **bad}), 1)]
            with pytest.raises(ConfigError, match=f"generation kwargs {name}: not taken by paradec"):
                lm.generate_until(requests, disable_tqdm=True)
        with pytest.raises(ConfigError, match="tokens_per_step"):  # a paradec setting is validated as generate does
            lm.generate_until([Instance("generate_until", {}, (question, {"tokens_per_step": 0}), 0)],
                              disable_tqdm=True)
    finally:
        paradec.generate = generate
    assert decoded == []  # refused before the good group decoded


def test_sampling_filters_in_model_args_restrict_the_sampled_requests():
    """``--model_args top_k=...`` without a temperature is taken (it was refused as greedy at load):
    a task that samples decodes with it, a greedy one without it."""
    lm = ParadecLM(pretrained="paradec-tiny", device="cpu", blocks=2, tokens_per_step=4, top_k=2, top_p=0.8)
    question = arith.test_problems()[3].question
    sampled, greedy = lm.generate_until([
        Instance("generate_until", {}, (question, {"until": [], "do_sample": True, "temperature": 3.0}), 0),
        Instance("generate_until", {}, (question, {"until": [], "do_sample": False}), 1)], disable_tqdm=True)
    settings = {"blocks": 2, "tokens_per_step": 4, "chat_template": False}
    assert sampled == paradec.generate(lm.model, question, temperature=3.0, top_k=2, top_p=0.8, **settings).summary
    assert greedy == paradec.generate(lm.model, question, **settings).summary
    with pytest.raises(ConfigError, match="has no chat template"):
        lm.apply_chat_template([{"role": "user", "content": question}])


def test_lm_evals_own_models_stay_registered():
    """Registering paradec does not hide lm-eval's built-in models (its registry loads them only
    when empty): paradec lm-eval --model local-completions compares against a server."""
    from lm_eval.api.registry import get_model

    assert get_model("local-completions").__name__ == "LocalCompletionsAPI" and get_model("paradec") is ParadecLM


def test_one_token_continuation_is_exact(lm):
    """With one continuation token every draw masks it (k = 1, weight 1), so the estimate is
    log p(token | context, [MASK]) exactly."""
    model = lm.model
    prefix = model.tokenizer("Zoe has 30 apples .", add_special_tokens=False)["input_ids"]
    target = model.tokenizer(" 30", add_special_tokens=False)["input_ids"][:1]
    ids = torch.tensor([prefix + [model.spec.mask_id]])
    with torch.no_grad():
        logits = model.module.training_logits(ids, torch.arange(ids.shape[1])[None], torch.tensor([[0] * len(prefix) + [1]]),
                                              "canvas", torch.tensor([[False] * len(prefix) + [True]]))
    exact = torch.log_softmax(logits.double(), -1)[0, target[0]].item()
    assert monte_carlo_loglikelihood(model, prefix, target, mc_num=8, mc_batch=4) == pytest.approx(exact, abs=1e-5)


def test_estimate_converges_to_its_expectation(lm):
    """Two continuation tokens: the bound's expectation, enumerated over k in {1, 2} and every mask
    of size k, against the estimate from 512 draws (within 4 standard errors; seeded)."""
    model = lm.model
    prefix = model.tokenizer("Zoe has 30 apples . Zoe finds", add_special_tokens=False)["input_ids"]
    target = model.tokenizer(" 3 more", add_special_tokens=False)["input_ids"][:2]
    assert len(target) == 2
    n, values = 2, []
    for k in (1, 2):
        for subset in itertools.combinations(range(n), k):
            masked = [False] * len(prefix) + [i in subset for i in range(n)]
            ids = torch.tensor([prefix + [model.spec.mask_id if m else t for m, t in zip(masked[len(prefix):], target)]])
            with torch.no_grad():
                logits = model.module.training_logits(ids, torch.arange(ids.shape[1])[None],
                                                      torch.tensor([[0] * len(prefix) + [1] * n]), "canvas",
                                                      torch.tensor([masked]))
            logp = torch.log_softmax(logits.double(), -1)
            ce = -sum(logp[j, target[i]].item() for j, i in enumerate(subset))
            values.append((k, ce * n / k))
    per_k = {k: [v for kk, v in values if kk == k] for k in (1, 2)}
    mean = sum(sum(v) / len(v) for v in per_k.values()) / 2  # k uniform, subsets uniform given k
    var = sum(sum((x - mean) ** 2 for x in v) / len(v) for v in per_k.values()) / 2
    estimate = monte_carlo_loglikelihood(model, prefix, target, mc_num=512, mc_batch=32, seed=3)
    assert abs(-estimate - mean) < 4 * math.sqrt(var / 512) + 1e-9


def test_is_greedy(lm):
    model = lm.model
    context = arith.test_problems()[1].question
    prefix = model.tokenizer(context, add_special_tokens=False)["input_ids"]
    greedy = paradec.generate(model, prefix, mode="ao", answer_len=3, steps=None, tokens_per_step=1,
                              eos_closes_block=False, chat_template=False).token_ids[:3]
    text = model.tokenizer.decode(greedy)
    (ll, is_greedy), = lm.loglikelihood([Instance("loglikelihood", {}, (context, " " + text), 0)], disable_tqdm=True)
    other = [t + 1 if t + 1 != model.spec.mask_id else t + 2 for t in greedy]
    (_, not_greedy), = lm.loglikelihood([Instance("loglikelihood", {}, (context, " " + model.tokenizer.decode(other)), 0)],
                                        disable_tqdm=True)
    assert math.isfinite(ll) and ll < 0
    assert is_greedy and not not_greedy


def test_bad_model_args():
    with pytest.raises(ConfigError, match="unknown paradec model_args"):
        ParadecLM(pretrained="paradec-tiny", device="cpu", blockz=3)
    with pytest.raises(ConfigError, match="output"):
        ParadecLM(pretrained="paradec-tiny", device="cpu", output="tokens")
    with pytest.raises(ConfigError, match="mc_num"):
        ParadecLM(pretrained="paradec-tiny", device="cpu", mc_num=0)
    with pytest.raises(ConfigError, match="tokens_per_step"):
        ParadecLM(pretrained="paradec-tiny", device="cpu", tokens_per_step=-1)


def test_bad_loglikelihood_input(lm):
    with pytest.raises(InputError, match="continuation is empty"):
        monte_carlo_loglikelihood(lm.model, [1, 2], [])
    with pytest.raises(InputError, match="context is empty"):
        monte_carlo_loglikelihood(lm.model, [], [1])
    with pytest.raises(InputError, match="over the model"):
        monte_carlo_loglikelihood(lm.model, [1] * lm.model.spec.max_length, [1])


def test_eval_grading_agrees_with_lm_eval_filters():
    """paradec eval's gsm8k rule and the shipped config's strict filter read the same number."""
    task = get_task("gsm8k")
    for line in SAMPLE.read_text().splitlines()[:10]:
        row = json.loads(line)
        assert task.grade(row["answer"], row["answer"].split("####")[-1].strip()).correct
