"""VAD reroll: the silence detector on real speech, and blocks sampled again while they hold a long silence."""

import asyncio
import shutil
import subprocess

import numpy as np
import pytest
import soxr
import torch

import engine as eng
import worker as wk
from test_engine import SETTINGS, _collect
from vad import SilenceDetector, longest_gap
from voices import SpeakerCache

FIRST = 8 * 2048 - 220  # the first block's samples that leave before the chunk-join fade holds some back


def test_longest_gap_counts_leading_inner_and_trailing_silence():
    assert longest_gap([], 100) == 100
    assert longest_gap([{"start": 10, "end": 20}, {"start": 70, "end": 80}], 100) == 50
    assert longest_gap([{"start": 40, "end": 90}], 100) == 40


@pytest.fixture(scope="module")
def spoken() -> np.ndarray:
    """A real spoken sentence (espeak-ng) at 44.1 kHz."""
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (apt-get install espeak-ng; CI installs it)")
    wav = subprocess.run(["espeak-ng", "--stdout", "This is a sentence of real speech, spoken at an even pace "
                          "so that the detector hears words from the start to the end."],
                         capture_output=True, check=True).stdout
    pcm = np.frombuffer(wav[44:], "<i2").astype(np.float32) / 32768  # espeak-ng writes 22050 Hz mono WAV
    return soxr.resample(pcm, 22050, 44100)


def test_the_detector_finds_a_silence_inserted_into_real_speech(spoken):
    detector = SilenceDetector()
    middle = len(spoken) // 2
    paused = np.concatenate([spoken[:middle], np.zeros(int(1.5 * 44100), np.float32), spoken[middle:]])
    assert detector(spoken) < 0.8
    assert 1.3 < detector(paused) < 2.2
    assert detector(np.zeros(44100, np.float32)) == pytest.approx(1.0, abs=0.01)


class ScriptedDetector:
    """Reports the scripted silences for blocks of `samples` samples (in order), 0 s for all others."""

    def __init__(self, samples: int, silences: list[float]):
        self.samples, self.silences, self.calls = samples, list(silences), 0

    def __call__(self, audio: np.ndarray) -> float:
        if audio.size == self.samples and self.silences:
            self.calls += 1
            return self.silences.pop(0)
        return 0.0


def job(seed: int, blocks=(8, 8)) -> eng.SpeechJob:
    shape = eng.BlockShape(blocks, (2,) * len(blocks))
    return eng.SpeechJob(("[S1] Hello there.",), None, seed, shape, shape, SETTINGS, eng.EarlyStop(enabled=False))


def engine_with(tiny_model, tiny_fish, tiny_pca, detector=None, max_rerolls=3) -> eng.SpeechEngine:
    reroll = eng.VadReroll(detector, 1.0, max_rerolls) if detector is not None else None
    return eng.SpeechEngine(tiny_model, tiny_fish, tiny_pca, SpeakerCache(4), reroll=reroll)


def audio_of(engine, j) -> np.ndarray:
    return np.concatenate(list(engine.generate(j)))


def test_a_block_with_a_long_silence_is_sampled_again_from_the_next_seed(tiny_model, tiny_fish, tiny_pca):
    plain = engine_with(tiny_model, tiny_fish, tiny_pca)
    detector = ScriptedDetector(8 * 2048, [2.0])  # the first attempt at block 1 is "silent"
    rerolling = engine_with(tiny_model, tiny_fish, tiny_pca, detector)
    rerolled, original, next_seed = audio_of(rerolling, job(5)), audio_of(plain, job(5)), audio_of(plain, job(6))
    assert rerolling.rerolls == 1 and detector.calls == 1
    # block 1 came from seed 6's noise, decoded from the decoder's state before the failed attempt
    np.testing.assert_array_equal(rerolled[:FIRST], next_seed[:FIRST])
    assert not np.array_equal(rerolled[:FIRST], original[:FIRST]) and rerolled.shape == original.shape


