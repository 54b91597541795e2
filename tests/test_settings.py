"""Configuration from the environment, start-up behaviour of the app (in process: conftest.AppServer) and
of the real process."""

import logging
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT, AppServer, server_env
from settings import PERFORMANCE_PRESETS, ConfigError, load_settings


def test_defaults_match_the_fork(monkeypatch):
    for name in ("PORT", "ECHO_DEVICE", "ECHO_PERFORMANCE_PRESET", "ECHO_VOICE_DIRS"):
        monkeypatch.delenv(name, raising=False)
    s = load_settings()
    assert (s.port, s.host, s.device, s.model_dtype, s.fish_dtype) == (8000, "0.0.0.0", "cpu", "bfloat16", "float32")
    assert (s.compiles, s.compile_ae, s.chunking, s.folder_support) == (False, True, True, True)  # (on the CPU)
    assert (s.chunk_chars_per_second, s.chunk_words_per_second, s.max_speaker_latent_length) == (14, 2.7, 6400)
    assert (s.num_steps_nonstream, s.output_sample_rate, s.max_input_chars) == (20, None, 4096)
    assert s.stream_preset == ([32, 128, 480], [8, 15, 20])
    assert [str(p) for p in s.voice_dirs] == ["audio_prompts"] and s.api_keys == []


@pytest.mark.parametrize("text, value", [("1", True), ("true", True), ("yes", True), ("on", True),
                                         ("0", False), ("false", False), ("no", False), ("off", False)])
def test_booleans(monkeypatch, text, value):
    monkeypatch.setenv("ECHO_CHUNKING", text)
    assert load_settings().chunking is value


def test_an_empty_voice_directory_list_needs_an_upload_directory(monkeypatch, tmp_path):
    """Uploads need a directory: ECHO_VOICE_DIRS="" alone stops start-up naming both variables (it
    used to crash later with an IndexError); with ECHO_VOICE_UPLOAD_DIR it is a library of uploads."""
    monkeypatch.setenv("ECHO_VOICE_DIRS", "")
    with pytest.raises(ConfigError, match="ECHO_VOICE_DIRS lists no directory and ECHO_VOICE_UPLOAD_DIR is unset"):
        load_settings()
    monkeypatch.setenv("ECHO_VOICE_UPLOAD_DIR", str(tmp_path))
    assert load_settings().upload_dir == tmp_path


def test_lists_presets_and_keys(monkeypatch, caplog):
    monkeypatch.setenv("ECHO_VOICE_DIRS", "a:b/c")
    monkeypatch.setenv("ECHO_PERFORMANCE_PRESET", "low-mid")
    monkeypatch.setenv("ECHO_API_KEY", "k1, k2")
    s = load_settings()
    assert [str(p) for p in s.voice_dirs] == ["a", "b/c"]
    assert s.stream_preset == PERFORMANCE_PRESETS["low_mid"]
    assert s.api_keys == ["k1", "k2"]
    monkeypatch.setenv("ECHO_PERFORMANCE_PRESET", "equal")
    assert load_settings().stream_preset == ([213, 213, 214], [15, 15, 15])
    monkeypatch.setenv("ECHO_PERFORMANCE_PRESET", "turbo")
    assert load_settings().stream_preset == PERFORMANCE_PRESETS["default"]
    assert "turbo" in caplog.text


def test_an_unknown_preset_is_warned_once_at_load_not_per_request(monkeypatch, caplog):
    monkeypatch.setenv("ECHO_PERFORMANCE_PRESET", "turbo")
    s = load_settings()
    for _ in range(3):  # what every request reads
        assert s.stream_preset == PERFORMANCE_PRESETS["default"] and s.performance_preset == "default"
    assert caplog.text.count("unknown ECHO_PERFORMANCE_PRESET") == 1


