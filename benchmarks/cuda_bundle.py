"""Prepare what a GPU machine needs to run benchmarks/cuda_device.py: built here, carried there.

    python benchmarks/cuda_bundle.py [--arch sm_90] [--out .device]

The GPU machine has no package registry and no room for TVM's compiler (a call carries 64 MiB), so this writes
into OUT (ignored by git; carry it):
  site/      this project's package (gptj_tvm, assembled as setup.cfg maps it), TVM's runtime only (the wheel's
             Python package without libtvm_compiler.so) and apache-tvm-ffi unpacked for that machine's Python
             3.12; numpy, safetensors, tokenizers, ml_dtypes and tqdm are installed there already
  tiny/ full4/ gptj-6b/
             float16 CUDA artifacts compiled with --no-weights for ARCH; the device script makes the random
             checkpoints there (init-random) and adds their weights with convert-weights
Then, with the device tool:  carry [".device"], command
  PYTHONPATH=.device/site TVM_USE_RUNTIME_LIB=1 PYTHONUNBUFFERED=1 \\
      python3 benchmarks/cuda_device.py --bundle .device --out $OUT
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import tvm

from gptj_tvm.frontend.config import PRESETS
from gptj_tvm.frontend.random_checkpoint import make_config
from gptj_tvm.compiler.compile import compile_model

TVM_FFI = "apache-tvm-ffi==0.1.14.post1"
DEVICE_PYTHON = "3.12"
MODELS = {"tiny": make_config("tiny", None, "float16"), "full4": make_config("gptj-6b", 4, "float16"),
          "gptj-6b": make_config("gptj-6b", None, "float16")}


REPO = Path(__file__).resolve().parents[1]
SUBPACKAGES = ("frontend", "ir", "schedules", "targets", "runtime")  # setup.cfg's package_dir


def project_package(site: Path) -> None:
    skip = shutil.ignore_patterns("__pycache__")
    shutil.copytree(REPO / "gptj_tvm", site / "gptj_tvm", dirs_exist_ok=True, ignore=skip)
    for name in SUBPACKAGES:
        shutil.copytree(REPO / name, site / "gptj_tvm" / name, dirs_exist_ok=True, ignore=skip)


def runtime_only_tvm(site: Path) -> None:
    shutil.copytree(Path(tvm.__file__).parent, site / "tvm", dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("libtvm_compiler.so", "3rdparty", "include", "src", "__pycache__"))
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                        "--python-version", DEVICE_PYTHON, "--implementation", "cp", "--platform",
                        "manylinux_2_28_x86_64", "--platform", "manylinux_2_17_x86_64", "-d", tmp, TVM_FFI],
                       check=True)
        for wheel in Path(tmp).glob("*.whl"):
            with zipfile.ZipFile(wheel) as archive:
                archive.extractall(site)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="sm_90", help="the GPU's arch (H100 and H200: sm_90)")
    parser.add_argument("--out", default=".device")
    args = parser.parse_args()
    out = Path(args.out)
    project_package(out / "site")
    runtime_only_tvm(out / "site")
    with tempfile.TemporaryDirectory() as tmp:
        for name, config in MODELS.items():
            source = Path(tmp) / name
            source.mkdir()
            (source / "config.json").write_text(json.dumps(config.to_dict()))
            meta = compile_model(source, out / name, target="cuda", arch=args.arch, weights=False, progress=False)
            print(f"{name}: library {meta.compile_timings['library_s']:.1f} s")
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"{out}: {size / 2**20:.1f} MiB to carry (tiny preset: {PRESETS['tiny'].n_layer} layers)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
