"""LLM judges for ch07's responses: a local chat server scores each answer from 0 to 100.

- :func:`judge_prompt`: what the judge reads (the task, the reference answer, the answer to score);
- :func:`make_judge`: a client for Ollama's ``/api/chat`` or any OpenAI-compatible
  ``/v1/chat/completions`` server (llama.cpp, vLLM, LM Studio), standard library only, with
  time limits, retries and errors that say how to start a server;
- :func:`parse_score` (from :mod:`shared.instruction`): the score in the judge's reply, or None;
- :func:`score_responses`: score many responses; a failure leaves one unscored and goes on,
  until the judge has failed three times in a row or the run's deadline has passed.
"""

from __future__ import annotations

import json
import math
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from shared.instruction import format_input, parse_score  # parse_score: a metric, kept in instruction


def judge_prompt(entry: dict, response: str, style: str = "alpaca") -> str:
    """What the judge reads: the task, the reference answer, the answer to score, and the scale."""
    return (
        "You are grading the answer of an assistant to an instruction.\n\n"
        f"Instruction and input:\n{format_input(entry, style)}\n\n"
        f"Reference answer:\n{entry['output']}\n\n"
        f"Assistant's answer:\n{response}\n\n"
        "Score the assistant's answer from 0 to 100, where 100 means as good as the reference answer "
        "and 0 means wrong or unrelated. Reply with one line in exactly this form:\n"
        "Score: <integer from 0 to 100>"
    )


# ---------------------------------------------------------------------------------------
# Judge clients (standard library only)
# ---------------------------------------------------------------------------------------

DEFAULT_JUDGE_URL = "http://localhost:11434"  # Ollama's default address
DEFAULT_JUDGE_MODEL = "llama3"

HOW_TO_START_A_JUDGE = (
    "To score with an LLM judge, start a local server, for example\n"
    "  Ollama:     ollama serve   (then: ollama pull llama3)      -> url http://localhost:11434\n"
    "  llama.cpp:  llama-server -m model.gguf --port 8080         -> url http://localhost:8080/v1\n"
    "  vLLM, LM Studio or any OpenAI-compatible server            -> url http://HOST:PORT/v1"
)


class JudgeError(RuntimeError):
    """The judge server could not be reached or gave no usable answer."""


