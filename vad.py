"""Silence detection for VAD reroll: the longest stretch without speech in a piece of audio.

Silero VAD (the `silero-vad` package ships its model file; nothing is downloaded) at 16 kHz.
The longest silence counts the stretch before the first speech, between speech and after the last.
"""

from __future__ import annotations

import threading

import numpy as np
import soxr
import torch

VAD_RATE = 16000


class SilenceDetector:
    """`detector(audio)`: the longest silence, in seconds, of mono float32 audio at `rate`."""

    def __init__(self, rate: int = 44100):
        from silero_vad import get_speech_timestamps, load_silero_vad

        self.rate = rate
        self._model = load_silero_vad()  # TorchScript, CPU; keeps state between windows: one caller at a time
        self._timestamps = get_speech_timestamps
        self._lock = threading.Lock()

    def __call__(self, audio: np.ndarray) -> float:
        samples = soxr.resample(np.asarray(audio, dtype=np.float32), self.rate, VAD_RATE)
        with self._lock, torch.inference_mode():
            speech = self._timestamps(torch.from_numpy(samples.copy()), self._model, sampling_rate=VAD_RATE)
        return longest_gap(speech, len(samples)) / VAD_RATE


def longest_gap(speech: list[dict], length: int) -> int:
    """Samples of the longest stretch of [0, length) outside the given {start, end} speech spans."""
    edges = [0] + [edge for span in speech for edge in (span["start"], span["end"])] + [length]
    return max(edges[i + 1] - edges[i] for i in range(0, len(edges), 2))
