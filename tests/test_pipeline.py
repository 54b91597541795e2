"""The autoencoder in Echo's latent space, speaker latents, audio loading and the full pipeline."""

import io
import json
from functools import partial

import av
import numpy as np
import pytest
import soundfile as sf
import torch
from safetensors.torch import load_file

import inference as inf
from conftest import REF, assert_close_to_reference

CASES = load_file(REF / "tiny_fish_dac_cases.safetensors")
PIPELINE = json.loads((REF / "tiny_pipeline_case.json").read_text())["sample_pipeline"]


def test_ae_encode_and_decode_match_reference(tiny_fish, tiny_pca):
    assert_close_to_reference(inf.ae_encode(tiny_fish, tiny_pca, CASES["audio"]), CASES["ae_encode"])
    assert_close_to_reference(inf.ae_decode(tiny_fish, tiny_pca, CASES["ae_decode_in"]), CASES["ae_decode"])


def test_speaker_latent_and_mask_match_reference(tiny_fish, tiny_pca):
    latent, mask = inf.get_speaker_latent_and_mask(tiny_fish, tiny_pca, CASES["speaker_audio"])
    assert_close_to_reference(latent, CASES["speaker_latent"])
    assert torch.equal(mask, CASES["speaker_mask"])


def test_long_reference_is_encoded_in_chunks_and_capped(tiny_fish, tiny_pca):
    audio = CASES["speaker_audio"].repeat(1, 3)  # 264600 samples = 129 frames
    latent, mask = inf.get_speaker_latent_and_mask(tiny_fish, tiny_pca, audio, audio_chunk_size=40 * 2048)
    assert latent.shape == (1, 128, 80) and mask.all()
    whole_chunks = torch.cat([inf.ae_encode(tiny_fish, tiny_pca, audio[None, :, i:i + 40 * 2048])
                              for i in range(0, 120 * 2048, 40 * 2048)], dim=1)
    assert torch.allclose(latent[:, :120], whole_chunks, atol=1e-5)
    capped, _ = inf.get_speaker_latent_and_mask(tiny_fish, tiny_pca, audio, max_speaker_latent_length=64)
    assert capped.shape[1] == 64
    padded, padded_mask = inf.get_speaker_latent_and_mask(tiny_fish, tiny_pca, CASES["speaker_audio"],
                                                          max_speaker_latent_length=64, pad_to_max=True,
                                                          audio_chunk_size=16 * 2048)
    assert padded.shape == (1, 64, 80) and int(padded_mask.sum()) == 88200 // 2048


def test_sample_pipeline_matches_reference(tiny_model, tiny_fish, tiny_pca):
    sample_fn = partial(inf.sample_euler_cfg_independent_guidances, num_steps=PIPELINE["num_steps"],
                        cfg_scale_text=PIPELINE["cfg_scale_text"], cfg_scale_speaker=PIPELINE["cfg_scale_speaker"],
                        cfg_min_t=PIPELINE["cfg_min_t"], cfg_max_t=PIPELINE["cfg_max_t"],
                        sequence_length=PIPELINE["sequence_length"])
    audio, text = inf.sample_pipeline(tiny_model, tiny_fish, tiny_pca, sample_fn, PIPELINE["text_prompt"],
                                      CASES["speaker_audio"], PIPELINE["rng_seed"])
    assert text == PIPELINE["normalized_text"]
    assert_close_to_reference(audio, CASES["pipeline_audio"])


def test_sample_pipeline_without_a_voice(tiny_model, tiny_fish, tiny_pca):
    sample_fn = partial(inf.sample_euler_cfg_joint_unconditional, num_steps=2, cfg_scale_text=3.0,
                        cfg_scale_speaker=8.0, cfg_min_t=0.5, cfg_max_t=1.0, sequence_length=8)
    audio, _ = inf.sample_pipeline(tiny_model, tiny_fish, tiny_pca, sample_fn, "Hi.", None, 0)
    assert audio.ndim == 3 and audio.shape[-1] % 2048 == 0 and torch.isfinite(audio).all()


def test_flattening_point():
    speech = torch.randn(30, 80, generator=torch.Generator().manual_seed(0))
    silence = torch.zeros(25, 80)
    assert inf.find_flattening_point(torch.cat([speech, silence, speech])) == 30
    assert inf.find_flattening_point(speech) == 30  # nothing flat: the whole length
    assert inf.find_flattening_point(torch.cat([speech, torch.zeros(5, 80)])) == 30  # padding counts as silence
    audio = torch.ones(1, 1, 55 * 2048)
    assert inf.crop_audio_to_flattening_point(audio, torch.cat([speech, silence])).shape[-1] == 30 * 2048


