"""The clients themselves, with their own libraries and default settings, against a server on default
settings (issue 18, item 7). Each test checks what a listener notices: the audio the client decodes
lasts as long as the audio the server generated (a client that plays 44.1 kHz samples as 24 kHz
fails it: 29.7 s would last 54.6 s), at the rate the client labels it, in a format it plays. The
README's client table ("OpenAI clients") names the test behind each row.

The server's duration of a request is the growth of its `echo_audio_seconds_total` metric (clients
send no seed, so nothing else names it); for the OpenAI SDK it is also the pcm of the same seed.
The clients send no Echo settings, so the server's default preset runs (a few seconds a request with
the tiny models).

The OpenAI SDK, LiveKit's OpenAI plugin, aiohttp and httpx run in this process (dev requirements).
Pipecat pins protobuf<7, which the server's locked packages do not allow, so it runs in a venv of
its own (requirements-clients.txt; .ci/run builds it and names its Python in ECHO_CLIENTS_PYTHON)
through tests/clients/pipecat_speak.py.

The README's WebSocket example with `websockets`' default settings is tested with the WebSocket's
frame limit (ECHO_WS_MAX_FRAME_BYTES), not here; the fork's WebSocket client below uses aiohttp,
whose default limit (4 MiB) the server's frames stay under either way.
"""

import asyncio
import hashlib
import io
import json
import os
import re
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

import aiohttp
import av
import httpx
import pytest
import livekit.agents as livekit_agents
from livekit.agents import tokenize as livekit_tokenize
from livekit.agents import tts as livekit_tts
from livekit.plugins import openai as livekit_openai
from openai import AsyncOpenAI, OpenAI

from conftest import ROOT, live_server, server_env

pytestmark = pytest.mark.slow

TEXT = "Hello there."
OPENAI_RATE = 24000  # what OpenAI's clients assume pcm is, and label it
FORMATS = ["mp3", "opus", "aac", "flac", "wav", "pcm"]
# decoded against generated seconds: pcm, wav and flac hold the samples (give or take the resampler's
# tail); mp3, aac and opus add their encoder delay and padding (< 0.1 s). Wrong-rate playback is 80% off.
EXACT, CODED = 0.02, 0.1
CONTAINER = {"mp3": ("mp3", "mp3"), "opus": ("ogg", "opus"), "aac": ("aac", "aac"), "flac": ("flac", "flac"),
             "wav": ("wav", "pcm_s16le")}


# ---- what the server generated, and what a client decoded ---------------------------------------

def _metrics(server) -> tuple[float, float]:
    """(seconds of audio generated, requests that finished with audio) since the server started."""
    text = httpx.get(server.url + "/metrics").text
    seconds = re.search(r"^echo_audio_seconds_total (\S+)$", text, re.M)
    finished = re.findall(r"^echo_real_time_factor_count\{[^}]*\} (\S+)$", text, re.M)  # (every transport)
    return float(seconds.group(1)) if seconds else 0.0, sum(map(float, finished))


class Served:
    seconds: float


@contextmanager
def served(server, requests: int = 1):
    """The seconds of audio the server generated for the `requests` made inside the block."""
    seconds, finished = _metrics(server)
    result = Served()
    yield result
    deadline = time.monotonic() + 10
    while (now := _metrics(server))[1] - finished < requests and time.monotonic() < deadline:
        time.sleep(0.05)  # a request is counted as its stream ends, a moment after the client's last byte
    assert now[1] - finished == requests, f"the server finished {now[1] - finished} requests, not {requests}"
    result.seconds = now[0] - seconds


def decode(source) -> tuple[str, str, int, int, float]:
    """(container, codec, sample rate, channels, seconds) of an encoded file, as PyAV plays it."""
    with av.open(source) as container:
        stream = container.streams.audio[0]
        samples = sum(frame.samples for frame in container.decode(stream))
        return container.format.name, stream.codec_context.codec.canonical_name, stream.rate, stream.channels, samples / stream.rate


def assert_plays(data: bytes, fmt: str, seconds: float) -> None:
    """`data` is a `fmt` file a player opens: mono, at OpenAI's rate (Opus is always 48 kHz), lasting `seconds`."""
    if fmt == "pcm":
        assert len(data) % 2 == 0 and len(data) / 2 / OPENAI_RATE == pytest.approx(seconds, abs=EXACT)
        return
    container, codec, rate, channels, decoded = decode(io.BytesIO(data))
    assert (container, codec) == CONTAINER[fmt]
    assert (rate, channels) == (48000 if fmt == "opus" else OPENAI_RATE, 1)
    assert decoded == pytest.approx(seconds, abs=CODED if fmt in ("mp3", "aac", "opus") else EXACT)


