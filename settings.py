"""Server configuration: every ECHO_* environment variable, read once at startup into one object."""

from __future__ import annotations

import hmac
import logging
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import torch
from pydantic import AliasChoices, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from audio_encoding import MAX_OUTPUT_RATE, MIN_OUTPUT_RATE, AudioFormat
from text_chunking import CHARS_PER_SECOND_RANGE, WORDS_PER_SECOND_RANGE, ChunkMode

log = logging.getLogger(__name__)

# Streaming block shapes of the original fork: frames per block and diffusion steps per block.
PERFORMANCE_PRESETS: dict[str, tuple[list[int], list[int]]] = {
    "default": ([32, 128, 480], [8, 15, 20]),
    "low_mid": ([32, 128, 480], [8, 10, 15]),
    "low": ([32, 64, 272, 272], [8, 10, 15, 15]),
    "equal": ([213, 213, 214], [15, 15, 15]),
}
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def _preset_name(value: str) -> str:
    """A preset as named in a variable: case, spaces and `-` or `_` do not matter."""
    return value.strip().lower().replace("-", "_")


class Settings(BaseSettings):
    """All server settings. Field names map to ECHO_<NAME> (PORT has no prefix)."""

    # (no setting means "forever" by inf: an infinite timeout or length overflowed later, in a thread)
    model_config = SettingsConfigDict(env_prefix="ECHO_", case_sensitive=False, extra="ignore", allow_inf_nan=False)

    host: str = "0.0.0.0"
    # ECHO_PORT first: the image sets PORT, and an operator's ECHO_* variable must not be ignored in it
    port: int = Field(8000, ge=1, le=65535, validation_alias=AliasChoices("ECHO_PORT", "PORT"))

    model_repo: str = "jordand/echo-tts-base"
    fish_repo: str = "jordand/fish-s1-dac-min"
    device: str = "auto"  # auto: CUDA when available, else the CPU (with a warning)
    fish_device: str | None = None  # defaults to `device`
    model_dtype: str = "bfloat16"
    fish_dtype: str = "float32"
    compile: bool | None = None  # unset: on when the model runs on CUDA (eager if it fails there), off on the CPU
    static_shapes: bool | None = None  # pad steps to fixed shapes; unset: on with ECHO_COMPILE
    cuda_graphs: bool | None = None  # replay static steps as CUDA graphs; unset: on when compiling on CUDA
    compile_ae: bool = True
    compile_lora_only: bool = False  # accepted for compatibility; there is no LoRA support
    cache_dir: Path = Path("/tmp")
    cache_version: str = "v1_0"
    cache_speaker_on_gpu: bool = False
    speaker_cache_size: int = Field(32, ge=1)
    speaker_kv_cache_size: int = Field(8, ge=0)  # voices whose speaker keys/values stay on the model device
    debug_logs: bool = False

    chunking: bool = True
    chunk_mode: ChunkMode = "independent"  # continue: each chunk continues the last
    normalize_exclamation: bool = True  # a single "!" becomes ".", a run of them one "!" (as the fork)
    vad_reroll_enabled: bool = False  # sample a block again while its audio holds a long silence
    vad_silence_threshold_ms: float = Field(1000.0, gt=0)
    vad_max_rerolls: int = Field(3, ge=0, le=20)
    chunk_chars_per_second: float = Field(14.0, ge=CHARS_PER_SECOND_RANGE[0], le=CHARS_PER_SECOND_RANGE[1])
    chunk_words_per_second: float = Field(2.7, ge=WORDS_PER_SECOND_RANGE[0], le=WORDS_PER_SECOND_RANGE[1])
    max_speaker_latent_length: int = Field(6400, ge=4, le=6400)
    folder_support: bool = True
    voice_dirs: Annotated[list[Path], NoDecode] = [Path("audio_prompts")]  # ':'-separated
    voice_aliases: Annotated[dict[str, str], NoDecode] = {}  # "alloy=alice,nova=bob": names for voices
    default_voice: str | None = None  # for OpenAI's built-in voice names that have no alias
    default_response_format: AudioFormat | None = None
    voice_uploads: bool | None = None  # POST /v1/audio/voices; unset: on when ECHO_API_KEY is set
    voice_upload_dir: Path | None = None  # where uploaded voices are stored; unset: the first voice directory
    warmup_voice: str | None = None
    warmup_text: str = "[S1] Warmup compile run."
    warmup: bool = True  # run the warm-up generations before reporting ready
    performance_preset: str = "default"
    num_steps_nonstream: int = Field(20, ge=1, le=100)
    adaptive_steps: bool = False  # under a predicted underrun, blocks that start take fewer diffusion steps
    adaptive_steps_floor: str = "low_mid"  # the preset whose steps are the fewest a block is given

    output_sample_rate: int | None = Field(None, ge=MIN_OUTPUT_RATE, le=MAX_OUTPUT_RATE)  # unset: by model (speech_request)
    max_input_chars: int = Field(4096, ge=1)
    max_body_bytes: int = Field(16 * 1024 * 1024, ge=1024)  # larger request bodies get 413
    max_voice_bytes: int = Field(10 * 1024 * 1024, ge=1024)  # an inline (base64) or uploaded voice, decoded
    max_voice_seconds: float = Field(300.0, gt=0)  # an inline or uploaded voice's duration (longer: 400)
    max_chunks: int = Field(32, ge=1)  # text chunks (~30 s each) one request may ask for
    request_timeout: float = Field(600.0, ge=0)  # seconds of generation per request; 0 = unlimited
    cors_origins: Annotated[list[str], NoDecode] = []  # empty: CORS off
    log_json: bool = False
    shutdown_grace: float = Field(30.0, ge=0)  # seconds SIGTERM waits for streams in flight
    max_active: int = Field(8, ge=1)  # requests generated together, batched into shared forward passes
    max_queue: int = Field(16, ge=0)  # requests that may wait for a free slot; more get 429
    ws_max_queue: int = Field(32, ge=1)  # segments one WebSocket may have queued; more get an error message
    ws_max_frame_bytes: int = Field(32 * 1024, ge=1024, le=1024 * 1024, multiple_of=2)  # one audio message, whole samples
    # hostile or stalled clients (SECURITY.md): a request's headers must be complete within
    # read_timeout of its first byte and its body may pause at most that long; a client that takes no
    # audio for send_timeout is dropped; a job generates at most max_ahead_seconds of audio more than
    # its client has taken, then waits outside the batch
    read_timeout: float = Field(15.0, gt=0)
    max_header_bytes: int = Field(32 * 1024, ge=1024, le=1024 * 1024)  # request line + headers; larger: 431
    send_timeout: float = Field(30.0, ge=0.1)
    max_ahead_seconds: float = Field(8.0, gt=0)
    # whole files (stream=false) held at once, in all: being written or waiting for their clients (memory, then TMPDIR)
    max_whole_files_bytes: int = Field(4 << 30, ge=1 << 20)
    public_docs: bool | None = None  # /docs and /openapi.json without a key; unset: only when no ECHO_API_KEY
    public_voice_list: bool = False  # the model and voice lists without a key (Open WebUI asks for them without)
    api_key: str | None = None
    # sent as X-Echo-Replica on every response (Ray Serve sets it per replica): printable ASCII
    replica_name: str | None = Field(None, pattern=r"^[!-~]([ -~]{0,198}[!-~])?$")

    @field_validator("voice_dirs", mode="before")
    @classmethod
    def _split_dirs(cls, value):
        if isinstance(value, str):  # (spaces around an item aside, as in the other lists: "/a: /b")
            return [Path(p.strip()) for p in value.split(":") if p.strip()]
        return value

    @field_validator("voice_aliases", mode="before")
    @classmethod
    def _split_aliases(cls, value):
        if not isinstance(value, str):
            return value
        pairs = [item.split("=") for item in value.split(",") if item.strip()]
        if any(len(pair) != 2 or not pair[0].strip() or not pair[1].strip() for pair in pairs):
            raise ValueError("expected alias=voice pairs separated by commas, e.g. alloy=alice,nova=bob")
        return {alias.strip(): voice.strip() for alias, voice in pairs}

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _split_origins(cls, value):
        if isinstance(value, str):
            return [o.strip() for o in value.split(",") if o.strip()]
        return value

    @field_validator("model_dtype", "fish_dtype")
    @classmethod
    def _known_dtype(cls, value: str) -> str:
        if value.lower() not in DTYPES:
            raise ValueError(f"expected one of {sorted(DTYPES)}")
        return value.lower()

    @field_validator("device", "fish_device")
    @classmethod
    def _known_device(cls, value: str | None) -> str | None:
        """auto, cpu, cuda or cuda:N (the devices this server runs on), spaces and case aside."""
        if value is None:
            return None
        value = value.strip().lower()
        if value == "auto" or re.fullmatch(r"(cpu|cuda)(:[0-9]+)?", value):
            return value
        raise ValueError("expected 'auto', 'cpu', 'cuda' or 'cuda:N'")

    @field_validator("api_key")
    @classmethod
    def _holds_a_key(cls, value: str | None) -> str | None:
        """A set ECHO_API_KEY that names no key (",") must not leave the server open."""
        if value is not None and not [k for k in value.split(",") if k.strip()]:
            raise ValueError("names no key: give one or more keys separated by commas, or leave it unset")
        if value is not None and not all(" " <= ch <= "~" for ch in value):
            raise ValueError("keys are printable ASCII: a header carries bytes, and a key with other characters "
                             "would match no client's Authorization header")
        return value

    @field_validator("port", mode="before")
    @classmethod
    def _blank_port_is_unset(cls, value):
        """A blank ECHO_PORT (compose's `${ECHO_PORT:-}`) is unset: PORT, then the default."""
        if isinstance(value, str) and not value.strip():
            return os.environ.get("PORT", "").strip() or cls.model_fields["port"].default
        return value

    @field_validator("warmup_voice", "api_key", "default_voice", "default_response_format", "replica_name",
                     "cache_dir", "voice_upload_dir", "compile", "static_shapes", "cuda_graphs", "voice_uploads",
                     "public_docs", "output_sample_rate", mode="before")
    @classmethod
    def _blank_is_unset(cls, value, info):
        """A blank value is the default (for a path, not the working directory: Path('') is '.'; for an
        on/off setting whose default is unset, unset, as compose's `${ECHO_COMPILE:-}` gives it)."""
        return cls.model_fields[info.field_name].default if isinstance(value, str) and not value.strip() else value

    @field_validator("adaptive_steps_floor")
    @classmethod
    def _known_preset(cls, value: str) -> str:
        name = _preset_name(value)
        if name not in PERFORMANCE_PRESETS:
            raise ValueError(f"expected one of the presets {sorted(PERFORMANCE_PRESETS)}")
        return name

    @field_validator("performance_preset")
    @classmethod
    def _preset_or_default(cls, value: str) -> str:
        """ECHO_PERFORMANCE_PRESET, normalised; an unknown preset falls back to default (warned once, at load)."""
        name = _preset_name(value)
        if name not in PERFORMANCE_PRESETS:
            log.warning("unknown ECHO_PERFORMANCE_PRESET %r; using 'default'", value)
            name = "default"
        return name

    @model_validator(mode="after")
    def _resolve_devices(self) -> Settings:
        """`auto` becomes cuda or cpu; an explicit CUDA device on a machine without one is an error."""
        cuda = torch.cuda.is_available()
        if self.device == "auto":
            self.device = "cuda" if cuda else "cpu"
            if not cuda:
                log.warning("no CUDA device: generating on the CPU, which is very slow (ECHO_DEVICE=auto)")
        if self.fish_device == "auto":
            self.fish_device = None
        for name, value in (("ECHO_DEVICE", self.device), ("ECHO_FISH_DEVICE", self.fish_device)):
            if value is not None and value.startswith("cuda") and not cuda:
                raise ValueError(f"{name}={value}, but torch {torch.__version__} sees no CUDA device: "
                                 f"set {name}=cpu or auto, or install a CUDA build of torch")
        return self

    @model_validator(mode="after")
    def _somewhere_for_voices(self) -> Settings:
        if not self.voice_dirs and self.voice_upload_dir is None:
            raise ValueError("ECHO_VOICE_DIRS lists no directory and ECHO_VOICE_UPLOAD_DIR is unset: name at "
                             "least one, uploaded voices need a place")
        return self

    @model_validator(mode="after")
    def _compile_needs_static_shapes(self) -> Settings:
        for name, value in (("ECHO_COMPILE", self.compile), ("ECHO_CUDA_GRAPHS", self.cuda_graphs)):
            if value and self.static_shapes is False:
                raise ValueError(f"{name} needs static shapes: unset ECHO_STATIC_SHAPES or set it to 1")
        return self

    @property
    def compiles(self) -> bool:
        """Whether the decoder, text encoder, latent-prefix encoder and streaming decoder are
        compiled: ECHO_COMPILE, or unset, the fast path on CUDA when the warm-up runs (it compiles
        and captures every shape before the first request) and ECHO_STATIC_SHAPES=0 does not ask
        for exact eager batching."""
        if self.compile is None:
            return self.torch_device.type == "cuda" and self.static_shapes is not False and self.warmup
        return self.compile

    @property
    def compiles_ae(self) -> bool:
        """Whether the autoencoder's voice encoder is compiled: ECHO_COMPILE_AE, on CUDA only."""
        return self.compile_ae and self.fish_device_name.startswith("cuda")

    @property
    def fast_path_by_default(self) -> bool:
        """Compiling with none of ECHO_COMPILE, ECHO_CUDA_GRAPHS and ECHO_STATIC_SHAPES set: a fast
        path that fails to start gives way to the eager one (runtime.load_runtime) instead of
        stopping the server. A fast path asked for fails loudly."""
        return self.compile is None and self.cuda_graphs is None and self.static_shapes is None and self.compiles

    @property
    def replays_graphs(self) -> bool:
        """Whether static-shape steps replay as CUDA graphs, and (compiled) a lone stream's decoder
        pieces: ECHO_CUDA_GRAPHS, or unset, whenever they are compiled on CUDA."""
        if self.cuda_graphs is None:
            return self.compiles and self.torch_device.type == "cuda"
        return self.cuda_graphs

    @property
    def use_static_shapes(self) -> bool:
        """Whether diffusion steps run at fixed, padded shapes (batched_steps.StaticSteps): what
        compiled graphs need, and only they. Eager, padding only costs memory and time (measured on
        an H100, 2026-11-22: 64 streams' padded caches did not fit in 80 GB)."""
        if self.static_shapes is None:  # (CUDA graphs asked for on CUDA replay static shapes: they imply them)
            return self.compiles or (self.cuda_graphs is True and self.torch_device.type == "cuda")
        return self.static_shapes

    @property
    def torch_device(self) -> torch.device:
        """The model device (ECHO_DEVICE)."""
        return torch.device(self.device)

    @property
    def torch_model_dtype(self) -> torch.dtype:
        return DTYPES[self.model_dtype]

    @property
    def torch_fish_dtype(self) -> torch.dtype:
        return DTYPES[self.fish_dtype]

    @property
    def fish_device_name(self) -> str:
        return self.fish_device or self.device

    @property
    def stream_preset(self) -> tuple[list[int], list[int]]:
        """(block sizes, steps) for streaming requests."""
        blocks, steps = PERFORMANCE_PRESETS[self.performance_preset]
        return list(blocks), list(steps)

    @property
    def uploads_enabled(self) -> bool:
        """Voice uploads: as ECHO_VOICE_UPLOADS says, else only on a server that needs an API key."""
        return self.voice_uploads if self.voice_uploads is not None else bool(self.api_keys)

    @property
    def upload_dir(self) -> Path:
        return self.voice_upload_dir or self.voice_dirs[0]

    @property
    def api_keys(self) -> list[str]:
        return [k.strip() for k in (self.api_key or "").split(",") if k.strip()]

    def accepts_key(self, token: str | None) -> bool:
        """Whether `token` is one of the API keys (every key compared, in constant time); with no
        ECHO_API_KEY, any caller is accepted."""
        keys = self.api_keys
        matches = [hmac.compare_digest((token or "").encode(), key.encode()) for key in keys]  # no short cut
        return not keys or any(matches)


class ConfigError(SystemExit):
    """Startup stops with a message naming the malformed variable."""


def load_settings(**overrides) -> Settings:
    """Read the environment once; a malformed value raises ConfigError naming the variable."""
    try:
        return Settings(**overrides)
    except ValidationError as e:
        raise config_error(e, _variable) from None


def _variable(field: str) -> str:
    """The environment variable of a settings field (ECHO_PORT wins over PORT, as pydantic reads them)."""
    if field.lower() in ("port", "echo_port"):
        return "ECHO_PORT" if os.environ.get("ECHO_PORT", "").strip() else "PORT"
    return f"ECHO_{field.upper()}"


def config_error(error: ValidationError, variable: Callable[[str], str]) -> ConfigError:
    """A settings class's validation error as one message, each problem naming its variable
    (`variable` maps a field to it)."""
    lines = []
    for err in error.errors():
        if not err["loc"]:  # a rule across variables; its message names them
            lines.append(err["msg"].removeprefix("Value error, "))
            continue
        lines.append(f"{variable(str(err['loc'][0]))}: {err['msg']} (got {err.get('input')!r})")
    return ConfigError("invalid configuration:\n  " + "\n  ".join(lines))
