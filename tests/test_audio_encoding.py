"""Tests for audio_encoding: every format decodes as one valid file, sample-exact where lossless."""

from __future__ import annotations

import hashlib
import io
import math
import struct
import wave

import av
import numpy as np
import pytest
import soxr

import audio_encoding as ae
from audio_encoding import (
    AUDIO_FORMATS,
    CONTENT_TYPES,
    AudioEncoder,
    coded_sample_rate,
    content_type,
    float_to_int16,
    open_encoder,
)

IN_RATE = 44100
BLOCKS = [2048 * n for n in (1, 3, 32, 7)]  # uneven, as the generator produces them
N = sum(BLOCKS)  # 88064 samples, ~2.0 s
RATES = (44100, 24000, 16000)
LOSSLESS = ("pcm", "wav", "flac")
DEMUXERS = {"wav": "wav", "mp3": "mp3", "aac": "aac", "flac": "flac", "opus": "ogg"}

# Values whose int16 conversion tells round-then-clip apart from truncation or no clipping.
SPECIALS = np.array(
    [1.7, -1.7, 1.0000001, -3.0, 1.0, -1.0, 0.49999 / 32767, 0.7 / 32767, -0.7 / 32767,
     1.6 / 32767, -1.6 / 32767, 100.6 / 32767, -100.6 / 32767, 0.3 / 32767],
    dtype=np.float32,
)
SPECIALS_INT16 = np.array(
    [32767, -32767, 32767, -32767, 32767, -32767, 0, 1, -1, 2, -2, 101, -101, 0], dtype=np.int16
)


def make_signal(n: int = N, rate: int = IN_RATE) -> np.ndarray:
    """440 Hz sine + 100->4000 Hz chirp, with out-of-range and rounding probes sprinkled in."""
    t = np.arange(n) / rate
    dur = n / rate
    chirp_phase = 2 * np.pi * (100 * t + (4000 - 100) / (2 * dur) * t**2)
    x = 0.45 * np.sin(2 * np.pi * 440 * t) + 0.35 * np.sin(chirp_phase)
    x[1000 : 1000 + SPECIALS.size] = SPECIALS
    x[30000:30010] = 1.3  # a clipped burst inside a block
    x[2047:2050] = [-1.2, 1.2, -1.2]  # across the first block boundary
    return x.astype(np.float32)


SIGNAL = make_signal()


def sine(freq: float = 440.0, seconds: float = 2.0, amp: float = 0.5, rate: int = IN_RATE):
    return (amp * np.sin(2 * np.pi * freq * np.arange(int(seconds * rate)) / rate)).astype(
        np.float32
    )


def feed(enc: AudioEncoder, signal: np.ndarray, blocks=BLOCKS) -> tuple[bytes, list[bytes]]:
    """Feed ``signal`` in ``blocks`` (cycled) and finish; return (all bytes, per-call pieces)."""
    pieces, i, k = [], 0, 0
    while i < signal.size:
        n = blocks[k % len(blocks)]
        pieces.append(enc.encode(signal[i : i + n]))
        i += n
        k += 1
    pieces.append(enc.finish())
    return b"".join(pieces), pieces


def decode(data: bytes, fmt: str) -> tuple[int, int, np.ndarray]:
    """Decode with PyAV (numpy for raw pcm): (sample rate, channels, 1-D samples)."""
    if fmt == "pcm":
        assert len(data) % 2 == 0
        return -1, 1, np.frombuffer(data, dtype="<i2")
    with av.open(io.BytesIO(data), mode="r", format=DEMUXERS[fmt]) as container:
        stream = container.streams.audio[0]
        frames = [frame.to_ndarray() for frame in container.decode(stream)]
        rate = stream.codec_context.sample_rate
        channels = stream.codec_context.channels
    samples = np.concatenate(frames, axis=1) if frames else np.zeros((channels, 0))
    assert samples.shape[0] == 1  # packed or planar mono: one row
    return rate, channels, samples[0]


def expected_int16(signal: np.ndarray, rate: int) -> np.ndarray:
    """What a lossless format must carry: one-shot resample of the whole signal, clip, round."""
    if rate != IN_RATE:
        signal = soxr.resample(signal, IN_RATE, rate, quality="HQ").astype(np.float32)
    return np.round(np.clip(signal, -1, 1) * 32767).astype(np.int16)


