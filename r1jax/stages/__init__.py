"""Stage drivers: what `r1jax sft|grpo|rejection|distill|eval` run, above the pure update functions.

`registry.STAGES` lists the kinds; each driver returns a `result.StageResult`. `start` sets a stage
up (resume, hand-off or fresh), `loop` is the stage loop the training stages share. Nothing here is
imported by r1jax.train or r1jax.models (tests/test_layers.py).
"""
