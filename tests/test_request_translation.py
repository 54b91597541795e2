"""A request's options translate themselves into the engine's job: a pure function of the options
and the server's settings (no models), every setting declared once (its annotation says where it
goes), and the rules between settings checked in one place."""

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, ClassVar

import pytest
from pydantic import Field, ValidationError

import engine as eng
from engine import EarlyStop
from inference import SamplerSettings
from settings import load_settings
from speech_request import SAMPLER, GenerationOptions, Into, RequestError, SpeechRequest, request_error
from voices import SpeakerCache

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()
SETTINGS = load_settings(chunk_mode="independent", chunking=True)
TEXT = "Hello there. This is a test of the options."


def options(**fields) -> GenerationOptions:
    return GenerationOptions(input=TEXT, voice="none", **fields)


def test_default_options_become_the_presets_job():
    stream, whole = options(seed=7).to_job(SETTINGS), options(seed=7, stream=False).to_job(SETTINGS)
    blocks, steps = SETTINGS.stream_preset
    assert (stream.first_shape.block_sizes, stream.first_shape.num_steps) == (tuple(blocks), tuple(steps))
    assert stream.later_shape == whole.first_shape == whole.later_shape
    assert whole.first_shape.num_steps == (SETTINGS.num_steps_nonstream,)
    assert stream.sampler == SamplerSettings(num_steps=0, cfg_scale_text=3.0, cfg_scale_speaker=8.0,
                                             cfg_min_t=0.5, cfg_max_t=1.0)
    assert stream.early_stop == EarlyStop() and stream.seed == 7 and stream.chunk_mode == "independent"
    assert stream.chunks == (TEXT,) and stream.speaker is None


def test_the_translation_is_pure():
    """Same options and settings, same job (the service adds only the prepared voice)."""
    assert options(seed=3, block_sizes=[16, 32]).to_job(SETTINGS) == options(seed=3, block_sizes=[16, 32]).to_job(SETTINGS)


def test_a_missing_or_negative_seed_draws_a_fresh_one():
    seeds = {options().to_job(SETTINGS).seed, options(seed=-1).to_job(SETTINGS).seed}
    assert len(seeds) == 2 and all(s >= 0 for s in seeds)


# a value (within its limits, not its default) for every marked setting; a setting marked Into(...)
# that is missing here fails the next test until it gets one
MARKED_VALUES = dict(cfg_scale_text=2.5, cfg_scale_speaker=6.0, cfg_min_t=0.25, cfg_max_t=0.75,
                     truncation_factor=0.8, rescale_k=1.5, rescale_sigma=2.5, speaker_kv_scale=1.25,
                     speaker_kv_min_t=0.5, speaker_kv_max_layers=12, guidance_mode="apg",
                     early_stop_on_zero=False, zero_eps=0.05, zero_tail_frames=8, zero_tail_min_frac=0.5,
                     chunk_target_seconds=12.0, chunk_min_seconds=6.0, chunk_max_seconds=18.0,
                     chunk_chars_per_second=20.0, chunk_words_per_second=3.5)


def _destinations() -> dict[str, Into]:
    return {name: into for name, field in GenerationOptions.model_fields.items()
            for into in field.metadata if isinstance(into, Into)}


def test_every_marked_setting_reaches_its_destination():
    assert set(_destinations()) == set(MARKED_VALUES)
    chunked = options(**MARKED_VALUES)
    job = chunked.to_job(SETTINGS)
    where = {"sampler": job.sampler, "early_stop": job.early_stop, "chunking": chunked.chunk_settings(SETTINGS)}
    for name, into in _destinations().items():
        assert getattr(where[into.target], into.name or name) == MARKED_VALUES[name], name


def test_unset_optional_settings_take_the_servers_defaults():
    server = load_settings(chunk_chars_per_second=11.0, chunk_words_per_second=2.0,
                           chunk_mode="continue", chunking=False)
    chunking = options().chunk_settings(server)
    assert (chunking.chars_per_second, chunking.words_per_second) == (11.0, 2.0)
    assert options().to_job(server).chunk_mode == "continue"
    assert options(chunk_mode="independent").to_job(server).chunk_mode == "independent"
    long = "This sentence is here to make the input long. " * 30
    with pytest.raises(RequestError, match="longer than one generation") as e:
        GenerationOptions(input=long, voice="none").to_job(server)
    assert e.value.param == "input"
    assert len(GenerationOptions(input=long, voice="none", chunking_enabled=True).to_job(server).chunks) > 1