def to_float(samples: np.ndarray) -> np.ndarray:
    if samples.dtype == np.int16:
        return samples.astype(np.float64) / 32767
    return samples.astype(np.float64)


def rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x)))) if x.size else 0.0


def dominant_frequency(x: np.ndarray, rate: int) -> float:
    x = to_float(x)
    spectrum = np.abs(np.fft.rfft(x * np.hanning(x.size)))
    k = int(np.argmax(spectrum[1:])) + 1
    # parabolic interpolation of the peak
    a, b, c = np.log(spectrum[k - 1 : k + 2] + 1e-12)
    offset = 0.5 * (a - c) / (a - 2 * b + c)
    return (k + offset) * rate / x.size


# --------------------------------------------------------------------------- container parsers


_MP3_BITRATES = {
    1: [0, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320],
    2: [0, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160],
}
_MP3_RATES = {3: (44100, 48000, 32000), 2: (22050, 24000, 16000), 0: (11025, 12000, 8000)}


def mp3_frames(data: bytes) -> list[tuple[int, int, int]]:
    """Split a bare MPEG layer III stream into (offset, length, sample rate); asserts contiguity."""
    frames, i = [], 0
    while i < len(data):
        assert data[i] == 0xFF and data[i + 1] & 0xE0 == 0xE0, f"no frame sync at byte {i}"
        version = (data[i + 1] >> 3) & 3
        assert (data[i + 1] >> 1) & 3 == 1, "not layer III"
        bitrate = _MP3_BITRATES[1 if version == 3 else 2][data[i + 2] >> 4] * 1000
        rate = _MP3_RATES[version][(data[i + 2] >> 2) & 3]
        padding = (data[i + 2] >> 1) & 1
        length = (144 if version == 3 else 72) * bitrate // rate + padding
        frames.append((i, length, rate))
        i += length
    assert i == len(data), "trailing bytes after the last MP3 frame"
    return frames


_ADTS_RATES = (96000, 88200, 64000, 48000, 44100, 32000, 24000, 22050, 16000, 12000, 11025, 8000)


def adts_frames(data: bytes) -> list[tuple[int, int]]:
    """Split an ADTS stream into (sample rate, channel config) per frame; asserts contiguity."""
    frames, i = [], 0
    while i < len(data):
        assert data[i] == 0xFF and data[i + 1] & 0xF0 == 0xF0, f"no ADTS sync at byte {i}"
        rate = _ADTS_RATES[(data[i + 2] >> 2) & 0xF]
        channels = ((data[i + 2] & 1) << 2) | (data[i + 3] >> 6)
        length = ((data[i + 3] & 3) << 11) | (data[i + 4] << 3) | (data[i + 5] >> 5)
        frames.append((rate, channels))
        i += length
    assert i == len(data), "trailing bytes after the last ADTS frame"
    return frames


def _ogg_crc_table() -> list[int]:
    table = []
    for i in range(256):
        r = i << 24
        for _ in range(8):
            r = ((r << 1) ^ 0x04C11DB7) if r & 0x80000000 else (r << 1)
        table.append(r & 0xFFFFFFFF)
    return table


_OGG_CRC = _ogg_crc_table()


def ogg_crc(page: bytes) -> int:
    crc = 0
    for byte in page:
        crc = ((crc << 8) & 0xFFFFFFFF) ^ _OGG_CRC[(crc >> 24) ^ byte]
    return crc


def ogg_pages(data: bytes) -> list[dict]:
    """Parse and CRC-check every Ogg page; asserts the pages tile the data exactly."""
    pages, i = [], 0
    while i < len(data):
        assert data[i : i + 4] == b"OggS", f"no Ogg capture pattern at byte {i}"
        flags = data[i + 5]
        granule, serial, seq, crc = struct.unpack_from("<qIII", data, i + 6)
        nseg = data[i + 26]
        body_len = sum(data[i + 27 : i + 27 + nseg])
        end = i + 27 + nseg + body_len
        page = bytearray(data[i:end])
        page[22:26] = b"\0\0\0\0"
        assert ogg_crc(bytes(page)) == crc, f"bad CRC in page {seq}"
        pages.append(
            {"flags": flags, "granule": granule, "serial": serial, "seq": seq,
             "body": data[i + 27 + nseg : end]}
        )
        i = end
    return pages


