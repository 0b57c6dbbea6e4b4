"""Weight conversion from a pytorch_model.bin against the same weights in safetensors: time and peak RSS.

    python benchmarks/checkpoint_formats.py WORKDIR [--preset gptj-6b] [--layers N] [--dtype float32]
        [--to bfloat16] [--rounds 2] [--keep] [--out benchmarks/results/checkpoint_formats.json]

Writes one random checkpoint twice into WORKDIR (the same weights: safetensors shards, and one
pytorch_model.bin with the mask buffers, as EleutherAI's main branch ships it), compiles the library once
(`compile --no-weights`), then runs `gptj-tvm convert-weights` from each, alternating round by round, each in
its own process: wall seconds and that process's peak RSS (from wait4). GPT-J-6B in float32 needs about
24 GB of disk per checkpoint and 12 GB for the bfloat16 weights; WORKDIR is removed afterwards unless --keep.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from report import write_result  # benchmarks/report.py (a script's folder is on its path)

FORMATS = ("safetensors", "pytorch")


def gptj_tvm(*args) -> list[str]:
    return [sys.executable, "-m", "gptj_tvm.cli", *map(str, args)]


def timed(command: list[str]) -> tuple[float, int]:
    """(wall seconds, peak RSS bytes) of one process."""
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {' '.join(command)}")
    return seconds, usage.ru_maxrss * 1024


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdir", type=Path)
    parser.add_argument("--preset", default="gptj-6b")
    parser.add_argument("--layers", type=int)
    parser.add_argument("--dtype", default="float32", help="the checkpoints' dtype (default float32)")
    parser.add_argument("--to", default="bfloat16", help="the artifact's dtype (default bfloat16)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--keep", action="store_true", help="keep WORKDIR")
    parser.add_argument("--out", default="benchmarks/results/checkpoint_formats.json")
    args = parser.parse_args(argv)
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    layers = ["--layers", args.layers] if args.layers else []
    checkpoints = {fmt: work / fmt for fmt in FORMATS}
    try:
        for fmt, folder in checkpoints.items():
            if not folder.exists():
                subprocess.run(gptj_tvm("init-random", folder, "--preset", args.preset, *layers, "--dtype",
                                        args.dtype, "--format", fmt, "--shard-mb", 1 << 20 if fmt == "pytorch"
                                        else 2048, "--quiet"), check=True)
        library = work / "library"
        if not library.exists():
            subprocess.run(gptj_tvm("compile", checkpoints["safetensors"], "-o", library, "--dtype", args.to,
                                    "--no-weights", "--quiet"), check=True)
        rows = {fmt: [] for fmt in FORMATS}
        for _ in range(args.rounds):
            for fmt, folder in checkpoints.items():
                target = work / "artifact"
                shutil.copytree(library, target)
                seconds, rss = timed(gptj_tvm("convert-weights", folder, target, "--quiet"))
                shutil.rmtree(target)
                rows[fmt].append({"seconds": seconds, "peak_rss_bytes": rss})
                print(f"{fmt:12s} {seconds:8.1f} s  peak RSS {rss / 1e9:6.2f} GB", flush=True)
        sizes = {fmt: sum(f.stat().st_size for f in folder.iterdir()) for fmt, folder in checkpoints.items()}
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    result = {"preset": args.preset, "layers": args.layers, "checkpoint_dtype": args.dtype, "artifact_dtype": args.to,
              "checkpoint_bytes": sizes, "rounds": rows}
    print(f"\nconvert-weights, {args.preset} {args.dtype} -> {args.to}, {args.rounds} rounds alternating")
    print(f"{'format':12s} {'checkpoint GB':>14s} {'seconds (min-max)':>20s} {'peak RSS GB (max)':>18s}")
    for fmt in FORMATS:
        secs = [r["seconds"] for r in rows[fmt]]
        print(f"{fmt:12s} {sizes[fmt] / 1e9:14.2f} {min(secs):9.1f}-{max(secs):<9.1f} "
              f"{max(r['peak_rss_bytes'] for r in rows[fmt]) / 1e9:18.2f}")
    ratio = [b["seconds"] / a["seconds"] for a, b in zip(rows["safetensors"], rows["pytorch"])]
    result["pytorch_over_safetensors_seconds"] = ratio
    print(f"pytorch / safetensors time, per round: {', '.join(f'{r:.2f}' for r in ratio)}")
    write_result(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