@pytest.mark.parametrize("fields, param, message", [
    (dict(num_steps=[4, 4]), "num_steps", "num_steps has 2 entries but there are 3 blocks"),
    (dict(block_sizes=[16, 16], truncation_factor=[0.8]), "truncation_factor", "1 entries but there are 2 blocks"),
    (dict(block_sizes=[4] * 5, num_steps=100), "num_steps", "500 diffusion steps in all"),
])
def test_rules_between_settings_name_the_field(fields, param, message):
    with pytest.raises(RequestError, match=re.escape(message)) as e:
        options(**fields).to_job(SETTINGS)
    assert e.value.param == param and e.value.status == 400


@pytest.mark.parametrize("chunking", [True, False])
def test_contradicting_chunk_lengths_are_refused_as_the_request_is_read(chunking):
    """Before any queue slot is taken (a full server still answers 400, not 429), chunking on or off."""
    with pytest.raises(ValidationError) as caught:
        SpeechRequest(input=TEXT, voice="none", chunk_min_seconds=30, chunk_max_seconds=10, chunking_enabled=chunking)
    error = request_error(caught.value.errors())
    assert error.param == "chunk_min_seconds" and "must not exceed" in str(error) and error.status == 400


def test_the_servers_own_warm_up_text_is_taken_as_it_is():
    """The warm-up runs whatever ECHO_MAX_INPUT_CHARS and chunking say about requests."""
    strict = load_settings(max_input_chars=4, chunking=False)
    text = "A warm-up text longer than four characters."
    with pytest.raises(RequestError):
        GenerationOptions(input=text, voice="none").to_job(strict)
    assert GenerationOptions(input=text, voice="none").to_job(strict, None, (text,)).chunks == (text,)


def test_the_servers_text_limits_name_the_input():
    for text, message in (("x" * (SETTINGS.max_input_chars + 1), "characters; the limit is"), ("   ", "empty")):
        with pytest.raises(RequestError, match=message) as e:
            GenerationOptions(input=text, voice="none").to_job(SETTINGS)
        assert e.value.param == "input"
    few = load_settings(max_chunks=1)
    with pytest.raises(RequestError, match="ECHO_MAX_CHUNKS"):
        GenerationOptions(input="A sentence of a few words. " * 40, voice="none", chunk_target_seconds=3,
                          chunk_min_seconds=2, chunk_max_seconds=4).to_job(few)


def test_a_requests_lines_are_where_its_chunks_end_and_no_chunk_holds_a_line_break():
    lines = "\n".join(f"Line number {i} of the song goes on and on" for i in range(1, 41))
    chunks = GenerationOptions(input=lines, voice="none").to_job(SETTINGS).chunks
    assert len(chunks) > 1 and all(c.endswith("on and on") and "\n" not in c for c in chunks)
    whole = GenerationOptions(input="Roses are red\r\nviolets are blue", voice="none", chunking_enabled=False)
    assert whole.to_job(SETTINGS).chunks == ("Roses are red violets are blue",)


# ---- a made-up setting, declared once --------------------------------------------------------


@dataclass(frozen=True)
class WarmSampler(SamplerSettings):
    warmth: float = 0.0  # the sampler's own new setting


class WarmRequest(SpeechRequest):
    sampler_type: ClassVar = WarmSampler
    warmth: Annotated[float, SAMPLER] = Field(0.25, ge=0, le=1)  # the one declaration the server needs


def test_a_made_up_setting_declared_once_reaches_the_sampler(tiny_model, tiny_fish, tiny_pca, monkeypatch):
    """Declared once (default, limits, destination), the setting is validated, reaches the job and
    is what the sampler is called with; nothing else in the server changes."""
    request = WarmRequest(input="Hi.", voice="none", seed=1, warmth=0.75, block_sizes=[4], num_steps=1, stream=False)
    job = request.generation_options().to_job(SETTINGS)
    assert isinstance(job.sampler, WarmSampler) and job.sampler.warmth == 0.75
    assert WarmRequest(input="Hi.", voice="none").generation_options().to_job(SETTINGS).sampler.warmth == 0.25

    with pytest.raises(ValidationError) as caught:
        WarmRequest(input="Hi.", voice="none", warmth=3)
    error = request_error(caught.value.errors())
    assert error.param == "warmth" and "less than or equal to 1" in str(error)

    seen = []
    real = eng.blockwise_steps
    monkeypatch.setattr(eng, "blockwise_steps", lambda *args, **kw: seen.append(args[5]) or real(*args, **kw))
    engine = eng.SpeechEngine(tiny_model, tiny_fish, tiny_pca, SpeakerCache(2))
    list(engine.generate(job))
    assert seen and all(isinstance(s, WarmSampler) and s.warmth == 0.75 for s in seen)


