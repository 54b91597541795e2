"""Blockwise generation: latents are produced left to right in blocks, each conditioned on the
blocks before it through the latent-prefix encoder. This is what makes streaming possible: a block
can be decoded and played while the next one is sampled.

Every sampler takes `block_sizes` (frames per block, summing to at most 640) and `num_steps`
(one count for all blocks, or a list with one count per block). `continuation_latent`
(B, frames, 80) continues existing audio: generation starts after it.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from inference import (Conditioning, ModelCall, SamplerSettings, denoise_steps, initial_noise, make_generator,
                       run_steps)
from model import EchoDiT, LatentPrefix


def steps_per_block(block_sizes: Sequence[int], num_steps: int | Sequence[int]) -> list[int]:
    """One step count per block; a list must have exactly one entry per block."""
    if isinstance(num_steps, int):
        return [num_steps] * len(block_sizes)
    steps = list(num_steps)
    if len(steps) != len(block_sizes):
        raise ValueError(f"num_steps has {len(steps)} entries but there are {len(block_sizes)} blocks")
    return steps


@dataclass(eq=False)
class PrefixCall:
    """Append frames (B, n, 80) to a generation's latent prefix (send back None). A scheduler runs
    the calls of generations whose blocks finish together as one (`model.extend_prefixes`)."""

    prefix: LatentPrefix
    latents: Tensor

    def run(self) -> None:
        self.prefix.extend(self.latents)


def blockwise_steps(model: EchoDiT, conditioning: Conditioning, rng: torch.Generator, block_sizes: Sequence[int],
                    num_steps: int | Sequence[int], settings: SamplerSettings,
                    continuation_latent: Tensor | None = None, step_policy: Callable[[int, int], int] | None = None
                    ) -> Generator[ModelCall | Tensor, Tensor | None, None]:
    """The blockwise sampler as a generator: yields each step's ModelCall (send the velocity back)
    and, after its last step, each finished block (B, block_size, 80) float32 (send None to accept
    it, a torch.Generator to sample the block again from its noise, or an earlier block to keep);
    then a PrefixCall that adds the kept block (and first the continuation) to the latent prefix
    (run it, send None back).

    The noise of block k is the k-th draw of (B, block_size, 80) from `rng`. The latent prefix is
    encoded incrementally: each block adds only its own frames to the prefix encoder.

    `step_policy(block index, requested steps)`, when given, is asked once as each block starts and
    returns the steps that block takes (a reroll of the block keeps them): its schedule is fixed from
    its first step on. None: every block takes its requested steps.
    """
    device = model.device
    batch = conditioning.text_mask.shape[0]
    steps = steps_per_block(block_sizes, num_steps)
    prefix = LatentPrefix(model, batch, device)
    if continuation_latent is not None:
        yield PrefixCall(prefix, continuation_latent)
    for index, (block_size, block_steps) in enumerate(zip(block_sizes, steps)):
        if step_policy is not None:
            block_steps = step_policy(index, block_steps)
        noise = rng
        while True:
            x_t = initial_noise(noise, batch, block_size, settings.truncation(index), device)
            block = yield from denoise_steps(conditioning, x_t, settings, num_steps=block_steps,
                                             start_pos=prefix.frames, kv_latent=prefix.kv)
            reply = yield block
            if not isinstance(reply, torch.Generator):
                break
            noise = reply  # a reroll: the same block again, from this generator's noise
        # None accepts the last block; a tensor is the one kept
        yield PrefixCall(prefix, block if reply is None else reply)


@torch.inference_mode()
def iter_blockwise(model: EchoDiT, speaker_latent: Tensor, speaker_mask: Tensor, text_input_ids: Tensor,
                   text_mask: Tensor, rng_seed: int, block_sizes: Sequence[int], num_steps: int | Sequence[int],
                   settings: SamplerSettings, continuation_latent: Tensor | None = None,
                   rng: torch.Generator | None = None, on_step: Callable[[], None] | None = None) -> Iterator[Tensor]:
    """Yield each finished block of latents (B, block_size, 80) float32, in order.

    The noise comes from the generator seeded with `rng_seed` (or from `rng`, when given), so the
    blocks are identical to the non-yielding sampler's. `on_step` is called before every diffusion
    step; raising from it abandons the generation.
    """
    conditioning = Conditioning(model, speaker_latent, speaker_mask, text_input_ids, text_mask, settings)
    rng = rng if rng is not None else make_generator(rng_seed, model.device)
    steps = blockwise_steps(model, conditioning, rng, block_sizes, num_steps, settings, continuation_latent)
    yield from run_steps(model, steps, on_step)


def _blockwise_sampler(guidance: str, doc: str) -> Callable[..., Tensor]:
    @torch.inference_mode()
    def sampler(model: EchoDiT, speaker_latent: Tensor, speaker_mask: Tensor, text_input_ids: Tensor,
                text_mask: Tensor, rng_seed: int, block_sizes: Sequence[int], num_steps: int | Sequence[int],
                cfg_scale_text: float, cfg_scale_speaker: float, cfg_min_t: float, cfg_max_t: float,
                truncation_factor: float | None = None, rescale_k: float | None = None,
                rescale_sigma: float | None = None, speaker_kv_scale: float | None = None,
                speaker_kv_max_layers: int | None = None, speaker_kv_min_t: float | None = None,
                continuation_latent: Tensor | None = None) -> Tensor:
        settings = SamplerSettings(0, cfg_scale_text, cfg_scale_speaker, cfg_min_t, cfg_max_t, truncation_factor,
                                   rescale_k, rescale_sigma, speaker_kv_scale, speaker_kv_max_layers,
                                   speaker_kv_min_t, guidance)
        blocks = list(iter_blockwise(model, speaker_latent, speaker_mask, text_input_ids, text_mask, rng_seed,
                                     block_sizes, num_steps, settings, continuation_latent))
        if continuation_latent is not None:
            blocks.insert(0, continuation_latent.float())
        return torch.cat(blocks, dim=1)

    sampler.__doc__ = doc + ("\n\nReturns latents (B, continuation + sum(block_sizes), 80) float32, the "
                             "continuation included.")
    return sampler


sample_blockwise_euler_cfg_independent_guidances = _blockwise_sampler(
    "independent", "Blockwise Euler sampling with separate text and speaker guidance.")
sample_blockwise_euler_cfg_joint_unconditional = _blockwise_sampler(
    "joint", "Blockwise Euler sampling with one joint unconditional branch.")
sample_blockwise_euler_cfg_apg_independent = _blockwise_sampler(
    "apg", "Blockwise Euler sampling with adaptive projected guidance.")
sample_blockwise_euler_cfg_alternating = _blockwise_sampler(
    "alternating", "Blockwise Euler sampling alternating the text- and speaker-dropped branch per guided step.")
