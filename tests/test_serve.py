"""ch07/serve.py and shared.serving: the batching engine, the OpenAI-compatible API, limits and bad input.

The server runs in this process on 127.0.0.1 with a tiny random model (tests/local_server.py);
answers are checked against shared.generate.generate on the same prompt, and through the
official ``openai`` client (test-only).
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch
from local_server import TINY_SERVED, greedy_alone, load_serve_script, running_server, tiny_model

from shared.instruction import format_prompt
from shared.judge import make_judge
from shared.model import GPTModel
from shared.serving import BatchingEngine, SamplingSettings, TextAssembler
from shared.tokenizer import get_gpt2_tokenizer

PROMPTS = [
    "Hello there",
    "The quick brown fox jumps over",
    "A",
    "Once upon a time in a land far away there lived",
    "x y z",
    "What is the capital of",
    "1 2 3 4 5 6",
    "Tell me a story about",
]


@pytest.fixture(scope="module")
def tokenizer():
    return get_gpt2_tokenizer()


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def served(model):
    with running_server(model) as (url, server):
        yield url, server


def client(url, **options):
    return openai.OpenAI(
        base_url=url + "/v1", api_key=options.pop("api_key", "unused"), max_retries=0, **options
    )


# ---------------------------------------------------------------------------------------
# The engine, without HTTP
# ---------------------------------------------------------------------------------------


def wait_for(condition, seconds=60.0):
    """Poll ``condition`` until it holds (bounded); fail the test otherwise."""
    for _ in range(int(seconds / 0.02)):
        if condition():
            return
        time.sleep(0.02)
    raise AssertionError(f"condition not met within {seconds} s")


def test_engine_rows_joining_and_leaving_the_batch_get_what_they_would_get_alone(model, tokenizer):
    engine = BatchingEngine(model, tokenizer, eos_id=tokenizer.eot_token, max_batch=4).start()
    try:
        events = {i: [] for i in range(len(PROMPTS))}
        for i, prompt in enumerate(PROMPTS):  # staggered, different lengths: rows join mid-generation
            engine.submit(tokenizer.encode(prompt), SamplingSettings(max_tokens=5 + 3 * i), events[i].append)
            time.sleep(0.005 * i)
        wait_for(lambda: all(e and e[-1].finish_reason for e in events.values()))
    finally:
        engine.stop()
    for i, prompt in enumerate(PROMPTS):
        text = "".join(event.text for event in events[i])
        assert text == greedy_alone(model, tokenizer, prompt, 5 + 3 * i), prompt
        assert events[i][-1].finish_reason == "length"
        assert events[i][-1].completion_tokens == 5 + 3 * i


def test_engine_sampling_with_a_seed_does_not_depend_on_the_neighbours(model, tokenizer):
    engine = BatchingEngine(model, tokenizer, eos_id=tokenizer.eot_token, max_batch=8).start()
    settings = SamplingSettings(max_tokens=12, temperature=1.0, top_p=0.9, seed=42)
    try:
        alone: list = []
        engine.submit(tokenizer.encode("Hello"), settings, alone.append)
        wait_for(lambda: alone and alone[-1].finish_reason)
        crowd = {i: [] for i in range(4)}
        for i in range(4):
            prompt = "Hello" if i == 2 else PROMPTS[i]
            engine.submit(
                tokenizer.encode(prompt), settings if i == 2 else SamplingSettings(12, 1.0), crowd[i].append
            )
        wait_for(lambda: all(e and e[-1].finish_reason for e in crowd.values()))
    finally:
        engine.stop()
    assert "".join(e.text for e in crowd[2]) == "".join(e.text for e in alone)


def test_engine_refuses_prompts_that_leave_no_room_for_an_answer(model, tokenizer):
    engine = BatchingEngine(model, tokenizer, eos_id=tokenizer.eot_token)
    with pytest.raises(ValueError, match="context holds 128"):
        engine.submit([1] * 128, SamplingSettings(max_tokens=1), print)
    with pytest.raises(ValueError, match="no tokens"):
        engine.submit([], SamplingSettings(max_tokens=1), print)


def test_sampling_settings_refuse_bad_values():
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingSettings(max_tokens=0)
    with pytest.raises(ValueError, match="temperature"):
        SamplingSettings(max_tokens=1, temperature=-1)
    with pytest.raises(ValueError, match="top_p"):
        SamplingSettings(max_tokens=1, temperature=1, top_p=0)


class CharTokenizer:
    """One token per character (ids are code points), so a test controls exactly what each step adds."""

    def decode(self, ids):
        return "".join(chr(i) for i in ids)


def test_text_assembler_holds_back_what_may_become_a_stop_string():
    text = TextAssembler(CharTokenizer(), stop=("END",))
    pieces = [text.push(ord(c)) for c in "abEN"]
    assert [p for p, _ in pieces] == ["a", "b", "", ""]  # "EN" may be the start of "END"
    assert text.push(ord("X")) == ("ENX", False)  # it was not
    assert text.push(ord("E")) == ("", False)
    assert text.push(ord("N")) == ("", False)
    assert text.push(ord("D")) == ("", True)  # the stop string itself is never sent


def test_text_assembler_holds_back_half_a_character(tokenizer):
    ids = tokenizer.encode("café ☕ ok")
    text = TextAssembler(tokenizer)
    pieces = [text.push(i)[0] for i in ids] + [text.flush()]
    assert "\ufffd" not in "".join(pieces)
    assert "".join(pieces) == "café ☕ ok"


# ---------------------------------------------------------------------------------------
# The API through the official openai client
# ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_greedy_completion_equals_generate_on_the_same_prompt(served, model, tokenizer):
    url, _ = served
    reply = client(url).completions.create(
        model="tiny", prompt="Every effort moves", max_tokens=20, temperature=0
    )
    assert reply.choices[0].text == greedy_alone(model, tokenizer, "Every effort moves", 20)
    assert reply.usage.prompt_tokens == len(tokenizer.encode("Every effort moves"))
    assert reply.usage.completion_tokens == 20
    assert reply.choices[0].finish_reason == "length"


@pytest.mark.slow
def test_greedy_chat_answers_the_alpaca_prompt_of_the_last_user_message(served, model, tokenizer):
    url, _ = served
    messages = [{"role": "user", "content": "Name a colour."}]
    reply = client(url).chat.completions.create(model="tiny", messages=messages, max_tokens=15, temperature=0)
    prompt = format_prompt({"instruction": "Name a colour.", "input": ""})
    assert reply.choices[0].message.content == greedy_alone(model, tokenizer, prompt, 15)
    assert reply.choices[0].message.role == "assistant"
    assert reply.usage.prompt_tokens == len(tokenizer.encode(prompt))


@pytest.mark.slow
@pytest.mark.parametrize("chat", [False, True], ids=["completions", "chat"])
def test_streamed_text_equals_the_non_streamed_text_for_the_same_seed(served, chat):
    url, _ = served
    api = client(url)
    settings = {"model": "tiny", "max_tokens": 25, "temperature": 1.0, "top_p": 0.95, "seed": 7}
    if chat:
        messages = [{"role": "user", "content": "Write a haiku."}]
        whole = api.chat.completions.create(messages=messages, **settings).choices[0].message.content
        stream = api.chat.completions.create(messages=messages, stream=True, **settings)
        pieces = [chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices]
    else:
        whole = api.completions.create(prompt="It was a dark", **settings).choices[0].text
        stream = api.completions.create(prompt="It was a dark", stream=True, **settings)
        pieces = [chunk.choices[0].text for chunk in stream if chunk.choices]
    assert len([p for p in pieces if p]) > 1  # it really came in pieces
    assert "".join(pieces) == whole
    other_seed = api.completions.create(prompt="It was a dark", **{**settings, "seed": 8}).choices[0].text
    assert other_seed != whole or chat  # the seed matters (checked once)


@pytest.mark.slow
def test_stream_ends_with_usage_when_asked_and_done(served):
    url, _ = served
    body = {
        "prompt": "Hi",
        "max_tokens": 3,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=30) as response:
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    assert json.loads(lines[-2][len("data: ") :])["usage"]["completion_tokens"] == 3


@pytest.mark.slow
def test_eight_concurrent_streams_each_get_exactly_their_tokens_alone(served, model, tokenizer):
    url, _ = served
    api = client(url)
    results: dict[int, list[str]] = {}

    def ask(i):
        stream = api.completions.create(
            model="tiny", prompt=PROMPTS[i], max_tokens=12 + i, temperature=0, stream=True
        )
        results[i] = [chunk.choices[0].text for chunk in stream if chunk.choices]

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert sorted(results) == list(range(8))
    for i, prompt in enumerate(PROMPTS):
        assert "".join(results[i]) == greedy_alone(model, tokenizer, prompt, 12 + i), prompt


@pytest.mark.slow
def test_a_stop_string_ends_the_answer_before_it(served, model, tokenizer):
    url, _ = served
    full = greedy_alone(model, tokenizer, "Once upon", 20)
    stop = full[5:9]
    reply = client(url).completions.create(
        model="tiny", prompt="Once upon", max_tokens=20, temperature=0, stop=stop
    )
    assert reply.choices[0].text == full[: full.index(stop)]
    assert reply.choices[0].finish_reason == "stop"


@pytest.mark.slow
def test_the_ch07_judge_client_talks_to_the_server(served):
    url, _ = served
    judge = make_judge(url + "/v1", timeout=30, attempts=1)
    assert judge.check() is None
    assert isinstance(judge.ask("Score this answer."), str)


# ---------------------------------------------------------------------------------------
# Limits and bad input: an OpenAI-style error object, never a traceback
# ---------------------------------------------------------------------------------------


def assert_error(response, status, *words):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert "Traceback" not in response.text
    for word in words:
        assert word in error["message"]
    return error


@pytest.mark.slow
def test_bad_requests_get_their_status_and_an_error_object(served):
    url, _ = served
    post = lambda path, **kw: httpx.post(url + path, timeout=30, **kw)  # noqa: E731
    assert_error(
        post("/v1/completions", content=b'{"prompt": "x",', headers={"content-type": "application/json"}),
        400,
        "not valid JSON",
    )
    assert_error(post("/v1/completions", content=b"x" * 1_000_001), 413, "larger than")
    assert_error(post("/v1/completions", json={"prompt": "word " * 200}), 400, "context holds 128")
    assert_error(post("/v1/completions", json={"prompt": "x", "max_tokens": 65}), 400, "at most 64")
    assert_error(post("/v1/completions", json={"prompt": "x", "temperature": "hot"}), 422, "temperature")
    assert_error(post("/v1/completions", json={"prompt": 5}), 422, "prompt")
    assert_error(post("/v1/completions", json={"max_tokens": 5}), 422, "prompt")
    assert_error(
        post("/v1/chat/completions", json={"messages": [{"role": "wizard", "content": "x"}]}), 422, "role"
    )
    assert_error(
        post("/v1/chat/completions", json={"messages": [{"role": "system", "content": "x"}]}), 400, "user"
    )
    assert_error(post("/v1/completions", json={"prompt": "x", "n": 2}), 400, "n=1")
    assert_error(httpx.get(url + "/v1/nothing"), 404)


@pytest.mark.slow
def test_the_openai_client_sees_bad_requests_as_its_own_errors(served):
    url, _ = served
    with pytest.raises(openai.BadRequestError, match="at most 64"):
        client(url).completions.create(model="tiny", prompt="x", max_tokens=1000)


@pytest.mark.slow
def test_an_api_key_is_checked_on_every_route_but_the_chat_page(model):
    with running_server(model, api_key="sesame") as (url, _):
        assert httpx.get(url + "/").status_code == 200
        assert_error(httpx.get(url + "/v1/models"), 401, "API key")
        assert_error(httpx.get(url + "/v1/models", headers={"Authorization": "Bearer wrong"}), 401)
        assert_error(httpx.post(url + "/v1/completions", json={"prompt": "x"}), 401)
        with pytest.raises(openai.AuthenticationError):
            client(url, api_key="wrong").models.list()
        assert client(url, api_key="sesame").models.list().data[0].id == "tiny"


class SlowGPT(GPTModel):
    """The tiny model, 20 ms slower per step: a generation that is surely still running when the test acts."""

    calls = 0

    def forward(self, *args, **kwargs):
        self.calls += 1
        time.sleep(0.02)
        return super().forward(*args, **kwargs)


@pytest.mark.slow
def test_past_the_in_flight_cap_a_request_gets_429_with_retry_after_and_a_disconnect_frees_the_slot(model):
    slow = SlowGPT(TINY_SERVED).eval()
    slow.load_state_dict(model.state_dict())
    with running_server(slow, max_in_flight=1, max_tokens=120) as (url, server):
        body = {"prompt": "Hi", "max_tokens": 120, "temperature": 0, "stream": True}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=30) as response:
            lines = response.iter_lines()  # held: closing this iterator would close the connection
            assert next(lines).startswith("data: ")
            busy = httpx.post(url + "/v1/completions", json={"prompt": "x", "max_tokens": 1}, timeout=30)
            assert_error(busy, 429, "busy")
            assert busy.headers["retry-after"] == "1"
        # The client left mid-stream: its slot frees and its row leaves the batch.
        wait_for(lambda: server.in_flight == 0 and server.engine.pending() == 0, seconds=30)
        assert slow.calls < 120  # it stopped early: all 120 tokens take a prefill and 119 steps
        after = httpx.post(url + "/v1/completions", json={"prompt": "x", "max_tokens": 1}, timeout=30)
        assert after.status_code == 200


class FailingOnceGPT(GPTModel):
    """The tiny model, but its next forward pass raises, as a real one might (out of memory, a bug)."""

    fail_next = False

    def forward(self, *args, **kwargs):
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("simulated failure")
        return super().forward(*args, **kwargs)


@pytest.mark.slow
def test_a_failing_generation_gives_an_error_object_and_the_server_goes_on(model):
    failing = FailingOnceGPT(TINY_SERVED).eval()
    failing.load_state_dict(model.state_dict())
    with running_server(failing) as (url, _):
        failing.fail_next = True
        error = assert_error(httpx.post(url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 3}), 500)
        assert "simulated failure" in error["message"] and error["type"] == "server_error"
        failing.fail_next = True
        body = {"prompt": "Hi", "max_tokens": 3, "stream": True}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=30) as response:
            lines = [line for line in response.iter_lines() if line]
        assert "simulated failure" in json.loads(lines[0][len("data: ") :])["error"]["message"]
        assert lines[-1] == "data: [DONE]"
        assert httpx.post(url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 3}).status_code == 200


def test_a_non_loopback_host_needs_an_api_key():
    serve = load_serve_script()
    with pytest.raises(SystemExit):
        serve.parse_args(["--model", "m", "--host", "0.0.0.0"])
    assert serve.parse_args(["--model", "m", "--host", "0.0.0.0", "--api-key", "k"]).api_key == "k"
    assert serve.parse_args(["--model", "m"]).host == "127.0.0.1"


def test_chat_prompt_puts_earlier_turns_into_the_input():
    serve = load_serve_script()
    messages = [
        serve.Message(role="system", content="Be brief."),
        serve.Message(role="user", content="Hi"),
        serve.Message(role="assistant", content="Hello!"),
        serve.Message(role="user", content="Name a colour."),
    ]
    prompt = serve.chat_prompt(messages)
    expected = {"instruction": "Name a colour.", "input": "System: Be brief.\nUser: Hi\nAssistant: Hello!"}
    assert prompt == format_prompt(expected)


def test_load_model_reads_a_finetune_out_dir_and_names_missing_folders(tmp_path):
    from shared.weights import save_hf_gpt2

    serve = load_serve_script()
    model = tiny_model()
    save_hf_gpt2(model, tmp_path / "model")  # what ch07/finetune_instructions.py writes under --out-dir
    loaded = serve.load_model(str(tmp_path), "cpu")
    assert torch.equal(loaded.tok_emb.weight, model.tok_emb.weight)
    with pytest.raises(SystemExit, match="no such folder"):
        serve.load_model(str(tmp_path / "missing"), "cpu")


@pytest.mark.slow
def test_the_serving_benchmark_runs_in_quick_mode_and_writes_its_table(tmp_path):
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "serve.json"
    env = {**os.environ, "LLMS_QUICK": "1", "PYTHONPATH": str(root)}
    result = subprocess.run(
        [sys.executable, str(root / "benchmarks" / "serve.py"), "--out", str(out)],
        cwd=root, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    for mode in ("batched", "one_at_a_time"):
        rows = report["models"]["tiny"][mode]
        assert [row["clients"] for row in rows] == [1, 2]
        assert all(row["tokens"] == row["clients"] * report["new_tokens"] for row in rows)
        assert all(row["tokens_per_s"] > 0 and row["median_first_token_s"] > 0 for row in rows)
    assert "| tiny | 2 |" in result.stdout
