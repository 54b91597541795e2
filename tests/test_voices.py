import base64
import hashlib
import io
import os
import threading
import time

import numpy as np
import pytest
import soundfile as sf
import torch

import voices
from inference import SAMPLE_RATE, load_audio
from voices import (
    INLINE_MIN_CHARS,
    NO_VOICE,
    InvalidVoiceError,
    SpeakerCache,
    UnknownVoiceError,
    VoiceError,
    VoiceRegistry,
    decode_inline_voice,
    inline_cache_key,
    is_no_voice,
    inline_voice_audio,
    load_voice_audio,
    looks_like_inline_audio,
)


def inline_voice(value: str, max_bytes: int, max_duration: float):
    """(cache key, audio) of an inline voice, through what the service uses (SpeechService._inline_voice)."""
    data = decode_inline_voice(value, max_bytes)
    return inline_cache_key(data), inline_voice_audio(data, max_duration=max_duration)


def wav_bytes(seconds: float, freq: float = 220.0, amplitude: float = 0.5) -> bytes:
    t = np.arange(int(round(seconds * SAMPLE_RATE))) / SAMPLE_RATE
    buf = io.BytesIO()
    sf.write(buf, (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32), SAMPLE_RATE,
             format="WAV", subtype="PCM_16")
    return buf.getvalue()


def write_wav(path, seconds: float = 0.1, freq: float = 220.0):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(wav_bytes(seconds, freq))
    return path


@pytest.fixture
def voice_dir(tmp_path):
    d = tmp_path / "voices"
    write_wav(d / "alice.wav")
    write_wav(d / "Bob.MP3")  # listing only looks at names; upper-case extension counts
    write_wav(d / "carol.flac")
    (d / "notes.txt").write_text("not a voice")
    (d / "cover.png").write_bytes(b"\x89PNG")
    write_wav(d / ".hidden.wav")
    write_wav(d / "band" / "b_second.wav", 0.25, 440)
    write_wav(d / "band" / "a_first.wav", 0.5, 220)
    (d / "band" / "readme.txt").write_text("ignored")
    (d / "empty").mkdir()
    (d / "docs").mkdir()
    (d / "docs" / "x.txt").write_text("no audio here")
    for ext in (".ogg", ".opus", ".m4a"):
        (d / f"fmt{ext}").write_bytes(b"")
    return d


# -- listing and lookup -----------------------------------------------------------------------------


def test_list_files_and_folders_sorted(voice_dir):
    assert VoiceRegistry([voice_dir]).list() == ["Bob", "alice", "band", "carol", "fmt"]
    assert VoiceRegistry([str(voice_dir)], folder_support=False).list() == ["Bob", "alice", "carol", "fmt"]
    assert VoiceRegistry([voice_dir / "missing"]).list() == []


def test_a_file_whose_name_is_not_utf8_is_no_voice_and_the_list_still_answers(voice_dir, caplog):
    """A Latin-1 `José.wav` unpacked from an old archive made GET /v1/voices a 500 for everyone
    (its surrogate-escaped name cannot be encoded in the JSON answer)."""
    with open(os.path.join(os.fsencode(voice_dir), b"Jos\xe9.wav"), "wb") as f:
        f.write(wav_bytes(0.1))
    registry = VoiceRegistry([voice_dir])
    assert registry.list() == ["Bob", "alice", "band", "carol", "fmt"]
    registry.list()
    assert caplog.text.count("its name is not UTF-8") == 1  # once, not at every listing


def test_a_file_called_none_is_no_voice_by_that_id(voice_dir):
    """`none` means no reference: a `None.wav` was listed as a voice that then spoke with none."""
    write_wav(voice_dir / "None.wav")
    registry = VoiceRegistry([voice_dir])
    assert "None" not in registry.list() and "None" not in registry
    assert registry.resolve("None.wav").path == voice_dir / "None.wav"  # by its file name


def catalog(voice_dir, **settings):
    from settings import load_settings
    from voice_catalog import VoiceCatalog

    return VoiceCatalog(load_settings(device="cpu", voice_dirs=[voice_dir], upload_dir=voice_dir / "uploads",
                                      **settings))


