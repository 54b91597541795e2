"""Load/soak test of the speech server: valid, invalid and abandoned requests at several concurrency levels.

Loopback only and bounded: it contacts nothing but 127.0.0.1, and every phase stops after
`--requests` requests or `--duration` seconds, whichever comes first (requests in flight then have
`--request-timeout` to finish; nothing waits longer). With `--tiny` it starts the server itself
exactly as `bench_server.py` does (the reference's tiny models on the CPU, here with
ECHO_MAX_ACTIVE=4 and ECHO_MAX_QUEUE=2 so that 8 clients meet the 429 path) and stops it at the end.

    python benchmarks/soak.py --tiny                                  # 1, 4, 8 clients, 45 s each
    python benchmarks/soak.py --tiny --duration 60 --levels 1,4,8,16 --requests 2000
    python benchmarks/soak.py --url http://127.0.0.1:8000 --pid 12345 --capacity 24 --server-log server.log

At each level, N client tasks share one httpx.AsyncClient and send a mix drawn from a seeded
random.Random (`--seed`; weights with `--mix`):

  stream          valid streaming PCM (small blocks: [8, 8] frames, [2, 2] steps), voice `none`, a
                  registered voice or an inline base64 clip; sometimes 24 kHz or speed 1.25; mostly
                  with early stop off, so that the PCM length is known and a truncated stream shows
  sse             valid streaming with stream_format=sse (deltas, then speech.audio.done)
  file            valid non-streaming wav / mp3 (one 16-frame block, 2 steps), Content-Length checked
  invalid         bad fields, malformed JSON, unknown voice, bad inline audio -> 400;
                  unknown route -> 404; wrong method -> 405 (body must be in OpenAI's error shape)
  abandon_stream  streaming request; the client reads the first chunk and closes the connection
  abandon_timeout non-streaming request cancelled by a short client read timeout (0.05-0.3 s)

Every request carries an X-Request-ID (soak-<phase>-<n>-<kind>) to find it in the server log.
Outcomes: ok (2xx with well-formed, non-empty audio), expected_4xx, unexpected_4xx, 429 (queue
full: fine, counted separately; that client then pauses 0.25-0.75 s), 5xx, transport (connection
errors and timeouts), abandoned (by design) and unexpected (a 2xx with empty, short or malformed
audio, a 2xx to an invalid request, a 3xx).

Phases: a warm-up at the highest level cycling through every kind (`--warmup` s), then the levels.
After each phase a probe request must succeed (429s retried for 15 s), and the server's RSS
(`/proc/<pid>/status` VmRSS), threads and open file descriptors are read, with its /metrics
gauges if it has them. After `--idle` seconds of rest: RSS again, then a capacity check (as many
requests at once as the server admits, ECHO_MAX_ACTIVE + ECHO_MAX_QUEUE: a 429 means slots stayed
taken after their clients left). The server log, when known, is scanned for ERROR lines and
tracebacks, and for which abandoned requests it cancelled.

Prints one block per phase, a markdown table (for benchmarks/RESULTS.md), a memory line and a
verdict. Exit status: 0 when clean; 1 on any 5xx, transport error, unexpected outcome, failed
probe or capacity check, hang, server death, or RSS growth since the warm-up over the threshold
(`--mem-pct` % of the post-warm-up RSS or `--mem-mb` MB, whichever is smaller); 2 when the server
could not be started or reached. Server log errors, stale gauges and a non-zero exit after SIGTERM
are printed as notes and do not change the exit status.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import random
import re
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from bench_server import repo_env, tiny_repos  # noqa: E402
from live_server import LOOPBACK, LiveServer, ServerFailed, wav_bytes  # noqa: E402
from stats import percentile  # noqa: E402

SPEECH = "/v1/audio/speech"
ID = "x-request-id"  # each request carries its own (soak-<phase>-<n>-<kind>), so server log lines can be found
SAMPLE_RATE = 44_100
FRAME_SAMPLES = 2048  # audio samples per latent frame
OUTCOMES = ("ok", "expected_4xx", "unexpected_4xx", "429", "5xx", "transport", "abandoned", "unexpected")
BAD_OUTCOMES = ("unexpected_4xx", "5xx", "transport", "unexpected")
TEXTS = (
    "Hello! This is Echo speaking.",
    "[S1] The quick brown fox jumps over the lazy dog.",
    "Short one.",
    "Numbers like 42 and 3.5 percent, and a date: March 3rd, 2024.",
    "Café, naïve, déjà vu: a few accented words.",
    "Is this a question? Yes, it is!",
    "[S1] One speaker. [S2] And another one answers.",
)
# kind -> weight in the mix
MIX = {"stream": 30, "sse": 5, "file": 15, "invalid": 30, "abandon_stream": 10, "abandon_timeout": 10}
VALID_KINDS = ("stream", "sse", "file")


# ---------------------------------------------------------------------------------------------
# Results


@dataclass
class Result:
    kind: str
    outcome: str
    latency: float | None = None  # time to the full response (valid requests that were ok)
    ttfb: float | None = None  # time to the first audio byte (streaming requests that were ok)
    detail: str = ""
    rid: str = ""
    left: float | None = None  # abandoned: when the client closed the connection (time.time())


@dataclass
class ProcStats:
    rss_kb: int
    hwm_kb: int
    threads: int
    fds: int

    @property
    def rss_mb(self) -> float:
        return self.rss_kb / 1024


@dataclass
class Phase:
    name: str
    clients: int
    tag: str = ""
    results: list[Result] = field(default_factory=list)
    wall: float = 0.0
    hung: bool = False
    probe: str = ""
    probe_ok: bool = True
    mem: ProcStats | None = None
    gauges: dict[str, float] | None = None
    cpu: dict[str, float] = field(default_factory=dict)

    def count(self, outcome: str) -> int:
        return sum(r.outcome == outcome for r in self.results)


@dataclass
class Context:
    voices: list[str]  # registered voices and inline data: URLs; "none" is always among them
    request_timeout: float
    mix: dict[str, float]
    pid: int | None = None


def proc_stats(pid: int | None) -> ProcStats | None:
    """VmRSS, VmHWM, thread and open-file counts of a process (None if it cannot be read)."""
    if pid is None:
        return None
    try:
        fields_ = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                       if ":" in line)
        kb = lambda name: int(fields_[name].split()[0])  # noqa: E731
        try:
            fds = len(os.listdir(f"/proc/{pid}/fd"))
        except OSError:
            fds = -1
        return ProcStats(kb("VmRSS"), kb("VmHWM"), int(fields_["Threads"]), fds)
    except (OSError, KeyError, ValueError):
        return None


def cpu_seconds(pid: int | str | None) -> float | None:
    """CPU time (user + system) used so far by a process, from /proc/<pid>/stat."""
    if pid is None:
        return None
    try:
        fields_ = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields_[11]) + int(fields_[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def busy_seconds() -> float | None:
    """CPU time all processes of the machine used so far (non-idle time in /proc/stat)."""
    try:
        values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        return (sum(values) - values[3] - values[4]) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


class CpuMeter:
    """Cores used during a phase by the server, by this script, and by everything else on the
    machine: CPU-bound latencies mean little when other processes took the cores."""

    def __init__(self, pid: int | None):
        self.pid = pid
        self.start = self._sample()

    def _sample(self) -> tuple:
        return time.perf_counter(), cpu_seconds(self.pid), cpu_seconds("self"), busy_seconds()

    def stop(self) -> dict[str, float]:
        end = self._sample()
        wall = end[0] - self.start[0]
        used = [None if a is None or b is None else (b - a) / wall for a, b in zip(self.start[1:], end[1:])]
        server, client, busy = used
        result = {"server": server, "client": client}
        if busy is not None and client is not None:
            result["others"] = max(0.0, busy - client - (server or 0.0))
        return {k: v for k, v in result.items() if v is not None}


def snippet(data: bytes, limit: int = 160) -> str:
    text = data[:limit].decode("utf-8", "replace").replace("\n", " ")
    return text + ("..." if len(data) > limit else "")


def openai_error_shape(data: bytes) -> bool:
    try:
        body = json.loads(data)
    except ValueError:
        return False
    error = body.get("error") if isinstance(body, dict) else None
    return isinstance(error, dict) and isinstance(error.get("message"), str) and "type" in error


def classify_status(kind: str, response: httpx.Response, data: bytes, expected: set[int] | None = None,
                    what: str = "") -> Result:
    """A response that is not the 2xx a valid request wants (or any response to an invalid one)."""
    status = response.status_code
    rid = response.headers.get(ID)
    where = (f"{what}: " if what else "") + (f"[request {rid}] " if rid else "")
    if status == 429:
        return Result(kind, "429")
    if status >= 500:
        return Result(kind, "5xx", detail=f"{where}{status} {snippet(data)}")
    if 400 <= status < 500:
        if expected is not None and status in expected:
            if not openai_error_shape(data):
                return Result(kind, "unexpected_4xx", detail=f"{where}{status}, error body not in OpenAI's shape: "
                                                             f"{snippet(data)}")
            return Result(kind, "expected_4xx")
        want = f" (expected {sorted(expected)})" if expected else ""
        return Result(kind, "unexpected_4xx", detail=f"{where}{status}{want} {snippet(data)}")
    want = f" (expected {sorted(expected)})" if expected else ""
    return Result(kind, "unexpected", detail=f"{where}{status}{want} {snippet(data)}")


def transport(kind: str, error: Exception, what: str = "", rid: str = "") -> Result:
    where = (f"{what}: " if what else "") + (f"[request {rid}] " if rid else "")
    return Result(kind, "transport", detail=f"{where}{type(error).__name__}: {error}")


# ---------------------------------------------------------------------------------------------
# Requests


def small_body(rng: random.Random, ctx: Context, **extra) -> dict:
    body = {"input": rng.choice(TEXTS), "voice": rng.choice(ctx.voices), "seed": rng.randrange(1 << 31),
            "block_sizes": [8, 8], "num_steps": [2, 2]}
    body.update(extra)
    if rng.random() < 0.15:  # the fork's curl style: settings nested under extra_body
        body["extra_body"] = {"block_sizes": body.pop("block_sizes"), "num_steps": body.pop("num_steps")}
    return body


def describe(body: dict) -> str:
    """A request body for a report line (inline voices shortened)."""
    shown = {k: (v[:24] + "..." if isinstance(v, str) and len(v) > 40 else v) for k, v in body.items()}
    return json.dumps(shown, ensure_ascii=False)


async def do_stream(client: httpx.AsyncClient, rng: random.Random, ctx: Context, rid: str) -> Result:
    options = {"response_format": "pcm"}
    if rng.random() < 0.15:
        options["sample_rate"] = 24000
    elif rng.random() < 0.1:
        options["speed"] = 1.25
    exact = rng.random() < 0.75  # without early stop the length is known: a truncated stream shows
    if exact:
        options["early_stop_on_zero"] = False
    body = small_body(rng, ctx, **options)
    start = time.perf_counter()
    first, size = None, 0
    try:
        async with client.stream("POST", SPEECH, json=body, headers={ID: rid}) as response:
            if response.status_code != 200:
                return classify_status("stream", response, await response.aread(), what=describe(body))
            rate = response.headers.get("x-audio-sample-rate")
            async for chunk in response.aiter_raw():
                if chunk:
                    first = first if first is not None else time.perf_counter() - start
                    size += len(chunk)
    except httpx.HTTPError as e:
        return transport("stream", e, describe(body), rid)
    total = time.perf_counter() - start
    # 16 frames of 2048 samples at 44.1 kHz, resampled and sped up as asked (early stop may shorten it)
    expected = 16 * FRAME_SAMPLES * int(rate or 0) / SAMPLE_RATE / options.get("speed", 1.0) * 2
    low = expected * 0.95 - 4096 if exact else 1
    if not rate or size % 2 or not low <= size <= expected * 1.05 + 4096:
        return Result("stream", "unexpected", detail=f"{describe(body)}: pcm of {size} bytes at rate {rate!r} "
                                                       f"(~{expected:.0f} expected{'' if exact else ' at most'})")
    return Result("stream", "ok", latency=total, ttfb=first)


async def do_sse(client: httpx.AsyncClient, rng: random.Random, ctx: Context, rid: str) -> Result:
    body = small_body(rng, ctx, stream_format="sse", response_format=rng.choice(["pcm", "mp3"]))
    start = time.perf_counter()
    first, buffer = None, b""
    try:
        async with client.stream("POST", SPEECH, json=body, headers={ID: rid}) as response:
            if response.status_code != 200:
                return classify_status("sse", response, await response.aread(), what=describe(body))
            async for chunk in response.aiter_raw():
                if chunk:
                    first = first if first is not None else time.perf_counter() - start
                    buffer += chunk
    except httpx.HTTPError as e:
        return transport("sse", e, describe(body), rid)
    total = time.perf_counter() - start
    try:
        events = [json.loads(part[len(b"data: "):]) for part in buffer.split(b"\n\n") if part.strip()]
        audio = sum(len(base64.b64decode(e["audio"])) for e in events if e.get("type") == "speech.audio.delta")
    except (ValueError, KeyError, TypeError) as e:
        return Result("sse", "unexpected", detail=f"{describe(body)}: unparsable SSE ({e}): {snippet(buffer)}")
    if not events or events[-1].get("type") != "speech.audio.done" or audio == 0:
        last = events[-1] if events else None
        return Result("sse", "unexpected", detail=f"{describe(body)}: {len(events)} events, {audio} audio bytes, "
                                                    f"last {json.dumps(last)[:200]}")
    return Result("sse", "ok", latency=total, ttfb=first)


def audio_file_ok(fmt: str, data: bytes) -> bool:
    if fmt == "wav":
        return data[:4] == b"RIFF" and data[8:12] == b"WAVE" and len(data) > 44
    if fmt == "mp3":
        return len(data) > 4 and (data[:3] == b"ID3" or (data[0] == 0xFF and data[1] & 0xE0 == 0xE0))
    return len(data) > 0


async def do_file(client: httpx.AsyncClient, rng: random.Random, ctx: Context, rid: str) -> Result:
    fmt = rng.choice(["wav", "mp3"])
    body = small_body(rng, ctx, stream=False, response_format=fmt)
    body.pop("extra_body", None)
    body.update(block_sizes=[16], num_steps=[2])
    start = time.perf_counter()
    try:
        response = await client.post(SPEECH, json=body, headers={ID: rid})
    except httpx.HTTPError as e:
        return transport("file", e, describe(body), rid)
    total = time.perf_counter() - start
    if response.status_code != 200:
        return classify_status("file", response, response.content, what=describe(body))
    length = response.headers.get("content-length")
    if not audio_file_ok(fmt, response.content) or length != str(len(response.content)):
        return Result("file", "unexpected", detail=f"{describe(body)}: {len(response.content)} bytes, "
                                                     f"Content-Length {length}, starts {response.content[:12]!r}")
    return Result("file", "ok", latency=total)


def invalid_cases(rng: random.Random, ctx: Context) -> list[tuple[str, str, str, dict, set[int]]]:
    """(name, method, path, httpx keyword arguments, expected statuses)."""
    def with_(**fields_):
        body = {"input": "Invalid request.", "voice": "none", "block_sizes": [8], "num_steps": [2]}
        body.update(fields_)
        return {"json": {k: v for k, v in body.items() if v is not ...}}

    json_headers = {"content-type": "application/json"}
    return [
        ("speed out of range", "POST", SPEECH, with_(speed=10), {400}),
        ("num_steps 0", "POST", SPEECH, with_(num_steps=0), {400}),
        ("num_steps 101", "POST", SPEECH, with_(num_steps=[101]), {400}),
        ("block sizes over 640", "POST", SPEECH, with_(block_sizes=[600, 600], num_steps=[2, 2]), {400}),
        ("block size 0", "POST", SPEECH, with_(block_sizes=[0]), {400}),
        ("steps/blocks mismatch", "POST", SPEECH, with_(block_sizes=[8, 8], num_steps=[2, 2, 2]), {400}),
        ("unknown response_format", "POST", SPEECH, with_(response_format="ogg"), {400}),
        ("sample_rate too low", "POST", SPEECH, with_(sample_rate=1000), {400}),
        ("cfg_min_t > cfg_max_t", "POST", SPEECH, with_(cfg_min_t=0.9, cfg_max_t=0.1), {400}),
        ("seed not a number", "POST", SPEECH, with_(seed="abc"), {400}),
        ("missing input", "POST", SPEECH, with_(input=...), {400}),
        ("missing voice", "POST", SPEECH, with_(voice=...), {400}),
        ("blank input", "POST", SPEECH, with_(input="   "), {400}),
        ("input too long", "POST", SPEECH, with_(input="a" * 100_000), {400, 413}),
        ("voice not a string", "POST", SPEECH, with_(voice=12), {400}),
        ("bad extra_body", "POST", SPEECH, with_(num_steps=..., extra_body={"num_steps": 500}), {400}),
        ("unknown guidance_mode", "POST", SPEECH, with_(guidance_mode="magic"), {400}),
        ("body is a list", "POST", SPEECH, {"json": [1, 2, 3]}, {400}),
        ("body is a string", "POST", SPEECH, {"json": "hello"}, {400}),
        ("truncated JSON", "POST", SPEECH, {"content": b'{"input": "hi", "voice": ', "headers": json_headers},
         {400}),
        ("binary garbage", "POST", SPEECH, {"content": bytes(rng.randrange(256) for _ in range(64)),
                                             "headers": json_headers}, {400}),
        ("empty body", "POST", SPEECH, {"content": b"", "headers": json_headers}, {400}),
        ("unknown voice", "POST", SPEECH, with_(voice=f"no-such-voice-{rng.randrange(10**6)}"), {400}),
        ("voice path traversal", "POST", SPEECH, with_(voice="../../etc/passwd"), {400}),
        ("bad inline voice", "POST", SPEECH, with_(voice="data:audio/wav;base64,!!!not-base64!!!"), {400}),
        ("inline voice not audio", "POST", SPEECH,
         with_(voice="data:audio/wav;base64," + base64.b64encode(b"not audio at all " * 40).decode()), {400}),
        ("unknown route (POST)", "POST", "/v1/audio/speeches", with_(), {404}),
        ("unknown route (GET)", "GET", f"/v1/no-such-route/{rng.randrange(10**6)}", {}, {404}),
        ("wrong method", "GET", SPEECH, {}, {405}),
    ]


async def do_invalid(client: httpx.AsyncClient, rng: random.Random, ctx: Context, rid: str) -> Result:
    name, method, path, kwargs, expected = rng.choice(invalid_cases(rng, ctx))
    try:
        kwargs["headers"] = {**kwargs.get("headers", {}), ID: rid}
        response = await client.request(method, path, **kwargs)
    except httpx.HTTPError as e:
        return transport("invalid", e, name, rid)
    return classify_status("invalid", response, response.content, expected, what=name)


async def do_abandon_stream(client: httpx.AsyncClient, rng: random.Random, ctx: Context, rid: str) -> Result:
    """Read the first audio chunk of a longer stream, then close the connection."""
    body = small_body(rng, ctx, response_format=rng.choice(["pcm", "pcm", "wav", "mp3"]))
    body.pop("extra_body", None)
    body.update(block_sizes=[8] * 6, num_steps=[2] * 6)
    got = False
    try:
        async with client.stream("POST", SPEECH, json=body, headers={ID: rid}) as response:
            if response.status_code != 200:
                return classify_status("abandon_stream", response, await response.aread(),
                                       what=describe(body))
            async for chunk in response.aiter_raw():
                if chunk:
                    got = True
                    break
        # leaving the block with the body unread closes the connection
    except httpx.HTTPError as e:
        return transport("abandon_stream", e, describe(body), rid)
    if not got:
        return Result("abandon_stream", "unexpected", detail=f"{describe(body)}: 200 with no audio at all")
    return Result("abandon_stream", "abandoned", left=time.time())


async def do_abandon_timeout(client: httpx.AsyncClient, rng: random.Random, ctx: Context, rid: str) -> Result:
    """A longer non-streaming request that the client gives up on after a short read timeout."""
    body = small_body(rng, ctx, stream=False, response_format=rng.choice(["wav", "mp3", "flac"]))
    body.pop("extra_body", None)
    body.update(block_sizes=[160], num_steps=[8])
    timeout = httpx.Timeout(10.0, read=rng.uniform(0.05, 0.3))
    try:
        response = await client.post(SPEECH, json=body, timeout=timeout, headers={ID: rid})
    except httpx.ReadTimeout:
        return Result("abandon_timeout", "abandoned", left=time.time())
    except httpx.HTTPError as e:
        return transport("abandon_timeout", e, describe(body), rid)
    if response.status_code != 200:
        return classify_status("abandon_timeout", response, response.content, what=describe(body))
    if not response.content:  # finished before the timeout: it must then be a proper file
        return Result("abandon_timeout", "unexpected", detail=f"{describe(body)}: 200 with an empty body")
    return Result("abandon_timeout", "ok")


KINDS = {"stream": do_stream, "sse": do_sse, "file": do_file, "invalid": do_invalid,
         "abandon_stream": do_abandon_stream, "abandon_timeout": do_abandon_timeout}


# ---------------------------------------------------------------------------------------------
# Phases


async def run_phase(phase: Phase, url: str, ctx: Context, rng: random.Random, duration: float,
                    max_requests: int, kinds: list[str] | None = None) -> None:
    """`phase.clients` tasks send requests until `max_requests` were issued or `duration` passed.
    `kinds` (warm-up) fixes the sequence of kinds instead of drawing them from the mix."""
    issued = 0
    deadline = time.monotonic() + duration
    names, weights = list(ctx.mix), list(ctx.mix.values())
    limits = httpx.Limits(max_connections=phase.clients + 2, max_keepalive_connections=phase.clients + 2)

    async with httpx.AsyncClient(base_url=url, timeout=ctx.request_timeout, limits=limits,
                                 trust_env=False) as client:
        async def worker() -> None:
            nonlocal issued
            while issued < max_requests and time.monotonic() < deadline:
                kind = kinds[issued % len(kinds)] if kinds else rng.choices(names, weights)[0]
                issued += 1
                request_rng = random.Random(rng.getrandbits(64))
                rid = f"soak-{phase.tag}-{issued}-{kind}"
                result = await KINDS[kind](client, request_rng, ctx, rid)
                if result.detail and rid not in result.detail:
                    result.detail = f"[request {rid}] {result.detail}"
                result.rid = rid
                phase.results.append(result)
                if result.outcome == "429":  # as a client honouring Retry-After would, but shorter
                    await asyncio.sleep(request_rng.uniform(0.25, 0.75))

        start = time.perf_counter()
        meter = CpuMeter(ctx.pid)
        tasks = [asyncio.create_task(worker()) for _ in range(phase.clients)]
        # every request has its own timeout, so this only trips if something ignores it
        _, pending = await asyncio.wait(tasks, timeout=duration + ctx.request_timeout + 30)
        phase.hung = bool(pending)
        for task in pending:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        phase.wall = time.perf_counter() - start
        phase.cpu = meter.stop()
        for task in tasks:
            if not task.cancelled() and task.exception() is not None:
                raise task.exception()


async def probe(url: str, ctx: Context, settle: float = 15.0) -> tuple[bool, str]:
    """One small streaming request after a level: the server must still serve it. 429s are retried
    for `settle` seconds (abandoned jobs may still be stopping); a 429 after that is a slot leak."""
    body = {"input": "Probe after the level.", "voice": "none", "block_sizes": [8, 8], "num_steps": [2, 2]}
    deadline = time.monotonic() + settle
    async with httpx.AsyncClient(base_url=url, timeout=ctx.request_timeout, trust_env=False) as client:
        while True:
            start = time.perf_counter()
            try:
                health = await client.get("/health")
                response = await client.post(SPEECH, json=body)
            except httpx.HTTPError as e:
                return False, f"probe failed: {type(e).__name__}: {e}"
            took = time.perf_counter() - start
            if response.status_code == 429 and time.monotonic() < deadline:
                await asyncio.sleep(1.0)
                continue
            if health.status_code != 200 or not health.json().get("ready"):
                return False, f"probe: /health answered {health.status_code} {snippet(health.content)}"
            if response.status_code != 200 or not response.content:
                return False, f"probe: {response.status_code} {snippet(response.content)} after {took:.2f} s"
            return True, f"probe ok in {took * 1000:.0f} ms"


async def server_metrics(url: str) -> dict[str, float] | None:
    """The server's Prometheus gauges and request counts by status class (None without /metrics)."""
    try:
        async with httpx.AsyncClient(base_url=url, timeout=10, trust_env=False) as client:
            response = await client.get("/metrics", headers={ID: "soak-metrics"})
    except httpx.HTTPError:
        return None
    if response.status_code != 200:
        return None
    values: dict[str, float] = {}
    for line in response.text.splitlines():
        match = re.match(r'^(echo_queue_length|echo_preparing_requests|echo_active_streams|echo_requests_total)'
                         r'(\{[^}]*\})? (\S+)$', line)
        if not match:
            continue
        name, labels, value = match.group(1), match.group(2) or "", float(match.group(3))
        if name == "echo_requests_total":
            status = re.search(r'status="(\d)', labels)
            name = f"requests_{status.group(1)}xx" if status else "requests_other"
        values[name] = values.get(name, 0) + value
    return values


