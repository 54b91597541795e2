"""Uploaded voices: checked, stored atomically with their metadata and speaker latents, deleted.

An uploaded voice `NAME` is three files in the upload directory: `NAME.flac` (the clip, mono,
44.1 kHz, as decoded), `NAME.voice.json` (its metadata and quality report) and
`NAME.latents.safetensors` (its speaker latents, tied to the clip's version, so a restart does
not encode it again). Files an operator placed in a voice directory are read-only here.
"""

from __future__ import annotations

import io
import json
import os
import re
import tempfile
import time
from pathlib import Path

import av
import numpy as np
import soundfile as sf
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from inference import SAMPLE_RATE, AudioDecodeError, load_audio_bytes
from speech_request import RequestError
from voices import VoiceRegistry, VoiceSource, is_no_voice

NAME_RE = re.compile(r"[A-Za-z0-9 _.-]{1,64}")
METADATA_SUFFIX, LATENTS_SUFFIX, AUDIO_SUFFIX = ".voice.json", ".latents.safetensors", ".flac"
SILENT_PEAK = 1e-3  # a clip whose loudest sample stays below this (-60 dBFS) is silence
SHORT_SECONDS, LONG_SECONDS = 5.0, 60.0  # Echo clones best from 10-30 s of clean speech


def check_name(name: str) -> str:
    """An uploaded voice's name: 1-64 of [A-Za-z0-9 _.-], no leading dot or space, not `none`."""
    if not NAME_RE.fullmatch(name or "") or name[0] in ". " or name.endswith(" ") or is_no_voice(name):
        raise RequestError("name must be 1-64 characters of A-Z a-z 0-9 space _ . - , not start with a dot "
                           "or a space, and not be 'none'", "name")
    return name


