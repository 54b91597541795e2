"""The voice library: uploading, reading and deleting voices through the app (in process: conftest.AppServer)."""

import io
import shutil

import numpy as np
import pytest
import soundfile as sf

from conftest import AppServer, app_server, server_env

pytestmark = pytest.mark.slow
KEY = {"Authorization": "Bearer lib-key"}


def clip(seconds=6.0, rate=22050, channels=1, amplitude=0.3, fmt="WAV") -> bytes:
    """Speech-like test audio: a gliding, syllable-modulated tone."""
    t = np.arange(int(seconds * rate)) / rate
    tone = amplitude * np.sin(2 * np.pi * (140 + 30 * np.sin(2 * np.pi * 0.3 * t)) * t) * np.sin(2 * np.pi * 4 * t) ** 2
    data = io.BytesIO()
    sf.write(data, np.repeat(tone[:, None], channels, axis=1).astype(np.float32), rate, format=fmt)
    return data.getvalue()


@pytest.fixture(scope="module")
def library(tiny_echo_dir, tiny_fish_dir, voice_dir, tmp_path_factory):
    operator = tmp_path_factory.mktemp("operator-voices")
    shutil.copy(voice_dir / "alice.wav", operator / "alice.wav")
    uploads = tmp_path_factory.mktemp("uploads")
    env = server_env(tiny_echo_dir, tiny_fish_dir, operator, ECHO_API_KEY="lib-key", ECHO_VOICE_UPLOAD_DIR=str(uploads),
                     ECHO_MAX_VOICE_BYTES="2000000", ECHO_MAX_VOICE_SECONDS="20")
    with app_server(env) as app:
        app.uploads, app.env = uploads, env
        yield app


def upload(server, name, data, headers=KEY, **fields):
    return server.post("/v1/audio/voices", headers=headers, data={"name": name, **fields},
                      files={"audio_sample": ("clip.bin", data, "application/octet-stream")}, timeout=120)


def test_an_uploaded_voice_is_stored_reported_listed_and_spoken(library):
    r = upload(library, "Bob 2", clip(channels=2, fmt="FLAC"), consent="recorded with permission")
    assert r.status_code == 200, r.text
    voice = r.json()
    assert (voice["object"], voice["id"], voice["consent"], voice["uploaded"]) == ("audio.voice", "Bob 2",
                                                                                    "recorded with permission", True)
    quality = voice["quality"]
    assert (quality["sample_rate"], quality["channels"], quality["duration_seconds"]) == (22050, 2, 6.0)
    # FFmpeg's down-mix adds two equal channels at -3 dB each: the mono peak is sqrt(2) x 0.3
    assert quality["peak"] == pytest.approx(0.3 * 2 ** 0.5, abs=0.02)
    assert quality["clipped_fraction"] == 0 and quality["warnings"] == []
    assert {p.name for p in library.uploads.iterdir()} == {"Bob 2.flac", "Bob 2.voice.json",
                                                           "Bob 2.latents.safetensors"}
    assert "Bob 2" in [v["id"] for v in library.get("/v1/voices", headers=KEY).json()["data"]]
    assert library.get("/v1/voices/Bob 2", headers=KEY).json() == voice
    body = {"input": "Hello.", "voice": "Bob 2", "block_sizes": [4, 4], "num_steps": [1, 1], "seed": 1}
    assert library.post("/v1/audio/speech", json=body, headers=KEY, timeout=60).status_code == 200


def test_a_restarted_server_uses_the_stored_latents(library, tmp_path):
    assert upload(library, "kept", clip()).status_code == 200
    again = AppServer(library.env)  # a new app, a new service: what a restarted process builds
    try:
        body = {"input": "Hello.", "voice": "kept", "block_sizes": [4], "num_steps": [1], "seed": 1}
        assert again.post("/v1/audio/speech", json=body, headers=KEY, timeout=60).status_code == 200
        assert "loaded, not encoded" in again.log()
    finally:
        again.stop()