# --------------------------------------------------------------------------- basic API


def test_formats_and_content_types():
    assert AUDIO_FORMATS == ("pcm", "wav", "mp3", "opus", "aac", "flac")
    assert dict(CONTENT_TYPES) == {
        "pcm": "audio/pcm",
        "wav": "audio/wav",
        "mp3": "audio/mpeg",
        "opus": "audio/ogg",
        "aac": "audio/aac",
        "flac": "audio/flac",
    }
    assert content_type("MP3") == "audio/mpeg"
    assert content_type(" opus ") == "audio/ogg"
    for fmt in AUDIO_FORMATS:
        enc = open_encoder(fmt)
        assert enc.content_type == CONTENT_TYPES[fmt]
        assert enc.format == fmt
        enc.close()


def test_float_to_int16_clips_then_rounds():
    assert float_to_int16(SPECIALS).tolist() == SPECIALS_INT16.tolist()
    # truncation would give 0, 0, 1, 100 here; no clipping would wrap or overflow
    assert float_to_int16(np.array([0.6 / 32767, -0.6 / 32767], np.float32)).tolist() == [1, -1]
    assert float_to_int16(np.array([], np.float32)).dtype == np.dtype("<i2")


def test_coded_sample_rates():
    assert coded_sample_rate("pcm", 24000) == 24000
    assert coded_sample_rate("wav", 30000) == 30000
    assert coded_sample_rate("flac", 8000) == 8000
    assert coded_sample_rate("mp3", 24000) == 24000
    assert coded_sample_rate("mp3", 30000) == 32000
    assert coded_sample_rate("aac", 44100) == 44100
    assert coded_sample_rate("aac", 47000) == 48000
    assert coded_sample_rate("opus", 44100) == 48000
    assert coded_sample_rate("opus", 22050) == 24000
    assert coded_sample_rate("opus", 24000) == 24000
    assert coded_sample_rate("opus", 8000) == 8000


@pytest.mark.parametrize("fmt", ["ogg", "mp4", "", "PCM16", None, 3])
def test_invalid_format(fmt):
    with pytest.raises(ValueError, match="response_format") as info:
        open_encoder(fmt)
    assert isinstance(info.value, ae.InvalidAudioParameter)
    assert info.value.param == "response_format"
    if isinstance(fmt, str):
        with pytest.raises(ValueError):
            content_type(fmt)


@pytest.mark.parametrize("rate", [7999, 48001, 0, -24000, 96000, 22050.5, "fast", True])
def test_invalid_rate(rate):
    with pytest.raises(ValueError, match="sample_rate") as info:
        open_encoder("pcm", output_rate=rate)
    assert info.value.param == "sample_rate"
    with pytest.raises(ValueError, match="sample_rate"):
        open_encoder("opus", output_rate=rate)


def test_default_output_rate_is_the_input_rate():
    for fmt, kwargs, rate in [("pcm", {}, IN_RATE), ("pcm", {"input_rate": 24000}, 24000),
                              ("opus", {}, 48000)]:
        with open_encoder(fmt, **kwargs) as enc:
            assert enc.sample_rate == rate
    with pytest.raises(ValueError, match="input_rate"):
        open_encoder("pcm", input_rate=0)


@pytest.mark.parametrize("speed", [0.2499, 4.001, 0, -1, float("nan"), float("inf"), "x", True])
def test_invalid_speed(speed):
    with pytest.raises(ValueError, match="speed") as info:
        open_encoder("wav", speed=speed)
    assert info.value.param == "speed"


def test_valid_edges_accepted():
    for rate in (8000, 48000, 24000.0, np.int64(16000)):
        for fmt in AUDIO_FORMATS:
            open_encoder(fmt, output_rate=rate).close()
    for speed in (0.25, 4.0, "1.5"):
        open_encoder("pcm", speed=speed).close()


def test_invalid_blocks():
    enc = open_encoder("pcm")
    with pytest.raises(ValueError, match="mono"):
        enc.encode(np.zeros((2, 100), np.float32))
    with pytest.raises(ValueError, match="floating"):
        enc.encode(np.zeros(100, np.int16))
    # accepted shapes: (N,), (1, N), (N, 1); float64 is converted
    assert len(enc.encode(np.zeros((1, 10), np.float32))) == 20
    assert len(enc.encode(np.zeros((10, 1), np.float64))) == 20
    assert enc.encode(np.zeros(0, np.float32)) == b""
    enc.finish()


