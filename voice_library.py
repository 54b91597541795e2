"""Uploaded voices: checked, stored atomically with their metadata and speaker latents, deleted.

An uploaded voice `NAME` is three files in the upload directory: `NAME.flac` (the clip, mono,
44.1 kHz, as decoded), `NAME.voice.json` (its metadata and quality report) and
`NAME.latents.safetensors` (its speaker latents, tied to the clip's version and to what encoded
them, so a restart does not encode it again, and a server with other weights or another
ECHO_MAX_SPEAKER_LATENT_LENGTH does). Files an operator placed in a voice directory are read-only
here, and so is an upload that a voice of the same name in an earlier voice directory hides.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import io
import json
import logging
import os
import re
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from safetensors import safe_open
from safetensors.torch import save

from inference import SAMPLE_RATE, AudioDecodeError, AudioTooLong, decode_audio
from errors import NO_SPACE_ERRNOS, RequestError
from voices import VoiceRegistry, VoiceSource, is_no_voice

log = logging.getLogger(__name__)
NAME_RE = re.compile(r"[A-Za-z0-9 _.-]{1,64}")
METADATA_SUFFIX, LATENTS_SUFFIX, AUDIO_SUFFIX = ".voice.json", ".latents.safetensors", ".flac"
SILENT_PEAK = 1e-3  # a clip whose loudest sample stays below this (-60 dBFS) is silence
SHORT_SECONDS, LONG_SECONDS = 5.0, 60.0  # Echo clones best from 10-30 s of clean speech


def check_name(name: str) -> str:
    """An uploaded voice's name: 1-64 of [A-Za-z0-9 _.-], no leading dot or space, no trailing space, not `none`."""
    if not NAME_RE.fullmatch(name or "") or name[0] in ". " or name.endswith(" ") or is_no_voice(name):
        raise RequestError("name must be 1-64 characters of A-Z a-z 0-9 space _ . - , not start with a dot "
                           "or a space, not end with a space, and not be 'none'", "name")
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


@dataclass(frozen=True)
class Upload:
    """A checked upload, not stored yet: its name, the clip as it will be stored (FLAC), its metadata."""

    name: str
    flac: bytes
    metadata: dict