def voice_clip(rng: np.random.Generator, seconds: float = 1.5, rate: int = 16000) -> bytes:
    """A short synthetic 'voice' (harmonics with a syllable-like envelope) as a WAV file: the mix's
    inline voices, and the registered one --tiny gives its server."""
    t = np.arange(int(seconds * rate)) / rate
    f0 = rng.uniform(90, 220)
    tone = sum(np.sin(2 * np.pi * f0 * k * t + rng.uniform(0, 2 * np.pi)) / k for k in range(1, 6))
    envelope = 0.5 * (1 + np.sin(2 * np.pi * rng.uniform(3, 6) * t)) ** 2
    return wav_bytes(0.2 * tone * envelope + 0.01 * rng.standard_normal(t.size), rate)


# ---------------------------------------------------------------------------------------------
# Server


def start_tiny_server(work: Path, args: argparse.Namespace) -> LiveServer:
    """The tiny models on the CPU (bench_server's --tiny), with soak's limits and a registered voice."""
    echo, fish = tiny_repos(work)
    voices = work / "voices"
    voices.mkdir(exist_ok=True)
    (voices / "soakvoice.wav").write_bytes(voice_clip(np.random.default_rng(args.seed), seconds=3.0, rate=44100))
    env = {**repo_env(str(echo), str(fish)),
           "ECHO_MAX_ACTIVE": str(args.max_active), "ECHO_MAX_QUEUE": str(args.max_queue),
           "ECHO_VOICE_DIRS": str(voices),
           # fewer than the distinct voices of the mix (1 file + inline clips), so entries get evicted
           "ECHO_SPEAKER_CACHE_SIZE": "3"}
    log = work / "server.log"
    print(f"server log: {log}", flush=True)
    try:
        return LiveServer(env, log, ready_timeout=args.start_timeout, port=args.port)
    except ServerFailed as e:  # exited during start-up, or not ready in time (then killed)
        print(e, file=sys.stderr)
        sys.exit(2)