@pytest.mark.parametrize("fmt", AUDIO_FORMATS)
def test_finish_exactly_once(fmt):
    enc = open_encoder(fmt)
    enc.encode(SIGNAL[:4096])
    enc.finish()
    with pytest.raises(RuntimeError, match="finish"):
        enc.finish()
    with pytest.raises(RuntimeError):
        enc.encode(SIGNAL[:4096])
    enc.close()  # harmless after finish


def test_close_abandons_and_is_idempotent():
    for fmt in AUDIO_FORMATS:
        with open_encoder(fmt) as enc:
            enc.encode(SIGNAL[:8192])
        enc.close()
        with pytest.raises(RuntimeError):
            enc.encode(SIGNAL[:10])
        with pytest.raises(RuntimeError):
            enc.finish()


def test_torch_tensor_input_equals_numpy():
    torch = pytest.importorskip("torch")
    a = feed(open_encoder("pcm", output_rate=24000), SIGNAL)[0]
    enc = open_encoder("pcm", output_rate=24000)
    pieces, i = [], 0
    for n in BLOCKS:
        pieces.append(enc.encode(torch.from_numpy(SIGNAL[i : i + n].copy())))
        i += n
    pieces.append(enc.finish())
    assert b"".join(pieces) == a
    # a (1, N) bfloat16 tensor (as a decoder might produce) is accepted too
    enc = open_encoder("pcm")
    out = enc.encode(torch.zeros(1, 64, dtype=torch.bfloat16)) + enc.finish()
    assert out == b"\0" * 128


def test_non_finite_samples_do_not_poison_the_stream():
    x = SIGNAL[:8192].copy()
    x[100] = np.nan
    x[200] = np.inf
    x[300] = -np.inf
    out = np.frombuffer(feed(open_encoder("pcm"), x, [8192])[0], "<i2")
    assert out[100] == 0 and out[200] == 32767 and out[300] == -32767
    finite = np.delete(np.arange(x.size), [100, 200, 300])
    assert np.array_equal(out[finite], float_to_int16(x[finite]))
    res = np.frombuffer(feed(open_encoder("pcm", output_rate=24000), x, [8192])[0], "<i2")
    assert res.size > 4000


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("rate", RATES)
@pytest.mark.parametrize("streaming", [True, False], ids=["stream", "file"])
@pytest.mark.parametrize("fmt", AUDIO_FORMATS)
def test_round_trip(fmt, streaming, rate):
    enc = open_encoder(fmt, output_rate=rate, streaming=streaming)
    data, pieces = feed(enc, SIGNAL)
    coded = coded_sample_rate(fmt, rate)
    assert enc.sample_rate == coded
    if not streaming:
        assert all(p == b"" for p in pieces[:-1]), "whole-file mode returns everything at finish"
    else:
        assert any(pieces[:-1]), "streaming mode returns bytes before finish"

    dec_rate, channels, samples = decode(data, fmt)
    assert channels == 1
    if fmt != "pcm":
        # Ogg Opus always decodes at 48 kHz; the coded rate is only a bandwidth limit
        assert dec_rate == (48000 if fmt == "opus" else coded)
    dec_rate = coded if fmt == "pcm" else dec_rate
    expected_len = N * dec_rate / IN_RATE

    if fmt in LOSSLESS:
        want = expected_int16(SIGNAL, coded)
        assert samples.dtype == np.int16
        assert samples.size == want.size == round(expected_len)
        if coded == IN_RATE:
            assert np.array_equal(samples, want)  # bit-exact, clip-then-round
            assert np.array_equal(samples[1000 : 1000 + SPECIALS.size], SPECIALS_INT16)
        else:
            assert np.abs(samples.astype(int) - want).max() <= 1
        return

    # lossy: encoder priming / frame padding may add a little, never lose audio
    extra = samples.size - expected_len
    frame = {"mp3": 1152, "aac": 1024, "opus": 960}[fmt]
    assert -2 <= extra <= 3 * frame, f"{fmt}: decoded {samples.size}, expected ~{expected_len:.0f}"
    if fmt == "mp3" and not streaming:
        assert abs(extra) <= 1  # the Info frame's LAME delay/padding lets the decoder trim exactly
    if fmt == "opus":
        assert abs(extra) <= 2  # pre-skip and the end granule trim exactly

    # The audio is there from start to end at the right level.
    y = to_float(samples)
    ref = soxr.resample(np.clip(SIGNAL, -1, 1), IN_RATE, dec_rate, quality="HQ")
    mid = slice(int(0.3 * dec_rate), int(1.7 * dec_rate))
    assert rms(y[mid]) == pytest.approx(rms(ref[mid]), rel=0.15)
    last = int(round(expected_len))
    tail = y[last - int(0.1 * dec_rate) : last]
    assert rms(tail) > 0.5 * rms(ref[-int(0.1 * dec_rate) :]), "tail of the audio missing"


