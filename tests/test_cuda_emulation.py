"""The service's CUDA configuration run on the CPU with CUDA emulated, so device-placement mistakes of
the CUDA path fail in CI, where there is no GPU.

`EmulatedCuda` is a TorchFunctionMode: tensors asked for on a CUDA device are made on the CPU and
remembered as "on CUDA" (by their storage, so views, in-place ops and nn.Parameters keep the mark),
and every op whose tensor inputs are on CUDA gives CUDA results. It then enforces what a real GPU
enforces: no op may mix CUDA tensors with CPU tensors other than 0-dim ones, `.numpy()` needs `.cpu()`
first, and a CPU generator cannot drive a CUDA random op. It also counts host synchronisations
(`.item()`, `bool(t)`, `.cpu()`, `nonzero`, boolean masks, ...) and where they happen.
"""

from __future__ import annotations

import asyncio
import base64
import io
import logging
import sys
import threading
import weakref
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from starlette.concurrency import run_in_threadpool
from torch import Tensor
from torch.overrides import TorchFunctionMode

import engine as eng
import runtime
import service as svc
from speech_request import SpeechRequest
from batched_steps import ExactSteps, StaticSteps
from conftest import ROOT
from settings import load_settings
from test_engine import load_clip

CUDA = torch.device("cuda", 0)
HOST_GENERATOR = torch.Generator  # the real class, before the test replaces it
# Reading a CUDA tensor's value on the host waits for the GPU: one synchronisation each.
SYNC_OPS = {"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "__complex__", "__format__",
            "__repr__", "nonzero", "argwhere", "masked_select", "equal", "unique", "unique_consecutive"}
FORBIDDEN_ON_CUDA = {"numpy", "__array__"}  # a CUDA tensor must be copied to the host first
MOVES = {"to", "cpu", "cuda"}
# Ops a GPU lets take CPU operands: copies across devices, and CPU index tensors.
MIXING_ALLOWED = MOVES | {"copy_", "__getitem__", "__setitem__", "__set__", "__get__",
                          "_has_compatible_shallow_copy_type"}  # (and a query of the tensor types, from Module.to)