def test_stored_latents_are_not_used_by_a_server_that_encodes_voices_differently(library):
    """The latents were checked against the clip only: after a change of weights or of
    ECHO_MAX_SPEAKER_LATENT_LENGTH (which the out-of-memory advice suggests), an uploaded voice
    spoke with latents the server would no longer make."""
    assert upload(library, "re-encoded", clip()).status_code == 200
    body = {"input": "Hello.", "voice": "re-encoded", "block_sizes": [4], "num_steps": [1], "seed": 1}
    # encoded afresh, they are kept for the next start of the same set-up
    for change, loaded in (({"ECHO_MAX_SPEAKER_LATENT_LENGTH": "100"}, False),
                           ({"ECHO_MAX_SPEAKER_LATENT_LENGTH": "100"}, True), ({}, False), ({}, True)):
        again = AppServer(library.env | change)
        try:
            assert again.post("/v1/audio/speech", json=body, headers=KEY, timeout=60).status_code == 200
            assert ("loaded, not encoded" in again.log()) is loaded, change
        finally:
            again.stop()


def test_an_upload_hidden_by_an_operator_voice_of_its_name_is_left_alone(library, tmp_path):
    """An operator's voice added later in an earlier directory hides an upload of the same name.
    Replacing "it" wrote the upload's latents under the operator's voice's key, so requests for the
    operator's voice spoke with the upload, across restarts, and it was reported as uploaded."""
    operator_dir = library.settings.voice_dirs[0]
    assert upload(library, "hidden", clip()).status_code == 200
    shutil.copy(operator_dir / "alice.wav", operator_dir / "hidden.wav")
    try:
        assert upload(library, "hidden", clip(seconds=7.0), overwrite="true").status_code == 403
        assert library.get("/v1/voices/hidden", headers=KEY).json()["uploaded"] is False
        assert library.delete("/v1/audio/voices/hidden", headers=KEY).status_code == 403
        again = AppServer(library.env)
        try:
            body = {"input": "Hello.", "voice": "hidden", "block_sizes": [4], "num_steps": [1], "seed": 1}
            assert again.post("/v1/audio/speech", json=body, headers=KEY, timeout=60).status_code == 200
            assert "loaded, not encoded" not in again.log()  # the operator's clip, encoded: not the upload's latents
        finally:
            again.stop()
    finally:
        (operator_dir / "hidden.wav").unlink()


def test_an_upload_named_like_another_voices_file_name_is_refused(library):
    """`carol.flac` names voice carol (by its file name): with overwrite, it was stored as a second
    voice `carol.flac` beside carol."""
    assert upload(library, "fname", clip()).status_code == 200
    r = upload(library, "fname.flac", clip(), overwrite="true")
    assert r.status_code == 409 and "file name of voice 'fname'" in r.json()["error"]["message"]
    assert "fname.flac" not in [v["id"] for v in library.get("/v1/voices", headers=KEY).json()["data"]]


def test_an_upload_may_not_take_the_name_of_an_alias_nor_delete_one(tiny_echo_dir, tiny_fish_dir, voice_dir, tmp_path):
    """An upload named like an alias was stored and listed, and every request for it spoke with the
    alias's voice."""
    env = server_env(tiny_echo_dir, tiny_fish_dir, voice_dir, ECHO_API_KEY="lib-key",
                     ECHO_VOICE_UPLOAD_DIR=str(tmp_path), ECHO_VOICE_ALIASES="narrator=alice")
    with app_server(env) as app:
        r = upload(app, "narrator", clip())
        assert r.status_code == 409 and r.json()["error"]["param"] == "name" and "alias" in r.json()["error"]["message"]
        assert list(tmp_path.iterdir()) == []
        r = app.delete("/v1/audio/voices/narrator", headers=KEY)  # listed as a voice: said why it stays
        assert r.status_code == 403 and "alias of voice 'alice'" in r.json()["error"]["message"]