def test_the_voice_list_offers_only_aliases_that_speak_and_aliases_may_chain(voice_dir, caplog):
    """Aliases were listed whatever they named: one naming a missing voice, or another alias, was
    offered and then answered 400 'Unknown voice ... GET /v1/voices lists the available voices'."""
    voices = catalog(voice_dir, voice_aliases={"host": "narrator", "narrator": "alice", "ghost": "nobody",
                                               "silent": "none", "loop": "loop2", "loop2": "loop"},
                     default_voice="host")
    assert voices.names() == ["Bob", "alice", "band", "carol", "fmt", "host", "narrator", "silent"]
    assert [voices.used(name) for name in ("host", "narrator", "silent", "alloy")] == ["alice", "alice", "none",
                                                                                      "alice"]
    assert voices.resolve("host")[1] is not None
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "names no voice" in r.getMessage()]
    assert len(warned) == 3 and all(name in " ".join(warned) for name in ("'ghost'", "'loop'", "'loop2'"))


def test_every_listed_voice_has_its_metadata_and_an_alias_says_what_it_speaks_with(voice_dir):
    """GET /v1/voices listed the aliases, and GET /v1/voices/{id} answered 404 for them."""
    from errors import RequestError

    voices = catalog(voice_dir, voice_aliases={"host": "narrator", "narrator": "alice", "ghost": "nobody",
                                               "silent": "none"})
    listed = {name: voices.metadata(name) for name in voices.names()}
    assert listed["host"] == {"object": "audio.voice", "id": "host", "name": "host", "uploaded": False,
                              "kind": "alias", "voice": "alice"}
    assert listed["silent"]["voice"] == "none" and listed["alice"]["kind"] == "file"
    with pytest.raises(RequestError) as unknown:  # an alias that speaks with nothing is neither listed nor found
        voices.metadata("ghost")
    assert unknown.value.status == 404
    hidden = catalog(voice_dir, voice_aliases={"alice": "ghost"})  # an alias over a voice's name hides it
    assert "alice" not in hidden.names()
    with pytest.raises(RequestError) as unknown:
        hidden.metadata("alice")
    assert unknown.value.status == 404
    with pytest.raises(RequestError, match="Unknown voice 'ghost'"):  # (as a request finds it)
        hidden.resolve("alice")


def test_deleting_an_operators_voice_is_403_before_any_upload_made_the_directory(voice_dir):
    """The directory's lock was taken before the voice was checked: with no upload yet, the upload
    directory does not exist, and deleting an operator's voice was a FileNotFoundError (500)."""
    from errors import RequestError

    voices = catalog(voice_dir, voice_uploads=True, voice_upload_dir=voice_dir / "no-upload-yet")
    assert not (voice_dir / "no-upload-yet").exists()
    with pytest.raises(RequestError) as refused:
        voices.delete("alice")
    assert refused.value.status == 403 and "placed by the operator" in str(refused.value)


def test_a_default_voice_that_names_no_voice_is_warned_about_and_named_in_the_error(voice_dir, caplog):
    """ECHO_DEFAULT_VOICE=bobb (a typo): no word at start-up, then every OpenAI client's 'alloy' got
    "Unknown voice 'bobb'", which names no setting."""
    from errors import RequestError

    voices = catalog(voice_dir, default_voice="bobb")
    assert any("ECHO_DEFAULT_VOICE='bobb' names no voice" in r.getMessage() for r in caplog.records
               if r.levelname == "WARNING")
    with pytest.raises(RequestError, match="'alloy' speaks with ECHO_DEFAULT_VOICE='bobb'.*Unknown voice 'bobb'"):
        voices.resolve("alloy")
    with pytest.raises(RequestError, match="^Unknown voice 'nobody'"):  # a voice asked for by name: as before
        voices.resolve("nobody")
    caplog.clear()
    catalog(voice_dir, default_voice="alice")
    assert not [r for r in caplog.records if "ECHO_DEFAULT_VOICE" in r.getMessage()]


def test_listing_voices_lists_the_directories_once_whatever_the_aliases(voice_dir, monkeypatch):
    """Checking each alias's voice scanned the directories once per alias: with 2,000 voices and
    OpenAI's 13 names aliased, a voice list took 0.8 s instead of 0.17 s. The ids and the names the
    aliases may lead to come from the same listing."""
    aliases = {name: "alice" for name in ("alloy", "ash", "coral", "echo", "nova", "sage", "verse")}
    voices = catalog(voice_dir, voice_aliases=aliases)
    scans = []
    scan = VoiceRegistry._scan
    monkeypatch.setattr(VoiceRegistry, "_scan", lambda self: (scans.append(1), scan(self))[1])
    assert set(aliases) <= set(voices.names())
    assert len(scans) == 1