class VoiceLibrary:
    """Uploads into `directory` (one of the registry's voice directories).

    Storing is all or nothing, and one upload at a time per directory (an exclusive lock on the
    directory, so replicas sharing it agree too): each file is written in full to a temporary file
    first, and only when all are written are they renamed into place, the audio first and the
    metadata last. A full disk leaves the library as it was and is an `InsufficientStorage` (507).
    """

    def __init__(self, directory: Path, registry: VoiceRegistry, max_bytes: int, max_seconds: float,
                 encoding: str = ""):
        self.directory, self.registry = Path(directory), registry
        self.max_bytes, self.max_seconds = max_bytes, max_seconds
        self.encoding = encoding  # what stored latents were encoded with: others are not used

    def check(self, name: str, data: bytes, consent: str | None = None, overwrite: bool = False) -> Upload:
        """Check a name and a clip (a conflict first, before any decoding); nothing is written.
        Raises RequestError (with its HTTP status)."""
        name = check_name(name)
        if consent is not None and not _is_text(consent):  # (a form field in a charset that makes surrogates)
            raise RequestError("consent is not valid text: send it as UTF-8", "consent")
        self._check_replaceable(name, overwrite)
        audio, rate, channels = self._decode(data)
        audio = np.clip(audio, -1.0, 1.0)  # what the 24-bit FLAC keeps: the report describes the stored clip
        buffer = io.BytesIO()
        sf.write(buffer, audio, SAMPLE_RATE, format="FLAC", subtype="PCM_24")
        metadata = {"object": "audio.voice", "id": name, "name": name, "created_at": int(time.time()),
                    "consent": consent, "uploaded": True, "quality": quality_report(audio, rate, channels)}
        return Upload(name, buffer.getvalue(), metadata)

    def store(self, upload: Upload, overwrite: bool,
              latents: tuple[torch.Tensor, torch.Tensor] | None = None) -> VoiceSource:
        """Store a checked upload (exactly one of several concurrent uploads of a name wins unless
        `overwrite`) and, if given, its speaker latents, tied to the stored version.

        The audio's rename is the commit: its metadata goes first, so however the store is cut short
        (a full disk, a crash) no audio is left without the metadata that makes it an upload, which
        would make it an operator's voice that cannot be deleted or replaced here."""
        name = upload.name
        with _no_space():
            self.directory.mkdir(parents=True, exist_ok=True)
        with self._locked():
            self._check_replaceable(name, overwrite)
            with _TempFiles(self.directory) as temps:
                audio = temps.write(upload.flac)
                metadata = temps.write(json.dumps(upload.metadata, indent=2).encode())
                self._path(name, LATENTS_SUFFIX).unlink(missing_ok=True)  # the replaced version's
                meta_path = self._path(name, METADATA_SUFFIX)
                replaced = temps.write(meta_path.read_bytes()) if self.is_uploaded(name) else None
                with _no_space():
                    os.replace(metadata, meta_path)
                    try:
                        os.replace(audio, self._path(name, AUDIO_SUFFIX))
                    except OSError:  # the replaced version's metadata back; a new name's gone
                        if replaced is not None:
                            os.replace(replaced, meta_path)
                        else:
                            meta_path.unlink(missing_ok=True)
                        raise
            source = self.registry.resolve(name)
            if latents is not None:
                self._store_latents(source, *latents)
        return source

    def _check_replaceable(self, name: str, overwrite: bool) -> None:
        try:
            source = self.registry.resolve(name)
        except ValueError:
            return  # a new name
        if source.name != name:  # the file name of another voice (carol.flac): not a name to replace by
            raise RequestError(f"{name!r} is the file name of voice {source.name!r}: choose another name", "name",
                               status=409)
        if not overwrite:
            raise RequestError(f"a voice named {name!r} exists; send overwrite=true to replace it", "name",
                               status=409)
        if not self._is_upload(source):
            raise RequestError(f"voice {name!r} was placed by the operator and cannot be replaced", "name", status=403)

    def _decode(self, data: bytes) -> tuple[np.ndarray, int, int]:
        if not data:
            raise RequestError("audio_sample is empty", "audio_sample")
        if len(data) > self.max_bytes:
            raise RequestError(f"audio_sample is larger than {self.max_bytes} bytes (ECHO_MAX_VOICE_BYTES)",
                               "audio_sample", status=413)
        try:
            decoded = decode_audio(io.BytesIO(data), normalize=False, refuse_over=self.max_seconds)
        except AudioTooLong:
            raise RequestError(f"audio_sample is longer than {self.max_seconds:g} s (ECHO_MAX_VOICE_SECONDS)",
                               "audio_sample") from None
        except AudioDecodeError as e:
            raise RequestError(f"audio_sample is not decodable audio: {e}", "audio_sample") from None
        audio = decoded.audio[0].numpy()
        if np.abs(audio).max() < SILENT_PEAK:
            raise RequestError("audio_sample is silent", "audio_sample")
        return audio, decoded.source_rate, decoded.source_channels

    def metadata(self, name: str) -> dict:
        """An uploaded voice's stored metadata, or what is known of an operator's voice; 404 if unknown.
        (Reads take no lock: a delete may take the audio, then the metadata, at any moment.)"""
        source = self._source(name)
        if self._is_upload(source):
            try:
                return json.loads(self._path(source.name, METADATA_SUFFIX).read_text())
            except FileNotFoundError:  # deleted since it was found
                raise _no_voice(name) from None
        self._source(name)  # (again: an upload whose audio a delete took since is no voice now, not an operator's)
        return {"object": "audio.voice", "id": source.name, "name": source.name, "uploaded": False,
                "kind": source.kind}

    def delete(self, name: str) -> VoiceSource:
        """Remove an uploaded voice's files; returns what it was (for the caller's caches). Settled under
        the directory's lock: of concurrent deletes one finds the voice, the others find none (404)."""
        self._deletable(name)  # (before the directory, which may not exist yet, is locked)
        with self._locked():
            source = self._deletable(name)  # (again: another delete may have come first)
            with _no_space("deleted"):  # the audio first: cut short, what is left is no voice
                for suffix in (AUDIO_SUFFIX, METADATA_SUFFIX, LATENTS_SUFFIX):  # (or still an upload)
                    self._path(source.name, suffix).unlink(missing_ok=True)
        return source

    def _deletable(self, name: str) -> VoiceSource:
        """The upload called `name`: 404 if no voice is, 403 if an operator's voice is."""
        source = self._source(name)
        if not self._is_upload(source):
            raise RequestError(f"voice {source.name!r} was placed by the operator and cannot be deleted here",
                               "voice_id", status=403)
        return source

    def is_uploaded(self, name: str) -> bool:
        return self._path(name, METADATA_SUFFIX).is_file() and self._path(name, AUDIO_SUFFIX).is_file()

    def _is_upload(self, source: VoiceSource) -> bool:
        """Whether the voice a name resolves to is this library's upload (not an operator's voice of
        the same name in an earlier directory, which hides the upload)."""
        audio = self._path(source.name, AUDIO_SUFFIX)
        return (source.kind == "file" and os.path.realpath(source.path) == os.path.realpath(audio)
                and self.is_uploaded(source.name))

    # -- speaker latents ---------------------------------------------------------------------------

    def stored_latents(self, source: VoiceSource) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The latents saved for exactly this version of an uploaded voice by this server's encoding, if any."""
        path = self._path(source.name, LATENTS_SUFFIX)
        if not self._is_upload(source) or not path.is_file():
            return None
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            if metadata.get("cache_key") != source.cache_key or metadata.get("encoding") != self.encoding:
                return None
            return f.get_tensor("latent"), f.get_tensor("mask")

    def restore_latents(self, source: VoiceSource, latent: torch.Tensor, mask: torch.Tensor) -> None:
        """Keep the latents of an upload encoded afresh (its stored ones were another encoding's or
        missing), so that the next restart loads them. Not an upload's: nothing to keep."""
        if not self._is_upload(source):
            return
        try:
            with self._locked():  # (not over a newer version's, nor beside a deleted voice)
                if self._is_upload(source) and self.registry.resolve(source.name).cache_key == source.cache_key:
                    self._store_latents(source, latent, mask)
        except (OSError, ValueError, RequestError) as e:  # a cache: the voice is encoded again at the next start
            log.warning("could not keep the speaker latents of voice %r: %s", source.name, e)

    def _store_latents(self, source: VoiceSource, latent: torch.Tensor, mask: torch.Tensor) -> None:
        """Keep a voice's latents beside it (a cache: with no room for it, the voice is encoded again
        when first used after a restart)."""
        tensors = {"latent": latent.detach().float().cpu().contiguous(), "mask": mask.detach().cpu().contiguous()}
        try:
            with _TempFiles(self.directory) as temps:
                path = temps.write(save(tensors, metadata={"cache_key": source.cache_key, "encoding": self.encoding}))
                os.replace(path, self._path(source.name, LATENTS_SUFFIX))
        except InsufficientStorage:
            log.warning("no room to store the speaker latents of voice %r; they are encoded again after a restart",
                        source.name)

    # -- files -------------------------------------------------------------------------------------

    def _source(self, name: str) -> VoiceSource:
        try:
            return self.registry.resolve(name)
        except ValueError:
            raise _no_voice(name) from None

    def _path(self, name: str, suffix: str) -> Path:
        return self.directory / f"{name}{suffix}"

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """The directory's upload lock: one writer at a time, across threads and processes."""
        fd = os.open(self.directory, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock


class InsufficientStorage(RequestError):
    """The voice directory's file system is full (or over quota): HTTP 507."""

    def __init__(self):
        super().__init__("there is no room left to store voices on this server; nothing was stored", status=507)


class _TempFiles:
    """Temporary files in `directory`, each written in full and synced; whatever was not renamed away
    is removed when the block ends, however it ends. A full disk becomes InsufficientStorage."""

    def __init__(self, directory: Path):
        self.directory, self.paths = directory, []

    def write(self, data: bytes) -> str:
        with _no_space():
            fd, path = tempfile.mkstemp(dir=self.directory, prefix=".upload-", suffix=".tmp")
            self.paths.append(path)
            with os.fdopen(fd, "wb") as tmp:
                tmp.write(data)
                tmp.flush()
                os.fsync(tmp.fileno())
        return path

    def __enter__(self) -> _TempFiles:
        return self

    def __exit__(self, *exc) -> None:
        for path in self.paths:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)