def _device(value) -> torch.device | None:
    if isinstance(value, (str, torch.device)):
        return torch.device(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return torch.device("cuda", value)
    return None


def _tensors(value):
    """Every tensor in (nested lists / tuples / dicts of) `value`."""
    if isinstance(value, Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)


def _storage(t: Tensor):
    try:
        return t.untyped_storage()
    except (RuntimeError, NotImplementedError):  # tensors without storage
        return None


def _is_scalar(t: Tensor) -> bool:
    """What a GPU op accepts from the CPU beside CUDA tensors: a 0-dim tensor (a (1,) tensor is refused)."""
    return t.dim() == 0


class EmulatedGenerator(HOST_GENERATOR):
    """torch.Generator while CUDA is emulated: always a CPU generator, remembering the device asked for."""

    def __new__(cls, device=None):
        gen = super().__new__(cls, device="cpu")
        gen.emulated_device = torch.device(device or "cpu")
        return gen


class EmulatedCuda(TorchFunctionMode):
    """CUDA on the CPU (see the module docstring). Enter it in every thread that does tensor work
    (`install` makes new threads do so); rule violations raise AssertionError and are kept in
    `violations`; host synchronisations on CUDA tensors are kept in `syncs` as (phase, site, op)."""

    def __init__(self):
        super().__init__()
        self._cuda_storages: weakref.WeakSet = weakref.WeakSet()
        self._lock = threading.Lock()
        self.syncs: list[tuple[str, str, str]] = []
        self.violations: list[str] = []
        self.phase = "other"  # set by the test: which part of the work syncs are attributed to
        self.free_memory = 80 << 30  # what torch.cuda.mem_get_info says is free (the memory plan reads it)

    # ---- set-up -------------------------------------------------------------------------------

    def install(self, monkeypatch) -> None:
        """torch.cuda says a GPU is there, CUDA generators are emulated, and new threads enter the mode."""
        for name, stub in {"is_available": lambda: True, "device_count": lambda: 1, "current_device": lambda: 0,
                           "synchronize": lambda device=None: self._sync("torch.cuda.synchronize"),
                           "empty_cache": lambda: None, "memory_allocated": lambda device=None: 0,
                           "max_memory_allocated": lambda device=None: 0,
                           "memory_reserved": lambda device=None: 0,
                           "mem_get_info": lambda device=None: (self.free_memory, self.free_memory)}.items():
            monkeypatch.setattr(torch.cuda, name, stub)
        # the service turns on TF32 for CUDA; put the process-wide flags back afterwards
        monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", torch.backends.cuda.matmul.allow_tf32)
        monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", torch.backends.cudnn.allow_tf32)
        monkeypatch.setattr(torch, "Generator", EmulatedGenerator)
        bootstrap = threading.Thread._bootstrap_inner
        mode = self

        def run_emulated(thread):  # TorchFunctionMode is per thread: the loader, the worker and the
            with mode:  # thread pool (whose threads override run()) need it too
                bootstrap(thread)

        monkeypatch.setattr(threading.Thread, "_bootstrap_inner", run_emulated)

    # ---- queries ------------------------------------------------------------------------------

    def on_cuda(self, t: Tensor) -> bool:
        with torch._C.DisableTorchFunction():
            return self._on_cuda(t)

    def _on_cuda(self, t: Tensor) -> bool:
        storage = _storage(t)
        return storage is not None and storage in self._cuda_storages

    def _mark(self, result, keep_off: set[int]) -> None:
        for t in _tensors(result):
            storage = _storage(t)
            if storage is not None and id(storage) not in keep_off:
                with self._lock:
                    self._cuda_storages.add(storage)

    def _fail(self, message: str):
        self.violations.append(message)
        raise AssertionError(message)

    def _sync(self, op: str) -> None:
        with self._lock:
            self.syncs.append((self.phase, _call_site(), op))

    # ---- the mode -----------------------------------------------------------------------------

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        name = getattr(func, "__name__", str(func))
        if name == "_parse_to":  # Module.to reading its arguments: the device stays what was asked for
            return func(*args, **kwargs)
        if name == "__get__":  # attribute reads: a CUDA tensor says it is on CUDA
            attribute = func.__self__.__name__
            if attribute in ("device", "is_cuda", "is_cpu") and self._on_cuda(args[0]):
                return {"device": CUDA, "is_cuda": True, "is_cpu": False}[attribute]
        inputs = list(_tensors((args, kwargs)))
        cuda_inputs = [t for t in inputs if self._on_cuda(t)]
        host_inputs = [t for t in inputs if not self._on_cuda(t)]

        if cuda_inputs and name in FORBIDDEN_ON_CUDA and not kwargs.get("force"):
            self._fail(f"{name}() of a CUDA tensor (on a GPU: TypeError, call .cpu() first)")
        if cuda_inputs and (name in SYNC_OPS or (name == "__getitem__" and _bool_index(args[1:]))):
            self._sync(name)

        # where the result lives: an explicit device, else wherever the inputs are
        target = self._target(name, args, kwargs)
        if name == "cuda":
            func, args, kwargs = Tensor.to, (args[0], "cpu"), {}
        elif name == "to" and len(args) > 1 and isinstance(args[1], Tensor):  # .to(other): its device and dtype
            args = (args[0], "cpu", args[1].dtype, *args[2:])
        elif name == "to" and len(args) > 1 and _device(args[1]) is not None:
            args = (args[0], "cpu", *args[2:])
        placed = kwargs.get("device") is not None  # a factory told where to put its result
        if placed:
            kwargs["device"] = "cpu" if target.type == "cuda" else kwargs["device"]
        to_cuda = target.type == "cuda" if target is not None else bool(cuda_inputs)

        if name in ("copy_", "__setitem__") and cuda_inputs and not self._on_cuda(args[0]):
            self._sync(name)  # device to host copy
        if name in MOVES and not to_cuda and self._on_cuda(args[0]):
            self._sync(name)
        if to_cuda and name not in MIXING_ALLOWED and not placed:
            mixed = [tuple(t.shape) for t in host_inputs if not _is_scalar(t)]
            if mixed:
                self._fail(f"{name}() mixes CUDA tensors with CPU tensors of shapes {mixed} "
                           "(on a GPU: 'Expected all tensors to be on the same device')")
        if name == "__getitem__" and not self._on_cuda(args[0]) and \
                any(not _is_scalar(t) for t in cuda_inputs):
            self._fail("__getitem__() indexes a CPU tensor with CUDA indices")
        for gen in (v for v in (*args, *kwargs.values()) if isinstance(v, HOST_GENERATOR)):
            gen_on_cuda = getattr(gen, "emulated_device", torch.device("cpu")).type == "cuda"
            if gen_on_cuda != to_cuda:
                self._fail(f"{name}() draws a {'CUDA' if to_cuda else 'CPU'} tensor from a "
                           f"{'CUDA' if gen_on_cuda else 'CPU'} generator")

        result = func(*args, **kwargs)
        # a copy between devices is a new tensor, never a view of the source
        sources = {id(_storage(t)) for t in (cuda_inputs if not to_cuda else host_inputs)}
        if (name in MOVES or placed) and isinstance(result, Tensor) and id(_storage(result)) in sources:
            result = result.clone()
        if to_cuda:
            self._mark(result, keep_off={id(_storage(t)) for t in host_inputs})  # views of CPU tensors stay
        return result

    def _target(self, name: str, args, kwargs) -> torch.device | None:
        """The device an op is told to put its result on, if any."""
        if name == "cuda":
            return CUDA
        if name == "cpu":
            return torch.device("cpu")
        if name == "to":
            for a in (*args[1:2], kwargs.get("device")):
                if isinstance(a, Tensor):
                    return CUDA if self._on_cuda(a) else torch.device("cpu")
                if _device(a) is not None:
                    return _device(a)
            return None
        return _device(kwargs.get("device"))


def _bool_index(index) -> bool:
    return any(t.dtype == torch.bool and t.dim() > 0 for t in _tensors(index))


def _call_site() -> str:
    """file:line of the project code that asked (not torch's, not this file's)."""
    frame = sys._getframe(2)
    while frame is not None:
        path = Path(frame.f_code.co_filename)
        if ROOT in path.parents and path.parent != Path(__file__).parent and "site-packages" not in path.parts:
            return f"{path.name}:{frame.f_lineno} {frame.f_code.co_name}"
        frame = frame.f_back
    return "<outside the project>"


@pytest.fixture()
def emulated_cuda(monkeypatch) -> EmulatedCuda:
    mode = EmulatedCuda()
    mode.install(monkeypatch)
    return mode


# ---- the emulation itself ----------------------------------------------------------------------


def test_emulated_cuda_catches_what_a_gpu_rejects(emulated_cuda):
    mode = emulated_cuda
    with mode:
        x = torch.ones(4, device="cuda")
        assert mode.on_cuda(x) and x.device == CUDA and x.is_cuda
        host = torch.ones(4)
        with pytest.raises(AssertionError, match="add"):
            x + host  # (4,) CUDA + (4,) CPU
        x * torch.tensor(2.0)  # a 0-dim CPU tensor is fine
        with pytest.raises(AssertionError, match="mul"):
            x * torch.ones(1)  # a (1,) one is not
        with pytest.raises(AssertionError, match="numpy"):
            x.numpy()
        with pytest.raises(AssertionError, match="CPU generator"):
            torch.randn(3, device="cuda", generator=torch.Generator().manual_seed(0))
        with pytest.raises(AssertionError, match="CUDA generator"):
            torch.randn(3, generator=torch.Generator(device="cuda"))
        noise = torch.randn(3, device=x.device, generator=torch.Generator(device=x.device).manual_seed(0))
        assert mode.on_cuda(noise)

        syncs = len(mode.syncs)
        x.sum().item()
        assert len(mode.syncs) == syncs + 1 and mode.syncs[-1][2] == "item"
        if (x > 0).any():  # __bool__: one more
            x[x > 0]  # a boolean mask: one more
        assert len(mode.syncs) == syncs + 3

        back = x.cpu()
        assert not mode.on_cuda(back) and back.device.type == "cpu" and back.numpy().shape == (4,)
        assert mode.on_cuda(x)  # the source stays on the GPU
        moved = host.to("cuda")
        assert mode.on_cuda(moved) and not mode.on_cuda(host)  # moving copies; the CPU tensor stays
        assert mode.on_cuda(host.cuda()) and mode.on_cuda(host.to(device=x.device))

        x.mul_(2)  # in place
        view = x[1:]
        view.add_(1)
        assert mode.on_cuda(x) and mode.on_cuda(view) and mode.on_cuda(x.new_zeros(2))
        assert mode.on_cuda(torch.zeros_like(x)) and mode.on_cuda(torch.arange(3, device=x.device))
        assert not mode.on_cuda(torch.zeros_like(x, device="cpu"))
        weight = torch.nn.Linear(4, 2).to(device="cuda", dtype=torch.float32).weight  # a module's parameters move
        assert mode.on_cuda(weight) and weight.device == CUDA
    assert len(mode.violations) == 5  # each one raised above


# ---- the service's CUDA configuration ------------------------------------------------------------

TEXT = "Hello there. This is a test."
# Host syncs of the CUDA path, measured 2026-11-22 with the requests below (13 diffusion steps in 6
# forward passes, 6 blocks, 2 voices encoded; the same with exact and static-shape steps): none while a
# step is computed and none in the sampler between steps, so none per step. The 17 there are come per
# decoded block (6 .cpu(), 6 nonzero(), 1 .item()) or per newly encoded voice (4 .to("cpu")):
PER_BLOCK_SYNCS = {
    # engine.py (SpeechEngine._decoded): the block's audio to the host (it has to reach the client), in
    # the same transfer as where its latents go flat and whether they end in silence (early stop)
    ("_decoded", "cpu"),
}
PER_VOICE_SYNCS = {("_encode_audio", "to")}  # engine.py: latents and mask to the host speaker cache (2)


def _inline_voice() -> str:
    """A base64 WAV clip, as a request may send as its voice."""
    buffer = io.BytesIO()
    sf.write(buffer, load_clip()[0].numpy(), 44100, format="WAV")
    return base64.b64encode(buffer.getvalue()).decode()


def _requests() -> list[dict]:
    """Five at once (three run, two wait for a slot): a file voice twice, no voice, an inline voice;
    streaming and not; small blocks and the whole 640-frame generation; several guidance modes; a
    continue-mode answer."""
    return [
        {"voice": "alice", "stream": True, "seed": 1, "block_sizes": [16, 8], "num_steps": [2, 2]},
        {"voice": "none", "stream": False, "seed": 2, "num_steps": 2},  # one 640-frame block
        {"voice": _inline_voice(), "stream": True, "seed": 3, "guidance_mode": "joint", "block_sizes": [4, 8],
         "num_steps": [2, 2]},
        {"voice": "alice", "stream": False, "seed": 4, "guidance_mode": "apg", "truncation_factor": 0.8,
         "block_sizes": [8], "num_steps": 3},
        {"voice": "none", "stream": True, "seed": 5, "chunk_mode": "continue", "block_sizes": [8, 8],
         "num_steps": [2, 2]},  # continue mode decides a block's speech frames before decoding it
    ]


class CountingSteps:
    """The engine's step runner, counting diffusion steps and forward passes; syncs made while it
    runs are attributed to the phase "step"."""

    def __init__(self, runner, mode: EmulatedCuda):
        self.runner, self.mode = runner, mode
        self.passes = self.steps = 0

    def __call__(self, calls):
        self.passes += 1
        self.steps += len(calls)
        self.mode.phase = "step"
        try:
            return self.runner(calls)
        finally:
            self.mode.phase = "serving"


async def _serve(service: svc.SpeechService, bodies: list[dict]) -> list[np.ndarray]:
    """The requests at once, turned into jobs and read the way api_server.py does."""

    async def one(body: dict) -> np.ndarray:
        job = await run_in_threadpool(service.build_job, SpeechRequest(input=TEXT, **body).generation_options())
        stream = service.runtime.worker.submit(job, "emulated-cuda", service.settings.request_timeout or None)
        return np.concatenate([block async for block in stream])

    return await asyncio.gather(*(one(body) for body in bodies))


@pytest.mark.parametrize("static_shapes", [False, True], ids=["exact-steps", "static-shapes"])
def test_cuda_service_loads_warms_up_and_serves_mixed_requests_on_the_device(
        emulated_cuda, monkeypatch, static_shapes, tiny_echo_dir, tiny_fish_dir, voice_dir):
    mode = emulated_cuda
    settings = load_settings(model_repo=str(tiny_echo_dir), fish_repo=str(tiny_fish_dir), device="cuda",
                             model_dtype="float32", voice_dirs=[voice_dir], warmup=True, max_active=3,
                             compile=False, compile_ae=False, cuda_graphs=False, static_shapes=static_shapes)
    blocks = []  # every block the worker decodes
    decode_streams = eng.decode_streams
    monkeypatch.setattr(eng, "decode_streams", lambda decoders, z, **kw: blocks.extend(z) or decode_streams(
        decoders, z, **kw))
    service = svc.SpeechService(settings)
    with mode:
        try:
            service.start_loading().join()
            assert service.load_error is None and service.ready.is_set()
            assert service.engine.model.device == CUDA and service.engine.fish_ae.device == CUDA
            assert isinstance(service.engine.steps, StaticSteps if static_shapes else ExactSteps)
            steps = service.engine.steps = CountingSteps(service.engine.steps, mode)
            mode.syncs.clear()
            mode.phase = "serving"
            audio = asyncio.run(_serve(service, _requests()))
        finally:
            service.close()

    assert all(a.size > 0 and np.isfinite(a).all() for a in audio)
    assert mode.violations == []
    sites = Counter(mode.syncs)
    print(f"\n{steps.steps} diffusion steps in {steps.passes} forward passes, {len(blocks)} blocks decoded, "
          f"{len(mode.syncs)} host syncs:")
    for (phase, site, op), n in sorted(sites.items()):
        print(f"  {n} x {op} at {site} ({phase})")
    assert len(blocks) >= 4 and steps.steps >= 2 * len(blocks)  # every request ran (early stop may end one)
    assert [s for s in mode.syncs if s[0] == "step"] == []  # none while a step is computed
    where = Counter((site.split()[-1], op) for _, site, op in mode.syncs)
    assert set(where) <= PER_BLOCK_SYNCS | PER_VOICE_SYNCS, where  # none in the sampler between steps
    assert where[("_decoded", "cpu")] == len(blocks)  # (also shows the worker thread ran emulated)
    assert sum(where[s] for s in PER_BLOCK_SYNCS) == len(blocks)  # one host sync per block
    assert sum(where[s] for s in PER_VOICE_SYNCS) == 2 * 2  # alice once (then cached), the inline voice


# ---- the memory plan (issue 20 item 2) ------------------------------------------------------------


def test_the_memory_plan_is_what_the_static_steps_allocate_on_the_device(emulated_cuda, tiny_echo_dir):
    """The plan's padded keys/values for every stream equal, byte for byte, the row pool StaticSteps
    allocates on the (emulated) device at its first step."""
    import inference as inf
    from batched_steps import StaticShapes
    from runtime import memory_plan

    with emulated_cuda:
        model = inf.load_model_from_hf(str(tiny_echo_dir), device="cuda", dtype=torch.float32)
        max_active = 4
        shapes = StaticShapes.covering((8, 16), max_rows=3 * max_active, max_speaker_latent_length=64)
        steps = StaticSteps(model, shapes)
        plan = memory_plan(load_settings(max_active=max_active), model, steps, loaded=0)
        with torch.inference_mode():
            steps([steps._zero_call(16, 3 * max_active, shapes.speaker_patches)])
        pooled = {t.device for cache in steps._pool.caches(shapes.speaker_patches) for pair in cache for t in pair}
    assert pooled == {CUDA}
    assert steps.stacked_bytes == shapes.stacked_bytes(model, 1) * max_active > 0
    assert plan.per_stream == shapes.stacked_bytes(model, 1) + shapes.own_bytes(model)


def test_the_memory_plan_is_in_the_metrics_beside_the_peak(emulated_cuda, tiny_echo_dir, tiny_fish_dir, voice_dir):
    """/metrics says what the static-shape path was planned to need and hold at worst, beside the
    peak the GPU measured, so a GPU run checks the plan (the GPU kit records both)."""
    import re
    import time

    from fastapi.testclient import TestClient

    from api_server import create_app

    settings = load_settings(model_repo=str(tiny_echo_dir), fish_repo=str(tiny_fish_dir), device="cuda",
                             model_dtype="float32", voice_dirs=[voice_dir], warmup=False, max_active=2,
                             compile=False, compile_ae=False, static_shapes=True)
    app = create_app(settings)
    with emulated_cuda, TestClient(app) as client:
        deadline = time.monotonic() + 120
        while client.get("/ready").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.1)
        text = client.get("/metrics").text
        plan = app.state.service.observe(lambda r: r.plan, None)
    value = lambda name: float(re.search(rf"^{name} (\S+)$", text, re.M).group(1))  # noqa: E731
    assert plan is not None and 0 < plan.need < plan.worst
    assert value("echo_memory_plan_need_bytes") == plan.need and value("echo_memory_plan_worst_bytes") == plan.worst
    assert "echo_gpu_memory_peak_bytes" in text