def test_a_listing_resolves_only_symlinks_whatever_the_number_of_plain_voices(tmp_path, monkeypatch):
    """Each request lists the voice directories. Resolving every entry's real path cost a stat per
    path component: 57 ms a request at 2,000 voices (benchmarks/voice_lookup.py), now 7 ms."""
    for i in range(50):
        (tmp_path / f"v{i}.wav").write_bytes(b"RIFF")
    (tmp_path / "band").mkdir()
    (tmp_path / "band" / "a.wav").write_bytes(b"RIFF")
    os.symlink(tmp_path / "v1.wav", tmp_path / "link.wav")
    resolved = []
    realpath = os.path.realpath
    monkeypatch.setattr(os.path, "realpath", lambda path, **kw: (resolved.append(path), realpath(path, **kw))[1])
    assert len(VoiceRegistry([tmp_path]).list()) == 52
    assert len(resolved) <= 3  # the directory, the folder voice, the symlink


def test_a_missing_voice_directory_is_named_in_a_warning(voice_dir, caplog):
    """A typo or an unmounted volume in ECHO_VOICE_DIRS gave an empty voice list and no log line."""
    catalog(voice_dir / "typo")
    assert "typo" in caplog.text and "ECHO_VOICE_DIRS" in caplog.text


def test_lookup_by_stem_file_name_and_folder(voice_dir):
    reg = VoiceRegistry([voice_dir])
    a = reg.resolve("alice")
    assert (a.name, a.kind, a.files) == ("alice", "file", (voice_dir / "alice.wav",))
    assert reg.resolve("alice.wav") == a
    assert reg.resolve("Bob.MP3").name == "Bob"
    band = reg.resolve("band")
    assert band.kind == "folder" and band.path == voice_dir / "band"
    assert [p.name for p in band.files] == ["a_first.wav", "b_second.wav"]
    for wrong in ("Alice", "alice.WAV", "bob", "alice.txt", "notes", "notes.txt", "empty", "docs", "hidden"):
        with pytest.raises(UnknownVoiceError):
            reg.resolve(wrong)
    with pytest.raises(UnknownVoiceError):
        VoiceRegistry([voice_dir], folder_support=False).resolve("band")
    assert "alice" in reg and "nobody" not in reg


def test_earlier_directories_win(tmp_path):
    first, second = tmp_path / "one", tmp_path / "two"
    write_wav(first / "same.wav")
    write_wav(second / "same.flac")
    write_wav(second / "other.wav")
    reg = VoiceRegistry([first, second])
    assert reg.list() == ["other", "same"]
    assert reg.resolve("same").path == first / "same.wav"
    assert reg.resolve("same.flac").path == second / "same.flac"  # an explicit file name still works


def test_unknown_voice_message(voice_dir):
    with pytest.raises(UnknownVoiceError) as e:
        VoiceRegistry([voice_dir]).resolve("nobody")
    assert isinstance(e.value, VoiceError) and isinstance(e.value, ValueError)
    assert "'nobody'" in str(e.value) and "/v1/voices" in str(e.value)
    assert e.value.voice == "nobody"


def test_names_never_escape_the_voice_directories(tmp_path, voice_dir):
    outside = write_wav(tmp_path / "secret.wav")
    write_wav(tmp_path / "outside_folder" / "x.wav")
    os.symlink(outside, voice_dir / "link.wav")
    os.symlink(tmp_path / "outside_folder", voice_dir / "linkdir")
    os.symlink(outside, voice_dir / "band" / "c_escape.wav")
    os.symlink(voice_dir / "alice.wav", voice_dir / "alias.wav")  # a link inside is fine
    os.symlink(voice_dir / "band", voice_dir / "band_link")  # a folder too, and its links are followed
    reg = VoiceRegistry([voice_dir])
    assert reg.list() == ["Bob", "alias", "alice", "band", "band_link", "carol", "fmt"]
    assert [p.name for p in reg.resolve("band").files] == ["a_first.wav", "b_second.wav"]
    assert [p.name for p in reg.resolve("band_link").files] == ["a_first.wav", "b_second.wav"]
    assert reg.resolve("alias").files == (voice_dir / "alias.wav",)
    for name in ("../secret", "../secret.wav", str(outside), "/etc/passwd", "band/a_first", "band/a_first.wav",
                 "..", ".", "", "alice\x00", "alice\x00.wav", "link", "link.wav", "linkdir", "..\\secret",
                 ".hidden", ".hidden.wav", "x" * 300):
        with pytest.raises(UnknownVoiceError):
            reg.resolve(name)
    with pytest.raises(UnknownVoiceError):
        reg.resolve(None)  # type: ignore[arg-type]