# ---- the OpenAI SDK: model tts-1, voice alloy, every format, sync and async --------------------

SEED = {"seed": 7}  # extra_body: the same audio in every format


@pytest.fixture(scope="module")
def pcm_seconds(server) -> float:
    """How long the SDK's pcm of TEXT with SEED lasts: 24 kHz by OpenAI's contract, and what the server generated."""
    client = OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    with served(server) as generated, client.audio.speech.with_streaming_response.create(
            model="tts-1", voice="alloy", input=TEXT, response_format="pcm", extra_body=SEED) as response:
        assert response.headers["x-audio-sample-rate"] == str(OPENAI_RATE)
        pcm = response.read()
    assert len(pcm) / 2 / OPENAI_RATE == pytest.approx(generated.seconds, abs=EXACT)
    return len(pcm) / 2 / OPENAI_RATE


def test_openai_sdk_retrieves_each_listed_model_and_a_clear_404_for_others(server):
    """`models.retrieve`, which clients use to check a model before speaking, was a bare 404: only the
    list existed."""
    import openai

    client = OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    listed = [model.id for model in client.models.list()]
    assert [client.models.retrieve(name).id for name in listed] == listed and "tts-1" in listed
    with pytest.raises(openai.NotFoundError) as missing:
        client.models.retrieve("gpt-4o")
    assert missing.value.body["param"] == "model" and "GET /v1/models" in missing.value.body["message"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_openai_sdk_streams_every_format_at_the_right_length(server, pcm_seconds, fmt):
    client = OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    with client.audio.speech.with_streaming_response.create(
            model="tts-1", voice="alloy", input=TEXT, response_format=fmt, extra_body=SEED) as response:
        data = b"".join(response.iter_bytes())
    assert_plays(data, fmt, pcm_seconds)


def test_openai_async_sdk_streams_every_format_at_the_right_length(server, pcm_seconds):
    async def fetch(client: AsyncOpenAI, fmt: str) -> bytes:
        async with client.audio.speech.with_streaming_response.create(
                model="tts-1", voice="alloy", input=TEXT, response_format=fmt, extra_body=SEED) as response:
            return b"".join([chunk async for chunk in response.iter_bytes()])

    async def every_format() -> list[bytes]:  # at once, as an async app would: the server batches them
        async with AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0) as client:
            return await asyncio.gather(*(fetch(client, fmt) for fmt in FORMATS))

    for fmt, data in zip(FORMATS, asyncio.run(asyncio.wait_for(every_format(), 120))):
        assert_plays(data, fmt, pcm_seconds)


def test_a_stream_that_fails_after_its_first_audio_is_an_error_to_the_client_not_a_short_file(
        tiny_echo_dir, tiny_fish_dir, voice_dir, tmp_path_factory):
    """A streamed response that failed after its 200 (here: ECHO_REQUEST_TIMEOUT) ended with the
    body's normal end, so the SDK, httpx and curl saved a cut-short file as a whole one. It now ends
    without it: the client raises. The server logs the cause once, and no traceback."""
    env = server_env(tiny_echo_dir, tiny_fish_dir, voice_dir, ECHO_REQUEST_TIMEOUT="1")
    # audio at once, then seconds of work (tiny models); no voice to prepare: the limit runs from the queue slot
    long = {"block_sizes": [4, 636], "num_steps": [1, 100]}
    with live_server(tmp_path_factory, "cut", env) as live:
        client = OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0)
        received = []
        with pytest.raises(Exception, match="incomplete chunked read"):  # the SDK's httpx(2) RemoteProtocolError
            with client.audio.speech.with_streaming_response.create(
                    model="echo-tts", voice="none", input=TEXT, response_format="pcm", extra_body=long) as response:
                assert response.status_code == 200
                for chunk in response.iter_bytes():
                    received.append(chunk)
        assert received  # audio had begun
        with pytest.raises(httpx.RemoteProtocolError):  # as curl reports "transfer closed" (exit 18)
            httpx.post(live.url + "/v1/audio/speech", json={"input": TEXT, "voice": "none", **long}, timeout=60)
        # SSE: the failure is the `error` event, in band, and the body ends normally (cut, the OpenAI SDK,
        # which reads an SSE body whole, sent the failed request twice more)
        sse = client.audio.speech.create(model="echo-tts", voice="none", input=TEXT,
                                         extra_body={"stream_format": "sse", **long})
        events = [json.loads(line[6:]) for line in sse.text.splitlines() if line.startswith("data: ")]
        assert events[0]["type"] == "speech.audio.delta" and events[-1]["type"] == "error"
        assert events[-1]["error"]["code"] == "timeout" and "speech.audio.done" not in [e["type"] for e in events]
        whole = client.audio.speech.create(model="echo-tts", voice="none", input=TEXT, response_format="wav",
                                           extra_body={"block_sizes": [8], "num_steps": [1]})  # (well within 1 s)
        assert decode(io.BytesIO(whole.content))[4] > 0  # the server serves on after the cut response
        log = live.log()
    assert log.count("the response is cut short") == 2 and log.count("POST /v1/audio/speech") == 4
    assert "Exception in ASGI application" not in log and "without completing response" not in log


