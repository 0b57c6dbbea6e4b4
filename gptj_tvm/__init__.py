"""gptj-tvm: GPT-J compiled by Apache TVM.

    import gptj_tvm
    gen = gptj_tvm.load("ARTIFACT_DIR")
    out = gen.generate("Once upon a time", max_new_tokens=32, temperature=0)
"""

from .errors import GptjError

__version__ = "0.1.0"


def load(artifact_dir, device=None, adapter=None):
    """Load a compiled artifact and return a `Generator` (runtime only: no TVM compiler needed). `adapter`:
    which Vulkan adapter runs a Vulkan artifact (index or part of its name; default the first)."""
    from .runtime.engine import Generator  # noqa: PLC0415  (keep `import gptj_tvm` light)

    return Generator.load(artifact_dir, device=device, adapter=adapter)


__all__ = ["GptjError", "load", "__version__"]
