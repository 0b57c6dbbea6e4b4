"""The `gptj-tvm` command: one function per subcommand; errors become one line on stderr.

Past 400 lines for a reason: ten subcommands, each its parser (flags and help) beside the function that runs it,
so that a flag and its use read together; the work itself lives in the packages.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from .core.errors import GptjError
from .frontend.config import PREFILL_BUCKETS
from .runtime.serve_options import DEFAULTS as SERVE_DEFAULTS
from .runtime.serve_options import ReplicaOptions, ServeOptions

DTYPE_CHOICES = ("float32", "float16", "bfloat16")


def _runtime_library_only(artifact) -> None:
    """Running a CPU or Vulkan artifact needs TVM's runtime library only: without its compiler library (loaded
    by default, and never used here) a process holds about 100 MB less. Set before TVM is first imported.
    Reads the artifact's metadata, so a bad artifact fails here, in one line."""
    from .runtime.artifact import ArtifactMetadata  # imports no TVM

    device = ArtifactMetadata.read(Path(artifact)).device
    if "tvm" not in sys.modules and device in ("cpu", "vulkan"):
        os.environ.setdefault("TVM_USE_RUNTIME_LIB", "1")


def cmd_init_random(args) -> int:
    from tqdm import tqdm

    from .frontend.random_checkpoint import make_config, write_random_checkpoint
    from .frontend.weights import hf_tensors

    config = make_config(args.preset, args.layers, args.dtype)
    with tqdm(total=len(hf_tensors(config)), desc="write random checkpoint", unit="tensor",
              disable=args.quiet) as bar:
        write_random_checkpoint(Path(args.dir), config, seed=args.seed, shard_bytes=args.shard_mb << 20,
                                weights_format=args.format,
                                on_tensor=lambda _name: bar.update())
    if not args.quiet:
        print(f"wrote a random GPT-J ({config.n_layer} layers, d {config.n_embd}, {config.torch_dtype}) "
              f"to {args.dir}")
    return 0


def _build_options(args) -> dict:
    """The options compile and tune share (_add_build_options)."""
    return dict(target=args.target, arch=args.arch, dtype=args.dtype, fuse_block=not args.no_fuse_block,
                prefill_buckets=args.prefill_buckets, progress=not args.quiet)


def cmd_compile(args) -> int:
    from .compiler.compile import compile_model, describe_source
    from .compiler.options import CompileOptions

    options = CompileOptions(**_build_options(args), tuning_db=args.tuning_db, weights=not args.no_weights,
                             quantization=args.quantization, quantized_gemm=args.quantized_gemm)
    meta = compile_model(args.model_dir, args.output, options)
    if args.quiet:
        return 0
    if args.tuning_db:
        tuned = list(meta.kernels.values()).count("tuned")
        print(f"schedules: {tuned} kernels tuned, {len(meta.kernels) - tuned} default or hand-written")
    print(describe_source(meta.source))
    timings = meta.compile_timings
    weights = (f"weights {timings['weights_s']:.1f} s" if "weights_s" in timings else
               f"no weights yet (gptj-tvm convert-weights {args.model_dir} {args.output})")
    print(f"compiled {args.model_dir} -> {args.output} ({meta.dtype}, {_target_name(meta.target)}): "
          f"library {timings['library_s']:.1f} s, {weights}")
    return 0


def _target_name(target: dict) -> str:
    return f"{target['kind']} {target.get('mcpu') or target.get('arch') or ''}".strip()


def cmd_convert_weights(args) -> int:
    from .compiler.convert import convert_weights  # numpy and safetensors; no TVM compiler

    meta = convert_weights(args.model_dir, args.artifact, progress=not args.quiet)
    if not args.quiet:
        print(f"converted {args.model_dir} into {args.artifact} ({meta.dtype}, {meta.layouts['blocks']}): "
              f"{len(meta.weight_files)} files in {meta.compile_timings['weights_s']:.1f} s")
    return 0


def cmd_tune(args) -> int:
    from .compiler.options import TuneOptions
    from .compiler.tune import describe_tuning, tune_model

    options = TuneOptions(**_build_options(args), trials=args.trials, max_seconds=args.max_seconds)
    summary = tune_model(args.model_dir, args.output, options)
    if summary["tasks"] == 0:
        print("nothing to tune: this model's GEMMs run hand-written kernels on this CPU (tir_kernels/)")
    print(f"{args.output}: {summary['tuned']} tasks tuned, {summary['resumed']} already there, "
          f"{summary['skipped_for_time']} left for lack of time, of {summary['tasks']} "
          f"({summary['seconds']:.0f} s)")
    print(describe_tuning(summary["tuned_vs_default"]))
    return 0