def test_device_auto_is_cuda_when_available_else_cpu_with_a_warning(monkeypatch, caplog):
    for name in ("ECHO_DEVICE", "ECHO_FISH_DEVICE"):
        monkeypatch.delenv(name, raising=False)
    s = load_settings()
    assert (s.device, s.fish_device_name) == ("cpu", "cpu") and "very slow" in caplog.text
    assert load_settings(device="cpu", fish_device="auto").fish_device_name == "cpu"
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    s = load_settings(device="AUTO")
    assert (s.device, s.fish_device_name) == ("cuda", "cuda")
    assert load_settings(fish_device="cpu").fish_device_name == "cpu"


@pytest.mark.parametrize("name", ["ECHO_DEVICE", "ECHO_FISH_DEVICE"])
def test_explicit_cuda_without_cuda_is_a_start_up_error_naming_the_variable(monkeypatch, name):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    monkeypatch.delenv("ECHO_DEVICE", raising=False)
    monkeypatch.setenv(name, "cuda:1")
    with pytest.raises(ConfigError, match=f"{name}=cuda:1, but torch .* sees no CUDA device"):
        load_settings()


def test_static_shapes_follow_compile(monkeypatch):
    for name in ("ECHO_DEVICE", "ECHO_COMPILE", "ECHO_STATIC_SHAPES", "ECHO_CUDA_GRAPHS"):
        monkeypatch.delenv(name, raising=False)
    assert not load_settings().use_static_shapes and not load_settings().replays_graphs  # CPU: exact batching
    assert not load_settings(device="cpu").use_static_shapes  # CPU: exact, bit-identical batching
    assert load_settings(compile=True).use_static_shapes  # compiled graphs need fixed shapes
    assert load_settings(device="cpu", compile=True).use_static_shapes  # compiled graphs need fixed shapes
    assert load_settings(device="cpu", static_shapes=True).use_static_shapes
    assert not load_settings(static_shapes=False).use_static_shapes
    monkeypatch.setenv("ECHO_COMPILE", "1")
    monkeypatch.setenv("ECHO_STATIC_SHAPES", "0")
    with pytest.raises(ConfigError, match="ECHO_COMPILE needs static shapes"):
        load_settings()


def test_the_fast_path_is_the_default_on_cuda_and_eager_stays_the_default_on_the_cpu(monkeypatch):
    """Issue 20 item 5: unset, ECHO_COMPILE and ECHO_CUDA_GRAPHS mean compiled with CUDA graphs on a
    GPU (giving way to eager if that cannot start) and eager on the CPU; each can be set either way."""
    for name in ("ECHO_DEVICE", "ECHO_COMPILE", "ECHO_STATIC_SHAPES", "ECHO_CUDA_GRAPHS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    gpu = load_settings()
    assert gpu.device == "cuda" and gpu.compiles and gpu.replays_graphs and gpu.use_static_shapes
    assert gpu.fast_path_by_default
    asked = load_settings(compile=True)
    assert asked.compiles and asked.replays_graphs and not asked.fast_path_by_default  # asked for: failing is an error
    for eager in (load_settings(compile=False), load_settings(static_shapes=False), load_settings(device="cpu")):
        assert not any((eager.compiles, eager.replays_graphs, eager.use_static_shapes, eager.fast_path_by_default))
    no_graphs = load_settings(cuda_graphs=False)
    assert no_graphs.compiles and not no_graphs.replays_graphs and not no_graphs.fast_path_by_default  # (asked for)
    assert not load_settings(static_shapes=True).fast_path_by_default
    assert not load_settings(warmup=False).compiles  # nothing would compile before the first requests
    graphs_only = load_settings(warmup=False, cuda_graphs=True)  # asked for: static shapes, captured as they come
    assert graphs_only.use_static_shapes and graphs_only.replays_graphs and not graphs_only.compiles
    monkeypatch.setenv("ECHO_COMPILE", "0")
    assert not load_settings().compiles


@pytest.mark.parametrize("name, value", [
    ("ECHO_COMPILE", "maybe"), ("PORT", "eighty"), ("ECHO_PORT", "0"), ("ECHO_DEVICE", "gpu"), ("ECHO_DEVICE", "meta"),
    ("ECHO_FISH_DEVICE", "mps"), ("ECHO_MODEL_DTYPE", "float8"), ("ECHO_NUM_STEPS_NONSTREAM", "0"),
    ("ECHO_CHUNK_CHARS_PER_SECOND", "inf"), ("ECHO_CHUNK_CHARS_PER_SECOND", "1e-320"),
    ("ECHO_CHUNK_WORDS_PER_SECOND", "nan"), ("ECHO_API_KEY", " , "), ("ECHO_SEND_TIMEOUT", "1e-300"),
    # infinite: the generation thread died at the first parked stream; inline voices and uploads got 500;
    # the models loaded and then failed, naming nothing
    ("ECHO_SEND_TIMEOUT", "inf"), ("ECHO_MAX_VOICE_SECONDS", "inf"), ("ECHO_MAX_AHEAD_SECONDS", "1e400"),
    # a key no client's Authorization header can carry (it matched only in ?api_key=)
    ("ECHO_API_KEY", "clé"), ("ECHO_API_KEY", "k1,k\u00e92")])
def test_malformed_values_name_the_variable(monkeypatch, name, value):
    monkeypatch.delenv("PORT" if name == "ECHO_PORT" else "ECHO_PORT", raising=False)
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=rf"\s{name}: "):  # that variable, not one whose name ends with it
        load_settings()