def test_a_service_whose_plan_does_not_fit_says_which_setting_to_lower(emulated_cuda, tiny_echo_dir, tiny_fish_dir):
    """Static shapes on a device too small for ECHO_MAX_ACTIVE: loading stops before warm-up, and
    /ready's reason names the setting and what would fit."""
    settings = load_settings(model_repo=str(tiny_echo_dir), fish_repo=str(tiny_fish_dir), device="cuda",
                             model_dtype="float32", warmup=True, max_active=8, compile=False,
                             compile_ae=False, static_shapes=True)
    emulated_cuda.free_memory = 1 << 30  # 1 GiB: not even the planned workspace
    service = svc.SpeechService(settings)
    with emulated_cuda:
        try:
            service.start_loading().join()
        finally:
            service.close()
    reason = service.unready_reason()
    assert "ECHO_MAX_ACTIVE=8 needs at least" in reason and "use the eager path, ECHO_COMPILE=0 and ECHO_STATIC_SHAPES=0" in reason, reason


# ---- the fast path by default (issue 20 item 5) ---------------------------------------------------


def _start(settings, emulated_cuda, serve: bool = False) -> tuple[svc.SpeechService, eng.SpeechEngine | None,
                                                                  list[np.ndarray]]:
    """Load (and with `serve`, answer one request), then close: the service, its engine, the audio."""
    service, engine, audio = svc.SpeechService(settings), None, []
    with emulated_cuda:
        try:
            service.start_loading().join()
            if service.load_error is None:
                engine = service.engine
            if serve and engine is not None:
                audio = asyncio.run(_serve(service, [{"voice": "alice", "stream": True, "seed": 1,
                                                      "block_sizes": [8, 8], "num_steps": [2, 2]}]))
        finally:
            service.close()
    return service, engine, audio