def test_cache_key_follows_file_changes(voice_dir):
    reg = VoiceRegistry([voice_dir])
    path = voice_dir / "alice.wav"
    key = reg.resolve("alice").cache_key
    assert reg.resolve("alice").cache_key == key  # stable while unchanged
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    key2 = reg.resolve("alice").cache_key
    assert key2 != key
    path.write_bytes(wav_bytes(0.2))  # new size
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # even with the same mtime
    assert reg.resolve("alice").cache_key not in (key, key2)

    folder_key = reg.resolve("band").cache_key
    write_wav(voice_dir / "band" / "c_third.wav")
    added = reg.resolve("band").cache_key
    assert added != folder_key
    (voice_dir / "band" / "c_third.wav").unlink()
    assert reg.resolve("band").cache_key == folder_key
    f = voice_dir / "band" / "a_first.wav"
    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 5))
    assert reg.resolve("band").cache_key != folder_key


def test_a_clip_copied_over_with_its_size_and_old_mtime_is_a_new_version(voice_dir):
    """`cp -p`, `rsync -a` or an image with fixed timestamps replaces a WAV of the same length and
    keeps the old mtime: path, mtime and size were all the key looked at, so the old voice's latents
    were served for the new clip."""
    reg = VoiceRegistry([voice_dir])
    path = voice_dir / "alice.wav"
    before = reg.resolve("alice").cache_key
    st = path.stat()
    replacement = voice_dir / "other.tmp"
    replacement.write_bytes(wav_bytes(0.1, freq=440.0))  # the same length as alice's clip, another sound
    os.utime(replacement, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.replace(replacement, path)
    assert path.stat().st_size == st.st_size and path.stat().st_mtime_ns == st.st_mtime_ns
    assert reg.resolve("alice").cache_key != before


# -- loading ------------------------------------------------------------------------------------------


def test_file_voice_loads_like_load_audio(voice_dir):
    reg = VoiceRegistry([voice_dir])
    audio = load_voice_audio(reg.resolve("alice"), max_duration=30)
    assert torch.equal(audio, load_audio(voice_dir / "alice.wav"))
    source, audio2 = reg.load("alice", 0.05)
    assert source.name == "alice" and audio2.shape == (1, int(0.05 * SAMPLE_RATE))


def test_folder_voice_joins_files_with_one_second_of_silence(voice_dir):
    reg = VoiceRegistry([voice_dir])
    audio = load_voice_audio(reg.resolve("band"), max_duration=60)
    first, second = int(0.5 * SAMPLE_RATE), int(0.25 * SAMPLE_RATE)
    assert audio.shape == (1, first + SAMPLE_RATE + second) and audio.dtype == torch.float32
    assert torch.equal(audio[:, :first], load_audio(voice_dir / "band" / "a_first.wav"))
    assert torch.count_nonzero(audio[:, first:first + SAMPLE_RATE]) == 0
    assert torch.equal(audio[:, first + SAMPLE_RATE:], load_audio(voice_dir / "band" / "b_second.wav"))


def test_folder_voice_is_capped_at_max_duration(voice_dir):
    source = VoiceRegistry([voice_dir]).resolve("band")
    assert load_voice_audio(source, max_duration=1.7).shape == (1, int(1.7 * SAMPLE_RATE))
    assert load_voice_audio(source, max_duration=1.2).shape == (1, int(0.5 * SAMPLE_RATE))  # no room after the gap
    assert load_voice_audio(source, max_duration=0.3).shape == (1, int(0.3 * SAMPLE_RATE))


def test_vanished_or_broken_file_is_a_voice_error(voice_dir):
    reg = VoiceRegistry([voice_dir])
    source = reg.resolve("alice")
    (voice_dir / "alice.wav").unlink()
    with pytest.raises(VoiceError, match="alice.wav"):
        load_voice_audio(source, 30)
    band = reg.resolve("band")
    (voice_dir / "band" / "b_second.wav").unlink()
    with pytest.raises(VoiceError, match="b_second.wav"):
        load_voice_audio(band, 30)
    (voice_dir / "broken.wav").write_bytes(b"RIFF\x00\x00garbage" * 10)
    with pytest.raises(InvalidVoiceError, match="broken"):
        reg.load("broken", 30)


# -- "none" and inline voices --------------------------------------------------------------------------


def test_no_voice():
    assert NO_VOICE == "none"
    for value in ("none", "None", "NONE", " none "):
        assert is_no_voice(value)
    for value in ("nonе", "no", "", None, "none.wav"):  # the first has a Cyrillic e
        assert not is_no_voice(value)


def test_inline_detection_rule():
    clip = base64.b64encode(wav_bytes(0.05)).decode()
    assert looks_like_inline_audio(clip) and len(clip) >= INLINE_MIN_CHARS
    assert looks_like_inline_audio("data:audio/wav;base64,AAAA")
    assert looks_like_inline_audio("  DATA:audio/wav;base64,AAAA")
    assert looks_like_inline_audio("A" * 256)
    assert not looks_like_inline_audio("A" * 255)
    for name in ("alice", "alice.wav", "none", "", "dataset", "data", None, 42):
        assert not looks_like_inline_audio(name)


def test_decode_base64_and_data_urls():
    data = wav_bytes(0.05)
    b64 = base64.b64encode(data).decode()
    assert decode_inline_voice(b64, 10**6) == data
    assert decode_inline_voice(f"data:audio/wav;base64,{b64}", 10**6) == data
    assert decode_inline_voice(f"data:audio/x-wav;codecs=1;base64,{b64}", 10**6) == data
    assert decode_inline_voice(f"Data:Audio/WAV;BASE64,{b64}", 10**6) == data
    assert decode_inline_voice(base64.urlsafe_b64encode(data).decode().rstrip("="), 10**6) == data
    wrapped = "\n".join(b64[i:i + 76] for i in range(0, len(b64), 76))
    assert decode_inline_voice(f" {wrapped}\n", 10**6) == data
    assert decode_inline_voice(b64, len(data)) == data  # exactly at the limit


def test_oversize_inline_voice_is_refused_before_decoding(monkeypatch):
    data = wav_bytes(0.05)
    with pytest.raises(InvalidVoiceError, match="limit is 1000 bytes"):
        decode_inline_voice(base64.b64encode(data).decode(), 1000)
    with pytest.raises(InvalidVoiceError, match=str(len(data) - 1)):
        decode_inline_voice(base64.b64encode(data).decode(), len(data) - 1)

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded an oversized string")

    monkeypatch.setattr(voices.base64, "b64decode", no_decoding)
    huge = "A" * 50_000_000
    start = time.perf_counter()
    with pytest.raises(InvalidVoiceError, match="too large"):
        decode_inline_voice(huge, 10_000_000)
    with pytest.raises(InvalidVoiceError, match="too large"):
        decode_inline_voice("data:audio/wav;base64," + huge, 1000)
    assert time.perf_counter() - start < 1.0


def test_a_data_url_with_endless_parameters_is_refused_before_they_are_split():
    """`data:ab;ab;...;ab,`: its 5 million parameters were split and lower-cased before any limit,
    700 MB for a 15 MB voice."""
    import tracemalloc

    value = "data:" + "ab;" * 5_000_000 + ","
    tracemalloc.start()
    try:
        with pytest.raises(InvalidVoiceError, match="media type and parameters are over 256 characters"):
            decode_inline_voice(value, 10**7)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2 * len(value), peak
    assert decode_inline_voice("data:audio/wav;" + "x=y;" * 50 + "base64,QUJD", 10**6) == b"ABC"


def test_garbage_inline_voices_are_invalid():
    for value in ("!" * 300, "A" * 257, "QUJD" * 70 + "=A", "data:audio/wav;base64,", "data:audio/wav,RIFF",
                  "data:text/plain;base64,QUJD", "data:audio/wav;base64", "é" * 300, "QUJD=QUJD" * 40):
        with pytest.raises(InvalidVoiceError):
            decode_inline_voice(value, 10**6)
        with pytest.raises(InvalidVoiceError):
            inline_voice(value, 10**6, 30)


def test_inline_voice():
    data = wav_bytes(0.1)
    key, audio = inline_voice("data:audio/wav;base64," + base64.b64encode(data).decode(), 10**6, 30)
    assert key == inline_cache_key(data) == "inline:" + hashlib.sha256(data).hexdigest()
    assert audio.shape == (1, int(0.1 * SAMPLE_RATE))
    assert inline_voice(base64.b64encode(data).decode(), 10**6, 0.05)[1].shape == (1, int(0.05 * SAMPLE_RATE))
    not_audio = base64.b64encode(b"hello world, this is not audio " * 20).decode()
    with pytest.raises(InvalidVoiceError, match="not decodable audio"):
        inline_voice(not_audio, 10**6, 30)


# -- speaker cache ----------------------------------------------------------------------------------------


def test_speaker_cache_lru_eviction():
    cache = SpeakerCache(max_entries=2)
    cache.put("a", 1)
    cache.put("b", 2)
    assert cache.get("a") == 1  # a is now the most recent
    cache.put("c", 3)
    assert "b" not in cache and cache.get("b") is None and cache.get("b", "dflt") == "dflt"
    assert cache.keys() == ["a", "c"] and len(cache) == 2
    assert cache.get_or_create("a", lambda: pytest.fail("a is cached")) == 1
    cache.put("a", 10)
    assert cache.get("a") == 10 and cache.discard("a") and not cache.discard("a")
    cache.clear()
    assert len(cache) == 0


def test_speaker_cache_drops_stale_versions_of_a_voice(voice_dir):
    reg = VoiceRegistry([voice_dir])
    cache = SpeakerCache(max_entries=8)
    old = reg.resolve("alice")
    cache.get_or_create(old.cache_key, lambda: "old latents", name=old.cache_name)
    cache.put((old.cache_key, "cuda"), "old on gpu", name=old.cache_name, version=old.cache_key)
    cache.put("other", "x", name="someone else")
    assert len(cache) == 3
    path = voice_dir / "alice.wav"
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10))
    new = reg.resolve("alice")
    assert new.cache_key != old.cache_key and new.cache_name == old.cache_name
    assert cache.get_or_create(new.cache_key, lambda: "new latents", name=new.cache_name) == "new latents"
    assert cache.keys() == ["other", new.cache_key]  # both entries of the old version are gone
    assert cache.discard_name(new.cache_name) == 1 and cache.keys() == ["other"]


