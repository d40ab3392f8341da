"""shared.judge: the score parser, the judge clients against a local fake server, and
ch07/evaluate_responses.py."""

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from scripts import load_script

from shared import instruction
from shared.judge import (
    JudgeError,
    OllamaJudge,
    OpenAIJudge,
    judge_prompt,
    make_judge,
    parse_score,
    score_responses,
)

ENTRY_WITH_INPUT = {
    "instruction": "Convert to passive voice.",
    "input": "The cat ate the fish.",
    "output": "The fish was eaten by the cat.",
}
ENTRY_WITHOUT_INPUT = {"instruction": "Name a primary colour.", "input": "", "output": "Red."}

# ---------------------------------------------------------------------------------------
# Score parser
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reply", "score"),
    [
        ("85", 85),
        ("Score: 72/100", 72),
        ("  100\n", 100),
        ("0", 0),
        ("90.0", 90),
        ("I would rate this 65 out of 100.", 65),
        ("Score: 105", None),
        ("-5", None),
        ("I cannot rate this answer.", None),
        ("", None),
        (None, None),
        ("Llama3 says 40", 40),
        # The cases of issue 25: the score the judge means, or unscored.
        ("On a scale of 0 to 100, I would give this answer 85.", 85),
        ("0.85", None),  # a fraction of 1 or of 100? ambiguous: unscored
        ("72.5", None),  # the prompt asks for an integer
        ("Score: 8/10", 80),
        ("I'd rate it 7 out of 10", 70),
        ("1. Accuracy: the answer is right. Score: 90", 90),
        ("On a scale of 1 to 10, I would give it 8.", 80),
        ("Score: **85**", 85),
        ("Score: 90\nThe reference would get 100.", 90),  # the labelled score wins
        ("Accuracy score: 30. Overall score: 85", None),  # two different labelled scores
        ("The answer lists 3 of the 4 steps; I give it 70", None),  # several bare numbers
        ("Score: 12/10", None),  # more than the scale
        ("Score: 3/7", None),  # a scale we do not know
    ],
)
def test_parse_score(reply, score):
    assert parse_score(reply) == score


def test_the_judge_prompt_asks_for_the_form_the_parser_reads():
    prompt = judge_prompt(ENTRY_WITH_INPUT, "The fish was eaten.")
    assert "Score: <integer from 0 to 100>" in prompt
    assert parse_score("Score: 85") == 85


# ---------------------------------------------------------------------------------------
# Judge clients against a local server
# ---------------------------------------------------------------------------------------


