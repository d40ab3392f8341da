"""Generate text from a trained model: greedy, temperature, top-k, top-p or beam search.

From the repository root:

    python ch05/generate.py --model runs/quick --prompt "Every effort moves you"
    python ch05/generate.py --model runs/quick --temperature 0.8 --top-k 40 --top-p 0.95 --seed 1
    python ch05/generate.py --model checkpoints/ --beams 4 --interactive

``--model`` is a folder in Hugging Face's GPT-2 format (``config.json`` + ``model.safetensors``,
what ``ch05/pretrain.py --out-dir`` writes and ``shared.weights.download_gpt2`` fetches), a
checkpoint file written by ``shared.checkpoint``, or a folder of ``step_<N>.pt`` checkpoints
(the newest readable one is used). ``--interactive`` keeps the model loaded and reads one
prompt per line until end of input. ``--out-dir`` also writes each prompt and its text to
``generations.jsonl`` there; ``--quick`` makes the default continuation short (10 tokens). The
exit status is non-zero when any prompt failed. Refused at the start (exit status 2): ``--beams``
below 1, a negative or NaN ``--temperature``, ``--top-k`` below 1, ``--top-p`` outside (0, 1].
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

from shared.checkpoint import CheckpointError, newest_checkpoint, read_checkpoint
from shared.generate import beam_search, generate
from shared.model import GPTModel
from shared.tokenizer import get_gpt2_tokenizer
from shared.utils import get_device
from shared.weights import CONFIG_FILE, WEIGHTS_FILE, load_hf_gpt2


def load_model(path: str | Path, device: torch.device | str = "cpu") -> GPTModel:
    """A GPTModel in eval mode from a Hugging Face folder, a checkpoint file or a checkpoint folder."""
    path = Path(path)
    if path.is_dir() and (path / CONFIG_FILE).is_file() and (path / WEIGHTS_FILE).is_file():
        return load_hf_gpt2(path).to(device).eval()
    if path.is_dir():
        newest = newest_checkpoint(path)  # skips unreadable ones with a warning
        if newest is None:
            raise FileNotFoundError(
                f"{path} holds neither {CONFIG_FILE} + {WEIGHTS_FILE} nor step_<N>.pt checkpoints."
            )
        return _from_checkpoint(newest, device)
    if path.is_file():
        return _from_checkpoint(path, device)
    raise FileNotFoundError(f"{path} does not exist.")


def _from_checkpoint(path: Path, device) -> GPTModel:
    checkpoint = read_checkpoint(path)
    if not checkpoint.get("config"):
        raise CheckpointError(f"{path} holds no model config; it was not saved from a GPTModel.")
    with torch.device("meta"):
        model = GPTModel(checkpoint["config"])
    model.load_state_dict(checkpoint["model"], assign=True)
    if model.cfg.get("tie_weights"):
        model.out_head.weight = model.tok_emb.weight  # assign=True replaced both; share them again
    return model.to(device).eval()


@torch.no_grad()
def complete(model: GPTModel, tokenizer, prompt: str, args, device) -> str:
    """The model's continuation of ``prompt`` (the prompt itself not included)."""
    ids = tokenizer.encode(prompt, allowed_special={"<|endoftext|>"})
    if not ids:
        raise ValueError("the prompt is empty; type some text.")
    idx = torch.tensor([ids[-model.context_length :]], device=device)
    eos = None if args.no_stop else tokenizer.eot_token
    if args.beams > 1:
        out = beam_search(model, idx, args.max_new_tokens, args.beams, eos_id=eos)
    else:
        out = generate(
            model, idx, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
            top_p=args.top_p, eos_id=eos,
        )  # fmt: skip
    new = out[0, idx.shape[1] :].tolist()
    if eos is not None and eos in new:
        new = new[: new.index(eos)]
    return tokenizer.decode(new)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model", required=True, help="HF-format folder, checkpoint file or checkpoint folder"
    )
    parser.add_argument("--prompt", default="Every effort moves you")
    parser.add_argument("--max-new-tokens", type=int, help="tokens to generate (default 50; 10 with --quick)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-k", type=int)
    parser.add_argument("--top-p", type=float)
    parser.add_argument("--beams", type=int, default=1, help="beam search with this many beams (> 1)")
    parser.add_argument("--seed", type=int, default=123)
    parser.add_argument("--device", help="cuda, mps or cpu (default: the best available)")
    parser.add_argument("--no-stop", action="store_true", help="do not stop at <|endoftext|>")
    parser.add_argument("--interactive", action="store_true", help="read prompts line by line from stdin")
    parser.add_argument("--out-dir", type=Path, help="also write the prompts and texts to <out-dir>/generations.jsonl")
    parser.add_argument("--quick", action="store_true", help="a short continuation (10 tokens by default)")
    args = parser.parse_args(argv)
    if args.max_new_tokens is None:
        args.max_new_tokens = 10 if args.quick else 50
    if args.beams > 1 and (args.temperature > 0 or args.top_k or args.top_p):
        parser.error(
            "beam search is deterministic: do not combine --beams with --temperature, --top-k or --top-p."
        )
    if args.max_new_tokens < 0:
        parser.error(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}.")
    if args.beams < 1:
        parser.error(f"--beams must be at least 1 (1: no beam search), got {args.beams}.")
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        parser.error(f"--temperature must be a finite number >= 0 (0: greedy), got {args.temperature}.")
    if args.top_k is not None and args.top_k < 1:
        parser.error(f"--top-k must be at least 1 (leave it out for no limit), got {args.top_k}.")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        parser.error(f"--top-p must be in (0, 1] (leave it out for no limit), got {args.top_p}.")
    return args


def main(argv=None) -> list[str]:
    args = parse_args(argv)
    try:
        device = get_device(args.device)
        model = load_model(args.model, device)
    except (FileNotFoundError, CheckpointError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    tokenizer = get_gpt2_tokenizer()
    outputs, failures = [], 0

    def answer(prompt: str) -> None:
        nonlocal failures
        torch.manual_seed(args.seed)  # the same prompt and seed give the same text
        try:
            text = complete(model, tokenizer, prompt, args, device)
        except ValueError as error:
            print(f"error: {error}", file=sys.stderr)
            failures += 1
            return
        outputs.append(text)
        print(prompt + text, flush=True)
        if args.out_dir is not None:
            args.out_dir.mkdir(parents=True, exist_ok=True)
            with open(args.out_dir / "generations.jsonl", "a", encoding="utf-8") as file:
                file.write(json.dumps({"prompt": prompt, "text": text}) + "\n")

    if args.interactive:
        print("Type a prompt and press Enter (end of input, Ctrl-D, quits).", file=sys.stderr, flush=True)
        for line in sys.stdin:
            if line.strip():
                answer(line.rstrip("\n"))
    else:
        answer(args.prompt)
    if failures:
        raise SystemExit(1)
    return outputs


if __name__ == "__main__":
    main()
