"""Issue 20 item 2: the static-shape path's memory, planned from ECHO_MAX_ACTIVE before warm-up.

The plan is checked against the one measurement there is (H100 80 GB, 2026-11-22, the static shapes
of that day: speaker keys padded to 1600): 16 streams (48 rows) with CUDA graphs peaked at 52 GiB,
24 streams (72 rows) did not fit in 79 GiB. That runner held each of a stream's 3 CFG rows' padded
keys twice; today's pool holds one row of each kind of conditioning per stream, once, so what it says
of 64 streams is a prediction until a GPU measures it. The plan against the actual allocation is checked on the
emulated CUDA path (tests/test_cuda_emulation.py)."""

import dataclasses
import gc
import logging
import weakref

import pytest
import torch

import simulate as sim
from autoencoder import build_ae
from batched_steps import StaticShapes, StaticSteps, row_buckets, zero_kv
from inference import Conditioning, SamplerSettings
from runtime import DECODE_BYTES_PER_FRAME, GIB, MemoryPlan, MemoryTooSmall, check_memory, decode_peak, memory_plan
from settings import load_settings

H100_CAPACITY = 79 * GIB  # what the 2026-11-22 run could use
CUDA = torch.device("cuda", 0)


def plans(speaker_buckets: tuple[int, ...], streams: tuple[int, ...]) -> dict[int, MemoryPlan]:
    """Plans of the full-size bf16 DiT with the float32 decoder, at the default preset's frame
    buckets, with CUDA graphs (the default on CUDA)."""
    model = sim.full_model()
    with torch.device("meta"):
        fish = build_ae()
    loaded = sum(p.numel() for p in model.parameters()) * 2 + sum(p.numel() for p in fish.parameters()) * 4
    out = {}
    for n in streams:
        shapes = StaticShapes.covering((32, 128, 480), 3 * n, max_speaker_latent_length=4 * speaker_buckets[-1])
        shapes = dataclasses.replace(shapes, speaker_buckets=speaker_buckets)
        settings = load_settings(max_active=n, compile=True)  # (the default on CUDA)
        out[n] = memory_plan(settings, model, StaticSteps(model, shapes, cuda_graphs=True), loaded)
    return out


@pytest.fixture(scope="module")
def h100_plans():
    """At the shapes of 2026-11-22: speaker keys padded to 1600 for every row."""
    return plans((1600,), (16, 24, 64, 128))


def test_the_plan_agrees_with_what_the_h100_held(h100_plans):
    """The runner of 2026-11-22 held each stream's padded keys twice (stacked, then copied into
    inductor's graph inputs), 3 rows a stream: at twice those bytes a plan says the 52 GiB that 16
    streams peaked at, and more than the device for the 24 that did not fit. Today's pool holds one
    row of each kind a stream, once (plus a stream's own keys, and the largest pass's peak that the
    graphs keep): PREDICTED, 24 now fit with room to spare."""
    model = sim.full_model()
    pool = StaticShapes((32, 128, 480, 640), row_buckets(48), 160, 768, (1600,)).stacked_bytes(model, 3)
    sixteen, twenty_four = h100_plans[16], h100_plans[24]
    assert MemoryPlan(sixteen.loaded, 2 * pool, 16).need == pytest.approx(52 * GIB, rel=0.05)
    assert MemoryPlan(sixteen.loaded, 2 * pool, 24).need > 0.9 * H100_CAPACITY  # (+ the decoder: did not fit)
    assert sixteen.need < 0.5 * 52 * GIB and twenty_four.worst <= H100_CAPACITY  # 2026-12-06: 25.3 GiB; 34.1


