"""Two `gptj-tvm serve` processes (two checkouts, or two sets of flags) timed request by request, interleaved:
what a change to the server costs a request's latency.

    python benchmarks/serve_ab.py --a "ARTIFACT_A" --b "ARTIFACT_B" [--a-path OLD_PACKAGE_ROOT] [--rounds 10]
        [--requests 20] [--stream] [--out benchmarks/results/serve_ab.json]

Each side is `python -P -m gptj_tvm.cli serve ARTIFACT ...` on a port of its own; --a-path / --b-path put
another checkout's package first on PYTHONPATH (a folder holding `gptj_tvm/`). Both servers stay up, idle but
for the request in flight; each round sends --requests requests one after another to one side, then the other
(ABBA from round to round), and keeps each side's median latency, so the per-round ratios say whether the
difference can be called (gptj_tvm.core.interleaved).
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import time

import httpx

from gptj_tvm.core.interleaved import compare
from report import write_result  # benchmarks/report.py (a script's folder is on its path)

BODY = {"prompt": "The quick brown fox jumps over the lazy dog. " * 2, "max_tokens": 16, "ignore_eos": True,
        "temperature": 0}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(artifact: str, package_path: str | None, extra: list[str]) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    if package_path:
        env["PYTHONPATH"] = package_path + os.pathsep + env.get("PYTHONPATH", "")
    process = subprocess.Popen([sys.executable, "-P", "-m", "gptj_tvm.cli", "serve", artifact, "--port", str(port),
                                *extra], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/health", timeout=5, trust_env=False).status_code == 200:
                return process, url
        except httpx.TransportError:
            pass
        if process.poll() is not None:
            raise SystemExit(f"the server for {artifact} exited with {process.returncode}")
        time.sleep(0.2)
    process.kill()
    raise SystemExit(f"the server for {artifact} was not ready in 300 s")


def latency(http: httpx.Client, stream: bool) -> float:
    start = time.perf_counter()
    if stream:
        with http.stream("POST", "/v1/completions", json={**BODY, "stream": True}) as answer:
            for _ in answer.iter_lines():
                pass
    else:
        answer = http.post("/v1/completions", json=BODY)
        assert answer.status_code == 200, answer.text
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--a", required=True, help="artifact served by side A")
    parser.add_argument("--b", required=True, help="artifact served by side B")
    parser.add_argument("--a-path", help="folder holding side A's gptj_tvm package (default: this one)")
    parser.add_argument("--b-path", help="folder holding side B's gptj_tvm package (default: this one)")
    parser.add_argument("--serve-args", default="", help="flags for both servers, e.g. '--max-batch 4'")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--requests", type=int, default=20, help="requests per side per round")
    parser.add_argument("--stream", action="store_true", help="stream the answers")
    parser.add_argument("--out", default="benchmarks/results/serve_ab.json")
    args = parser.parse_args()
    sides = {}
    try:
        for name, artifact, path in (("a", args.a, args.a_path), ("b", args.b, args.b_path)):
            process, url = start(artifact, path, args.serve_args.split())
            sides[name] = (process, httpx.Client(base_url=url, trust_env=False, timeout=120))
        for _, http in sides.values():  # warm: the first requests of a process pay its first calls
            for _ in range(3):
                latency(http, args.stream)
        medians = {"a": [], "b": []}
        for r in range(args.rounds):
            for name in ("a", "b") if r % 2 == 0 else ("b", "a"):
                times = [latency(sides[name][1], args.stream) for _ in range(args.requests)]
                medians[name].append(statistics.median(times))
            print(f"round {r + 1}: A {1e3 * medians['a'][-1]:.2f} ms, B {1e3 * medians['b'][-1]:.2f} ms", flush=True)
    finally:
        for process, http in sides.values():
            http.close()
            process.terminate()
            process.wait(60)
    result = compare(medians["a"], medians["b"])
    print(f"A median {1e3 * result['a_median']:.2f} ms, B median {1e3 * result['b_median']:.2f} ms per request: "
          f"{result['verdict']}")
    write_result({"a": args.a, "b": args.b, "a_path": args.a_path, "b_path": args.b_path, "stream": args.stream,
                  "requests_per_round": args.requests, "body": BODY, **result}, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
