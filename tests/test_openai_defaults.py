"""What clients built for OpenAI send: its voice names, its model names, and no response_format."""

import base64
import json

import pytest

from conftest import app_server, server_env
from settings import ConfigError, load_settings
from speech_request import SpeechRequest
from test_server import decode, speech

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def openai_app(tiny_echo_dir, tiny_fish_dir, voice_dir):
    env = server_env(tiny_echo_dir, tiny_fish_dir, voice_dir, ECHO_VOICE_ALIASES="alloy=alice, narrator=duo",
                     ECHO_DEFAULT_VOICE="bob", ECHO_DEFAULT_RESPONSE_FORMAT="wav",
                     ECHO_OUTPUT_SAMPLE_RATE="16000")
    with app_server(env) as app:
        yield app


def test_aliases_are_listed_and_speak_with_their_voice(openai_app):
    listed = [v["id"] for v in openai_app.get("/v1/voices").json()["data"]]
    assert {"alloy", "narrator", "alice", "duo"} <= set(listed)
    assert "alloy" in [v["id"] for v in openai_app.get("/v1/audio/voices").json()["voices"]]
    narrator = openai_app.get("/v1/voices/narrator").json()  # each listed voice can be looked up
    assert (narrator["kind"], narrator["voice"]) == ("alias", "duo")
    assert speech(openai_app, voice="alloy").content == speech(openai_app, voice="alice").content
    assert speech(openai_app, voice="narrator").content == speech(openai_app, voice="duo").content


def test_an_openai_voice_without_an_alias_uses_the_default_voice(openai_app, app):
    nova = speech(openai_app, voice="nova")
    assert nova.content == speech(openai_app, voice="bob").content and nova.headers["x-echo-voice"] == "bob"
    r = speech(openai_app, voice="somebody")  # not one of OpenAI's names: still unknown
    assert r.status_code == 400 and r.json()["error"]["param"] == "voice"
    assert "GET /v1/voices" in r.text and "ECHO_VOICE_ALIASES" in r.text  # how to list voices and name them


def test_an_openai_voice_speaks_with_the_first_voice_when_nothing_is_configured(app):
    nova = speech(app, voice="nova")  # no alias, no ECHO_DEFAULT_VOICE: the library's first voice by name
    assert nova.status_code == 200 and nova.headers["x-echo-voice"] == "alice"
    assert nova.content == speech(app, voice="alice").content
    assert app.log().count("OpenAI voice 'nova' speaks with voice 'alice'") == 1
    assert speech(app, voice="nova").status_code == 200
    assert app.log().count("OpenAI voice 'nova' speaks with voice 'alice'") == 1  # logged once per name


@pytest.mark.parametrize("model", ["tts-1", "tts-1-hd", "gpt-4o-mini-tts", "tts-1-1106", "tts-1-hd-1106",
                                   "gpt-4o-mini-tts-2025-03-20", "TTS-1"])
def test_openai_speech_models_and_their_dated_variants_are_recognised(model):
    assert SpeechRequest(input="x", voice="alloy", model=model).from_openai_client
    assert not SpeechRequest(input="x", voice="alloy", model="echo-tts").from_openai_client
    assert not SpeechRequest(input="x", voice="alloy").from_openai_client


def test_an_openai_model_gets_mp3_at_24_khz_and_pcm_at_24_khz(app):
    echo = speech(app, stream=True)  # the fork's default: pcm at 44.1 kHz
    assert echo.headers["x-audio-sample-rate"] == "44100"
    seconds = len(echo.content) / 2 / 44100
    mp3 = speech(app, model="tts-1", stream=True)
    assert mp3.headers["content-type"] == "audio/mpeg" and mp3.content[:2] in (b"ID", b"\xff\xfb", b"\xff\xf3")
    rate, _, samples = decode(mp3.content, "mp3")
    assert rate == 24000 and samples.size / rate == pytest.approx(seconds, abs=0.06)
    pcm = speech(app, model="tts-1", response_format="pcm")
    assert pcm.headers["x-audio-sample-rate"] == "24000"
    assert len(pcm.content) / 2 / 24000 == pytest.approx(seconds, abs=0.01)  # plays at the right speed
    explicit = speech(app, model="tts-1", response_format="pcm", sample_rate=44100)
    assert explicit.headers["x-audio-sample-rate"] == "44100" and explicit.content == echo.content


