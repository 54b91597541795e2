"""The one request model of speech, shared by HTTP (`POST /v1/audio/speech`) and the WebSocket.

Every setting is declared once, in `GenerationOptions`, with its default and limits; a setting
the sampler, the early stop or the chunker reads says so in its annotation (`Into`), and the
options translate themselves into the engine's job (`GenerationOptions.to_job`: a pure function of
the options and the server's settings, as vLLM's request models make their sampling parameters).
`SpeechRequest` adds what only the response needs (format, rate, speed). What it refuses, it
refuses with the domain error (errors.RequestError), naming the field.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from audio_encoding import MAX_OUTPUT_RATE, MAX_SPEED, MIN_OUTPUT_RATE, MIN_SPEED, AudioFormat
from engine import BlockShape, EarlyStop, SpeakerReference, SpeechJob, random_seed
from errors import RequestError
from inference import GUIDANCE_MODES, MAX_SEQUENCE_LENGTH, SAMPLE_RATE, SamplerSettings
from inference_blockwise import steps_per_block
from settings import Settings
from text_chunking import (CHARS_PER_SECOND_RANGE, WORDS_PER_SECOND_RANGE, ChunkMode, ChunkSettings,
                           ChunkSettingsError, fits_in_one_generation,
                           normalize_exclamations, prepare_text, split_into_chunks)

MODEL_ID = "echo-tts"
# OpenAI's speech models and their dated variants (tts-1-1106, gpt-4o-mini-tts-2025-03-20): a request
# naming one comes from a client built for OpenAI, and gets OpenAI's defaults where it is silent
OPENAI_SPEECH_MODELS = ("tts-1", "tts-1-hd", "gpt-4o-mini-tts")
OPENAI_SPEECH_MODEL = re.compile(f"({'|'.join(map(re.escape, OPENAI_SPEECH_MODELS))})(-[0-9]+)*")
OPENAI_SAMPLE_RATE = 24_000  # OpenAI's audio (its pcm is 24 kHz 16-bit mono, and clients assume it)
# What one text chunk may cost (issue 17: `block_sizes: [1]*640, num_steps: 1` took 13 s against
# 0.1 s): blocks of at least MIN_BLOCK_FRAMES frames (~0.19 s), at most MAX_BLOCKS of them, and at
# most MAX_STEPS_PER_CHUNK diffusion steps in all (4x the most one block may have; the presets use 20-60).
MIN_BLOCK_FRAMES, MAX_BLOCKS, MAX_STEPS_PER_CHUNK = 4, 64, 400
MAX_SEED = 2**63 - 1  # torch generators take 64-bit seeds


class VoiceObject(BaseModel):
    id: str


@dataclass(frozen=True)
class Into:
    """A request setting's destination, as its annotation's metadata: the setting `name` (default:
    the field's own name) of the job's sampler (`SamplerSettings`), early stop (`EarlyStop`) or
    chunking (`ChunkSettings`). A field so marked needs no other code to reach its destination."""

    target: Literal["sampler", "early_stop", "chunking"]
    name: str | None = None


SAMPLER, EARLY_STOP = Into("sampler"), Into("early_stop")
Steps = Annotated[int, Field(ge=1, le=100)]


class GenerationOptions(BaseModel):
    """A request's say in generation; None means 'the server default'."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)
    # what the marked settings become (a subclass may name its own, with settings of its own)
    sampler_type: ClassVar[type[SamplerSettings]] = SamplerSettings
    early_stop_type: ClassVar[type[EarlyStop]] = EarlyStop

    input: str
    voice: str
    stream: bool = True
    seed: int | None = Field(None, ge=-MAX_SEED - 1, le=MAX_SEED)  # omitted or negative: random (X-Echo-Seed)

    block_sizes: list[Annotated[int, Field(ge=MIN_BLOCK_FRAMES, le=MAX_SEQUENCE_LENGTH)]] | None = Field(
        None, min_length=1, max_length=MAX_BLOCKS)
    num_steps: Steps | list[Steps] | None = None
    cfg_scale_text: Annotated[float, SAMPLER] = Field(3.0, ge=0, le=50)
    cfg_scale_speaker: Annotated[float, SAMPLER] = Field(8.0, ge=0, le=50)
    cfg_min_t: Annotated[float, SAMPLER] = Field(0.5, ge=0, le=1)
    cfg_max_t: Annotated[float, SAMPLER] = Field(1.0, ge=0, le=1)
    truncation_factor: Annotated[  # one for every block, or one per block of the first chunk (later take the last)
        Annotated[float, Field(gt=0, le=2)]
        | Annotated[list[Annotated[float, Field(gt=0, le=2)]], Field(min_length=1)]
        | None, SAMPLER] = None
    rescale_k: Annotated[float | None, SAMPLER] = Field(None, gt=0, le=100)
    rescale_sigma: Annotated[float | None, SAMPLER] = Field(None, gt=0, le=100)
    speaker_kv_scale: Annotated[float | None, SAMPLER] = Field(None, gt=0, le=10)
    speaker_kv_min_t: Annotated[float | None, SAMPLER] = Field(None, ge=0, le=1)
    speaker_kv_max_layers: Annotated[int | None, SAMPLER] = Field(None, ge=0, le=1000)
    guidance_mode: Annotated[Literal[GUIDANCE_MODES], Into("sampler", "guidance")] = "independent"  # type: ignore[valid-type]

    early_stop_on_zero: Annotated[bool, Into("early_stop", "enabled")] = True
    zero_eps: Annotated[float, EARLY_STOP] = Field(2e-2, ge=0, le=10)
    zero_tail_frames: Annotated[int, Into("early_stop", "tail_frames")] = Field(16, ge=1, le=MAX_SEQUENCE_LENGTH)
    zero_tail_min_frac: Annotated[float, Into("early_stop", "min_fraction")] = Field(0.95, ge=0, le=1)
    chunking_enabled: bool | None = None  # None: ECHO_CHUNKING
    chunk_mode: ChunkMode | None = None  # None: ECHO_CHUNK_MODE
    chunk_target_seconds: Annotated[float, Into("chunking", "target_seconds")] = Field(30.0, gt=0, le=40)
    chunk_min_seconds: Annotated[float, Into("chunking", "min_seconds")] = Field(20.0, gt=0, le=40)
    chunk_max_seconds: Annotated[float, Into("chunking", "max_seconds")] = Field(40.0, gt=0, le=40)
    # None: ECHO_CHUNK_CHARS_PER_SECOND / ECHO_CHUNK_WORDS_PER_SECOND
    chunk_chars_per_second: Annotated[float | None, Into("chunking", "chars_per_second")] = Field(
        None, ge=CHARS_PER_SECOND_RANGE[0], le=CHARS_PER_SECOND_RANGE[1])
    chunk_words_per_second: Annotated[float | None, Into("chunking", "words_per_second")] = Field(
        None, ge=WORDS_PER_SECOND_RANGE[0], le=WORDS_PER_SECOND_RANGE[1])
    normalize: bool = True

    @field_validator("truncation_factor", mode="before")
    @classmethod
    def _one_factor_per_block_at_most(cls, value: Any) -> Any:
        """Counted before its entries are parsed: a list of millions was parsed and checked first."""
        if isinstance(value, list) and len(value) > MAX_BLOCKS:
            raise ValueError(f"has {len(value)} entries; at most {MAX_BLOCKS}, one per block")
        return value

    @field_validator("block_sizes")
    @classmethod
    def _fits_one_generation(cls, value: list[int] | None) -> list[int] | None:
        if value is not None and sum(value) > MAX_SEQUENCE_LENGTH:
            raise ValueError(f"block sizes sum to {sum(value)} frames; at most {MAX_SEQUENCE_LENGTH} per chunk")
        return value

    @property
    def playback_speed(self) -> float:
        """How fast the listener plays the audio (a response's `speed`: SpeechRequest); 1 here."""
        return 1.0

    @model_validator(mode="before")
    @classmethod
    def _merge_settings(cls, data: Any) -> Any:
        """The settings under a SpeechRequest's `extra_body` (curl users of the fork nest them there) with
        the top level's over them, nulls left out: a null on top hides nothing, and a null for a setting
        with a default is that default (serializers such as Jackson, System.Text.Json and an SDK given
        `speed=None` write unset fields as null). Other nulls stay, to be refused."""
        if not isinstance(data, dict):
            return data
        fields = cls.model_fields
        nested = data.get("extra_body") if "extra_body" in fields else None
        under, top = (nested, data) if isinstance(nested, dict) else (data, {})  # (not an object: refused as such)
        return {**{k: v for k, v in under.items() if v is not None or k not in fields or fields[k].is_required()},
                **{k: v for k, v in top.items() if v is not None and k != "extra_body"}}

    @model_validator(mode="after")
    def _consistent(self) -> GenerationOptions:
        if self.cfg_min_t > self.cfg_max_t:
            raise RequestError("cfg_min_t must not exceed cfg_max_t", "cfg_min_t")
        try:  # ChunkSettings' rules, now (before a queue slot is taken); the server's rates come later
            ChunkSettings(**self.settings_for("chunking"))
        except ChunkSettingsError as e:
            raise RequestError(str(e), e.param) from e
        return self

    # ---- what the options mean for the engine (pure: the options and the server's settings) ------

    def settings_for(self, target: str) -> dict[str, Any]:
        """The values of the fields marked `Into(target)`, under their destination's names (lists as
        tuples: the destinations are frozen); a None (the server's default) is left out."""
        values = {}
        for name, field in type(self).model_fields.items():
            for into in (m for m in field.metadata if isinstance(m, Into) and m.target == target):
                value = getattr(self, name)
                if value is not None:
                    values[into.name or name] = tuple(value) if isinstance(value, list) else value
        return values

    def to_job(self, settings: Settings, speaker: SpeakerReference | None = None,
               chunks: tuple[str, ...] | None = None) -> SpeechJob:
        """The job the options ask for on a server with `settings` (without its voice prepared:
        the service adds that). Raises RequestError naming the field. Pure, but for the random
        seed drawn when none is given. `chunks` given: the text as is (the server's own warm-up,
        outside the request limits)."""
        chunks = self.text_chunks(settings) if chunks is None else chunks
        first, later = self.block_shapes(settings)
        sampler = self.sampler_type(num_steps=0, **self.settings_for("sampler"))  # steps: the block shapes'
        factor = sampler.truncation_factor
        if isinstance(factor, tuple) and len(factor) != len(first.block_sizes):
            raise RequestError(f"truncation_factor has {len(factor)} entries but there are "
                               f"{len(first.block_sizes)} blocks", "truncation_factor")
        seed = self.seed if self.seed is not None and self.seed >= 0 else random_seed()
        return SpeechJob(chunks, speaker, seed, first, later, sampler,
                         self.early_stop_type(**self.settings_for("early_stop")), self.normalize,
                         chunk_mode=self.chunk_mode_on(settings))

    def text_chunks(self, settings: Settings) -> tuple[str, ...]:
        """The input, prepared and split into the chunks generated one after the other."""
        if len(self.input) > settings.max_input_chars:
            raise RequestError(f"input is {len(self.input)} characters; the limit is "
                               f"{settings.max_input_chars}", "input")
        text = prepare_text(self.input, keep_lines=True)  # (line ends are places to cut)
        if settings.normalize_exclamation:
            text = normalize_exclamations(text)
        if not text:
            raise RequestError("input is empty", "input")
        chunking = self.chunk_settings(settings)  # checked also when unused: a contradiction is an error
        if not (settings.chunking if self.chunking_enabled is None else self.chunking_enabled):
            if not fits_in_one_generation(text, normalize=self.normalize):
                raise RequestError("input is longer than one generation (768 bytes); enable chunking "
                                   "(chunking_enabled=true) or send shorter text", "input")
            return (text.replace("\n", " "),)  # (as a chunk's text has a space where a line ended)
        chunks = tuple(split_into_chunks(text, chunking, normalize=self.normalize,
                                         continuation=self.chunk_mode_on(settings) == "continue"))
        if len(chunks) > settings.max_chunks:
            raise RequestError(f"input needs {len(chunks)} chunks of speech; the limit is "
                               f"{settings.max_chunks} (ECHO_MAX_CHUNKS)", "input")
        return chunks

    def chunk_mode_on(self, settings: Settings) -> ChunkMode:
        """The request's chunk_mode, else the server's (ECHO_CHUNK_MODE)."""
        return self.chunk_mode or settings.chunk_mode

    def chunk_settings(self, settings: Settings) -> ChunkSettings:
        """The chunk lengths asked for, the server's speaking rates where the request names none."""
        try:
            return ChunkSettings(**{"chars_per_second": settings.chunk_chars_per_second,
                                    "words_per_second": settings.chunk_words_per_second,
                                    **self.settings_for("chunking")})
        except ChunkSettingsError as e:
            raise RequestError(str(e), e.param) from e

    def block_shapes(self, settings: Settings) -> tuple[BlockShape, BlockShape]:
        """(first chunk, later chunks). Streaming starts with the preset's small blocks; a request's
        block_sizes / num_steps override both."""
        nonstream = ([MAX_SEQUENCE_LENGTH], [settings.num_steps_nonstream])
        stream = settings.stream_preset
        if self.block_sizes is None and self.num_steps is None:
            return _shape(*(stream if self.stream else nonstream)), _shape(*nonstream)
        blocks = self.block_sizes or (stream[0] if self.stream else nonstream[0])
        steps = self.num_steps
        if steps is None:
            steps = stream[1] if blocks == stream[0] else settings.num_steps_nonstream
        try:
            steps = steps_per_block(blocks, steps)
        except ValueError as e:
            raise RequestError(f"{e} ({blocks})", "num_steps") from None
        if sum(steps) > MAX_STEPS_PER_CHUNK:
            raise RequestError(f"the blocks take {sum(steps)} diffusion steps in all; the limit is "
                               f"{MAX_STEPS_PER_CHUNK} per chunk", "num_steps")
        shape = _shape(blocks, steps)
        return shape, shape


def _shape(blocks: list[int], steps: list[int]) -> BlockShape:
    return BlockShape(tuple(blocks), tuple(steps))


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

    @model_validator(mode="after")
    def _sse_streams(self) -> SpeechRequest:
        if self.stream_format == "sse" and not self.stream:  # (answered raw audio, not one event)
            raise RequestError("stream_format 'sse' is a stream of events: it cannot be sent with stream=false",
                               "stream_format")
        return self

    @property
    def voice_name(self) -> str:
        return self.voice.id if isinstance(self.voice, VoiceObject) else self.voice

    @property
    def playback_speed(self) -> float:
        """How fast the listener plays the audio: its `speed` (the scheduler's deadlines come that much sooner)."""
        return self.speed

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
        """The request as the service takes it: the voice as a name (validated already: copied, not
        checked again; a subclass keeps its own settings and destinations)."""
        return self.model_copy(update={"voice": self.voice_name})


def request_error(errors: list[dict]) -> RequestError:
    """The first of pydantic's validation errors of a SpeechRequest, as a RequestError naming its field."""
    first = errors[0]
    cause = (first.get("ctx") or {}).get("error")
    if isinstance(cause, RequestError):
        return cause
    loc = tuple(first.get("loc", ()))
    # extra_body's fields are the request's own (a field inside it is named as itself), except extra_body itself
    parts = [str(p) for i, p in enumerate(loc) if p != "body" and not isinstance(p, int)
             and not (p == "extra_body" and i < len(loc) - 1)]
    param = parts[0] if parts else None
    message = first.get("msg", "invalid request")
    return RequestError(f"{param}: {message}" if param else message, param)


# What a speech request's JSON may hold besides its input's characters (the fields, the block lists,
# what other clients add): values, counted before parsing by their commas and opening brackets (every
# value but the first follows one). Parsed, a 16 MiB body of `[[],[],...]` held the event loop for
# seconds and took 360 MiB; a request needs a few hundred values and its input's characters. (Counting
# 16 MiB takes ~25 ms, about what parsing a 16 MiB string does: bounded, on the loop.)
JSON_VALUES_BESIDES_INPUT = 65_536


def check_json_values(document: str | bytes, max_input_chars: int, what: str) -> None:
    """Refuse (413) a JSON document that holds more values than a speech request can need, before it
    is parsed. `what` names it in the message ("the request body", "the message")."""
    marks = (",", "[", "{") if isinstance(document, str) else (b",", b"[", b"{")
    limit = JSON_VALUES_BESIDES_INPUT + max_input_chars
    if (values := sum(map(document.count, marks))) > limit:
        raise RequestError(f"{what} holds {values} JSON values (counted by commas and brackets); a speech request "
                           f"needs at most {limit} (ECHO_MAX_INPUT_CHARS and {JSON_VALUES_BESIDES_INPUT})", status=413)
