"""The HTTP endpoint as the official ``openai`` Python client (and lm-evaluation-harness's
``local-completions`` model) sees it, against a real ``paradec serve --model paradec-tiny
--http-port``: /v1/models, max_tokens and finish_reason, usage with reasoning tokens, streaming
(role first, include_usage), every form of ``prompt``, top_p, chat names, what cannot be honoured
refused by name in OpenAI's error shape, and the bound on connections."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

import paradec
from paradec.serve import Client
from paradec.serve.http import _settings
from paradec.serve.protocol import MessageType, ProtocolError, decode, encode
from paradec.train.tasks import arith

from dist_worker import free_port

openai = pytest.importorskip("openai")

SMALL = {"blocks": 2, "tokens_per_step": 4}  # a short canvas: quick on the CPU
QUESTION = arith.test_problems()[30].question  # the tiny model thinks about it: its blocks are not empty
OTHER = arith.test_problems()[31].question
CHAT = [{"role": "user", "content": QUESTION}]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """``paradec serve`` as its own process: (ZeroMQ address, HTTP base url)."""
    log_path = tmp_path_factory.mktemp("serve") / "serve.log"
    address, port = f"tcp://127.0.0.1:{free_port()}", free_port()
    command = [sys.executable, "-m", "paradec", "serve", "--model", "paradec-tiny", "--device", "cpu",
               "--address", address, "--http-port", str(port)]
    with open(log_path, "w") as log:
        # One thread, as the tests' own models run: two threads on two busy cores made each request
        # take seconds instead of a fraction of one.
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                   env=os.environ | {"OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 180
        while True:
            assert process.poll() is None, log_path.read_text()[-3000:]
            assert time.monotonic() < deadline, log_path.read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            time.sleep(0.2)
        yield address, f"http://127.0.0.1:{port}"
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=f"{served[1]}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def tiny():
    return paradec.load("paradec-tiny")


@pytest.fixture(scope="module")
def direct(tiny):
    """What ``paradec.generate`` answers to QUESTION with max_new_tokens=4 (the tiny model has no
    chat template: CHAT is the same tokens)."""
    return paradec.generate(tiny, QUESTION, max_new_tokens=4, **SMALL)


def test_models_list_and_retrieve(client):
    models = client.models.list()
    assert [m.id for m in models.data] == ["paradec-tiny"] and models.data[0].object == "model"  # --model's name
    assert client.models.retrieve("paradec-tiny").id == "paradec-tiny"
    with pytest.raises(openai.NotFoundError, match="gpt-4o") as caught:
        client.models.retrieve("gpt-4o")
    assert caught.value.body["code"] == "model_not_found"


def test_max_tokens_bounds_the_answer_with_finish_reason_and_usage(client, direct):
    reply = client.chat.completions.create(model="paradec", messages=CHAT, max_tokens=4, extra_body=SMALL)
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == direct.text
    assert reply.choices[0].finish_reason == direct.finish_reason == "length"
    usage = reply.usage
    assert usage.completion_tokens == len(direct.summary_token_ids) <= 4
    reasoning = usage.completion_tokens_details.reasoning_tokens  # the think blocks': not bounded by max_tokens
    assert reasoning == sum(map(len, direct.block_token_ids)) > 0
    assert usage.prompt_tokens == len(direct.prompt_ids)
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens + reasoning
    with pytest.raises(openai.BadRequestError, match="max_completion_tokens"):
        client.chat.completions.create(model="paradec", messages=CHAT, max_tokens=4, max_completion_tokens=5)


def test_stop_is_cut_by_the_engine(client, tiny):
    stopped = paradec.generate(tiny, QUESTION, stop=" ", **SMALL)
    assert stopped.finish_reason == "stop"
    reply = client.completions.create(model="paradec", prompt=QUESTION, stop=[" "], extra_body=SMALL)
    assert reply.choices[0].text == stopped.text and " " not in reply.choices[0].text
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage.completion_tokens == len(stopped.summary_token_ids)


def test_streaming_chat_and_completions(client, direct):
    chunks = list(client.chat.completions.create(model="paradec", messages=CHAT, max_completion_tokens=4,
                                                 extra_body=SMALL, stream=True, stream_options={"include_usage": True}))
    first = chunks[0].choices[0].delta
    assert first.role == "assistant" and first.content == ""
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == direct.text
    with_choices = [c for c in chunks if c.choices]
    assert with_choices[-1].choices[0].finish_reason == direct.finish_reason
    assert all(c.choices[0].finish_reason is None for c in with_choices[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(direct.summary_token_ids)
    assert all(c.usage is None for c in chunks[:-1])

    chunks = list(client.completions.create(model="paradec", prompt=QUESTION, max_tokens=4, extra_body=SMALL,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == direct.text
    assert [c for c in chunks if c.choices][-1].choices[0].finish_reason == direct.finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(direct.summary_token_ids)


def test_top_p_passed_on_or_dropped_where_it_is_a_no_op(client, direct):
    reply = client.completions.create(model="paradec", prompt=QUESTION, max_tokens=4, top_p=0.5, temperature=0,
                                      extra_body=SMALL)
    assert reply.choices[0].text == direct.text  # greedy: top_p changes nothing and is dropped, not refused
    assert "top_p" not in _settings({"prompt": "q", "top_p": 1, "temperature": 0.7}, chat=False)[1]
    assert _settings({"prompt": "q", "top_p": 0.9, "temperature": 0.7}, chat=False)[1]["top_p"] == 0.9
    with pytest.raises(openai.BadRequestError, match="top_p"):  # the engine checks it: it was passed on
        client.completions.create(model="paradec", prompt=QUESTION, top_p=1.5, temperature=0.7, extra_body=SMALL)


def test_top_p_and_temperature_out_of_range_are_refused_by_name(client):
    """Refused even where the value would be dropped (top_p at temperature 0, greedy)."""
    from paradec.serve.http import BadRequest

    for fields in ({"top_p": -3}, {"top_p": 1.5, "temperature": 0}, {"temperature": -1}):
        with pytest.raises(openai.BadRequestError) as caught:
            client.completions.create(model="paradec", prompt=QUESTION, extra_body=SMALL, **fields)
        name = next(iter(fields))
        assert caught.value.body["param"] == name and caught.value.body["message"].startswith(f"{name} must"), fields
    for name, value in (("temperature", float("inf")), ("top_p", float("nan"))):  # what json.loads reads as well
        with pytest.raises(BadRequest, match=f"{name} must") as caught:
            _settings({"prompt": QUESTION, "temperature": 0.7, name: value}, chat=False)
        assert caught.value.param == name


def test_chat_content_as_a_list_of_text_parts(client, direct):
    parts = [{"role": "user", "content": [{"type": "text", "text": QUESTION}]}]
    reply = client.chat.completions.create(model="paradec", messages=parts, max_tokens=4, extra_body=SMALL)
    assert reply.choices[0].message.content == direct.text  # as the same text given as a string
    image = {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}
    with pytest.raises(openai.BadRequestError, match=re.escape("messages[0].content[1] must be a text part")):
        client.chat.completions.create(model="paradec", messages=[{"role": "user", "content": [
            {"type": "text", "text": QUESTION}, image]}], extra_body=SMALL)


def test_a_stream_the_server_refuses_raises_its_status_in_the_client(client):
    with pytest.raises(openai.BadRequestError, match="blocks must be"):  # not a 200 stream that ends in an error
        client.chat.completions.create(model="paradec", messages=CHAT, stream=True, extra_body={"blocks": 0})


def test_chat_message_names_and_system_messages(client, direct):
    named = [{"role": "user", "content": QUESTION, "name": "ada"}]
    reply = client.chat.completions.create(model="paradec", messages=named, max_tokens=4, extra_body=SMALL)
    assert reply.choices[0].message.content == direct.text  # no chat template: the name changes nothing
    # paradec-tiny's tokenizer has no chat template: a system message reaches the engine, which
    # says so (a model with a template renders it); the wire and HTTP no longer refuse the role
    with pytest.raises(openai.BadRequestError, match="chat template"):
        client.chat.completions.create(model="paradec", extra_body=SMALL,
                                       messages=[{"role": "system", "content": "Be brief."}, *named])


def test_wire_takes_roles_and_names():
    ok = {"id": "a", "messages": [{"role": "system", "content": "s", "name": "n"}, {"role": "user", "content": "q"}]}
    assert decode(encode(MessageType.ADD, ok)).body == ok
    for bad, said in [({"role": "tool", "content": "q"}, "chat role"), ({"role": "user", "content": "q", "name": 1},
                                                                         "optional 'name'"),
                      ({"role": "user", "content": "q", "x": "y"}, "optional 'name'"),
                      ({"role": "user", "content": "q", "name": "n" * 65}, "name is 65 characters")]:
        with pytest.raises(ProtocolError, match=said):
            encode(MessageType.ADD, {"id": "a", "messages": [bad]})


def test_chat_messages_as_clients_send_them():
    """A reply's message echoed back (its null refusal, tool_calls, ...) and ``developer`` (the
    newer name for system) are taken; what cannot be is refused naming the message and its key."""
    from paradec.serve.http import BadRequest

    echoed = {"role": "assistant", "content": "6", "refusal": None, "tool_calls": None, "function_call": None,
              "audio": None, "annotations": [], "name": None}
    messages = [{"role": "developer", "content": "be brief"}, {"role": "user", "content": "q"}, echoed,
                {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
    assert _settings({"messages": messages}, chat=True)[0] == [[
        {"role": "system", "content": "be brief"}, {"role": "user", "content": "q"},
        {"role": "assistant", "content": "6"}, {"role": "user", "content": "a\nb"}]]
    call = [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]
    for bad, said in [({"role": "tool", "content": "x", "tool_call_id": "c"},  # the role is what is wrong with it
                       r"messages[1].role must be one of ['system', 'user', 'assistant', 'developer'], got 'tool'; "
                       "tool calls are not produced"),
                      ({"role": "tool", "content": "x"}, "messages[1].role must be one of"),
                      ({"role": "assistant", "content": None, "tool_calls": call}, "messages[1].tool_calls=["),
                      ({"role": "assistant", "content": None}, "messages[1].content must be a string"),
                      ({"content": "x"}, "messages[1].role must be one of"),
                      ({"role": "user", "content": "x", "name": 3}, "messages[1].name must be a string"),
                      ({"role": "user", "content": "x", "weight": 1}, "messages[1].weight=1 cannot be taken")]:
        with pytest.raises(BadRequest) as caught:
            _settings({"messages": [{"role": "user", "content": "q"}, bad]}, chat=True)
        assert str(caught.value).startswith(said) and caught.value.param == "messages", (bad, str(caught.value))


def test_fields_clients_send_at_their_defaults_are_taken():
    """OpenAI's and vLLM's fields that paradec does not use are taken at their neutral values
    (what SDKs and benchmark clients send) and refused by name otherwise."""
    from paradec.serve.http import BadRequest

    neutral = {"store": False, "metadata": {"run": "a"}, "service_tier": "auto", "reasoning_effort": None,
               "modalities": ["text"], "min_tokens": 0, "repetition_penalty": 1.0, "ignore_eos": False,
               "skip_special_tokens": True, "include_stop_str_in_output": False, "stop_token_ids": [],
               "add_generation_prompt": True, "chat_template_kwargs": {}, "spaces_between_special_tokens": True}
    assert _settings({"prompt": "q", **neutral}, chat=False)[1] == {}  # nothing reaches the engine
    for field, value in [("store", True), ("reasoning_effort", "high"), ("min_tokens", 5), ("ignore_eos", True),
                         ("repetition_penalty", 1.2), ("stop_token_ids", [7]), ("service_tier", "flex")]:
        with pytest.raises(BadRequest) as caught:
            _settings({"prompt": "q", field: value}, chat=False)
        assert caught.value.param == field and caught.value.code == "unsupported_parameter"


def test_context_overflow_unknown_routes_and_busy_answer_as_openai_does(served, client):
    """A prompt and answer past the model's length: 400 context_length_exceeded; an unknown
    route or method: 404 / 405 in OpenAI's error shape."""
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model="paradec", prompt=QUESTION, max_tokens=600, extra_body=SMALL)
    assert caught.value.body["code"] == "context_length_exceeded" and "maximum length" in caught.value.body["message"]
    for method, path, status in [("POST", "/v1/embeddings", 404), ("GET", "/v1/completions", 405)]:
        request = urllib.request.Request(f"{served[1]}{path}", method=method, data=b"{}" if method == "POST" else None)
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(request, timeout=10)
        assert caught.value.code == status
        error = json.loads(caught.value.read())["error"]
        assert error["code"] == ("not_found" if status == 404 else "method_not_allowed") and path in error["message"]
        assert error["type"] == "invalid_request_error" and caught.value.headers["Retry-After"] is None
        assert status == 404 or caught.value.headers["Allow"] == "POST"  # a 405 names the methods allowed