def test_64_streams_with_voices_up_to_30_s_fit_an_80_gb_h100_with_the_decoder(caplog):
    """Issue 20 item 2's target, predicted: 64 streams of the default preset, speaker keys of voices up
    to 30 s (ECHO_MAX_SPEAKER_LATENT_LENGTH=640), the largest pass (kept by the CUDA graphs)
    and the decoder's largest batch: within the 79 GiB the H100 run could use."""
    sixty_four = plans((160,), (64,))[64]
    assert sixty_four.worst <= H100_CAPACITY  # 2026-12-07: 36.9 GiB needed, 40.3 at worst
    with caplog.at_level(logging.INFO, logger="runtime"):
        check_memory(sixty_four, CUDA, capacity=H100_CAPACITY)
    assert "may run out of memory" not in caplog.text


def test_64_streams_of_5_minute_voices_fit_with_the_compiled_decoders_pieces(h100_plans, caplog):
    """With the default 5-minute voices, each stream a voice of its own: 64 streams fit, the largest
    pass and the decoder included, because the compiled streaming decoder (the default on CUDA)
    decodes every block in pieces of the first block's 32 frames, so its largest call holds 64 x 32
    frames, not the 8192 an eager call may. What does not fit is every one of them also scaling its
    voice's keys (speaker_kv_scale: a copy each): the log says so, naming what stays within it."""
    sixty_four = h100_plans[64]
    unscaled = dataclasses.replace(sixty_four, scaled_speaker=0)
    assert sixty_four.decode_peak == 64 * 32 * DECODE_BYTES_PER_FRAME
    assert sixty_four.need <= unscaled.worst <= H100_CAPACITY < sixty_four.worst  # 2026-12-07: 74.9, 76.4, 95.2 GiB
    with caplog.at_level(logging.INFO, logger="runtime"):
        check_memory(unscaled, CUDA, capacity=H100_CAPACITY)
    assert "may run out of memory" not in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="runtime"):
        check_memory(sixty_four, CUDA, capacity=H100_CAPACITY)
    safe = sixty_four.streams_that_fit(H100_CAPACITY, worst=True)
    assert "may run out of memory" in caplog.text and f"ECHO_MAX_ACTIVE={safe} or lower" in caplog.text
    assert "speaker_kv_scale" in caplog.text
    assert 32 < safe < 64  # 2026-12-07: 50
    assert dataclasses.replace(sixty_four, streams=safe).worst <= H100_CAPACITY
    assert dataclasses.replace(sixty_four, streams=safe + 1).worst > H100_CAPACITY

    eager_peak = decode_peak(load_settings(max_active=64, compile=False))
    eager_decoder = dataclasses.replace(unscaled, decode_peak=eager_peak)
    assert unscaled.need == eager_decoder.need <= H100_CAPACITY < eager_decoder.worst  # 80.9 at worst
    assert 48 < eager_decoder.streams_that_fit(H100_CAPACITY, worst=True) < 64  # 2026-12-06: 61


def test_the_plan_holds_the_scaled_copy_a_speaker_kv_scale_request_makes():
    """A request with speaker_kv_scale holds a scaled copy of its voice's keys and values beside the
    voice's own (the sampler's Conditioning): the plan's worst case counts it for every stream, at
    the longest voice and every layer, which is exactly what the copy of such a voice takes."""
    model = sim.full_model()
    shapes = StaticShapes.covering((32, 128, 480), 8)
    like = torch.empty(0, device=model.device, dtype=model.dtype)
    voice = zero_kv(model, 1, shapes.speaker_patches, like)
    text = zero_kv(model, 1, shapes.text_tokens, like)
    speaker_mask = torch.ones(1, 4 * shapes.speaker_patches, dtype=torch.bool, device=model.device)
    text_mask = torch.ones(1, shapes.text_tokens, dtype=torch.bool, device=model.device)

    def copied(**scaling) -> int:
        settings = SamplerSettings(num_steps=8, cfg_scale_text=3.0, cfg_scale_speaker=8.0, cfg_min_t=0.5,
                                   cfg_max_t=1.0, **scaling)
        held = Conditioning(model, None, speaker_mask, None, text_mask, settings, kv_speaker=voice,
                            kv_text=text).kv_speaker[True]
        own = {t.untyped_storage()._cdata for pair in voice for t in pair}
        return sum(t.untyped_storage().nbytes() for pair in held for t in pair
                   if t.untyped_storage()._cdata not in own)

    assert copied() == 0
    assert copied(speaker_kv_scale=1.5) == shapes.scaled_speaker_bytes(model) > 0
    assert copied(speaker_kv_scale=1.5, speaker_kv_max_layers=6) == shapes.scaled_speaker_bytes(model) // 4
    settings = load_settings(max_active=64, compile=True)
    plan = memory_plan(settings, model, StaticSteps(model, shapes, cuda_graphs=True), loaded=0)
    assert plan.worst - dataclasses.replace(plan, scaled_speaker=0).worst == 64 * shapes.scaled_speaker_bytes(model)


