"""The voice registry: reference audio by name, inline (base64) voices, and the speaker cache.

A *voice* is an audio file (`.wav .mp3 .flac .ogg .opus .m4a`, extension case-insensitive) or,
with folder support, a folder holding such files, directly under one of the voice directories
(`ECHO_VOICE_DIRS`). Its id is the file stem or the folder name. A request may name a voice by
its id, or a file voice by its file name with extension; matching is exact and case-sensitive.
Earlier directories win when two share an id; inside one directory a folder wins over a file
with the same id, and among files the one whose file name sorts first wins.

Safety: a name is only ever looked up in the directory listing, never joined onto a path. Names
with a path separator, a NUL byte, `.`/`..`, a leading dot (hidden entries are not voices) or
longer than 255 characters are refused, and an entry (file, folder, or a file inside a folder
voice) whose real path, symlinks resolved, lies outside its voice directory is not a voice.
All of these give `UnknownVoiceError`. An entry whose name is not UTF-8 is no voice (a warning
says so once), and a file whose id is `none` (any case) is known by its file name only: `none`
means no reference.

Inline voices: a `data:` URL (`data:audio/wav;base64,...`) or bare base64 audio. See
`looks_like_inline_audio` for the rule that tells them from names.

`SpeakerCache` holds whatever the server derives from a voice (speaker latents, KV caches),
keyed by the `VoiceSource.cache_key`, which changes whenever a file of the voice is edited,
replaced, added or removed.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import os
import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from inference import SAMPLE_RATE, AudioDecodeError, AudioTooLong, load_audio, load_audio_bytes

log = logging.getLogger(__name__)

__all__ = [
    "AUDIO_EXTENSIONS",
    "FOLDER_GAP_SECONDS",
    "INLINE_MIN_CHARS",
    "InvalidVoiceError",
    "NO_VOICE",
    "SpeakerCache",
    "UnknownVoiceError",
    "VoiceError",
    "VoiceRegistry",
    "VoiceSource",
    "decode_inline_voice",
    "inline_cache_key",
    "is_no_voice",
    "inline_voice_audio",
    "load_voice_audio",
    "looks_like_inline_audio",
]

AUDIO_EXTENSIONS = frozenset({".wav", ".mp3", ".flac", ".ogg", ".opus", ".m4a"})
NO_VOICE = "none"
FOLDER_GAP_SECONDS = 1.0
MAX_NAME_LENGTH = 255  # NAME_MAX of common file systems: no voice name is longer
INLINE_MIN_CHARS = MAX_NAME_LENGTH + 1


class VoiceError(ValueError):
    """A voice could not be used (HTTP 400 with param "voice")."""


class UnknownVoiceError(VoiceError):
    """No voice of that name in the voice directories."""

    def __init__(self, name: str):
        self.voice = name
        shown = name if len(name) <= 64 else name[:61] + "..."
        super().__init__(
            f"Unknown voice {shown!r}. GET /v1/voices lists the available voices (ECHO_VOICE_ALIASES gives "
            f"them other names); a voice may also be base64 audio, a data: URL, or 'none' for no reference.")


class InvalidVoiceError(VoiceError):
    """An inline voice that is not valid base64 audio, or is too large; or a voice file that
    cannot be read or decoded."""


# ---------------------------------------------------------------------------------------------
# Named voices


@dataclass(frozen=True)
class VoiceSource:
    """A resolved voice: its id, its file or folder, the audio files to load (a folder's sorted by
    name) and a cache key built from each file's path, real path, mtime_ns and size."""

    name: str
    kind: Literal["file", "folder"]
    path: Path
    files: tuple[Path, ...]
    cache_key: str

    @property
    def cache_name(self) -> str:
        """The identity to pass as `name=` to `SpeakerCache`: one per file or folder, so a new
        version of it evicts the old one."""
        return str(self.path)


@dataclass(frozen=True)
class _Entry:
    name: str
    kind: Literal["file", "folder"]
    path: str  # (strings: a listing builds thousands of entries, a request resolves one)
    root: str  # the real path of the voice directory


def _is_audio_name(file_name: str) -> bool:
    return not file_name.startswith(".") and os.path.splitext(file_name)[1].lower() in AUDIO_EXTENSIONS


def _within(real: str, root: str) -> bool:
    try:
        return real != root and os.path.commonpath([real, root]) == root
    except ValueError:
        return False


