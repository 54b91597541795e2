"""Streaming audio encoding for every transport's responses: float32 blocks in, file bytes out.

One response gets exactly one :class:`AudioEncoder`. pipeline.Speech feeds it each decoded
block (mono float32, nominally in [-1, 1]) through :meth:`AudioEncoder.encode`, which returns
the bytes that are ready now (possibly ``b""``), and ends with one call to
:meth:`AudioEncoder.finish`, which flushes resampler, time stretcher, codec and muxer and
returns the rest. All returned pieces concatenated are one valid file: headers are written
once, codec state carries across blocks, and nothing is re-created per block.

Pipeline per block::

    block -> float32 mono -> soxr stream resampler (input rate -> coded rate, skipped when equal)
          -> atempo filter graph (speed, skipped when speed == 1.0)
          -> writer: raw s16le (pcm) | WAV (hand-written header) | PyAV encoder + muxer

Formats (see ``CONTENT_TYPES``): ``pcm`` raw s16le mono, ``wav`` RIFF/PCM s16, ``mp3``
(libmp3lame, CBR), ``opus`` (libopus in Ogg), ``aac`` (FFmpeg's native AAC-LC in ADTS),
``flac`` (FFmpeg's flac encoder and muxer, s16).

Sample rates: ``output_rate`` must be an integer in [8000, 48000]. pcm, wav and flac carry it
as is. mp3, aac and opus only code a fixed set of rates; a rate outside that set is resampled
to the smallest legal rate above it (e.g. mp3 30000 -> 32000, opus 44100 -> 48000, opus 22050
-> 24000), so bandwidth is never lost; :attr:`AudioEncoder.sample_rate` tells the rate that is
really in the stream. Ogg Opus is always *decoded* at 48 kHz by FFmpeg and browsers: the coded
rate only limits the audio bandwidth (it is recorded in the OpusHead "input sample rate").

Streaming (``streaming=True``) versus whole-file (``streaming=False``):

* streaming writes to a non-seekable sink, so nothing already sent is ever patched. WAV uses
  0xFFFFFFFF for the RIFF and data sizes; MP3 has no Xing/Info/LAME header frame and no ID3
  tag, just MPEG frames; FLAC's STREAMINFO has "unknown" (0) total samples and MD5; Ogg pages
  are closed every 20 ms of audio so packets do not wait in the muxer.
* whole-file mode returns ``b""`` from every :meth:`~AudioEncoder.encode` and the complete file
  from :meth:`~AudioEncoder.finish` (or writes it into the seekable ``file`` it is given, held
  nowhere else), with every size field exact: WAV sizes, FLAC total samples and MD5, and for MP3
  a correct Xing "Info" frame (frame count, LAME encoder delay/padding, so decoders trim priming
  and report the exact duration). Use it when the HTTP layer needs a Content-Length anyway.

Latency, measured with this module (PyAV 18.1 / libavformat 62, 44.1 kHz input fed in
2048-sample = 46 ms blocks, streaming mode; "held" = audio fed but not yet decodable from the
bytes returned so far, measured after 1.02 s of input):

* pcm, wav: bytes for every block (wav's 44-byte header leaves with the first one); held 0,
  or ~30 ms when resampling (soxr HQ filter delay, released by the next block or finish()).
* aac: first ADTS frame after block 1 at 44.1 kHz, block 3 at 24 kHz; held ~25-80 ms.
* mp3: first frame after block 2 at 44.1 kHz (LAME look-ahead), block 3 at 24 kHz; held
  ~105-155 ms (not counting the 1105 priming samples a decoder outputs first).
* opus: the two Ogg header pages (~130 bytes) on the first call, first audio page after
  block 2; held ~50-70 ms. Pages are closed every 20 ms of audio (``page_duration``):
  with FFmpeg's default 1 s pages up to ~2 s of audio waited inside the muxer; the price
  is ~1.4 kB/s (~11 kbit/s) of page headers.
* flac: the fLaC/STREAMINFO header (~130 bytes, no PADDING block) on the first call, then
  one frame per 4608 samples (first after block 3); held up to one frame (~100 ms).

A response without any audio (the model's first block was silence) is still a file every player
opens: 0 samples in pcm, wav and flac, one codec frame of silence in mp3, aac and opus (a decoder
may add its priming: at most 0.1 s from 24 kHz up, 0.26 s at 8 kHz).

Bigger blocks simply move these thresholds: with blocks >= 8192 samples every format returns
audio from the first call. The time stretcher adds at most ~1024 input samples of lag
(atempo returns a frame's output only when the next frame arrives, so blocks are pushed into
it in 1024-sample frames). Whatever is held leaves with the next block or ``finish()``.

Cost (2 CPU cores, one 29.7 s block): pcm/wav/flac < 40 ms, opus ~0.2 s, mp3 ~0.5 s,
aac ~0.6 s; resampling ~10 ms, speed ~0.1 s. So encode/finish run off the event loop and off
the generation thread: pipeline.Speech calls them in the thread pool.
"""

