"""Samplers: pure functions ``(denoiser, x_T, timesteps, *, generator, ...) -> x_0`` that read the diffusion from
the denoiser (``denoiser.diffusion``, as EDM's samplers read ``net``), each with a progressive twin that yields every
step; :class:`Sampler` (sampler.py) binds one to its grid, as configs choose it, and checks its configuration;
:func:`generate` (generate.py) is the one way to draw images with it."""

from ddpmlab.samplers.base import SamplerStep, chain, final
from ddpmlab.samplers.ddim import ddim_sample, ddim_sample_progressive, ddim_step
from ddpmlab.samplers.ddpm import ddpm_sample, ddpm_sample_progressive, ddpm_step
from ddpmlab.samplers.dpm_solver import dpm_solver_sample, dpm_solver_sample_progressive
from ddpmlab.samplers.edm import euler_sample, euler_sample_progressive, heun_sample, heun_sample_progressive
from ddpmlab.samplers.generate import generate, generate_chain
from ddpmlab.samplers.guidance import GuidedDenoiser, with_guidance
from ddpmlab.samplers.repaint import repaint_sample, repaint_sample_progressive
from ddpmlab.samplers.sampler import ALGORITHMS, INPAINTING, SAMPLERS, Sampler, num_evaluations, steps_for_nfe
from ddpmlab.samplers.unipc import unipc_sample, unipc_sample_progressive

__all__ = [
    "ALGORITHMS",
    "GuidedDenoiser",
    "INPAINTING",
    "SAMPLERS",
    "Sampler",
    "SamplerStep",
    "chain",
    "ddim_sample",
    "ddim_sample_progressive",
    "ddim_step",
    "ddpm_sample",
    "ddpm_sample_progressive",
    "ddpm_step",
    "dpm_solver_sample",
    "dpm_solver_sample_progressive",
    "euler_sample",
    "euler_sample_progressive",
    "final",
    "generate",
    "generate_chain",
    "heun_sample",
    "heun_sample_progressive",
    "num_evaluations",
    "repaint_sample",
    "repaint_sample_progressive",
    "steps_for_nfe",
    "unipc_sample",
    "unipc_sample_progressive",
    "with_guidance",
]