@pytest.mark.parametrize("fmt,rate,coded", [("mp3", 30000, 32000), ("aac", 47000, 48000),
                                            ("opus", 22050, 24000), ("flac", 30000, 30000)])
def test_exotic_rate_is_resampled_to_a_legal_one(fmt, rate, coded):
    enc = open_encoder(fmt, output_rate=rate)
    assert enc.output_rate == rate and enc.sample_rate == coded
    data = feed(enc, SIGNAL)[0]
    dec_rate, channels, samples = decode(data, fmt)
    assert channels == 1
    assert dec_rate == (48000 if fmt == "opus" else coded)
    assert samples.size >= N * dec_rate / IN_RATE - 2
    if fmt == "opus":
        head = ogg_pages(data)[0]["body"]
        assert head[:8] == b"OpusHead"
        assert struct.unpack_from("<I", head, 12)[0] == coded  # input sample rate field


# --------------------------------------------------------------------------- container details


def test_streaming_wav_header_uses_unknown_sizes():
    enc = open_encoder("wav", output_rate=24000, streaming=True)
    first = enc.encode(SIGNAL[:2048])
    data = first + feed(enc, SIGNAL[2048:])[0]
    assert first[:4] == b"RIFF" and len(first) > 44  # header leaves with the first audio
    riff, riff_size, wave_id, fmt_id, fmt_size, tag, ch, rate, byte_rate, align, bits = (
        struct.unpack_from("<4sI4s4sIHHIIHH", data, 0)
    )
    assert (riff, wave_id, fmt_id, fmt_size, tag) == (b"RIFF", b"WAVE", b"fmt ", 16, 1)
    assert (ch, rate, byte_rate, align, bits) == (1, 24000, 48000, 2, 16)
    assert riff_size == 0xFFFFFFFF
    assert data[36:40] == b"data"
    assert struct.unpack_from("<I", data, 40)[0] == 0xFFFFFFFF
    assert data.count(b"RIFF") == 1
    assert (len(data) - 44) // 2 == round(N * 24000 / IN_RATE)


def test_whole_file_wav_has_exact_sizes():
    enc = open_encoder("wav", streaming=False)
    data, pieces = feed(enc, SIGNAL)
    assert all(p == b"" for p in pieces[:-1])
    assert struct.unpack_from("<I", data, 4)[0] == len(data) - 8
    assert data[36:40] == b"data"
    assert struct.unpack_from("<I", data, 40)[0] == len(data) - 44 == 2 * N
    with wave.open(io.BytesIO(data)) as w:
        assert (w.getnchannels(), w.getsampwidth(), w.getframerate()) == (1, 2, IN_RATE)
        assert w.getnframes() == N
        assert np.array_equal(np.frombuffer(w.readframes(N), "<i2"), float_to_int16(SIGNAL))


def test_empty_wav_is_valid():
    data = open_encoder("wav", streaming=False).finish()
    assert len(data) == 44 and struct.unpack_from("<I", data, 40)[0] == 0
    data = open_encoder("wav", streaming=True).finish()
    assert len(data) == 44 and struct.unpack_from("<I", data, 40)[0] == 0xFFFFFFFF


