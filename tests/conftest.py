"""Shared fixtures: the reference data in tests/reference and the tiny models as local repos."""

import json
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[1]
REF = ROOT / "tests" / "reference"
sys.path.insert(0, str(ROOT))


def ref_path(name: str) -> Path:
    return REF / name


def assert_close_to_reference(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-4) -> None:
    """The parity criterion: max |actual - expected| <= rel * max |expected|."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    err = (actual.float() - expected.float()).abs().max().item()
    scale = expected.float().abs().max().item()
    assert err <= rel * scale, f"max abs diff {err:.3g} > {rel} x {scale:.3g}"


@pytest.fixture(scope="session")
def tiny_echo_dir(tmp_path_factory) -> Path:
    """A local 'Hub repo' with the tiny EchoDiT, its config.json and the tiny PCA state."""
    repo = tmp_path_factory.mktemp("tiny-echo")
    shutil.copy(REF / "tiny_echo_dit.safetensors", repo / "pytorch_model.safetensors")
    shutil.copy(REF / "tiny_echo_dit_config.json", repo / "config.json")
    cases = load_file(REF / "tiny_fish_dac_cases.safetensors")
    save_file({k: cases[k].contiguous() for k in ("pca_components", "pca_mean", "latent_scale")},
              repo / "pca_state.safetensors")
    return repo


@pytest.fixture(scope="session")
def tiny_fish_dir(tmp_path_factory) -> Path:
    repo = tmp_path_factory.mktemp("tiny-fish")
    shutil.copy(REF / "tiny_fish_dac.safetensors", repo / "pytorch_model.safetensors")
    shutil.copy(REF / "tiny_fish_dac_config.json", repo / "config.json")
    return repo


@pytest.fixture(scope="session")
def tiny_model(tiny_echo_dir):
    from inference import load_model_from_hf
    return load_model_from_hf(str(tiny_echo_dir), device="cpu", dtype=torch.float32)


@pytest.fixture(scope="session")
def tiny_fish(tiny_fish_dir):
    from inference import load_fish_ae_from_hf
    return load_fish_ae_from_hf(str(tiny_fish_dir), device="cpu", dtype=torch.float32)


@pytest.fixture(scope="session")
def tiny_pca(tiny_echo_dir):
    from inference import load_pca_state_from_hf
    return load_pca_state_from_hf(str(tiny_echo_dir), device="cpu")


@pytest.fixture(scope="session")
def sampler_cases() -> tuple[dict, dict]:
    return load_file(REF / "tiny_sampler_cases.safetensors"), json.loads((REF / "tiny_sampler_cases.json").read_text())


@pytest.fixture(scope="session")
def synthetic_repos(tmp_path_factory) -> dict[str, Path]:
    """Full-size synthetic checkpoints in the published layout (about 7.5 GB on disk).

    Set ECHO_SYNTHETIC_DIR to keep them between runs; by default they live in pytest's temp dir.
    """
    import os

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from synthetic import write_synthetic_repos

    out = Path(os.environ.get("ECHO_SYNTHETIC_DIR") or tmp_path_factory.mktemp("synthetic"))
    return write_synthetic_repos(out, REF)


# ---- a live server on a loopback port ------------------------------------------------------------

sys.path.insert(0, str(ROOT / "benchmarks"))
from live_server import LiveServer, ServerFailed, free_port  # noqa: E402,F401 - one way to start a server


@contextmanager
def live_server(tmp_path_factory, name: str, env: dict[str, str], **kwargs) -> Iterator[LiveServer]:
    """A LiveServer for a fixture: configured by `env`, logging to a temp dir called `name`, stopped after."""
    live = LiveServer(env, tmp_path_factory.mktemp(name) / "server.log", **kwargs)
    try:
        yield live
    finally:
        live.stop()


@pytest.fixture(scope="session")
def voice_dir(tmp_path_factory) -> Path:
    """Voices: alice.wav (a file), duo/ (a folder of two clips), bob.flac."""
    import soundfile as sf

    cases = load_file(REF / "tiny_fish_dac_cases.safetensors")
    clip = cases["speaker_audio"][0].numpy()
    root = tmp_path_factory.mktemp("voices")
    sf.write(root / "alice.wav", clip, 44100)
    sf.write(root / "bob.flac", clip[::-1].copy(), 44100)
    (root / "duo").mkdir()
    sf.write(root / "duo" / "1.wav", clip[:44100], 44100)
    sf.write(root / "duo" / "2.wav", clip[44100:], 44100)
    (root / "notes.txt").write_text("not a voice")
    return root


def server_env(echo_dir: Path, fish_dir: Path, voice_dir: Path, **extra: str) -> dict[str, str]:
    return {"ECHO_MODEL_REPO": str(echo_dir), "ECHO_FISH_REPO": str(fish_dir), "ECHO_DEVICE": "cpu",
            "ECHO_MODEL_DTYPE": "float32", "ECHO_VOICE_DIRS": str(voice_dir), "ECHO_WARMUP": "0",
            "HF_HUB_OFFLINE": "1", **extra}


@pytest.fixture(scope="session")
def server(tiny_echo_dir, tiny_fish_dir, voice_dir, tmp_path_factory):
    with live_server(tmp_path_factory, "server", server_env(tiny_echo_dir, tiny_fish_dir, voice_dir)) as live:
        yield live


@pytest.fixture(scope="module")
def tiny_service(tiny_echo_dir, tiny_fish_dir, tmp_path_factory):
    """A loaded SpeechService with the tiny models on the CPU, in process (no voices, no warm-up, 2
    slots, 1 waiting)."""
    import service as svc
    from settings import load_settings

    settings = load_settings(model_repo=str(tiny_echo_dir), fish_repo=str(tiny_fish_dir), device="cpu",
                             model_dtype="float32", voice_dirs=[tmp_path_factory.mktemp("no-voices")], warmup=False,
                             max_active=2, max_queue=1)
    service = svc.SpeechService(settings)
    service.start_loading().join()
    assert service.load_error is None
    yield service
    service.close()
