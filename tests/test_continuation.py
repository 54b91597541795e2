"""chunk_mode=continue (issue 22): chunk k continues chunk k-1's latents, one decoder for the answer."""

import asyncio
import time

import numpy as np
import pytest
import torch

import engine as eng
import inference as inf
import worker as wk
from inference_blockwise import PrefixCall, blockwise_steps
from text_chunking import (CONTINUATION_MAX_SECONDS, ChunkSettings, estimate_seconds, generation_bytes,
                           split_into_chunks)
from voices import SpeakerCache

SETTINGS = inf.SamplerSettings(num_steps=0, cfg_scale_text=3.0, cfg_scale_speaker=8.0, cfg_min_t=0.5, cfg_max_t=1.0)
TEXTS = ("[S1] The first part of the story.", "[S1] Then it went on.", "[S1] And it ended here.")
STREAMED_TOLERANCE = 1e-4  # streamed == one decode, relative to the peak (the autoencoder tests' criterion)


def continued(chunks=TEXTS, seed=7, first=((8, 8), (2, 2)), later=((12,), (2,)), mode="continue"):
    return eng.SpeechJob(tuple(chunks), None, seed, eng.BlockShape(*first), eng.BlockShape(*later), SETTINGS,
                         eng.EarlyStop(enabled=False), chunk_mode=mode)


@pytest.fixture()
def engine(tiny_model, tiny_fish, tiny_pca):
    return eng.SpeechEngine(tiny_model, tiny_fish, tiny_pca, SpeakerCache(4))


def run_recording(engine, job):
    """Run a job's steps by hand: (the audio pieces it sends, the DAC latents (1, dim, n) it decodes;
    a block sampled again, VAD reroll, has its decode undone)."""
    steps, audio, decoded = engine.job_steps(job), [], []
    item = next(steps)
    while True:
        if isinstance(item, inf.ModelCall):
            reply = item.run(engine.model)
        elif isinstance(item, (eng.TextCall, PrefixCall)):
            reply = item.run()
        elif isinstance(item, eng.DecodeCall):
            decoded.append(item.z)
            reply = item.run()
        elif isinstance(item, eng.SilenceCheck):
            reply = item.run()
            if reply > engine.reroll.max_silence:
                decoded.pop()  # sampled again: this decode is undone
        else:
            audio.append(item)
            reply = None
        try:
            item = steps.send(reply)
        except StopIteration:
            return audio, decoded


def upstream_chunks(engine, job):
    """Each chunk from the blockwise sampler, continuing the previous chunk's latents with the
    previous chunk's text followed by its own; one generator for the answer. [(1, n, 80)]"""
    rng = inf.make_generator(job.seed, engine.model.device)
    speaker_latent, speaker_mask = inf.no_speaker(4, engine.model.device, engine.model.dtype)
    out, prefix = [], None
    for index, text in enumerate(job.chunks):
        prompt = text if index == 0 else f"{job.chunks[index - 1]} {text}"
        text = eng.TextCall.of(engine.model, prompt, job.normalize)  # the engine's text keys (bucket-padded)
        conditioning = inf.Conditioning(engine.model, speaker_latent, speaker_mask, None,
                                        text.mask[:, :text.tokens], job.sampler, kv_text=text.run())
        shape = job.shape_of_chunk(index)
        blocks = list(inf.run_steps(engine.model, blockwise_steps(engine.model, conditioning, rng, shape.block_sizes,
                                                                  shape.num_steps, job.sampler, prefix)))
        chunk = torch.cat(blocks, dim=1)
        assert inf.find_flattening_point(chunk[0]) == chunk.shape[1]  # the tiny model never falls silent
        out.append(chunk)
        prefix = chunk
    return out


def test_each_chunk_continues_the_previous_chunk_like_the_blockwise_sampler(engine):
    job = continued()
    _, decoded = run_recording(engine, job)
    expected = torch.cat(upstream_chunks(engine, job), dim=1)
    assert torch.equal(torch.cat(decoded, dim=-1), inf.latents_to_dac(engine.pca_state, expected))