def test_cuda_graphs_without_static_shapes_stop_start_up_as_compiling_does(monkeypatch):
    """ECHO_CUDA_GRAPHS=1 ECHO_STATIC_SHAPES=0 served eager exact batching, saying nothing."""
    monkeypatch.setenv("ECHO_CUDA_GRAPHS", "1")
    monkeypatch.setenv("ECHO_STATIC_SHAPES", "0")
    with pytest.raises(ConfigError, match="ECHO_CUDA_GRAPHS needs static shapes"):
        load_settings()


def test_echo_port_wins_over_the_port_a_platform_or_the_image_sets(monkeypatch):
    """The image sets PORT=8000: an operator's ECHO_PORT=9000 was ignored in every container."""
    monkeypatch.setenv("PORT", "8000")
    monkeypatch.setenv("ECHO_PORT", "9000")
    assert load_settings().port == 9000
    monkeypatch.setenv("ECHO_PORT", " ")  # compose's ${ECHO_PORT:-}: unset, so PORT
    monkeypatch.setenv("PORT", "9001")
    assert load_settings().port == 9001
    monkeypatch.setenv("ECHO_PORT", "0")
    with pytest.raises(ConfigError, match=r"\sECHO_PORT: "):
        load_settings()
    monkeypatch.delenv("ECHO_PORT")
    monkeypatch.setenv("PORT", "8000")
    assert load_settings().port == 8000


def test_a_key_may_hold_spaces_as_a_bearer_header_carries_them(monkeypatch):
    monkeypatch.setenv("ECHO_API_KEY", "team key 1")
    assert load_settings().accepts_key("team key 1")


def test_list_items_lose_the_spaces_around_them(monkeypatch):
    monkeypatch.setenv("ECHO_VOICE_DIRS", "/a: /b :")
    monkeypatch.setenv("ECHO_API_KEY", " k1 , k2")
    settings = load_settings()
    assert settings.voice_dirs == [Path("/a"), Path("/b")] and settings.api_keys == ["k1", "k2"]