# ---- load_audio -----------------------------------------------------------------------------


def _sine(rate, seconds, channels=1, freq=440.0):
    t = np.arange(int(rate * seconds)) / rate
    mono = 0.3 * np.sin(2 * np.pi * freq * t).astype(np.float32)
    return np.stack([mono * (c + 1) for c in range(channels)], axis=1)


def _encode(path, data, rate, fmt):
    with av.open(str(path), "w", format=fmt) as out:
        stream = out.add_stream({"mp3": "libmp3lame", "ogg": "libopus", "ipod": "aac"}[fmt], rate=rate,
                                layout="stereo" if data.shape[1] == 2 else "mono")
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(data.T), format="fltp",
                                           layout="stereo" if data.shape[1] == 2 else "mono")
        frame.sample_rate = rate
        for packet in stream.encode(frame):
            out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)


def test_load_audio_wav_resamples_and_normalises(tmp_path):
    path = tmp_path / "v.wav"
    sf.write(path, _sine(22050, 1.0), 22050)
    audio = inf.load_audio(path)
    assert audio.shape[0] == 1 and abs(audio.shape[1] - 44100) <= 64
    assert audio.dtype == torch.float32 and audio.abs().max() == pytest.approx(1.0)


def test_load_audio_downmixes_stereo(tmp_path):
    path = tmp_path / "stereo.flac"
    sf.write(path, _sine(44100, 0.5, channels=2), 44100)
    audio = inf.load_audio(str(path))
    assert audio.shape == (1, 22050)


@pytest.mark.parametrize("fmt, suffix", [("mp3", ".mp3"), ("ogg", ".opus"), ("ipod", ".m4a")])
def test_load_audio_compressed_formats(tmp_path, fmt, suffix):
    path = tmp_path / f"v{suffix}"
    _encode(path, _sine(48000 if fmt == "ogg" else 44100, 1.0), 48000 if fmt == "ogg" else 44100, fmt)
    audio = inf.load_audio(path)
    assert abs(audio.shape[1] - 44100) < 4096


def test_load_audio_honours_max_duration(tmp_path):
    path = tmp_path / "long.wav"
    sf.write(path, _sine(44100, 3.0), 44100)
    assert inf.load_audio(path, max_duration=1).shape == (1, 44100)
    assert inf.load_audio(path, max_duration=None).shape == (1, 3 * 44100)


def test_load_audio_from_bytes():
    buf = io.BytesIO()
    sf.write(buf, _sine(16000, 0.5), 16000, format="WAV")
    assert abs(inf.load_audio_bytes(buf.getvalue()).shape[1] - 22050) <= 64


@pytest.mark.parametrize("content", [b"this is not audio at all" * 10, b""])
def test_undecodable_audio_names_the_file(tmp_path, content):
    path = tmp_path / "broken.wav"
    path.write_bytes(content)
    with pytest.raises(inf.AudioDecodeError, match="broken.wav"):
        inf.load_audio(path)


def test_missing_audio_file_names_the_file(tmp_path):
    with pytest.raises(inf.AudioDecodeError, match="nowhere.wav"):
        inf.load_audio(tmp_path / "nowhere.wav")


def test_the_flattening_frame_is_found_on_the_device_as_on_the_host():
    """flattening_frame (no host sync: its value travels with the block's audio) is the first flat
    window's frame, as a search of the flat windows on the host finds it."""
    def on_host(data, window=20):
        padded = torch.cat([data, torch.zeros(window, 80)])
        flat = [padded[i:i + window].std() < 0.05 and padded[i:i + window].mean().abs() < 0.1 for i in range(len(data))]
        return flat.index(True) if any(flat) else len(data)

    gen = torch.Generator().manual_seed(0)
    for frames in (1, 7, 20, 33, 64):
        for quiet_from in range(0, frames + 1, 5):
            data = torch.randn(frames, 80, generator=gen)
            data[quiet_from:] *= 0.001
            frame = inf.flattening_frame(data)
            assert frame.ndim == 0 and int(frame) == on_host(data) == inf.find_flattening_point(data)
    assert int(inf.flattening_frame(torch.zeros(0, 80))) == 0