class FakeJudgeHandler(BaseHTTPRequestHandler):
    """Answers like Ollama or an OpenAI-compatible server; ``server.mode`` picks the behaviour."""

    def log_message(self, *args):  # keep the test output clean
        pass

    def _send(self, status, body, content_type="application/json"):
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        self._send(200, json.dumps({"models": [], "data": []}))

    def do_POST(self):
        request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.requests.append((self.path, request))
        mode, reply = self.server.mode, self.server.reply
        if mode == "http500":
            self._send(500, "internal error")
        elif mode == "malformed":
            self._send(200, "{not json")
        elif mode == "hang":
            time.sleep(1.5)  # longer than the client's timeout; bounded so the thread ends
            try:
                self._send(200, "{}")
            except OSError:  # the client has hung up already
                pass
        elif mode == "trickle":  # a valid reply, one byte every 50 ms: about 4 s in all
            data = json.dumps({"message": {"role": "assistant", "content": reply}, "done": True}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            try:
                for byte in data:
                    self.wfile.write(bytes([byte]))
                    self.wfile.flush()
                    time.sleep(0.05)
            except OSError:  # the client has hung up already
                pass
        elif self.path == "/api/chat" and mode == "stream":
            pieces = [reply[: len(reply) // 2], reply[len(reply) // 2 :]]
            lines = [
                json.dumps({"message": {"role": "assistant", "content": p}, "done": False}) for p in pieces
            ]
            lines.append(json.dumps({"message": {"role": "assistant", "content": ""}, "done": True}))
            self._send(200, "\n".join(lines) + "\n", "application/x-ndjson")
        elif self.path == "/api/chat":
            self._send(200, json.dumps({"message": {"role": "assistant", "content": reply}, "done": True}))
        elif self.path == "/v1/chat/completions":
            self._send(200, json.dumps({"choices": [{"message": {"role": "assistant", "content": reply}}]}))
        else:
            self._send(404, "not found")


@pytest.fixture
def judge_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeJudgeHandler)
    server.daemon_threads = True
    server.mode, server.reply, server.requests = "ok", "85", []
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


def url_of(server, suffix=""):
    return f"http://127.0.0.1:{server.server_address[1]}{suffix}"


FAST = {"timeout": 0.5, "attempts": 2, "backoff": 0.0}


def test_make_judge_picks_the_client_from_the_url():
    assert isinstance(make_judge("http://localhost:11434"), OllamaJudge)
    assert isinstance(make_judge("http://localhost:8080/v1"), OpenAIJudge)
    assert isinstance(make_judge("http://localhost:8080/v1/"), OpenAIJudge)
    with pytest.raises(ValueError, match="http://HOST:PORT"):
        make_judge("localhost:11434")


@pytest.mark.parametrize("mode", ["ok", "stream"])
def test_ollama_judge_reads_plain_and_streamed_replies(judge_server, mode):
    judge_server.mode, judge_server.reply = mode, "Score: 85"
    judge = make_judge(url_of(judge_server), model="llama3", **FAST)
    assert judge.check() is None
    assert judge.ask("rate this") == "Score: 85"
    path, request = judge_server.requests[-1]
    assert path == "/api/chat" and request["model"] == "llama3"
    assert request["options"]["temperature"] == 0 and request["options"]["seed"] == 123


def test_openai_judge_reads_chat_completions(judge_server):
    judge_server.reply = "72"
    judge = make_judge(url_of(judge_server, "/v1"), model="any", **FAST)
    assert judge.ask("rate this") == "72"
    path, request = judge_server.requests[-1]
    assert path == "/v1/chat/completions" and request["temperature"] == 0


def test_http_500_is_retried_then_reported(judge_server):
    judge_server.mode = "http500"
    with pytest.raises(JudgeError, match="HTTP 500.*after 2 attempts"):
        make_judge(url_of(judge_server), **FAST).ask("x")
    assert len(judge_server.requests) == 2  # bounded retries


def test_malformed_json_is_reported(judge_server):
    judge_server.mode = "malformed"
    with pytest.raises(JudgeError, match="malformed JSON"):
        make_judge(url_of(judge_server, "/v1"), **FAST).ask("x")


def test_a_hanging_server_times_out(judge_server):
    judge_server.mode = "hang"  # the server answers only after 1.5 s
    judge = make_judge(url_of(judge_server), timeout=0.2, attempts=1, backoff=0.0)
    with pytest.raises(JudgeError, match="did not answer within 0.2 s"):
        judge.ask("x")


def test_a_server_that_accepts_and_never_answers_is_asked_once(judge_server):
    # Asking again would only multiply the wait: a timed-out request is not retried.
    judge_server.mode = "hang"
    judge = make_judge(url_of(judge_server), timeout=0.2, attempts=3, backoff=0.0)
    with pytest.raises(JudgeError, match="did not answer within 0.2 s.*--timeout"):
        judge.ask("x")
    assert len(judge_server.requests) == 1


def test_a_reply_that_trickles_in_past_the_deadline_is_given_up_on(judge_server):
    # Each byte comes well within the socket timeout, but the whole reply takes far longer.
    judge_server.mode = "trickle"
    judge = make_judge(url_of(judge_server), timeout=0.3, attempts=1)
    with pytest.raises(JudgeError, match="did not answer within 0.3 s"):
        judge.ask("x")


@pytest.mark.parametrize("timeout", [0, -1, float("nan"), float("inf")])
def test_a_judge_refuses_a_timeout_that_is_not_a_positive_number(timeout):
    with pytest.raises(ValueError, match="timeout must be a positive number of seconds"):
        make_judge("http://127.0.0.1:11434", timeout=timeout)


def test_scoring_stops_asking_a_judge_that_failed_three_times_in_a_row():
    calls = []

    def ask(prompt):
        calls.append(prompt)
        raise JudgeError("no answer")

    entries = [{**ENTRY_WITHOUT_INPUT, "model_response": "Red"}] * 6
    report = score_responses(entries, ask)
    assert len(calls) == 3 and report.scores == [None] * 6 and report.failures == 6
    assert "not asked" in report.errors[5] and "3 times in a row" in report.errors[5]


def test_scoring_stops_at_the_deadline_of_the_run(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr("shared.judge.time.monotonic", lambda: clock[0])

    def ask(prompt):
        clock[0] += 10.0  # each answer takes ten (fake) seconds
        return "Score: 80"

    entries = [{**ENTRY_WITHOUT_INPUT, "model_response": "Red"}] * 5
    report = score_responses(entries, ask, deadline=25.0)
    assert report.scores == [80, 80, 80, None, None]  # asked at 0, 10, 20 s; 30 s is past 25 s
    assert "deadline of 25 s" in report.errors[3]


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_closed_port_says_how_to_start_a_server():
    judge = make_judge(f"http://127.0.0.1:{closed_port()}", **FAST)
    message = judge.check()
    assert message is not None and "cannot reach" in message and "ollama serve" in message
    with pytest.raises(JudgeError, match="cannot reach"):
        judge.ask("x")


def test_batch_scoring_carries_on_and_counts_the_unscored(judge_server):
    entries = [{**ENTRY_WITH_INPUT, "model_response": f"answer {i}"} for i in range(4)]
    replies = iter(["85", "Score: 105", "no idea", "40"])

    def handler_reply():
        judge_server.reply = next(replies)

    judge = make_judge(url_of(judge_server), **FAST)

    def ask(prompt):
        handler_reply()
        if judge_server.reply == "no idea":
            judge_server.mode = "http500"
        try:
            return judge.ask(prompt)
        finally:
            judge_server.mode = "ok"

    report = score_responses(entries, ask)
    assert report.scores == [85, None, None, 40]
    assert report.unscored == 2 and report.average == pytest.approx(62.5)
    assert report.errors[1] == "no score between 0 and 100 in the reply" and "HTTP 500" in report.errors[2]
    assert report.histogram()["80-89"] == 1 and report.histogram()["unscored"] == 2
    assert "answer 0" in judge_server.requests[0][1]["messages"][0]["content"]


def test_batch_scoring_with_the_server_down_leaves_everything_unscored():
    entries = [{**ENTRY_WITHOUT_INPUT, "model_response": "Red"}] * 2
    report = score_responses(entries, make_judge(f"http://127.0.0.1:{closed_port()}", **FAST))
    assert report.scores == [None, None] and report.average is None
    assert all("cannot reach" in e for e in report.errors)


def test_evaluate_script_scores_offline_and_with_a_judge(judge_server, tmp_path, capsys):
    evaluate = load_script("ch07", "evaluate_responses")
    entries = [
        {**ENTRY_WITH_INPUT, "model_response": "The fish was eaten by the cat."},
        {**ENTRY_WITHOUT_INPUT, "model_response": "Blue."},
    ]
    path = tmp_path / "responses.json"
    path.write_text(json.dumps(entries))
    judge_server.reply = "90"
    assert evaluate.main([str(path), "--judge-url", url_of(judge_server)]) == 0
    report = json.loads((tmp_path / "responses-report.json").read_text())
    assert report["rouge_l"] == pytest.approx(0.5) and report["exact_match"] == pytest.approx(0.5)
    assert report["judge"]["average"] == 90 and report["judge"]["unscored"] == 0
    assert "90-100 | ####" in capsys.readouterr().out

    # No server: offline metrics still written, exit code 2, and how to start a judge.
    out_dir = tmp_path / "elsewhere"
    down = f"http://127.0.0.1:{closed_port()}"
    assert evaluate.main([str(path), "--judge-url", down, "--out-dir", str(out_dir)]) == 2
    assert json.loads((out_dir / "responses-report.json").read_text())["rouge_l"] == pytest.approx(0.5)
    assert "ollama serve" in capsys.readouterr().out


def test_evaluate_script_explains_a_missing_response_key(tmp_path):
    evaluate = load_script("ch07", "evaluate_responses")
    path = tmp_path / "responses.json"
    path.write_text(json.dumps([ENTRY_WITH_INPUT]))
    with pytest.raises(SystemExit, match="model_response"):
        evaluate.main([str(path)])


def test_evaluate_script_with_a_judge_that_never_scores_ends_with_the_entries_unscored(
    judge_server, tmp_path, capsys
):
    evaluate = load_script("ch07", "evaluate_responses")
    path = tmp_path / "responses.json"
    path.write_text(json.dumps([{**ENTRY_WITHOUT_INPUT, "model_response": "Red."}] * 5))
    judge_server.mode = "hang"  # answers the health probe (GET), never a scoring request in time
    assert evaluate.main([str(path), "--judge-url", url_of(judge_server), "--timeout", "0.2"]) == 2
    report = json.loads((tmp_path / "responses-report.json").read_text())
    assert report["judge"]["unscored"] == 5 and report["judge"]["failures"] == 5
    assert len(judge_server.requests) == 3  # then it stopped asking
    assert "did not answer" in capsys.readouterr().out


@pytest.mark.parametrize("timeout", ["0", "-1", "nan", "soon"])
def test_evaluate_script_refuses_a_timeout_that_is_not_positive(tmp_path, timeout, capsys):
    evaluate = load_script("ch07", "evaluate_responses")
    with pytest.raises(SystemExit) as caught:
        evaluate.main([str(tmp_path / "r.json"), "--timeout", timeout])
    assert caught.value.code == 2 and "positive number of seconds" in capsys.readouterr().err


def test_evaluate_script_explains_an_empty_list(tmp_path):
    evaluate = load_script("ch07", "evaluate_responses")
    path = tmp_path / "responses.json"
    path.write_text("[]")
    with pytest.raises(SystemExit, match="holds no entries"):
        evaluate.main([str(path)])


def test_parse_score_keeps_its_public_home_in_shared_instruction():
    # Checks outside the repository import it from shared.instruction (issue 19's public names).
    assert instruction.parse_score is parse_score
    assert instruction.parse_score("Score: 72") == 72