def test_a_blank_unset_by_default_setting_is_unset(monkeypatch):
    """compose's `ECHO_COMPILE: ${ECHO_COMPILE:-}` gives a blank value: it stopped start-up ("Input
    should be a valid boolean") where every other blank setting means its default."""
    for name in ("ECHO_COMPILE", "ECHO_STATIC_SHAPES", "ECHO_CUDA_GRAPHS", "ECHO_VOICE_UPLOADS", "ECHO_PUBLIC_DOCS",
                 "ECHO_OUTPUT_SAMPLE_RATE"):
        monkeypatch.setenv(name, " ")
    settings = load_settings()
    assert (settings.compile, settings.static_shapes, settings.cuda_graphs, settings.voice_uploads,
            settings.public_docs, settings.output_sample_rate) == (None,) * 6


def test_blank_paths_and_spaced_devices_mean_what_they_say(monkeypatch):
    for name in ("ECHO_CACHE_DIR", "ECHO_VOICE_UPLOAD_DIR"):
        monkeypatch.setenv(name, " ")
    monkeypatch.setenv("ECHO_DEVICE", " CPU ")
    settings = load_settings()
    assert settings.cache_dir == Path("/tmp") and settings.voice_upload_dir is None  # not the working directory
    assert settings.device == "cpu"


@pytest.mark.slow
def test_process_refuses_to_start_with_a_malformed_variable():
    result = subprocess.run([sys.executable, "api_server.py"], cwd=ROOT, capture_output=True, text=True,
                            env={"PATH": "/usr/bin:/bin", "ECHO_FOLDER_SUPPORT": "perhaps"}, timeout=120)
    assert result.returncode != 0 and "ECHO_FOLDER_SUPPORT" in result.stderr


@pytest.mark.slow
def test_ready_only_after_warm_up(tiny_echo_dir, tiny_fish_dir, voice_dir):
    env = server_env(tiny_echo_dir, tiny_fish_dir, voice_dir, ECHO_WARMUP="1", ECHO_WARMUP_VOICE="alice",
                     ECHO_PERFORMANCE_PRESET="low", ECHO_NUM_STEPS_NONSTREAM="1")
    live = AppServer(env, wait_ready=False)
    try:
        assert live.get("/health").json() == {"status": "ok", "ready": False, "auth": False}
        r = live.post("/v1/audio/speech", json={"input": "Hi.", "voice": "none"})
        assert r.status_code == 503 and r.headers["retry-after"] and r.json()["error"]["code"] == "not_ready"
        live.wait(300)
        log = live.log()
        assert "warm-up done" in log and log.index("warm-up done") < log.rindex("ready")
        assert live.get("/ready").status_code == 200
    finally:
        live.stop()


@pytest.mark.slow
def test_an_unusable_warm_up_voice_costs_the_warm_up_its_voice_not_the_start(tiny_echo_dir, tiny_fish_dir,
                                                                              tmp_path):
    """A missing ECHO_WARMUP_VOICE only warned, but one that exists and cannot be used (undecodable,
    too short) failed the whole load (503 for good; on CUDA it also turned the fast path off for
    later starts). It now warms up without a voice, with a warning."""
    import numpy as np
    import soundfile as sf

    sf.write(tmp_path / "short.wav", np.zeros(2205, np.float32) + 0.1, 44100)  # 0.05 s: too short to clone
    (tmp_path / "broken.mp3").write_bytes(b"not audio at all" * 10)
    for voice in ("short", "broken"):
        live = AppServer(server_env(tiny_echo_dir, tiny_fish_dir, tmp_path, ECHO_WARMUP="1", ECHO_WARMUP_VOICE=voice,
                                    ECHO_PERFORMANCE_PRESET="low", ECHO_NUM_STEPS_NONSTREAM="1"))
        try:
            assert live.get("/ready").status_code == 200
            assert "ECHO_WARMUP_VOICE" in live.log() and "warming up without a voice" in live.log()
        finally:
            live.stop()