def test_stream_is_a_boolean_or_null():
    from paradec.serve.http import BadRequest

    for value, expected in [(True, True), (False, False), (None, False)]:
        assert _settings({"prompt": QUESTION, "stream": value}, chat=False)[2] is expected
    assert _settings({"prompt": QUESTION}, chat=False)[2] is False
    for value in ("false", "true", 1, 0, [0], {}, {"a": 1}):
        with pytest.raises(BadRequest, match="stream must be a boolean") as caught:
            _settings({"messages": CHAT, "stream": value}, chat=True)
        assert caught.value.param == "stream" and caught.value.status == 400


UNHONOURED = {"logprobs": True, "top_logprobs": 2, "presence_penalty": 0.5, "frequency_penalty": -1.0,
              "logit_bias": {"50": 10}, "best_of": 2, "response_format": {"type": "json_object"},
              "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}], "tool_choice": "required"}


def test_what_cannot_be_honoured_is_refused_by_name(client, direct):
    for field, value in UNHONOURED.items():
        with pytest.raises(openai.BadRequestError) as caught:
            client.chat.completions.create(model="paradec", messages=CHAT, extra_body={field: value})
        error = caught.value.body
        assert caught.value.status_code == 400 and error["param"] == field and error["type"] == "invalid_request_error"
        assert error["message"].startswith(f"{field}=") and error["code"] == "unsupported_parameter"
        assert field in str(caught.value)
    neutral = client.chat.completions.create(  # what clients send by default is accepted
        model="paradec", messages=CHAT, presence_penalty=0, frequency_penalty=0.0, logprobs=False, n=1, user="u",
        top_logprobs=None, logit_bias={}, response_format={"type": "text"}, max_tokens=4, extra_body=SMALL)
    assert neutral.choices[0].message.content == direct.text
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model="paradec", prompt=QUESTION, extra_body={"pickle": 1})
    assert caught.value.body["param"] == "pickle"


