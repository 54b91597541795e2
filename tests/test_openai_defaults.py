"""What clients built for OpenAI send: its voice names, and no response_format."""

import httpx
import pytest

from conftest import live_server, server_env
from settings import ConfigError, load_settings
from test_server import speech

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def openai_server(tiny_echo_dir, tiny_fish_dir, voice_dir, tmp_path_factory):
    env = server_env(tiny_echo_dir, tiny_fish_dir, voice_dir, ECHO_VOICE_ALIASES="alloy=alice, narrator=duo",
                     ECHO_DEFAULT_VOICE="bob", ECHO_DEFAULT_RESPONSE_FORMAT="wav")
    with live_server(tmp_path_factory, "openai", env) as live:
        yield live


def test_aliases_are_listed_and_speak_with_their_voice(openai_server):
    listed = [v["id"] for v in httpx.get(openai_server.url + "/v1/voices").json()["data"]]
    assert {"alloy", "narrator", "alice", "duo"} <= set(listed)
    assert "alloy" in [v["id"] for v in httpx.get(openai_server.url + "/v1/audio/voices").json()["voices"]]
    assert speech(openai_server, voice="alloy").content == speech(openai_server, voice="alice").content
    assert speech(openai_server, voice="narrator").content == speech(openai_server, voice="duo").content


def test_an_openai_voice_without_an_alias_uses_the_default_voice(openai_server, server):
    assert speech(openai_server, voice="nova").content == speech(openai_server, voice="bob").content
    r = speech(openai_server, voice="somebody")  # not one of OpenAI's names: still unknown
    assert r.status_code == 400 and r.json()["error"]["param"] == "voice"
    assert speech(server, voice="nova").status_code == 400  # no ECHO_DEFAULT_VOICE there


@pytest.mark.parametrize("stream", [True, False])
def test_a_request_without_response_format_gets_the_configured_default(openai_server, server, stream):
    assert speech(openai_server, stream=stream).content[:4] == b"RIFF"
    assert speech(server, stream=stream).content[:4] != b"RIFF"  # the fork's default: pcm / mp3
    assert speech(openai_server, stream=stream, response_format="pcm").content[:4] != b"RIFF"


def test_malformed_aliases_stop_start_up_naming_the_variable(monkeypatch):
    monkeypatch.setenv("ECHO_VOICE_ALIASES", "alloy:alice")
    with pytest.raises(ConfigError, match="ECHO_VOICE_ALIASES"):
        load_settings(device="cpu")
    monkeypatch.setenv("ECHO_VOICE_ALIASES", "")
    assert load_settings(device="cpu").voice_aliases == {}