def scan_log(log: Path | None) -> tuple[Counter, Counter]:
    """(ERROR/CRITICAL messages, exceptions ending tracebacks) of the server log, counted, with
    timestamps and request ids taken out so that equal messages add up."""
    messages: Counter = Counter()
    exceptions: Counter = Counter()
    if log is None or not log.exists():
        return messages, exceptions
    in_traceback = False
    for line in log.read_text(errors="replace").splitlines():
        if re.search(r" (ERROR|CRITICAL) ", line):
            text = re.sub(r"^[\d-]+ [\d:,.]+ ", "", line)
            messages[re.sub(r"\[[^\]]*\] ", "", text, count=1)[:200]] += 1
        if line.startswith("Traceback"):
            in_traceback = True
        elif in_traceback and line and not line.startswith(" "):
            exceptions[line.strip()[:200]] += 1
            in_traceback = False
    return messages, exceptions


def cancellations(log: Path | None, phases: list[Phase]) -> str | None:
    """How many of the abandoned requests the server log shows as cancelled (by request id)."""
    if log is None or not log.exists():
        return None
    cancelled: dict[str, float | None] = {}
    for stamp, rid in re.findall(r"^(\S+ \S+) \S+ \S+ \[(soak-[^\]]+)\] generation cancelled",
                                 log.read_text(errors="replace"), re.MULTILINE):
        try:
            cancelled[rid] = datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()
        except ValueError:
            cancelled[rid] = None
    abandoned = [r for p in phases for r in p.results if r.outcome == "abandoned"]
    lines = [f"server log: {sum(r.rid in cancelled for r in abandoned)} of {len(abandoned)} abandoned requests "
             f"logged 'generation cancelled' (the others had finished, or had not started, when the client left)"]
    for kind in ("abandon_stream", "abandon_timeout"):
        delays = [cancelled[r.rid] - r.left for r in abandoned
                  if r.kind == kind and r.left is not None and cancelled.get(r.rid) is not None]
        if delays:
            lines.append(f"   {kind}: client gone -> server cancelled the job: p50 {ms(delays, .5)} ms, "
                         f"p95 {ms(delays, .95)} ms, max {max(delays) * 1000:.0f} ms ({len(delays)} jobs)")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Report


