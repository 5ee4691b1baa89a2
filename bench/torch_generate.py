#!/usr/bin/env python3
"""transformers' `generate` peer for `host bench-sample`: samples the given groups of
prompt rows (each group: rows of equal length, so no padding) with the given settings,
after one short warm-up generation, and prints one JSON line: new tokens (each row's up to
and including its first EOS), seconds of generation, versions and threads.

    python bench/torch_generate.py --model DIR --groups GROUPS.json [--temperature T
        --top-k K --top-p P --max-new-tokens N --seed S --dtype auto|float32|bfloat16 --threads N]

Needs torch and transformers (written with transformers 5.24, torch 2.15).
"""
import argparse
import json
import sys
import time

import torch
import transformers
from transformers import AutoModelForCausalLM


def fail(msg):
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(1)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--groups", required=True)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--repetition-penalty", type=float, default=1.0)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    try:
        with open(args.groups) as f:
            groups = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        fail(f"{args.groups}: {e}")
    if not groups or any(not g or len({len(row) for row in g}) != 1 for g in groups):
        fail(f"{args.groups}: expected non-empty groups of rows of equal length")

    torch.manual_seed(args.seed)
    dtype = "auto" if args.dtype == "auto" else getattr(torch, args.dtype)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype)
    model.eval()
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    do_sample = args.temperature > 0
    # top_k is passed even when 0: generate's own default is 50.
    sampling = dict(do_sample=True, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p) if do_sample else dict(do_sample=False)
    # Applied in greedy decoding too, as prefhost does.
    sampling["repetition_penalty"] = args.repetition_penalty

    def generate(rows, max_new_tokens):
        input_ids = torch.tensor(rows)
        with torch.no_grad():
            out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=max_new_tokens, **sampling)
        return out[:, input_ids.shape[1]:].tolist()

    generate(groups[0][:1], 2)  # warm-up: first-call allocations and dispatch
    new_tokens = 0
    started = time.perf_counter()
    for group in groups:
        for row in generate(group, args.max_new_tokens):
            stop = next((i for i, t in enumerate(row) if t in eos), None)
            new_tokens += len(row) if stop is None else stop + 1
    seconds = time.perf_counter() - started
    print(json.dumps({"new_tokens": new_tokens, "seconds": seconds, "torch": torch.__version__,
                      "transformers": transformers.__version__, "threads": torch.get_num_threads(),
                      "dtype": str(next(model.parameters()).dtype)}))


if __name__ == "__main__":
    main()