def test_generations_of_one_voice_and_scaling_hold_one_scaled_copy_while_any_needs_it():
    """The plan's worst case is every stream a voice of its own; streams (and a stream's text
    chunks) of one voice and one speaker_kv_scale share one copy, which goes with its last holder."""
    model = sim.full_model()
    like = torch.empty(0, device=model.device, dtype=model.dtype)
    voice, other_voice, text = (zero_kv(model, 1, n, like) for n in (160, 160, 64))
    masks = (torch.ones(1, 640, dtype=torch.bool, device=model.device),
             torch.ones(1, 64, dtype=torch.bool, device=model.device))

    def scaled(of: list, scale: float) -> list:
        settings = SamplerSettings(num_steps=8, cfg_scale_text=3.0, cfg_scale_speaker=8.0, cfg_min_t=0.5,
                                   cfg_max_t=1.0, speaker_kv_scale=scale)
        conditioning = Conditioning(model, None, masks[0], None, masks[1], settings, kv_speaker=of, kv_text=text)
        return conditioning.kv_speaker[True]

    def same(a: list, b: list) -> bool:
        return len(a) == len(b) and all(x is y for pair, other in zip(a, b) for x, y in zip(pair, other))

    first = scaled(voice, 1.5)
    assert same(scaled(voice, 1.5), first)
    assert not same(scaled(voice, 2.0), first) and not same(scaled(other_voice, 1.5), first)
    assert first[0][0] is not voice[0][0] and first[-1][0] is not voice[-1][0]  # (a copy of every layer)
    assert type(first) is list  # (what a compiled sampler's guards expect)
    gone = weakref.ref(first[0][0])
    del first
    gc.collect()
    assert gone() is None


def test_a_setting_that_cannot_fit_stops_loading_naming_what_would(h100_plans):
    """With 5-minute voices allowed, every stream's speaker keys pad to 1600: 128 streams do not fit."""
    too_many = h100_plans[128]
    with pytest.raises(MemoryTooSmall) as refused:
        check_memory(too_many, CUDA, capacity=H100_CAPACITY)
    fit, safe = too_many.streams_that_fit(H100_CAPACITY), too_many.streams_that_fit(H100_CAPACITY, worst=True)
    assert 32 < safe < fit < 128  # 2026-12-07: 42 (every stream scaling a 5-minute voice of its own) and 59
    message = str(refused.value)
    assert message.startswith("ECHO_MAX_ACTIVE=128 needs at least") and f"set ECHO_MAX_ACTIVE={fit} or lower" in message
    assert f"ECHO_MAX_ACTIVE={safe} or lower stays within the worst case" in message
    assert message.endswith("or lower ECHO_MAX_SPEAKER_LATENT_LENGTH")


def test_a_device_too_small_for_one_stream_is_told_to_leave_static_shapes():
    plan = MemoryPlan(loaded=10 * GIB, per_stream=4 * GIB, streams=2)
    with pytest.raises(MemoryTooSmall, match="even one stream does not fit: use the eager path, ECHO_COMPILE=0 and ECHO_STATIC_SHAPES=0"):
        check_memory(plan, CUDA, capacity=12 * GIB)
