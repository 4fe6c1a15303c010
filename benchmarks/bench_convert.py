"""`m3mlx convert` vs `mlx_lm convert`: one multi-gigabyte BF16 checkpoint, the same 4-bit target.

Builds a random M3-shaped checkpoint of --gb gigabytes (default 2.2: 11 layers, 32 experts of
1024x1024, 32k vocab, in ~400 MB shards), then converts it, one tool after the other, each in a
fresh process:

  m3mlx convert SRC OUT --recipe mlx-lm        (what mlx-lm makes: everything 4-bit, router 8-bit)
  m3mlx convert SRC OUT                        (the default m3 recipe)
  python -m mlx_lm convert --hf-path SRC --mlx-path OUT -q --q-bits 4

and reports wall time, throughput (MB of source per second) and peak resident memory (the
kernel's high-water mark of each process, read at its exit). The source is read once first so
no tool pays for a cold page cache, the tools take turns, and each figure is the median of
--repeat runs. Not a test: these machines are noisy, read the ratios.

    python benchmarks/bench_convert.py [--gb 2.2] [--repeat 3] [--dir /tmp/bench-convert]
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

# Runs a command's Python entry point in this process and prints its peak RSS at exit.
RUNNER = r"""
import re, resource, runpy, sys
kind, argv = sys.argv[1], sys.argv[2:]
try:
    if kind == "m3mlx":
        from m3mlx.cli.convert import convert
        convert.main(argv, standalone_mode=False)
    else:
        sys.argv = ["mlx_lm"] + argv
        runpy.run_module("mlx_lm", run_name="__main__")
finally:
    try:
        status = open("/proc/self/status").read()
        peak = int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) * 1024
    except OSError:  # macOS: ru_maxrss is in bytes there
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(f"PEAK_RSS {peak}", file=sys.stderr)
"""


def run(name, kind, argv, source_bytes, out):
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", RUNNER, kind, *argv], capture_output=True,
                          text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{proc.stdout}\n{proc.stderr}")
    peak = int(proc.stderr.rsplit("PEAK_RSS", 1)[1].split()[0])
    size = sum(f.stat().st_size for f in Path(out).glob("*.safetensors"))
    return {"name": name, "seconds": seconds, "mb_s": source_bytes / seconds / 1e6,
            "peak_mb": peak / 1e6, "out_mb": size / 1e6}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--gb", type=float, default=2.2, help="approximate checkpoint size")
    p.add_argument("--dir", default=None, help="work directory (default: a temporary one)")
    p.add_argument("--repeat", type=int, default=3, help="runs per tool (median reported)")
    p.add_argument("--keep", action="store_true", help="keep the checkpoint and outputs")
    args = p.parse_args()

    from convert_fixtures import big_checkpoint

    work = Path(args.dir or tempfile.mkdtemp(prefix="bench-convert-"))
    work.mkdir(parents=True, exist_ok=True)
    src = work / "src"
    layers = max(2, round(1 + (args.gb - 0.14) / 0.206))  # ~206 MB per MoE layer
    if not (src / "config.json").exists():
        t = time.perf_counter()
        big_checkpoint(src, num_hidden_layers=layers)
        print(f"built {src} in {time.perf_counter() - t:.1f}s")
    shards = sorted(src.glob("*.safetensors"))
    source_bytes = sum(f.stat().st_size for f in shards)
    print(f"checkpoint: {source_bytes / 1e9:.2f} GB BF16 in {len(shards)} shards, "
          f"{layers} layers, {sys.platform}, {os.cpu_count()} CPUs\n")

    for f in shards:  # warm the page cache for everyone
        with open(f, "rb") as fh:
            while fh.read(64 << 20):
                pass
    tools = [
        ("m3mlx convert --recipe mlx-lm", "m3mlx",
         [str(src), str(work / "m3mlx-mlxlm"), "--recipe", "mlx-lm", "--quiet"],
         work / "m3mlx-mlxlm"),
        ("m3mlx convert (recipe m3)", "m3mlx",
         [str(src), str(work / "m3mlx-m3"), "--quiet"], work / "m3mlx-m3"),
        ("mlx_lm convert -q --q-bits 4", "mlx_lm",
         ["convert", "--hf-path", str(src), "--mlx-path", str(work / "mlx-lm"), "-q",
          "--q-bits", "4"], work / "mlx-lm"),
    ]
    runs = {name: [] for name, *_ in tools}
    for _ in range(args.repeat):
        for name, kind, argv, out in tools:
            runs[name].append(run(name, kind, argv, source_bytes, out))
    results = []
    for name, rs in runs.items():
        results.append({k: statistics.median(r[k] for r in rs) if k != "name" else name
                        for k in rs[0]})
    print(f"median of {args.repeat} runs each")
    print(f"{'tool':<32}{'seconds':>9}{'MB/s':>9}{'peak RSS MB':>13}{'output MB':>11}")
    for r in results:
        print(f"{r['name']:<32}{r['seconds']:>9.1f}{r['mb_s']:>9.1f}{r['peak_mb']:>13.0f}"
              f"{r['out_mb']:>11.0f}")
    ours, theirs = results[0], results[2]
    speed = theirs["seconds"] / ours["seconds"]
    print(f"\nsame target (all 4-bit, router 8-bit): m3mlx is {speed:.2f}x "
          f"the speed of mlx-lm with {theirs['peak_mb'] / ours['peak_mb']:.1f}x less peak memory")
    json.dump(results, open(work / "results.json", "w"), indent=2)
    if not args.keep and not args.dir:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