def test_a_default_fast_path_that_fails_to_warm_up_gives_way_to_eager_and_later_starts_skip_it(
        emulated_cuda, monkeypatch, caplog, tiny_echo_dir, tiny_fish_dir, voice_dir, tmp_path):
    """Unset, ECHO_COMPILE means the compiled fast path on CUDA. When it cannot warm up, the server
    still starts, eager, says why, and the next start (same torch) goes straight to eager; asked
    for with ECHO_COMPILE=1, the same failure stops loading."""
    settings = load_settings(model_repo=str(tiny_echo_dir), fish_repo=str(tiny_fish_dir), device="cuda",
                             model_dtype="float32", voice_dirs=[voice_dir], warmup=True, max_active=3,
                             compile_ae=False, cache_dir=tmp_path)
    assert settings.fast_path_by_default
    tried = []

    def fails(*args, **kwargs):
        tried.append(1)
        raise RuntimeError("inductor fell over")

    monkeypatch.setattr(eng.CompiledTextEncoder, "warm_up", fails)  # the first part warm-up compiles
    with caplog.at_level(logging.WARNING, logger="runtime"):
        service, engine, audio = _start(settings, emulated_cuda, serve=True)
    assert service.load_error is None and tried == [1]
    assert isinstance(engine.steps, ExactSteps)
    assert (engine.text_encoder, engine.stream_decoder, engine.prefix_encoder) == (None, None, None)
    assert len(audio) == 1 and audio[0].size > 0 and np.isfinite(audio[0]).all()
    assert ("the compiled fast path (the default on CUDA) failed to warm up: RuntimeError: inductor fell over; "
            "serving on the eager path") in caplog.text

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="runtime"):
        again, engine, _ = _start(settings, emulated_cuda)
    assert again.load_error is None and tried == [1] and isinstance(engine.steps, ExactSteps)
    assert "the compiled fast path failed at an earlier start (failed to warm up: RuntimeError" in caplog.text

    asked, _, _ = _start(settings.model_copy(update={"compile": True}), emulated_cuda)
    assert tried == [1, 1] and "inductor fell over" in asked.unready_reason()
    elsewhere, engine, _ = _start(settings.model_copy(update={"max_active": 2}), emulated_cuda)  # another setup
    assert tried == [1, 1, 1] and isinstance(engine.steps, ExactSteps)
    _start(settings, emulated_cuda)
    assert tried == [1, 1, 1]  # (each setup keeps its own record)


