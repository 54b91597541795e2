"""Samplers against the reference's outputs, plus the semantics the goldens do not cover."""

import pytest
import torch

import inference as inf
import inference_blockwise as blk
from conftest import assert_close_to_reference

PLAIN_KEYS = ("num_steps", "cfg_scale_text", "cfg_scale_speaker", "cfg_min_t", "cfg_max_t")


def _inputs(model, cases, spec):
    tensors, _ = cases
    return (model, tensors["speaker_latent"], tensors["speaker_mask"], tensors["text_input_ids"],
            tensors["text_mask"], spec["seed"])


@pytest.mark.parametrize("name, sampler, extra", [
    ("independent", inf.sample_euler_cfg_independent_guidances, {"sequence_length": 32}),
    ("independent_plain", inf.sample_euler_cfg_independent_guidances, {"sequence_length": 20}),
    ("joint", inf.sample_euler_cfg_joint_unconditional, {"sequence_length": 32}),
    ("apg", inf.sample_euler_cfg_apg_independent, {"sequence_length": 32}),
    ("blockwise", blk.sample_blockwise_euler_cfg_independent_guidances, {"block_sizes": [8, 16], "num_steps": 4}),
    ("blockwise_cont", blk.sample_blockwise_euler_cfg_independent_guidances,
     {"block_sizes": [8], "num_steps": 4, "continuation_latent": "continuation_latent"}),
])
def test_sampler_matches_reference(tiny_model, sampler_cases, name, sampler, extra):
    tensors, spec = sampler_cases
    settings = dict(spec["common"]) if name != "independent_plain" else {k: spec["common"][k] for k in PLAIN_KEYS}
    settings.update({k: tensors[v] if k == "continuation_latent" else v for k, v in extra.items()})
    out = sampler(*_inputs(tiny_model, sampler_cases, spec), **settings)
    assert_close_to_reference(out, tensors[name])


def _settings(spec, **changes):
    common = {**spec["common"], **changes}
    return inf.SamplerSettings(**common)


def test_yielding_generator_gives_exactly_the_sampler_latents(tiny_model, sampler_cases):
    tensors, spec = sampler_cases
    args = _inputs(tiny_model, sampler_cases, spec)
    common = {**spec["common"], "num_steps": [3, 5, 2]}
    whole = blk.sample_blockwise_euler_cfg_independent_guidances(*args, block_sizes=[8, 12, 4], **common)
    settings = _settings(spec, num_steps=0)
    blocks = list(blk.iter_blockwise(*args, block_sizes=[8, 12, 4], num_steps=[3, 5, 2], settings=settings))
    assert [b.shape[1] for b in blocks] == [8, 12, 4]
    assert torch.equal(torch.cat(blocks, dim=1), whole)


def test_per_block_step_lists(tiny_model, sampler_cases):
    tensors, spec = sampler_cases
    args = _inputs(tiny_model, sampler_cases, spec)
    common = dict(spec["common"])
    common.pop("num_steps")
    same = blk.sample_blockwise_euler_cfg_independent_guidances(*args, block_sizes=[8, 16], num_steps=4, **common)
    as_list = blk.sample_blockwise_euler_cfg_independent_guidances(*args, block_sizes=[8, 16], num_steps=[4, 4],
                                                                   **common)
    assert torch.equal(same, as_list)
    different = blk.sample_blockwise_euler_cfg_independent_guidances(*args, block_sizes=[8, 16], num_steps=[4, 2],
                                                                     **common)
    assert torch.equal(different[:, :8], same[:, :8]) and not torch.equal(different[:, 8:], same[:, 8:])
    with pytest.raises(ValueError, match="2 blocks"):
        blk.sample_blockwise_euler_cfg_independent_guidances(*args, block_sizes=[8, 16], num_steps=[4], **common)


@pytest.fixture()
def model_calls(monkeypatch):
    """Records what every model evaluation of a sampler saw."""
    calls = []
    run = inf.ModelCall.run

    def recording_run(call, model):
        calls.append({
            "batch": call.x.shape[0],
            "text": call.text_mask.any(dim=1).tolist(),
            "speaker": call.speaker_mask.any(dim=1).tolist(),
            "speaker_k0": call.kv_speaker[0][0][:1].clone(),
            "speaker_k1": call.kv_speaker[1][0][:1].clone(),
        })
        return run(call, model)

    monkeypatch.setattr(inf.ModelCall, "run", recording_run)
    return calls