def test_generation_options_carry_every_generation_setting_of_the_request():
    """SpeechRequest's generation settings are the options' (a subclass's new ones too)."""
    request = WarmRequest(input="Hi.", voice={"id": "alice"}, warmth=0.5, cfg_scale_text=1.5)
    chosen = request.generation_options()
    assert isinstance(chosen, GenerationOptions) and chosen.voice == "alice"
    assert chosen.cfg_scale_text == 1.5 and chosen.warmth == 0.5


def test_the_readme_documents_every_request_field():
    """The README's table of request fields names each field of the request model."""
    table = README.split("### Request fields", 1)[1].split("\n\n", 2)[1]
    documented = set(re.findall(r"`([a-z_]+)`", "\n".join(line.split("|")[1] for line in table.splitlines()
                                                            if line.startswith("| `"))))
    fields = set(SpeechRequest.model_fields) - {"extra_body"}
    assert fields - documented == set(), "request fields missing from the README's table"
    assert documented - fields == set(), "README rows naming no request field"


def test_null_for_a_setting_with_a_default_is_that_default(app):
    """Serializers that write unset fields as null (Jackson, System.Text.Json, `speed=None` through an
    SDK) got 400s such as "speed: Input should be a valid number"."""
    nulls = {"speed": None, "stream": None, "stream_format": None, "model": None, "cfg_scale_text": None,
             "extra_body": {"cfg_scale_speaker": None}}
    request = SpeechRequest.model_validate({"input": "Hi.", "voice": "alice", **nulls})
    assert (request.speed, request.stream, request.stream_format, request.model) == (1.0, True, "audio", "echo-tts")
    assert (request.cfg_scale_text, request.cfg_scale_speaker) == (3.0, 8.0)
    r = app.post("/v1/audio/speech", timeout=60, json={"input": "Hi.", "voice": "alice", "response_format": "wav",
                                                       "block_sizes": [8], "num_steps": 1, **nulls})
    assert r.status_code == 200 and r.headers["content-type"] == "audio/wav"
    merged = SpeechRequest.model_validate({"input": "Hi.", "voice": "a", "speed": None, "extra_body": {"speed": 1.5}})
    assert merged.speed == 1.5  # (a top-level null does not hide the value extra_body gives)
    r = app.post("/v1/audio/speech", json={"input": None, "voice": "alice"})  # (a required field is still required)
    assert r.status_code == 400 and r.json()["error"]["param"] == "input"


def test_nulls_and_extra_body_for_the_voice_object_and_the_options_alone():
    """A voice object under extra_body shows through a top-level null; the options alone take a null as
    the default too, and have no extra_body (a request's: ignored there)."""
    request = SpeechRequest.model_validate({"input": "Hi.", "voice": None, "extra_body": {"voice": {"id": "b"}}})
    assert request.voice_name == "b" and request.extra_body is None
    chosen = GenerationOptions.model_validate({"input": "Hi.", "voice": "a", "cfg_scale_text": None, "seed": None,
                                               "extra_body": {"cfg_scale_text": 1.5, "seed": 3}})
    assert (chosen.cfg_scale_text, chosen.seed) == (3.0, None)


def test_a_truncation_factor_list_is_as_long_as_the_blocks_may_be():
    """Any length was parsed and validated (8M entries: 0.5 GB and the event loop for a second) before
    the check against the block count refused it."""
    with pytest.raises(ValidationError) as refused:
        SpeechRequest.model_validate({"input": "Hi.", "voice": "a", "truncation_factor": [1.0] * 65})
    error = request_error(refused.value.errors())
    assert error.param == "truncation_factor" and "has 65 entries; at most 64" in str(error)