@pytest.mark.slow
def test_debug_logs_keep_the_last_generation_and_streamed_bytes_match_it(tiny_echo_dir, tiny_fish_dir, voice_dir,
                                                                        tmp_path, monkeypatch):
    import numpy as np
    import soundfile as sf

    monkeypatch.chdir(tmp_path)  # where the app writes api_generation.wav
    live = AppServer(server_env(tiny_echo_dir, tiny_fish_dir, voice_dir, ECHO_DEBUG_LOGS="1"))
    try:
        body = {"input": "Hello there.", "voice": "alice", "block_sizes": [4, 8], "num_steps": [2, 2]}
        streamed = live.post("/v1/audio/speech", json=body, timeout=60).content
        generated, rate = sf.read(tmp_path / "api_generation.wav", dtype="float32")
        assert rate == 44100
        meant = np.round(np.clip(generated, -1, 1) * 32767).astype("<i2").tobytes()
        assert streamed == meant  # every sample the engine produced, converted by the contract's rule
        assert "DEBUG" in live.log()
    finally:
        live.stop()


@pytest.mark.slow
def test_a_model_that_cannot_load_is_reported_by_ready(tiny_fish_dir, voice_dir, tmp_path):
    live = AppServer(server_env(tmp_path / "no-such-model", tiny_fish_dir, voice_dir), wait_ready=False)
    try:
        r = live.load_failure()
        assert r.status_code == 503 and "failed to load" in r.json()["error"]["message"]
        assert "no-such-model" in r.json()["error"]["message"]
        assert live.get("/health").json() == {"status": "ok", "ready": False, "auth": False}
    finally:
        live.stop()


@pytest.mark.parametrize("name", ["répliqua", "two\nlines", " padded "])
def test_a_replica_name_that_cannot_be_a_header_value_stops_start_up(monkeypatch, name):
    monkeypatch.setenv("ECHO_REPLICA_NAME", name)
    with pytest.raises(ConfigError, match="ECHO_REPLICA_NAME"):
        load_settings()