def test_alternating_guidance_uses_one_unconditional_branch_per_step(tiny_model, sampler_cases, model_calls):
    tensors, spec = sampler_cases
    settings = {k: spec["common"][k] for k in PLAIN_KEYS} | {"num_steps": 8, "cfg_min_t": 0.0}
    out = inf.sample_euler_cfg_alternating(*_inputs(tiny_model, sampler_cases, spec), **settings,
                                           sequence_length=16)
    assert torch.isfinite(out).all()
    assert [c["batch"] for c in model_calls] == [2] * 8
    # conditional row first; then text dropped on even guided steps, speaker dropped on odd ones
    expected = [([True, False], [True, True]), ([True, True], [True, False])] * 4
    assert [(c["text"], c["speaker"]) for c in model_calls] == expected


def test_alternating_combines_with_the_dropped_branch_scale():
    v_cond, v_uncond = torch.full((1, 2, 80), 2.0), torch.full((1, 2, 80), 1.0)
    text_step = inf.combine_guidance("alternating", [v_cond, v_uncond], (inf.COND, inf.NO_TEXT), 3.0, 8.0)
    speaker_step = inf.combine_guidance("alternating", [v_cond, v_uncond], (inf.COND, inf.NO_SPEAKER), 3.0, 8.0)
    assert torch.allclose(text_step, torch.full_like(v_cond, 2 + 3 * 1))
    assert torch.allclose(speaker_step, torch.full_like(v_cond, 2 + 8 * 1))


def test_unknown_guidance_mode_is_rejected():
    with pytest.raises(ValueError, match="unknown guidance mode"):
        inf.guidance_branches("bogus", 0)


@pytest.mark.parametrize("min_t", [None, 0.6])
def test_speaker_kv_scaling_never_compounds_across_blocks(tiny_model, sampler_cases, model_calls, min_t):
    tensors, spec = sampler_cases
    settings = _settings(spec, speaker_kv_scale=2.0, speaker_kv_max_layers=1, speaker_kv_min_t=min_t,
                         cfg_min_t=2.0)  # no guidance: batch 1, one call per step
    args = _inputs(tiny_model, sampler_cases, spec)
    list(blk.iter_blockwise(*args, block_sizes=[4, 4, 4], num_steps=4, settings=settings))
    plain = tiny_model.get_kv_cache_speaker(tensors["speaker_latent"])
    schedule = inf.time_schedule(4)
    assert len(model_calls) == 12
    for i, call in enumerate(model_calls):
        t = schedule[i % 4]
        scaled = min_t is None or t >= min_t
        factor = 2.0 if scaled else 1.0
        assert torch.allclose(call["speaker_k0"], plain[0][0][:1] * factor), (i, t)
        assert torch.allclose(call["speaker_k1"], plain[1][0][:1]), "layers past max_layers stay unscaled"


def test_sampling_without_a_voice(tiny_model, sampler_cases):
    tensors, spec = sampler_cases
    speaker, mask = inf.no_speaker(4, "cpu", torch.float32)
    out = inf.sample_euler_cfg_independent_guidances(
        tiny_model, speaker, mask, tensors["text_input_ids"], tensors["text_mask"], 0,
        **{k: spec["common"][k] for k in PLAIN_KEYS}, sequence_length=12)
    assert out.shape == (1, 12, 80) and torch.isfinite(out).all()


def test_same_seed_same_latents_different_seed_different(tiny_model, sampler_cases):
    tensors, spec = sampler_cases
    args = list(_inputs(tiny_model, sampler_cases, spec))
    settings = {k: spec["common"][k] for k in PLAIN_KEYS}
    a = inf.sample_euler_cfg_joint_unconditional(*args, **settings, sequence_length=8)
    torch.manual_seed(123)  # the global RNG must not matter
    b = inf.sample_euler_cfg_joint_unconditional(*args, **settings, sequence_length=8)
    args[-1] += 1
    c = inf.sample_euler_cfg_joint_unconditional(*args, **settings, sequence_length=8)
    assert torch.equal(a, b) and not torch.equal(a, c)