def _buckets(text: str) -> tuple[int, ...]:
    if text.strip().lower() == "none":
        return ()
    try:
        return tuple(int(b) for b in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected lengths like 32,128 or none, not {text!r}") from None


def _prompt(args):
    if args.prompt_ids is not None:
        try:
            return [int(tok) for tok in args.prompt_ids.split(",") if tok.strip()]
        except ValueError:
            raise GptjError(f"--prompt-ids must be comma-separated integers, got {args.prompt_ids!r}") from None
    return args.prompt


def cmd_generate(args) -> int:
    _runtime_library_only(args.artifact)
    from . import load

    gen = load(args.artifact, adapter=args.device, verify=args.verify)
    options = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                   top_p=args.top_p, seed=args.seed, stop=args.stop or ())
    if args.json:
        out = gen.generate(_prompt(args), **options)
        print(json.dumps({
            "prompt_ids": out.prompt_ids, "output_ids": out.ids, "text": out.text,
            "finish_reason": out.finish_reason,
            "prefill_tokens_per_s": out.stats["prefill_tokens_per_s"],
            "decode_tokens_per_s": out.stats["decode_tokens_per_s"],
        }))
        return 0
    for piece in gen.stream(_prompt(args), **options):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def cmd_serve(args) -> int:
    _runtime_library_only(args.artifact)
    try:
        from .runtime.server import serve  # uvicorn prints where it listens, the server when the model is ready
    except ImportError as err:
        raise GptjError(f"serving needs FastAPI, uvicorn and prometheus_client: pip install 'gptj-tvm[serve]' "
                        f"({err})") from None

    options = ServeOptions(max_batch=args.max_batch, max_queue=args.max_queue, kv_cache_gb=args.kv_cache_gb,
                           prefill_chunk=args.prefill_chunk, prefix_cache=args.prefix_cache, api_key=args.api_key,
                           model_name=args.model_name,
                           max_tokens_limit=args.max_tokens_limit, max_n=args.max_n,
                           drain_seconds=args.drain_seconds, header_timeout=args.header_timeout,
                           verify=args.verify)
    if args.replicas is not None:
        from .runtime.cluster import serve_replicas  # imports Ray, or says how to install it

        serve_replicas(args.artifact, args.host, args.port, options, _replica_options(args))
        return 0
    cluster_only = [flag for flag, value in (("--ray-address", args.ray_address), ("--min-replicas", args.min_replicas),
                                             ("--max-replicas", args.max_replicas),
                                             ("--replica-cpus", args.replica_cpus),
                                             ("--no-prefix-routing", not args.prefix_routing)) if value]
    if cluster_only:
        raise GptjError(f"{', '.join(cluster_only)} need --replicas")
    serve(args.artifact, host=args.host, port=args.port, options=options)
    return 0


def _replica_options(args) -> ReplicaOptions:
    low, high = args.min_replicas, args.max_replicas
    if args.replicas < 1 or any(n is not None and n < 1 for n in (low, high)):
        raise GptjError("--replicas, --min-replicas and --max-replicas must be at least 1")
    if (low is None) != (high is None):
        raise GptjError("autoscaling needs both --min-replicas and --max-replicas")
    if low is not None and not low <= args.replicas <= high:
        raise GptjError(f"--replicas {args.replicas} (the start) must lie in --min-replicas {low} .. "
                        f"--max-replicas {high}")
    if args.replica_cpus is not None and args.replica_cpus <= 0:
        raise GptjError("--replica-cpus must be positive")
    return ReplicaOptions(replicas=args.replicas, ray_address=args.ray_address, min_replicas=low, max_replicas=high,
                          replica_cpus=args.replica_cpus, prefix_routing=args.prefix_routing)


def cmd_devices(args) -> int:
    from .runtime.devices import list_devices

    found = list_devices()
    if args.json:
        print(json.dumps(found, indent=2))
        return 0
    for kind in ("vulkan", "cuda"):
        entries = found[kind]
        print(f"{kind}: {len(entries) or 'none'}")
        for entry in entries:
            details = ", ".join(f"{k} {entry[k]}" for k in ("type", "driver", "compute_capability") if entry.get(k))
            print(f"  {entry['index']}: {entry['name']} ({details})")
    return 0


