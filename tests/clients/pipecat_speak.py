"""Speak one text with Pipecat's OpenAITTSService, as an agent's pipeline does, and print what came out.

Run by tests/test_real_clients.py with the Python of the clients' venv (requirements-clients.txt):
Pipecat pins protobuf<7, which the server's locked packages do not allow.

    python pipecat_speak.py BASE_URL TEXT [SETTINGS_JSON]

SETTINGS_JSON holds OpenAITTSService.Settings fields (e.g. {"model": "tts-1", "voice": "alloy"}); none
means Pipecat's defaults. The service runs in a pipeline with Pipecat's default PipelineParams (its
test helper `run_test`), so `run_tts` gets the output rate a real pipeline gives it. The last line
of stdout is JSON: the TTSAudioRawFrame frames' sample rates, channels and total bytes, and any
ErrorFrame.
"""

import asyncio
import json
import sys

from pipecat.frames.frames import ErrorFrame, TTSAudioRawFrame, TTSSpeakFrame
from pipecat.services.openai.tts import OpenAITTSService
from pipecat.tests.utils import run_test


async def speak(base_url: str, text: str, settings: dict) -> dict:
    service = OpenAITTSService(api_key="unused", base_url=base_url,
                               **({"settings": OpenAITTSService.Settings(**settings)} if settings else {}))
    down, up = await run_test(service, frames_to_send=[TTSSpeakFrame(text)])
    audio = [f for f in down if isinstance(f, TTSAudioRawFrame)]
    return {"sample_rates": sorted({f.sample_rate for f in audio}),
            "channels": sorted({f.num_channels for f in audio}),
            "frames": len(audio), "bytes": sum(len(f.audio) for f in audio),
            "errors": [f.error for f in [*down, *up] if isinstance(f, ErrorFrame)]}


if __name__ == "__main__":
    url, text = sys.argv[1], sys.argv[2]
    print(json.dumps(asyncio.run(speak(url, text, json.loads(sys.argv[3]) if len(sys.argv) > 3 else {}))))