def test_served_result_has_text_and_finish_reason(served, direct):
    with Client(served[0]) as c:
        result = c.generate(QUESTION, max_new_tokens=4, **SMALL)
    assert (result.text, result.finish_reason, result.text_tokens) == (direct.text, direct.finish_reason,
                                                                       len(direct.summary_token_ids))
    assert result.summary == direct.summary and result.summary_tokens == len(direct.summary_token_ids)


@pytest.fixture(scope="module")
def other(tiny):
    """What ``paradec.generate`` answers to OTHER, as ``direct`` to QUESTION."""
    return paradec.generate(tiny, OTHER, max_new_tokens=4, **SMALL)


def test_prompt_in_every_openai_form_gets_one_choice_per_prompt(client, direct, other):
    """A string, a list of strings, token ids, a list of lists of token ids: one choice per
    prompt at its index, each as ``generate`` answers it alone, usage summed over them."""
    for prompt, expected in [([QUESTION, OTHER], [direct, other]), (direct.prompt_ids, [direct]),
                             ([other.prompt_ids, direct.prompt_ids], [other, direct])]:
        reply = client.completions.create(model="paradec", prompt=prompt, max_tokens=4, extra_body=SMALL)
        assert [(c.index, c.text, c.finish_reason) for c in reply.choices] == [
            (i, r.text, r.finish_reason) for i, r in enumerate(expected)]
        usage = reply.usage
        assert usage.prompt_tokens == sum(len(r.prompt_ids) for r in expected)
        assert usage.completion_tokens == sum(len(r.summary_token_ids) for r in expected)
        reasoning = sum(len(ids) for r in expected for ids in r.block_token_ids)
        assert usage.completion_tokens_details.reasoning_tokens == reasoning
        assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens + reasoning
    chunks = list(client.completions.create(model="paradec", prompt=[QUESTION, OTHER], max_tokens=4, extra_body=SMALL,
                                            stream=True, stream_options={"include_usage": True}))
    for index, expected in enumerate([direct, other]):
        mine = [c.choices[0] for c in chunks if c.choices and c.choices[0].index == index]
        assert "".join(c.text for c in mine) == expected.text and mine[-1].finish_reason == expected.finish_reason
    assert {c.choices[0].index for c in chunks if c.choices} == {0, 1}
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == reply.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])  # the usage chunk comes once, at the end


