"""Step time and peak RSS of `host run SCRIPT` for two host binaries, in interleaved
rounds: each round runs A then B, each under /usr/bin/time -v. A step's time is the gap
between its log line and the previous one (the script logs every step), so step 1 (which
also loads the data) is left out; each run gives the median of its steps, and the result
is the median over rounds with the min-max.

    python3 bench/stored_dtype_rounds.py --a BEFORE_HOST --b AFTER_HOST --rounds 3 bench/lora_135m_bf16.rhai
"""
import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time

parser = argparse.ArgumentParser()
parser.add_argument("script")
parser.add_argument("--a", required=True)
parser.add_argument("--b", required=True)
parser.add_argument("--rounds", type=int, default=3)
parser.add_argument("--plugins", default="plugins")
args = parser.parse_args()


def run(binary):
    run_dir = tempfile.mkdtemp(prefix="rounds-") + "/run"
    cmd = ["/usr/bin/time", "-v", binary, "run", args.script, "--no-watch", "--plugins", args.plugins, "--run-dir", run_dir]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stamps, first = [], None
    for line in proc.stdout:
        if re.match(r"step \d+/\d+", line):
            stamps.append(time.monotonic())
            first = first or line
    err = proc.stderr.read()
    if proc.wait() != 0:
        sys.exit(f"{binary} failed:\n{err}")
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", err).group(1))
    steps = [b - a for a, b in zip(stamps, stamps[1:])]
    return {"step_s": statistics.median(steps), "steps": steps, "peak_rss_mb": rss_kb / 1024, "step1": first.split("  ")[1:4]}


results = {"a": [], "b": []}
for r in range(args.rounds):
    for side, binary in (("a", args.a), ("b", args.b)):
        out = run(binary)
        results[side].append(out)
        print(f"round {r + 1} {side}: median step {out['step_s']:.3f} s, peak RSS {out['peak_rss_mb']:.0f} MB, step 1 {' '.join(out['step1'])}", flush=True)
summary = {}
for side in ("a", "b"):
    s = [x["step_s"] for x in results[side]]
    m = [x["peak_rss_mb"] for x in results[side]]
    summary[side] = {"step_s_median": statistics.median(s), "step_s_min": min(s), "step_s_max": max(s), "peak_rss_mb_median": statistics.median(m), "peak_rss_mb_min": min(m), "peak_rss_mb_max": max(m)}
summary["b_over_a_step"] = summary["b"]["step_s_median"] / summary["a"]["step_s_median"]
summary["b_over_a_rss"] = summary["b"]["peak_rss_mb_median"] / summary["a"]["peak_rss_mb_median"]
print(json.dumps(summary, indent=2))