def _inside(item: os.DirEntry, real_parent: str, root: str) -> bool:
    """Whether a listed entry (of the directory whose real path is `real_parent`) has its real path
    inside `root`. Only a symlink is resolved: a listing has thousands of plain files, and each
    resolution costs a stat per path component."""
    try:
        if item.is_symlink():
            return _within(os.path.realpath(item.path), root)
    except OSError:
        return False
    return real_parent == root or _within(os.path.join(real_parent, item.name), root)


def _valid_name(name: object) -> bool:
    return (isinstance(name, str) and 0 < len(name) <= MAX_NAME_LENGTH and not name.startswith(".")
            and "\x00" not in name and "/" not in name and "\\" not in name
            and os.sep not in name and (os.altsep is None or os.altsep not in name)
            and not os.path.isabs(name))


class VoiceRegistry:
    """Voices under `dirs` (missing directories are skipped). The directories are listed afresh
    on every call, so added, removed and edited voices are seen at once."""

    def __init__(self, dirs: Sequence[Path | str], folder_support: bool = True):
        if isinstance(dirs, (str, Path)):
            dirs = [dirs]
        self.dirs: tuple[Path, ...] = tuple(Path(d) for d in dirs)
        self.folder_support = folder_support
        self._unnamed: set[str] = set()  # entries left out for their names (warned about once)

    def list(self) -> list[str]:
        """Sorted voice ids (for GET /v1/voices)."""
        return self.listing()[0]

    def known(self) -> set[str]:
        """Every name `resolve` takes now (ids and file voices' file names), from one listing."""
        return self.listing()[1]

    def listing(self) -> tuple[list[str], set[str]]:
        """(`list()`, `known()`), from one listing of the directories."""
        by_id, by_file_name = self._scan()
        return sorted(by_id), set(by_id) | set(by_file_name)

    def __contains__(self, name: object) -> bool:
        try:
            self.resolve(name)  # type: ignore[arg-type]
        except VoiceError:
            return False
        return True

    def resolve(self, name: str) -> VoiceSource:
        """The voice called `name` (id, or file name with extension); `UnknownVoiceError`
        otherwise. The source records each file's mtime and size now, in its cache key."""
        if not _valid_name(name):
            raise UnknownVoiceError(name if isinstance(name, str) else repr(name))
        by_id, by_file_name = self._scan()
        entry = by_id.get(name) or by_file_name.get(name)
        if entry is None:
            raise UnknownVoiceError(name)
        where = Path(entry.path)
        files = [where] if entry.kind == "file" else self._folder_files(where, entry.root)
        if not files:
            raise UnknownVoiceError(name)
        digest = hashlib.sha256(entry.kind.encode())
        for path in files:
            try:
                st = os.stat(path)
            except OSError:
                raise UnknownVoiceError(name) from None  # removed while we looked
            # ctime and inode too: a same-length clip copied over with its old mtime kept (cp -p, rsync -a).
            # Not the device number: overlayfs and NFS give a new one at each mount (a restart, another node)
            digest.update(f"\0{path}\0{os.path.realpath(path)}\0{st.st_mtime_ns}\0{st.st_size}\0{st.st_ctime_ns}"
                          f"\0{st.st_ino}".encode("utf-8", "surrogateescape"))
        return VoiceSource(name=entry.name, kind=entry.kind, path=where, files=tuple(files),
                           cache_key=f"voice:{entry.name}:{digest.hexdigest()[:40]}")

    def load(self, name: str, max_duration: float | None) -> tuple[VoiceSource, Tensor]:
        """`resolve` then `load_voice_audio`."""
        source = self.resolve(name)
        return source, load_voice_audio(source, max_duration)

    # -- listing --------------------------------------------------------------------------------

    def _scan(self) -> tuple[dict[str, _Entry], dict[str, _Entry]]:
        """Voices by id and file voices by file name, earlier directories first."""
        by_id: dict[str, _Entry] = {}
        by_file_name: dict[str, _Entry] = {}
        for directory in self.dirs:
            root = os.path.realpath(directory)
            try:
                with os.scandir(root) as it:
                    dir_entries = sorted(it, key=lambda e: e.name)
            except OSError:
                continue
            folders, files = [], []
            for item in dir_entries:
                if item.name.startswith(".") or not self._nameable(item):
                    continue
                try:
                    is_dir, is_file = item.is_dir(), item.is_file()
                except OSError:
                    continue
                if not (is_dir or is_file) or not _inside(item, root, root):
                    continue
                if is_file and _is_audio_name(item.name):
                    files.append(_Entry(os.path.splitext(item.name)[0], "file", item.path, root))
                elif is_dir and self.folder_support and self._folder_files(Path(item.path), root):
                    folders.append(_Entry(item.name, "folder", item.path, root))
            for entry in folders + files:
                if not is_no_voice(entry.name):  # `none` is no voice: a file called so is known by its file name
                    by_id.setdefault(entry.name, entry)
                if entry.kind == "file":
                    by_file_name.setdefault(os.path.basename(entry.path), entry)
        return by_id, by_file_name

    def _nameable(self, item: os.DirEntry) -> bool:
        """Whether an entry's name is text a response can carry: a name in no UTF-8 (a file unpacked
        from an old archive) would fail every voice list; it is left out, with a warning once."""
        try:
            item.name.encode("utf-8")
            return True
        except UnicodeEncodeError:
            if item.path not in self._unnamed:
                self._unnamed.add(item.path)
                log.warning("%r is not a voice: its name is not UTF-8 (rename it)", item.path)
            return False

    @staticmethod
    def _folder_files(folder: Path, root: str) -> list[Path]:
        """A folder voice's audio files (direct children, not hidden, real path inside the voice
        directory), sorted by file name."""
        try:
            with os.scandir(folder) as it:
                items = sorted(it, key=lambda e: e.name)
        except OSError:
            return []
        out, real_folder = [], os.path.realpath(folder)
        for item in items:
            try:
                if not (_is_audio_name(item.name) and item.is_file()):
                    continue
            except OSError:
                continue
            if _inside(item, real_folder, root):
                out.append(Path(item.path))
        return out


