"""EchoDiT against the reference's tiny-model outputs, and the strictness of its loader."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from checkpoint import CheckpointError
from conftest import REF, assert_close_to_reference
from inference import load_model_from_hf
from model import EchoDiT, is_blockwise_parameter

CASES = load_file(REF / "tiny_echo_dit_cases.safetensors")


def test_tiny_caches_match_reference(tiny_model):
    c = CASES
    kv_text = tiny_model.get_kv_cache_text(c["text_input_ids"], c["text_mask"])
    kv_speaker = tiny_model.get_kv_cache_speaker(c["speaker_latent"])
    kv_latent = tiny_model.get_kv_cache_latent(c["prefix_latent"])
    assert_close_to_reference(kv_text[-1][0], c["kv_text_k_last"])
    assert_close_to_reference(kv_text[-1][1], c["kv_text_v_last"])
    assert_close_to_reference(kv_speaker[-1][0], c["kv_speaker_k_last"])
    assert_close_to_reference(kv_speaker[-1][1], c["kv_speaker_v_last"])
    assert_close_to_reference(kv_latent[-1][0], c["kv_latent_k_last"])


def test_tiny_forward_matches_reference(tiny_model):
    c = CASES
    kv_text = tiny_model.get_kv_cache_text(c["text_input_ids"], c["text_mask"])
    kv_speaker = tiny_model.get_kv_cache_speaker(c["speaker_latent"])
    out = tiny_model(c["fwd_x"], c["fwd_t"], c["text_mask"], c["speaker_mask"], kv_text, kv_speaker)
    assert out.dtype == torch.float32
    assert_close_to_reference(out, c["fwd_out"])

    kv_latent = tiny_model.get_kv_cache_latent(c["prefix_latent"])
    out = tiny_model(c["blk_x"], c["fwd_t"], c["text_mask"], c["speaker_mask"], kv_text, kv_speaker,
                     start_pos=12, kv_cache_latent=kv_latent)
    assert_close_to_reference(out, c["blk_out"])


def test_fully_masked_conditioning_gives_finite_output(tiny_model):
    c = CASES
    text_mask = torch.zeros_like(c["text_mask"])
    kv_text = tiny_model.get_kv_cache_text(c["text_input_ids"], text_mask)
    kv_speaker = tiny_model.get_kv_cache_speaker(c["speaker_latent"])
    out = tiny_model(c["fwd_x"], c["fwd_t"], text_mask, torch.zeros_like(c["speaker_mask"]), kv_text, kv_speaker)
    assert all(torch.isfinite(k).all() for k, _ in kv_text)
    assert torch.isfinite(out).all()


def _copy_repo(src, dst, state=None, config=None):
    dst.mkdir()
    if state is None:
        shutil.copy(src / "pytorch_model.safetensors", dst / "pytorch_model.safetensors")
    else:
        save_file(state, dst / "pytorch_model.safetensors")
    (dst / "config.json").write_text(json.dumps(config if config is not None else json.loads(
        (src / "config.json").read_text())))
    return dst


@pytest.mark.parametrize("defect", ["missing", "unexpected", "misshaped"])
def test_loader_names_the_offending_tensor(tiny_echo_dir, tmp_path, defect):
    state = load_file(tiny_echo_dir / "pytorch_model.safetensors")
    name = "blocks.1.attention.wk_text.weight"
    if defect == "missing":
        del state[name]
    elif defect == "unexpected":
        name = "blocks.1.attention.surprise.weight"
        state[name] = torch.zeros(3)
    else:
        state[name] = torch.zeros(5, 5)
    repo = _copy_repo(tiny_echo_dir, tmp_path / "bad", state)
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
        load_model_from_hf(str(repo), device="cpu", dtype=torch.float32)


def test_config_json_overrides_published_defaults_and_unknown_keys_warn(tiny_echo_dir, tmp_path):
    config = json.loads((tiny_echo_dir / "config.json").read_text()) | {"not_a_key": 1}
    repo = _copy_repo(tiny_echo_dir, tmp_path / "cfg", config=config)
    with pytest.warns(UserWarning, match="not_a_key"):
        model = load_model_from_hf(str(repo), device="cpu", dtype=torch.float32)
    assert len(model.blocks) == config["num_layers"]


def test_missing_weights_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="pytorch_model.safetensors"):
        load_model_from_hf(str(tmp_path), device="cpu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_loads_in_both_dtypes(tiny_echo_dir, dtype):
    model = load_model_from_hf(str(tiny_echo_dir), device="cpu", dtype=dtype)
    assert model.dtype == dtype and not model.training
    assert all(not p.requires_grad for p in model.parameters())
    c = CASES
    kv_text = model.get_kv_cache_text(c["text_input_ids"], c["text_mask"])
    kv_speaker = model.get_kv_cache_speaker(c["speaker_latent"].to(dtype))
    out = model(c["fwd_x"].to(dtype), c["fwd_t"].to(dtype), c["text_mask"], c["speaker_mask"], kv_text, kv_speaker)
    assert out.dtype == torch.float32
    tolerance = 1e-4 if dtype == torch.float32 else 0.1
    assert_close_to_reference(out, CASES["fwd_out"], rel=tolerance)


def test_delete_blockwise_modules(tiny_echo_dir):
    model = load_model_from_hf(str(tiny_echo_dir), device="cpu", dtype=torch.float32, delete_blockwise_modules=True)
    names = set(model.state_dict())
    assert not any(is_blockwise_parameter(n) for n in names)
    full = set(load_file(tiny_echo_dir / "pytorch_model.safetensors"))
    assert names == {n for n in full if not is_blockwise_parameter(n)}
    with pytest.raises(RuntimeError, match="blockwise"):
        model.get_kv_cache_latent(CASES["prefix_latent"])


def test_manifest_layout_of_the_published_model():
    """The full-size architecture has exactly the published tensor names and shapes."""
    manifest = json.loads((REF / "echo_dit_manifest.json").read_text())
    with torch.device("meta"):
        model = EchoDiT(**manifest["config"])
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert shapes == {k: v["shape"] for k, v in manifest["tensors"].items()}
    assert sum(v.numel() for v in model.state_dict().values()) == 2_800_742_736
    assert sum(is_blockwise_parameter(k) for k in shapes) == 219


@pytest.mark.parametrize("pieces", [[16], [4, 8, 4], [3, 5, 1, 7], [1] * 9, [6, 10]])
def test_incremental_latent_prefix_equals_encoding_from_scratch(tiny_model, pieces):
    from model import LatentPrefix

    latents = torch.randn(2, sum(pieces), 80, generator=torch.Generator().manual_seed(len(pieces)))
    prefix = LatentPrefix(tiny_model, batch=2)
    done = 0
    for n in pieces:
        prefix.extend(latents[:, done:done + n])
        done += n
        # from scratch: the whole prefix so far, zero-padded to whole patches (as the reference's buffer)
        padded = torch.nn.functional.pad(latents[:, :done], (0, 0, 0, -done % 4))
        scratch = tiny_model.get_kv_cache_latent(padded)
        assert prefix.frames == done and prefix.num_patches == scratch[0][0].shape[1]
        for (k, v), (k_ref, v_ref) in zip(prefix.kv, scratch):
            assert torch.allclose(k, k_ref, atol=1e-5) and torch.allclose(v, v_ref, atol=1e-5)


def test_incremental_prefix_encodes_only_new_frames(tiny_model, monkeypatch):
    from model import LatentPrefix

    seen = []
    extend = type(tiny_model.latent_encoder).extend

    def counting_extend(self, latent, past):
        seen.append(latent.shape[1])
        return extend(self, latent, past)

    monkeypatch.setattr(type(tiny_model.latent_encoder), "extend", counting_extend)
    prefix = LatentPrefix(tiny_model, batch=1)
    for n in (32, 128, 480):
        prefix.extend(torch.randn(1, n, 80))
    assert seen == [32, 128, 480]


@pytest.mark.slow
def test_compiled_model_computes_the_same(tiny_echo_dir):
    """The ECHO_COMPILE path (torch.compile of the decoder and cache builders) on the CPU backend."""
    from inference import compile_model

    model = load_model_from_hf(str(tiny_echo_dir), device="cpu", dtype=torch.float32)
    c = CASES
    kv_text = model.get_kv_cache_text(c["text_input_ids"], c["text_mask"])
    kv_speaker = model.get_kv_cache_speaker(c["speaker_latent"])
    compile_model(model)
    with torch.inference_mode():
        out = model(c["fwd_x"], c["fwd_t"], c["text_mask"], c["speaker_mask"], kv_text, kv_speaker)
    assert_close_to_reference(out, c["fwd_out"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_adaln_table_by_time_gives_each_row_the_bits_it_computes(tiny_echo_dir, dtype):
    """A step's AdaLN modulations depend on t alone: looked up per time from a table, they equal
    computing them from the rows' t tensor, bit for bit, whichever times share the batch."""
    model = load_model_from_hf(str(tiny_echo_dir), device="cpu", dtype=dtype)
    times, rows = [0.999, 0.5, 0.999, 0.2497], [3, 1, 2, 3]
    t = torch.cat([torch.full((n,), time, dtype=torch.float32).to(dtype) for time, n in zip(times, rows)])
    with torch.inference_mode():
        computed = model.modulations(t)
        looked_up = model.timed_modulations(times, rows)
        again = model.timed_modulations(times[::-1], rows[::-1])
    assert computed.shape == looked_up.shape == (len(model.blocks), 2, sum(rows), 1, computed.shape[-1])
    assert torch.equal(looked_up, computed) and len(model._modulation_table) == 3
    assert torch.equal(again, torch.cat([computed[:, :, 6:9], computed[:, :, 4:6], computed[:, :, 3:4],
                                         computed[:, :, 0:3]], dim=2))