def test_speaker_cache_disabled_stores_nothing():
    cache = SpeakerCache(max_entries=0)
    assert cache.get_or_create("k", lambda: 5) == 5
    assert len(cache) == 0
    with pytest.raises(ValueError):
        SpeakerCache(max_entries=-1)


def run_blocked_threads(threads: list[threading.Thread], release: threading.Event) -> None:
    """Start the threads, give them time to pile up on the factory, then release it and join."""
    for t in threads:
        t.start()
    time.sleep(0.05)
    release.set()
    for t in threads:
        t.join(5)


def test_get_or_create_calls_the_factory_once_under_threads():
    cache = SpeakerCache(max_entries=4)
    calls = []
    release = threading.Event()

    def factory():
        calls.append(threading.get_ident())
        release.wait(5)
        return object()

    barrier = threading.Barrier(16)
    results = [None] * 16

    def worker(i):
        barrier.wait()
        results[i] = cache.get_or_create("voice", factory, name="voice")

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(16)]
    run_blocked_threads(threads, release)
    assert len(calls) == 1
    assert all(r is results[0] for r in results) and results[0] is not None


def test_get_or_create_error_reaches_waiters_and_is_not_cached():
    cache = SpeakerCache()
    release = threading.Event()
    calls = []

    def failing():
        calls.append(1)
        release.wait(5)
        raise RuntimeError("decode failed")

    errors = []

    def worker():
        try:
            cache.get_or_create("k", failing)
        except RuntimeError as e:
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    run_blocked_threads(threads, release)
    assert len(errors) == 4 and len(calls) >= 1 and "k" not in cache
    assert cache.get_or_create("k", lambda: "ok") == "ok"