def test_quality_warnings_name_what_is_wrong(library):
    short = upload(library, "short", clip(seconds=2.0, amplitude=1.5)).json()["quality"]  # clipped and short
    assert any(w.startswith("short") for w in short["warnings"]) and any(w.startswith("clipped")
                                                                         for w in short["warnings"])


@pytest.mark.parametrize("name", ["", "a/b", "../up", ".hidden", "x" * 65, "näme", "none", " lead"])
def test_bad_names_are_400_and_store_nothing(library, name):
    before = set(library.uploads.iterdir())
    r = upload(library, name, clip())
    assert r.status_code in (400, 422) and r.json()["error"]["param"] == "name"
    assert set(library.uploads.iterdir()) == before


@pytest.mark.parametrize("data, status, words", [
    (b"", 400, "empty"), (b"not audio at all" * 100, 400, "not decodable"),
    (clip(seconds=21.0, rate=8000), 400, "ECHO_MAX_VOICE_SECONDS"), (clip(amplitude=0.0), 400, "silent"),
    (b"\0" * 2000001, 413, "ECHO_MAX_VOICE_BYTES")], ids=["empty", "not-audio", "too-long", "silent", "too-large"])
def test_bad_audio_gets_a_4xx_and_stores_nothing(library, data, status, words):
    before = set(library.uploads.iterdir())
    r = upload(library, "bad", data)
    assert r.status_code == status and words in r.json()["error"]["message"]
    assert r.json()["error"]["param"] == "audio_sample" and set(library.uploads.iterdir()) == before


def test_an_existing_name_is_409_unless_overwrite_and_operator_voices_are_read_only(library):
    assert upload(library, "twice", clip()).status_code == 200
    assert upload(library, "twice", clip()).status_code == 409
    assert upload(library, "twice", clip(seconds=7.0), overwrite="true").json()["quality"]["duration_seconds"] == 7.0
    assert upload(library, "alice", clip(), overwrite="true").status_code == 403
    assert library.delete("/v1/audio/voices/alice", headers=KEY).status_code == 403


def test_a_deleted_voice_is_gone_everywhere(library):
    assert upload(library, "gone", clip()).status_code == 200
    body = {"input": "Hello.", "voice": "gone", "block_sizes": [4], "num_steps": [1], "seed": 1}
    assert library.post("/v1/audio/speech", json=body, headers=KEY, timeout=60).status_code == 200
    r = library.delete("/v1/audio/voices/gone", headers=KEY)
    assert r.status_code == 200 and r.json() == {"object": "audio.voice.deleted", "id": "gone", "deleted": True}
    assert not any(p.name.startswith("gone.") for p in library.uploads.iterdir())
    assert library.post("/v1/audio/speech", json=body, headers=KEY, timeout=60).status_code == 400
    assert library.delete("/v1/audio/voices/gone", headers=KEY).status_code == 404
    assert library.get("/v1/voices/gone", headers=KEY).status_code == 404


def test_uploads_are_off_on_a_server_without_a_key(app):
    r = upload(app, "nope", clip(), headers={})
    assert r.status_code == 403 and "ECHO_VOICE_UPLOADS=1" in r.json()["error"]["message"]


def test_with_uploads_off_nobody_deletes_what_was_uploaded(library):
    """Restarted without a key (uploads off), an open server let anyone delete the stored uploads."""
    assert upload(library, "stays", clip()).status_code == 200
    env = {name: value for name, value in library.env.items() if name != "ECHO_API_KEY"}
    with app_server(env) as open_server:
        r = open_server.delete("/v1/audio/voices/stays")
        assert r.status_code == 403 and "ECHO_VOICE_UPLOADS=1" in r.json()["error"]["message"]
        assert open_server.get("/v1/voices/stays").status_code == 200  # still there, still spoken
    assert library.delete("/v1/audio/voices/stays", headers=KEY).status_code == 200


