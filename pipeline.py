"""One way from a validated speech request to encoded audio, behind every transport.

`open_speech` opens the request's encoder (its format and rate: SpeechRequest.output decides, from
the request, the operator's defaults and the model it names), then starts its job (a queue slot,
its voice resolved and prepared, service.start). The `Speech` it returns owns both (and a whole
file's spool), and `close()` is the one place they are let go of: the job stops within a diffusion
step, the codec and the spool are freed. It
closes itself when its pieces run out or fail, and is idempotent, so a transport closes it once
more wherever it stops early.

`Speech.pieces()` yields the encoded bytes of each decoded block as soon as they exist, then the
encoder's tail. A streaming mp3, opus or aac encoder gets each block in slices (`slices`): the
first 8192 samples, then twice as many each time, up to 262144 (~6 s). So a block's first bytes
wait for one small slice's encoding, not the whole block's (mp3, OpenAI's default format: ~3 ms
against ~23 ms for the first 32-frame block on 2 CPU cores), each slice's encoding takes less time
than the audio sent before it plays, and a block costs a few thread hops (8 for 480 frames). The
bytes are the same however a block is sliced (audio_encoding keeps codec state across calls).
Formats that encode in a few milliseconds (pcm, wav, flac) get whole blocks. A whole file
(`streaming=False`, whose sizes are exact) is written by its encoder into a spool, in memory up to
FILE_IN_MEMORY bytes and in a temporary file past that, and its pieces are read from there once
it is complete: a 4 KB request can ask for minutes of 48 kHz audio, hundreds of megabytes. All whole
files together, written or waiting for their clients, hold at most ECHO_MAX_WHOLE_FILES_BYTES; one
that would pass it is refused as a full disk is (507).

The transports only frame the pieces: HTTP streams them as the body, SSE wraps each in an event, a
whole-file response sends them after their total size, the WebSocket cuts them into frames. A new transport
(a realtime protocol, say) is framing only.

Every failure below the transports is a RequestError: refused before anything started (settings,
output rate and speed, a full queue, the voice), or failed while generating or encoding
(service.generation_failure: 400, 408, 500 or 504; a whole file the disk has no room for: 507, or
no temporary directory can hold: 500). A client that leaves while its audio is awaited with a
`client_gone` watch is ClientGone.
"""

from __future__ import annotations

import asyncio
import io
import logging
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import BinaryIO, TypeVar

import av
import numpy as np
from starlette.concurrency import run_in_threadpool

from audio_encoding import AudioEncoder, InvalidAudioParameter, open_encoder
from inference import SAMPLE_RATE
from observability import request_id
from service import ByteBudget, SpeechService, Started, generation_failure
from settings import Settings
from errors import STORAGE_ERRNOS, RequestError, storage_failure
from speech_request import SpeechRequest

DISCONNECT_POLL_SECONDS = 0.05  # how often a watched wait for audio asks whether the client is still there
FIRST_SLICE = 8192  # samples (186 ms): bytes from 16 kHz up at speed 1 (other rates and speeds: the next slice)
LARGEST_SLICE = 262144  # samples (5.9 s)
# a whole file (stream=false) is written into a spool: in memory up to FILE_IN_MEMORY bytes (a 30 s mp3 is
# ~0.5 MB, 4 minutes of 44.1 kHz wav ~21 MB), in a temporary file past that; read back FILE_PIECE at a time
FILE_IN_MEMORY, FILE_PIECE = 8 << 20, 1 << 16
log = logging.getLogger(__name__)
T = TypeVar("T")


class ClientGone(Exception):
    """The client closed the connection while its audio was awaited."""


def request_encoder(request: SpeechRequest, settings: Settings, streaming: bool,
                    file: BinaryIO | None = None) -> AudioEncoder:
    """The request's encoder at its format and rate (whole-file: writing into `file`); a bad rate or
    speed is a RequestError naming it."""
    fmt, rate = request.output(settings.default_response_format, settings.output_sample_rate)
    try:
        return open_encoder(fmt, input_rate=SAMPLE_RATE, output_rate=rate, speed=request.speed, streaming=streaming,
                            file=file)
    except InvalidAudioParameter as e:
        raise RequestError(str(e), e.param) from None
    except OSError as e:  # (a whole file's header, written at once, finds the budget or the disk full)
        if file is None or not _is_storage_failure(e):
            raise
        raise _whole_file_failure(e) from None


