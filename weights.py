"""Getting the weights: EchoDiT (with its PCA state) and the Fish S1-DAC, from local directories or
the Hugging Face Hub cache, downloading what is missing; one clear line when that cannot be done.

The Hub client honours HF_TOKEN (gated or private repos), HF_HOME (where the cache lives) and
HF_HUB_OFFLINE=1 (never touch the network). When the Hub cannot be reached, files already in the
cache are used as they are, without the client's retries (five per file, tens of seconds each).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import constants, hf_hub_download
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import get_session

MODEL_FILES = ("pytorch_model.safetensors", "pca_state.safetensors")
FISH_FILES = ("pytorch_model.safetensors",)
OPTIONAL_FILES = ("config.json",)


class WeightsUnavailable(RuntimeError):
    """A weight file can be neither found nor fetched; the message says which and what to do."""


@dataclass(frozen=True)
class WeightSource:
    variable: str  # the setting that names it: ECHO_MODEL_REPO or ECHO_FISH_REPO
    repo: str  # a Hub repo id or a local directory
    files: tuple[str, ...]


def sources(model_repo: str, fish_repo: str) -> list[WeightSource]:
    return [WeightSource("ECHO_MODEL_REPO", model_repo, MODEL_FILES),
            WeightSource("ECHO_FISH_REPO", fish_repo, FISH_FILES)]


def fetch(model_repo: str, fish_repo: str) -> tuple[Path, Path]:
    """Local directories holding every file of the two weight sets (Hub repos: their cache snapshot)."""
    weight_sets = sources(model_repo, fish_repo)
    for source in weight_sets:  # (before asking whether the Hub answers: a mistyped path is not a Hub question)
        if not os.path.isdir(source.repo) and looks_like_a_path(source.repo):
            problem = "is a file, not a directory" if os.path.exists(source.repo) else "does not exist"
            raise WeightsUnavailable(f"{source.variable}={source.repo}: that directory {problem} (a Hub repo id is "
                                     "owner/name; a local directory must hold the weight files)")
    offline = hub_unreachable() if any(not os.path.isdir(s.repo) for s in weight_sets) else None
    model, fish = (_local_dir(source, offline) for source in weight_sets)
    return model, fish


def hub_unreachable(timeout: float = 10.0) -> str | None:
    """Why the Hub cannot be reached (one quick request, no retries), or None when it can."""
    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    # (through the Hub client's own session, so its proxies are these: its HTTP library changes between
    # its versions, requests, httpx, httpx2, and so do their errors)
    try:
        get_session().head(constants.ENDPOINT, timeout=timeout)  # any status: it answered
    except Exception as e:  # noqa: BLE001 - whatever the library raises, the Hub did not answer
        return f"{constants.ENDPOINT} is unreachable: {_reason(e)}"
    return None


def looks_like_a_path(repo: str) -> bool:
    """Whether a weights setting names a local directory rather than a Hub repo id (`owner/name`):
    absolute, relative (`.`), in a home (`~`), or with more than one `/`."""
    return repo.startswith(("/", ".", "~")) or repo.count("/") > 1 or (os.sep != "/" and os.sep in repo)


def _local_dir(source: WeightSource, offline: str | None) -> Path:
    """`offline`: why the Hub cannot be used (then only the cache is), or None."""
    if os.path.isdir(source.repo):
        for name in source.files:
            if not os.path.isfile(os.path.join(source.repo, name)):
                raise WeightsUnavailable(f"{source.variable}={source.repo}: {name} is not in that directory")
        return Path(source.repo)
    paths = [_hub_file(source, name, offline) for name in source.files]
    for name in OPTIONAL_FILES:
        try:
            _hub_file(source, name, offline)
        except WeightsUnavailable:
            pass  # optional: the published hyperparameters apply
    return Path(paths[0]).parent


def _hub_file(source: WeightSource, name: str, offline: str | None) -> str:
    try:
        return hf_hub_download(source.repo, name, local_files_only=offline is not None)
    except HFValidationError:
        raise WeightsUnavailable(f"{source.variable}={source.repo}: neither a local directory nor a Hub repo id "
                                 "(owner/name)") from None
    except Exception as e:  # noqa: BLE001 - any failure of the Hub client (its transport errors vary by version)
        where = (f"is not in the local Hugging Face cache, and the Hub cannot be used ({offline})" if offline
                 else f"could not be fetched ({_reason(e)})")
        raise WeightsUnavailable(
            f"{name} of the Hub repo {source.repo!r} ({source.variable}) {where}. "
            f"{'Connect to the Hub once and run `python api_server.py download`, or ' if offline else ''}"
            f"point ECHO_MODEL_REPO / ECHO_FISH_REPO at local directories holding the weights "
            f"(HF_TOKEN for gated repos; HF_HOME: {constants.HF_HOME})") from None


def _reason(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:200]