def test_every_model_open_webui_is_offered_gives_it_a_playable_mp3(app):
    """Open WebUI suggests the names GET /v1/audio/models lists, sends {model, input, voice} without a
    response_format and saves the body as .mp3: whichever it offers must answer mp3, not pcm."""
    offered = [m["id"] for m in app.get("/v1/audio/models").json()["models"]]
    assert offered and "echo-tts" not in offered
    for model in offered:
        r = speech(app, model=model)
        assert r.headers["content-type"] == "audio/mpeg"
        assert decode(r.content, "mp3")[0] == 24000
    listed = {m["id"] for m in app.get("/v1/models").json()["data"]}
    assert {"echo-tts", *offered} <= listed


def test_the_operators_format_and_rate_win_over_the_model_defaults(openai_app):
    r = speech(openai_app, model="tts-1")
    assert r.content[:4] == b"RIFF" and decode(r.content, "wav")[0] == 16000
    r = speech(openai_app, model="tts-1", response_format="pcm")
    assert r.headers["x-audio-sample-rate"] == "16000"


def test_sse_done_reports_the_voice_seed_and_meaningful_usage(app):
    r = speech(app, model="tts-1", voice="nova", stream_format="sse", response_format="pcm", seed=7,
               input="Hello there.")
    events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: ")]
    audio = b"".join(base64.b64decode(e["audio"]) for e in events if e["type"] == "speech.audio.delta")
    done = events[-1]
    assert (done["type"], done["seed"], done["voice"]) == ("speech.audio.done", 7, "alice")
    usage = done["usage"]
    assert usage["input_characters"] == usage["input_tokens"] == len("Hello there.")
    assert usage["audio_seconds"] == pytest.approx(len(audio) / 2 / 24000, abs=0.01)
    assert usage["output_tokens"] == round(usage["audio_seconds"] * 44100 / 2048)
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"] > 0


def test_audio_seconds_are_what_the_listener_hears_at_the_requests_speed(app):
    """At speed 2 the listener gets half the generated audio: usage, the end of a stream and the
    metrics count that; output tokens stay the latent frames generated."""
    from test_server import _metric

    before = _metric(app, "echo_audio_seconds_total")
    r = speech(app, stream_format="sse", response_format="pcm", speed=2.0)
    events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: ")]
    heard = sum(len(base64.b64decode(e["audio"])) for e in events if e["type"] == "speech.audio.delta") / 2 / 44100
    usage = events[-1]["usage"]
    assert usage["audio_seconds"] == pytest.approx(heard, abs=0.02)
    assert usage["output_tokens"] == pytest.approx(2 * heard * 44100 / 2048, abs=1)
    assert _metric(app, "echo_audio_seconds_total") - before == pytest.approx(heard, abs=0.02)


@pytest.mark.parametrize("stream", [True, False])
def test_a_request_without_response_format_gets_the_configured_default(openai_app, app, stream):
    assert speech(openai_app, stream=stream).content[:4] == b"RIFF"
    assert speech(app, stream=stream).content[:4] != b"RIFF"  # the fork's default: pcm / mp3
    assert speech(openai_app, stream=stream, response_format="pcm").content[:4] != b"RIFF"


def test_malformed_aliases_stop_start_up_naming_the_variable(monkeypatch):
    monkeypatch.setenv("ECHO_VOICE_ALIASES", "alloy:alice")
    with pytest.raises(ConfigError, match="ECHO_VOICE_ALIASES"):
        load_settings(device="cpu")
    monkeypatch.setenv("ECHO_VOICE_ALIASES", "")
    assert load_settings(device="cpu").voice_aliases == {}