class Judge:
    """A chat-completion client for a local judge server.

    ``ask(prompt)`` sends one user message and returns the reply text. Each request has a
    deadline of ``timeout`` seconds: 60 s gives a local model on a CPU time to score one answer.
    Refused connections and HTTP 5xx are retried up to ``attempts`` times in all, waiting
    ``backoff``, 2 x ``backoff``, ... between tries. A timeout is not retried: a server that took
    the request and did not answer in time would only make every retry wait as long again. HTTP
    4xx, malformed JSON and a reply without text are not retried either. Every failure raises
    :class:`JudgeError` with a message that says what went wrong and what to do.
    """

    endpoint = ""
    probe_endpoint = ""

    def __init__(
        self,
        url: str = DEFAULT_JUDGE_URL,
        model: str = DEFAULT_JUDGE_MODEL,
        timeout: float = 60.0,
        attempts: int = 3,
        backoff: float = 1.0,
        seed: int = 123,
    ):
        if not (isinstance(timeout, (int, float)) and math.isfinite(timeout) and timeout > 0):
            raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}.")
        if attempts < 1:
            raise ValueError(f"attempts must be >= 1, got {attempts}.")
        if not backoff >= 0:
            raise ValueError(f"backoff must be >= 0 seconds, got {backoff!r}.")
        self.base_url = url.rstrip("/")
        self.model = model
        self.timeout = timeout
        self.attempts = attempts
        self.backoff = backoff
        self.seed = seed

    def __repr__(self) -> str:
        return f"{type(self).__name__}(url={self.base_url!r}, model={self.model!r})"

    def payload(self, prompt: str) -> dict:
        """The request body: one user message, and the server kind's sampling settings."""
        return {"model": self.model, "messages": [{"role": "user", "content": prompt}], **self.settings()}

    # What differs between the two server kinds.
    def settings(self) -> dict:
        raise NotImplementedError

    def reply_text(self, body: str) -> str:
        raise NotImplementedError

    def _too_slow(self, url: str) -> JudgeError:
        return JudgeError(
            f"the judge at {url} did not answer within {self.timeout:g} s; a local model may need longer "
            "(raise --timeout / timeout=), or the server is stuck (restart it)."
        )

    def _read_within(self, response, deadline: float, url: str) -> str:
        """The whole body, or JudgeError if it is still arriving at ``deadline`` (a server that trickles)."""
        chunks = []
        while chunk := response.read1(65536):
            chunks.append(chunk)
            if time.monotonic() > deadline:
                raise self._too_slow(url)
        return b"".join(chunks).decode("utf-8", errors="replace")

    def _request(self, url: str, data: bytes | None) -> str:
        """One HTTP request with retries; returns the response body as text."""
        headers = {"Content-Type": "application/json"} if data is not None else {}
        last_problem = ""
        for attempt in range(self.attempts):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            request = urllib.request.Request(url, data=data, headers=headers)
            deadline = time.monotonic() + self.timeout
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    return self._read_within(response, deadline, url)
            except urllib.error.HTTPError as error:
                detail = error.read().decode("utf-8", errors="replace")[:200]
                last_problem = f"HTTP {error.code} from {url}: {detail or error.reason}"
                if error.code < 500:  # our request is wrong (e.g. unknown model): retrying will not help
                    hint = f" Is the model {self.model!r} available on the server (ollama pull {self.model})?"
                    raise JudgeError(last_problem + (hint if error.code == 404 else "")) from error
            except TimeoutError as error:
                raise self._too_slow(url) from error
            except urllib.error.URLError as error:
                if isinstance(error.reason, (TimeoutError, socket.timeout)):
                    raise self._too_slow(url) from error
                last_problem = f"cannot reach {url}: {error.reason}"
            except (ConnectionError, OSError) as error:
                last_problem = f"connection to {url} failed: {error}"
        raise JudgeError(f"{last_problem} (after {self.attempts} attempts).\n{HOW_TO_START_A_JUDGE}")

    def ask(self, prompt: str) -> str:
        """Send ``prompt`` as one user message; return the judge's reply text."""
        body = self._request(self.base_url + self.endpoint, json.dumps(self.payload(prompt)).encode())
        return self.reply_text(body)

    def check(self, timeout: float = 3.0) -> str | None:
        """None when the server answers (one quick try), else a message saying why not and how to start one."""
        saved = self.attempts, self.timeout
        self.attempts, self.timeout = 1, min(timeout, self.timeout)
        try:
            self._request(self.base_url + self.probe_endpoint, None)
        except JudgeError as error:
            return str(error)
        finally:
            self.attempts, self.timeout = saved
        return None