def test_openais_voice_names_are_not_upload_names(library):
    """An upload named 'alloy' took the name every OpenAI client sends from ECHO_DEFAULT_VOICE: one
    key holder chose the voice of all of them."""
    for name in ("alloy", "Nova"):
        r = upload(library, name, clip())
        assert r.status_code == 409 and r.json()["error"]["param"] == "name", r.text
        assert "OpenAI's voice names" in r.json()["error"]["message"]
    assert not any(p.name.lower().startswith(("alloy.", "nova.")) for p in library.uploads.iterdir())


# ---- hostile and unlucky uploads (issue 17, items 1-4) -----------------------------------------------


def stored_files(directory):
    return {p.name for p in directory.iterdir()}


@pytest.fixture()
def many_uploads_at_once(library, monkeypatch):
    """The store's own races, with more uploads at once than the server processes (UPLOADS_AT_ONCE)."""
    import threading

    monkeypatch.setattr(library.app.state.service, "_uploads", threading.BoundedSemaphore(12))


@pytest.mark.usefixtures("many_uploads_at_once")
def test_concurrent_uploads_of_one_name_have_exactly_one_winner(library):
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(12) as pool:
        statuses = list(pool.map(lambda i: upload(library, "race", clip(seconds=5.0 + i / 10)).status_code, range(12)))
    assert sorted(statuses) == [200] + [409] * 11, statuses


@pytest.mark.usefixtures("many_uploads_at_once")
def test_concurrent_overwrites_leave_a_voice_whose_files_belong_together(library):
    from concurrent.futures import ThreadPoolExecutor

    durations = [5.0 + i / 10 for i in range(10)]
    with ThreadPoolExecutor(10) as pool:
        statuses = list(pool.map(lambda s: upload(library, "torn", clip(seconds=s), overwrite="true").status_code,
                                 durations))
    assert statuses == [200] * 10
    metadata = library.get("/v1/voices/torn", headers=KEY).json()
    stored = sf.info(library.uploads / "torn.flac").duration
    assert metadata["quality"]["duration_seconds"] == pytest.approx(stored, abs=0.01)
    assert not any(name.endswith(".tmp") for name in stored_files(library.uploads))


def cut_short(monkeypatch, failing_suffix: str) -> None:
    """Renaming a file into the voice directory whose name ends with the suffix fails: a full disk (a
    rename can need room) or, for what is left behind, a crash at that moment."""
    import errno
    import os

    replace = os.replace

    def failing(source, target):
        if str(target).endswith(failing_suffix):
            raise OSError(errno.ENOSPC, "No space left on device")
        return replace(source, target)

    monkeypatch.setattr(os, "replace", failing)


@pytest.mark.parametrize("failing", [".voice.json", ".flac"])
def test_an_upload_cut_short_at_either_rename_leaves_nothing_or_a_voice_that_can_be_deleted(library, monkeypatch,
                                                                                           failing):
    name = f"cut{failing.replace('.', '-')}"
    with monkeypatch.context() as patch:
        cut_short(patch, failing)
        r = upload(library, name, clip())
        assert r.status_code == 507, r.text
        assert not any(p.startswith(f"{name}.") for p in stored_files(library.uploads))  # a new name: nothing
        assert library.get(f"/v1/voices/{name}", headers=KEY).status_code == 404
    assert upload(library, name, clip(), consent="the first").status_code == 200
    with monkeypatch.context() as patch:
        cut_short(patch, failing)
        r = upload(library, name, clip(seconds=7.0), overwrite="true", consent="the second")
        assert r.status_code == 507 and "nothing was stored" in r.text
    kept = library.get(f"/v1/voices/{name}", headers=KEY).json()  # the first version, whole
    assert (kept["uploaded"], kept["consent"], kept["quality"]["duration_seconds"]) == (True, "the first", 6.0)
    assert sf.info(library.uploads / f"{name}.flac").duration == pytest.approx(6.0, abs=0.01)
    assert upload(library, name, clip(seconds=8.0), overwrite="true").status_code == 200
    assert library.delete(f"/v1/audio/voices/{name}", headers=KEY).status_code == 200


