"""The compiled model against the independent numpy GPT-J (tests/reference.py)."""

from __future__ import annotations

import numpy as np
import pytest

from reference import ReferenceGPTJ, rel_max_error

PROMPT = [464, 10730, 29598, 11, 290, 262, 2068, 7586, 21831, 3, 99, 12000, 50256, 17]
# of 14 positions; bfloat16 keeps 8 bits of mantissa
TOP1_AGREEMENT = {"float16": 0.9, "bfloat16": 0.75, "odd-bf16": 0.75}
TOLERANCE = {"tiny": 1e-4, "wide": 1e-4, "odd": 1e-4, "float16": 5e-3, "bfloat16": 2e-2, "odd-bf16": 2e-2}


def prompt_for(generator) -> list[int]:
    return [i % generator.vocab_size for i in PROMPT]


# "gpu-on-cpu" is the CUDA artifact's graph ([out, in] weights, tir_kernels/gpu_attention.py) compiled for this CPU:
# these tests check the GPU kernels' math where no GPU is (tests/test_cuda.py checks what is built for one).
# "vulkan" is the `--target vulkan` artifact running on a Vulkan driver (lavapipe, on this CPU, in CI).
@pytest.mark.parametrize("name,variant", [("tiny", "cpu"), ("wide", "cpu"), ("odd", "cpu"), ("float16", "cpu"),
                                          ("bfloat16", "cpu"), ("odd-bf16", "cpu"), ("tiny", "gpu-on-cpu"),
                                          ("wide", "gpu-on-cpu"), ("odd", "gpu-on-cpu"), ("float16", "gpu-on-cpu"),
                                          ("tiny", "vulkan"), ("wide", "vulkan"), ("odd", "vulkan"),
                                          ("float16", "vulkan")])
def test_logits_at_every_position_match_reference(name, variant, generator, reference):
    gen = generator(name, variant=variant)
    ids = prompt_for(gen)
    actual = gen.logits(ids)
    expected = reference(name).logits(ids)
    assert actual.dtype == np.float32 and actual.shape == (len(ids), gen.vocab_size)
    assert rel_max_error(actual, expected) < TOLERANCE[name]
    if name in TOP1_AGREEMENT:  # half precision still ranks the tokens like the exact model
        assert np.mean(actual.argmax(-1) == expected.argmax(-1)) >= TOP1_AGREEMENT[name]


def test_sharded_checkpoint_gives_the_same_logits(generator, reference, checkpoint):
    sharded = checkpoint("tiny", shard_bytes=1 << 20)
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("model-*-of-*.safetensors"))) > 2
    ids = prompt_for(generator("tiny"))
    actual = generator("tiny", shard_bytes=1 << 20).logits(ids)
    assert rel_max_error(actual, ReferenceGPTJ(sharded).logits(ids)) < 1e-4


@pytest.mark.parametrize("variant", ["cpu", "gpu-on-cpu", "vulkan"])
@pytest.mark.parametrize("name", ["tiny", "wide", "odd"])
def test_decode_step_by_step_equals_recomputation(name, variant, generator, reference):
    gen = generator(name, variant=variant)
    ids = prompt_for(gen)
    expected = reference(name).logits(ids)
    logits, cache = gen.forward("prefill", ids[:5], gen.new_cache(), 5)
    assert logits.shape == (1, gen.vocab_size)
    assert rel_max_error(logits[0], expected[4]) < 1e-4
    for n in range(5, len(ids)):
        logits, cache = gen.forward("decode", [ids[n]], cache, n + 1)
        assert rel_max_error(logits[0], expected[n]) < 1e-4, f"step {n}"
    # a second prefill chunk on top of a cache (positions continue, mask offset)
    logits, cache = gen.forward("prefill_all", ids[:6], gen.new_cache(), 6)
    logits, cache = gen.forward("prefill_all", ids[6:], cache, len(ids))
    assert rel_max_error(logits, expected[6:]) < 1e-4


@pytest.mark.parametrize("name,length,pieces", [("tiny", 75, [32, 32, 11]), ("wide", 64, [32, 32]),
                                                ("odd", 40, [32, 8])])
def test_long_prompts_prefill_in_chunks_of_the_static_buckets(name, length, pieces, generator, reference):
    """CPU artifacts get a static prefill_B for each default bucket up to the context (32 and 128): a prompt
    runs as the largest buckets that fit, then the dynamic prefill; the logits are those of one prefill."""
    gen = generator(name)
    assert set(gen.meta.prefill_buckets) == {str(b) for b in (32, 128) if b <= gen.context}
    assert [p for _, p in gen._prefill_pieces(length)] == pieces
    ids = [int(i) for i in np.random.default_rng(7).integers(0, gen.vocab_size, length)]
    expected = reference(name).logits(ids)
    logits, _ = gen.forward("prefill", ids, gen.new_cache(length), length)
    assert rel_max_error(logits[0], expected[-1]) < 1e-4


@pytest.mark.parametrize("variant", ["cpu", "gpu-on-cpu", "vulkan"])
@pytest.mark.parametrize("name", ["tiny", "wide"])
def test_greedy_generation_equals_numpy_greedy(name, variant, generator, reference):
    gen = generator(name, variant=variant)
    ids = prompt_for(gen)[:6]
    out = gen.generate(ids, max_new_tokens=10, temperature=0)
    expected = reference(name).greedy(ids, 10)
    ends = [i for i, token in enumerate(expected) if token in gen.stop_token_ids]
    stop_at = ends[0] + 1 if ends else len(expected)
    assert out.ids == expected[:stop_at]
    assert out.prompt_ids == ids


def test_reference_is_sensitive_to_the_rotary_layout(checkpoint, monkeypatch):
    """The random checkpoints make the rotary matter: NeoX's layout (dim i paired with i + rotary_dim / 2,
    instead of 2i with 2i + 1) changes the logits, so the comparison above can catch it."""
    import reference as ref_module

    ref = ReferenceGPTJ(checkpoint("wide"))
    ids = PROMPT[:8]
    good = ref.logits([i % 1000 for i in ids])

    def rotate_half(x, positions, rotary_dim):
        half = rotary_dim // 2
        perm = np.stack([np.arange(half), np.arange(half, rotary_dim)], axis=1).reshape(-1)
        moved = x.copy()
        moved[..., :rotary_dim] = x[..., perm]
        out = original(moved, positions, rotary_dim)
        back = out.copy()
        back[..., perm] = out[..., :rotary_dim]
        return back

    original = ref_module.rotate_every_two
    monkeypatch.setattr(ref_module, "rotate_every_two", rotate_half)
    neox = ref.logits([i % 1000 for i in ids])
    assert rel_max_error(neox, good) > 1e-2