def _load_json(text: str, what: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise JudgeError(f"the judge server sent malformed JSON for {what}: {text[:200]!r}") from error


class OllamaJudge(Judge):
    """Ollama's ``POST /api/chat`` (temperature 0, fixed seed). Streams of JSON lines are joined."""

    endpoint = "/api/chat"
    probe_endpoint = "/api/tags"

    def settings(self) -> dict:
        return {"stream": False, "options": {"temperature": 0, "seed": self.seed, "num_ctx": 2048}}

    def reply_text(self, body: str) -> str:
        # Non-streaming: one JSON object. Streaming: one object per line, each with a piece.
        lines = [line for line in body.splitlines() if line.strip()]
        if not lines:
            raise JudgeError("the judge server sent an empty reply.")
        pieces = []
        for line in lines:
            message = _load_json(line, "an Ollama chat reply")
            if not isinstance(message, dict):
                raise JudgeError(f"unexpected Ollama reply: {line[:200]!r}")
            if "error" in message:
                raise JudgeError(f"the Ollama server reported an error: {message['error']}")
            content = (message.get("message") or {}).get("content")
            if content is None:
                raise JudgeError(f"Ollama reply without message.content: {line[:200]!r}")
            pieces.append(content)
        return "".join(pieces)


class OpenAIJudge(Judge):
    """An OpenAI-compatible ``POST /v1/chat/completions`` (llama.cpp server, vLLM, LM Studio)."""

    endpoint = "/chat/completions"
    probe_endpoint = "/models"

    def settings(self) -> dict:
        return {"temperature": 0, "seed": self.seed}

    def reply_text(self, body: str) -> str:
        reply = _load_json(body, "a chat completion")
        try:
            content = reply["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError) as error:
            raise JudgeError(f"reply without choices[0].message.content: {body[:200]!r}") from error
        if not isinstance(content, str):
            raise JudgeError(f"reply content is not text: {content!r}")
        return content


def make_judge(url: str = DEFAULT_JUDGE_URL, model: str = DEFAULT_JUDGE_MODEL, **options) -> Judge:
    """The client for ``url``: an OpenAI-compatible one when the path ends in ``/v1``, else Ollama.

    ``http://localhost:11434`` -> Ollama; ``http://localhost:8080/v1`` -> OpenAI-compatible.
    ``options`` go to :class:`Judge` (timeout, attempts, backoff, seed).
    """
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise ValueError(f"judge url must look like http://HOST:PORT or http://HOST:PORT/v1, got {url!r}.")
    if parsed.path.rstrip("/").endswith("/v1"):
        return OpenAIJudge(url, model, **options)
    return OllamaJudge(url, model, **options)


@dataclass
class JudgeReport:
    """Scores of a batch of responses: one entry per response, None where unscored.

    An unscored entry has an error; ``failures`` counts those the judge never answered (request
    failed or not asked), as opposed to replies without a valid score (their reply is kept).
    """

    scores: list[int | None] = field(default_factory=list)
    replies: list[str | None] = field(default_factory=list)
    errors: list[str | None] = field(default_factory=list)

    def add(self, score: int | None, reply: str | None, error: str | None) -> None:
        self.scores.append(score)
        self.replies.append(reply)
        self.errors.append(error)

    @property
    def scored(self) -> list[int]:
        return [s for s in self.scores if s is not None]

    @property
    def unscored(self) -> int:
        return sum(s is None for s in self.scores)

    @property
    def failures(self) -> int:
        return sum(e is not None and r is None for r, e in zip(self.replies, self.errors, strict=True))

    @property
    def average(self) -> float | None:
        return sum(self.scored) / len(self.scored) if self.scored else None

    def histogram(self, bin_width: int = 10) -> dict[str, int]:
        """Counts per score range ("0-9", ..., "90-100"), plus "unscored"."""
        edges = list(range(0, 100, bin_width))
        counts = {f"{lo}-{lo + bin_width - 1 if lo + bin_width < 100 else 100}": 0 for lo in edges}
        labels = list(counts)
        for score in self.scored:
            counts[labels[min(score // bin_width, len(labels) - 1)]] += 1
        counts["unscored"] = self.unscored
        return counts


def _reason_to_stop(failures_in_a_row: int, give_up_after: int, started: float, deadline: float | None):
    """Why the remaining entries are not sent to the judge, or None to go on."""
    if failures_in_a_row >= give_up_after:
        return f"not asked: the judge failed {failures_in_a_row} times in a row"
    if deadline is not None and time.monotonic() - started >= deadline:
        return f"not asked: the scoring deadline of {deadline:g} s had passed"
    return None


def score_responses(
    entries: Sequence[dict],
    judge: Judge | Callable[[str], str],
    response_key: str = "model_response",
    style: str = "alpaca",
    progress: bool = False,
    deadline: float | None = None,
    give_up_after: int = 3,
) -> JudgeReport:
    """Ask the judge to score each entry's response; a failure leaves that one unscored and goes on.

    ``judge`` is a :class:`Judge` or any function prompt -> reply text. An entry whose request
    fails (server down, HTTP 500, timeout, malformed JSON) gets score None and its error; so
    does a reply without a valid score (see :func:`parse_score`), with the reply kept. After
    ``give_up_after`` failed requests in a row, or once ``deadline`` seconds have passed since
    the first request (checked before each one, so the run ends at most one request timeout
    later), the remaining entries are left unscored, each with the reason, and not sent.
    """
    if deadline is not None and not deadline > 0:
        raise ValueError(f"deadline must be a positive number of seconds or None, got {deadline!r}.")
    missing = [i for i, entry in enumerate(entries) if response_key not in entry]
    if missing:
        raise KeyError(f"entries {missing[:5]} have no {response_key!r}; generate the responses first.")
    ask = judge.ask if isinstance(judge, Judge) else judge
    report, started, failures_in_a_row = JudgeReport(), time.monotonic(), 0
    items = entries
    if progress:
        from tqdm import tqdm

        items = tqdm(entries, desc="scoring", unit="response")
    for entry in items:
        stop = _reason_to_stop(failures_in_a_row, give_up_after, started, deadline)
        if stop is not None:
            report.add(None, None, stop)
            continue
        try:
            reply = ask(judge_prompt(entry, entry[response_key], style))
        except JudgeError as error:
            failures_in_a_row += 1
            report.add(None, None, str(error).splitlines()[0])
            continue
        failures_in_a_row = 0
        score = parse_score(reply)
        report.add(score, reply, None if score is not None else "no score between 0 and 100 in the reply")
    return report