def test_a_continued_prompt_reads_the_previous_chunk_with_its_own_speaker_tag(engine, monkeypatch):
    """The chunker gives a later chunk that opens with '(' an explicit [S1]; joined after an untagged
    chunk, that tag made normalisation leave the prompt's front (the previous chunk, whose audio is the
    prefix) without the [S1] it had when it was generated."""
    from text_chunking import split_into_chunks

    text = "This is a fairly ordinary sentence that goes on for a while. " * 6 + \
        "(sighs) And then it went on with another long part of speech. " * 4
    chunks = split_into_chunks(text, continuation=True)
    joined = next(i for i, c in enumerate(chunks) if c.startswith("[S1] (") and not chunks[i - 1].startswith("["))
    prompts = []
    of = eng.TextCall.of
    monkeypatch.setattr(eng.TextCall, "of", classmethod(lambda cls, model, text, normalize: (
        prompts.append(inf.normalize_text(text) if normalize else text), of(model, text, normalize))[1]))
    run_recording(engine, continued(chunks=chunks[joined - 1:joined + 1]))
    alone, pair = prompts
    assert pair == f"{alone} {chunks[joined]}" and alone.startswith("[S1] This is")


def test_continued_chunks_are_one_decode_of_the_joined_latents(engine, tiny_fish):
    audio, decoded = run_recording(engine, continued())
    streamed = np.concatenate(audio)
    whole = tiny_fish.decode_zq(torch.cat(decoded, dim=-1))[0, 0].numpy()
    assert streamed.shape == whole.shape == ((16 + 12 + 12) * 2048,)
    assert np.abs(streamed - whole).max() <= STREAMED_TOLERANCE * np.abs(whole).max()  # no fades, no restarts
    assert len(audio) >= 4  # still streamed block by block


def test_a_chunk_ending_early_is_continued_from_its_end_of_speech(engine, tiny_fish, monkeypatch):
    speech = 2.0 * torch.randn(640, 80, generator=torch.Generator().manual_seed(1))
    first = torch.cat([speech[:10], torch.zeros(22, 80)])  # speech ends at frame 10
    prefixes, shapes = [], []

    def scripted(model, conditioning, rng, block_sizes, num_steps, settings, continuation_latent=None):
        prefixes.append(continuation_latent)
        shapes.append(tuple(block_sizes))
        yield (first if len(prefixes) == 1 else speech[:block_sizes[0]])[None]

    monkeypatch.setattr(eng, "blockwise_steps", scripted)
    job = continued(chunks=TEXTS[:2], first=((32,), (1,)), later=((640,), (1,)))
    audio, decoded = run_recording(engine, job)
    assert torch.equal(prefixes[1][0], first[:10])  # the speech of chunk 0, not its silence
    assert shapes == [(32,), (630,)]  # prefix and continuation fit one generation
    # the block is decoded whole with where its speech ends (one host sync), then again up to there
    # from the decoder's state before it: the stream goes on from frame 10
    assert [z.shape[-1] for z in decoded] == [32, 10, 630]
    whole = tiny_fish.decode_zq(torch.cat(decoded[1:], dim=-1))[0, 0].numpy()
    assert np.abs(np.concatenate(audio) - whole).max() <= STREAMED_TOLERANCE * np.abs(whole).max()


def test_only_the_last_half_window_of_a_long_chunk_is_continued(engine, monkeypatch):
    prefixes = []

    def scripted(model, conditioning, rng, block_sizes, num_steps, settings, continuation_latent=None):
        prefixes.append(continuation_latent)
        yield torch.randn(1, block_sizes[0], 80, generator=torch.Generator().manual_seed(len(prefixes)))

    monkeypatch.setattr(eng, "blockwise_steps", scripted)
    run_recording(engine, continued(chunks=TEXTS[:2], first=((500,), (1,)), later=((640,), (1,))))
    assert prefixes[1].shape == (1, eng.CONTINUATION_FRAMES, 80)


def test_block_shapes_are_cut_to_the_room_left():
    shape = eng.BlockShape((32, 128, 480), (8, 15, 20))
    assert shape.cut_to(640) == shape
    assert shape.cut_to(200) == eng.BlockShape((32, 128, 40), (8, 15, 20))
    assert shape.cut_to(100) == eng.BlockShape((32, 68), (8, 15))


def test_continue_mode_reproduces_with_its_seed_and_differs_from_independent(engine):
    first = np.concatenate(list(engine.generate(continued())))
    again = np.concatenate(list(engine.generate(continued())))
    other_seed = np.concatenate(list(engine.generate(continued(seed=8))))
    independent = np.concatenate(list(engine.generate(continued(mode="independent"))))
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other_seed)
    assert first.shape == independent.shape and not np.allclose(first, independent)


