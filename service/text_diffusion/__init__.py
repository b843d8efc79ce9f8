"""Masked-diffusion text generation (MDLM / LLaDA style): model, folder loader, ELBO, remasking, batched denoiser.

Pure model and algorithm code: no HTTP, no metrics, nothing from ``service.runtime`` or ``service.api``.
"""
