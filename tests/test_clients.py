"""The README's curl examples and the official OpenAI SDK against the live server."""

import re
import subprocess

import pytest
import soundfile as sf
from openai import OpenAI

from conftest import ROOT
from test_server import FAST, FAST_SAMPLES, decode

pytestmark = pytest.mark.slow
README = (ROOT / "README.md").read_text()


def readme_blocks(language: str, must_contain: str) -> list[str]:
    blocks = re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)
    return [b for b in blocks if must_contain in b]


def curl_examples() -> list[str]:
    return [b.strip() for b in readme_blocks("bash", "curl ")]


@pytest.mark.parametrize("example", curl_examples(), ids=lambda e: e.split("-o ")[-1] if "-o " in e else "pcm")
def test_readme_curl_examples(server, tmp_path, example):
    command = example.replace("http://localhost:8000", server.url)
    # the player stands in for a person listening: capture what it would have played
    command = re.sub(r"\|\s*ffplay.*$", "> played.pcm", command, flags=re.S)
    subprocess.run(["bash", "-c", "set -o pipefail; " + command], cwd=tmp_path, check=True, timeout=300)
    produced = next(p for p in tmp_path.iterdir())
    fmt = {".mp3": "mp3", ".wav": "wav", ".pcm": "pcm"}[produced.suffix]
    rate, channels, samples = decode(produced.read_bytes(), fmt)
    assert rate == 44100 and channels == 1 and len(samples) > 2048


def test_readme_openai_sdk_example(server, tmp_path, monkeypatch):
    (example,) = readme_blocks("python", "OpenAI(")
    monkeypatch.chdir(tmp_path)
    exec(example.replace("http://localhost:8000/v1", server.url + "/v1"), {})
    audio, rate = sf.read(tmp_path / "hello.wav")
    assert rate == 44100 and audio.ndim == 1 and len(audio) > 2048


@pytest.fixture()
def client(server):
    return OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def test_sdk_create_returns_the_whole_file(client):
    response = client.audio.speech.create(model="echo-tts", voice="alice", input="Hello.", response_format="flac",
                                          extra_body=FAST)
    rate, channels, samples = decode(response.content, "flac")
    assert (rate, channels, len(samples)) == (44100, 1, FAST_SAMPLES)


def test_sdk_streaming_response_and_extra_body_take_effect(client):
    def pcm(**extra):
        with client.audio.speech.with_streaming_response.create(
                model="echo-tts", voice="alice", input="Hello.", response_format="pcm",
                extra_body={**FAST, **extra}) as response:
            assert response.headers["x-audio-sample-rate"] == str(extra.get("sample_rate", 44100))
            return b"".join(response.iter_bytes())

    base = pcm(seed=1)
    assert len(base) == FAST_SAMPLES * 2
    assert pcm(seed=1) == base and pcm(seed=2) != base
    assert abs(len(pcm(seed=1, sample_rate=24000)) // 2 - FAST_SAMPLES * 24000 / 44100) < 64


def test_sdk_errors_surface_as_openai_errors(client):
    import openai

    with pytest.raises(openai.BadRequestError) as caught:
        client.audio.speech.create(model="echo-tts", voice="nobody", input="Hello.")
    assert caught.value.body["param"] == "voice"
