#!/usr/bin/env python3
"""PyTorch reference for one prefhost DPO training step (CPU or CUDA; f32, or bf16 autocast;
eager, or with --compile torch.compile).

Standard library + torch only, so the comparison does not depend on
transformers/safetensors versions. Prints one JSON line to stdout.
"""
import argparse, copy, json, math, os, resource, statistics, struct, sys, time

import torch
import torch.nn as nn
import torch.nn.functional as F


def fail(msg):
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(1)


def read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except OSError as e:
        fail(f"{path}: {e.strerror}")
    except json.JSONDecodeError as e:
        fail(f"{path}: invalid JSON: {e}")


DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def load_safetensors(path):
    """Hand-rolled parser: u64 LE header length, JSON header, raw LE bytes."""
    try:
        with open(path, "rb") as f:
            buf = bytearray(f.read())  # writable, so frombuffer does not warn
    except OSError as e:
        fail(f"{path}: {e.strerror}")
    if len(buf) < 8:
        fail(f"{path}: truncated safetensors file")
    (n,) = struct.unpack("<Q", buf[:8])
    try:
        header = json.loads(buf[8:8 + n])
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        fail(f"{path}: invalid safetensors header: {e}")
    base, out = 8 + n, {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dt = DTYPES.get(info.get("dtype"))
        if dt is None:
            fail(f"{path}: tensor {name}: unsupported dtype {info.get('dtype')}")
        start, end = info["data_offsets"]
        count = math.prod(info["shape"])
        if end - start != count * torch.empty((), dtype=dt).element_size() or base + end > len(buf):
            fail(f"{path}: tensor {name}: data_offsets do not match shape {info['shape']}")
        t = torch.frombuffer(buf, dtype=dt, count=count, offset=base + start)
        out[name] = t.reshape(info["shape"]).to(torch.float32).clone()
    return out


class RMSNorm(nn.Module):
    def __init__(self, d, eps):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(d)), eps

    def forward(self, x):
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


def rotate_half(x):
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