@pytest.mark.parametrize("fits", [True, False])
def test_without_a_c_compiler_the_default_start_serves_eager_voice_encoder_included(
        emulated_cuda, monkeypatch, tiny_echo_dir, tiny_fish_dir, voice_dir, tmp_path, fits):
    """An image without a C compiler: every torch.compile'd function fails when first called. The
    fallback kept the compiled voice encoder (ECHO_COMPILE_AE, on by default), so the eager warm-up
    failed again and the server never became ready, at this start and every later one; the same when
    the fast path gave way because its memory plan did not fit."""
    settings = load_settings(model_repo=str(tiny_echo_dir), fish_repo=str(tiny_fish_dir), device="cuda",
                             model_dtype="float32", voice_dirs=[voice_dir], warmup=True, max_active=3,
                             cache_dir=tmp_path)
    assert settings.fast_path_by_default and settings.compile_ae
    calls = []

    def no_compiler(fn, *args, **kwargs):
        def compiled(*a, **k):
            calls.append(getattr(fn, "__name__", "?"))
            raise RuntimeError("Failed to find C compiler. Please specify via CC environment variable")
        return compiled

    monkeypatch.setattr(torch, "compile", no_compiler)
    if not fits:
        emulated_cuda.free_memory = 1 << 30  # 1 GiB: not even the planned workspace
    for start in ("first", "remembered"):
        service, engine, audio = _start(settings, emulated_cuda, serve=True)
        assert service.load_error is None, (start, service.unready_reason())
        assert isinstance(engine.steps, ExactSteps) and "encode_zq" not in vars(engine.fish_ae)
        assert len(audio) == 1 and audio[0].size > 0
    if fits:  # (it failed warming up, the voice encoder first: remembered)
        assert runtime.fast_path_failure_path(settings).exists() and calls[0] == "encode_zq"
    else:  # (checked at every start: nothing compiled, nothing remembered)
        assert not runtime.fast_path_failure_path(settings).exists() and calls == []