SAMPLED = dict(SMALL, temperature=0.9)  # the tiny model's samples differ between seeds at this temperature


def test_n_choices_per_prompt_are_the_samples_of_num_return_sequences(client, tiny):
    """``n`` choices of each prompt: choice i * n + j is prompt i's sample j, as
    ``generate(num_return_sequences=n)`` samples it (seed + j; seed 0 when the body sets none),
    streamed or not; a prompt's tokens count once in usage."""
    samples = [paradec.generate(tiny, p, max_new_tokens=4, num_return_sequences=2, seed=7, **SAMPLED)
               for p in (QUESTION, OTHER)]
    expected = [r for per_prompt in samples for r in per_prompt]  # prompt-major
    assert len({tuple(r.blocks) for r in expected}) == 4  # the samples differ: each choice has its own seed
    reply = client.completions.create(model="paradec", prompt=[QUESTION, OTHER], n=2, seed=7, max_tokens=4,
                                      extra_body=SAMPLED)
    assert [(c.index, c.text, c.finish_reason, c.model_extra["paradec"]["blocks"]) for c in reply.choices] == [
        (k, r.text, r.finish_reason, r.blocks) for k, r in enumerate(expected)]
    assert reply.usage.prompt_tokens == len(expected[0].prompt_ids) + len(expected[2].prompt_ids)
    assert reply.usage.completion_tokens == sum(len(r.summary_token_ids) for r in expected)

    unseeded = paradec.generate(tiny, CHAT, max_new_tokens=4, num_return_sequences=3, **SAMPLED)
    chunks = list(client.chat.completions.create(model="paradec", messages=CHAT, n=3, max_tokens=4, extra_body=SAMPLED,
                                                 stream=True, stream_options={"include_usage": True}))
    assert all(len(c.choices) == 1 for c in chunks[:-1])  # one choice a chunk
    assert [(c.choices[0].index, c.choices[0].delta.role) for c in chunks[:3]] == [(j, "assistant") for j in range(3)]
    assert len({tuple(r.blocks) for r in unseeded}) == 3
    for j, result in enumerate(unseeded):
        mine = [c for c in chunks if c.choices and c.choices[0].index == j]
        assert "".join(c.choices[0].delta.content or "" for c in mine) == result.text
        assert mine[-1].choices[0].finish_reason == result.finish_reason
        assert mine[-1].model_extra["paradec"]["blocks"] == result.blocks
    assert chunks[-1].usage.prompt_tokens == len(unseeded[0].prompt_ids)
    assert chunks[-1].usage.completion_tokens == sum(len(r.summary_token_ids) for r in unseeded)


