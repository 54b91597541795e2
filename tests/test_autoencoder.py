"""Fish S1-DAC (autoencoder.py): parity with the reference, strict loading, exact streaming."""

import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from autoencoder import DAC, StreamingDecoder, build_ae, rope_table
from checkpoint import CheckpointError
from conftest import REF
from conftest import assert_close_to_reference as assert_matches
from inference import load_fish_ae_from_hf


@pytest.fixture(scope="module")
def tiny_config() -> dict:
    return json.loads((REF / "tiny_fish_dac_config.json").read_text())


@pytest.fixture(scope="module")
def tiny_state() -> dict[str, torch.Tensor]:
    return load_file(REF / "tiny_fish_dac.safetensors")


@pytest.fixture(scope="module")
def tiny_cases() -> dict[str, torch.Tensor]:
    return load_file(REF / "tiny_fish_dac_cases.safetensors")


@pytest.fixture(scope="module")
def tiny_ae(tiny_config, tiny_state) -> DAC:
    ae = build_ae(**tiny_config)
    ae.load_checkpoint(tiny_state, source="tiny_fish_dac.safetensors")
    return ae.eval()


# ---- configuration ---------------------------------------------------------------------------


def test_published_layout_matches_manifest():
    manifest = json.loads((REF / "fish_s1_dac_manifest.json").read_text())["tensors"]
    with torch.device("meta"):
        ae = build_ae()
    masks = {k for k in manifest if k.endswith("causal_mask")}
    assert len(manifest) == 541 and len(masks) == 3
    expected = ae.checkpoint_shapes(masks)
    assert expected == {k: tuple(v["shape"]) for k, v in manifest.items()}
    # without the (optional) causal masks
    assert set(ae.checkpoint_shapes()) == set(manifest) - masks
    assert ae.sample_rate == 44100 and ae.frame_length == 2048 and ae.latent_dim == 1024


def test_default_config_lists_every_key(tiny_config):
    from autoencoder import DEFAULT_CONFIG

    assert set(DEFAULT_CONFIG) == set(tiny_config)
    assert set(DEFAULT_CONFIG["quantizer_transformer"]) == set(tiny_config["quantizer_transformer"])
    assert DEFAULT_CONFIG["latent_dim"] == 1024 and DEFAULT_CONFIG["encoder_rates"] == [2, 4, 8, 8]
    with torch.device("meta"):
        assert build_ae(**DEFAULT_CONFIG).config == build_ae().config


def test_unknown_config_keys_are_named():
    with pytest.raises(TypeError, match="no_such_key"):
        build_ae(no_such_key=1)
    with pytest.raises(TypeError, match="quantizer_transformer.bogus"):
        build_ae(quantizer_transformer={"bogus": 1})


def test_partial_quantizer_transformer_override_and_unused_decoder_transformer(tiny_config):
    cfg = dict(tiny_config, quantizer_transformer={**tiny_config["quantizer_transformer"], "n_layer": 2})
    cfg["decoder_transformer_layers"] = [3, 0, 0, 0]  # accepted, builds nothing
    with torch.device("meta"):
        ae = build_ae(**cfg)
    assert len(ae.quantizer.post_module.layers) == 2
    assert not any(name.startswith("decoder") and "layers" in name for name, _ in ae.named_parameters())


# ---- parity with the reference (tiny model) ----------------------------------------------------


def test_tiny_encode_codes(tiny_ae, tiny_cases):
    assert torch.equal(tiny_ae.encode_codes(tiny_cases["audio"]), tiny_cases["codes"])


def test_tiny_encode_zq(tiny_ae, tiny_cases):
    assert_matches(tiny_ae.encode_zq(tiny_cases["audio"]), tiny_cases["encode_zq"])
    assert_matches(tiny_ae.codes_to_zq(tiny_cases["codes"]), tiny_cases["encode_zq"])


