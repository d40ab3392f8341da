"""A tiny GPT-2-vocabulary model behind ch07/serve.py's app, running in this process on 127.0.0.1.

Shared by test_serve.py and test_serve_browser.py (pytest puts this folder on the import path).
"""

from __future__ import annotations

import contextlib
import importlib.util
import shutil
import socket
import sys
import threading
import time
from pathlib import Path

import torch
import uvicorn

from shared.generate import generate
from shared.model import GPTModel
from shared.serving import BatchingEngine
from shared.tokenizer import get_gpt2_tokenizer

SERVE_SCRIPT = Path(__file__).resolve().parents[1] / "ch07" / "serve.py"

# GPT-2's vocabulary (the server speaks GPT-2 tokens) and little else: fast on any CPU.
TINY_SERVED = {
    "vocab_size": 50257,
    "context_length": 128,
    "emb_dim": 32,
    "n_heads": 4,
    "n_layers": 2,
    "drop_rate": 0.0,
    "qkv_bias": True,
}


def load_serve_script():
    spec = importlib.util.spec_from_file_location("serve", SERVE_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["serve"] = module  # pydantic resolves the request models' annotations through it
    spec.loader.exec_module(module)
    return module


def tiny_model(seed: int = 0) -> GPTModel:
    torch.manual_seed(seed)
    return GPTModel(TINY_SERVED).eval()


def greedy_alone(model, tokenizer, prompt: str, max_tokens: int) -> str:
    """What shared.generate.generate answers to ``prompt`` by itself, greedy, end-of-text dropped."""
    ids = torch.tensor([tokenizer.encode(prompt)])
    new = generate(model, ids, max_tokens, eos_id=tokenizer.eot_token)[0, ids.shape[1] :].tolist()
    if tokenizer.eot_token in new:
        new = new[: new.index(tokenizer.eot_token)]
    return tokenizer.decode(new)


@contextlib.contextmanager
def running_server(model, *, api_key=None, max_batch=8, max_in_flight=32, max_tokens=64, name="tiny"):
    """Yield (base URL, Server) for the model served on a free 127.0.0.1 port; shut it all down after."""
    serve = load_serve_script()
    tokenizer = get_gpt2_tokenizer()
    engine = BatchingEngine(model, tokenizer, eos_id=tokenizer.eot_token, max_batch=max_batch).start()
    server = serve.Server(engine, name, api_key, max_tokens, max_in_flight)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    web = uvicorn.Server(uvicorn.Config(serve.create_app(server), log_level="warning"))
    thread = threading.Thread(target=web.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        for _ in range(200):  # up to 10 s for the server to start
            if web.started:
                break
            time.sleep(0.05)
        else:
            raise RuntimeError("the test server did not start within 10 s")
        yield f"http://127.0.0.1:{port}", server
    finally:
        web.should_exit = True
        thread.join(timeout=10)
        engine.stop()
        sock.close()


CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1000,800",
)


def find_chromium() -> tuple[str, str] | None:
    """(browser, driver) paths of an installed Chromium and chromedriver, or None."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


def headless_chromium(user_data_dir: Path):
    """A selenium driver for headless Chromium with a fresh profile in ``user_data_dir``."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    browser, driver = find_chromium()
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={user_data_dir}")
    return webdriver.Chrome(service=Service(executable_path=driver), options=options)