# ---- request shapes of clients that cannot run here ---------------------------------------------


@pytest.mark.parametrize("public", ["0", "1"])
def test_open_webui_lists_the_voices_of_a_keyed_server_given_the_setting(tiny_echo_dir, tiny_fish_dir, voice_dir,
                                                                          tmp_path_factory, public):
    """Open WebUI (get_available_voices, get_available_models) GETs {base}/audio/voices and
    {base}/audio/models without the key: on a server with ECHO_API_KEY both were 401, and its voice
    picker fell back to OpenAI's six names. With ECHO_PUBLIC_VOICE_LIST=1 the lists are public."""
    import requests

    env = server_env(tiny_echo_dir, tiny_fish_dir, voice_dir, ECHO_API_KEY="sekret", ECHO_PUBLIC_VOICE_LIST=public)
    with live_server(tmp_path_factory, f"lists-{public}", env) as live:
        voices = requests.get(live.url + "/v1/audio/voices", timeout=30)  # as Open WebUI asks: no key
        models = requests.get(live.url + "/v1/audio/models", timeout=30)
        speech = requests.post(live.url + "/v1/audio/speech", json={"input": "Hi.", "voice": "alice"}, timeout=30)
    assert speech.status_code == 401  # (the rest still needs the key)
    if public == "0":
        assert voices.status_code == models.status_code == 401
    else:
        assert {voice["id"]: voice["name"] for voice in voices.json()["voices"]}["alice"] == "alice"
        assert "tts-1" in [model["id"] for model in models.json()["models"]]

def test_open_webui_request_gives_a_playable_mp3(server, tmp_path):
    """Open WebUI (backend/open_webui/routers/audio.py): aiohttp POSTs the browser's {input, voice}
    with `model` set to TTS_MODEL (tts-1), no response_format, and saves the body as <sha256>.mp3,
    which it serves to the browser's audio element."""
    payload = {"input": TEXT, "voice": "alloy", "model": "tts-1"}

    async def speak() -> tuple[bytes, str]:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
            async with session.post(server.url + "/v1/audio/speech", json=payload,
                                    headers={"Authorization": "Bearer sk-unused"}) as r:
                r.raise_for_status()
                return await r.read(), r.headers["content-type"]

    with served(server) as generated:
        body, content_type = asyncio.run(speak())
    saved = tmp_path / f"{hashlib.sha256(json.dumps(payload).encode()).hexdigest()}.mp3"
    saved.write_bytes(body)
    assert content_type == "audio/mpeg"
    container, codec, rate, channels, seconds = decode(str(saved))
    assert (container, codec, rate, channels) == ("mp3", "mp3", OPENAI_RATE, 1)
    assert seconds == pytest.approx(generated.seconds, abs=CODED)


def test_sillytavern_request_gives_a_playable_mp3(server):
    """SillyTavern's "OpenAI Compatible" provider: its server (src/endpoints/openai.js, custom
    generate-voice) POSTs {input, response_format: mp3, voice, speed, model} with model tts-1 and
    voice alloy by default, and `Authorization: Bearer <key>` (empty without a key), then serves the
    whole body to an audio element as audio/mpeg."""
    body = {"input": TEXT, "response_format": "mp3", "voice": "alloy", "speed": 1, "model": "tts-1"}
    with served(server) as generated:
        r = httpx.post(server.url + "/v1/audio/speech", json=body, headers={"Authorization": "Bearer"}, timeout=120)
    assert r.status_code == 200, r.text
    assert_plays(r.content, "mp3", generated.seconds)