def test_a_stream_gets_its_headers_once_accepted_not_once_a_row_is_free(served, client, direct):
    """Every row busy: a streamed request's 200 comes once the engine queued it (the rows' 8
    requests still in flight then), and its text follows once a row is free."""
    from paradec.serve import AsyncClient

    async def occupy_then_stream():
        rows = AsyncClient(served[0], timeout_s=120)
        # ~130 steps each (aborted once the check is made): in flight however slowly a loaded machine steps
        busy = [rows.stream(QUESTION, blocks=2, block_len=64, tokens_per_step=1, eos_closes_block=False)
                for _ in range(8)]
        try:
            for stream in busy:
                await stream.__anext__()  # decoding: every row of the server's 8 is taken
            chunks = await asyncio.to_thread(client.completions.create, model="paradec", prompt=QUESTION,
                                             max_tokens=4, extra_body=SMALL, stream=True)  # back with the headers
            with urllib.request.urlopen(f"{served[1]}/health", timeout=10) as response:
                in_flight = json.loads(response.read())["in_flight"]
        finally:
            for stream in busy:  # aborted: a row frees up
                await stream.aclose()
            rows.close()
        text = "".join(c.choices[0].text for c in await asyncio.to_thread(list, chunks) if c.choices)
        return in_flight, text

    in_flight, text = asyncio.run(occupy_then_stream())
    assert in_flight == 9 and text == direct.text