from __future__ import annotations

import io
import math
import operator
import struct
import threading
from collections.abc import Mapping
from fractions import Fraction
from types import MappingProxyType
from typing import Any, BinaryIO, Literal, get_args

import av
import numpy as np
import soxr

__all__ = [
    "AUDIO_FORMATS",
    "CONTENT_TYPES",
    "MAX_OUTPUT_RATE",
    "MAX_SPEED",
    "MIN_OUTPUT_RATE",
    "MIN_SPEED",
    "AudioEncoder",
    "InvalidAudioParameter",
    "coded_sample_rate",
    "content_type",
    "float_to_int16",
    "normalize_format",
    "open_encoder",
    "validate_output_rate",
    "validate_speed",
    "wav_header",
]

AudioFormat = Literal["pcm", "wav", "mp3", "opus", "aac", "flac"]
AUDIO_FORMATS: tuple[str, ...] = get_args(AudioFormat)

CONTENT_TYPES: Mapping[str, str] = MappingProxyType(
    {
        "pcm": "audio/pcm",
        "wav": "audio/wav",
        "mp3": "audio/mpeg",
        "opus": "audio/ogg",
        "aac": "audio/aac",
        "flac": "audio/flac",
    }
)

MIN_OUTPUT_RATE = 8000
MAX_OUTPUT_RATE = 48000
MIN_SPEED = 0.25
MAX_SPEED = 4.0

# Rates each lossy codec can code (within [MIN_OUTPUT_RATE, MAX_OUTPUT_RATE]).
_MPEG_RATES = (8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000)
_LEGAL_RATES: Mapping[str, tuple[int, ...]] = MappingProxyType(
    {
        "mp3": _MPEG_RATES,  # MPEG-1/2/2.5 layer III
        "aac": _MPEG_RATES,  # ADTS sampling-frequency index (7350 lies below the range)
        "opus": (8000, 12000, 16000, 24000, 48000),
    }
)

# atempo accepts one factor in [0.5, 100]; slower speeds are split into equal stages.
_ATEMPO_MIN = 0.5
_ATEMPO_FRAME = 1024  # samples per frame pushed into atempo (bounds its output lag)
_STRETCH_TAIL_S = 0.2  # silence pushed through atempo at the end, so that it releases all of the audio
_ATEMPO_FIRST_FRAME = 16  # atempo above 2x fails (ENOMEM) when its first frame is one sample
_RESAMPLE_QUALITY = "HQ"  # lower delay than VHQ, far below 16-bit noise
_STREAM_OGG_PAGE_US = 20_000


class _CodecSpec:
    __slots__ = ("muxer", "codec", "sample_format", "bitrates", "stream_options")

    def __init__(self, muxer, codec, sample_format, bitrates=None, stream_options=None):
        self.muxer = muxer
        self.codec = codec
        self.sample_format = sample_format
        # ((minimum coded rate, bit rate), ...), highest first
        self.bitrates = bitrates
        self.stream_options = stream_options or {}

    def bitrate(self, rate: int) -> int | None:
        if not self.bitrates:
            return None
        for min_rate, bit_rate in self.bitrates:
            if rate >= min_rate:
                return bit_rate
        return self.bitrates[-1][1]