def cmd_inspect(args) -> int:
    from .runtime.inspect import format_report, inspect_artifact

    report = inspect_artifact(args.artifact, run=False if args.no_run else None)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


def cmd_bench(args) -> int:
    if len(args.artifacts) > 2:
        raise GptjError(f"bench takes one artifact, or two to compare (A B), not {len(args.artifacts)}")
    for folder in args.artifacts:
        _runtime_library_only(folder)  # a bad artifact fails here, before the bandwidth is measured
    if len(args.artifacts) == 2:
        from .runtime.ab import run_ab, table

        result = run_ab(*args.artifacts, rounds=args.rounds, bandwidth=not args.no_bandwidth,
                        progress=not args.json)
        print(json.dumps(result, indent=2) if args.json else table(result))
        return 0
    from .runtime.bench import NO_BOUND, bench_with_bound, table

    result = bench_with_bound(args.artifacts[0], bandwidth=not args.no_bandwidth, progress=not args.json)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(table(result))
    if "read_bandwidth_gb_s" not in result and not args.no_bandwidth:
        print(NO_BOUND)
    return 0


def cmd_demo(args) -> int:
    """A tiny random GPT-J: written, compiled for this CPU, and generating, all in a temporary folder."""
    from . import load
    from .frontend.random_checkpoint import make_config, write_random_checkpoint
    from .compiler.compile import compile_model

    with tempfile.TemporaryDirectory(prefix="gptj-tvm-demo-") as tmp:
        model_dir, artifact_dir = Path(tmp) / "checkpoint", Path(tmp) / "artifact"
        print("1/3 writing a tiny random GPT-J checkpoint (Hugging Face layout)")
        write_random_checkpoint(model_dir, make_config("tiny", None, None), seed=args.seed)
        print("2/3 compiling it for this CPU with TVM")
        meta = compile_model(model_dir, artifact_dir)
        print(f"    target {meta.target['kind']} -mcpu={meta.target.get('mcpu')} "
              f"in {meta.compile_timings['library_s']:.1f} s")
        print(f"3/3 generating (random weights, so the text is noise): {args.prompt!r} ->")
        gen = load(artifact_dir)
        sys.stdout.write(args.prompt)
        stream = gen.stream(args.prompt, max_new_tokens=args.max_new_tokens, temperature=0)
        for piece in stream:
            sys.stdout.write(piece)
            sys.stdout.flush()
        stats = stream.result.stats
        print(f"\n\n{len(stream.result.ids)} new tokens; prefill {stats['prefill_tokens_per_s']:.0f} tokens/s, "
              f"decode {stats['decode_tokens_per_s']:.0f} tokens/s")
    return 0


def _add_build_options(p: argparse.ArgumentParser, command: str, targets: str, buckets: str) -> None:
    """The options compile and tune share (compiler/options.py's BuildOptions)."""
    p.add_argument("--target", default="llvm", help=targets)
    p.add_argument("--arch", help="CUDA GPU generation, e.g. sm_80 (A100), sm_89 (L4), sm_90 (H100); "
                                  "default: the visible GPU's")
    p.add_argument("--dtype", help="float32, float16 or bfloat16 (default: the checkpoint's)")
    p.add_argument("--no-fuse-block", action="store_true",
                   help=f"{command} the plain graph, each block's projections separate (for comparison)")
    p.add_argument("--prefill-buckets", type=_buckets, metavar="B,B,...", help=buckets)
    p.add_argument("--quiet", action="store_true", help="no progress output")


def _add_init_random(sub) -> None:
    p = sub.add_parser("init-random", help="write a GPT-J checkpoint (HF layout) with random weights",
                       description="Write a GPT-J checkpoint in the Hugging Face layout with random weights.")
    p.add_argument("dir", help="output folder (must not exist or be empty)")
    p.add_argument("--preset", default="tiny", choices=("tiny", "gptj-6b"),
                   help="tiny (seconds to compile) or gptj-6b (the real 6B shape); default tiny")
    p.add_argument("--layers", type=int, help="override the number of layers")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, help="storage dtype (default: the preset's)")
    p.add_argument("--shard-mb", type=int, default=2048, help="largest shard in MiB (default 2048)")
    p.add_argument("--format", choices=("safetensors", "pytorch"), default="safetensors",
                   help="weight files: safetensors (default) or pytorch_model.bin as torch.save writes it, with "
                        "the causal-mask buffers older saves hold")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=cmd_init_random)


