"""The engine's block handling: early stop, cropping at the end of speech, and joins between chunks."""

import numpy as np
import pytest
import torch

import engine as eng
import inference as inf
from voices import SpeakerCache

SETTINGS = inf.SamplerSettings(num_steps=0, cfg_scale_text=3.0, cfg_scale_speaker=8.0, cfg_min_t=0.5, cfg_max_t=1.0)


def job(chunks=("[S1] Hello.",), blocks=(8, 8, 8), early_stop=eng.EarlyStop()):
    shape = eng.BlockShape(blocks, (1,) * len(blocks))
    return eng.SpeechJob(tuple(chunks), None, 0, shape, shape, SETTINGS, early_stop)


@pytest.fixture()
def engine(tiny_model, tiny_fish, tiny_pca):
    return eng.SpeechEngine(tiny_model, tiny_fish, tiny_pca, SpeakerCache(4))


def scripted_blocks(monkeypatch, blocks):
    """Make the sampler yield these latent blocks; records how many were asked for."""
    consumed = []

    def fake_iter_blockwise(*args, **kwargs):
        for block in blocks:
            consumed.append(block)
            yield block[None]

    monkeypatch.setattr(eng, "iter_blockwise", fake_iter_blockwise)
    return consumed


def speech(frames):
    return 2.0 * torch.randn(frames, 80, generator=torch.Generator().manual_seed(frames))


def test_silent_tail_detection():
    stop = eng.EarlyStop(zero_eps=0.1, tail_frames=4, min_fraction=0.75)
    quiet = torch.cat([speech(8), torch.zeros(3, 80), speech(1)])
    assert stop.is_silent_tail(quiet)
    assert not stop.is_silent_tail(torch.cat([speech(8), torch.zeros(2, 80), speech(2)]))
    assert not eng.EarlyStop(enabled=False).is_silent_tail(torch.zeros(32, 80))


def test_chunk_stops_at_the_end_of_speech_and_skips_later_blocks(engine, monkeypatch):
    pause = [speech(8), torch.cat([speech(2), torch.zeros(6, 80)]), torch.zeros(8, 80), speech(8)]
    scripted_blocks(monkeypatch, pause)
    audio = np.concatenate(list(engine.generate(job(blocks=(8, 8, 8, 8)))))
    assert len(audio) == 32 * 2048  # 14 silent frames between speech are a pause, not the end

    blocks = pause[:3] + [torch.zeros(8, 80), speech(8)]
    consumed = scripted_blocks(monkeypatch, blocks)
    audio = np.concatenate(list(engine.generate(job(blocks=(8, 8, 8, 8, 8)))))
    # The flat run (from frame 10) was only certain after block 4; blocks 1-3 had been streamed
    # already, so the chunk ends there (24 frames), and block 5 is never generated.
    assert len(audio) == 24 * 2048 and len(consumed) == 4

    scripted_blocks(monkeypatch, [torch.cat([speech(10), torch.zeros(22, 80)]), speech(8)])
    audio = np.concatenate(list(engine.generate(job(blocks=(32, 8)))))
    assert len(audio) == 10 * 2048  # within one block the silent tail is cut before it is sent


def test_without_silence_every_block_is_kept(engine, monkeypatch):
    scripted_blocks(monkeypatch, [speech(8), speech(8), speech(8)])
    pieces = list(engine.generate(job()))
    assert sum(len(p) for p in pieces) == 24 * 2048
    assert len(pieces) >= 3  # one piece per block at least: streaming, not one lump


def test_zero_tail_early_stop_ends_the_chunk(engine, monkeypatch):
    tail = torch.cat([speech(8), torch.full((16, 80), 0.01)])
    consumed = scripted_blocks(monkeypatch, [tail, speech(8), speech(8)])
    stop = eng.EarlyStop(zero_eps=0.02, tail_frames=16, min_fraction=0.95)
    audio = np.concatenate(list(engine.generate(job(blocks=(24, 8, 8), early_stop=stop))))
    assert len(consumed) == 1 and len(audio) == 8 * 2048


def test_chunks_join_with_short_fades(engine, monkeypatch):
    scripted_blocks(monkeypatch, [speech(8), speech(8)])
    audio = np.concatenate(list(engine.generate(job(chunks=("[S1] One.", "[S1] Two."), blocks=(8,)))))
    assert len(audio) == 2 * 8 * 2048
    end_of_first, start_of_second = audio[8 * 2048 - 1], audio[8 * 2048]
    assert end_of_first == 0.0 and start_of_second == 0.0  # faded to and from silence at the join


def test_real_generation_is_deterministic_and_streams(engine):
    first = list(engine.generate(job()))
    second = list(engine.generate(job()))
    assert all(np.array_equal(a, b) for a, b in zip(first, second))
    assert sum(len(p) for p in first) == 24 * 2048


def test_cancellation_stops_within_a_step(engine):
    steps = []

    def on_step():
        steps.append(1)
        if len(steps) == 3:
            raise eng.GenerationCancelled()

    with pytest.raises(eng.GenerationCancelled):
        list(engine.generate(job(blocks=(8, 8, 8)), on_step=on_step))
    assert len(steps) == 3