_CODEC_SPECS: Mapping[str, _CodecSpec] = MappingProxyType(
    {
        "mp3": _CodecSpec(
            "mp3", "libmp3lame", "fltp", ((32000, 128_000), (16000, 64_000), (0, 32_000))
        ),
        "aac": _CodecSpec(
            "adts", "aac", "fltp", ((32000, 128_000), (16000, 64_000), (0, 32_000))
        ),
        "opus": _CodecSpec(
            "ogg",
            "libopus",
            "flt",
            ((24000, 64_000), (12000, 32_000), (0, 24_000)),
            {"application": "audio"},
        ),
        "flac": _CodecSpec("flac", "flac", "s16"),
    }
)


# --------------------------------------------------------------------------- validation


class InvalidAudioParameter(ValueError):
    """A request field the encoder cannot honour; ``param`` names the HTTP field."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


def normalize_format(fmt: Any) -> str:
    """Return the canonical format name (case and surrounding spaces ignored).

    Raises ValueError naming the supported formats for anything else.
    """
    name = fmt.strip().lower() if isinstance(fmt, str) else None
    if name not in AUDIO_FORMATS:
        raise InvalidAudioParameter(
            "response_format",
            f"unsupported response_format {fmt!r}; supported: {', '.join(AUDIO_FORMATS)}",
        )
    return name


def content_type(fmt: str) -> str:
    """The HTTP Content-Type of ``fmt`` (e.g. ``"mp3"`` -> ``"audio/mpeg"``)."""
    return CONTENT_TYPES[normalize_format(fmt)]


def _as_int(value: Any, what: str) -> int:
    error = InvalidAudioParameter(what, f"{what} must be an integer, got {value!r}")
    if isinstance(value, bool):
        raise error
    if isinstance(value, float):
        if not value.is_integer():
            raise error
        return int(value)
    try:
        return operator.index(value)
    except TypeError:
        raise error from None


def validate_output_rate(rate: Any) -> int:
    """Return ``rate`` as an int if it lies in [8000, 48000] Hz, else raise ValueError."""
    value = _as_int(rate, "sample_rate")
    if not MIN_OUTPUT_RATE <= value <= MAX_OUTPUT_RATE:
        raise InvalidAudioParameter(
            "sample_rate",
            f"sample_rate must be between {MIN_OUTPUT_RATE} and {MAX_OUTPUT_RATE} Hz, "
            f"got {value}",
        )
    return value


def validate_speed(speed: Any) -> float:
    """Return ``speed`` as a float if it is a finite number in [0.25, 4.0], else ValueError."""
    if isinstance(speed, bool):
        raise InvalidAudioParameter("speed", f"speed must be a number, got {speed!r}")
    try:
        value = float(speed)
    except (TypeError, ValueError):
        raise InvalidAudioParameter("speed", f"speed must be a number, got {speed!r}") from None
    if not (math.isfinite(value) and MIN_SPEED <= value <= MAX_SPEED):
        raise InvalidAudioParameter(
            "speed", f"speed must be between {MIN_SPEED} and {MAX_SPEED}, got {speed!r}"
        )
    return value


def coded_sample_rate(fmt: str, output_rate: int) -> int:
    """The rate actually coded for ``fmt`` when ``output_rate`` is requested.

    pcm, wav and flac keep the (validated) rate; mp3, aac and opus use the smallest rate
    their codec supports that is >= the requested one.
    """
    name = normalize_format(fmt)
    rate = validate_output_rate(output_rate)
    legal = _LEGAL_RATES.get(name)
    if legal is None or rate in legal:
        return rate
    return next(r for r in legal if r >= rate)


# --------------------------------------------------------------------------- sample helpers


def float_to_int16(samples: np.ndarray) -> np.ndarray:
    """Clip to [-1, 1], scale by 32767 and round half to even (never truncate)."""
    x = np.asarray(samples, dtype=np.float32)
    return np.round(np.clip(x, -1.0, 1.0) * 32767).astype("<i2")


def _as_mono_float32(block: Any) -> np.ndarray:
    """Accept a 1-D (or 1xN / Nx1) float numpy array or torch tensor; return float32 1-D."""
    if hasattr(block, "detach") and hasattr(block, "cpu"):  # torch.Tensor, without importing torch
        tensor = block.detach()
        if not tensor.is_floating_point():
            raise ValueError(f"audio block must be floating point, got {tensor.dtype}")
        block = tensor.to(device="cpu").float().numpy()
    arr = np.asarray(block)
    if arr.ndim == 2 and 1 in arr.shape:
        arr = arr.reshape(-1)
    if arr.ndim != 1:
        raise ValueError(f"audio block must be mono and 1-D, got shape {arr.shape}")
    if arr.dtype.kind != "f":
        raise ValueError(f"audio block must be floating point, got {arr.dtype}")
    arr = arr.astype(np.float32, copy=False)
    if arr.size and not np.isfinite(arr).all():
        arr = np.nan_to_num(arr, nan=0.0, posinf=1.0, neginf=-1.0)
    return arr


WAV_HEADER_BYTES = 44


def wav_header(sample_rate: int, data_bytes: int | None) -> bytes:
    """44-byte RIFF/WAVE header for mono s16le. ``data_bytes=None`` -> 0xFFFFFFFF sizes."""
    if data_bytes is None:
        riff_size = data_size = 0xFFFFFFFF
    else:
        data_size = min(int(data_bytes), 0xFFFFFFFF - 36)
        riff_size = 36 + data_size
    channels, bits = 1, 16
    block_align = channels * bits // 8
    return struct.pack(
        "<4sI4s4sIHHIIHH4sI",
        b"RIFF",
        riff_size,
        b"WAVE",
        b"fmt ",
        16,  # fmt chunk size
        1,  # WAVE_FORMAT_PCM
        channels,
        sample_rate,
        sample_rate * block_align,
        block_align,
        bits,
        b"data",
        data_size,
    )


_EMPTY = np.zeros(0, dtype=np.float32)


# --------------------------------------------------------------------------- DSP stages


class _Resampler:
    """soxr streaming resampler: blockwise output equals resampling the whole signal."""

    def __init__(self, in_rate: int, out_rate: int):
        self._stream = soxr.ResampleStream(
            in_rate, out_rate, 1, dtype="float32", quality=_RESAMPLE_QUALITY
        )

    def process(self, x: np.ndarray) -> np.ndarray:
        return self._stream.resample_chunk(x, last=False)

    def flush(self) -> np.ndarray:
        return self._stream.resample_chunk(_EMPTY, last=True)


def _atempo_stages(speed: float) -> list[float]:
    stages = 1
    while speed ** (1.0 / stages) < _ATEMPO_MIN:
        stages += 1
    return [speed ** (1.0 / stages)] * stages


class _TimeStretch:
    """Pitch-preserving tempo change through FFmpeg's atempo filter (streaming). Its output is
    exactly round(samples in / speed) long: atempo drops part of its last window at the end of its
    input, so `flush` first pushes silence past that window and then cuts the output to length."""

    def __init__(self, rate: int, speed: float):
        self._rate, self._speed = rate, speed
        self._time_base = Fraction(1, rate)
        self._pts = 0
        self._taken = self._given = 0  # samples in, samples out
        self._held = _EMPTY  # the first few samples, until there are _ATEMPO_FIRST_FRAME
        graph = av.filter.Graph()
        nodes = [
            graph.add_abuffer(
                sample_rate=rate, format="flt", layout="mono", time_base=self._time_base
            )
        ]
        nodes += [graph.add("atempo", tempo=f"{t:.12g}") for t in _atempo_stages(speed)]
        nodes.append(graph.add("aformat", sample_fmts="flt", channel_layouts="mono"))
        nodes.append(graph.add("abuffersink"))
        graph.link_nodes(*nodes)
        graph.configure()
        self._graph = graph

    def _drain(self) -> np.ndarray:
        out = []
        while True:
            try:
                frame = self._graph.pull()
            except (av.error.BlockingIOError, av.error.EOFError):
                break
            out.append(frame.to_ndarray().reshape(-1))
        if not out:
            return _EMPTY
        return out[0] if len(out) == 1 else np.concatenate(out)

    def process(self, x: np.ndarray) -> np.ndarray:
        self._taken += x.size
        if self._pts == 0 and self._held.size + x.size < _ATEMPO_FIRST_FRAME:
            self._held = np.concatenate([self._held, x])
            return _EMPTY
        if self._held.size:
            x, self._held = np.concatenate([self._held, x]), _EMPTY
        y = self._stretch(x)
        self._given += y.size
        return y

    def _stretch(self, x: np.ndarray) -> np.ndarray:
        # atempo sizes each output buffer from its input frame and releases it only when
        # full, so output lags one whole input frame: push short frames to bound that lag.
        out = []
        for start in range(0, x.size, _ATEMPO_FRAME):
            part = x[start : start + _ATEMPO_FRAME]
            frame = av.AudioFrame.from_ndarray(
                np.ascontiguousarray(part).reshape(1, -1), format="flt", layout="mono"
            )
            frame.sample_rate = self._rate
            frame.time_base = self._time_base
            frame.pts = self._pts
            self._pts += part.size
            self._graph.push(frame)
            out.append(self._drain())
        if not out:
            return _EMPTY
        return out[0] if len(out) == 1 else np.concatenate(out)

    def flush(self) -> np.ndarray:
        # silence past the last window of every atempo stage (each window is tens of ms)
        padding = np.zeros(round(_STRETCH_TAIL_S * self._rate * max(1.0, self._speed)), np.float32)
        tail = self._stretch(np.concatenate([self._held, padding]))
        self._held = _EMPTY
        self._graph.push(None)
        tail = np.concatenate([tail, self._drain()])
        want = max(0, round(self._taken / self._speed) - self._given)
        tail = tail[:want] if tail.size >= want else np.concatenate([tail, np.zeros(want - tail.size, np.float32)])
        self._given += tail.size
        return tail


# --------------------------------------------------------------------------- writers


class _ChunkSink:
    """Write-only, non-seekable file object collecting what the muxer writes.

    No seek/tell on purpose: FFmpeg then treats the output as a live stream and never tries
    to go back and patch headers (no Xing frame, no rewritten STREAMINFO).
    """

    __slots__ = ("_chunks",)

    def __init__(self):
        self._chunks: list[bytes] = []

    def write(self, data) -> int:
        self._chunks.append(bytes(data))
        return len(data)

    def take(self) -> bytes:
        if not self._chunks:
            return b""
        data = self._chunks[0] if len(self._chunks) == 1 else b"".join(self._chunks)
        self._chunks.clear()
        return data


class _PcmWriter:
    """Streaming: each block's samples as they come. Whole-file: into `file`."""

    def __init__(self, rate: int, streaming: bool, file: BinaryIO | None = None):
        self._streaming, self._file = streaming, file

    def write(self, x: np.ndarray) -> bytes:
        if not x.size:
            return b""
        data = float_to_int16(x).tobytes()
        if self._streaming:
            return data
        self._file.write(data)
        return b""

    def finish(self) -> bytes:
        return b""

    def close(self) -> None:
        pass