@pytest.mark.parametrize("rate", [IN_RATE, 24000, 8000])
@pytest.mark.parametrize("fmt", AUDIO_FORMATS)
def test_a_response_without_audio_is_still_a_playable_file(fmt, rate):
    """A job whose first block is silence yields no audio. mp3 and aac answered an empty body, and
    opus Ogg header pages without an end page: no decoder opened them. Now every format decodes,
    to nothing (pcm, wav, flac) or one codec frame of silence (with a decoder's priming, at most 0.1 s from
    24 kHz up)."""
    for streaming in (True, False):
        enc = open_encoder(fmt, output_rate=rate, streaming=streaming)
        data = enc.encode(np.zeros(0, np.float32)) + enc.finish()
        coded, _, samples = decode(data, fmt)
        seconds = samples.size / (coded if coded > 0 else rate)
        if fmt in ("pcm", "wav", "flac"):
            assert samples.size == 0, (fmt, streaming)
        else:
            assert 0 < seconds <= (0.1 if rate >= 24000 else 0.3) and not np.any(samples), (fmt, streaming, seconds)


@pytest.mark.parametrize("speed", [2.01, 4.0])
def test_speed_above_two_takes_a_one_sample_first_block(speed):
    """FFmpeg's atempo failed with ENOMEM (a 500 mid-response) when its first frame was a single
    sample and the tempo was above 2; the first few samples now wait for the next block."""
    enc = open_encoder("pcm", speed=speed)
    x = sine(seconds=0.5)
    out = enc.encode(x[:1]) + enc.encode(x[1:]) + enc.finish()
    assert len(out) // 2 == round(x.size / speed)
    enc = open_encoder("pcm", speed=speed)
    assert len(enc.encode(x[:1]) + enc.finish()) // 2 == round(1 / speed)


@pytest.mark.parametrize("rate", [44100, 24000])
def test_streaming_mp3_has_no_xing_header(rate):
    data = feed(open_encoder("mp3", output_rate=rate, streaming=True), SIGNAL)[0]
    assert data[:3] != b"ID3", "no ID3 tag in front of a stream"
    frames = mp3_frames(data)  # the whole stream is back-to-back MPEG frames
    assert {r for _, _, r in frames} == {rate}
    off, length, _ = frames[0]
    first = data[off : off + length]
    for tag in (b"Xing", b"Info", b"LAME"):
        assert tag not in first
    assert b"Xing" not in data and b"Info" not in data[:4096]


def test_whole_file_mp3_has_exact_info_frame():
    # documented choice: a complete file gets LAME's CBR "Info" frame with the real frame
    # count and encoder delay, so players show the right duration and trim the priming
    data = feed(open_encoder("mp3", streaming=False), SIGNAL)[0]
    frames = mp3_frames(data)
    off, length, _ = frames[0]
    first = data[off : off + length]
    assert b"Info" in first
    pos = first.index(b"Info")
    flags = struct.unpack_from(">I", first, pos + 4)[0]
    assert flags & 1
    assert struct.unpack_from(">I", first, pos + 8)[0] == len(frames) - 1


@pytest.mark.parametrize("rate", [44100, 16000])
def test_aac_is_back_to_back_adts(rate):
    data = feed(open_encoder("aac", output_rate=rate), SIGNAL)[0]
    frames = adts_frames(data)
    assert set(frames) == {(rate, 1)}
    assert len(frames) * 1024 >= N * rate / IN_RATE


@pytest.mark.parametrize("rate", [44100, 24000])
def test_ogg_opus_tail_is_complete(rate):
    enc = open_encoder("opus", output_rate=rate, streaming=True)
    data, pieces = feed(enc, SIGNAL)
    pages = ogg_pages(data)  # every page present, CRC-valid, tiling the bytes
    assert [p["seq"] for p in pages] == list(range(len(pages)))
    assert len({p["serial"] for p in pages}) == 1
    assert pages[0]["flags"] & 2 and pages[0]["body"][:8] == b"OpusHead"
    assert pages[1]["body"][:8] == b"OpusTags"
    assert pages[0]["body"][9] == 1  # channel count
    assert sum(1 for p in pages if p["flags"] & 4) == 1 and pages[-1]["flags"] & 4
    # the last page (EOS) is written only when the muxer closes: it must come from finish()
    assert b"OggS" in pieces[-1]
    assert not any(p["flags"] & 4 for p in ogg_pages(b"".join(pieces[:-1])))
    pre_skip = struct.unpack_from("<H", pages[0]["body"], 10)[0]
    want_48k = N * 48000 / IN_RATE
    assert abs(pages[-1]["granule"] - pre_skip - want_48k) <= 2
    dec_rate, _, samples = decode(data, "opus")
    assert dec_rate == 48000 and abs(samples.size - want_48k) <= 2