def test_the_adaln_table_is_emptied_when_the_weights_change(tiny_echo_dir):
    model = load_model_from_hf(str(tiny_echo_dir), device="cpu", dtype=torch.float32)
    with torch.inference_mode():
        before = model.timed_modulations([0.5], [1])
        state = {k: v * 0.5 if k.startswith("cond_module.") else v for k, v in model.state_dict().items()}
        model.load_state_dict(state)
        after = model.timed_modulations([0.5], [1])
    assert not torch.equal(before, after)
    assert torch.equal(after, model.modulations(torch.tensor([0.5])))


# ---- fused projections (issue 20, item 4) --------------------------------------------------------

def _outputs(model: EchoDiT) -> list[torch.Tensor]:
    """Every cache builder and a forward pass with a latent prefix, of the reference's tiny cases."""
    c = CASES
    with torch.inference_mode():
        kv_text = model.get_kv_cache_text(c["text_input_ids"], c["text_mask"])
        kv_speaker = model.get_kv_cache_speaker(c["speaker_latent"].to(model.dtype))
        kv_latent = model.get_kv_cache_latent(c["prefix_latent"].to(model.dtype))
        out = model(c["blk_x"].to(model.dtype), c["fwd_t"].to(model.dtype), c["text_mask"], c["speaker_mask"],
                    kv_text, kv_speaker, start_pos=12, kv_cache_latent=kv_latent)
    return [t for cache in (kv_text, kv_speaker, kv_latent) for pair in cache for t in pair] + [out]