class _WavWriter(_PcmWriter):
    """A header with unknown sizes, then the samples (streaming); or the header written first and
    its sizes set at the end (whole-file)."""

    def __init__(self, rate: int, streaming: bool, file: BinaryIO | None = None):
        super().__init__(rate, streaming, file)
        self._rate = rate
        self._header_pending = streaming
        if not streaming:
            self._start = file.tell()
            file.write(wav_header(rate, 0))

    def _header(self) -> bytes:
        if not self._header_pending:
            return b""
        self._header_pending = False
        return wav_header(self._rate, None)

    def write(self, x: np.ndarray) -> bytes:
        data = super().write(x)
        return self._header() + data if self._streaming else b""

    def finish(self) -> bytes:
        if self._streaming:
            return self._header()
        end = self._file.tell()
        self._file.seek(self._start)
        self._file.write(wav_header(self._rate, end - self._start - WAV_HEADER_BYTES))
        self._file.seek(end)
        return b""


class _ContainerWriter:
    """One PyAV encoder + muxer for the whole response."""

    def __init__(self, fmt: str, rate: int, streaming: bool, file: BinaryIO | None = None):
        spec = _CODEC_SPECS[fmt]
        self._spec = spec
        self._rate = rate
        self._time_base = Fraction(1, rate)
        self._pts = 0
        self._streaming = streaming
        self._sink: _ChunkSink | BinaryIO = _ChunkSink() if streaming else file  # (whole-file: seekable)

        container_options = {"flush_packets": "1"}
        if fmt == "mp3":
            container_options["id3v2_version"] = "0"  # bare MPEG frames, no ID3 tag
            if streaming:
                container_options["write_xing"] = "0"
        elif fmt == "opus" and streaming:
            container_options["page_duration"] = str(_STREAM_OGG_PAGE_US)
        elif fmt == "flac":
            container_options["metadata_header_padding"] = "0"  # no 8 KiB PADDING block

        try:
            container = av.open(
                self._sink, mode="w", format=spec.muxer, container_options=container_options
            )
        except av.error.FFmpegError as exc:  # pragma: no cover - depends on the FFmpeg build
            raise RuntimeError(f"{fmt}: muxer {spec.muxer!r} unavailable: {exc}") from exc
        try:
            stream = container.add_stream(spec.codec, rate=rate, options=dict(spec.stream_options))
            ctx = stream.codec_context
            ctx.layout = "mono"
            ctx.format = spec.sample_format
            bit_rate = spec.bitrate(rate)
            if bit_rate:
                ctx.bit_rate = bit_rate
            # Opens the codec and writes the container header now, so a configuration
            # problem surfaces while the HTTP layer can still answer with an error.
            container.start_encoding()
        except (av.error.FFmpegError, ValueError, KeyError) as exc:
            # a server problem (codec missing in this FFmpeg build), not a bad request
            container.close()
            raise RuntimeError(
                f"{fmt}: cannot open encoder {spec.codec!r} at {rate} Hz: {exc}"
            ) from exc
        except BaseException:
            container.close()
            raise
        self._container = container
        self._stream = stream

    def _pending(self) -> bytes:
        return self._sink.take() if self._streaming else b""

    def write(self, x: np.ndarray) -> bytes:
        if x.size:
            if self._spec.sample_format == "s16":
                data = float_to_int16(x)
            else:
                data = np.clip(x, -1.0, 1.0)
            frame = av.AudioFrame.from_ndarray(
                data.reshape(1, -1), format=self._spec.sample_format, layout="mono"
            )
            frame.sample_rate = self._rate
            frame.time_base = self._time_base
            frame.pts = self._pts
            self._pts += x.size
            self._container.mux(self._stream.encode(frame))
        return self._pending()

    def finish(self) -> bytes:
        head = b""
        if self._pts == 0 and self._spec.codec != "flac":
            # An mp3/aac/Ogg stream with no frame in it is one no player or decoder accepts (an
            # empty mp3 body, Ogg headers without an end page): a response that produced no
            # speech carries one codec frame of silence instead (FLAC, like WAV, holds 0 samples).
            frame = self._stream.codec_context.frame_size or self._rate // 50
            head = self.write(np.zeros(frame, np.float32))
        self._container.mux(self._stream.encode(None))
        self._container.close()  # writes the trailer / last Ogg page: read the sink after it
        return head + self._sink.take() if self._streaming else b""

    def close(self) -> None:
        try:
            self._container.close()
        except Exception:  # noqa: BLE001 - abandoning a response; nothing useful to report
            pass