def test_fork_websocket_client_gets_44k_pcm(server):
    """The fork's WebSocket clients (its LiveKit plugin, its test client) read every binary frame as
    44.1 kHz 16-bit mono pcm: send {input, voice, segment_id, seed, extra_body, continue} with aiohttp's
    default settings, then {"continue": false} after the segment's `end`. Its audio must be the HTTP
    pcm of the same request at 44.1 kHz."""
    segment = {"input": TEXT, "voice": "alice", "segment_id": "seg-1", "seed": 101,
               "extra_body": {"chunking_enabled": False}, "continue": True}

    async def speak() -> tuple[bytes, list[dict], int | None]:
        audio, events = bytearray(), []
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(server.url.replace("http", "ws") + "/v1/audio/speech/stream/ws") as ws:
                await ws.send_json(segment)
                async for message in ws:
                    if message.type == aiohttp.WSMsgType.BINARY:
                        audio += message.data
                    elif message.type == aiohttp.WSMsgType.TEXT:
                        events.append(json.loads(message.data))
                        if events[-1].get("type") == "end":
                            await ws.send_json({"continue": False})
                    else:
                        break
                return bytes(audio), events, ws.close_code

    audio, events, close_code = asyncio.run(asyncio.wait_for(speak(), 120))
    assert [e["type"] for e in events] == ["start", "end", "no_op"] and close_code == 1000
    assert events[1]["audio_seconds"] == pytest.approx(len(audio) / 2 / 44100, abs=0.001)
    http = httpx.post(server.url + "/v1/audio/speech", timeout=120, json={
        k: v for k, v in segment.items() if k not in ("segment_id", "continue")})
    assert http.headers["x-audio-sample-rate"] == "44100"
    assert len(audio) == len(http.content)


# ---- the fork's LiveKit plugin on current livekit-agents, in process ----------------------------
#
# The fork's plugin (KevinAHM/echo-tts-api, ref/livekit_echo_plugin.py) is in no package index, so
# its wire steps are rebuilt here on livekit-agents' own classes: a streaming TTS declared at 44.1 kHz
# mono; an agent's reply text goes through livekit's blingfire sentence tokenizer; each sentence is
# sent on one aiohttp socket (default settings) as {"voice", "input", "continue": true, "segment_id"},
# then {"voice", "input": "", "continue": false, "segment_id": "final"}; every binary message is
# pushed as pcm; each `start` starts an emitter segment and each `end` ends it.

class ForkLiveKitPlugin(livekit_tts.TTS):
    def __init__(self, base_url: str, voice: str) -> None:
        super().__init__(capabilities=livekit_tts.TTSCapabilities(streaming=True), sample_rate=44100,
                         num_channels=1)
        self.url, self.voice = base_url.replace("http", "ws", 1) + "/v1/audio/speech/stream/ws", voice
        self.server_events: list[dict] = []

    def synthesize(self, text, *, conn_options=None):
        raise NotImplementedError("only the streaming path an agent uses is rebuilt here")

    def stream(self, *, conn_options=livekit_agents.DEFAULT_API_CONNECT_OPTIONS):
        return ForkLiveKitStream(tts=self, conn_options=conn_options)


class ForkLiveKitStream(livekit_tts.SynthesizeStream):
    async def _run(self, emitter) -> None:
        plugin: ForkLiveKitPlugin = self._tts
        emitter.initialize(request_id="fork", sample_rate=44100, num_channels=1, mime_type="audio/pcm",
                           stream=True, frame_size_ms=20)
        sentences = livekit_tokenize.blingfire.SentenceTokenizer().stream()

        async def feed() -> None:
            async for data in self._input_ch:
                if isinstance(data, self._FlushSentinel):
                    sentences.flush()
                else:
                    sentences.push_text(data)
            sentences.end_input()

        async def send(ws) -> None:
            async for number, sentence in _numbered(sentences):
                await ws.send_json({"voice": plugin.voice, "input": sentence.token, "continue": True,
                                    "segment_id": f"sentence-{number}"})
            await ws.send_json({"voice": plugin.voice, "input": "", "continue": False, "segment_id": "final"})

        async def receive(ws) -> None:
            async for message in ws:
                if message.type == aiohttp.WSMsgType.BINARY:
                    emitter.push(message.data)
                elif message.type == aiohttp.WSMsgType.TEXT:
                    event = json.loads(message.data)
                    plugin.server_events.append(event)
                    if event["type"] == "start":
                        emitter.start_segment(segment_id=str(event["segment_id"]))
                    elif event["type"] == "end":
                        emitter.end_segment()
                else:
                    break

        async with aiohttp.ClientSession() as session, session.ws_connect(plugin.url) as ws:
            await asyncio.gather(feed(), send(ws), receive(ws))


