"""paradec as an lm-evaluation-harness model: ``--model paradec`` (needs the ``eval`` extra).

    paradec lm-eval --model paradec --model_args pretrained=PATH,blocks=4,steps=256 \\
        --tasks paradec_gsm8k_local --include_path $(python -m paradec.eval.harness --tasks-dir)

lm-eval 0.4 finds third-party models only once their module is imported, so ``paradec lm-eval``
is lm-eval's own command line with this module imported first; in Python, import this module,
then call ``lm_eval.simple_evaluate(model="paradec", ...)``. ``--model_args`` takes
``pretrained`` (a checkpoint directory or built-in name), ``device``, ``dtype`` (bf16, fp16,
fp32), ``batch_size`` (an int, ``auto`` or ``auto:N``: paradec does not probe memory, so auto is
8, or ``max_batch_size`` when smaller), ``output`` (``summary``: the summary — the answer region
outside nap — is the continuation; ``canvas``: the think blocks then the summary, one blank line
apart), ``mc_num`` / ``mc_batch`` / ``mc_seed`` for log-likelihoods, and any ``GenerationConfig``
field. lm-eval's own ``--batch_size``, ``--max_batch_size`` and ``--device`` are taken too; where
``--model_args`` also names one, the ``--model_args`` value is used (see ``_merge``).

The shipped task ``paradec_gsm8k_local`` reads GSM8K's test split packaged with paradec
(``paradec.eval.tasks.gsm8k_test_path()``), from any working directory.

generate_until: each request's context is decoded by ``paradec.generate`` (contexts are used as
given: lm-eval's ``--apply_chat_template`` formats them through ``apply_chat_template`` below);
the continuation is cut at the first of the request's ``until`` strings. Outside nap, a request's
``max_gen_toks`` is the answer region's length; in nap it caps the summary (the canvas's shape, the
checkpoint's): one below ``summary_len`` shortens it — unless ``--model_args`` or the request set
the region's length (``answer_len`` / ``summary_len`` / ``max_new_tokens``). ``temperature`` and
``do_sample``, which every task sends, yield to a ``--model_args`` temperature; ``do_sample``
without a temperature samples at 1.0. A request's other gen_kwargs may be paradec's request
settings (``top_k``, ``top_p`` — dropped when decoding is greedy, ``top_k=-1`` meaning off as in
vLLM —, ``tokens_per_step``, ``window``, ...: what a request to ``paradec serve`` may set), which
override ``--model_args``; transformers'
``num_beams``, ``repetition_penalty``, ... are taken at their neutral values; anything else is
refused by name before any request decodes. ``top_k`` / ``top_p`` in ``--model_args`` restrict the
requests that sample. Request n (in the order decoded: grouped by generation kwargs) samples with
``seed + n`` whatever ``batch_size``, so repeats differ and a result does not depend on the chunking.
``seed`` is ``--model_args``' (or the request's); lm-eval's ``--seed`` seeds its few-shot sampling and
the global RNGs, which paradec's decoding does not draw from.

loglikelihood: LLaDA's Monte-Carlo estimate of the masked-diffusion bound (its Appendix B.6 and
eval harness): for each of ``mc_num`` draws mask k of the continuation's L tokens (k spread
evenly over 1..L across a draw batch, from a random start), forward context + masked
continuation once with full attention, and take the masked tokens' cross-entropy weighted by
L / k; the estimate is minus the mean over draws — a lower bound on log p, not its exact value.
is_greedy: the continuation equals what greedy decoding writes one token per step by confidence
(mode ``ao``) from the context. loglikelihood_rolling: the same estimate of the whole text after
the tokenizer's BOS (EOS when it has none); a text longer than the model's context is refused.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch
import lm_eval.models  # noqa: F401  lm-eval's own models first: get_model loads them only into an empty registry
import torch.nn.functional as F
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.utils import simple_parse_args_string
from tqdm import tqdm

import paradec
from paradec.api import resolve_config
from paradec.config import GenerationConfig
from paradec.errors import ConfigError, InputError
from paradec.models.attention import PROMPT
from paradec.serve.protocol import REQUEST_SETTINGS

log = logging.getLogger(__name__)
TASKS_DIR = Path(__file__).resolve().parent / "lm_eval_tasks"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
OUTPUTS = ("summary", "canvas")
AUTO_BATCH_SIZE = 8  # what batch_size "auto" means: paradec does not probe memory for the largest batch
_READ = {"until", "do_sample", "temperature", "max_gen_toks"}  # the gen_kwargs lm-eval's tasks send
# transformers' generation kwargs some tasks send, taken at the value that changes nothing
_NEUTRAL = {"num_beams": 1, "repetition_penalty": 1.0, "length_penalty": 1.0, "no_repeat_ngram_size": 0,
            "presence_penalty": 0.0, "frequency_penalty": 0.0, "num_return_sequences": 1}
_FIELDS = {f.name for f in dataclasses.fields(GenerationConfig)}


@register_model("paradec")
class ParadecLM(LM):
    def __init__(self, pretrained: str = "paradec-tiny", device: str | None = None, dtype: str | None = None,
                 batch_size: int | str = 1, max_batch_size: int | str | None = None, output: str = "summary",
                 mc_num: int = 128, mc_batch: int = 32, mc_seed: int = 0, **settings):
        super().__init__()
        unknown = sorted(set(settings) - _FIELDS)
        if unknown:
            raise ConfigError(f"unknown paradec model_args {unknown}; known: pretrained, device, dtype, batch_size, "
                              f"max_batch_size, output, mc_num, mc_batch, mc_seed and the GenerationConfig fields "
                              f"{sorted(_FIELDS)}")
        if output not in OUTPUTS:
            raise ConfigError(f"output must be one of {list(OUTPUTS)}, got {output!r}")
        if dtype is not None and dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        for name, value in (("mc_num", mc_num), ("mc_batch", mc_batch)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be an int >= 1, got {value!r}")
        batch_size = _batch_size(batch_size, max_batch_size)
        if device is None or (str(device).startswith("cuda") and not torch.cuda.is_available()):
            if device is not None:  # lm-eval's command line asks for cuda:0 unless told otherwise
                log.warning("device %s asked for but CUDA is not available: running on the CPU", device)
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = paradec.load(pretrained, device=device, dtype=DTYPES.get(dtype))
        if self.model.tokenizer is None:
            raise ConfigError(f"{pretrained}: lm-eval speaks text, and this model has no tokenizer")
        self.settings = {"chat_template": False, **settings}
        # validated before any request; top_k / top_p without a temperature restrict the requests that sample
        sampling = {"temperature": 1.0} if {"top_k", "top_p"} & set(settings) and "temperature" not in settings else {}
        self.config = resolve_config(self.model, **self.settings, **sampling)
        self.batch_size = batch_size
        self.output, self.mc_num, self.mc_batch, self.mc_seed = output, mc_num, mc_batch, mc_seed
        self.pretrained = str(pretrained)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> ParadecLM:
        """``simple_evaluate(model="paradec", model_args="k=v,...")``: lm-eval parses the string
        (digits become ints) and hands its own batch_size / max_batch_size / device beside it."""
        return cls(**_merge(simple_parse_args_string(arg_string), additional_config))

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None) -> ParadecLM:
        """``simple_evaluate(model_args={...})``, and lm-eval's command line (``paradec lm-eval``), which
        parses ``--model_args`` into a dict itself; ``additional_config`` as above."""
        return cls(**_merge(arg_dict, additional_config))

    # --- generation -----------------------------------------------------------------------------

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out: list[str | None] = [None] * len(requests)
        groups: dict[tuple, list[int]] = {}
        for i, request in enumerate(requests):
            groups.setdefault(_freeze(request.args[1]), []).append(i)
        bar = tqdm(total=len(requests), desc="paradec generate_until", disable=disable_tqdm)
        configs = {frozen: self._config_for(dict(frozen)) for frozen in groups}  # every group's, before any decodes
        first = 0  # the requests' seeds: config.seed + n for the n-th request in group order, whatever the chunks
        for frozen, indices in groups.items():
            config, until = configs[frozen], _until(dict(frozen).get("until"))
            for lo in range(0, len(indices), self.batch_size):
                chunk = indices[lo : lo + self.batch_size]
                seeded = dataclasses.replace(config, seed=config.seed + first + lo)  # row r: seed + first + lo + r
                results = paradec.generate(self.model, [requests[i].args[0] for i in chunk], seeded)
                for i, result in zip(chunk, results):
                    text = _cut(self._text(result), until)
                    out[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                bar.update(len(chunk))
            first += len(indices)
        bar.close()
        return out

    def _config_for(self, kwargs: dict) -> GenerationConfig:
        """The config a group of requests decodes with: the model's (``--model_args``) with the
        requests' gen_kwargs. ``temperature`` / ``do_sample`` and ``max_gen_toks``, which every task
        sends, yield to ``--model_args``; a request setting of paradec's (``top_k``, ``top_p``,
        ``tokens_per_step``, ... as ``paradec serve`` takes them) is the request's own and wins."""
        unknown = sorted(k for k in kwargs if k not in _READ and k not in REQUEST_SETTINGS
                         and (k not in _NEUTRAL or _NEUTRAL[k] != kwargs[k]))
        if unknown:
            given = ", ".join(f"{k}={kwargs[k]!r}" for k in unknown)
            raise ConfigError(f"generation kwargs {given}: not taken by paradec; it takes {', '.join(sorted(_READ))}, "
                              f"its request settings (top_k, top_p, tokens_per_step, ...: "
                              f"paradec.serve.protocol.REQUEST_SETTINGS) and {', '.join(_NEUTRAL)} at their neutral "
                              f"values {list(_NEUTRAL.values())}")
        overrides = {k: v for k, v in kwargs.items() if k in REQUEST_SETTINGS}  # (a stop list arrives as a tuple)
        if "temperature" not in self.settings:
            # do_sample without a temperature samples at 1.0, as transformers' and vLLM's defaults do
            temperature = kwargs.get("temperature", 1.0 if kwargs.get("do_sample") else 0.0)
            overrides["temperature"] = 0.0 if kwargs.get("do_sample") is False else float(temperature or 0.0)
        else:
            overrides.pop("temperature", None)
        if overrides.get("top_k") == -1:  # vLLM's "off"
            overrides["top_k"] = None
        if overrides.get("temperature", self.config.temperature) == 0:  # greedy: a sampling filter changes nothing
            for name in ("top_k", "top_p"):
                overrides.pop(name, None)
        mode = overrides.get("mode", self.config.mode)
        region = "summary_len" if mode == "nap" else "answer_len"
        given = {region, "max_new_tokens"} & (set(self.settings) | set(overrides))
        budget = kwargs.get("max_gen_toks")
        if budget and not given:
            budget = int(budget)
            if region == "answer_len":
                overrides["answer_len"] = budget
            elif budget < self.config.summary_len:  # nap: the summary is the canvas's shape; the budget caps it
                overrides["summary_len"] = budget
        return GenerationConfig.build(self.config, **overrides)

    def _text(self, result) -> str:
        if self.output == "canvas" and result.blocks:
            return "\n\n".join([*result.blocks, result.summary])
        return result.summary

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        if not getattr(self.model.tokenizer, "chat_template", None):
            raise ConfigError(f"--apply_chat_template: {self.pretrained}'s tokenizer has no chat template; run without "
                              f"it (contexts are decoded as given)")
        return self.model.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                        add_generation_prompt=add_generation_prompt)

    @property
    def tokenizer_name(self) -> str:
        return getattr(self.model.tokenizer, "name_or_path", self.pretrained).replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return getattr(self.model.tokenizer, "chat_template", None) or ""

    # --- log-likelihood -------------------------------------------------------------------------

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        out = []
        for request in tqdm(requests, desc="paradec loglikelihood", disable=disable_tqdm):
            context, continuation = request.args
            prefix, target = self._split(context, continuation)
            value = (monte_carlo_loglikelihood(self.model, prefix, target, self.mc_num, self.mc_batch, self.mc_seed),
                     self._is_greedy(prefix, target))
            out.append(value)
            self.cache_hook.add_partial("loglikelihood", request.args, value)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        out = []
        tok = self.model.tokenizer
        start = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        if start is None:
            raise InputError("loglikelihood_rolling needs a BOS or EOS token to condition on")
        for request in tqdm(requests, desc="paradec loglikelihood_rolling", disable=disable_tqdm):
            target = self._encode(request.args[0])
            value = monte_carlo_loglikelihood(self.model, [start], target, self.mc_num, self.mc_batch, self.mc_seed)
            out.append(value)
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, value)
        return out

    def _encode(self, text: str) -> list[int]:
        return self.model.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _split(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Context and continuation ids, tokenised whole then split (so a word cut between them
        tokenises as the model sees it), as lm-eval's own models do."""
        whole, prefix = self._encode(context + continuation), self._encode(context)
        if whole[: len(prefix)] != prefix:  # the boundary merged: encode the parts apart
            return prefix, self._encode(continuation)
        return prefix, whole[len(prefix) :]

    def _is_greedy(self, prefix: list[int], target: list[int]) -> bool:
        if not prefix or not target:
            return False
        result = paradec.generate(self.model, prefix, mode="ao", answer_len=len(target), steps=None, tokens_per_step=1,
                                  policy="confidence", eos_closes_block=False, temperature=0.0, window=None,
                                  cache=None, chat_template=False)
        return result.token_ids[: len(target)] == target


def monte_carlo_loglikelihood(model, prefix: list[int], target: list[int], mc_num: int = 128, mc_batch: int = 32,
                              seed: int = 0) -> float:
    """The masked-diffusion estimate of log p(target | prefix) described in the module's docstring."""
    if not target:
        raise InputError("the continuation is empty: nothing to score")
    if not prefix:
        raise InputError("the context is empty: a diffusion model needs at least one context token")
    length = len(prefix) + len(target)
    if length > model.spec.max_length:
        raise InputError(f"context + continuation are {length} tokens, over the model's {model.spec.max_length}")
    device, n = model.device, len(target)
    generator = torch.Generator().manual_seed(seed)
    ids = torch.tensor(prefix + target, device=device)  # [T]
    positions = torch.arange(length, device=device)
    segments = torch.full((length,), PROMPT, device=device)
    segments[len(prefix) :] = 1  # the continuation; full attention ("canvas") sees across segments
    losses = []
    with torch.no_grad():
        for lo in range(0, mc_num, mc_batch):
            b = min(mc_batch, mc_num - lo)
            first = int(torch.randint(1, n + 1, (1,), generator=generator))
            k = (first + torch.arange(b) * n // b) % n + 1  # [b] masked counts in 1..n, spread evenly
            order = torch.rand(b, n, generator=generator).argsort(dim=1)  # a random permutation per draw
            masked_target = order < k[:, None]  # [b, n]: k of the n positions
            masked = torch.zeros(b, length, dtype=torch.bool)
            masked[:, len(prefix) :] = masked_target
            masked = masked.to(device)
            noisy = torch.where(masked, torch.full_like(ids, model.spec.mask_id), ids.expand(b, -1))  # [b, T]
            logits = model.module.training_logits(noisy, positions.expand(b, -1), segments.expand(b, -1), "canvas",
                                                  masked)  # [M, V]
            ce = F.cross_entropy(logits.float(), ids.expand(b, -1)[masked], reduction="none")  # [M]
            per_draw = torch.zeros(b, device=device).index_add_(0, masked.nonzero()[:, 0], ce)  # [b]
            losses.append(per_draw.double().cpu() * n / k.double())
    return -float(torch.cat(losses).mean())


def _merge(model_args: dict | None, additional_config: dict | None) -> dict:
    """``--model_args`` merged with what lm-eval hands every model beside them: ``batch_size``,
    ``max_batch_size`` and ``device`` from its command line or ``simple_evaluate`` (None when
    unset, dropped). lm-eval's HFLM takes both through ``LM.create_from_arg_string``'s
    ``cls(**args, **additional)``, so a setting named in both is refused there ("got multiple
    values for keyword argument"); paradec merges them instead, and the ``--model_args`` value
    wins: lm-eval's command line hands its defaults (batch_size 1, device cuda:0) in the same dict
    as flags the user typed, so a flag cannot be told from a default, and letting it win would
    silently throw away a value the user wrote in ``--model_args``."""
    merged = dict(model_args or {})
    for key, value in (additional_config or {}).items():
        if value is None:
            continue
        if key not in merged:
            merged[key] = value
        elif str(merged[key]) != str(value):
            log.info("%s=%r from --model_args is used; lm-eval's %s=%r (its flag or its default) is not",
                     key, merged[key], key, value)
    return merged


def _batch_size(value, max_batch_size) -> int:
    """A batch size from lm-eval's forms: an int, a string of digits (its ``--batch_size`` is a
    string), ``auto`` or ``auto:N`` (HFLM re-probes N times; paradec does not probe: AUTO_BATCH_SIZE,
    capped by ``max_batch_size``)."""
    cap = _positive_int("max_batch_size", max_batch_size) if max_batch_size is not None else None
    text = value.strip() if isinstance(value, str) else None
    if text is not None and (text == "auto" or (text.startswith("auto:") and _is_number(text[5:]))):
        return min(AUTO_BATCH_SIZE, cap) if cap is not None else AUTO_BATCH_SIZE
    return _positive_int("batch_size", value, extra=", 'auto' or 'auto:N'")


def _positive_int(name: str, value, extra: str = "") -> int:
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be an int >= 1{extra}, got {value!r}")
    return value


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _freeze(kwargs) -> tuple:
    if not isinstance(kwargs, dict):
        raise InputError(f"generate_until expects (context, gen_kwargs dict), got {type(kwargs).__name__}")
    return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in kwargs.items()))


def _until(value) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else [s for s in value if s]


def _cut(text: str, until: list[str]) -> str:
    cuts = [text.find(s) for s in until if s in text]
    return text[: min(cuts)] if cuts else text


if __name__ == "__main__":
    import sys

    if sys.argv[1:] == ["--tasks-dir"]:
        print(TASKS_DIR)
    else:
        print(__doc__)