def _add_compile(sub) -> None:
    p = sub.add_parser("compile", help="compile a GPT-J checkpoint into an artifact folder",
                       description="Compile a Hugging Face GPT-J checkpoint for a target; write an artifact "
                                   "folder (library, converted weights, tokenizer, metadata).")
    p.add_argument("model_dir", help="checkpoint folder (config.json, *.safetensors or pytorch_model*.bin, "
                                     "tokenizer files)")
    p.add_argument("-o", "--output", required=True, help="artifact folder to write")
    _add_build_options(p, "compile", targets="llvm (this host's CPU; default), 'llvm -mcpu=NAME' (another x86 "
                                              "CPU, e.g. haswell, znver3, znver4, sapphirerapids; add "
                                              "-mattr=+F,-F to change features): its ISA picks the kernels, and "
                                              "the artifact runs on CPUs that have it; cuda (NVIDIA GPUs; device "
                                              "code built here with nvcc) or vulkan (any Vulkan GPU, through WGSL "
                                              "and wgpu; float32 or float16)",
                       buckets="prompt lengths with a static prefill function; long prompts are prefilled in "
                               f"chunks of them (default {','.join(map(str, PREFILL_BUCKETS))} for float32/float16 "
                               "CPU artifacts, else none; 'none': one dynamic prefill), plus the tuning database's")
    p.add_argument("--quantization", choices=("q8", "q4"),
                   help="weight-only, symmetric, per group of 32 input features with float16 scales: q8 int8 "
                        "levels (8.5 bits per weight), q4 4-bit (4.5 bits); lm_head q8, embedding unquantized; "
                        "CPU targets only")
    p.add_argument("--quantized-gemm", choices=("avx512-vnni", "avx-vnni", "avx2", "float32"),
                   help="what q8/q4 GEMMs multiply on: integer dot products (AVX-512 VNNI, AVX-VNNI or AVX2, the "
                        "input quantized per group to int8) or float32 (levels widened, x exact); default: the "
                        "best the target has")
    p.add_argument("--no-weights", action="store_true",
                   help="build the library from config.json alone; add the weights later with convert-weights")
    p.add_argument("--tuning-db", help="a database from `gptj-tvm tune`: tuned schedules where it has them "
                                       "(bfloat16: the tuned column-tile GEMMs in place of the pair kernels)")
    p.set_defaults(func=cmd_compile)


def _add_convert_weights(sub) -> None:
    p = sub.add_parser("convert-weights", help="add a checkpoint's weights to an artifact (no TVM compiler needed)",
                       description="Convert a checkpoint's weights into an artifact made by `compile --no-weights` "
                                   "(same config); needs numpy and safetensors only, so it runs where only TVM's "
                                   "runtime is installed.")
    p.add_argument("model_dir", help="checkpoint folder (config.json, *.safetensors or pytorch_model*.bin, "
                                     "tokenizer files)")
    p.add_argument("artifact", help="artifact folder made by `gptj-tvm compile`")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=cmd_convert_weights)


def _add_tune(sub) -> None:
    p = sub.add_parser("tune", help="tune the model's kernels for this hardware with MetaSchedule",
                       description="Tune the GEMM kernels of decode and of prefill at a few prompt lengths "
                                   "(buckets) with MetaSchedule (XGBoost cost model) into a JSON database keyed "
                                   "by this hardware; run again with the same output to resume. Use the "
                                   "database with `compile --tuning-db`: the artifact then prefills long "
                                   "prompts in chunks of the bucket lengths, with the tuned kernels. bfloat16 "
                                   "CPU artifacts run hand-written GEMMs on column-pair weights by default; "
                                   "tuning a bfloat16 model tunes the column-tile GEMMs a database then selects.")
    p.add_argument("model_dir", help="checkpoint folder (config.json; the weights are not read)")
    p.add_argument("-o", "--output", required=True, help="tuning database file (JSON) to write or resume")
    _add_build_options(p, "tune", targets="llvm (this host's CPU; default; the only one for now)",
                       buckets="prompt lengths whose prefill GEMMs are tuned (default "
                               f"{','.join(map(str, PREFILL_BUCKETS))}, those within the context; 'none': "
                               "decode only)")
    p.add_argument("--trials", type=int, default=64,
                   help="trials per task on average (default 64), spread by each task's time per token")
    p.add_argument("--max-seconds", type=float,
                   help="bound the whole run: past it, the task in flight stops after the batch of trials it is "
                        "measuring (keeping its best so far) and the tasks left over are skipped")
    p.set_defaults(func=cmd_tune)


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="generate text with a compiled artifact",
                       description="Generate text with a compiled artifact; streams to stdout.")
    p.add_argument("artifact", help="artifact folder made by `gptj-tvm compile`")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--prompt", help="prompt text")
    group.add_argument("--prompt-ids", help="prompt as comma-separated token ids, e.g. 464,10730")
    p.add_argument("--max-new-tokens", type=int, default=32, help="default 32")
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default)")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0: all)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1: all)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (same seed, same text)")
    p.add_argument("--stop", nargs="+", metavar="STRING", help="stop before any of these strings")
    p.add_argument("--verify", action="store_true",
                   help="check the weights' sha256 against what compile recorded before running (about 1 s a GB; "
                        "their sizes, and the library's and tokenizer's sha256, are always checked)")
    p.add_argument("--json", action="store_true", help="print one JSON object at the end instead of streaming")
    p.add_argument("--device", help="Vulkan artifacts: the adapter to run on, by index or part of its name "
                                    "(see `gptj-tvm devices`; default the first)")
    p.set_defaults(func=cmd_generate)