def test_factories_of_different_keys_run_in_parallel():
    cache = SpeakerCache()
    both_running = threading.Barrier(2, timeout=5)

    def factory():
        both_running.wait()  # deadlocks (BrokenBarrierError) if factories were serialised
        return 1

    threads = [threading.Thread(target=cache.get_or_create, args=(k, factory)) for k in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert cache.get("a") == 1 and cache.get("b") == 1


# ---- decoding untrusted bytes (issue 17, items 1, 4 and 9) -------------------------------------------


def test_a_concat_script_cannot_read_files_from_the_server(tmp_path, monkeypatch):
    """FFmpeg's concat demuxer would decode the file a 53-byte 'clip' names: refused, and the
    message is the same whether the named path exists, is a folder, or is missing."""
    (tmp_path / "private").mkdir()
    sf.write(tmp_path / "private" / "secret.wav", np.full(4410, 0.5, np.float32), SAMPLE_RATE)
    monkeypatch.chdir(tmp_path)
    messages = set()
    for target in ("private/secret.wav", "private", "private/missing.wav", str(tmp_path / "private/secret.wav")):
        script = f"ffconcat version 1.0\nfile {target}\n".encode()
        with pytest.raises(InvalidVoiceError) as caught:
            inline_voice(base64.b64encode(script).decode(), 10**6, 30)
        messages.add(str(caught.value))
        assert "private" not in str(caught.value) and str(tmp_path) not in str(caught.value)
    assert len(messages) == 1, messages


@pytest.mark.parametrize("container, codec", [("wav", "pcm_s16le"), ("flac", "flac"), ("mp3", "libmp3lame"),
                                              ("ogg", "libopus"), ("ipod", "aac"), ("webm", "libopus"),
                                              ("aiff", "pcm_s16be"), ("caf", "pcm_s16le"), ("adts", "aac")])
def test_real_audio_containers_still_decode(container, codec):
    import av

    buf = io.BytesIO()
    with av.open(buf, "w", format=container) as out:
        stream = out.add_stream(codec, rate=48000)
        frame = av.AudioFrame.from_ndarray(0.3 * np.sin(np.arange(48000, dtype=np.float32) / 8)[None],
                                           format="flt", layout="mono")
        frame.sample_rate = 48000
        frame = next(iter(av.AudioResampler(format=stream.codec_context.format.name, layout="mono",
                                             rate=48000).resample(frame)))
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            out.mux(packet)
    key, audio = inline_voice(base64.b64encode(buf.getvalue()).decode(), 10**6, 30)
    assert abs(audio.shape[1] - SAMPLE_RATE) < 0.1 * SAMPLE_RATE


def test_errors_about_voice_files_name_no_server_path(tmp_path):
    (tmp_path / "v").mkdir()
    (tmp_path / "v" / "broken.wav").write_bytes(b"RIFF not really")
    with pytest.raises(InvalidVoiceError) as caught:
        VoiceRegistry([tmp_path / "v"]).load("broken", 30)
    assert "broken.wav" in str(caught.value) and str(tmp_path) not in str(caught.value)


def test_a_clip_with_a_nan_sample_is_refused():
    buf = io.BytesIO()
    samples = np.full(4410, 0.25, np.float32)
    samples[100] = np.nan
    sf.write(buf, samples, SAMPLE_RATE, format="WAV", subtype="FLOAT")
    with pytest.raises(InvalidVoiceError, match="NaN"):
        inline_voice(base64.b64encode(buf.getvalue()).decode(), 10**6, 30)


def test_a_clip_over_the_rate_or_channel_limit_is_refused_from_its_header(monkeypatch):
    """A 384 kHz, 8-channel FLAC: refused before a single frame is decoded."""
    import inference

    buf = io.BytesIO()
    sf.write(buf, np.zeros((384, 8), np.float32), 384000, format="FLAC")
    decoded = []
    monkeypatch.setattr(inference, "_with_flush", lambda frames: decoded.append(1) or iter(()))
    with pytest.raises(InvalidVoiceError, match="384000 Hz"):
        inline_voice(base64.b64encode(buf.getvalue()).decode(), 10**6, 30)
    assert decoded == []


def matroska_pcm(seconds: float, rate: int = 8000, declared_rate: float | None = None) -> bytes:
    """A Matroska clip of 16-bit PCM in one block; its header's SamplingFrequency rewritten if asked."""
    import struct

    import av

    buf = io.BytesIO()
    samples = (np.sin(np.arange(int(seconds * rate)) * 0.05) * 8000).astype("<i2")[None]
    with av.open(buf, "w", format="matroska") as container:
        stream = container.add_stream("pcm_s16le", rate=rate, layout="mono")
        frame = av.AudioFrame.from_ndarray(samples, format="s16", layout="mono")
        frame.sample_rate = rate
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            container.mux(packet)
    data = bytearray(buf.getvalue())
    if declared_rate is not None:
        at = data.find(b"\xb5\x88" + struct.pack(">d", float(rate)))  # EBML SamplingFrequency, an 8-byte float
        data[at + 2:at + 10] = struct.pack(">d", declared_rate)
    return bytes(data)


def test_a_clip_claiming_a_tiny_sample_rate_is_refused_before_it_is_resampled(monkeypatch):
    """A 5 KB clip whose header says 1 Hz would turn each sample into 44,100 (gigabytes, before any
    duration limit looked); a source under 4 kHz is refused; 5,512 Hz and 8 kHz telephone audio still decode."""
    import av

    from inference import AudioDecodeError, load_audio_bytes

    resampled = []
    resample = av.AudioResampler.resample
    monkeypatch.setattr(av.AudioResampler, "resample", lambda self, f: resampled.append(f) or resample(self, f))
    bomb = matroska_pcm(0.25, declared_rate=1.0)
    assert len(bomb) < 5000
    with pytest.raises(AudioDecodeError, match="1 Hz"):
        load_audio_bytes(bomb, refuse_over=300)
    assert resampled == []
    low = io.BytesIO()
    sf.write(low, np.zeros(3000, np.float32), 3000, format="WAV")
    with pytest.raises(InvalidVoiceError, match="3000 Hz.*4000-192000 Hz"):
        inline_voice(base64.b64encode(low.getvalue()).decode(), 10**6, 30)
    phone = load_audio_bytes(matroska_pcm(0.5), refuse_over=300)
    assert phone.shape[1] == pytest.approx(0.5 * SAMPLE_RATE, abs=64)
    old = io.BytesIO()
    sf.write(old, 0.1 * np.ones(5512, np.float32), 5512, format="WAV")
    assert load_audio_bytes(old.getvalue(), refuse_over=300).shape[1] == pytest.approx(SAMPLE_RATE, abs=64)


def test_a_frame_too_long_to_resample_at_once_is_refused():
    from inference import MAX_FRAME_SECONDS, AudioDecodeError, load_audio_bytes

    with pytest.raises(AudioDecodeError, match=f"a frame holds more than {MAX_FRAME_SECONDS} s"):
        load_audio_bytes(matroska_pcm(MAX_FRAME_SECONDS + 1), refuse_over=300)


def test_decoding_stops_once_a_clip_holds_more_than_its_duration_budget():
    """Eight channels at 48 kHz pass the header checks, but 2 s of them is more raw samples than
    3 s of 48 kHz stereo: decoding is abandoned, not finished."""
    from inference import AudioDecodeError, load_audio_bytes

    buf = io.BytesIO()
    sf.write(buf, 0.1 * np.ones((2 * 48000, 8), np.float32), 48000, format="FLAC")
    with pytest.raises(AudioDecodeError, match="more samples"):
        load_audio_bytes(buf.getvalue(), max_duration=1.5)
    assert load_audio_bytes(buf.getvalue(), max_duration=10).shape[1] == 2 * SAMPLE_RATE  # within 10 s of it


def test_a_clip_longer_than_refuse_over_is_refused_not_cut():
    from inference import AudioTooLong, load_audio_bytes

    with pytest.raises(AudioTooLong):
        load_audio_bytes(wav_bytes(2.0), refuse_over=1.0)
    assert load_audio_bytes(wav_bytes(0.9), refuse_over=1.0).shape[1] == int(0.9 * SAMPLE_RATE)


def test_an_inline_voice_sent_again_is_not_decoded_again(tiny_service, monkeypatch):
    """Decoding a clip costs seconds for a long one: its latents are cached by content, so the same
    clip sent with every request is decoded once."""
    from speech_request import GenerationOptions

    decodes = []
    real = voices.load_audio_bytes
    monkeypatch.setattr(voices, "load_audio_bytes", lambda *a, **k: decodes.append(1) or real(*a, **k))
    voice = "data:audio/wav;base64," + base64.b64encode(wav_bytes(1.5, freq=181.0)).decode()
    for _ in range(3):
        tiny_service.build_job(GenerationOptions(input="Hello.", voice=voice))
    assert len(decodes) == 1


def test_a_full_server_refuses_before_it_decodes_a_voice(tiny_service, monkeypatch):
    """Three costly voices on a full server got their 429 after ~70 s: the queue slot comes first."""
    import asyncio

    from speech_request import GenerationOptions, RequestError

    decodes = []
    monkeypatch.setattr(voices, "load_audio_bytes", lambda *a, **k: decodes.append(1))
    held = [tiny_service.runtime.worker.reserve() for _ in range(3)]  # 2 active + 1 waiting: full
    try:
        voice = "data:audio/wav;base64," + base64.b64encode(wav_bytes(1.0, freq=97.0)).decode()
        with pytest.raises(RequestError) as caught:
            asyncio.run(tiny_service.start(GenerationOptions(input="Hello.", voice=voice), "full"))
        assert caught.value.status == 429 and decodes == []
    finally:
        for reservation in held:
            reservation.release()
    assert tiny_service.runtime.worker.pending == 0


def test_a_request_whose_voice_fails_gives_its_queue_slot_back(tiny_service):
    import asyncio

    from speech_request import GenerationOptions, RequestError

    voice = "data:audio/wav;base64," + base64.b64encode(b"not audio, long enough to be inline" * 20).decode()
    for _ in range(4):  # more than the 3 slots: each failure returned its slot
        with pytest.raises(RequestError) as caught:
            asyncio.run(tiny_service.start(GenerationOptions(input="Hello.", voice=voice), "bad"))
        assert caught.value.status == 400
    assert tiny_service.runtime.worker.pending == 0


def test_the_text_is_checked_before_the_voice(tiny_service, monkeypatch):
    """A request wrong in both gets the input's error, and no voice is decoded for it."""
    from speech_request import GenerationOptions, RequestError

    decodes = []
    monkeypatch.setattr(voices, "load_audio_bytes", lambda *a, **k: decodes.append(1))
    voice = "data:audio/wav;base64," + base64.b64encode(wav_bytes(1.0, freq=151.0)).decode()
    for wrong in ("no-such-voice", voice):
        with pytest.raises(RequestError) as caught:
            tiny_service.build_job(GenerationOptions(input="   ", voice=wrong))
        assert caught.value.param == "input"
    assert decodes == []