def test_flac_streaminfo():
    want = float_to_int16(SIGNAL)
    data = feed(open_encoder("flac", streaming=False), SIGNAL)[0]
    assert data[:4] == b"fLaC" and data[4] & 0x7F == 0  # STREAMINFO first
    info = data[8:42]
    rate = int.from_bytes(info[10:13], "big") >> 4
    channels = ((info[12] >> 1) & 7) + 1
    bits = (((info[12] & 1) << 4) | (info[13] >> 4)) + 1
    total = int.from_bytes(info[13:18], "big") & ((1 << 36) - 1)
    assert (rate, channels, bits, total) == (IN_RATE, 1, 16, N)
    assert info[18:34] == hashlib.md5(want.tobytes()).digest()  # MD5 of the exact samples
    # streaming FLAC cannot go back: total samples "unknown" (0), same audio frames
    stream = feed(open_encoder("flac", streaming=True), SIGNAL)[0]
    assert int.from_bytes(stream[8 + 13 : 8 + 18], "big") & ((1 << 36) - 1) == 0
    assert stream.count(b"fLaC") == 1
    assert np.array_equal(decode(stream, "flac")[2], want)
    assert len(stream) == len(data)  # only header fields differ


# --------------------------------------------------------------------------- block invariance


@pytest.mark.parametrize("rate", [44100, 24000])
@pytest.mark.parametrize("fmt", LOSSLESS)
def test_lossless_bytes_do_not_depend_on_block_sizes(fmt, rate):
    one = feed(open_encoder(fmt, output_rate=rate), SIGNAL, [N])[0]
    uneven = feed(open_encoder(fmt, output_rate=rate), SIGNAL, BLOCKS)[0]
    tiny = feed(open_encoder(fmt, output_rate=rate), SIGNAL, [2048, 1, 4096, 333, 17])[0]
    assert one == uneven == tiny


@pytest.mark.parametrize("speed", [1.0, 1.5])
@pytest.mark.parametrize("rate", [44100, 24000])
@pytest.mark.parametrize("fmt", ["mp3", "aac", "opus"])
def test_lossy_codecs_code_the_same_however_the_input_is_cut(fmt, rate, speed):
    """What lets pipeline.Speech feed them slices: the same frames whatever the calls' sizes (opus's
    Ogg pages carry a random serial number, so its decoded samples are compared)."""
    cuts = [[N], BLOCKS, [8192, 16384, 32768, 30720], [2048, 1, 4096, 333, 17]]
    coded = [feed(open_encoder(fmt, output_rate=rate, speed=speed), SIGNAL, blocks)[0] for blocks in cuts]
    if fmt == "opus":
        decoded = [decode(data, fmt)[2] for data in coded]
        assert all(np.array_equal(decoded[0], other) for other in decoded[1:]) and decoded[0].size > 0
    else:
        assert all(data == coded[0] for data in coded[1:]) and len(coded[0]) > 0


def test_resampling_across_blocks_equals_whole_signal():
    enc = open_encoder("pcm", output_rate=24000)
    blockwise = np.frombuffer(feed(enc, SIGNAL)[0], "<i2")
    whole = soxr.resample(SIGNAL, IN_RATE, 24000, quality="HQ")
    assert blockwise.size == whole.size
    assert np.abs(blockwise.astype(int) - float_to_int16(whole)).max() <= 1


@pytest.mark.parametrize("rate", [24000, 16000, 48000])
def test_resampled_sine_has_no_seams(rate):
    # independent of soxr: a resampled sine must equal the ideal sine at the new rate,
    # including every sample next to a block boundary
    x = sine(997.0, seconds=2.0)
    enc = open_encoder("pcm", output_rate=rate)
    y = np.frombuffer(feed(enc, x, [2048, 6144, 4096 * 5, 2048 * 7])[0], "<i2").astype(float)
    ideal = 0.5 * 32767 * np.sin(2 * np.pi * 997.0 * np.arange(y.size) / rate)
    edge = rate // 100  # filter transients at the very start and end of the signal
    err = np.abs(y - ideal)[edge:-edge]
    assert err.max() <= 2.0, f"max error {err.max():.2f} LSB"


