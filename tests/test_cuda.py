"""The CUDA path, on a CUDA device (skipped without one; benchmarks/gpu_check.py runs these).

Full-size synthetic weights check the real model in bf16 and fp32 against the CPU in float32;
the tiny reference models check everything that is about shapes, compilation, CUDA graphs and the
server, which the size of the model does not change.
"""

import asyncio
import gc
import re

import httpx
import numpy as np
import pytest
import torch

import engine as eng
import inference as inf
from batched_steps import StaticShapes, StaticSteps, batched_velocity, current_stream_kept
from conftest import REF, live_server, server_env
from test_batched_steps import assert_compile_artifacts_reload, first_calls, next_step, on_another_thread
from test_engine import assert_compiled_decoder_matches_one_shot, load_clip, mixed_jobs
from test_server import FAST, decode, speech
from voices import SpeakerCache

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

# Full-size forward on CUDA vs CPU float32, as max |cuda - cpu| / max |cpu|. bf16 keeps 8 bits through
# 24 layers of random synthetic weights, which costs 0.176 on the CPU too (measured 2026-11-22); the
# criterion is that CUDA adds nothing beyond that: its bf16 error is at most 1.25x the CPU's bf16 error.
# fp32 runs its matmuls in TF32 (11 bits), as the server does: 3 bits more than bf16, so ~1/8 of its
# error; at most 1/4 (not yet measured on a GPU: the test prints it).
BF16_VS_CPU_BF16 = 1.25
FP32_VS_CPU_BF16 = 0.25


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.float().cpu() - expected.float()).abs().max() / expected.float().abs().max()).item()


@pytest.fixture(scope="module")
def golden_inputs():
    from safetensors.torch import load_file

    return load_file(REF / "fullsize_golden.safetensors")


@pytest.fixture(scope="module")
def cpu_fullsize_outputs(synthetic_repos, golden_inputs):
    """The CPU velocity of the golden inputs in float32 and bf16 (each model released afterwards)."""
    outputs = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = inf.load_model_from_hf(str(synthetic_repos["echo-tts-base"]), device="cpu", dtype=dtype)
        outputs[dtype] = _forward(model, golden_inputs, "cpu")
        del model
        gc.collect()
    return outputs


def _forward(model, g, device) -> torch.Tensor:
    on = lambda name: g[name].to(device)  # noqa: E731
    with torch.inference_mode():
        kv_text = model.get_kv_cache_text(on("dit_text_input_ids"), on("dit_text_mask"))
        kv_speaker = model.get_kv_cache_speaker(on("dit_speaker_latent").to(model.dtype))
        return model(on("dit_x").to(model.dtype), on("dit_t").to(model.dtype), on("dit_text_mask"),
                     on("dit_speaker_mask"), kv_text, kv_speaker)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_fullsize_forward_on_cuda_matches_cpu_float32(synthetic_repos, golden_inputs, cpu_fullsize_outputs, dtype,
                                                      monkeypatch):
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", True)  # (as the server runs; put back after)
    model = inf.load_model_from_hf(str(synthetic_repos["echo-tts-base"]), device="cuda", dtype=dtype)
    try:
        out = _forward(model, golden_inputs, "cuda")
    finally:
        del model
        gc.collect()
        torch.cuda.empty_cache()
    error = _relative_error(out, cpu_fullsize_outputs[torch.float32])
    cpu_error = _relative_error(cpu_fullsize_outputs[dtype], cpu_fullsize_outputs[torch.float32])
    print(f"full-size forward, {dtype}: max error {error:.2e} of the output's scale (CPU {dtype}: {cpu_error:.2e}; "
          f"CUDA vs CPU {dtype}: {_relative_error(out, cpu_fullsize_outputs[dtype]):.2e})")
    cpu_bf16_error = _relative_error(cpu_fullsize_outputs[torch.bfloat16], cpu_fullsize_outputs[torch.float32])
    assert error <= (FP32_VS_CPU_BF16 if dtype == torch.float32 else BF16_VS_CPU_BF16) * cpu_bf16_error