def _weight_bytes(model: EchoDiT) -> int:
    """Bytes of distinct storage behind the model's parameters and buffers."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for t in [*model.parameters(), *model.buffers()]}
    return sum(storages.values())


FUSED_BOUND = {torch.float32: 1e-6, torch.bfloat16: 1e-2}  # of the largest magnitude (measured: 4e-7 and 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_projections_compute_the_same_values_and_store_nothing_twice(tiny_echo_dir, dtype):
    """q, k, v and gate (and w1|w3, and each key/value pair) as one product: each output column is
    the same dot product, so every cache and the velocity keep their values up to the order a BLAS
    kernel sums them in, which depends on the product's width on some CPUs (float32: a few units in
    the last place on one with AVX-512 FP16; the same bits on the others met, and in bfloat16); the
    stacked weights are the parameters' storage, not a copy, and the checkpoint's names stay."""
    separate = load_model_from_hf(str(tiny_echo_dir), device="cpu", dtype=dtype, fuse_projections=False)
    fused = load_model_from_hf(str(tiny_echo_dir), device="cpu", dtype=dtype)
    assert fused.projections_fused and not separate.projections_fused
    assert fused.blocks[0].attention.fused_groups == ("qkvg", "kv_text", "kv_speaker", "kv_latent")
    for a, b in zip(_outputs(separate), _outputs(fused), strict=True):
        assert a.shape == b.shape
        assert (a.float() - b.float()).abs().max() <= FUSED_BOUND[dtype] * a.float().abs().max()
    assert _weight_bytes(fused) == _weight_bytes(separate)
    assert fused.state_dict().keys() == separate.state_dict().keys()
    qkvg = fused.blocks[0].attention.qkvg
    assert fused.blocks[0].attention.gate.weight.data_ptr() == qkvg[3 * qkvg.shape[1]:].data_ptr()


def test_fused_projections_stay_fused_through_conversion_and_reloading(tiny_echo_dir):
    model = load_model_from_hf(str(tiny_echo_dir), device="cpu", dtype=torch.float32)
    reference = _outputs(load_model_from_hf(str(tiny_echo_dir), device="cpu", dtype=torch.bfloat16))  # (fused)
    model.to(torch.bfloat16)  # converted weight by weight, stacked again: still one storage each
    mlp = model.blocks[1].mlp
    assert mlp.w13.dtype == torch.bfloat16 and mlp.w3.weight.data_ptr() == mlp.w13[mlp.w1.out_features:].data_ptr()
    assert _weight_bytes(model) == _weight_bytes(load_model_from_hf(str(tiny_echo_dir), device="cpu",
                                                                    dtype=torch.bfloat16))
    assert all(torch.equal(a, b) for a, b in zip(reference, _outputs(model), strict=True))
    halved = {k: v * 0.5 for k, v in model.state_dict().items()}
    model.load_state_dict(halved, assign=True)  # new tensors: the stacks are built from them
    assert torch.equal(model.blocks[0].attention.qkvg[:model.blocks[0].attention.wq.out_features],
                       halved["blocks.0.attention.wq.weight"])
    model.load_state_dict({k: v * 2 for k, v in halved.items()})  # written in place, into the stacks
    assert all(torch.equal(a, b) for a, b in zip(reference, _outputs(model), strict=True))


def test_a_model_without_its_latent_prefix_modules_fuses_the_rest(tiny_echo_dir):
    model = load_model_from_hf(str(tiny_echo_dir), device="cpu", dtype=torch.float32, delete_blockwise_modules=True)
    assert model.blocks[0].attention.fused_groups == ("qkvg", "kv_text", "kv_speaker")


def test_fusing_twice_changes_nothing_and_a_converted_submodule_stays_fused(tiny_echo_dir):
    model = load_model_from_hf(str(tiny_echo_dir), device="cpu", dtype=torch.float32)
    model.fuse_projections()  # again: no group stacked twice
    attention = model.blocks[0].attention
    assert attention.fused_groups == ("qkvg", "kv_text", "kv_speaker", "kv_latent")
    model.blocks.to(torch.bfloat16)  # a submodule converted: its stacks follow
    assert attention.qkvg.dtype == torch.bfloat16
    assert attention.wv.weight.data_ptr() == attention.qkvg[2 * attention.wq.out_features:].data_ptr()
    block = model.blocks[1].mlp
    block.load_state_dict({k: v * 0 for k, v in block.state_dict().items()}, assign=True)
    assert block.w13.abs().sum() == 0 and block.w1.weight.data_ptr() == block.w13.data_ptr()


def test_a_cached_value_cache_does_not_hold_the_fused_key_half(tiny_model):
    """A voice's keys/values are cached for many requests: each tensor owns only its own bytes."""
    c = CASES
    with torch.inference_mode():
        kv = tiny_model.get_kv_cache_speaker(c["speaker_latent"])
    for k, v in kv:
        assert v.untyped_storage().nbytes() == v.numel() * v.element_size()
        assert k.untyped_storage().nbytes() == k.numel() * k.element_size()
