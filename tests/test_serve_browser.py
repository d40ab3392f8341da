"""The chat page in a real browser: headless Chromium (Debian's chromium and chromium-driver),
driven by selenium, sends a message to ch07/serve.py and watches the answer stream in.

Skipped, with a message saying what to install, only when no Chromium is installed.
"""

from __future__ import annotations

import time

import openai
import pytest
from local_server import TINY_SERVED, find_chromium, headless_chromium, running_server, tiny_model

from shared.model import GPTModel

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        find_chromium() is None,
        reason="no Chromium found: install Debian's chromium and chromium-driver (apt-get install chromium "
        "chromium-driver) to run the browser test",
    ),
]


class PacedGPT(GPTModel):
    """The tiny model at 30 ms a step, so a person (and the test) can watch the answer grow."""

    def forward(self, *args, **kwargs):
        time.sleep(0.03)
        return super().forward(*args, **kwargs)


def test_the_chat_page_streams_the_answer_the_api_gives_for_the_same_seed(tmp_path):
    model = PacedGPT(TINY_SERVED).eval()
    model.load_state_dict(tiny_model().state_dict())
    with running_server(model, name="tiny-chat") as (url, _):
        browser = headless_chromium(tmp_path / "profile")
        try:
            browser.get(url + "/")
            read = browser.execute_script
            for _ in range(200):  # the page asks /v1/models for the name
                if read("return document.getElementById('model-name').textContent") == "tiny-chat":
                    break
                time.sleep(0.05)
            assert read("return document.getElementById('model-name').textContent") == "tiny-chat"

            read("document.getElementById('temperature').value = '0.8';")
            read("document.getElementById('max-tokens').value = '40';")
            read("document.getElementById('seed').value = '11';")
            browser.find_element("id", "prompt").send_keys("Name three colours.")
            browser.find_element("id", "send").click()

            seen = []  # the answer's text each time we look, while it streams
            state = "missing"
            for _ in range(1000):  # bounded: at most ~20 s
                state, text = read(
                    "const a = document.querySelector('.assistant');"
                    "return a ? [a.dataset.state, a.textContent] : ['missing', ''];"
                )
                if state == "streaming" and text:
                    seen.append(text)
                if state == "done":
                    break
                time.sleep(0.02)
            assert state == "done"
            final = read("return document.querySelector('.assistant').textContent")
            assert read("return document.getElementById('send').disabled") is False
        finally:
            browser.quit()

        assert seen and all(final.startswith(partial) for partial in seen)
        assert any(len(partial) < len(final) for partial in seen)  # it arrived in pieces
        api = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        reply = api.chat.completions.create(
            model="tiny-chat",
            messages=[{"role": "user", "content": "Name three colours."}],
            temperature=0.8,
            max_tokens=40,
            seed=11,
        )
        assert final == reply.choices[0].message.content