def test_no_settings_validator_shadows_another():
    # pydantic only warns when a validator's name reuses another's, and the first one silently stops running
    done = subprocess.run([sys.executable, "-W", "error::UserWarning", "-c", "import settings"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-1000:]


@pytest.mark.slow
def test_ready_says_what_loading_is_doing(tiny_echo_dir, tiny_fish_dir, voice_dir, monkeypatch):
    """While it loads, /ready's 503 names the stage and how far it got (a cold compile takes minutes)."""
    import threading

    import batched_steps

    shapes_started, release = [], threading.Event()
    zero_call = batched_steps.StaticSteps._zero_call

    def held_at_the_second_shape(self, *shape):
        shapes_started.append(shape)
        if len(shapes_started) == 2:
            release.wait(60)
        return zero_call(self, *shape)

    monkeypatch.setattr(batched_steps.StaticSteps, "_zero_call", held_at_the_second_shape)
    env = server_env(tiny_echo_dir, tiny_fish_dir, voice_dir, ECHO_WARMUP="1", ECHO_STATIC_SHAPES="1",
                     ECHO_MAX_ACTIVE="1", ECHO_PERFORMANCE_PRESET="low", ECHO_NUM_STEPS_NONSTREAM="1")
    live = AppServer(env, wait_ready=False)
    try:
        for _ in range(600):  # until the warm-up holds at the second shape
            if len(shapes_started) == 2:
                break
            time.sleep(0.1)
        message = live.get("/ready").json()["error"]["message"]
        total = int(re.search(r"warming up step shapes, 1 of (\d+), about \d+ s left, \d+ s since start",
                              message).group(1))
        release.set()
        live.wait(300)
        assert live.get("/ready").status_code == 200 and total == len(shapes_started) > 2
        assert re.search(r"warming up step shapes: \d+ to do", live.log())
    finally:
        release.set()
        live.stop()


def test_a_service_closed_while_it_loads_keeps_nothing_it_loaded(tiny_echo_dir, tiny_fish_dir, tmp_path, monkeypatch):
    """A shutdown that comes during warm-up wins: the load that ends later stops its worker and the
    service does not turn ready."""
    import threading

    import runtime
    import service as svc

    warming, release, loaded = threading.Event(), threading.Event(), []
    warm_up, load = runtime._warm_up, svc.load_runtime
    monkeypatch.setattr(runtime, "_warm_up", lambda *a: (warming.set(), release.wait(60), warm_up(*a))[-1])
    monkeypatch.setattr(svc, "load_runtime", lambda *a, **k: loaded.append(load(*a, **k)) or loaded[-1])
    settings = load_settings(model_repo=str(tiny_echo_dir), fish_repo=str(tiny_fish_dir), device="cpu",
                             model_dtype="float32", voice_dirs=[tmp_path], warmup=False)
    service = svc.SpeechService(settings)
    loader = service.start_loading()
    assert warming.wait(60)
    service.close()
    release.set()
    loader.join(60)
    assert not loader.is_alive() and len(loaded) == 1 and not loaded[0].worker.alive
    assert not service.ready.is_set() and "still loading" in service.unready_reason()


def test_loading_progress_says_how_long_the_rest_of_a_stage_should_take():
    """A cold compile says what it is doing and how long it expects, at the pace of the parts done."""
    from runtime import LoadProgress

    now = [100.0]
    progress = LoadProgress(clock=lambda: now[0])
    progress.enter("compiling step shapes", 40)
    now[0] += 5
    assert progress.describe() == "compiling step shapes, 0 of 40, 5 s since start"  # no pace yet
    now[0] += 15
    for _ in range(10):
        progress.advance()
    assert progress.describe() == "compiling step shapes, 10 of 40, about 60 s left, 20 s since start"
    for _ in range(30):
        progress.advance()
    assert progress.describe() == "compiling step shapes, 40 of 40, 20 s since start"
    progress.enter("warming up generation (streamed, then whole)", 2)
    assert progress.remaining() is None


def test_a_stage_not_yet_counted_is_expected_to_take_what_it_took_at_the_last_start(caplog):
    """A cold compile says how long it expects before its first part is done: as long as at the last
    start (ECHO_CACHE_DIR keeps each stage's seconds)."""
    from runtime import LoadProgress

    now = [0.0]
    progress = LoadProgress(clock=lambda: now[0], history={"compiling step shapes": 70.0})
    with caplog.at_level(logging.INFO, logger="runtime"):
        progress.enter("compiling step shapes", 16)
    assert "compiling step shapes: 16 to do (0 s since start, 70 s at the last start)" in caplog.text
    now[0] += 20
    assert progress.describe() == "compiling step shapes, 0 of 16, about 50 s left, 20 s since start"
    progress.enter("warming up generation (streamed, then whole)", 2)  # never timed before: no estimate
    assert progress.remaining() is None
    now[0] += 5
    assert progress.finish() == {"compiling step shapes": 20.0, "warming up generation (streamed, then whole)": 5.0}


def test_a_start_keeps_its_stage_times_for_the_next_one(tiny_echo_dir, tiny_fish_dir, tmp_path, caplog):
    import service as svc
    from runtime import load_times_path, read_load_times

    settings = load_settings(model_repo=str(tiny_echo_dir), fish_repo=str(tiny_fish_dir), device="cpu",
                             model_dtype="float32", voice_dirs=[tmp_path / "voices"], warmup=True,
                             cache_dir=tmp_path / "cache", performance_preset="low", num_steps_nonstream=1)
    first = svc.SpeechService(settings)
    assert first.progress.history == {}  # nothing kept yet
    first.start_loading().join()
    first.close()
    kept = read_load_times(load_times_path(settings))
    assert {"loading the models", "warming up generation (streamed, then whole)"} <= set(kept)
    second = svc.SpeechService(settings)
    assert second.progress.history == kept
    load_times_path(settings).write_text("not json")
    with caplog.at_level(logging.WARNING, logger="runtime"):
        assert svc.SpeechService(settings).progress.history == {}  # an unreadable file costs only the estimates
    assert "ignoring" in caplog.text