# ---- the step runners on CUDA (tiny model) ---------------------------------------------------------------


@pytest.fixture(scope="module")
def cuda_engine(tiny_echo_dir, tiny_fish_dir):
    model = inf.load_model_from_hf(str(tiny_echo_dir), device="cuda", dtype=torch.float32)
    fish = inf.load_fish_ae_from_hf(str(tiny_fish_dir), device="cuda", dtype=torch.float32)
    pca = inf.load_pca_state_from_hf(str(tiny_echo_dir), device="cuda")
    return eng.SpeechEngine(model, fish, pca, SpeakerCache(4))


def _mixed_calls(engine, skip_blocks=1):
    return first_calls(engine, mixed_jobs(load_clip()), skip_blocks)


def _assert_steps_match_eager(steps, engine, repeats=1):
    """Each repeat a step later (new latents) and, from the second on, without the first generation
    and then with it back: a replay must read what this step wrote, not what its capture saw."""
    calls = _mixed_calls(engine)
    with torch.inference_mode():
        for repeat in range(repeats):
            now = [next_step(c, repeat) for c in calls][(repeat % 2):]
            for e, p in zip(batched_velocity(engine.model, now), steps(now), strict=True):
                torch.testing.assert_close(p, e, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
def test_static_steps_match_exact_steps_on_cuda(cuda_engine, compile):
    torch._dynamo.reset()
    steps = StaticSteps(cuda_engine.model, StaticShapes.covering((8, 16), max_rows=12), compile=compile)
    _assert_steps_match_eager(steps, cuda_engine)


@pytest.mark.parametrize("compile", [False, True], ids=["eager-captured", "compiled-captured"])
def test_cuda_graphs_replay_what_eager_computes(cuda_engine, compile):
    torch._dynamo.reset()
    steps = StaticSteps(cuda_engine.model, StaticShapes.covering((8, 16), max_rows=12), compile=compile,
                        cuda_graphs=True)
    _assert_steps_match_eager(steps, cuda_engine, repeats=4)  # captured at the first step of a shape, then replayed


def test_warm_up_captures_one_graph_per_step_shape_and_serving_captures_none(cuda_engine):
    """One CUDA graph per (frames, rows, speaker keys), each a whole step pass, captured on the thread
    that warms up; serving mixed batches then only replays them (and matches eager)."""
    torch._dynamo.reset()
    steps = StaticSteps(cuda_engine.model, StaticShapes.covering((8, 16), max_rows=12), compile=True,
                        cuda_graphs=True)
    on_another_thread(steps.warm_up)
    assert steps.graphs == len(steps.shapes.all_shapes())
    _assert_steps_match_eager(steps, cuda_engine, repeats=2)
    assert steps.graphs == len(steps.shapes.all_shapes()) and steps.compiles_after_warm_up == 0


def test_the_compiled_streaming_decoder_replays_what_eager_decodes_on_cuda_graphs(cuda_engine, monkeypatch):
    """ECHO_COMPILE with ECHO_CUDA_GRAPHS: a single stream's decoder graph replays as a CUDA graph; the
    audio and the state are copied out before the next replay, so streams keep their own state. Compared
    in float32 without TF32 (which rounds each convolution's inputs to 11 bits, differently for
    differently shaped calls): the bound is the compiled code's, not TF32's."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    assert_compiled_decoder_matches_one_shot(cuda_engine.fish_ae, cuda_graphs=True, repeats=4)


@pytest.mark.slow
def test_compile_artifacts_are_reloaded_by_the_next_process_on_cuda(tiny_echo_dir, tmp_path):
    assert_compile_artifacts_reload(tiny_echo_dir, tmp_path, "cuda")


# ---- the server on CUDA (tiny model, compiled, CUDA graphs) -------------------------------------------


@pytest.fixture(scope="module")
def cuda_server(tiny_echo_dir, tiny_fish_dir, voice_dir, tmp_path_factory):
    env = server_env(tiny_echo_dir, tiny_fish_dir, voice_dir, ECHO_DEVICE="cuda", ECHO_COMPILE="1",
                     ECHO_CUDA_GRAPHS="1", ECHO_WARMUP="1", ECHO_MAX_ACTIVE="3",
                     ECHO_CACHE_DIR=str(tmp_path_factory.mktemp("compile-cache")))
    with live_server(tmp_path_factory, "cuda-server", env, ready_timeout=900) as live:
        yield live


def _metric(server, name: str) -> float:
    text = httpx.get(server.url + "/metrics").text
    return float(re.search(rf"^{name} ([0-9.e+-]+)$", text, re.M).group(1))


@pytest.mark.slow
def test_cuda_server_streams_what_it_returns_whole(cuda_server):
    streamed = decode(speech(cuda_server, seed=5, response_format="pcm", stream=True).content, "pcm")[2]
    whole = decode(speech(cuda_server, seed=5, response_format="wav", stream=False).content, "wav")[2]
    assert streamed.size > 0 and np.array_equal(np.round(streamed * 32767), np.round(whole * 32767))


@pytest.mark.slow
def test_cuda_server_compiles_nothing_after_warm_up(cuda_server):
    bodies = [{"seed": 1}, {"seed": 2, "voice": "none"}, {"seed": 3, "voice": "duo", "block_sizes": [4, 12],
                                                          "num_steps": [2, 3]}, {"seed": 4, "stream": False}]
    preset = {"input": "Hello there. This is a test.", "voice": "alice", "response_format": "pcm"}

    async def together():
        async with httpx.AsyncClient(base_url=cuda_server.url, timeout=300) as client:
            payload = {"input": "Hello there. This is a test.", "voice": "alice", "response_format": "pcm", **FAST}
            posts = [client.post("/v1/audio/speech", json={**payload, **b}) for b in bodies]
            # two streams of the default preset: their blocks go into their prefixes through the compiled encoder
            posts += [client.post("/v1/audio/speech", json={**preset, "seed": seed}) for seed in (5, 6)]
            return await asyncio.gather(*posts)

    assert all(r.status_code == 200 for r in asyncio.run(together()))
    assert _metric(cuda_server, "echo_compiles_after_warm_up") == 0
    assert "while serving" not in cuda_server.log()


@pytest.mark.slow
def test_cuda_server_memory_does_not_grow_over_200_requests(cuda_server):
    def requests(n: int) -> None:
        for seed in range(n):
            assert speech(cuda_server, seed=seed, response_format="pcm", voice="alice").status_code == 200

    requests(20)
    before = _metric(cuda_server, "echo_gpu_memory_allocated_bytes")
    requests(180)
    after = _metric(cuda_server, "echo_gpu_memory_allocated_bytes")
    assert after - before <= 1 << 20, f"GPU memory grew by {(after - before) / 2 ** 20:.1f} MiB over 180 requests"


# ---- last: a capture that CUDA refuses (whatever state it leaves, no later test depends on it) ----------


def test_a_capture_that_cuda_refuses_leaves_the_thread_on_its_own_stream():
    """torch.cuda.graph restores the thread's stream only after the capture ends well; StaticSteps'
    captures keep it whatever happens, so a failed capture (and the eager path that follows) cannot
    leave the generation thread on the capture's side stream."""
    before = torch.cuda.current_stream()
    with pytest.raises(RuntimeError):
        with current_stream_kept():
            with torch.cuda.graph(torch.cuda.CUDAGraph(), capture_error_mode="thread_local"):
                torch.ones(1, device="cuda").item()  # a host sync: not allowed while capturing
    assert torch.cuda.current_stream() == before