def test_an_upload_directory_the_server_cannot_write_is_a_clear_error_and_a_warning_at_start(library, monkeypatch,
                                                                                              caplog):
    import errno
    import tempfile

    from settings import load_settings
    from voice_catalog import VoiceCatalog

    def refused(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    with monkeypatch.context() as patch:  # (as root, permissions do not stop a write: the refusal is simulated)
        patch.setattr(tempfile, "mkstemp", refused)
        r = upload(library, "unwritable", clip())
    error = r.json()["error"]
    assert r.status_code == 500 and error["code"] == "voice_storage_not_writable"
    assert "ECHO_VOICE_UPLOAD_DIR" in error["message"] and "nothing was stored" in error["message"]
    assert library.get("/v1/voices/unwritable", headers=KEY).status_code == 404
    monkeypatch.setattr("os.access", lambda path, mode: False)
    for name, value in library.env.items():
        monkeypatch.setenv(name, value)
    VoiceCatalog(load_settings(device="cpu"))
    assert "voice uploads are on but this process cannot write to" in caplog.text


def test_a_voice_deleted_while_its_metadata_is_looked_up_is_404(library, monkeypatch):
    """GET /v1/voices/{name} reads the metadata without the directory's lock: a delete landing between
    finding the voice and reading its file was an unhandled FileNotFoundError, a 500."""
    assert upload(library, "fleeting", clip()).status_code == 200
    voices = library.app.state.service.voices.library
    found = type(voices)._is_upload

    def found_then_deleted(self, source):
        answer = found(self, source)
        monkeypatch.setattr(type(voices), "_is_upload", found)
        library.delete("/v1/audio/voices/fleeting", headers=KEY)  # (another client, at that moment)
        return answer

    monkeypatch.setattr(type(voices), "_is_upload", found_then_deleted)
    r = library.get("/v1/voices/fleeting", headers=KEY)
    assert r.status_code == 404 and r.json()["error"]["param"] == "voice_id", r.text


def test_a_voice_halfway_deleted_is_404_not_an_operators_voice(library, monkeypatch):
    """A delete takes the audio first: a lookup between the name's resolution and that check answered
    `uploaded: false, kind: file`, an operator's voice that was never there."""
    assert upload(library, "halfway", clip()).status_code == 200
    voices = type(library.app.state.service.voices.library)
    check = voices._is_upload

    def audio_taken_meanwhile(self, source):
        monkeypatch.setattr(voices, "_is_upload", check)
        (library.uploads / "halfway.flac").unlink()
        return check(self, source)

    monkeypatch.setattr(voices, "_is_upload", audio_taken_meanwhile)
    r = library.get("/v1/voices/halfway", headers=KEY)
    assert r.status_code == 404, r.text
    assert library.delete("/v1/audio/voices/halfway", headers=KEY).status_code == 404  # (what is left is no voice)
    for left in library.uploads.glob("halfway.*"):  # (the rest of that delete)
        left.unlink()


def test_of_two_deletes_of_a_voice_one_deletes_it_and_the_other_finds_none(library, monkeypatch):
    """Deletes checked the voice before taking the directory's lock: of two at once both answered
    200, or the second, finding the audio gone and the metadata not yet, 403 "placed by the operator"."""
    assert upload(library, "deleted-twice", clip()).status_code == 200
    voices = type(library.app.state.service.voices.library)
    locked, first = voices._locked, []

    def another_delete_first(self):  # the other delete takes the lock between this one's look and its lock
        monkeypatch.setattr(voices, "_locked", locked)
        first.append(library.delete("/v1/audio/voices/deleted-twice", headers=KEY))
        return locked(self)

    monkeypatch.setattr(voices, "_locked", another_delete_first)
    r = library.delete("/v1/audio/voices/deleted-twice", headers=KEY)
    assert first[0].status_code == 200 and first[0].json()["deleted"] is True
    assert r.status_code == 404 and r.json()["error"]["param"] == "voice_id", r.text


def test_consent_that_is_not_text_is_refused_and_nothing_is_stored(library):
    """A form may name its charset: UTF-7's `+2AA-` decodes to a lone surrogate. Stored, the upload
    answered 500 (its metadata cannot be sent as JSON), and so did every later GET of the voice."""
    body = (b'--BOUND\r\nContent-Disposition: form-data; name="name"\r\n\r\nsurrogate\r\n'
            b'--BOUND\r\nContent-Disposition: form-data; name="consent"\r\n\r\n+2AA-\r\n'
            b'--BOUND\r\nContent-Disposition: form-data; name="audio_sample"; filename="a.wav"\r\n'
            b'Content-Type: audio/wav\r\n\r\n' + clip() + b'\r\n--BOUND--\r\n')
    r = library.post("/v1/audio/voices", content=body,
                     headers={**KEY, "Content-Type": "multipart/form-data; boundary=BOUND; charset=utf-7"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "consent", r.text
    assert library.get("/v1/voices/surrogate", headers=KEY).status_code == 404
    assert not any(p.startswith("surrogate.") for p in stored_files(library.uploads))


def test_a_delete_cut_short_leaves_the_voice_deletable(library, monkeypatch):
    import pathlib

    assert upload(library, "undeleted", clip()).status_code == 200
    unlink = pathlib.Path.unlink

    def failing(path, missing_ok=False):
        if path.name == "undeleted.flac":
            raise PermissionError(13, "Permission denied")
        return unlink(path, missing_ok=missing_ok)

    with monkeypatch.context() as patch:
        patch.setattr(pathlib.Path, "unlink", failing)
        r = library.delete("/v1/audio/voices/undeleted", headers=KEY)
        assert r.status_code == 500 and r.json()["error"]["code"] == "voice_storage_not_writable"
        assert "nothing was deleted" in r.json()["error"]["message"]
    assert library.get("/v1/voices/undeleted", headers=KEY).json()["uploaded"] is True  # not an operator's voice now
    assert library.delete("/v1/audio/voices/undeleted", headers=KEY).status_code == 200


def test_a_wav_with_a_nan_sample_is_400_and_stores_nothing(library):
    data = io.BytesIO()
    tone = 0.3 * np.sin(np.arange(6 * 22050) / 7).astype(np.float32)
    tone[1000] = np.nan
    sf.write(data, tone, 22050, format="WAV", subtype="FLOAT")
    before = stored_files(library.uploads)
    r = upload(library, "nan", data.getvalue())
    assert r.status_code == 400 and "NaN" in r.json()["error"]["message"]
    assert stored_files(library.uploads) == before


def test_the_quality_report_describes_the_stored_clip_after_clipping(library):
    r = upload(library, "loud", _float_wav(amplitude=1.5))
    quality = r.json()["quality"]
    assert quality["peak"] == pytest.approx(1.0) and quality["clipped_fraction"] > 0
    assert np.abs(sf.read(library.uploads / "loud.flac")[0]).max() <= 1.0


def _float_wav(amplitude: float) -> bytes:
    t = np.arange(6 * 22050) / 22050
    data = io.BytesIO()
    sf.write(data, (amplitude * np.sin(2 * np.pi * 150 * t)).astype(np.float32), 22050, format="WAV", subtype="FLOAT")
    return data.getvalue()


def test_a_concat_script_as_a_voice_reads_no_server_file(library):
    script = b"ffconcat version 1.0\nfile tests/reference/../../README.md\n"
    r = upload(library, "sneaky", script)
    assert r.status_code == 400 and "README" not in r.text and "tests/" not in r.text
    inline = "data:audio/wav;base64," + __import__("base64").b64encode(script).decode()
    r = library.post("/v1/audio/speech", headers=KEY, timeout=60,
                   json={"input": "Hi.", "voice": inline, "block_sizes": [4], "num_steps": [1]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "voice" and "README" not in r.text


def test_a_full_disk_is_507_leaves_no_trace_and_recovers(tiny_echo_dir, tiny_fish_dir, voice_dir, tiny_disk,
                                                         tmp_path):
    env = server_env(tiny_echo_dir, tiny_fish_dir, voice_dir, ECHO_API_KEY="lib-key",
                     ECHO_VOICE_UPLOAD_DIR=str(tiny_disk), ECHO_MAX_VOICE_BYTES="4000000", ECHO_MAX_VOICE_SECONDS="60")
    live = AppServer(env)
    try:
        (tiny_disk / "filler").write_bytes(b"\0" * 300 * 1024)
        r = upload(live, "big", clip(seconds=10.0, rate=44100))
        assert r.status_code == 507 and r.headers["content-type"] == "application/json"
        assert r.json()["error"]["code"] == "insufficient_storage"
        assert stored_files(tiny_disk) == {"filler"}  # no orphan metadata, no temporary file
        assert live.get("/v1/voices/big", headers=KEY).status_code == 404
        (tiny_disk / "filler").unlink()
        assert upload(live, "big", clip(seconds=3.0, rate=44100)).status_code == 200
        assert stored_files(tiny_disk) >= {"big.flac", "big.voice.json"}
    finally:
        live.stop()


def test_an_upload_no_temporary_directory_can_hold_is_the_servers_507_or_500(library, tiny_disk, read_only_disk,
                                                                            monkeypatch):
    """A form's file part over 1 MiB is spooled to a temporary file (Starlette). When the temporary
    directory was full or read-only, FastAPI answered 400 "There was an error parsing the body": the
    client was told its upload was malformed."""
    import tempfile

    spooled = clip(seconds=15.0, rate=44100)  # 1.3 MB
    (tiny_disk / "filler").write_bytes(b"\0" * 300 * 1024)
    with monkeypatch.context() as patch:
        patch.setattr(tempfile, "tempdir", str(tiny_disk))
        r = upload(library, "spooled", spooled)
        assert r.status_code == 507, r.text
        assert r.json()["error"]["code"] == "insufficient_storage" and "nothing was stored" in r.text
        patch.setattr(tempfile, "tempdir", str(read_only_disk))
        r = upload(library, "spooled", spooled)
        assert r.status_code == 500, r.text
        assert r.json()["error"]["code"] == "temporary_storage_not_writable" and "TMPDIR" in r.text
    assert library.get("/v1/voices/spooled", headers=KEY).status_code == 404
    assert "an upload could not be written to the temporary directory" in library.log()
    assert upload(library, "spooled", spooled).status_code == 200
    assert library.delete("/v1/audio/voices/spooled", headers=KEY).status_code == 200


def test_uploads_beyond_two_at_once_are_refused_429_at_once(library):
    """An upload takes no queue slot: 40 at once each held a thread of the pool the routes and every
    stream's encoding share, for seconds, and held the streams' first audio back by 5 s."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    import service as svc

    voices, entered, release = library.app.state.service.voices, [], threading.Event()
    add = voices.add

    def slow_add(*args, **kwargs):
        entered.append(1)
        release.wait(30)
        return add(*args, **kwargs)

    voices.add = slow_add
    try:
        with ThreadPoolExecutor(svc.UPLOADS_AT_ONCE) as pool:
            running = [pool.submit(upload, library, f"busy-{i}", clip()) for i in range(svc.UPLOADS_AT_ONCE)]
            while len(entered) < svc.UPLOADS_AT_ONCE:
                release.wait(0.01)
            refused = upload(library, "one-too-many", clip())
            release.set()
            assert [f.result().status_code for f in running] == [200] * svc.UPLOADS_AT_ONCE
    finally:
        voices.add = add
    assert refused.status_code == 429 and refused.headers["retry-after"]
    assert "voice uploads are being processed" in refused.json()["error"]["message"]
    assert upload(library, "one-too-many", clip()).status_code == 200  # (once they are done)