def ms(values: list[float], q: float) -> str:
    return f"{percentile(values, q) * 1000:.0f}" if values else "-"


def pair(values: list[float]) -> str:
    return f"{ms(values, .5)} / {ms(values, .95)}" if values else "-"


def mem_cell(stats: ProcStats | None) -> str:
    return f"{stats.rss_mb:.0f}" if stats else "n/a"


def print_phase(phase: Phase) -> None:
    counts = {o: phase.count(o) for o in OUTCOMES}
    kinds = {k: sum(r.kind == k for r in phase.results) for k in KINDS}
    latency = [r.latency for r in phase.results if r.kind in VALID_KINDS and r.outcome == "ok"]
    ttfb = [r.ttfb for r in phase.results if r.ttfb is not None and r.outcome == "ok"]
    print(f"\n== {phase.name}: {phase.clients} clients, {len(phase.results)} requests in {phase.wall:.1f} s"
          + (" -- HUNG: tasks had to be cancelled" if phase.hung else ""))
    print("   kinds:    " + ", ".join(f"{k} {n}" for k, n in kinds.items()))
    print("   outcomes: " + ", ".join(f"{o} {n}" for o, n in counts.items()))
    print(f"   latency p50/p95 {pair(latency)} ms (valid, ok), TTFB p50/p95 {pair(ttfb)} ms (streaming, ok)")
    if phase.mem:
        m = phase.mem
        print(f"   server: RSS {m.rss_mb:.1f} MB (peak {m.hwm_kb / 1024:.1f} MB), {m.threads} threads, {m.fds} fds")
    if phase.cpu:
        print("   cores used: " + ", ".join(f"{k} {v:.2f}" for k, v in phase.cpu.items())
              + f" (of {os.cpu_count()})")
    print(f"   {phase.probe}")
    if phase.gauges is not None:
        print(f"   server /metrics: {gauge_text(phase.gauges)}")
    shown: dict[str, int] = {}
    for r in phase.results:
        if r.outcome in BAD_OUTCOMES and shown.get(r.outcome, 0) < 5:
            shown[r.outcome] = shown.get(r.outcome, 0) + 1
            print(f"   ! {r.outcome} [{r.kind}] {r.detail}")
    sys.stdout.flush()