def quality_report(audio: np.ndarray, rate: int, channels: int) -> dict:
    """Duration, source format, peak, clipping, loudness, silence and warnings of a mono 44.1 kHz clip."""
    duration = audio.size / SAMPLE_RATE
    peak = float(np.abs(audio).max()) if audio.size else 0.0
    frames = audio[:audio.size // 882 * 882].reshape(-1, 882)  # 20 ms frames
    frame_db = 10 * np.log10(np.maximum((frames.astype(np.float64) ** 2).mean(axis=1), 1e-12))
    report = {"duration_seconds": round(duration, 2), "sample_rate": rate, "channels": channels,
              "peak": round(peak, 4), "clipped_fraction": round(float((np.abs(audio) >= 0.999).mean()), 5),
              "loudness_dbfs": round(10 * float(np.log10(max(float((audio.astype(np.float64) ** 2).mean()), 1e-12))), 1),
              "silence_fraction": round(float((frame_db < -50).mean()) if frames.size else 1.0, 3)}
    warnings = []
    if duration < SHORT_SECONDS:
        warnings.append(f"short: {duration:.1f} s; Echo clones best from 10-30 s of speech")
    if duration > LONG_SECONDS:
        warnings.append(f"long: {duration:.1f} s; 10-30 s of clean speech is enough")
    if report["clipped_fraction"] > 1e-3:
        warnings.append("clipped: the recording is distorted where it hit full scale")
    if report["silence_fraction"] > 0.5:
        warnings.append("mostly silence: trim the pauses")
    return {**report, "warnings": warnings}


class VoiceLibrary:
    """Uploads into `directory` (one of the registry's voice directories)."""

    def __init__(self, directory: Path, registry: VoiceRegistry, max_bytes: int, max_seconds: float):
        self.directory, self.registry = Path(directory), registry
        self.max_bytes, self.max_seconds = max_bytes, max_seconds

    def add(self, name: str, data: bytes, consent: str | None = None, overwrite: bool = False) -> dict:
        """Check and store a voice; returns its metadata. Raises RequestError (with its HTTP status)."""
        name = check_name(name)
        if not overwrite and name in self.registry:
            raise RequestError(f"a voice named {name!r} exists; send overwrite=true to replace it", "name",
                               status=409)
        if name in self.registry and not self.is_uploaded(name):
            raise RequestError(f"voice {name!r} was placed by the operator and cannot be replaced", "name", status=403)
        audio, rate, channels = self._decode(data)
        metadata = {"object": "audio.voice", "id": name, "name": name, "created_at": int(time.time()),
                    "consent": consent, "uploaded": True, "quality": quality_report(audio, rate, channels)}
        self.directory.mkdir(parents=True, exist_ok=True)
        self._write(self._path(name, METADATA_SUFFIX), json.dumps(metadata, indent=2).encode())
        buffer = io.BytesIO()
        sf.write(buffer, audio, SAMPLE_RATE, format="FLAC", subtype="PCM_24")
        self._write(self._path(name, AUDIO_SUFFIX), buffer.getvalue())  # the voice exists from here on
        self._path(name, LATENTS_SUFFIX).unlink(missing_ok=True)  # an overwritten voice's old latents
        return metadata

    def _decode(self, data: bytes) -> tuple[np.ndarray, int, int]:
        if not data:
            raise RequestError("audio_sample is empty", "audio_sample")
        if len(data) > self.max_bytes:
            raise RequestError(f"audio_sample is larger than {self.max_bytes} bytes (ECHO_MAX_VOICE_BYTES)",
                               "audio_sample", status=413)
        try:
            with av.open(io.BytesIO(data)) as container:
                stream = container.streams.audio[0]
                rate, channels = stream.rate, stream.channels
            audio = load_audio_bytes(data, max_duration=self.max_seconds + 1, normalize=False)[0].numpy()
        except (AudioDecodeError, av.FFmpegError, IndexError, ValueError) as e:
            raise RequestError(f"audio_sample is not decodable audio ({type(e).__name__})", "audio_sample") from None
        if audio.size > self.max_seconds * SAMPLE_RATE:
            raise RequestError(f"audio_sample is longer than {self.max_seconds:g} s (ECHO_MAX_VOICE_SECONDS)",
                               "audio_sample")
        if audio.size == 0 or np.abs(audio).max() < SILENT_PEAK:
            raise RequestError("audio_sample is silent", "audio_sample")
        return audio, rate, channels

    def metadata(self, name: str) -> dict:
        """An uploaded voice's stored metadata, or what is known of an operator's voice; 404 if unknown."""
        source = self._source(name)
        if self.is_uploaded(source.name):
            return json.loads(self._path(source.name, METADATA_SUFFIX).read_text())
        return {"object": "audio.voice", "id": source.name, "name": source.name, "uploaded": False,
                "kind": source.kind}

    def delete(self, name: str) -> VoiceSource:
        """Remove an uploaded voice's files; returns what it was (for the caller's caches)."""
        source = self._source(name)
        if not self.is_uploaded(source.name):
            raise RequestError(f"voice {source.name!r} was placed by the operator and cannot be deleted here",
                               "voice_id", status=403)
        for suffix in (AUDIO_SUFFIX, LATENTS_SUFFIX, METADATA_SUFFIX):
            self._path(source.name, suffix).unlink(missing_ok=True)
        return source

    def is_uploaded(self, name: str) -> bool:
        return self._path(name, METADATA_SUFFIX).is_file() and self._path(name, AUDIO_SUFFIX).is_file()

    # -- speaker latents ---------------------------------------------------------------------------

    def stored_latents(self, source: VoiceSource) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The latents saved for exactly this version of an uploaded voice, if any."""
        path = self._path(source.name, LATENTS_SUFFIX)
        if not self.is_uploaded(source.name) or not path.is_file():
            return None
        with safe_open(str(path), framework="pt") as f:
            if (f.metadata() or {}).get("cache_key") != source.cache_key:
                return None
            return f.get_tensor("latent"), f.get_tensor("mask")

    def store_latents(self, source: VoiceSource, latent: torch.Tensor, mask: torch.Tensor) -> None:
        if not self.is_uploaded(source.name):
            return
        buffer = {"latent": latent.detach().float().cpu().contiguous(), "mask": mask.detach().cpu().contiguous()}
        with tempfile.NamedTemporaryFile(dir=self.directory, suffix=".tmp", delete=False) as tmp:
            pass
        save_file(buffer, tmp.name, metadata={"cache_key": source.cache_key})
        os.replace(tmp.name, self._path(source.name, LATENTS_SUFFIX))

    # -- files -------------------------------------------------------------------------------------

    def _source(self, name: str) -> VoiceSource:
        try:
            return self.registry.resolve(name)
        except ValueError:
            raise RequestError(f"no voice named {name!r}", "voice_id", status=404) from None

    def _path(self, name: str, suffix: str) -> Path:
        return self.directory / f"{name}{suffix}"

    def _write(self, path: Path, data: bytes) -> None:
        """All of `data` at `path` or nothing: a temporary file in the same directory, renamed."""
        with tempfile.NamedTemporaryFile(dir=self.directory, suffix=".tmp", delete=False) as tmp:
            tmp.write(data)
            tmp.flush()
            os.fsync(tmp.fileno())
        os.replace(tmp.name, path)