def test_tiny_encode_pads_to_whole_frames(tiny_ae, tiny_cases):
    audio = tiny_cases["audio"]
    cut = audio[..., : audio.shape[-1] - 1000]  # not a whole number of 2048-sample frames
    z = tiny_ae.encode_zq(cut)
    assert z.shape == (1, 64, -(-cut.shape[-1] // 2048))
    # (B, T) input is accepted too
    assert torch.equal(tiny_ae.encode_codes(audio[:, 0]), tiny_cases["codes"])


def test_tiny_decode_zq(tiny_ae, tiny_cases):
    assert_matches(tiny_ae.decode_zq(tiny_cases["decode_in"]), tiny_cases["decode_zq"])


def test_tiny_loads_into_meta_built_model(tiny_config, tiny_state, tiny_cases):
    with torch.device("meta"):
        ae = build_ae(**tiny_config)
    ae.load_checkpoint(tiny_state)
    assert ae.device == torch.device("cpu") and ae.dtype == torch.float32
    assert all(t.dtype == torch.float32 and not t.is_meta for t in ae.state_dict().values())
    assert_matches(ae.decode_zq(tiny_cases["decode_in"]), tiny_cases["decode_zq"])


def test_tiny_batch_matches_single(tiny_ae, tiny_cases):
    z = tiny_cases["decode_in"]
    batch = torch.cat([z, z.flip(-1)])
    out = tiny_ae.decode_zq(batch)
    assert_matches(out[:1], tiny_cases["decode_zq"])
    assert_matches(out[1:], tiny_ae.decode_zq(z.flip(-1)))


def test_stored_rope_tables_equal_formula(tiny_state):
    for name, table in tiny_state.items():
        if name.endswith("freqs_cis"):
            assert table.dtype == torch.bfloat16
            assert torch.equal(rope_table(table.shape[0], 2 * table.shape[1]), table.float()), name


def test_weight_norm_fold_matches_torch_parametrization():
    """g * v / ||v||, the norm over all dims but 0, for convs and transposed convs alike."""
    from autoencoder import _fold_weight_norm

    torch.manual_seed(0)
    for conv in (nn.Conv1d(6, 4, 3), nn.ConvTranspose1d(6, 4, 4, stride=2)):
        wn = nn.utils.parametrizations.weight_norm(conv, dim=0)
        g = wn.parametrizations.weight.original0
        v = wn.parametrizations.weight.original1
        assert g.shape == (6 if isinstance(conv, nn.ConvTranspose1d) else 4, 1, 1)
        torch.testing.assert_close(_fold_weight_norm(g.detach(), v.detach()), wn.weight.detach())


# ---- strict loading ----------------------------------------------------------------------------


def _fresh_tiny(tiny_config) -> DAC:
    with torch.device("meta"):
        return build_ae(**tiny_config)


def test_missing_tensor_is_named(tiny_config, tiny_state):
    name = "decoder.model.2.block.1.conv.parametrizations.weight.original0"
    state = {k: v for k, v in tiny_state.items() if k != name}
    with pytest.raises(CheckpointError, match="missing") as err:
        _fresh_tiny(tiny_config).load_checkpoint(state, source="broken.safetensors")
    assert name in str(err.value) and "broken.safetensors" in str(err.value)


def test_legacy_weight_norm_tensor_missing_is_named(tiny_config, tiny_state):
    name = "quantizer.quantizer.quantizers.1.out_proj.weight_v"
    state = {k: v for k, v in tiny_state.items() if k != name}
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
        _fresh_tiny(tiny_config).load_checkpoint(state)


def test_extra_tensor_is_named(tiny_config, tiny_state):
    state = dict(tiny_state)
    state["decoder.model.1.block.5.layers.0.attention.wqkv.weight"] = torch.zeros(3, 3)
    with pytest.raises(CheckpointError, match="unexpected") as err:
        _fresh_tiny(tiny_config).load_checkpoint(state)
    assert "decoder.model.1.block.5.layers.0.attention.wqkv.weight" in str(err.value)


def test_folded_weight_name_is_not_accepted(tiny_config, tiny_state):
    """A plain `conv.weight` (the module's own name) is not the published storage form."""
    prefix = "encoder.block.0.conv"
    state = {k: v for k, v in tiny_state.items() if not k.startswith(prefix + ".parametrizations")}
    state[prefix + ".weight"] = torch.zeros(4, 1, 7)
    with pytest.raises(CheckpointError) as err:
        _fresh_tiny(tiny_config).load_checkpoint(state)
    assert prefix + ".weight" in str(err.value)
    assert prefix + ".parametrizations.weight.original1" in str(err.value)


def test_misshaped_tensor_is_named(tiny_config, tiny_state):
    name = "quantizer.post_module.layers.0.attention.wqkv.weight"
    state = dict(tiny_state)
    state[name] = torch.zeros(191, 64)
    with pytest.raises(CheckpointError, match="mis-shaped") as err:
        _fresh_tiny(tiny_config).load_checkpoint(state)
    assert name in str(err.value)


def test_causal_masks_optional_but_shape_checked(tiny_config, tiny_state, tiny_cases):
    state = dict(tiny_state)
    state["quantizer.pre_module.causal_mask"] = torch.ones(4096, 4096, dtype=torch.bool).tril()
    ae = _fresh_tiny(tiny_config)
    ae.load_checkpoint(state)
    assert_matches(ae.decode_zq(tiny_cases["decode_in"]), tiny_cases["decode_zq"])
    state["quantizer.pre_module.causal_mask"] = torch.ones(16, 16, dtype=torch.bool)
    with pytest.raises(CheckpointError, match=r"quantizer\.pre_module\.causal_mask"):
        _fresh_tiny(tiny_config).load_checkpoint(state)
    state["quantizer.nothing.causal_mask"] = torch.ones(16, 16, dtype=torch.bool)
    with pytest.raises(CheckpointError, match=r"quantizer\.nothing\.causal_mask"):
        _fresh_tiny(tiny_config).load_checkpoint(state)


# ---- streaming decoder -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stream_latents() -> torch.Tensor:
    g = torch.Generator().manual_seed(1234)
    return 2.0 * torch.randn(2, 64, 20, generator=g)  # two independent streams


@pytest.mark.parametrize(
    "sizes",
    [
        [1] * 20,
        [3, 5, 8, 4],
        [1, 4, 15],  # [32, 128, 480]-like, scaled to the tiny window of 4
        [7, 1, 6, 2, 4],
        [20],
        [0, 4, 0, 16],
    ],
    ids=["ones", "3-5-8", "scaled", "uneven", "one-shot", "empty-blocks"],
)
def test_streaming_equals_one_shot(tiny_ae, stream_latents, sizes):
    z = stream_latents
    full = tiny_ae.decode_zq(z)
    decoder = tiny_ae.streaming_decoder(batch_size=2)
    assert isinstance(decoder, StreamingDecoder)
    window = tiny_ae.config.quantizer_transformer.window_size
    outs, start = [], 0
    for n in sizes:
        out = decoder.decode(z[..., start:start + n])
        assert out.shape == (2, 1, n * 2048)
        outs.append(out)
        start += n
        assert all(length <= window - 1 for length in decoder.kv_window_lengths())
    assert decoder.frames == z.shape[-1]
    assert_matches(torch.cat(outs, dim=-1), full)
    assert (torch.cat(outs, dim=-1) - full).abs().max().item() <= 1e-4


def test_streaming_state_does_not_grow(tiny_ae, stream_latents):
    decoder = tiny_ae.streaming_decoder(batch_size=2)
    z = stream_latents
    shapes = []
    for i in range(10):
        decoder.decode(z[..., i:i + 1])
        state = decoder.state
        shapes.append(
            [tuple(t.shape) for t in state.context.values()]
            + [tuple(k.shape) for k, _ in state.kv.values()]
        )
    window = tiny_ae.config.quantizer_transformer.window_size
    assert decoder.kv_window_lengths() == [window - 1] * tiny_ae.config.quantizer_transformer.n_layer
    assert all(s == shapes[0] for s in shapes)  # fixed from the first block on (a compiled decoder's inputs)
    assert all(t.shape[0] == 2 for t in decoder.state.context.values())  # a batch dimension
    assert [p.tolist() for p in decoder.state.position.values()] == [[10, 10]]


def test_streaming_reset_and_decoded_reference(tiny_ae, tiny_cases):
    z = tiny_cases["decode_in"]
    decoder = tiny_ae.streaming_decoder()
    decoder.decode(torch.randn(1, 64, 5))
    decoder.reset()
    out = torch.cat([decoder.decode(z[..., :3]), decoder.decode(z[..., 3:4]), decoder.decode(z[..., 4:])], -1)
    assert_matches(out, tiny_cases["decode_zq"])
    with pytest.raises(ValueError):
        decoder.decode(torch.randn(2, 64, 1))  # built for batch 1


def test_rope_continues_past_stored_table(tiny_ae):
    module = tiny_ae.quantizer.post_module
    n = module.freqs_cis.shape[0]
    rows = module.rope(n - 3, 8)
    assert torch.equal(rows[:3], module.freqs_cis[n - 3:])
    assert torch.equal(rows, rope_table(n + 5, module.head_dim)[n - 3:])


# ---- full size on the synthetic published-layout checkpoint --------------------------------------


@pytest.fixture(scope="module")
def fullsize_ae(synthetic_repos) -> DAC:
    """The published layout loaded through the public loader, strictly (541 tensors)."""
    return load_fish_ae_from_hf(str(synthetic_repos["fish-s1-dac-min"]), device="cpu", dtype=torch.float32)


@pytest.mark.slow
def test_fullsize_decode_and_encode(fullsize_ae):
    golden = load_file(REF / "fullsize_golden.safetensors")
    out = fullsize_ae.decode_zq(golden["fish_decode_in"])
    assert_matches(out, golden["fish_decode_out"])
    assert_matches(fullsize_ae.encode_zq(golden["fish_encode_in"]), golden["fish_encode_zq"])
    z = golden["fish_decode_in"]
    decoder = fullsize_ae.streaming_decoder()
    streamed = torch.cat([decoder.decode(z[..., a:b]) for a, b in [(0, 1), (1, 4), (4, 6)]], dim=-1)
    assert_matches(streamed, golden["fish_decode_out"])


def test_decode_streams_batches_streams_at_the_same_point(tiny_ae):
    from autoencoder import decode_streams

    gen = torch.Generator().manual_seed(5)
    z = [torch.randn(1, tiny_ae.latent_dim, 12, generator=gen) for _ in range(4)]
    solo = [tiny_ae.streaming_decoder() for _ in z]
    together = [tiny_ae.streaming_decoder() for _ in z]
    # streams 0-2 advance in step; stream 3 is one block behind and decodes a different length
    for start, stop in ((0, 4), (4, 8), (8, 12)):
        expected = [d.decode(x[..., start:stop]) for d, x in zip(solo[:3], z)]
        got = decode_streams(together[:3], [x[..., start:stop] for x in z[:3]])
        for a, b in zip(expected, got):
            assert torch.allclose(a, b, atol=1e-6)
    lagging = [solo[3].decode(z[3][..., :6]), solo[3].decode(z[3][..., 6:])]
    got = decode_streams([together[3], together[0]], [z[3][..., :6], torch.zeros(1, tiny_ae.latent_dim, 0)])
    assert torch.allclose(got[0], lagging[0], atol=1e-6) and got[1].shape[-1] == 0
    assert torch.allclose(decode_streams([together[3]], [z[3][..., 6:]])[0], lagging[1], atol=1e-6)
    assert all(d.frames == 12 for d in together[:3]) and together[3].frames == 12


def test_decode_streams_caps_the_frames_of_one_call(tiny_ae, monkeypatch):
    from autoencoder import StreamingDecoder, decode_streams

    gen = torch.Generator().manual_seed(6)
    z = [torch.randn(1, tiny_ae.latent_dim, 4, generator=gen) for _ in range(5)]
    expected = [tiny_ae.streaming_decoder().decode(x) for x in z]
    batch_sizes, decode = [], StreamingDecoder.decode
    monkeypatch.setattr(StreamingDecoder, "decode", lambda self, block: (batch_sizes.append(block.shape[0]),
                                                                          decode(self, block))[1])
    got = decode_streams([tiny_ae.streaming_decoder() for _ in z], z, max_batch_frames=8)
    assert batch_sizes == [2, 2, 1]  # 4-frame blocks, at most 8 frames a call
    for a, b in zip(expected, got, strict=True):
        assert torch.allclose(a, b, atol=1e-6)


def test_streaming_decoder_splits_long_blocks_exactly(tiny_ae):
    z = torch.randn(2, tiny_ae.latent_dim, 23, generator=torch.Generator().manual_seed(9))
    whole = tiny_ae.streaming_decoder(batch_size=2).decode(z)
    pieces = tiny_ae.streaming_decoder(batch_size=2, max_frames=4)
    split = torch.cat([pieces.decode(z[..., :10]), pieces.decode(z[..., 10:])], dim=-1)
    assert torch.allclose(whole, split, atol=1e-6) and pieces.frames == 23
