"""Every voice the server speaks with, as one object: the registry's files and folders
(ECHO_VOICE_DIRS), the uploaded library (ECHO_VOICE_UPLOAD_DIR), inline clips, aliases
(ECHO_VOICE_ALIASES), OpenAI's built-in names, and the caches of what is derived from a voice
(its latents and its speaker keys/values), which it empties when a voice changes.

A request's `voice` resolves in one place (`VoiceCatalog.used`, then `reference`): what it speaks
with is what the response reports. Errors are the domain's (`RequestError`, naming `voice`).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable

from torch import Tensor

import inference as inf
from engine import SpeakerReference, VoiceUnusable
from errors import RequestError
from settings import Settings
from voice_library import VoiceLibrary, writable
from voices import (NO_VOICE, SpeakerCache, VoiceRegistry, VoiceSource, decode_inline_voice, inline_cache_key,
                    inline_voice_audio, is_no_voice, load_voice_audio, looks_like_inline_audio)

log = logging.getLogger(__name__)

OPENAI_VOICES = frozenset({"alloy", "ash", "ballad", "cedar", "coral", "echo", "fable", "marin", "nova", "onyx",
                           "sage", "shimmer", "verse"})

# what the engine makes of a clip: (latent, mask), raising VoiceUnusable
EncodeVoice = Callable[[SpeakerReference], tuple[Tensor, Tensor]]


def latents_encoding(settings: Settings) -> str:
    """What a voice's speaker latents depend on besides its audio: the weights (by the settings that
    name them) and the longest reference read."""
    return json.dumps({"model": settings.model_repo, "fish": settings.fish_repo, "fish_dtype": settings.fish_dtype,
                       "max_speaker_latent_length": settings.max_speaker_latent_length}, sort_keys=True)


class VoiceCatalog:
    """The voices of a server with `settings`, and the caches derived from them."""

    def __init__(self, settings: Settings):
        self.settings = settings
        dirs = settings.voice_dirs + ([settings.upload_dir] if settings.upload_dir not in settings.voice_dirs else [])
        self.registry = VoiceRegistry(dirs, folder_support=settings.folder_support)
        self.library = VoiceLibrary(settings.upload_dir, self.registry, settings.max_voice_bytes,
                                    settings.max_voice_seconds, encoding=latents_encoding(settings))
        if settings.uploads_enabled and not writable(settings.upload_dir):
            log.warning("voice uploads are on but this process cannot write to %s: uploads will fail until it "
                        "can (set ECHO_VOICE_UPLOAD_DIR to a writable directory, or ECHO_VOICE_UPLOADS=0)",
                        settings.upload_dir)
        for directory in settings.voice_dirs:  # (the upload directory is made by the first upload)
            if not directory.is_dir():
                log.warning("voice directory %s (ECHO_VOICE_DIRS) does not exist or is not a directory: it holds no "
                            "voices", directory.resolve())
        known = self.registry.known()
        for alias in settings.voice_aliases:
            if not self._speaks(alias, known):
                log.warning("alias %r (ECHO_VOICE_ALIASES) names no voice (%r): it is not listed, and requests for "
                            "it get 400 until that voice exists", alias, self._target(alias))
        if settings.default_voice and not self._speaks(settings.default_voice, known):
            log.warning("ECHO_DEFAULT_VOICE=%r names no voice: requests for OpenAI's voice names (alloy, ...) get "
                        "400 until it exists", settings.default_voice)
        self.latents = SpeakerCache(settings.speaker_cache_size)  # speaker latents, by voice version
        self.keys = SpeakerCache(settings.speaker_kv_cache_size)  # speaker keys/values, by voice version
        self._openai_names_logged: set[str] = set()

    @property
    def max_reference_seconds(self) -> float:
        """The longest reference the model reads (ECHO_MAX_SPEAKER_LATENT_LENGTH frames)."""
        return self.settings.max_speaker_latent_length * inf.AE_DOWNSAMPLE_FACTOR / inf.SAMPLE_RATE

    def names(self) -> list[str]:
        """Every voice a request may name: the registry's and the aliases (ECHO_VOICE_ALIASES) whose voice
        exists now."""
        ids, known = self.registry.listing()  # (one listing of the directories, whatever the number of aliases)
        aliases = self.settings.voice_aliases  # (an alias hides a voice of its name, even one it cannot speak with)
        return sorted({i for i in ids if i not in aliases} | {a for a in aliases if self._speaks(a, known)})

    def metadata(self, name: str) -> dict:
        """What GET /v1/voices/{name} answers for any listed voice: an alias (ECHO_VOICE_ALIASES) as the
        voice it speaks with; else the library's (an upload's stored metadata, an operator's voice); 404."""
        if name not in self.settings.voice_aliases:
            return self.library.metadata(name)
        if not self._speaks(name, self.registry.listing()[1]):
            raise RequestError(f"no voice named {name!r}: it is an alias (ECHO_VOICE_ALIASES) of no voice",
                               "voice_id", status=404)
        return {"object": "audio.voice", "id": name, "name": name, "uploaded": False, "kind": "alias",
                "voice": self._target(name)}

    def _target(self, name: str) -> str:
        """What a name speaks with through the aliases (an alias of an alias too): itself if no alias."""
        aliases, seen = self.settings.voice_aliases, set()
        while name in aliases and name not in seen:  # (a loop of aliases ends where it started)
            seen.add(name)
            name = aliases[name]
        return name

    def _speaks(self, alias: str, known: set[str]) -> bool:
        """Whether an alias leads to a voice a request can use (`known`: the registry's names now)."""
        target = self._target(alias)
        return is_no_voice(target) or (target not in self.settings.voice_aliases and target in known)

    def used(self, voice: str) -> str:
        """The voice a request's `voice` speaks with (what X-Echo-Voice reports): an alias's voice; for
        an OpenAI built-in name that is no voice here, ECHO_DEFAULT_VOICE, else the library's first
        voice by name, else `none`; `inline` for inline audio; else the name as given."""
        if voice in self.settings.voice_aliases:
            return self._target(voice)
        if looks_like_inline_audio(voice):
            return "inline"
        if voice.lower() in OPENAI_VOICES and voice not in self.registry:
            default = self.settings.default_voice
            used = self._target(default) if default else next(iter(self.registry.list()), NO_VOICE)
            if voice not in self._openai_names_logged:
                self._openai_names_logged.add(voice)
                log.info("OpenAI voice %r speaks with voice %r (set ECHO_VOICE_ALIASES or ECHO_DEFAULT_VOICE "
                         "to choose)", voice, used)
            return used
        return voice

    def reference(self, voice: str) -> SpeakerReference | None:
        """A request's `voice` as a reference to clone: None for `none`, inline base64 audio, or a
        registry voice (by name or alias). Raises RequestError naming `voice`."""
        return self.resolve(voice)[1]

    def resolve(self, voice: str) -> tuple[str, SpeakerReference | None]:
        """(the voice it speaks with, as `used` names it; its reference), resolved once."""
        used = self.used(voice)
        try:
            return used, self._reference(voice if looks_like_inline_audio(voice) else used)
        except RequestError as e:
            default, aliases = self.settings.default_voice, self.settings.voice_aliases
            if default and voice.lower() in OPENAI_VOICES and used != voice and voice not in aliases:
                raise RequestError(f"OpenAI's voice {voice!r} speaks with ECHO_DEFAULT_VOICE={default!r} on this "
                                   f"server, and that voice cannot be used: {e}", "voice") from e
            raise

    def _reference(self, resolved: str) -> SpeakerReference | None:
        try:
            if is_no_voice(resolved):
                return None
            if looks_like_inline_audio(resolved):
                return self._inline(resolved)
            source = self.registry.resolve(resolved)
        except ValueError as e:
            raise RequestError(str(e), "voice") from e
        return self._registered(source)

    def _registered(self, source: VoiceSource) -> SpeakerReference:
        """A file or folder voice, its saved latents (an uploaded voice's) used when they are current."""
        return SpeakerReference(source.cache_key, lambda: load_voice_audio(source, self.max_reference_seconds),
                                name=source.cache_name, load_latents=lambda: self.library.stored_latents(source),
                                save_latents=lambda latent, mask: self.library.restore_latents(source, latent, mask))

    def _inline(self, voice: str) -> SpeakerReference:
        """A base64 / data: URL voice within ECHO_MAX_VOICE_BYTES and ECHO_MAX_VOICE_SECONDS. Its
        base64 is checked now; it is decoded only when its latents are not cached (keyed by content),
        so a clip sent with every request is decoded once."""
        data = decode_inline_voice(voice, self.settings.max_voice_bytes)
        return SpeakerReference(inline_cache_key(data),
                                lambda: inline_voice_audio(data, max_seconds=self.settings.max_voice_seconds))

    # ---- the uploaded library ---------------------------------------------------------------

    def add(self, name: str, data: bytes, consent: str | None, overwrite: bool, encode: EncodeVoice) -> dict:
        """Check an uploaded voice, encode it with `encode`, then store it with its latents (slow: call
        it off the event loop), so neither a request nor a restart has to encode it. Nothing is stored
        unless all of it is usable. Raises RequestError (with its HTTP status)."""
        self._require_uploads()
        if name.lower() in OPENAI_VOICES:  # every OpenAI client's voice would become this upload
            raise RequestError(f"{name!r} is one of OpenAI's voice names, which speak with ECHO_DEFAULT_VOICE or "
                               "ECHO_VOICE_ALIASES on this server: choose another name", "name", status=409)
        if name in self.settings.voice_aliases:  # requests for it would speak with the alias's voice
            raise RequestError(f"{name!r} is an alias of voice {self.settings.voice_aliases[name]!r} "
                               "(ECHO_VOICE_ALIASES): choose another name", "name", status=409)
        upload = self.library.check(name, data, consent, overwrite)
        # encoded from the stored FLAC's bytes, exactly as the voice is read back from its file
        clip = SpeakerReference(f"upload:{hashlib.sha256(upload.flac).hexdigest()}",
                                lambda: inf.load_audio_bytes(upload.flac, max_duration=self.max_reference_seconds))
        try:
            latents = encode(clip)
        except VoiceUnusable as e:
            raise RequestError(str(e), "audio_sample") from e
        source = self.library.store(upload, overwrite, latents=latents)
        self._forget(source.cache_name)
        return upload.metadata

    def delete(self, name: str) -> dict:
        self._require_uploads()  # (an open server without uploads: nobody may remove what was uploaded)
        if name in self.settings.voice_aliases:  # listed as a voice, but the operator's name for one
            raise RequestError(f"{name!r} is an alias of voice {self._target(name)!r} (ECHO_VOICE_ALIASES): the "
                               "operator's setting, not deleted here", "voice_id", status=403)
        source = self.library.delete(name)
        self._forget(source.cache_name)
        return {"object": "audio.voice.deleted", "id": source.name, "deleted": True}

    def _require_uploads(self) -> None:
        if not self.settings.uploads_enabled:
            raise RequestError("voice uploads are off on this server: set ECHO_VOICE_UPLOADS=1 (they are on by "
                               "default when ECHO_API_KEY is set)", status=403)

    def _forget(self, cache_name: str) -> None:
        """Drop a voice from every cache (its latents and its speaker keys)."""
        self.latents.discard_name(cache_name)
        self.keys.discard_name(cache_name)

    def clear_caches(self) -> None:
        self.latents.clear()
        self.keys.clear()