async def open_speech(service: SpeechService, request: SpeechRequest, streaming: bool,
                      client_gone: Callable[[], Awaitable[bool]] | None = None) -> Speech:
    """The request's speech, generating. Raises RequestError when it is refused (nothing is left
    open then). `client_gone`, when given, is polled while its job starts (its voice prepared) and
    while audio is awaited (`first_audio`, and every block of `pieces(watched=True)`): ClientGone."""
    file = None if streaming else _Spool(service.whole_files)
    try:
        encoder = request_encoder(request, service.settings, streaming, file)
    except BaseException:
        if file is not None:
            file.close()
        raise
    # watched: a client that leaves while its voice is prepared gives its queue slot back at once
    start = asyncio.ensure_future(service.start(request.generation_options(), request_id.get()))
    try:
        started = await (_watching(start, client_gone) if client_gone is not None else start)
    except BaseException:  # refused, the client left, or the caller was cancelled meanwhile
        encoder.close()
        if file is not None:
            file.close()
        start.cancel()
        if start.done() and not start.cancelled() and start.exception() is None:
            start.result().stream.cancel()  # (started just as the client was found gone)
        raise
    return Speech(started, encoder, client_gone, file)


class _Spool(tempfile.SpooledTemporaryFile):
    """A whole file as it is written: in memory up to FILE_IN_MEMORY bytes, in a temporary file past
    that; its size is charged to `budget` (the server's ECHO_MAX_WHOLE_FILES_BYTES) as it grows and
    given back when it is closed. Growing past the budget fails as a full disk does (507)."""

    def __init__(self, budget: ByteBudget):
        super().__init__(max_size=FILE_IN_MEMORY)
        self._budget, self._charged = budget, 0

    def write(self, data) -> int:
        if (end := self.tell() + memoryview(data).nbytes) > self._charged:
            self._budget.take(end - self._charged)
            self._charged = end
        return super().write(data)

    def writelines(self, lines) -> None:
        for line in lines:
            self.write(line)

    def close(self) -> None:
        try:
            super().close()
        finally:
            self._budget.give(self._charged)
            self._charged = 0