def load_voice_audio(source: VoiceSource, max_duration: float | None) -> Tensor:
    """A voice's audio, (1, samples) float32 mono at 44.1 kHz. A folder voice is its files in
    order, each peak-normalised, joined with 1 s of silence; the total is capped at
    `max_duration` seconds (None or <= 0: no cap). A file that vanished or cannot be decoded
    raises `InvalidVoiceError` naming it."""
    cap = None if not max_duration or max_duration <= 0 else int(max_duration * SAMPLE_RATE)
    gap = int(FOLDER_GAP_SECONDS * SAMPLE_RATE)
    pieces: list[Tensor] = []
    total = 0
    for path in source.files:
        if pieces:
            if cap is not None and total + gap >= cap:
                break
            pieces.append(torch.zeros(1, gap))
            total += gap
        remaining = None if cap is None else cap - total
        if not os.path.isfile(path):
            raise InvalidVoiceError(
                f"voice {source.name!r}: its file {path.name!r} is no longer there (it was removed or "
                f"renamed); list the voices again with GET /v1/voices")
        try:
            audio = load_audio(path, max_duration=None if remaining is None else (remaining + 0.5) / SAMPLE_RATE)
        except AudioDecodeError as e:
            raise InvalidVoiceError(f"voice {source.name!r}: {e}") from e
        if remaining is not None:
            audio = audio[:, :remaining]
        pieces.append(audio)
        total += audio.shape[1]
    return torch.cat(pieces, dim=1) if len(pieces) > 1 else pieces[0]


# ---------------------------------------------------------------------------------------------
# "none" and inline voices


def is_no_voice(value: object) -> bool:
    """`none` in any case (surrounding whitespace ignored): generate without a reference."""
    return isinstance(value, str) and value.strip().lower() == NO_VOICE


_DATA_URL_RE = re.compile(r"data:([^,]*),", re.IGNORECASE)
DATA_URL_MAX_META = 256  # characters between "data:" and "," (`audio/wav;codecs=1;base64` and the like)
_ALLOWED_MEDIA_PREFIXES = ("audio/", "video/")
_ALLOWED_MEDIA_TYPES = {"", "application/octet-stream", "application/ogg"}
_BASE64_RE = re.compile(rb"[A-Za-z0-9+/]*={0,2}")
_WHITESPACE = b" \t\r\n\f\v"


