"""The one pipeline behind every transport (pipeline.py): a request in, encoded pieces out, its job
and encoder owned in one place. A made-up transport is framing only and gets the audio HTTP gets;
whatever way a consumer stops, nothing is left running or holding a slot."""

import asyncio
import io
import os
import tempfile
import time
import tracemalloc

import av
import numpy as np
import pytest
import soundfile as sf

import pipeline
from pipeline import open_speech
from speech_request import RequestError, SpeechRequest
from conftest import idle
from test_server import FAST

HELLO = {"input": "Hello there. This is a test.", "voice": "none", "seed": 3, **FAST}


def request(**fields) -> SpeechRequest:
    return SpeechRequest.model_validate({**HELLO, **fields})


def test_a_new_transport_is_framing_only_and_gets_the_audio_http_gets(tiny_service, app):
    async def length_prefixed() -> bytes:  # a made-up protocol: each piece behind its 4-byte length
        speech = await open_speech(tiny_service, request(response_format="pcm", stream=True), streaming=True)
        framed = b"".join([len(data).to_bytes(4, "big") + data async for data in speech.pieces()])
        return framed

    framed = asyncio.run(length_prefixed())
    pieces, offset = [], 0
    while offset < len(framed):
        size = int.from_bytes(framed[offset:offset + 4], "big")
        pieces.append(framed[offset + 4:offset + 4 + size])
        offset += 4 + size
    http = app.post("/v1/audio/speech", json={**HELLO, "response_format": "pcm", "stream": True})
    assert len(pieces) > 1 and b"".join(pieces) == http.content
    assert len(http.content) // 2 == 16 * 2048  # 16 latent frames of 2048 samples, as the listener hears it


def test_the_whole_file_of_the_pipeline_is_a_playable_file_of_the_audio(tiny_service):
    async def whole() -> tuple[bytes, float]:
        speech = await open_speech(tiny_service, request(response_format="wav", stream=False), streaming=False)
        return b"".join([data async for data in speech.pieces()]), speech.audio_seconds

    data, seconds = asyncio.run(whole())
    audio, rate = sf.read(io.BytesIO(data))
    assert rate == 44100 and len(audio) == 16 * 2048 and seconds == pytest.approx(len(audio) / rate)