class Speech:
    """One request's generation and its encoder (and a whole file's `file`), owned together (see the
    module's docstring)."""

    def __init__(self, started: Started, encoder: AudioEncoder,
                 client_gone: Callable[[], Awaitable[bool]] | None = None, file: BinaryIO | None = None):
        self.started, self.encoder, self._file = started, encoder, file
        self.samples = 0  # generated (44.1 kHz) and handed to the encoder so far
        self.file_bytes: int | None = None  # a whole file's size, once it is complete
        self._client_gone = client_gone
        self._first: np.ndarray | None = None  # awaited by first_audio, not yet encoded
        self._awaited = self._ended = self._stopped = self._closed = False

    @property
    def seed(self) -> int:
        return self.started.job.seed

    @property
    def voice(self) -> str:
        return self.started.voice

    @property
    def audio_seconds(self) -> float:
        """Seconds of audio the listener gets so far: generated, at the request's speed."""
        return self.samples / SAMPLE_RATE / self.encoder.speed

    def steps_report(self) -> dict:
        return self.started.steps_report()

    async def first_audio(self) -> None:
        """Wait for the first block (watched): a generation that fails before any audio raises its
        RequestError here, while a transport can still answer it as a status."""
        if not self._awaited:
            self._awaited = True
            self._first = await self._next(watched=True)
            self._ended = self._first is None

    async def pieces(self, watched: bool = False) -> AsyncIterator[bytes]:
        """Encoded bytes of every block, slice by slice, as soon as they exist, then the encoder's
        tail (empty pieces skipped); for a whole file, its pieces read back once it is complete.
        After `stop()` no further slice is encoded; the tail still is (whole samples). Raises
        RequestError when the generation or the encoding fails; closes at the end."""
        try:
            await self.first_audio()
            block, self._first = self._first, None
            while block is not None and not self._stopped:
                # streamed in slices: a lossy codec's first bytes wait for one slice, not the block; and
                # a listener who plays as it comes takes a 30 s block in 30 s: each slice it takes
                # tells the worker it is there (its parked job's stall clock, JobStream.touch)
                for part in slices(block) if self.encoder.streaming else (block,):
                    self.samples += part.size
                    if data := await self._encode(self.encoder.encode, part):
                        yield data
                        self.started.stream.touch()
                    if self._stopped:
                        break
                block = None if self._stopped else await self._next(watched)
            if data := await self._encode(self.encoder.finish):
                yield data
            if self._file is not None:  # the whole file, complete: read back in pieces
                self.file_bytes = await self._encode(self._rewind)
                while data := await self._encode(self._file.read, FILE_PIECE):
                    yield data
        finally:
            self.close()

    def stop(self) -> None:
        """Stop generating (the job stops within a step): `pieces` ends after its tail."""
        self._stopped = True
        self.started.stream.cancel()

    def close(self) -> None:
        """Let go of everything: the job stops within a step (nothing once it is done), the codec is
        freed. Idempotent."""
        if not self._closed:
            self._closed = True
            self.started.stream.cancel()
            self.encoder.close()
            if self._file is not None:
                try:
                    self._file.close()
                except OSError:  # (a full disk: its last bytes cannot be flushed, and the request was told)
                    pass

    def _rewind(self) -> int:
        """The whole file's last buffered bytes written out, and the file rewound: its size."""
        size = self._file.seek(0, io.SEEK_END)  # (a muxer may have gone back to a header)
        self._file.seek(0)
        return size

    async def _next(self, watched: bool) -> np.ndarray | None:
        """The next block (None at the end); a generation failure as its RequestError."""
        if self._ended:
            return None
        stream = self.started.stream
        try:
            if watched and self._client_gone is not None:
                return await _watching(anext(stream), self._client_gone)
            return await anext(stream)
        except StopAsyncIteration:
            self._ended = True
            return None
        except (asyncio.CancelledError, ClientGone):
            raise
        except Exception as e:  # noqa: BLE001 - what the client is told (the worker logged it)
            raise generation_failure(e, logged=True) from None

    async def _encode(self, step: Callable[..., bytes], *args) -> bytes:
        """One encoder step (or a step of reading back the whole file) off the event loop; a failure is
        the request's (500; a whole file the disk has no room for 507, one no temporary directory can
        hold a 500 that says so). (Cancelled meanwhile, `close()` may follow at once: the encoder waits
        for its running step before it frees the codec, the file for its running read.)"""
        try:
            return await run_in_threadpool(step, *args)
        except OSError as e:
            if self._file is None or not _is_storage_failure(e):
                raise generation_failure(e) from None
            raise _whole_file_failure(e) from None
        except Exception as e:  # noqa: BLE001
            raise generation_failure(e) from None


def _is_storage_failure(e: OSError) -> bool:
    """Whether writing (or reading back) a whole file's spool failed: a full disk or budget, no writable
    temporary directory. (PyAV's own errors are OSErrors with errnos too: a codec's -1 is EPERM.)"""
    return e.errno in STORAGE_ERRNOS and not isinstance(e, av.error.FFmpegError)


def _whole_file_failure(e: OSError) -> RequestError:
    log.error("a whole file (stream=false) could not be held: %s", e)
    return storage_failure(e, "the whole file", "ask for it streamed (stream=true)")


def slices(block: np.ndarray, first: int = FIRST_SLICE, largest: int = LARGEST_SLICE) -> Iterator[np.ndarray]:
    """`block` in consecutive views: `first` samples, then each twice the one before, at most `largest`."""
    start, size = 0, first
    while start < block.size:
        yield block[start:start + size]
        start += size
        size = min(2 * size, largest)


async def _watching(awaitable: Awaitable[T], client_gone: Callable[[], Awaitable[bool]]) -> T:
    """`awaitable`'s result, asking meanwhile whether the client left: ClientGone (and the wait
    cancelled) if it did."""
    task = asyncio.ensure_future(awaitable)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_SECONDS)
            if done:
                return task.result()
            if await client_gone():
                raise ClientGone()
    finally:
        task.cancel()
