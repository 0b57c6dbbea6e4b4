"""Generation behaviour: sampling, seeds, stop strings, eos, streaming, context, the CLI's generate."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

import gptj_tvm
from gptj_tvm.cli import main
from gptj_tvm.core.errors import GptjError

PROMPT = "Once upon a time"


def test_seeded_sampling_is_reproducible(generator):
    gen = generator("tiny")
    options = dict(max_new_tokens=12, temperature=1.0, top_k=50, top_p=0.9)
    first = gen.generate(PROMPT, seed=7, **options)
    again = gen.generate(PROMPT, seed=7, **options)
    other = gen.generate(PROMPT, seed=8, **options)
    assert first.ids == again.ids and first.text == again.text
    assert first.ids != other.ids
    greedy = gen.generate(PROMPT, max_new_tokens=12, temperature=0)
    assert first.ids != greedy.ids


def test_top_k_one_is_greedy(generator):
    gen = generator("tiny")
    greedy = gen.generate(PROMPT, max_new_tokens=8, temperature=0)
    assert gen.generate(PROMPT, max_new_tokens=8, temperature=1.5, top_k=1, seed=3).ids == greedy.ids


def test_stream_pieces_join_to_the_text(generator):
    gen = generator("tiny")
    stream = gen.stream(PROMPT, max_new_tokens=16)
    pieces = list(stream)
    assert len(pieces) > 1
    assert "".join(pieces) == stream.result.text == gen.generate(PROMPT, max_new_tokens=16).text


def test_stop_string_ends_generation_before_it(generator):
    gen = generator("tiny")
    full = gen.generate(PROMPT, max_new_tokens=16).text
    stop = full[len(full) // 2: len(full) // 2 + 3]
    out = gen.generate(PROMPT, max_new_tokens=16, stop=[stop, "never appears \x00"])
    assert out.finish_reason == "stop"
    assert out.text == full[: full.index(stop)]
    assert "".join(gen.stream(PROMPT, max_new_tokens=16, stop=[stop])) == out.text


def test_eos_ends_generation(artifact, tmp_path):
    folder = tmp_path / "eos-artifact"
    shutil.copytree(artifact("tiny"), folder)
    greedy = gptj_tvm.load(folder).generate(PROMPT, max_new_tokens=10).ids
    meta = json.loads((folder / "metadata.json").read_text())
    meta["stop_token_ids"] = [greedy[3]]  # a runtime setting: make the 4th greedy token the eos
    (folder / "metadata.json").write_text(json.dumps(meta))
    out = gptj_tvm.load(folder).generate(PROMPT, max_new_tokens=10)
    assert out.finish_reason == "eos"
    assert out.ids == greedy[: greedy.index(greedy[3]) + 1]


def test_generation_stops_at_the_context(generator):
    gen = generator("odd")  # n_positions 40
    out = gen.generate(list(range(30)), max_new_tokens=50)
    assert len(out.ids) == 10 and out.finish_reason in ("context", "eos")


def test_ids_the_tokenizer_lacks_decode_without_error(generator):
    gen = generator("tiny")
    assert gen.tokenizer.decode([50300, 464, 50399]) == gen.tokenizer.decode([464])


def test_prompt_past_the_context_is_refused(generator):
    gen = generator("tiny")
    with pytest.raises(GptjError, match="past the model's context"):
        gen.generate(list(range(gen.context + 1)), max_new_tokens=1)


def test_cli_generate_json(artifact, capsys):
    assert main(["generate", str(artifact("tiny")), "--prompt", PROMPT, "--max-new-tokens", "6", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) >= {"prompt_ids", "output_ids", "text", "prefill_tokens_per_s", "decode_tokens_per_s"}
    assert out["prompt_ids"] == gptj_tvm.load(artifact("tiny")).tokenizer.encode(PROMPT)
    assert len(out["output_ids"]) == 6 and out["decode_tokens_per_s"] > 0


def test_cli_generate_streams_the_same_text(artifact, capsys):
    expected = gptj_tvm.load(artifact("tiny")).generate([464, 10730], max_new_tokens=8).text
    assert main(["generate", str(artifact("tiny")), "--prompt-ids", "464,10730", "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out == expected + "\n"


def test_a_cache_too_small_for_the_tokens_is_refused(generator):
    gen = generator("tiny")
    cache = gen.new_cache(4)
    assert int(cache[0].shape[0]) == 4
    logits, cache = gen.forward("prefill", [1, 2, 3, 4], cache, 4)
    with pytest.raises(GptjError, match="do not fit a KV cache of 4 positions"):
        gen.forward("decode", [5], cache, 5)


def test_load_runs_on_every_core_the_process_may_use(artifact):
    """The Python API, not only the CLI: TVM alone would start half the cores' threads (one, on 2 cores)."""
    code = ("import sys, psutil, gptj_tvm; gptj_tvm.load(sys.argv[1]).generate([1, 2, 3], max_new_tokens=4); "
            "print(psutil.Process().num_threads())")
    env = {k: v for k, v in os.environ.items() if k != "TVM_NUM_THREADS"}

    def threads(**extra) -> int:
        done = subprocess.run([sys.executable, "-c", code, str(artifact("tiny"))], capture_output=True, text=True,
                              env={**env, **extra}, check=True)
        return int(done.stdout.strip().splitlines()[-1])

    # TVM's pool: the calling thread and one worker per further thread
    assert threads() - threads(TVM_NUM_THREADS="1") == len(os.sched_getaffinity(0)) - 1