def gauge_text(gauges: dict[str, float]) -> str:
    counts = ", ".join(f"{k.removeprefix('requests_')} {v:.0f}" for k, v in sorted(gauges.items())
                       if k.startswith("requests_"))
    return (f"queue {gauges.get('echo_queue_length', 0):.0f}, preparing {gauges.get('echo_preparing_requests', 0):.0f}, "
            f"active {gauges.get('echo_active_streams', 0):.0f}; "
            f"responses so far by status: {counts or '-'}")


def cores_cell(cpu: dict[str, float]) -> str:
    server, others = cpu.get("server"), cpu.get("others")
    return " / ".join("-" if v is None else f"{v:.2f}" for v in (server, others))


def table(start: ProcStats | None, phases: list[Phase], idle: ProcStats | None, idle_s: float) -> str:
    head = ("| clients | requests | req/s | ok | 4xx exp. | 4xx unexp. | 429 | 5xx | transport | abandoned "
            "| unexp. | latency p50 / p95 ms | TTFB p50 / p95 ms | cores: server / others | server RSS MB |")
    rows = [head, "|" + "---|" * head.count(" | ") + "---|"]
    blanks = "| " * 14
    rows.append(f"| start {blanks}{mem_cell(start)} |")
    for p in phases:
        latency = [r.latency for r in p.results if r.kind in VALID_KINDS and r.outcome == "ok"]
        ttfb = [r.ttfb for r in p.results if r.ttfb is not None and r.outcome == "ok"]
        label = p.name if p.name == "warm-up" else str(p.clients)
        rate = len(p.results) / p.wall if p.wall else 0
        rows.append(f"| {label} | {len(p.results)} | {rate:.1f} | {p.count('ok')} | {p.count('expected_4xx')} | "
                    f"{p.count('unexpected_4xx')} | {p.count('429')} | {p.count('5xx')} | {p.count('transport')} | "
                    f"{p.count('abandoned')} | {p.count('unexpected')} | {pair(latency)} | {pair(ttfb)} | "
                    f"{cores_cell(p.cpu)} | {mem_cell(p.mem)} |")
    rows.append(f"| idle {idle_s:.0f} s {blanks}{mem_cell(idle)} |")
    return "\n".join(rows)