def looks_like_inline_audio(value: object) -> bool:
    """Whether a `voice` string is inline audio rather than a voice name.

    The rule: after stripping surrounding whitespace, it starts with `data:` (any case), or it is
    longer than 255 characters. No voice name can be that long (file names are at most 255 bytes
    on common file systems and names longer than that are refused), and any real clip encodes to
    far more than 255 base64 characters. A long string that is not valid base64 is thus reported
    as invalid inline audio (`InvalidVoiceError`), not as an unknown voice.
    """
    if not isinstance(value, str):
        return False
    s = value.strip()
    return s[:5].lower() == "data:" or len(s) >= INLINE_MIN_CHARS


def _max_encoded_chars(max_bytes: int) -> int:
    return 4 * -(-max_bytes // 3)


def decode_inline_voice(value: str, max_bytes: int | None) -> bytes:
    """The encoded audio bytes of a base64 string or a `data:<audio type>;base64,<data>` URL.

    Standard and URL-safe alphabets are accepted, padding is optional, ASCII whitespace (line
    wrapping) is ignored. More than `max_bytes` decoded bytes -> `InvalidVoiceError` naming the
    limit; the string's length is checked before anything is decoded, so a huge string is refused
    at once. Not base64, empty, or a data: URL of a non-audio type -> `InvalidVoiceError`.
    """
    if not isinstance(value, str):
        raise InvalidVoiceError("voice must be a string")
    s = value.strip()
    if s[:5].lower() == "data:":
        m = _DATA_URL_RE.match(s)
        if m is None:
            raise InvalidVoiceError("voice data: URL has no ',' before its data")
        if m.end(1) - m.start(1) > DATA_URL_MAX_META:  # (split, a 15 MB one took 700 MB)
            raise InvalidVoiceError(f"voice data: URL's media type and parameters are over {DATA_URL_MAX_META} "
                                    "characters")
        meta = [p.strip().lower() for p in m.group(1).split(";")]
        if "base64" not in meta[1:]:
            raise InvalidVoiceError("voice data: URL must be base64-encoded (data:audio/...;base64,...)")
        media = meta[0]
        if not (media.startswith(_ALLOWED_MEDIA_PREFIXES) or media in _ALLOWED_MEDIA_TYPES):
            raise InvalidVoiceError(f"voice data: URL has media type {media!r}; expected audio/*")
        s = s[m.end():]
    if max_bytes is not None:
        limit = _max_encoded_chars(max_bytes)
        # Generous allowance for line breaks; the exact count follows once whitespace is gone.
        if len(s) > 2 * limit + 1024:
            raise _too_large(max_bytes)
    try:
        data = s.encode("ascii")
    except UnicodeEncodeError:
        raise InvalidVoiceError("voice is not valid base64 audio (non-ASCII characters)") from None
    data = data.translate(None, _WHITESPACE)
    if max_bytes is not None and len(data.rstrip(b"=")) > limit:
        raise _too_large(max_bytes)
    if b"-" in data or b"_" in data:
        data = data.translate(bytes.maketrans(b"-_", b"+/"))
    data = data.rstrip(b"=")
    if not data:
        raise InvalidVoiceError("voice base64 audio is empty")
    if len(data) % 4 == 1 or not _BASE64_RE.fullmatch(data):
        raise InvalidVoiceError("voice is not valid base64 audio")
    try:
        decoded = base64.b64decode(data + b"=" * (-len(data) % 4), validate=True)
    except (binascii.Error, ValueError) as e:
        raise InvalidVoiceError(f"voice is not valid base64 audio: {e}") from None
    if max_bytes is not None and len(decoded) > max_bytes:
        raise _too_large(max_bytes)
    return decoded


def _too_large(max_bytes: int) -> InvalidVoiceError:
    return InvalidVoiceError(f"voice audio is too large: the limit is {max_bytes} bytes of decoded audio "
                             f"({_max_encoded_chars(max_bytes)} base64 characters)")


def inline_cache_key(data: bytes) -> str:
    """The cache key of inline audio: `inline:` + sha256 of its encoded bytes."""
    return "inline:" + hashlib.sha256(data).hexdigest()


def inline_voice_audio(data: bytes, max_duration: float | None = None, max_seconds: float | None = None) -> Tensor:
    """The audio of an inline voice's bytes, cut at `max_duration` seconds or, with `max_seconds`,
    refused when longer (InvalidVoiceError naming ECHO_MAX_VOICE_SECONDS)."""
    try:
        return load_audio_bytes(data, max_duration=max_duration, refuse_over=max_seconds)
    except AudioTooLong:
        raise InvalidVoiceError(f"the voice clip is longer than {max_seconds:g} s (ECHO_MAX_VOICE_SECONDS)") from None
    except AudioDecodeError as e:
        raise InvalidVoiceError(f"voice base64 data is not decodable audio: {e}") from e


# ---------------------------------------------------------------------------------------------
# Speaker cache


class _Pending:
    __slots__ = ("done", "value", "error")

    def __init__(self):
        self.done = threading.Event()
        self.value: Any = None
        self.error: BaseException | None = None


_MISSING = object()


class SpeakerCache:
    """A thread-safe LRU of at most `max_entries` values (0 disables storing).

    Entries may carry a `name` (the voice's identity, e.g. `VoiceSource.cache_name`) and a
    `version` (default: the key). Storing an entry under a name drops every entry of that name
    with a different version, so the latents of an edited or replaced file do not linger until
    LRU eviction; `discard_name` drops a name outright. Use `version=source.cache_key` when one
    voice version has several entries (e.g. keys `(source.cache_key, device)`).

    `get_or_create` calls the factory at most once per key at a time: concurrent callers of the
    same key wait for the first one and share its value (or its exception). Factories of
    different keys run in parallel; no lock is held while a factory runs.
    """

    def __init__(self, max_entries: int = 32):
        if max_entries < 0:
            raise ValueError(f"max_entries must be >= 0, got {max_entries}")
        self.max_entries = max_entries
        self._lock = threading.Lock()
        self._data: OrderedDict[Hashable, tuple[Any, str | None, Hashable]] = OrderedDict()
        self._pending: dict[Hashable, _Pending] = {}

    def __len__(self) -> int:
        with self._lock:
            return len(self._data)

    def __contains__(self, key: Hashable) -> bool:
        with self._lock:
            return key in self._data

    def keys(self) -> list[Hashable]:
        """Keys, least recently used first."""
        with self._lock:
            return list(self._data)

    def get(self, key: Hashable, default: Any = None) -> Any:
        with self._lock:
            item = self._data.get(key, _MISSING)
            if item is _MISSING:
                return default
            self._data.move_to_end(key)
            return item[0]

    def put(self, key: Hashable, value: Any, *, name: str | None = None, version: Hashable = _MISSING) -> None:
        with self._lock:
            self._put_locked(key, value, name, key if version is _MISSING else version)

    def get_or_create(self, key: Hashable, factory: Callable[[], Any], *, name: str | None = None,
                      version: Hashable = _MISSING) -> Any:
        version = key if version is _MISSING else version
        while True:
            with self._lock:
                item = self._data.get(key, _MISSING)
                if item is not _MISSING:
                    self._data.move_to_end(key)
                    return item[0]
                pending = self._pending.get(key)
                owner = pending is None
                if owner:
                    pending = self._pending[key] = _Pending()
            if owner:
                return self._create(key, factory, name, version, pending)
            pending.done.wait()
            if pending.error is None:
                return pending.value
            if isinstance(pending.error, Exception):
                raise pending.error
            # The creator was interrupted (KeyboardInterrupt, SystemExit...): try again ourselves.

    def _create(self, key, factory, name, version, pending: _Pending) -> Any:
        try:
            value = factory()
        except BaseException as e:
            with self._lock:
                del self._pending[key]
            pending.error = e
            pending.done.set()
            raise
        with self._lock:
            self._put_locked(key, value, name, version)
            del self._pending[key]
        pending.value = value
        pending.done.set()
        return value

    def _put_locked(self, key, value, name, version) -> None:
        if name is not None:
            stale = [k for k, (_, n, v) in self._data.items() if n == name and v != version]
            for k in stale:
                del self._data[k]
        if self.max_entries == 0:
            return
        self._data[key] = (value, name, version)
        self._data.move_to_end(key)
        while len(self._data) > self.max_entries:
            self._data.popitem(last=False)

    def discard(self, key: Hashable) -> bool:
        with self._lock:
            return self._data.pop(key, _MISSING) is not _MISSING

    def discard_name(self, name: str) -> int:
        """Drop every entry stored under `name`; returns how many."""
        with self._lock:
            stale = [k for k, (_, n, _) in self._data.items() if n == name]
            for k in stale:
                del self._data[k]
            return len(stale)

    def clear(self) -> None:
        with self._lock:
            self._data.clear()