async def _numbered(events):
    number = 0
    async for event in events:
        number += 1
        yield number, event


REPLY = "This is the first sentence of the answer. And here is the second sentence of it."


async def _agent_reply(plugin: ForkLiveKitPlugin, retries: int = 3) -> tuple[set[int], list[str], int, str | None]:
    """What an agent's tts_node gets for one reply: (sample rates, segment ids in order, samples, the
    error the stream ends with). livekit retries a reply that gave no audio `retries` times."""
    rates, segments, samples, error = set(), [], 0, None
    options = livekit_agents.APIConnectOptions(max_retry=retries, retry_interval=0.1)
    async with plugin.stream(conn_options=options) as stream:
        stream.push_text(REPLY)
        stream.end_input()
        try:
            async for event in stream:
                rates.add(event.frame.sample_rate)
                samples += event.frame.samples_per_channel
                if event.segment_id not in segments:
                    segments.append(event.segment_id)
        except livekit_agents.APIError as e:
            error = str(e)
    await plugin.aclose()
    return rates, segments, samples, error


def test_fork_livekit_plugin_speaks_several_sentences_then_livekit_reports_a_segment_mismatch(server):
    """On livekit-agents 1.8.9 an agent's reply of two sentences is two segments on the socket, each
    answered in order and heard in full at 44.1 kHz, as it is generated. The stream then ends with an
    APIError: livekit counts one segment per reply, the plugin starts one per sentence. The session
    logs it as a TTS error after the audio played (which resets livekit's error count), so the agent
    keeps talking. The README's client table says so."""
    plugin = ForkLiveKitPlugin(server.url, "alice")
    with served(server, requests=2) as generated:
        rates, segments, samples, error = asyncio.run(asyncio.wait_for(_agent_reply(plugin), 120))
    assert [(e["type"], e["segment_id"]) for e in plugin.server_events] == [
        ("start", "sentence-1"), ("end", "sentence-1"), ("start", "sentence-2"), ("end", "sentence-2"),
        ("no_op", "final")]
    assert rates == {44100} and segments == ["sentence-1", "sentence-2"]
    assert samples / 44100 == pytest.approx(generated.seconds, abs=EXACT)
    assert error == "number of segments mismatch: expected 1, but got 2"


def test_fork_livekit_plugin_default_voice_is_refused_before_any_audio(server):
    """The plugin's default voice, `tara`, is not an OpenAI name: without a voice of that name or an
    ECHO_VOICE_ALIASES entry, each sentence gets only an `error` naming how to list voices, and the
    reply fails (livekit tries it again first, 3 times by default)."""
    plugin = ForkLiveKitPlugin(server.url, "tara")
    rates, segments, samples, error = asyncio.run(asyncio.wait_for(_agent_reply(plugin, retries=0), 60))
    assert samples == 0 and error.startswith("no audio frames were pushed")
    assert [e["type"] for e in plugin.server_events] == ["error", "error", "no_op"]
    assert "/v1/voices" in plugin.server_events[0]["message"]


# ---- LiveKit's OpenAI plugin (livekit-plugins-openai), in process -------------------------------

async def _frames(stream) -> tuple[set[int], set[int], int]:
    """(sample rates, channels, samples per channel) of the audio frames a LiveKit stream yields."""
    rates, channels, samples = set(), set(), 0
    async for event in stream:
        rates.add(event.frame.sample_rate)
        channels.add(event.frame.num_channels)
        samples += event.frame.samples_per_channel
    return rates, channels, samples


@pytest.mark.parametrize("options, tolerance", [
    ({}, CODED),  # its defaults: gpt-4o-mini-tts, voice ash, mp3 in SSE events (stream_format sse)
    ({"model": "tts-1", "voice": "alloy"}, CODED),  # tts-1: mp3 streamed as audio
    ({"response_format": "pcm"}, EXACT),  # pcm in SSE events, labelled 24 kHz
], ids=["default-mp3-sse", "tts-1", "pcm"])
def test_livekit_openai_tts_synthesize(server, options, tolerance):
    async def synthesize():
        tts = livekit_openai.TTS(base_url=server.url + "/v1", api_key="unused", **options)
        try:
            async with tts.synthesize(TEXT) as stream:
                return await _frames(stream)
        finally:
            await tts.aclose()

    with served(server) as generated:
        rates, channels, samples = asyncio.run(asyncio.wait_for(synthesize(), 120))
    assert rates == {OPENAI_RATE} and channels == {1}
    assert samples / OPENAI_RATE == pytest.approx(generated.seconds, abs=tolerance)