# ---------------------------------------------------------------------------------------------


async def discover_voices(url: str, rng: np.random.Generator, inline: int) -> list[str]:
    async with httpx.AsyncClient(base_url=url, timeout=10, trust_env=False) as client:
        response = await client.get("/v1/voices")
    registered = [v["id"] for v in response.json().get("data", [])][:4] if response.status_code == 200 else []
    print(f"voices: none, registered {registered or '(none)'}, {inline} inline clips", flush=True)
    clips = ["data:audio/wav;base64," + base64.b64encode(voice_clip(rng)).decode() for _ in range(inline)]
    return ["none", "none", *registered, *clips]


async def capacity_check(url: str, ctx: Context, n: int) -> tuple[bool, str]:
    """`n` (= the server's max active + max queued) small requests at once on an idle server: every
    one must be admitted. A 429 here means slots stayed taken after their clients left."""
    body = {"input": "Capacity check.", "voice": "none", "stream": False, "response_format": "wav",
            "block_sizes": [8], "num_steps": [2]}
    limits = httpx.Limits(max_connections=n + 2, max_keepalive_connections=n + 2)
    async with httpx.AsyncClient(base_url=url, timeout=ctx.request_timeout, limits=limits,
                                 trust_env=False) as client:
        answers = await asyncio.gather(*(client.post(SPEECH, json=body, headers={ID: f"soak-capacity-{i}"})
                                         for i in range(n)), return_exceptions=True)
    statuses = Counter(a.status_code if isinstance(a, httpx.Response) else type(a).__name__ for a in answers)
    text = ", ".join(f"{n_} x {s}" for s, n_ in sorted(statuses.items(), key=str))
    return statuses == Counter({200: n}), f"capacity check, {n} requests at once after the idle: {text}"