def test_a_fast_path_out_of_memory_while_warming_up_serves_eager_and_is_tried_again_at_the_next_start(
        emulated_cuda, monkeypatch, tiny_echo_dir, tiny_fish_dir, voice_dir, tmp_path):
    """Memory someone else held is no reason to skip the fast path for good: running out of memory
    while warming up (also wrapped in a compiler's error) gives way to eager without being remembered.
    The compiled code, with the CUDA graphs inductor recorded per thread, is let go on the generation
    thread, before the eager warm-up."""
    settings = load_settings(model_repo=str(tiny_echo_dir), fish_repo=str(tiny_fish_dir), device="cuda",
                             model_dtype="float32", voice_dirs=[voice_dir], warmup=True, max_active=3,
                             compile_ae=False, cache_dir=tmp_path)
    tried, resets = [], []

    def runs_out_of_memory(*args, **kwargs):
        tried.append(1)
        try:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        except torch.OutOfMemoryError as e:
            raise RuntimeError("backend='inductor' raised: see above") from e

    monkeypatch.setattr(eng.CompiledTextEncoder, "warm_up", runs_out_of_memory)
    reset = torch._dynamo.reset
    monkeypatch.setattr(torch._dynamo, "reset", lambda: (resets.append(threading.current_thread().name), reset()))
    service, engine, _ = _start(settings, emulated_cuda)
    assert service.load_error is None and isinstance(engine.steps, ExactSteps) and resets == ["echo-generation"]
    assert not runtime.fast_path_failure_path(settings).exists()
    _start(settings, emulated_cuda)
    assert tried == [1, 1]  # (the next start tried the fast path again)


