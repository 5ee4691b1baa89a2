"""A random-init model of SmolLM2-135M's shape (llama, hidden 576, 30 layers, 9 heads with
3 KV heads, vocab 49152, tied embeddings), saved by transformers in bf16: a checkpoint
big enough that weights dominate a run's memory, for measuring what holding frozen
weights in their stored dtype saves. The tokenizer is copied from a model folder
(models/tiny-math by default; its ids are all below the vocabulary size).

    python bench/make_smollm_shaped.py OUT_DIR [--tokenizer-from models/tiny-math] [--dtype bfloat16]

Needs torch and transformers (written with transformers 5.24, torch 2.x).
"""
import argparse
import shutil
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

parser = argparse.ArgumentParser()
parser.add_argument("out")
parser.add_argument("--tokenizer-from", default="models/tiny-math")
parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
parser.add_argument("--seed", type=int, default=0)
args = parser.parse_args()

torch.manual_seed(args.seed)
config = LlamaConfig(
    vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
    num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
    rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True,
    bos_token_id=0, eos_token_id=1, pad_token_id=2, hidden_act="silu",
)
model = LlamaForCausalLM(config).to(getattr(torch, args.dtype))
out = Path(args.out)
model.save_pretrained(out, safe_serialization=True)
source = Path(args.tokenizer_from)
for name in ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]:
    if (source / name).is_file():
        shutil.copy(source / name, out / name)
print(f"{out}: {sum(p.numel() for p in model.parameters()):,} parameters in {args.dtype}")