def test_livekit_openai_tts_through_the_stream_adapter_an_agent_uses(server):
    """An AgentSession wraps a TTS that cannot stream (this one) in a StreamAdapter: it splits the
    text into sentences and synthesizes each with the TTS's defaults (mp3 over SSE)."""
    sentences = "This is the first sentence of the answer. And here is the second sentence of it."

    async def speak():
        tts = livekit_openai.TTS(base_url=server.url + "/v1", api_key="unused")
        adapter = livekit_tts.StreamAdapter(tts=tts)
        try:
            async with adapter.stream() as stream:
                stream.push_text(sentences)
                stream.end_input()
                return await _frames(stream)
        finally:
            await adapter.aclose()
            await tts.aclose()

    with served(server, requests=2) as generated:
        rates, channels, samples = asyncio.run(asyncio.wait_for(speak(), 120))
    assert rates == {OPENAI_RATE} and channels == {1}
    assert samples / OPENAI_RATE == pytest.approx(generated.seconds, abs=2 * CODED)


# ---- Pipecat's OpenAITTSService, in the clients' venv --------------------------------------------

def clients_python() -> str:
    python = os.environ.get("ECHO_CLIENTS_PYTHON")
    if not python:
        pytest.skip("Pipecat runs in the clients' venv, which .ci/run builds: python3 -m venv ~/echo-clients && "
                    "~/echo-clients/bin/pip install -r requirements-clients.txt -c requirements-clients.lock, "
                    "then set ECHO_CLIENTS_PYTHON=~/echo-clients/bin/python")
    assert Path(python).expanduser().exists(), f"ECHO_CLIENTS_PYTHON={python} does not exist"
    return str(Path(python).expanduser())


@pytest.mark.parametrize("settings", [{}, {"model": "tts-1", "voice": "alloy"}], ids=["defaults", "tts-1-alloy"])
def test_pipecat_openai_tts_service(server, settings):
    """Its defaults: gpt-4o-mini-tts, voice alloy, pcm it labels with the pipeline's rate (24 kHz)."""
    script = ROOT / "tests" / "clients" / "pipecat_speak.py"
    with served(server) as generated:
        run = subprocess.run([clients_python(), str(script), server.url + "/v1", TEXT, json.dumps(settings)],
                             capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stderr[-4000:]
    heard = json.loads(run.stdout.strip().splitlines()[-1])
    assert heard["errors"] == [] and heard["frames"] > 0
    assert heard["sample_rates"] == [OPENAI_RATE] and heard["channels"] == [1]
    assert heard["bytes"] / 2 / OPENAI_RATE == pytest.approx(generated.seconds, abs=EXACT)


def test_ci_builds_the_clients_venv_from_its_lock():
    """So that the Pipecat tests never skip in CI, and the clients' lock pins what they install."""
    from test_project import _pins, _requirement_names

    ci = (ROOT / ".ci" / "run").read_text()
    assert "-r requirements-clients.txt -c requirements-clients.lock" in ci and "export ECHO_CLIENTS_PYTHON=" in ci
    assert _requirement_names(ROOT / "requirements-clients.txt") <= set(_pins(ROOT / "requirements-clients.lock"))
    assert "protobuf" in _pins(ROOT / "requirements-clients.lock")  # why they have a venv of their own:
    assert _pins(ROOT / "requirements-clients.lock")["protobuf"] != _pins(ROOT / "requirements-dev.lock")["protobuf"]


def test_every_row_of_the_readme_client_table_names_a_test_that_exists():
    readme = (ROOT / "README.md").read_text()
    rows = [line for line in readme.splitlines() if line.startswith("| ") and "`test_" in line]
    defined = {name for path in (ROOT / "tests").glob("test_*.py")
               for name in re.findall(r"^def (test_\w+)", path.read_text(), re.M)}
    clients = ["Open WebUI", "SillyTavern", "Pipecat", "LiveKit's OpenAI plugin", "fork's LiveKit plugin",
               "OpenAI SDKs", "curl"]
    assert all(any(client in row for row in rows) for client in clients)
    for row in rows:
        named = re.findall(r"`(test_\w+)", row.split("|")[-2])
        assert named and set(named) <= defined, row