def test_a_fast_path_that_starts_forgets_its_setups_failure_and_only_that(monkeypatch, tmp_path, caplog):
    one, other = (load_settings(cache_dir=tmp_path, max_active=n) for n in (4, 8))
    runtime._remember_failure(one, "failed to warm up: X")
    runtime._remember_failure(other, "failed to warm up: Y")
    runtime._forget_failure(one)
    assert not runtime.fast_path_failure_path(one).exists() and runtime.fast_path_failure_path(other).exists()

    def read_only(self, missing_ok=False):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(Path, "unlink", read_only)
    runtime._forget_failure(other)  # a read-only cache does not stop a start


def test_a_default_fast_path_that_does_not_fit_gives_way_to_eager(emulated_cuda, caplog, tiny_echo_dir,
                                                                  tiny_fish_dir, voice_dir, tmp_path):
    settings = load_settings(model_repo=str(tiny_echo_dir), fish_repo=str(tiny_fish_dir), device="cuda",
                             model_dtype="float32", voice_dirs=[voice_dir], warmup=True, max_active=8,
                             compile_ae=False, cache_dir=tmp_path)
    emulated_cuda.free_memory = 1 << 30  # 1 GiB: not even the planned workspace
    with caplog.at_level(logging.WARNING, logger="runtime"):
        service, engine, _ = _start(settings, emulated_cuda)
    assert service.load_error is None and isinstance(engine.steps, ExactSteps)
    assert "does not fit: ECHO_MAX_ACTIVE=8 needs at least" in caplog.text
    assert not runtime.fast_path_failure_path(settings).exists()  # (checked again at every start: not remembered)
