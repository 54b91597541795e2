"""The one request model of speech, shared by HTTP (`POST /v1/audio/speech`) and the WebSocket:
every setting declared once, with its default and limits (`GenerationOptions`, what the service
translates into the engine's job), plus what only the HTTP response needs (`SpeechRequest`)."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from audio_encoding import MAX_OUTPUT_RATE, MAX_SPEED, MIN_OUTPUT_RATE, MIN_SPEED, AudioFormat
from inference import GUIDANCE_MODES, MAX_SEQUENCE_LENGTH, SAMPLE_RATE
from text_chunking import ChunkMode

MODEL_ID = "echo-tts"
# OpenAI's speech models and their dated variants (tts-1-1106, gpt-4o-mini-tts-2025-03-20): a request
# naming one comes from a client built for OpenAI, and gets OpenAI's defaults where it is silent
OPENAI_SPEECH_MODEL = re.compile(r"(tts-1|tts-1-hd|gpt-4o-mini-tts)(-[0-9]+)*")
OPENAI_SAMPLE_RATE = 24_000  # OpenAI's audio (its pcm is 24 kHz 16-bit mono, and clients assume it)
# What one text chunk may cost (issue 17: `block_sizes: [1]*640, num_steps: 1` took 13 s against
# 0.1 s): blocks of at least MIN_BLOCK_FRAMES frames (~0.19 s), at most MAX_BLOCKS of them, and at
# most MAX_STEPS_PER_CHUNK diffusion steps in all (4x the most one block may have; the presets use 20-60).
MIN_BLOCK_FRAMES, MAX_BLOCKS, MAX_STEPS_PER_CHUNK = 4, 64, 400
MAX_SEED = 2**63 - 1  # torch generators take 64-bit seeds


ERROR_KINDS = {400: ("invalid_value", "invalid_request_error"), 401: ("invalid_api_key", "authentication_error"),
               403: ("forbidden", "permission_error"),
               408: ("request_timeout", "invalid_request_error"),
               404: ("not_found", "not_found_error"), 409: ("conflict", "invalid_request_error"),
               413: ("request_too_large", "invalid_request_error"), 429: ("queue_full", "rate_limit_error"),
               500: ("generation_failed", "server_error"), 503: ("not_ready", "server_error"),
               504: ("timeout", "server_error"), 507: ("insufficient_storage", "server_error")}


class RequestError(ValueError):
    """A request cannot be served as sent, or its generation failed: an HTTP error (400 unless
    `status` says otherwise) or a WebSocket error message, naming `param`, with OpenAI's error
    `code` (by status unless given) and `error_type`."""

    def __init__(self, message: str, param: str | None = None, status: int = 400, code: str | None = None):
        super().__init__(message)
        self.param, self.status, self._code = param, status, code

    @property
    def code(self) -> str:
        return self._code or ERROR_KINDS.get(self.status, ERROR_KINDS[400])[0]

    @property
    def error_type(self) -> str:
        return ERROR_KINDS.get(self.status, ERROR_KINDS[400])[1]

    def detail(self) -> dict:
        """OpenAI's error object: the `error` of a response body, an SSE event or a socket message."""
        return {"message": str(self), "type": self.error_type, "param": self.param, "code": self.code}


class VoiceObject(BaseModel):
    id: str


