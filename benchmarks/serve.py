"""Benchmark: ch07/serve.py under 1, 4 and 8 concurrent clients, batched vs one request at a time.

The same server code and model twice: ``--max-batch 8`` (requests that arrive while the model
is busy join the running batch, shared.serving) and ``--max-batch 1`` (each request waits for
the one before it). Every client streams one chat completion (an instruction of ch07's test
set, in the Alpaca prompt), greedy, ``NEW_TOKENS`` new tokens; all clients start together.

Reported per model, mode and number of clients: total completion tokens per second (all
clients' tokens over the wall time from the first request to the last answer) and the median
time to first token (request sent -> first streamed text). The ratio batched / one at a time
of the total tokens/s is what batching buys. Models have random weights (speed does not
depend on the values): a tiny one and one shaped like GPT-2 small. The server runs in this
process on 127.0.0.1 (uvicorn on a thread); the clients are threads talking HTTP to it.

Run from the repository root: ``python benchmarks/serve.py`` (writes benchmarks/results/serve.json;
``--screenshot benchmarks/results/serve_chat.png`` also photographs the chat page in headless
Chromium). ``LLMS_QUICK=1`` shrinks everything to a smoke test.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import statistics
import tempfile
import threading
import time
from pathlib import Path

import httpx
import torch
from common import RESULTS_DIR, describe, environment, write_report

from shared.data import load_instruction_data
from shared.model import GPT_CONFIGS, GPTModel
from shared.utils import by_mode

ROOT = Path(__file__).resolve().parents[1]
NEW_TOKENS = by_mode(full=32, quick=4)
CLIENTS = by_mode(full=(1, 4, 8), quick=(1, 2))
MODELS = by_mode(
    full={
        "tiny": {**GPT_CONFIGS["gpt2-small"], "emb_dim": 64, "n_layers": 2, "n_heads": 4},
        "gpt2-small-shaped": GPT_CONFIGS["gpt2-small"],
    },
    quick={"tiny": {**GPT_CONFIGS["gpt2-small"], "emb_dim": 32, "n_layers": 1, "n_heads": 2}},
)


def load_local_server():
    # The tests' in-process server and headless Chromium (tests/ is a folder, not a package).
    spec = importlib.util.spec_from_file_location("local_server", ROOT / "tests" / "local_server.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def one_client(url: str, instruction: str, result: dict) -> None:
    """Stream one chat completion; note when the first text came and how many tokens in all."""
    body = {
        "messages": [{"role": "user", "content": instruction}],
        "max_tokens": NEW_TOKENS,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    sent = time.perf_counter()
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=600) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[len("data: ") :])
            if (
                "first_token_s" not in result
                and chunk["choices"]
                and chunk["choices"][0]["delta"].get("content")
            ):
                result["first_token_s"] = time.perf_counter() - sent
            if chunk.get("usage"):
                result["tokens"] = chunk["usage"]["completion_tokens"]


def run_clients(url: str, instructions: list[str], clients: int) -> dict:
    """``clients`` requests at once; total tokens/s and the median time to first token."""
    results = [{} for _ in range(clients)]
    threads = [
        threading.Thread(target=one_client, args=(url, instructions[i % len(instructions)], results[i]))
        for i in range(clients)
    ]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    tokens = sum(r["tokens"] for r in results)
    return {
        "clients": clients,
        "wall_s": wall,
        "tokens": tokens,
        "tokens_per_s": tokens / wall,
        "median_first_token_s": statistics.median(r["first_token_s"] for r in results),
    }


def measure(local_server, model, instructions: list[str]) -> dict:
    """Every number of clients, batched and one at a time, on the same model.

    Both servers run side by side (one model, two engines, never busy at the same time) and
    the two modes take turns for each number of clients, so drift in the machine's load hits
    both alike.
    """
    rows = {"batched": [], "one_at_a_time": []}
    with contextlib.ExitStack() as stack:
        urls = {
            mode: stack.enter_context(
                local_server.running_server(model, max_batch=size, max_tokens=NEW_TOKENS)
            )[0]
            for mode, size in (("batched", 8), ("one_at_a_time", 1))
        }
        for url in urls.values():
            run_clients(url, instructions, 1)  # warm-up
        for clients in CLIENTS:
            for mode, url in urls.items():
                rows[mode].append(run_clients(url, instructions, clients))
    return rows


def screenshot(local_server, model, path: Path, name: str) -> None:
    """The chat page after one question, in light and dark mode, in headless Chromium (a fresh profile)."""
    with (
        local_server.running_server(model, name=name, max_tokens=256) as (url, _),
        tempfile.TemporaryDirectory() as profile,
    ):
        browser = local_server.headless_chromium(Path(profile))
        try:
            browser.get(url + "/")
            browser.execute_script("document.getElementById('max-tokens').value = '40';")
            browser.execute_script("document.getElementById('seed').value = '1';")
            browser.find_element("id", "prompt").send_keys("Rewrite the sentence using a simile.")
            browser.find_element("id", "send").click()
            for _ in range(600):  # bounded: at most ~60 s
                state = browser.execute_script("return document.querySelector('.assistant')?.dataset.state")
                if state == "done":
                    break
                time.sleep(0.1)
            browser.save_screenshot(str(path))
            dark = path.with_name(f"{path.stem}_dark{path.suffix}")
            scheme = {"features": [{"name": "prefers-color-scheme", "value": "dark"}]}
            browser.execute_cdp_cmd("Emulation.setEmulatedMedia", scheme)
            browser.save_screenshot(str(dark))
        finally:
            browser.quit()
    print(f"wrote {path} and {dark}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "serve.json")
    parser.add_argument("--screenshot", type=Path, help="also save a PNG of the chat page here")
    parser.add_argument("--device", default="cpu", help="where the model runs (default cpu, the target)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    record = environment(args.device)
    print(describe(record))
    local_server = load_local_server()
    instructions = [entry["instruction"] for entry in load_instruction_data()[-8:]]
    results = {"new_tokens": NEW_TOKENS, "models": {}}
    print(
        "| model | clients | batched tokens/s | one at a time tokens/s | ratio | first token, batched | one at a time |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, cfg in MODELS.items():
        torch.manual_seed(123)
        model = GPTModel({**cfg, "qkv_bias": True, "drop_rate": 0.0}).to(args.device).eval()
        rows = measure(local_server, model, instructions)
        results["models"][name] = rows
        for batched, alone in zip(rows["batched"], rows["one_at_a_time"], strict=True):
            ratio = batched["tokens_per_s"] / alone["tokens_per_s"]
            batched["ratio_vs_one_at_a_time"] = ratio
            print(
                f"| {name} | {batched['clients']} | {batched['tokens_per_s']:.1f} | {alone['tokens_per_s']:.1f} "
                f"| {ratio:.2f}x | {batched['median_first_token_s']:.2f} s | {alone['median_first_token_s']:.2f} s |"
            )
        if args.screenshot and name == list(MODELS)[-1]:
            screenshot(local_server, model, args.screenshot, f"{name} (random weights)")
    write_report(args.out, "serve", record, results)


if __name__ == "__main__":
    main()