def temporary_files() -> set[str]:
    """The temporary files this process holds open (deleted from their directory as they are made)."""
    links = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            links.add(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            pass  # (closed meanwhile: the listing's own)
    return {link for link in links if link.startswith(tempfile.gettempdir())}


LONG_FILE = {"input": "Hello there. This is a test.", "block_sizes": [25] * 8, "num_steps": [1] * 8,
             "early_stop_on_zero": False, "sample_rate": 48000, "speed": 0.25}  # a 3.6 MB wav


@pytest.mark.parametrize("fmt", ["wav", "mp3", "flac", "opus", "aac", "pcm"])
def test_a_whole_file_past_its_memory_waits_on_disk_and_comes_back_the_same_file(tiny_service, monkeypatch, fmt):
    """stream=false: the encoder writes the file into a spool (a 4 KB request can ask for minutes of 48
    kHz audio: 337 MiB were held in memory, up to three times over), on disk past FILE_IN_MEMORY,
    read back once complete; the temporary file goes with the speech."""
    async def whole(**fields) -> tuple[bytes, int, bool]:
        speech = await open_speech(tiny_service, request(response_format=fmt, stream=False, **fields),
                                   streaming=False)
        before, pieces, on_disk = temporary_files(), [], False
        async for data in speech.pieces():
            on_disk = on_disk or len(temporary_files()) > len(before)
            pieces.append(data)
        return b"".join(pieces), speech.file_bytes, on_disk

    in_memory, size, on_disk = asyncio.run(whole())
    assert size == len(in_memory) > 1000 and not on_disk
    monkeypatch.setattr(pipeline, "FILE_IN_MEMORY", 1000)
    before = temporary_files()
    spooled, size, on_disk = asyncio.run(whole())
    assert on_disk and size == len(spooled)
    if fmt == "opus":  # (each Ogg stream has a random serial number: the same audio, decoded)
        spooled, in_memory = decoded(spooled), decoded(in_memory)
    assert spooled == in_memory
    assert temporary_files() == before and idle(tiny_service)


def decoded(data: bytes) -> bytes:
    with av.open(io.BytesIO(data)) as container:
        return b"".join(frame.to_ndarray().tobytes() for frame in container.decode(audio=0))


def test_a_whole_file_is_held_once_and_on_disk_past_its_memory(tiny_service, monkeypatch):
    """Traced memory while a 3.6 MB wav is made: the PCM writer held every block, then joined them and
    put the header before them (three copies at the end)."""
    async def size_and_peak() -> tuple[int, int]:
        speech = await open_speech(tiny_service, request(response_format="wav", stream=False, **LONG_FILE),
                                   streaming=False)
        size = sum([len(data) async for data in speech.pieces()])
        return size, tracemalloc.get_traced_memory()[1]

    monkeypatch.setattr(pipeline, "FILE_IN_MEMORY", 64 * 1024)
    asyncio.run(size_and_peak())  # (what is made once: resamplers, filter graphs)
    tracemalloc.start()
    try:
        size, peak = asyncio.run(size_and_peak())
    finally:
        tracemalloc.stop()
    assert size > 3_000_000 and peak < size, (size, peak)


def test_a_whole_file_whose_consumer_leaves_takes_its_temporary_file_along(tiny_service, monkeypatch):
    monkeypatch.setattr(pipeline, "FILE_IN_MEMORY", 1000)
    before = temporary_files()

    async def first_piece_only() -> None:
        speech = await open_speech(tiny_service, request(response_format="wav", stream=False), streaming=False)
        pieces = speech.pieces()
        assert await anext(pieces) and len(temporary_files()) > len(before)
        await pieces.aclose()

    asyncio.run(first_piece_only())
    assert temporary_files() == before and idle(tiny_service)


def test_a_whole_file_response_whose_client_left_before_its_body_lets_go_of_its_file_at_once(tiny_service,
                                                                                               monkeypatch):
    """Starlette leaves a body it never iterated to the garbage collector: the speech, and a whole
    file's spool on disk (hundreds of MB), stayed until it ran."""
    from types import SimpleNamespace

    from starlette.requests import ClientDisconnect

    import api_server

    monkeypatch.setattr(pipeline, "FILE_IN_MEMORY", 1000)
    before = temporary_files()
    timing = SimpleNamespace(sent=lambda: None, finished=lambda seconds: None)

    async def gone(message):
        raise OSError("connection reset by peer")

    async def disconnected():
        return {"type": "http.disconnect"}

    async def respond_to_a_gone_client() -> tuple[bool, set[str]]:
        speech = await open_speech(tiny_service, request(response_format="wav", stream=False), streaming=False)
        response = await api_server._whole_file(speech, {}, timing)
        on_disk = len(temporary_files()) > len(before)
        with pytest.raises(ClientDisconnect):
            await response({"type": "http", "asgi": {"version": "3.0", "spec_version": "2.4"}}, disconnected, gone)
        return on_disk, temporary_files()  # (while the response, and its body, are still here)

    on_disk, after = asyncio.run(respond_to_a_gone_client())
    assert on_disk and after == before and idle(tiny_service)


@pytest.mark.parametrize("stream", [True, False])
def test_a_response_whose_client_left_mid_body_counts_the_departure_and_lets_go_at_once(tiny_service, monkeypatch,
                                                                                          stream):
    """The departure (echo_client_departures_total) was counted when the garbage collector ran the
    body's ending, and a whole file's was never counted."""
    from types import SimpleNamespace

    from starlette.requests import ClientDisconnect

    import api_server

    monkeypatch.setattr(pipeline, "FILE_IN_MEMORY", 1000)
    before, events = temporary_files(), []
    timing = SimpleNamespace(sent=lambda: None, finished=lambda seconds: None, left=lambda: events.append("left"),
                             failed=lambda error: events.append("failed"))

    async def gone_after_the_headers(message):
        if message["type"] == "http.response.body":
            raise OSError("connection reset by peer")

    async def disconnected():
        return {"type": "http.disconnect"}

    async def respond() -> tuple[list[str], set[str], bool]:
        fields = {"input": "Hello there. " * 20, "chunking_enabled": True} if stream else {}
        speech = await open_speech(tiny_service, request(response_format="wav", stream=stream, **fields),
                                   streaming=stream)
        await speech.first_audio()
        response = (api_server.SpeechResponse(speech, api_server._audio_bytes(speech, timing)) if stream
                    else await api_server._whole_file(speech, {}, timing))
        with pytest.raises(ClientDisconnect):
            await response({"type": "http", "asgi": {"version": "3.0", "spec_version": "2.4"}}, disconnected,
                           gone_after_the_headers)
        return list(events), temporary_files(), speech._closed  # (while the response and its body are still here)

    counted, files, closed = asyncio.run(respond())
    assert counted == ["left"] and files == before and closed and idle(tiny_service)


def test_a_whole_file_holds_its_size_of_the_budget_until_it_ends_however_it_ends(tiny_service, monkeypatch):
    """ECHO_MAX_WHOLE_FILES_BYTES: a file is charged what it grows to (a wav header rewritten at the
    end is not charged twice) and gives it back when it completes, when its consumer leaves, when it
    is refused and when it would pass the budget (507)."""
    budget = tiny_service.whole_files
    monkeypatch.setattr(pipeline, "FILE_IN_MEMORY", 1000)  # (the budget counts memory and disk alike)

    async def held_while_sent(read_all: bool) -> tuple[int, int | None]:
        speech = await open_speech(tiny_service, request(response_format="wav", stream=False), streaming=False)
        pieces = speech.pieces()
        await anext(pieces)
        held = budget.held
        if read_all:
            [_ async for _ in pieces]
        await pieces.aclose()
        return held, speech.file_bytes

    held, size = asyncio.run(held_while_sent(read_all=True))
    assert held == size > 0 and budget.held == 0
    assert asyncio.run(held_while_sent(read_all=False))[0] == size and budget.held == 0

    async def refused(**fields) -> RequestError:
        with pytest.raises(RequestError) as refusal:
            speech = await open_speech(tiny_service, request(response_format="wav", stream=False, **fields),
                                       streaming=False)
            [_ async for _ in speech.pieces()]
        return refusal.value

    assert asyncio.run(refused(voice="nobody")).status == 400 and budget.held == 0
    monkeypatch.setattr(budget, "limit", size - 1)
    error = asyncio.run(refused())
    assert error.status == 507 and "stream=true" in str(error) and budget.held == 0
    monkeypatch.setattr(budget, "limit", 10)  # not even room for the header, written as the encoder opens
    error = asyncio.run(refused())
    assert error.status == 507 and "stream=true" in str(error) and budget.held == 0
    assert idle(tiny_service)


def test_a_codec_failure_in_a_whole_file_is_a_generation_failure_not_the_disks(tiny_service, monkeypatch):
    """PyAV's errors are OSErrors with errnos (a codec's bare -1 is EPERM): a whole file's codec
    failure was told as "cannot write the whole file to a temporary directory (TMPDIR)"."""
    import av

    def failing(self, samples):
        av.error.err_check(-1)

    monkeypatch.setattr(pipeline.AudioEncoder, "encode", failing)

    async def whole_file() -> RequestError:
        with pytest.raises(RequestError) as failure:
            speech = await open_speech(tiny_service, request(response_format="mp3", stream=False), streaming=False)
            [_ async for _ in speech.pieces()]
        return failure.value

    error = asyncio.run(whole_file())
    assert error.status == 500 and error.code == "generation_failed", error.detail()
    assert idle(tiny_service) and tiny_service.whole_files.held == 0


def test_a_consumer_that_stops_early_leaves_nothing_running(tiny_service):
    async def first_piece_only() -> None:
        speech = await open_speech(tiny_service, request(input="Hello there. " * 20, **{"chunking_enabled": True}),
                                   streaming=True)
        pieces = speech.pieces()
        assert await anext(pieces)
        await pieces.aclose()  # a transport whose client left: its generator is closed

    asyncio.run(first_piece_only())
    assert idle(tiny_service)


def closes_of(monkeypatch) -> list[str]:
    """Records "opened" and "closed" for every encoder the pipeline opens from now on."""
    events = []
    real = pipeline.open_encoder

    def tracked(*args, **kwargs):
        encoder = real(*args, **kwargs)
        close = encoder.close
        encoder.close = lambda: (events.append("closed"), close())
        events.append("opened")
        return encoder

    monkeypatch.setattr(pipeline, "open_encoder", tracked)
    return events


def test_close_is_the_one_place_that_lets_go_and_may_be_called_again(tiny_service, monkeypatch):
    events = closes_of(monkeypatch)

    async def opened_and_closed() -> pipeline.Speech:
        speech = await open_speech(tiny_service, request(), streaming=True)
        speech.close()
        speech.close()
        return speech

    speech = asyncio.run(opened_and_closed())
    assert events == ["opened", "closed"] and speech.started.stream._ticket.cancelled.is_set() and idle(tiny_service)


def test_a_refused_request_leaves_no_slot_and_no_encoder(tiny_service, monkeypatch):
    events = closes_of(monkeypatch)

    async def refused():
        with pytest.raises(RequestError) as refusal:
            await open_speech(tiny_service, request(voice="nobody"), streaming=True)
        return refusal.value

    error = asyncio.run(refused())
    assert error.status == 400 and error.param == "voice"
    assert events == ["opened", "closed"] and tiny_service.runtime.worker.pending == 0


def test_stop_ends_the_pieces_after_the_encoders_tail_in_whole_samples(tiny_service):
    async def stopped_after_one() -> tuple[list[bytes], int]:
        speech = await open_speech(tiny_service, request(input="Hello there. " * 20, chunking_enabled=True,
                                                         response_format="pcm", sample_rate=24000), streaming=True)
        out = []
        async for data in speech.pieces():
            out.append(data)
            speech.stop()
        return out, speech.samples

    pieces, samples = asyncio.run(stopped_after_one())
    assert 1 <= len(pieces) <= 2 and all(len(p) % 2 == 0 for p in pieces)  # the first block, then the resampler's tail
    heard = sum(len(p) for p in pieces) // 2
    assert heard == pytest.approx(samples * 24000 / 44100, abs=2) and idle(tiny_service)


def test_a_generation_failure_is_the_requests_error_with_its_traceback_logged_once(tiny_service, monkeypatch,
                                                                                   caplog):
    def broken(calls):
        raise RuntimeError("the GPU caught fire")

    monkeypatch.setattr(tiny_service.engine, "steps", broken)

    async def failing():
        speech = await open_speech(tiny_service, request(), streaming=True)
        with pytest.raises(RequestError) as failure:
            await speech.first_audio()
        speech.close()
        return failure.value

    error = asyncio.run(failing())
    assert error.status == 500 and "GPU caught fire" in str(error) and error.detail()["type"] == "server_error"
    assert idle(tiny_service)
    assert sum(r.exc_info is not None and "GPU caught fire" in str(r.exc_info[1]) for r in caplog.records) == 1


def test_pcm_pieces_decode_to_the_blocks_the_worker_made(tiny_service):
    async def pieces_and_blocks():
        speech = await open_speech(tiny_service, request(response_format="pcm"), streaming=True)
        return [np.frombuffer(p, "<i2") async for p in speech.pieces()], speech.samples

    pieces, samples = asyncio.run(pieces_and_blocks())
    assert sum(p.size for p in pieces) == samples == 16 * 2048


def test_a_streamed_blocks_first_bytes_wait_for_one_small_slice_and_the_bytes_are_the_whole_encodings(tiny_service):
    """mp3, OpenAI's default: the encoder gets each block in growing slices, so the first bytes leave
    once 8192 samples are encoded, not a whole block; the stream is byte for byte the encoding of the
    same audio in one call, and plays as long as the audio made. A whole file is encoded block by block;
    a stream in pcm is sliced as mp3 is (a listener playing it as it comes takes it slice by slice)."""
    async def encoded(streaming: bool, fmt: str = "mp3") -> tuple:
        speech = await open_speech(tiny_service, request(response_format=fmt, block_sizes=[24], num_steps=[2],
                                                         stream=streaming), streaming=streaming)
        sizes, audio, real = [], [], speech.encoder.encode

        def spy(block: np.ndarray) -> bytes:
            sizes.append(block.size)
            audio.append(block.copy())
            return real(block)

        speech.encoder.encode = spy
        pieces, calls_before = [], []
        async for data in speech.pieces():
            pieces.append(data)
            calls_before.append(len(sizes))
        return pieces, sizes, calls_before, speech, np.concatenate(audio)

    pieces, sizes, calls_before, speech, audio = asyncio.run(encoded(streaming=True))
    assert sizes[:2] == [8192, 16384] and calls_before[0] == 1 and sum(sizes) == speech.samples == audio.size
    whole = pipeline.open_encoder("mp3", input_rate=44100, output_rate=speech.encoder.sample_rate, speed=1.0,
                                  streaming=True)
    assert b"".join(pieces) == whole.encode(audio) + whole.finish()
    whole.close()
    with av.open(io.BytesIO(b"".join(pieces))) as container:
        heard = sum(frame.samples for frame in container.decode(audio=0)) / speech.encoder.sample_rate
    assert heard == pytest.approx(audio.size / 44100, abs=0.06)  # (+ the mp3 priming and padding)
    _, whole_sizes, _, _, whole_audio = asyncio.run(encoded(False, "mp3"))
    assert whole_sizes[0] > 8192 and len(whole_sizes) < len(sizes) and np.array_equal(whole_audio, audio)
    _, pcm_sizes, _, _, pcm_audio = asyncio.run(encoded(True, "pcm"))
    assert pcm_sizes == sizes and np.array_equal(pcm_audio, audio)
    assert idle(tiny_service)


def test_slices_cover_a_block_in_order_doubling_to_the_largest():
    block = np.arange(480 * 2048, dtype=np.float32)
    parts = list(pipeline.slices(block))
    assert [p.size for p in parts] == [8192, 16384, 32768, 65536, 131072, 262144, 262144, 204800]
    assert np.array_equal(np.concatenate(parts), block) and all(p.base is block for p in parts)  # views, not copies
    assert [p.size for p in pipeline.slices(block[:5000])] == [5000] and list(pipeline.slices(block[:0])) == []


def test_a_cancelled_consumer_frees_the_codec_only_after_its_running_encode_returns():
    """Cancelling the task that reads the pieces while an encode runs on its thread (natively, again
    every turn of the loop, or as asyncio.run does at exit): close() follows at once and must wait for
    that encode; freeing the codec under it crashed the process (SIGSEGV)."""
    import threading

    from audio_encoding import open_encoder

    encoder = open_encoder("mp3", streaming=True)
    events, entered = [], threading.Event()
    write, close = encoder._writer.write, encoder._writer.close

    def slow_write(samples):
        events.append("encode started")
        entered.set()
        time.sleep(0.3)
        data = write(samples)
        events.append("encode returned")
        return data

    encoder._writer.write = slow_write
    encoder._writer.close = lambda: (events.append("closed"), close())[1]

    class Stream:
        steps_used = None

        def __aiter__(self):
            return self

        async def __anext__(self):
            return np.zeros(4096, np.float32)

        def cancel(self):
            pass

    class Started:
        stream, voice = Stream(), "v"

    async def scenario():
        speech = pipeline.Speech(Started(), encoder)

        async def consume():
            async for _ in speech.pieces():
                pass

        task = asyncio.create_task(consume())
        await asyncio.to_thread(entered.wait, 10)
        while not task.done():  # as anyio's cancel scope does (Starlette's streaming): again every turn
            task.cancel()
            await asyncio.sleep(0)
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(scenario())
    assert events[:3] == ["encode started", "encode returned", "closed"]


def test_each_piece_sent_tells_the_worker_its_client_is_there(tiny_service):
    """A listener who plays pcm as it comes takes a 30 s block in 30 s: the whole block was one piece,
    and the worker, which heard from the client only when it took the next block, stopped the parked job
    as stalled (ECHO_SEND_TIMEOUT) while the client read steadily."""
    async def scenario():
        speech = await open_speech(tiny_service, request(response_format="pcm", block_sizes=[24], num_steps=[2]),
                                   streaming=True)
        touched, touch = [], speech.started.stream.touch
        speech.started.stream.touch = lambda: (touched.append(speech.samples), touch())
        sent = []
        async for data in speech.pieces():
            sent.append(speech.samples)
        return sent, touched

    sent, touched = asyncio.run(scenario())
    assert len(sent) > 2 and touched == sent[:len(touched)] and len(touched) >= len(sent) - 1
    assert idle(tiny_service)
