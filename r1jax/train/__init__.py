"""Training: the shared train state, the pure update functions (SFT, GRPO, distillation) and what they
share (`update`), and the losses. No files, no data pipelines: the drivers are in r1jax.stages."""
