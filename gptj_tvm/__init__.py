"""gptj-tvm: GPT-J compiled by Apache TVM.

    import gptj_tvm
    gen = gptj_tvm.load("ARTIFACT_DIR")
    out = gen.generate("Once upon a time", max_new_tokens=32, temperature=0)
"""

import os

from .core.errors import GptjError

__version__ = "0.1.0"


def default_threads() -> int:
    """Every core this process may use: TVM's CPU runtime would take half of them (to skip hyper-threads),
    which on a 2-core machine is one thread."""
    return len(os.sched_getaffinity(0))


# TVM's thread pool reads TVM_NUM_THREADS when it first runs a parallel kernel, so setting the default when the
# package is imported covers the CLI, the Python API (load) and the benchmarks alike; a value set by the user wins.
os.environ.setdefault("TVM_NUM_THREADS", str(default_threads()))
# tokenizers' encode_batch (the server's way to tokenize off the event loop) would run on its rayon pool, whose
# workers spin after each batch on the cores TVM's threads decode on: streamed requests took 1.07x as long
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def load(artifact_dir, device=None, adapter=None, verify=False):
    """Load a compiled artifact and return a `Generator` (runtime only: no TVM compiler needed). `adapter`:
    which Vulkan adapter runs a Vulkan artifact (index or part of its name; default the first); `verify`: check
    the weights' sha256 against what compile recorded (sizes, and the library's and tokenizer's sha256, are
    always checked)."""
    from .runtime.generator import Generator  # keep `import gptj_tvm` light

    return Generator.load(artifact_dir, device=device, adapter=adapter, verify=verify)


__all__ = ["GptjError", "default_threads", "load", "__version__"]
