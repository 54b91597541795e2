"""The full-size architecture on synthetic weights in the published layout, against the reference.

This is the proof that the published checkpoints load unchanged (no missing or unexpected tensor)
and compute what the reference computes.
"""

import gc

import pytest
import torch
from safetensors.torch import load_file

import inference as inf
import inference_blockwise as blk
from conftest import REF, assert_close_to_reference

pytestmark = pytest.mark.slow
GOLDEN = load_file(REF / "fullsize_golden.safetensors")
SAMPLER = dict(num_steps=2, cfg_scale_text=3.0, cfg_scale_speaker=5.0, cfg_min_t=0.5, cfg_max_t=1.0,
               truncation_factor=0.8)


@pytest.fixture(scope="module")
def fullsize_model(synthetic_repos):
    model = inf.load_model_from_hf(str(synthetic_repos["echo-tts-base"]), device="cpu", dtype=torch.float32)
    yield model
    del model
    gc.collect()


def _conditioning(model):
    g = GOLDEN
    kv_text = model.get_kv_cache_text(g["dit_text_input_ids"], g["dit_text_mask"])
    kv_speaker = model.get_kv_cache_speaker(g["dit_speaker_latent"])
    return kv_text, kv_speaker


def test_fullsize_forward(fullsize_model):
    g = GOLDEN
    kv_text, kv_speaker = _conditioning(fullsize_model)
    out = fullsize_model(g["dit_x"], g["dit_t"], g["dit_text_mask"], g["dit_speaker_mask"], kv_text, kv_speaker)
    assert_close_to_reference(out, g["dit_out"])


def test_fullsize_forward_with_latent_prefix(fullsize_model):
    g = GOLDEN
    kv_text, kv_speaker = _conditioning(fullsize_model)
    kv_latent = fullsize_model.get_kv_cache_latent(g["dit_prefix"])
    out = fullsize_model(g["dit_blk_x"], g["dit_t"], g["dit_text_mask"], g["dit_speaker_mask"], kv_text, kv_speaker,
                         start_pos=8, kv_cache_latent=kv_latent)
    assert_close_to_reference(out, g["dit_blk_out"])


def test_fullsize_samplers(fullsize_model):
    g = GOLDEN
    args = (fullsize_model, g["dit_speaker_latent"], g["dit_speaker_mask"], g["dit_text_input_ids"],
            g["dit_text_mask"], 11)
    out = inf.sample_euler_cfg_independent_guidances(*args, **SAMPLER, sequence_length=8)
    assert_close_to_reference(out, g["dit_sample_independent"])
    out = blk.sample_blockwise_euler_cfg_independent_guidances(*args, block_sizes=[4, 4], **SAMPLER)
    assert_close_to_reference(out, g["dit_sample_blockwise"])


def test_fullsize_pca_state_loads(synthetic_repos):
    pca = inf.load_pca_state_from_hf(str(synthetic_repos["echo-tts-base"]), device="cpu")
    assert pca.pca_components.shape == (80, 1024) and pca.pca_mean.shape == (1024,)
    assert pca.latent_scale == pytest.approx(1 / 18)