class Layer(nn.Module):
    def __init__(self, c):
        super().__init__()
        h, hd = c["hidden"], c["head_dim"]
        self.nh, self.nkv, self.hd = c["heads"], c["kv_heads"], hd
        self.input_layernorm = RMSNorm(h, c["eps"])
        self.post_attention_layernorm = RMSNorm(h, c["eps"])
        self.self_attn = nn.Module()
        for n, o in (("q_proj", self.nh * hd), ("k_proj", self.nkv * hd), ("v_proj", self.nkv * hd)):
            setattr(self.self_attn, n, nn.Linear(h, o, bias=c["qkv_bias"]))
        self.self_attn.o_proj = nn.Linear(self.nh * hd, h, bias=c["o_bias"])
        self.mlp = nn.Module()
        self.mlp.gate_proj = nn.Linear(h, c["inter"], bias=False)
        self.mlp.up_proj = nn.Linear(h, c["inter"], bias=False)
        self.mlp.down_proj = nn.Linear(c["inter"], h, bias=False)

    def forward(self, x, cos, sin):
        B, T, _ = x.shape
        a, y = self.self_attn, self.input_layernorm(x)
        q = a.q_proj(y).view(B, T, self.nh, self.hd).transpose(1, 2)
        k = a.k_proj(y).view(B, T, self.nkv, self.hd).transpose(1, 2)
        v = a.v_proj(y).view(B, T, self.nkv, self.hd).transpose(1, 2)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        # Right padding only, so a plain causal mask is exact for real tokens. Grouped-query
        # attention through SDPA's own path (each kv head serves nh/nkv query heads).
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.nh != self.nkv)
        x = x + a.o_proj(o.transpose(1, 2).reshape(B, T, -1))
        m, y = self.mlp, self.post_attention_layernorm(x)
        return x + m.down_proj(F.silu(m.gate_proj(y)) * m.up_proj(y))


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus PEFT's LoRA update s * B(A(x)): A Kaiming-uniform (a = sqrt 5),
    B zero, s = alpha / r. `enabled` False gives the frozen base (the reference)."""

    def __init__(self, base, r, alpha):
        super().__init__()
        self.base, self.scale, self.enabled = base.requires_grad_(False), alpha / r, True
        self.lora_A = nn.Linear(base.in_features, r, bias=False)
        self.lora_B = nn.Linear(r, base.out_features, bias=False)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x):
        y = self.base(x)
        return y + self.lora_B(self.lora_A(x)) * self.scale if self.enabled else y


def add_lora(model, r, alpha):
    """Freezes the model and puts an adapter on every projection (PEFT's all-linear)."""
    model.requires_grad_(False)
    adapters = []
    for layer in model.model.layers:
        for parent, names in ((layer.self_attn, ("q_proj", "k_proj", "v_proj", "o_proj")), (layer.mlp, ("gate_proj", "up_proj", "down_proj"))):
            for n in names:
                wrapped = LoRALinear(getattr(parent, n), r, alpha)
                setattr(parent, n, wrapped)
                adapters.append(wrapped)
    return adapters


class Llama(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(c["vocab"], c["hidden"])
        self.model.layers = nn.ModuleList(Layer(c) for _ in range(c["layers"]))
        self.model.norm = RMSNorm(c["hidden"], c["eps"])
        self.lm_head = nn.Linear(c["hidden"], c["vocab"], bias=False)
        if c["tie"]:
            self.lm_head.weight = self.model.embed_tokens.weight
        d = c["head_dim"]
        self.gradient_checkpointing = False
        self.register_buffer("inv_freq", 1.0 / c["theta"] ** (torch.arange(0, d, 2).float() / d), persistent=False)

    def forward(self, ids, first=0):
        """Logits of positions first.. (transformers' logits_to_keep, as TRL's use_logits_to_keep uses it)."""
        freqs = torch.outer(torch.arange(ids.shape[1], dtype=torch.float32, device=ids.device), self.inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos()[None, None], emb.sin()[None, None]
        x = self.model.embed_tokens(ids)
        for layer in self.model.layers:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                # transformers' gradient_checkpointing_enable(): each decoder layer recomputed
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, use_reentrant=False)
            else:
                x = layer(x, cos, sin)
        return self.lm_head(self.model.norm(x)[:, first:])


def load_model(d):
    cpath = os.path.join(d, "config.json")
    cfg = read_json(cpath)
    try:
        heads = cfg["num_attention_heads"]
        c = dict(hidden=cfg["hidden_size"], inter=cfg["intermediate_size"], layers=cfg["num_hidden_layers"],
                 heads=heads, kv_heads=cfg.get("num_key_value_heads") or heads,
                 head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads, vocab=cfg["vocab_size"],
                 eps=cfg.get("rms_norm_eps", 1e-6), theta=cfg.get("rope_theta", 10000.0),
                 tie=bool(cfg.get("tie_word_embeddings", False)))
        # As prefhost reads them: qwen2 has q/k/v biases; llama's attention_bias adds all four.
        qwen2, bias = cfg.get("model_type") == "qwen2", bool(cfg.get("attention_bias", False))
        c.update(qkv_bias=qwen2 or bias, o_bias=bias and not qwen2)
    except KeyError as e:
        fail(f"{cpath}: missing key {e}")
    model = Llama(c)
    wpath = os.path.join(d, "model.safetensors")
    weights = load_safetensors(wpath)
    with torch.no_grad():
        for name, p in model.named_parameters():  # tied lm_head is deduplicated here
            if name not in weights:
                fail(f"{wpath}: missing tensor {name}")
            if weights[name].shape != p.shape:
                fail(f"{wpath}: tensor {name}: shape {list(weights[name].shape)}, expected {list(p.shape)}")
            p.copy_(weights[name])
    return model


def collate(path):
    b = read_json(path)
    try:
        pad, prompts, ch, rj = b["pad_id"], b["prompt"], b["chosen"], b["rejected"]
    except (KeyError, TypeError) as e:
        fail(f"{path}: missing key {e}")
    if not (len(prompts) == len(ch) == len(rj) > 0):
        fail(f"{path}: prompt/chosen/rejected must be non-empty and equally long")
    rows = [(p, p + c) for p, c in zip(prompts, ch)] + [(p, p + r) for p, r in zip(prompts, rj)]
    W = max(len(s) for _, s in rows) - 1
    inp = torch.full((len(rows), W), pad, dtype=torch.long)
    tgt, mask = inp.clone(), torch.zeros(len(rows), W)
    for r, (p, s) in enumerate(rows):
        n = len(s) - 1
        inp[r, :n], tgt[r, :n] = torch.tensor(s[:-1]), torch.tensor(s[1:])
        mask[r, max(len(p) - 1, 0):n] = 1.0  # target t+1 is a completion token
    first = min(max(len(p) - 1, 0) for p, _ in rows)  # the first column with a completion target
    return inp, tgt, mask, sum(len(s) for _, s in rows), len(prompts), first


def seq_logps(model, inp, tgt, mask, first=0):
    logp = torch.log_softmax(model(inp, first).float(), dim=-1)
    return (logp.gather(-1, tgt[:, first:].unsqueeze(-1)).squeeze(-1) * mask[:, first:]).sum(-1)


def current_rss_mb():
    """Resident memory now (VmRSS), in MB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", required=True)
    ap.add_argument("--batch", required=True)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--threads", type=int)
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--bf16", action="store_true", help="torch.autocast to bf16 around both forwards (f32 master weights)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the policy and the reference (default mode)")
    ap.add_argument("--logits-to-keep", action="store_true", help="logits only from the batch's first completion column on (TRL's use_logits_to_keep; prefhost always does this)")
    ap.add_argument("--gradient-checkpointing", action="store_true", help="recompute each decoder layer in the backward pass (torch.utils.checkpoint)")
    ap.add_argument("--lora-r", type=int, help="train LoRA adapters of this rank on every projection; the reference is the frozen base")
    ap.add_argument("--lora-alpha", type=float, default=32.0)
    a = ap.parse_args()
    if tuple(int(x) for x in torch.__version__.split(".")[:2]) < (2, 5):
        fail(f"torch {torch.__version__}: needs 2.5 or later (scaled_dot_product_attention's enable_gqa)")
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        fail("--device cuda: torch finds no CUDA device")
    device = torch.device(a.device)
    cuda = device.type == "cuda"

    policy = load_model(a.model).to(device)
    n_params = sum(p.numel() for p in policy.parameters())  # the model's, without adapters
    inp, tgt, mask, tokens, B, first_target = collate(a.batch)
    keep_from = first_target if a.logits_to_keep else 0
    inp, tgt, mask = inp.to(device), tgt.to(device), mask.to(device)
    if int(max(inp.max(), tgt.max())) >= policy.lm_head.weight.shape[0] or int(min(inp.min(), tgt.min())) < 0:
        fail(f"{a.batch}: token id out of range for vocab {policy.lm_head.weight.shape[0]}")
    if a.lora_r:
        # PEFT's DPO setup: one model; the reference forward runs with the adapters off.
        adapters = add_lora(policy, a.lora_r, a.lora_alpha)
        policy.to(device)

        def reference(ids, first=0):
            for m in adapters:
                m.enabled = False
            try:
                return policy(ids, first)
            finally:
                for m in adapters:
                    m.enabled = True
    else:
        reference = copy.deepcopy(policy).requires_grad_(False).eval()
    policy.gradient_checkpointing = a.gradient_checkpointing
    trainable = [p for p in policy.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=a.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    baseline_rss_mb = current_rss_mb()  # torch imported, both models and the batch loaded
    policy_forward, reference_forward = (torch.compile(policy), torch.compile(reference)) if a.compile else (policy, reference)

    autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=a.bf16)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    times, first = [], None
    for i in range(a.warmup + a.steps):
        if cuda:
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        with autocast():
            lp = seq_logps(policy_forward, inp, tgt, mask, keep_from)
        with torch.no_grad(), autocast():
            lr_ = seq_logps(reference_forward, inp, tgt, mask, keep_from)
        margin = (lp[:B] - lr_[:B]) - (lp[B:] - lr_[B:])
        loss = -F.logsigmoid(a.beta * margin).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        opt.zero_grad()
        if cuda:
            torch.cuda.synchronize(device)
        dt = time.perf_counter() - t0
        if first is None:  # forward of the very first step, before any update
            first = {"loss": loss.item(), "chosen_logps": lp[:B].tolist(), "rejected_logps": lp[B:].tolist()}
        if i >= a.warmup:
            times.append(dt)

    med = statistics.median(times) if times else float("nan")
    print(json.dumps({
        "framework": "pytorch", "torch": torch.__version__, "threads": torch.get_num_threads(),
        "steps": a.steps, "step_seconds": times, "step_seconds_median": med,
        "tokens_per_step": tokens, "tokens_per_second": tokens / med if times else None,
        "params": n_params, "first_step": first,
        "gradient_checkpointing": a.gradient_checkpointing, "lora_r": a.lora_r, "logits_to_keep": a.logits_to_keep,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "baseline_rss_mb": baseline_rss_mb,
        "compiled": a.compile, "glibc_tunables": os.environ.get("GLIBC_TUNABLES"),
        "device": torch.cuda.get_device_name(device) if cuda else "cpu", "bf16_autocast": a.bf16,
        "peak_gpu_allocated_mb": torch.cuda.max_memory_allocated(device) / 2**20 if cuda else None,
    }))


if __name__ == "__main__":
    main()