def test_when_every_attempt_fails_the_one_with_the_least_silence_is_kept(tiny_model, tiny_fish, tiny_pca):
    plain = engine_with(tiny_model, tiny_fish, tiny_pca)
    detector = ScriptedDetector(8 * 2048, [3.0, 1.5, 2.5, 2.0])  # seeds 5, 6, 7, 8: seed 6 is the least bad
    rerolling = engine_with(tiny_model, tiny_fish, tiny_pca, detector, max_rerolls=3)
    rerolled = audio_of(rerolling, job(5))
    assert rerolling.rerolls == 3 and detector.calls == 4
    np.testing.assert_array_equal(rerolled[:FIRST], audio_of(plain, job(6))[:FIRST])
    # the next block continues from the kept block: the stream is as long and as smooth as ever
    assert rerolled.shape == audio_of(plain, job(5)).shape


def test_one_request_rerolls_while_the_others_in_its_batch_are_unaffected(tiny_model, tiny_fish, tiny_pca):
    plain = engine_with(tiny_model, tiny_fish, tiny_pca)
    detector = ScriptedDetector(4 * 2048, [2.0])  # only the job with 4-frame blocks gets a "silent" block
    rerolling = engine_with(tiny_model, tiny_fish, tiny_pca, detector)
    jobs = [job(5, blocks=(4, 4)), job(9), job(10, blocks=(8, 4))]
    worker = wk.GenerationWorker(rerolling, max_waiting=4, max_active=3)
    try:
        together = asyncio.run(_collect(worker, jobs))
    finally:
        worker.close()
    assert rerolling.rerolls == 1
    for j, audio in zip(jobs[1:], together[1:]):
        np.testing.assert_array_equal(audio, audio_of(plain, j))
    np.testing.assert_array_equal(together[0][:4 * 2048 - 220], audio_of(plain, job(6, blocks=(4, 4)))[:4 * 2048 - 220])


@pytest.mark.slow
def test_a_server_with_vad_reroll_counts_its_rerolls(tiny_echo_dir, tiny_fish_dir, voice_dir):
    from conftest import AppServer, server_env
    from test_server import _metric

    env = server_env(tiny_echo_dir, tiny_fish_dir, voice_dir, ECHO_VAD_REROLL_ENABLED="1",
                     ECHO_VAD_SILENCE_THRESHOLD_MS="300", ECHO_VAD_MAX_REROLLS="1")
    live = AppServer(env)  # the app in process: no socket or process is the point here
    try:
        body = {"input": "Hello.", "voice": "none", "seed": 1, "block_sizes": [32, 32], "num_steps": [2, 2]}
        assert live.post("/v1/audio/speech", json=body, timeout=120).status_code == 200
        rerolls = _metric(live, "echo_vad_rerolls")
        # the random tiny model speaks no words: its blocks are all silence to Silero, so each is rerolled once
        assert rerolls == 2 and live.log().count("sampling it again") == 2
    finally:
        live.stop()


@pytest.mark.parametrize("mode", ["independent", "continue"])
def test_the_silence_check_listens_to_the_speech_the_client_gets(tiny_model, tiny_fish, tiny_pca, monkeypatch,
                                                                 mode):
    """A chunk's last block holds its end of speech and the silence after it, which is cut before it is
    sent: only the speech is checked, so the cut silence never makes a block be sampled again."""
    from test_engine import scripted_blocks, speech

    heard = []

    def detector(audio):
        heard.append(audio.size)
        return 0.0 if audio.size <= 10 * 2048 else 5.0  # the whole block would be "silent"

    scripted_blocks(monkeypatch, [speech(8), torch.cat([speech(2), torch.zeros(30, 80)])])
    rerolling = engine_with(tiny_model, tiny_fish, tiny_pca, detector)
    shape = eng.BlockShape((8, 32), (1, 1))
    audio = np.concatenate(list(rerolling.generate(eng.SpeechJob(
        ("[S1] Hello there.",), None, 5, shape, shape, SETTINGS, eng.EarlyStop(enabled=False), chunk_mode=mode))))
    assert heard == [8 * 2048, 2 * 2048] and rerolling.rerolls == 0
    assert audio.size == 10 * 2048
