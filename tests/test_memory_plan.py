"""Issue 20 item 2: the static-shape path's memory, planned from ECHO_MAX_ACTIVE before warm-up.

The plan is checked against the one measurement there is (H100 80 GB, 2026-11-22, the static shapes
of that day: speaker keys padded to 1600): 16 streams (48 rows) with CUDA graphs peaked at 52 GiB,
24 streams (72 rows) did not fit in 79 GiB. The plan against the actual allocation is checked on the
emulated CUDA path (tests/test_cuda_emulation.py)."""

import logging

import pytest
import torch

import simulate as sim
from autoencoder import build_ae
from batched_steps import StaticShapes, StaticSteps, row_buckets
from runtime import GIB, MemoryPlan, MemoryTooSmall, check_memory, memory_plan
from settings import load_settings

H100_CAPACITY = 79 * GIB  # what the 2026-11-22 run could use
CUDA = torch.device("cuda", 0)


@pytest.fixture(scope="module")
def h100_plans():
    """Plans of the full-size bf16 DiT with the float32 decoder, at the 2026-11-22 shapes, with CUDA graphs."""
    model = sim.full_model()
    with torch.device("meta"):
        fish = build_ae()
    loaded = sum(p.numel() for p in model.parameters()) * 2 + sum(p.numel() for p in fish.parameters()) * 4
    shapes = StaticShapes((32, 128, 480, 640), row_buckets(48), 160, 768, (1600,))
    steps = StaticSteps(model, shapes, cuda_graphs=True)
    return {n: memory_plan(load_settings(max_active=n), model, steps, loaded=loaded) for n in (16, 24, 32)}


def test_the_plan_agrees_with_what_the_h100_held(h100_plans, caplog):
    """16 streams peaked at 52 GiB: the least the plan says they need. 24 did not fit: the plan lets
    them start but warns that under load they may not fit, and names what stays within its worst case."""
    sixteen, twenty_four = h100_plans[16], h100_plans[24]
    assert sixteen.need == pytest.approx(52 * GIB, rel=0.05)
    assert sixteen.need < twenty_four.need <= H100_CAPACITY < twenty_four.worst
    with caplog.at_level(logging.WARNING, logger="runtime"):
        check_memory(twenty_four, CUDA, capacity=H100_CAPACITY)
    safe = twenty_four.streams_that_fit(H100_CAPACITY, worst=True)
    assert 0 < safe < 16 and f"it may run out of memory under load: ECHO_MAX_ACTIVE={safe} or lower" in caplog.text


def test_a_setting_that_cannot_fit_stops_loading_naming_what_would(h100_plans):
    thirty_two = h100_plans[32]
    with pytest.raises(MemoryTooSmall) as refused:
        check_memory(thirty_two, CUDA, capacity=H100_CAPACITY)
    fit, safe = thirty_two.streams_that_fit(H100_CAPACITY), thirty_two.streams_that_fit(H100_CAPACITY, worst=True)
    assert safe < fit < 32
    message = str(refused.value)
    assert message.startswith("ECHO_MAX_ACTIVE=32 needs at least") and f"set ECHO_MAX_ACTIVE={fit} or lower" in message
    assert f"ECHO_MAX_ACTIVE={safe} or lower stays within the worst case" in message
    assert "ECHO_CUDA_GRAPHS=0" in message and "(held twice with CUDA graphs)" in message


def test_a_device_too_small_for_one_stream_is_told_to_leave_static_shapes():
    plan = MemoryPlan(loaded=10 * GIB, per_stream=4 * GIB, streams=2)
    with pytest.raises(MemoryTooSmall, match="even one stream does not fit: use ECHO_STATIC_SHAPES=0") as refused:
        check_memory(plan, CUDA, capacity=12 * GIB)
    assert "ECHO_CUDA_GRAPHS" not in str(refused.value)  # not a lever when they are off