class GenerationOptions(BaseModel):
    """A request's say in generation; None means 'the server default'."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    input: str
    voice: str
    stream: bool = True
    seed: int | None = Field(None, ge=-MAX_SEED - 1, le=MAX_SEED)  # omitted or negative: random (X-Echo-Seed)

    block_sizes: list[Annotated[int, Field(ge=MIN_BLOCK_FRAMES, le=MAX_SEQUENCE_LENGTH)]] | None = Field(
        None, min_length=1, max_length=MAX_BLOCKS)
    num_steps: Annotated[int, Field(ge=1, le=100)] | list[Annotated[int, Field(ge=1, le=100)]] | None = None
    cfg_scale_text: float = Field(3.0, ge=0, le=50)
    cfg_scale_speaker: float = Field(8.0, ge=0, le=50)
    cfg_min_t: float = Field(0.5, ge=0, le=1)
    cfg_max_t: float = Field(1.0, ge=0, le=1)
    truncation_factor: (Annotated[float, Field(gt=0, le=2)]
                        | Annotated[list[Annotated[float, Field(gt=0, le=2)]], Field(min_length=1)] | None) = None
    rescale_k: float | None = Field(None, gt=0, le=100)
    rescale_sigma: float | None = Field(None, gt=0, le=100)
    speaker_kv_scale: float | None = Field(None, gt=0, le=10)
    speaker_kv_min_t: float | None = Field(None, ge=0, le=1)
    speaker_kv_max_layers: int | None = Field(None, ge=0, le=1000)
    guidance_mode: Literal[GUIDANCE_MODES] = "independent"  # type: ignore[valid-type]

    early_stop_on_zero: bool = True
    zero_eps: float = Field(2e-2, ge=0, le=10)
    zero_tail_frames: int = Field(16, ge=1, le=MAX_SEQUENCE_LENGTH)
    zero_tail_min_frac: float = Field(0.95, ge=0, le=1)
    chunking_enabled: bool | None = None
    chunk_mode: ChunkMode | None = None  # None: ECHO_CHUNK_MODE
    chunk_target_seconds: float = Field(30.0, gt=0, le=40)
    chunk_min_seconds: float = Field(20.0, gt=0, le=40)
    chunk_max_seconds: float = Field(40.0, gt=0, le=40)
    chunk_chars_per_second: float | None = Field(None, gt=0, le=1000)
    chunk_words_per_second: float | None = Field(None, gt=0, le=100)
    normalize: bool = True

    @field_validator("block_sizes")
    @classmethod
    def _fits_one_generation(cls, value: list[int] | None) -> list[int] | None:
        if value is not None and sum(value) > MAX_SEQUENCE_LENGTH:
            raise ValueError(f"block sizes sum to {sum(value)} frames; at most {MAX_SEQUENCE_LENGTH} per chunk")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> GenerationOptions:
        if self.cfg_min_t > self.cfg_max_t:
            raise RequestError("cfg_min_t must not exceed cfg_max_t", "cfg_min_t")
        if self.chunk_min_seconds > self.chunk_max_seconds:
            raise RequestError("chunk_min_seconds must not exceed chunk_max_seconds", "chunk_min_seconds")
        return self


class SpeechRequest(GenerationOptions):
    """POST /v1/audio/speech (and a WebSocket segment). Echo settings may sit at the top level or
    under `extra_body`."""

    voice: str | VoiceObject
    model: str = MODEL_ID
    response_format: AudioFormat | None = None
    stream_format: Literal["audio", "sse"] = "audio"
    sample_rate: int | None = Field(None, ge=MIN_OUTPUT_RATE, le=MAX_OUTPUT_RATE)
    speed: float = Field(1.0, ge=MIN_SPEED, le=MAX_SPEED)
    instructions: str | None = None  # accepted and ignored: Echo takes no style prompt
    extra_body: dict[str, Any] | None = None

    @model_validator(mode="before")
    @classmethod
    def _merge_extra_body(cls, data: Any) -> Any:
        """curl users of the fork nest settings under extra_body; top-level values win."""
        if isinstance(data, dict) and isinstance(data.get("extra_body"), dict):
            return {**data["extra_body"], **{k: v for k, v in data.items() if k != "extra_body"}}
        return data

    @property
    def voice_name(self) -> str:
        return self.voice.id if isinstance(self.voice, VoiceObject) else self.voice

    @property
    def from_openai_client(self) -> bool:
        """Whether `model` names one of OpenAI's speech models."""
        return OPENAI_SPEECH_MODEL.fullmatch(self.model.strip().lower()) is not None

    def output(self, default_format: str | None, default_rate: int | None) -> tuple[str, int]:
        """The response's format and sample rate; the first that is set wins:
        - format: `response_format`; the operator's default (ECHO_DEFAULT_RESPONSE_FORMAT); mp3 for
          OpenAI's models (OpenAI's default, and what Open WebUI saves as .mp3); else the fork's:
          pcm when streaming, mp3 for a whole file.
        - rate: `sample_rate`; the operator's (ECHO_OUTPUT_SAMPLE_RATE); 24 kHz for OpenAI's models
          (their clients play pcm as 24 kHz whatever the header says); else Echo's 44.1 kHz."""
        openai = self.from_openai_client
        fmt = self.response_format or default_format or ("mp3" if openai or not self.stream else "pcm")
        rate = self.sample_rate or default_rate or (OPENAI_SAMPLE_RATE if openai else SAMPLE_RATE)
        return fmt, rate

    def generation_options(self) -> GenerationOptions:
        """The generation settings alone (validated already: copied, not checked again)."""
        values = {name: getattr(self, name) for name in GenerationOptions.model_fields}
        return GenerationOptions.model_construct(**{**values, "voice": self.voice_name})


def request_error(errors: list[dict]) -> RequestError:
    """The first of pydantic's validation errors of a SpeechRequest, as a RequestError naming its field."""
    first = errors[0]
    cause = (first.get("ctx") or {}).get("error")
    if isinstance(cause, RequestError):
        return cause
    parts = [str(p) for p in first.get("loc", ()) if p not in ("body", "extra_body") and not isinstance(p, int)]
    param = parts[0] if parts else None
    message = first.get("msg", "invalid request")
    return RequestError(f"{param}: {message}" if param else message, param)
