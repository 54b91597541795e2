"""The helpers the benchmarks share (benchmarks/stats.py, benchmarks/live_server.py): one percentile
function that gives every caller the numbers it gave before, one WAV writer, one server starter."""

import argparse
import io
import random
import wave

import numpy as np
import pytest

import soak
from live_server import wav_bytes
from stats import percentile


def nearest_rank(values: list[float], q: float) -> float:
    """bench_server's percentile before it became stats.percentile (bench_server, gpu_check and soak)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def test_nearest_is_the_old_nearest_rank_exactly():
    rng = random.Random(0)
    for _ in range(20_000):
        n = rng.randint(1, 50)
        values = [rng.choice([rng.random(), rng.expovariate(1) * 1000, float(rng.randint(0, 9))]) for _ in range(n)]
        q = rng.choice([rng.random(), rng.randint(0, 20) / 20, .5, .95, 1.0, 0.0])
        assert percentile(values, q) == nearest_rank(values, q), (values, q)


def test_nearest_breaks_exact_ties_to_even_as_round_does():
    """q * (n - 1) exactly halfway between two ranks (np.percentile(values, 100 * q) misses some of these:
    (100 * q) / 100 is not always q)."""
    for m in range(1, 120):
        values = list(map(float, range(m + 1)))
        for k in range(m):
            q = (2 * k + 1) / (2 * m)
            assert percentile(values, q) == nearest_rank(values, q), (m, q)


def test_linear_is_the_simulations_old_percentile_exactly():
    rng = random.Random(1)
    for _ in range(5_000):
        values = [rng.random() * 100 for _ in range(rng.randint(1, 50))]
        p = rng.randint(0, 100)
        assert percentile(values, p / 100, "linear") == float(np.percentile(values, p))
    assert np.isnan(percentile([], .5, "linear")) and np.isnan(percentile([], .5))


def test_wav_bytes_is_a_mono_16_bit_wav_clipped_to_full_scale():
    audio = np.array([0.0, 0.5, -0.5, 2.0, -2.0])
    with wave.open(io.BytesIO(wav_bytes(audio, 22050))) as w:
        assert (w.getnchannels(), w.getsampwidth(), w.getframerate(), w.getnframes()) == (1, 2, 22050, 5)
        pcm = np.frombuffer(w.readframes(5), "<i2")
    assert pcm.tolist() == [0, 16383, -16383, 32767, -32767]


def test_soak_starts_its_server_with_live_server(tmp_path, monkeypatch):
    started = {}

    class FakeServer:
        def __init__(self, env, log_path, **kwargs):
            started.update(env=env, log_path=log_path, **kwargs)

    monkeypatch.setattr(soak, "LiveServer", FakeServer)
    args = argparse.Namespace(seed=3, max_active=4, max_queue=2, start_timeout=60, port=0)
    server = soak.start_tiny_server(tmp_path, args)
    assert isinstance(server, FakeServer) and started["log_path"] == tmp_path / "server.log"
    assert started["port"] == 0 and started["ready_timeout"] == 60
    env = started["env"]
    assert (env["ECHO_DEVICE"], env["ECHO_MODEL_DTYPE"], env["ECHO_MAX_ACTIVE"], env["ECHO_MAX_QUEUE"]) == \
        ("cpu", "float32", "4", "2")
    with wave.open(str(tmp_path / "voices" / "soakvoice.wav")) as w:
        assert (w.getframerate(), w.getnframes()) == (44100, 3 * 44100)
    assert not hasattr(soak, "stop_server")  # stopping is LiveServer.stop's


@pytest.mark.parametrize("values", [[1.0], [3.0, 1.0, 2.0]])
def test_one_value_or_the_extremes(values):
    assert percentile(values, 0) == min(values) and percentile(values, 1) == max(values)
