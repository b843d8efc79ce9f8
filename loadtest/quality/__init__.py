"""Model-quality evaluations through the service, and the AR-vs-diffusion tradeoff."""