# --------------------------------------------------------------------------- speed


def test_speed_one_is_a_bit_exact_bypass():
    enc = open_encoder("pcm", speed=1.0)
    assert enc._stretch is None and enc._resampler is None
    out = np.frombuffer(feed(enc, SIGNAL)[0], "<i2")
    assert np.array_equal(out, float_to_int16(SIGNAL))


@pytest.mark.parametrize("speed", [2.0, 0.5, 0.25, 4.0, 1.3])
def test_speed_changes_duration_not_pitch(speed):
    x = sine(440.0, seconds=2.0)
    enc = open_encoder("pcm", speed=speed)
    assert isinstance(enc._stretch, ae._TimeStretch)
    y = np.frombuffer(feed(enc, x)[0], "<i2")
    assert y.size == pytest.approx(x.size / speed, rel=0.05)
    core = y[y.size // 10 : -(y.size // 10)]
    assert dominant_frequency(core, IN_RATE) == pytest.approx(440.0, rel=0.02)
    assert rms(to_float(core)) == pytest.approx(0.5 / math.sqrt(2), rel=0.1)


@pytest.mark.parametrize("rate", [IN_RATE, 24000])
@pytest.mark.parametrize("speed", [0.25, 0.7, 1.5, 4.0])
def test_speed_keeps_the_last_word_and_the_exact_length(speed, rate):
    """atempo drops part of its last window at the end of its input: the end of every utterance was
    cut (at 4x a tone in the last 0.1 s kept half of its energy; at 0.25x the audio came out 74 ms
    short). Now the audio is samples / speed long, and a tone at the very end keeps the energy it
    has when a second of silence follows it."""
    n, tone = IN_RATE, IN_RATE // 10
    t = np.arange(tone) / IN_RATE
    at_end = np.zeros(n, np.float32)
    at_end[-tone:] = 0.5 * np.sin(2 * np.pi * 440.0 * t)

    def stretched(x):
        enc = open_encoder("pcm", output_rate=rate, speed=speed)
        pieces = [enc.encode(x[i:i + 4096]) for i in range(0, x.size, 4096)]
        return to_float(np.frombuffer(b"".join(pieces) + enc.finish(), "<i2"))

    y = stretched(at_end)
    followed = stretched(np.concatenate([at_end, np.zeros(IN_RATE, np.float32)]))
    assert y.size == round(round(n * rate / IN_RATE) / speed)
    assert np.sum(y ** 2) == pytest.approx(np.sum(followed ** 2), rel=0.05)


def test_speed_does_not_hold_back_a_large_block():
    # atempo releases a frame's output only when the next frame arrives; the encoder feeds
    # it short frames, so a 10 s block comes out (almost) whole, not at finish()
    x = sine(440.0, seconds=10.0)
    enc = open_encoder("pcm", speed=1.5)
    first = len(enc.encode(x)) // 2
    rest = len(enc.finish()) // 2
    assert x.size / 1.5 - first < 0.1 * IN_RATE
    assert first + rest == pytest.approx(x.size / 1.5, rel=0.01)


def test_speed_with_resampling_and_a_lossy_codec():
    x = sine(440.0, seconds=2.0)
    enc = open_encoder("mp3", output_rate=24000, speed=2.0, streaming=False)
    rate, _, y = decode(feed(enc, x)[0], "mp3")
    assert rate == 24000
    assert y.size == pytest.approx(24000 * 1.0, rel=0.05)
    assert dominant_frequency(y[2400:-2400], rate) == pytest.approx(440.0, rel=0.02)


# --------------------------------------------------------------------------- latency


@pytest.mark.parametrize("fmt", AUDIO_FORMATS)
def test_audio_leaves_before_finish(fmt):
    # after ~1 s of audio fed in 2048-sample blocks, most of it is already decodable
    enc = open_encoder(fmt, output_rate=24000, streaming=True)
    fed = 2048 * 22  # 1.02 s
    prefix = b"".join(enc.encode(SIGNAL[i : i + 2048]) for i in range(0, fed, 2048))
    enc.close()
    rate, _, samples = decode(prefix, fmt)
    rate = 24000 if fmt == "pcm" else rate
    assert samples.size / rate >= 0.8, f"{fmt}: only {samples.size / rate:.3f} s out of 1.02 s"
