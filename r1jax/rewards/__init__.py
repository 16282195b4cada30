"""Rule-based rewards for GRPO (DeepSeek-R1, arXiv:2501.12948).

R1 section 2.2.2 trains R1-Zero on two rule-based rewards, no neural reward model:
- accuracy (`accuracy_reward`): is the final answer right? For math the answer in `<answer>` (or
  `\\boxed{}`) is compared with the reference: strings, exact numbers, then math-verify's symbolic
  equivalence; procedural tasks use their exact checkers; for code problems "a compiler can be used to
  generate feedback based on predefined test cases" (`code.run_tests`, sandboxed).
- format (`format_reward`): the reasoning between `<think>` and `</think>`, the answer between
  `<answer>` and `</answer>`.
R1 section 2.3.2 adds, for the cold-started RL stage, a language-consistency reward
(`language_consistency`): the share of target-language words in the chain of thought.

Answers are read by `answer.answer_tag` (the one `<answer>` parser) and `answer.extract_answer`, both
linear in the text; `accuracy.explodes` refuses, before the verifier runs, answers whose exact value
is too large to compute (exponent towers, huge powers and factorials). `check_answer(record,
completion)` is the accuracy verdict. `RewardFn(weights)(completions, records)` combines the rewards
with weights, scoring in worker processes with a per-completion timeout and a per-worker address-space
cap (completions over `max_chars` score 0); the GRPO driver calls it once per rollout batch, and
evaluation and rejection sampling score with it too (`stats()`: timeouts, refusals, restarts, ...).
"""

from r1jax.rewards.accuracy import (
    accuracy_reward,
    answers_equivalent,
    check_answer,
    explodes,
    is_code_record,
    normalize_answer,
)
from r1jax.rewards.answer import AnswerTag, answer_tag, extract_answer, extract_boxed
from r1jax.rewards.code import (
    RunResult,
    code_reward,
    extract_program,
    normalize_output,
    run_program,
    run_tests,
    sandbox_report,
)
from r1jax.rewards.combine import COMPONENTS, RewardFn, reward_weights, score_components, stats_delta
from r1jax.rewards.format import format_reward
from r1jax.rewards.language import LANGUAGE_PREDICATES, language_consistency, reasoning_text

__all__ = [
    "AnswerTag",
    "COMPONENTS",
    "LANGUAGE_PREDICATES",
    "RewardFn",
    "RunResult",
    "accuracy_reward",
    "answer_tag",
    "answers_equivalent",
    "check_answer",
    "code_reward",
    "explodes",
    "extract_answer",
    "extract_boxed",
    "extract_program",
    "format_reward",
    "is_code_record",
    "language_consistency",
    "normalize_answer",
    "normalize_output",
    "reasoning_text",
    "reward_weights",
    "run_program",
    "run_tests",
    "sandbox_report",
    "score_components",
    "stats_delta",
]