class StorageNotWritable(RequestError):
    """The server may not write to its upload directory (permissions, a read-only mount): HTTP 500
    that says so, for the operator to fix."""

    def __init__(self, what: str = "stored"):
        super().__init__(f"this server cannot write to its voice directory (ECHO_VOICE_UPLOAD_DIR); nothing was "
                         f"{what}", status=500, code="voice_storage_not_writable")


def _no_voice(name: str) -> RequestError:
    return RequestError(f"no voice named {name!r}", "voice_id", status=404)


def _is_text(value: str) -> bool:
    """Whether a string is Unicode text that UTF-8 can carry (no lone surrogates, which a form field
    decoded as UTF-7 can hold: stored, every answer naming it would fail)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def writable(directory: Path) -> bool:
    """Whether this process could store voices in `directory` (or create it, if it does not exist yet)."""
    while not directory.exists() and directory != directory.parent:
        directory = directory.parent
    return os.access(directory, os.W_OK | os.X_OK)


@contextlib.contextmanager
def _no_space(what: str = "stored") -> Iterator[None]:
    """A full file system (or quota) inside the block is InsufficientStorage, a directory this process
    may not write StorageNotWritable (nothing was `what`); other errors pass."""
    try:
        yield
    except OSError as e:
        if e.errno in NO_SPACE_ERRNOS:
            raise InsufficientStorage() from None
        if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise StorageNotWritable(what) from None
        raise
