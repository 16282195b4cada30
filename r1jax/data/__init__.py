"""Data sources: procedural verifiable tasks, JSONL files, the shipped eval sets (also as tfds).

Every source is grain's random-access kind (`len`, `src[i] -> dict`, picklable) whose records are
{"id", "question", "reasoning", "answer"} (str) plus task extras. `tfds_builders` is not imported
here: it pulls in tensorflow_datasets, which only the tfds path needs.
"""

from r1jax.data.procedural import ArithmeticTask, CountdownTask, check_arithmetic, check_countdown
from r1jax.data.sources import EVAL_SETS, JsonlSource, aime2024, gsm8k, math500

__all__ = [
    "EVAL_SETS",
    "ArithmeticTask",
    "CountdownTask",
    "JsonlSource",
    "aime2024",
    "check_arithmetic",
    "check_countdown",
    "gsm8k",
    "math500",
]
