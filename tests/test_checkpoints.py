"""Checkpoints as users download them: pytorch_model.bin (single and sharded, written by torch.save itself),
stored mask buffers, float32/float16/bfloat16, added tokens, end markers, transformers' config quirks, and the
files that must be refused. References: the numpy GPT-J (reading the .bin with torch.load), transformers'
forward and tokenizer."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch writes the .bin fixtures (pip install -e '.[test]')")
transformers = pytest.importorskip("transformers", reason="transformers is the tokenizer reference")

import gptj_tvm  # noqa: E402
from gptj_tvm.core.errors import GptjError  # noqa: E402
from gptj_tvm.frontend.hf_tokenizer import packaged_tokenizer_dir  # noqa: E402
from gptj_tvm.compiler.compile import compile_model  # noqa: E402
from gptj_tvm.runtime.artifact import ArtifactMetadata  # noqa: E402
from reference import ReferenceGPTJ  # noqa: E402

TINY = dict(n_positions=64, n_embd=64, n_layer=2, n_head=4, rotary_dim=8)
EXTRA_TOKENS = {f"<|extratoken_{i}|>": 50256 + i for i in range(1, 144)}
DOLLY_TOKENS = {"### End": 50400, "### Instruction:": 50401, "### Response:": 50402}
TEXTS = ["Hello world", "### Instruction:\nWrite a poem about<|extratoken_5|> ### End, then <|endoftext|>.\n\n"
         "### Response:\n", "  <|extratoken_143|>x###  Response: héllo 🌍\n"]


def hf_config(vocab_size: int, **changes) -> dict:
    """A config.json as EleutherAI's main branch has it (transformers 4.18): unused keys, n_inner null, no
    torch_dtype."""
    config = {"architectures": ["GPTJForCausalLM"], "model_type": "gptj", "activation_function": "gelu_new",
              "vocab_size": vocab_size, **TINY, "n_inner": None, "layer_norm_epsilon": 1e-5,
              "bos_token_id": 50256, "eos_token_id": 50256, "rotary": True, "tie_word_embeddings": False,
              "task_specific_params": {"text-generation": {"do_sample": True, "max_length": 50}},
              "gradient_checkpointing": False, "transformers_version": "4.18.0.dev0"}
    config.update(changes)
    return {k: v for k, v in config.items() if v is not ...}


def state_dict(vocab_size: int, dtype, seed: int, mask_dtype=None) -> dict:
    """GPTJForCausalLM's tensors drawn by torch (large enough that attention is not uniform), and the mask
    buffers older transformers saved, in mask_dtype (None: none)."""
    generator = torch.Generator().manual_seed(seed)
    d, ff = TINY["n_embd"], 4 * TINY["n_embd"]

    def normal(*shape, scale=1.0):
        return (torch.randn(*shape, generator=generator) * scale).to(dtype)

    tensors = {"transformer.wte.weight": normal(vocab_size, d)}
    for i in range(TINY["n_layer"]):
        p = f"transformer.h.{i}."
        tensors.update({p + "ln_1.weight": 1 + normal(d, scale=0.3), p + "ln_1.bias": normal(d, scale=0.3)})
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            gain = 2.0 if proj in ("q_proj", "k_proj") else 1.0
            tensors[p + f"attn.{proj}.weight"] = normal(d, d, scale=gain / d ** 0.5)
        tensors.update({p + "mlp.fc_in.weight": normal(ff, d, scale=d ** -0.5),
                        p + "mlp.fc_in.bias": normal(ff, scale=0.2),
                        p + "mlp.fc_out.weight": normal(d, ff, scale=ff ** -0.5),
                        p + "mlp.fc_out.bias": normal(d, scale=0.2)})
        if mask_dtype is not None:
            n = TINY["n_positions"]
            tensors[p + "attn.bias"] = torch.tril(torch.ones(n, n)).to(mask_dtype)[None, None]
            tensors[p + "attn.masked_bias"] = torch.tensor(-1e9).to(dtype)
    tensors.update({"transformer.ln_f.weight": 1 + normal(d, scale=0.3),
                    "transformer.ln_f.bias": normal(d, scale=0.3),
                    "lm_head.weight": normal(vocab_size, d, scale=3 / d ** 0.5),
                    "lm_head.bias": normal(vocab_size, scale=0.2)})
    return tensors


def write_tokenizer(folder: Path, added: dict, specials: dict) -> None:
    shutil.copyfile(packaged_tokenizer_dir() / "encoder.json", folder / "vocab.json")
    shutil.copyfile(packaged_tokenizer_dir() / "vocab.bpe", folder / "merges.txt")
    items = list(added.items())
    random.Random(0).shuffle(items)  # the real file is not in id order
    (folder / "added_tokens.json").write_text(json.dumps(dict(items)))
    (folder / "special_tokens_map.json").write_text(json.dumps(specials))


def save_checkpoint(folder: Path, config: dict, tensors: dict, shards: int = 1) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config))
    if shards == 1:
        torch.save(tensors, folder / "pytorch_model.bin")
        return folder
    names = list(tensors)
    weight_map = {}
    for k in range(shards):
        file = f"pytorch_model-{k + 1:05d}-of-{shards:05d}.bin"
        part = names[k * len(names) // shards:(k + 1) * len(names) // shards]
        torch.save({n: tensors[n] for n in part}, folder / file)
        weight_map.update(dict.fromkeys(part, file))
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
    root = tmp_path_factory.mktemp("bin")
    eos = {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}
    # EleutherAI main: float32, one file, bool masks, added_tokens.json shuffled, no torch_dtype
    main = save_checkpoint(root / "gptj-main", hf_config(50400), state_dict(50400, torch.float32, 1, torch.bool))
    write_tokenizer(main, EXTRA_TOKENS, eos)
    # Pygmalion-like: float16 in two shards, uint8 masks, masked_bias -inf in float16
    f16 = state_dict(50400, torch.float16, 2, torch.uint8)
    f16 = {k: (torch.tensor(float("-inf"), dtype=torch.float16) if k.endswith("masked_bias") else v)
           for k, v in f16.items()}
    sharded = save_checkpoint(root / "sharded-f16", hf_config(50400, torch_dtype="float16", rotary=...), f16, 2)
    # Dolly: bfloat16, vocab 50403 with three special tokens; its lm_head favours `### End`, which must end
    # the generation
    dolly_tensors = state_dict(50403, torch.bfloat16, 3, torch.uint8)
    dolly_tensors["lm_head.bias"][50400] = 200.0
    dolly = save_checkpoint(root / "dolly", hf_config(50403, torch_dtype="bfloat16", pad_token_id=50256), dolly_tensors)
    write_tokenizer(dolly, {**EXTRA_TOKENS, **DOLLY_TOKENS},
                    {**eos, "pad_token": "<|endoftext|>", "additional_special_tokens": list(DOLLY_TOKENS)})
    # made by transformers with its defaults: eos 50256 outside a vocab of 1000
    small_config = transformers.GPTJConfig(vocab_size=1000, **TINY)
    small = root / "hf-small"
    small_config.save_pretrained(small)
    torch.manual_seed(4)
    torch.save(transformers.GPTJForCausalLM(small_config).state_dict(), small / "pytorch_model.bin")
    return {"main": main, "sharded": sharded, "dolly": dolly, "small": small}


@pytest.fixture(scope="module")
def compiled(fixtures, tmp_path_factory):
    cache = {}

    def make(name: str, dtype: str | None = "float32"):
        if (name, dtype) not in cache:
            out = tmp_path_factory.mktemp("art") / f"{name}-{dtype}"
            compile_model(fixtures[name], out, dtype=dtype, progress=False)
            cache[name, dtype] = out
        return cache[name, dtype]

    return make


@pytest.mark.parametrize("name", ["main", "sharded", "dolly", "small"])
def test_bin_checkpoint_logits_equal_the_numpy_reference(name, fixtures, compiled):
    gen = gptj_tvm.load(compiled(name))
    ids = [464, 10730, 29598, 318, 257, 1332, 13, 50256 % gen.vocab_size, 7][: gen.context]
    ids = [i % gen.vocab_size for i in ids]
    expected = ReferenceGPTJ(fixtures[name]).logits(ids)
    actual = gen.logits(ids)
    assert np.max(np.abs(actual - expected)) <= 1e-4 * np.max(np.abs(expected))


def test_bin_checkpoint_generates_what_transformers_generates(fixtures, compiled):
    model = transformers.GPTJForCausalLM.from_pretrained(fixtures["small"], dtype=torch.float32).eval()
    ids = [5, 17, 300, 999, 2]
    with torch.no_grad():
        expected = model(torch.tensor([ids])).logits[0].numpy()
        greedy = model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False, eos_token_id=None,
                                pad_token_id=0)[0, len(ids):].tolist()
    gen = gptj_tvm.load(compiled("small"))
    assert np.max(np.abs(gen.logits(ids) - expected)) <= 1e-4 * np.max(np.abs(expected))
    assert gen.generate(ids, max_new_tokens=8).ids == greedy


def test_dtype_defaults_to_the_weights_when_the_config_names_none(compiled):
    meta = ArtifactMetadata.read(compiled("main", None))
    assert meta.dtype == "float32" and meta.config.torch_dtype is None
    meta = ArtifactMetadata.read(compiled("sharded", None))
    assert meta.dtype == "float16"
    assert meta.source == {"format": "pytorch", "files": 2, "dtype": "float16", "ignored_buffers": 4,
                              "tokenizer": meta.source["tokenizer"]}


@pytest.mark.parametrize("name", ["main", "dolly"])
def test_tokenizer_gives_transformers_ids(name, fixtures, compiled):
    reference = transformers.AutoTokenizer.from_pretrained(fixtures[name])
    gen = gptj_tvm.load(compiled(name))
    for text in TEXTS:
        assert gen.tokenizer.encode(text) == reference(text)["input_ids"], text
    if name == "dolly":
        assert gen.tokenizer.encode("### Instruction:") == [50401]
    # added tokens decode to their text, special ones to nothing, ids nobody has to nothing
    assert gen.tokenizer.decode([464, 50300, 50256]) == "The<|extratoken_44|>"


def test_tokenizer_json_is_used_when_present(fixtures, compiled, tmp_path):
    folder = tmp_path / "with-tokenizer-json"
    shutil.copytree(fixtures["dolly"], folder)
    fast = transformers.AutoTokenizer.from_pretrained(fixtures["dolly"])
    fast.save_pretrained(folder)
    for extra in ("vocab.json", "merges.txt", "added_tokens.json"):
        (folder / extra).unlink(missing_ok=True)
    assert (folder / "tokenizer.json").is_file()
    out = tmp_path / "art"
    meta = compile_model(folder, out, dtype="float32", progress=False)
    assert meta.source["tokenizer"]["source"] == "tokenizer.json"
    gen = gptj_tvm.load(out)
    for text in TEXTS:
        assert gen.tokenizer.encode(text) == fast(text)["input_ids"]


@pytest.mark.parametrize("dtype", ["float32", None])  # None: Dolly's own bfloat16 (column-pair GEMMs)
def test_generation_ends_at_the_end_marker(compiled, dtype):
    gen = gptj_tvm.load(compiled("dolly", dtype))
    assert gen.meta.dtype == (dtype or "bfloat16")
    assert 50400 in gen.stop_token_ids and 50256 in gen.stop_token_ids
    out = gen.generate("### Instruction:\nSay hi\n\n### Response:\n", max_new_tokens=8)
    assert out.ids == [50400] and out.finish_reason == "eos" and out.text == ""


def test_generation_config_eos_list_adds_stop_ids(fixtures, tmp_path):
    folder = tmp_path / "gen-config"
    shutil.copytree(fixtures["small"], folder)
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 50256, 12]}))
    meta = compile_model(folder, tmp_path / "art", dtype="float32", progress=False, weights=False)
    assert meta.stop_token_ids == [7, 12]  # 50256 is outside the vocab of 1000: it never comes out


def test_eos_outside_the_vocab_is_a_warning(fixtures, tmp_path, capsys):
    from gptj_tvm.cli import main

    code = main(["compile", str(fixtures["small"]), "-o", str(tmp_path / "art"), "--no-weights", "--quiet"])
    assert code == 0
    err = capsys.readouterr().err
    assert "warning: config.json: eos_token_id 50256 is outside the vocab" in err and "Traceback" not in err


def test_gptj_model_without_lm_head_is_refused(tmp_path):
    config = transformers.GPTJConfig(vocab_size=1000, **TINY)
    config.save_pretrained(tmp_path / "base")
    torch.save(transformers.GPTJModel(config).state_dict(), tmp_path / "base" / "pytorch_model.bin")
    with pytest.raises(GptjError, match="no LM head .*GPTJModel"):
        compile_model(tmp_path / "base", tmp_path / "art", progress=False)
    assert not (tmp_path / "art").exists()


def test_a_pickle_that_runs_code_is_refused_and_runs_nothing(fixtures, tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    folder = tmp_path / "evil"
    shutil.copytree(fixtures["small"], folder)
    tensors = torch.load(folder / "pytorch_model.bin", weights_only=True)
    tensors["lm_head.bias"] = Payload()
    torch.save(tensors, folder / "pytorch_model.bin")
    result = subprocess.run([sys.executable, "-m", "gptj_tvm.cli", "compile", str(folder), "-o",
                             str(tmp_path / "art"), "--quiet"], capture_output=True, text=True)
    assert result.returncode != 0 and not marker.exists() and not (tmp_path / "art").exists()
    lines = [line for line in result.stderr.strip().splitlines() if not line.startswith("warning: ")]
    assert len(lines) == 1 and "pytorch_model.bin" in lines[0] and "posix.system" in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def test_legacy_torch_format_is_refused_in_one_line(fixtures, tmp_path):
    folder = tmp_path / "legacy"
    shutil.copytree(fixtures["small"], folder)
    tensors = torch.load(folder / "pytorch_model.bin", weights_only=True)
    torch.save(tensors, folder / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    with pytest.raises(GptjError, match="legacy format"):
        compile_model(folder, tmp_path / "art", progress=False)


def test_rotary_dim_past_the_head_is_refused(fixtures, tmp_path):
    folder = tmp_path / "rotary"
    shutil.copytree(fixtures["small"], folder, ignore=shutil.ignore_patterns("*.bin"))
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "rotary_dim": 64}))  # head_dim 16
    with pytest.raises(GptjError, match="rotary_dim 64 is larger than the head"):
        compile_model(folder, tmp_path / "art", progress=False, weights=False)


def test_compile_and_generate_without_torch(fixtures, tmp_path):
    """torch present but unimportable: the .bin reader and the runtime need none of it."""
    blocker = tmp_path / "blocker" / "torch"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('torch is blocked in this test')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "blocker"), os.environ.get("PYTHONPATH", "")])}
    art = tmp_path / "art"
    result = subprocess.run([sys.executable, "-m", "gptj_tvm.cli", "compile", str(fixtures["main"]), "-o", str(art)],
                            capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    assert ("read pytorch weights (1 file, float32), 4 stored mask buffers ignored; tokenizer from vocab.json + "
            "merges.txt, 143 added tokens") in result.stdout
    result = subprocess.run([sys.executable, "-c", "import sys, gptj_tvm; g = gptj_tvm.load(sys.argv[1]); "
                             "print(g.generate([464, 50300], max_new_tokens=3).ids); print('torch' in sys.modules)",
                             str(art)], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    ids, torch_loaded = result.stdout.strip().splitlines()
    assert len(json.loads(ids)) == 3 and torch_loaded == "False"


def test_init_random_writes_what_torch_reads(tmp_path):
    from gptj_tvm.cli import main
    from safetensors.numpy import load_file

    args = ["--preset", "tiny", "--layers", "1", "--dtype", "bfloat16", "--seed", "5", "--quiet"]
    assert main(["init-random", str(tmp_path / "st"), *args]) == 0
    assert main(["init-random", str(tmp_path / "pt"), *args, "--format", "pytorch", "--shard-mb", "2"]) == 0
    index = json.loads((tmp_path / "pt" / "pytorch_model.bin.index.json").read_text())
    ours = {}
    for file in sorted(set(index["weight_map"].values())):
        ours.update(torch.load(tmp_path / "pt" / file, weights_only=True))
    expected = load_file(str(tmp_path / "st" / "model.safetensors"))
    assert set(ours) == set(expected) | {"transformer.h.0.attn.bias", "transformer.h.0.attn.masked_bias"}
    for name, array in expected.items():
        assert ours[name].dtype == torch.bfloat16
        assert np.array_equal(ours[name].view(torch.int16).numpy(), array.view(np.int16)), name
    assert ours["transformer.h.0.attn.bias"].dtype == torch.bool