def test_continued_jobs_batched_equal_solo(engine):
    jobs = [continued(), continued(seed=3, chunks=TEXTS[1:]), continued(mode="independent", seed=4),
            continued(seed=5, first=((4, 12), (2, 3)), later=((8, 8), (2, 2)))]
    solo = [np.concatenate(list(engine.generate(job))) for job in jobs]

    async def together():
        async def one(job):
            return np.concatenate([block async for block in worker.submit(job)])
        return await asyncio.gather(*(one(job) for job in jobs))

    worker = wk.GenerationWorker(engine, max_waiting=8, max_active=8)
    try:
        batched = asyncio.run(together())
    finally:
        worker.close()
    for alone, with_others in zip(solo, batched):
        assert np.array_equal(alone, with_others)


def test_continue_mode_can_be_cancelled_within_a_step(engine):
    steps = []

    def on_step():
        steps.append(1)
        if len(steps) == 6:  # in the second chunk
            raise eng.GenerationCancelled()

    with pytest.raises(eng.GenerationCancelled):
        list(engine.generate(continued(), on_step=on_step))
    assert len(steps) == 6


def test_vad_reroll_keeps_one_decoder_consistent(engine, tiny_fish):
    silences = iter([2.0, 0.0] * 10)
    engine.reroll = eng.VadReroll(lambda audio: next(silences), max_silence=1.0, max_rerolls=1)
    audio, decoded = run_recording(engine, continued())
    assert engine.rerolls == 4  # every block sampled twice
    whole = tiny_fish.decode_zq(torch.cat(decoded, dim=-1))[0, 0].numpy()
    streamed = np.concatenate(audio)
    assert streamed.shape == whole.shape
    assert np.abs(streamed - whole).max() <= STREAMED_TOLERANCE * np.abs(whole).max()


# ---- planning -------------------------------------------------------------------------------------

STORY = " ".join(f"Sentence number {i} tells a little more of the long story." for i in range(60))


def test_continued_chunks_fit_two_to_a_generation():
    chunks = split_into_chunks(STORY, continuation=True)
    independent = split_into_chunks(STORY)
    assert len(chunks) > 2 * len(independent) - 1
    for before, after in zip(chunks, chunks[1:]):
        assert estimate_seconds(before) + estimate_seconds(after) <= 2 * CONTINUATION_MAX_SECONDS < 640 * 2048 / 44100
        assert generation_bytes(f"{before} {after}") <= inf.MAX_TEXT_LENGTH
    assert " ".join(chunks) == STORY


def test_continued_chunks_of_wide_characters_fit_one_prompt_in_pairs():
    text = "\u4e2d\u6587\u53e5\u5b50\u3002" * 150  # 3 bytes a character
    settings = ChunkSettings(chars_per_second=40.0)
    assert any(generation_bytes(c) > inf.MAX_TEXT_LENGTH // 2 for c in split_into_chunks(text, settings))
    chunks = split_into_chunks(text, settings, continuation=True)
    assert all(generation_bytes(f"{a} {b}") <= inf.MAX_TEXT_LENGTH for a, b in zip(chunks, chunks[1:]))


# ---- the service and HTTP -----------------------------------------------------------------------


def test_chunk_mode_is_a_request_field_with_the_server_default(tiny_service):
    from speech_request import GenerationOptions

    options = GenerationOptions(input=STORY, voice="none", seed=1)
    assert tiny_service.build_job(options).chunk_mode == "independent"
    job = tiny_service.build_job(options.model_copy(update={"chunk_mode": "continue"}))
    assert job.chunk_mode == "continue"
    assert len(job.chunks) > len(tiny_service.build_job(options).chunks)


def test_a_continue_request_is_served_over_http(tiny_echo_dir, tiny_fish_dir, tmp_path):
    from fastapi.testclient import TestClient

    from api_server import create_app
    from settings import load_settings

    settings = load_settings(model_repo=str(tiny_echo_dir), fish_repo=str(tiny_fish_dir), device="cpu",
                             model_dtype="float32", voice_dirs=[tmp_path], warmup=False, chunk_mode="continue")
    body = {"input": "[S1] One short sentence. " * 3, "voice": "none", "seed": 2, "stream": False,
            "response_format": "pcm", "block_sizes": [8], "num_steps": 2, "chunk_target_seconds": 2,
            "chunk_min_seconds": 1, "chunk_max_seconds": 2}
    with TestClient(create_app(settings)) as client:
        deadline = time.monotonic() + 60
        while client.get("/ready").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.1)  # the models load on a thread of their own
        answers = [client.post("/v1/audio/speech", json={**body, "chunk_mode": mode}) for mode in
                   (None, "independent")]
    assert [a.status_code for a in answers] == [200, 200]
    assert answers[0].content and answers[0].content != answers[1].content