def test_bad_n_is_refused_by_name(served, client):
    with urllib.request.urlopen(f"{served[1]}/health", timeout=10) as response:
        max_pending = json.loads(response.read())["max_pending"]
    many = max_pending // 2 + 1  # choices for each of two prompts: one request too many
    cases = [({"n": 0}, "n", "n must be an integer >= 1"),
             ({"extra_body": {"n": "2"}}, "n", "n must be an integer >= 1"),
             ({"extra_body": {"n": True}}, "n", "n must be an integer >= 1"),
             ({"n": many, "prompt": [QUESTION, OTHER]}, "n", f"n={many} choices for each of 2 prompts are"),
             ({"n": 2, "seed": 2**63 - 1}, "seed", "seed must be an integer in [0, 2**63 - n]"),
             ({"n": 2, "extra_body": {"seed": "7"}}, "seed", "seed must be an integer")]
    for fields, param, said in cases:
        with pytest.raises(openai.BadRequestError) as caught:
            client.completions.create(model="paradec", **({"prompt": QUESTION} | fields))
        assert caught.value.body["param"] == param and caught.value.body["message"].startswith(said), fields


def test_malformed_token_id_prompts_are_refused_by_name(served, client, tiny, direct):
    vocab, ids = tiny.spec.vocab_size, direct.prompt_ids
    for prompt, said in [([], "prompt must be"), ([[1, 2], []], "prompt[1] is an empty list"),
                         ([1, True], "prompt[1] must be a token id"), ([[1], [2.0]], "prompt[1][0] must be"),
                         ([[[1]]], "prompt[0][0] must be"), ([2 ** 40], "prompt[0] must be"), ([-1], "prompt[0]"),
                         (["a", 1], "prompt[0] must be a token id"),
                         ([ids, [vocab]], f"prompt[1]: invalid: prompt token ids must lie in [0, {vocab})"),
                         ([ids, [tiny.spec.mask_id]], "prompt[1]: invalid: the prompt holds the mask id")]:
        with pytest.raises(openai.BadRequestError) as caught:
            client.completions.create(model="paradec", prompt=prompt, extra_body=SMALL)
        assert caught.value.body["param"] == "prompt" and caught.value.body["message"].startswith(said), prompt
    with urllib.request.urlopen(f"{served[1]}/health", timeout=10) as response:
        max_pending = json.loads(response.read())["max_pending"]
    with pytest.raises(openai.BadRequestError, match=f"over the limit of {max_pending}") as caught:
        client.completions.create(model="paradec", prompt=[QUESTION] * (max_pending + 1), extra_body=SMALL)
    assert caught.value.body["param"] == "prompt"


def test_stream_options_need_a_stream(client, direct):
    for stream in (False, None):
        with pytest.raises(openai.BadRequestError, match="stream_options applies to a stream") as caught:
            client.completions.create(model="paradec", prompt=QUESTION, stream=stream,
                                      stream_options={"include_usage": True}, extra_body=SMALL)
        assert caught.value.body["param"] == "stream_options"
    reply = client.completions.create(model="paradec", prompt=QUESTION, max_tokens=4, stream_options=None,
                                      extra_body=SMALL)
    assert reply.choices[0].text == direct.text