async def soak(url: str, pid: int | None, log: Path | None,
               args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """Warm-up, the levels, an idle pause, the capacity check; prints the report.
    Returns (problems: the run is not clean, notes: worth a look but not failures)."""
    problems: list[str] = []
    notes: list[str] = []
    ctx = Context(await discover_voices(url, np.random.default_rng(args.seed), args.inline_voices),
                  args.request_timeout, args.mix, pid)
    start_mem = proc_stats(pid)
    phases: list[Phase] = []

    async def finish(phase: Phase) -> None:
        phase.probe_ok, phase.probe = await probe(url, ctx)
        phase.mem = proc_stats(pid)
        phase.gauges = await server_metrics(url)
        print_phase(phase)
        phases.append(phase)

    # warm-up at the highest level, every kind in turn: thread pools, allocator arenas, speaker
    # cache and encoders reach their working size, so that growth after it is what counts
    warm = Phase("warm-up", max(args.levels), "warmup")
    await run_phase(warm, url, ctx, random.Random(args.seed), duration=args.warmup,
                    max_requests=3 * len(KINDS) * warm.clients, kinds=list(KINDS))
    await finish(warm)

    for index, clients in enumerate(args.levels):
        phase = Phase(f"level {index + 1}", clients, f"L{index + 1}x{clients}")
        await run_phase(phase, url, ctx, random.Random(args.seed * 1000 + index + 1), args.duration, args.requests)
        await finish(phase)
        if pid is not None and phase.mem is None:
            problems.append(f"the server process {pid} is gone after {clients} clients")
            break

    await asyncio.sleep(args.idle)
    idle_mem = proc_stats(pid)
    idle_gauges = await server_metrics(url)
    if idle_gauges is not None:
        print(f"\nafter {args.idle:g} s idle: server /metrics {gauge_text(idle_gauges)}")
        busy = ("echo_queue_length", "echo_preparing_requests", "echo_active_streams")
        if any(idle_gauges.get(name, 0) for name in busy):
            notes.append(f"after {args.idle:g} s idle /metrics still reports "
                         + ", ".join(f"{name} {idle_gauges.get(name, 0):.0f}" for name in busy) + " (expected 0)")
    if args.capacity:
        ok, text = await capacity_check(url, ctx, args.capacity)
        print(text)
        if not ok:
            problems.append(text)

    for p in phases:
        bad = {o: p.count(o) for o in BAD_OUTCOMES if p.count(o)}
        label = f"{p.name} ({p.clients} clients)"
        if bad:
            problems.append(f"{label}: " + ", ".join(f"{n} {o}" for o, n in bad.items()))
        if p.hung:
            problems.append(f"{label}: requests hung past their timeout")
        if not p.probe_ok:
            problems.append(f"{label}: {p.probe}")

    if (text := cancellations(log, phases)) is not None:
        print(text)
    print("\n" + table(start_mem, phases, idle_mem, args.idle))
    if idle_mem and warm.mem and start_mem:
        base, end = warm.mem.rss_mb, idle_mem.rss_mb
        growth = end - base
        limit = min(args.mem_mb, base * args.mem_pct / 100)
        peak = max(p.mem.rss_mb for p in phases if p.mem)
        grew = growth > limit
        print(f"\nmemory: RSS {start_mem.rss_mb:.0f} MB at start, {base:.0f} MB after warm-up, at most {peak:.0f} MB "
              f"after a level, {end:.0f} MB after {args.idle:g} s idle: {growth:+.0f} MB ({growth / base * 100:+.1f}%) "
              f"since warm-up; threads {warm.mem.threads} -> {idle_mem.threads}, open fds {warm.mem.fds} -> "
              f"{idle_mem.fds}")
        if grew:
            problems.append(f"memory grew {growth:+.0f} MB ({growth / base * 100:+.1f}%) since warm-up, over the "
                            f"{limit:.0f} MB threshold")
        memory = (f"memory {'GREW' if grew else 'did not grow'} over the threshold ({growth:+.0f} MB since warm-up; "
                  f"threshold {limit:.0f} MB = min({args.mem_mb:g} MB, {args.mem_pct:g}%))")
    else:
        memory = "memory not measured (give --pid with --url)"
    total = {o: sum(p.count(o) for p in phases) for o in BAD_OUTCOMES}
    print(f"verdict: {memory}; {total['5xx']} 5xx, {total['transport']} transport errors, "
          f"{total['unexpected_4xx']} unexpected 4xx, {total['unexpected']} other unexpected outcomes -- "
          + ("CLEAN" if not problems else "NOT CLEAN"))
    return problems, notes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="start a server with the reference's tiny models (CPU)")
    parser.add_argument("--url", help=f"an already running server on {LOOPBACK}, e.g. http://{LOOPBACK}:8000")
    parser.add_argument("--pid", type=int, help="with --url: the server's process id, to read its memory")
    parser.add_argument("--server-log", type=Path, help="with --url: the server's log, to scan for errors")
    parser.add_argument("--levels", default="1,4,8", help="concurrency levels (default 1,4,8)")
    parser.add_argument("--duration", type=float, default=45, help="seconds per level at most (default 45)")
    parser.add_argument("--requests", type=int, default=2000, help="requests per level at most (default 2000)")
    parser.add_argument("--request-timeout", type=float, default=60, help="client timeout per request (default 60 s)")
    parser.add_argument("--idle", type=float, default=10, help="rest before the last memory reading (default 10 s)")
    parser.add_argument("--warmup", type=float, default=20, help="seconds of warm-up at most (default 20)")
    parser.add_argument("--capacity", type=int,
                        help="with --url: the server's ECHO_MAX_ACTIVE + ECHO_MAX_QUEUE, for the capacity check")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mix", default=",".join(f"{k}={v}" for k, v in MIX.items()),
                        help="request kinds and weights (default %(default)s)")
    parser.add_argument("--inline-voices", type=int, default=3, help="distinct inline base64 voices in the mix")
    parser.add_argument("--mem-pct", type=float, default=25, help="memory growth threshold, %% of post-warm-up RSS")
    parser.add_argument("--mem-mb", type=float, default=100, help="memory growth threshold, MB")
    parser.add_argument("--max-active", type=int, default=4, help="--tiny: ECHO_MAX_ACTIVE (default 4)")
    parser.add_argument("--max-queue", type=int, default=2,
                        help="--tiny: ECHO_MAX_QUEUE (default 2: 8 clients can fill the queue and see 429)")
    parser.add_argument("--port", type=int, default=0, help="--tiny: port (default: a free one)")
    parser.add_argument("--start-timeout", type=int, default=600, help="--tiny: seconds to wait for readiness")
    args = parser.parse_args()
    args.levels = [int(n) for n in args.levels.split(",") if n.strip()]
    try:
        args.mix = {k.strip(): float(v) for k, v in (item.split("=") for item in args.mix.split(","))}
    except ValueError:
        parser.error("--mix: kind=weight,kind=weight,...")
    if not set(args.mix) <= set(KINDS) or not any(w > 0 for w in args.mix.values()):
        parser.error(f"--mix: kinds are {', '.join(KINDS)}, with at least one positive weight")
    if args.tiny == bool(args.url):
        parser.error("give exactly one of --tiny and --url")
    if any(n < 1 for n in args.levels) or args.duration <= 0 or args.requests < 1:
        parser.error("levels, --duration and --requests must be positive")

    server, log = None, None
    if args.tiny:
        args.capacity = args.max_active + args.max_queue
        server = start_tiny_server(Path(tempfile.mkdtemp(prefix="echo-soak-")), args)
        url, pid, log = server.url, server.process.pid, server.log_path
    else:
        url, pid, log = args.url.rstrip("/"), args.pid, args.server_log
        parts = urlsplit(url)
        if parts.scheme != "http" or parts.hostname != LOOPBACK:
            parser.error(f"--url must be http://{LOOPBACK}:PORT (loopback only)")
        try:
            health = httpx.get(url + "/health", timeout=5, trust_env=False).json()
        except (httpx.HTTPError, ValueError) as e:
            print(f"cannot reach {url}/health: {e}", file=sys.stderr)
            sys.exit(2)
        if not health.get("ready"):
            print(f"{url} is not ready: {health}", file=sys.stderr)
            sys.exit(2)
        if pid is not None and proc_stats(pid) is None:
            parser.error(f"cannot read /proc/{pid}/status")
    print(f"soak: {url}, levels {args.levels}, at most {args.duration:g} s and {args.requests} requests per level, "
          f"seed {args.seed}" + (f", server pid {pid}" if pid else ""), flush=True)

    problems, notes = ["interrupted"], []
    try:
        problems, notes = asyncio.run(soak(url, pid, log, args))
    finally:
        if server is not None:
            alive = server.process.poll() is None
            code = server.stop(timeout=30)
            shutdown = ("did not exit within 30 s of SIGTERM: killed" if code is None
                        else f"exited with {code} after SIGTERM")
            print(f"server {shutdown}" + ("" if alive else " (it had already exited)"))
            if not alive:
                problems.append("the server process died during the run")
            elif code != 0:
                notes.append(f"the server {shutdown} (a graceful shutdown exits 0)")
    if log is not None:
        messages, exceptions = scan_log(log)
        print(f"server log: {log}: {sum(messages.values())} ERROR lines, {sum(exceptions.values())} tracebacks")
        for text, n in messages.most_common(8):
            print(f"   {n:>5} x {text}")
        for text, n in exceptions.most_common(8):
            print(f"   {n:>5} x traceback ending in: {text}")
        if messages or exceptions:
            notes.append(f"the server logged {sum(messages.values())} ERROR lines and {sum(exceptions.values())} "
                         f"tracebacks (see above and {log})")
    if notes:
        print("notes:\n" + "\n".join(f" - {n}" for n in notes))
    if problems:
        print("problems:\n" + "\n".join(f" - {p}" for p in problems))
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