def _add_serve(sub) -> None:
    p = sub.add_parser("serve", help="an OpenAI-compatible HTTP server with continuous batching",
                       description="Serve an artifact over HTTP with OpenAI's API (/v1/completions, "
                                   "/v1/chat/completions, /v1/models; streaming by server-sent events), plus "
                                   "/health, /metrics (Prometheus), /tokenize and /detokenize. Requests are batched "
                                   "continuously: up to --max-batch sequences decode together, one weight read per "
                                   "step. SIGINT/SIGTERM drain: new requests get 503, running ones get "
                                   "--drain-seconds, then the server exits 0.")
    p.add_argument("artifact", help="artifact folder made by `gptj-tvm compile` (Vulkan ones serve one sequence at "
                                    "a time: they have no batched step)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="default 8000")
    d = SERVE_DEFAULTS
    p.add_argument("--max-batch", type=int, default=d.max_batch,
                   help=f"sequences decoded together (default {d.max_batch})")
    p.add_argument("--max-queue", type=int, default=d.max_queue,
                   help=f"requests waiting for a sequence slot before new ones get 429 (default {d.max_queue})")
    p.add_argument("--kv-cache-gb", type=float, metavar="G",
                   help="KV cache budget in GB (10^9 bytes) for all --max-batch sequences; sets the positions per "
                        "sequence (default: the model's context for each)")
    p.add_argument("--prefill-chunk", type=int, default=d.prefill_chunk, metavar="TOKENS",
                   help="prompt tokens prefilled per step beside the running streams' tokens: smaller keeps their "
                        f"inter-token latency low while a prompt comes in, larger gets it in sooner (default "
                        f"{d.prefill_chunk})")
    p.add_argument("--no-prefix-cache", dest="prefix_cache", action="store_false",
                   help="prefill every prompt from its first token (default: a prompt that begins as one an idle or "
                        "running sequence holds starts from those keys and values; usage.prompt_tokens_details."
                        "cached_tokens counts them)")
    p.add_argument("--api-key", help="require `Authorization: Bearer KEY` on /v1 and /tokenize, /detokenize "
                                     "(/health and /metrics stay open)")
    p.add_argument("--model-name", help="the model id clients name (default: the artifact folder's name)")
    p.add_argument("--max-tokens-limit", type=int, help="largest max_tokens accepted (default: a sequence's positions)")
    p.add_argument("--max-n", type=int, default=d.max_n,
                   help=f"largest n (choices per request) accepted (default {d.max_n})")
    p.add_argument("--drain-seconds", type=float, default=d.drain_seconds,
                   help="on SIGINT/SIGTERM, how long running requests may take to finish "
                        f"(default {d.drain_seconds:g}); meanwhile new requests and /health get 503, and what is "
                        "still running then ends (a stream with finish_reason error and [DONE]). A second signal "
                        "stops at once")
    p.add_argument("--header-timeout", type=float, default=d.header_timeout, metavar="SECONDS",
                   help="close a connection that has not sent a request's headers within this time of opening or "
                        f"of its last response (default {d.header_timeout:g})")
    p.add_argument("--verify", action="store_true",
                   help="check the weights' sha256 against what compile recorded before running (about 1 s a GB; "
                        "their sizes, and the library's and tokenizer's sha256, are always checked)")
    r = p.add_argument_group("replicas on Ray Serve (pip install -e '.[cluster]'; README: Several machines)")
    r.add_argument("--replicas", type=int, metavar="N",
                   help="serve N engines (Ray Serve replicas, each loading ARTIFACT itself: a path every node "
                        "sees) behind one ingress on --host:--port; a conversation's next turn goes to the replica "
                        "that served it while that one has a free slot, other requests to the least loaded")
    r.add_argument("--ray-address", metavar="ADDR",
                   help="join this Ray cluster from one of its nodes (head:6379, or auto; default: start a Ray head "
                        "on 127.0.0.1 for this machine alone)")
    r.add_argument("--min-replicas", type=int, metavar="N", help="with --max-replicas: autoscale between the two on "
                                                                  "requests per replica (target: --max-batch)")
    r.add_argument("--max-replicas", type=int, metavar="N")
    r.add_argument("--replica-cpus", type=float, metavar="C",
                   help="CPUs for each replica; its TVM threads (default: the cluster's CPUs / the most replicas)")
    r.add_argument("--no-prefix-routing", dest="prefix_routing", action="store_false",
                   help="send every request to the least loaded replica")
    p.set_defaults(func=cmd_serve)


def _add_devices(sub) -> None:
    p = sub.add_parser("devices", help="list the Vulkan adapters and CUDA GPUs this machine has",
                       description="List the GPUs artifacts can run on: Vulkan adapters (name, type, driver; "
                                   "Mesa's lavapipe is a CPU one) and CUDA GPUs (name, compute capability).")
    p.add_argument("--json", action="store_true", help="one JSON object")
    p.set_defaults(func=cmd_devices)


def _add_inspect(sub) -> None:
    p = sub.add_parser("inspect", help="what an artifact holds: functions, kernels per block, weights",
                       description="Show what was compiled: functions, kernels per block for prefill and decode "
                                   "(counted from a real run), weight bytes, dtype, target, schedule per kernel.")
    p.add_argument("artifact", help="artifact folder made by `gptj-tvm compile`")
    p.add_argument("--json", action="store_true", help="one JSON object (stable key: decode_kernels_per_block)")
    p.add_argument("--no-run", action="store_true",
                   help="count kernels from the compiled graph instead of a run (the default where the "
                        "artifact's device is missing)")
    p.set_defaults(func=cmd_inspect)


def _add_bench(sub) -> None:
    p = sub.add_parser("bench", help="prefill and decode speed, load time and peak RSS, next to the bandwidth bound; "
                                     "or two artifacts A/B, round by round",
                       description="Time an artifact here: prefill tokens/s (128- and 512-token prompts), decode "
                                   "ms/token at context 128 and 1024, load time, peak RSS, weight bytes, and the "
                                   "bound (the bytes a decode step reads, per kernel too, / read bandwidth "
                                   "measured in the same run). With two artifacts of one model (A B): both timed "
                                   "round by round in one process (or alternating processes where memory cannot "
                                   "hold both), a bandwidth read before each round, the ratio B/A per round and "
                                   "whether its range lets the difference be called.")
    p.add_argument("artifacts", nargs="+", metavar="ARTIFACT",
                   help="artifact folder made by `gptj-tvm compile`; two to compare them (A B)")
    p.add_argument("--rounds", type=int, default=5, help="A/B rounds (default 5)")
    p.add_argument("--json", action="store_true", help="one JSON object instead of the table")
    p.add_argument("--no-bandwidth", action="store_true", help="skip measuring the bandwidth (no bound)")
    p.set_defaults(func=cmd_bench)


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="a tiny random GPT-J, compiled for this CPU, generating",
                       description="Write a tiny random GPT-J, compile it for this CPU and generate text.")
    p.add_argument("--prompt", default="Once upon a time", help="default 'Once upon a time'")
    p.add_argument("--max-new-tokens", type=int, default=24, help="default 24")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    p.set_defaults(func=cmd_demo)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gptj-tvm", description="GPT-J compiled by Apache TVM.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_init_random, _add_compile, _add_convert_weights, _add_tune, _add_generate, _add_serve,
                _add_devices, _add_inspect, _add_bench, _add_demo):
        add(sub)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except GptjError as err:
        print(f"gptj-tvm {args.command}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"gptj-tvm {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