def test_engine_refusals_name_the_field_they_are_about(client):
    """The engine's refusal names a setting by its first words: ``param`` is the body's field of
    that name (``max_tokens`` for the engine's max_new_tokens); a refusal naming none has null."""
    cases = [({"seed": -1}, "seed"), ({"extra_body": {"top_k": 0.5}}, "top_k"),
             ({"extra_body": {"window": 4, "mode": "block"}}, "window"),
             ({"max_tokens": 4, "extra_body": {"mode": "block", "answer_len": 8}}, "max_tokens"),
             ({"max_tokens": 100_000}, None)]  # "the canvas holds ... tokens": no field of its own
    for fields, param in cases:
        with pytest.raises(openai.APIStatusError) as caught:
            client.completions.create(model="paradec", prompt=QUESTION, **fields)
        assert caught.value.status_code in (400, 413) and caught.value.body["param"] == param, (fields, caught.value)


def test_lm_eval_local_completions_generate_until(served, tiny):
    """lm-evaluation-harness's own ``local-completions`` model against the server: its batched
    generate_until (token ids, as it sends by default with a Hugging Face tokenizer: paradec-tiny's)
    answers each prompt as ``generate`` does alone; its loglikelihood is refused by name."""
    pytest.importorskip("tenacity", reason="lm-eval's API models need lm-eval[api]")
    from lm_eval.api.instance import Instance
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    lm = LocalCompletionsAPI(base_url=f"{served[1]}/v1/completions", model="paradec-tiny", batch_size=2,
                             tokenizer_backend="huggingface", tokenizer=tiny.tokenizer.name_or_path, max_retries=1)
    until = {"until": ["####"], "max_gen_toks": 4, **SMALL}  # paradec's settings ride along as generation kwargs
    sent = []  # the bodies lm-eval builds, as they go out
    build = lm._create_payload
    lm._create_payload = lambda *args, **kwargs: sent.append(build(*args, **kwargs)) or sent[-1]
    prompts = [QUESTION, OTHER]
    answers = lm.generate_until([Instance("generate_until", {}, (p, dict(until)), i) for i, p in enumerate(prompts)])
    stop = ["####", tiny.tokenizer.eos_token]  # lm-eval adds the EOS string to the stop strings
    assert answers == [paradec.generate(tiny, p, max_new_tokens=4, stop=stop, seed=1234, **SMALL).text
                       for p in prompts]
    assert len(sent) == 1 and [type(ids) for ids in sent[0]["prompt"]] == [list, list]  # one body, two prompts
    assert {k: sent[0][k] for k in ("max_tokens", "temperature", "seed", "stop")} == {
        "max_tokens": 4, "temperature": 0, "seed": 1234, "stop": stop}
    requests = pytest.importorskip("requests")
    with pytest.raises(requests.HTTPError) as caught:
        lm.loglikelihood([Instance("loglikelihood", {}, (QUESTION, " 28"), 0)])
    error = caught.value.response.json()["error"]
    assert error["param"] == "logprobs" and "log-probabilities are not returned" in error["message"]


def test_connections_past_the_bound_get_503_and_serving_goes_on(served):
    from paradec.serve.server import http_connections

    with urllib.request.urlopen(f"{served[1]}/health", timeout=10) as response:
        bound = http_connections(json.loads(response.read())["max_pending"])
    host, port = served[1].removeprefix("http://").split(":")
    held, statuses = [], []
    try:
        for _ in range(bound + 1):  # each one kept open (keep-alive) after its answer
            held.append(socket.create_connection((host, int(port)), timeout=10))
            held[-1].sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n")
            statuses.append(int(held[-1].recv(4096).split(b" ")[1]))
    finally:
        for connection in held:
            connection.close()
    served_first = statuses.count(200)
    assert statuses == [200] * served_first + [503] * (bound + 1 - served_first)
    assert bound - 2 <= served_first <= bound  # less only by this module's other clients' idle connections

    def answers() -> bool:  # once the server saw those connections close
        try:
            with urllib.request.urlopen(f"{served[1]}/v1/models", timeout=10) as response:
                return response.status == 200
        except urllib.error.HTTPError as e:
            assert e.code == 503
            return False

    deadline = time.monotonic() + 10
    while not answers():
        assert time.monotonic() < deadline, "the server did not serve again once the connections closed"
        time.sleep(0.1)