# --------------------------------------------------------------------------- public encoder


class AudioEncoder:
    """Encodes one response: :meth:`encode` per block, then :meth:`finish` exactly once.

    Use one encoder from one thread at a time (calls may move between threads, e.g. a thread
    pool). The one exception: :meth:`close` may come from another thread while a step runs (a
    request cancelled on the event loop while its thread encodes); it waits for that step, since
    freeing a codec under its running thread crashes the process.
    """

    def __init__(
        self,
        fmt: str,
        *,
        input_rate: int = 44100,
        output_rate: int | None = None,
        speed: float = 1.0,
        streaming: bool = True,
        file: BinaryIO | None = None,
    ):
        self.format: str = normalize_format(fmt)
        in_rate = _as_int(input_rate, "input_rate")
        if in_rate <= 0:
            raise InvalidAudioParameter("input_rate", f"input_rate must be positive, got {in_rate}")
        self.input_rate: int = in_rate
        self.output_rate: int = validate_output_rate(
            in_rate if output_rate is None else output_rate
        )
        self.sample_rate: int = coded_sample_rate(self.format, self.output_rate)
        self.speed: float = validate_speed(speed)
        self.streaming: bool = bool(streaming)
        self.content_type: str = CONTENT_TYPES[self.format]

        self._resampler = (
            _Resampler(in_rate, self.sample_rate) if in_rate != self.sample_rate else None
        )
        self._stretch = _TimeStretch(self.sample_rate, self.speed) if self.speed != 1.0 else None
        # whole-file: written into `file` (the caller's, seekable: a large one may be spooled to
        # disk), else into memory, which finish() returns
        self._memory = io.BytesIO() if not self.streaming and file is None else None
        file = None if self.streaming else file if file is not None else self._memory
        if self.format == "pcm":
            self._writer = _PcmWriter(self.sample_rate, self.streaming, file)
        elif self.format == "wav":
            self._writer = _WavWriter(self.sample_rate, self.streaming, file)
        else:
            self._writer = _ContainerWriter(self.format, self.sample_rate, self.streaming, file)
        self._state = "open"  # -> "finished" | "closed"
        self._busy = threading.Lock()  # held by each step: close() waits for the one running

    def __repr__(self) -> str:
        return (
            f"AudioEncoder({self.format!r}, input_rate={self.input_rate}, "
            f"sample_rate={self.sample_rate}, speed={self.speed}, streaming={self.streaming}, "
            f"state={self._state!r})"
        )

    def _check_open(self, what: str) -> None:
        if self._state != "open":
            raise RuntimeError(f"AudioEncoder.{what}() called after the encoder was {self._state}")

    def _transform(self, x: np.ndarray) -> np.ndarray:
        if self._resampler is not None:
            x = self._resampler.process(x)
        if self._stretch is not None:
            x = self._stretch.process(x)
        return x

    def encode(self, block) -> bytes:
        """Feed one block (float32 1-D numpy array or torch tensor); return bytes ready now."""
        with self._busy:
            self._check_open("encode")
            x = _as_mono_float32(block)
            return self._writer.write(self._transform(x) if x.size else _EMPTY)

    def finish(self) -> bytes:
        """Flush everything and return the remaining bytes. Must be called exactly once."""
        with self._busy:
            return self._finish()

    def _finish(self) -> bytes:
        self._check_open("finish")
        self._state = "finished"
        try:
            out = []
            tail = self._resampler.flush() if self._resampler is not None else _EMPTY
            if self._stretch is not None:
                tail = np.concatenate([self._stretch.process(tail), self._stretch.flush()])
            if tail.size:
                out.append(self._writer.write(tail))
            out.append(self._writer.finish())
        except BaseException:
            self._writer.close()
            raise
        return self._memory.getvalue() if self._memory is not None else b"".join(out)

    def close(self) -> None:
        """Abandon the response (client gone, generation failed): free the codec. Idempotent.

        Does nothing after :meth:`finish`.
        """
        with self._busy:
            if self._state == "open":
                self._state = "closed"
                self._writer.close()

    def __enter__(self) -> "AudioEncoder":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def open_encoder(
    fmt: str,
    *,
    input_rate: int = 44100,
    output_rate: int | None = None,
    speed: float = 1.0,
    streaming: bool = True,
    file: BinaryIO | None = None,
) -> AudioEncoder:
    """Create the single encoder of one response.

    ``fmt``: one of ``AUDIO_FORMATS`` (case-insensitive). ``output_rate``: requested rate in
    [8000, 48000] (None = ``input_rate``); see :func:`coded_sample_rate` for mp3/aac/opus.
    ``speed``: 0.25..4.0, pitch-preserving; 1.0 is a bit-exact bypass. ``streaming``: see the
    module docstring. ``file``: whole-file mode writes the file into it (seekable, at position
    0, the caller's, never closed here) instead of returning it from :meth:`~AudioEncoder.finish`.
    Raises ValueError for an invalid format, rate or speed.
    """
    return AudioEncoder(
        fmt, input_rate=input_rate, output_rate=output_rate, speed=speed, streaming=streaming, file=file
    )
