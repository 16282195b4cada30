"""Typed configuration: one schema, YAML files under configs/, dotted command-line overrides.

A config file is YAML. It may name other files under `base:` (a path or a list of paths, relative to
the file); they are merged first, in order, and the file itself then sets only what differs:

    # configs/my_run.yaml
    base: models/tiny_v3.yaml
    model: {n_layers: 4}
    mesh: {fsdp: 2}

Every key is checked against the dataclasses below. An unknown key, a wrong type or an impossible
combination raises `ConfigError` with one line that names the key and the file (or "command line")
that set it, with a close-match suggestion for typos:

    configs/my_run.yaml: model.n_grop: unknown key (did you mean 'n_group'?)

Files are checked before their keys: a missing, unreadable, binary or non-UTF-8 file, a directory, a
key given twice in one mapping (`configs/my_run.yaml:7: model.n_layers: duplicate key ...`), and a
float that is not finite (NaN, inf) are all one-line errors too.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

CLI = "command line"
MAX_RECORD_BYTES = 4 << 20  # default data.max_record_bytes: a JSONL line above 4 MiB is not a training example


class ConfigError(ValueError):
    """A config problem, with a one-line message naming the key and where it was set."""


# --------------------------------------------------------------------------------------------------
# Schema
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Rotary scaling. `yarn`: YaRN (DeepSeek-V2/V3); `llama3`: Llama 3.1 frequency bands."""

    type: Literal["yarn", "llama3"]
    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0  # yarn
    beta_slow: float = 1.0  # yarn
    mscale: float = 1.0  # yarn: numerator of the cos/sin attention factor
    mscale_all_dim: float = 0.0  # yarn: its square multiplies the softmax scale (0 = off)
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """One decoder, many variants. `family` fixes the conventions of the reference implementation:

    - deepseek_v3 / deepseek_v2: MLA attention with interleaved (pairwise) rotary on the decoupled
      RoPE dims; MoE layers after `first_k_dense_replace` dense ones.
    - qwen2 / llama3: grouped-query attention with half-split rotary; dense MLP; qwen2 has qkv bias.
    """

    family: Literal["deepseek_v3", "deepseek_v2", "qwen2", "llama3"]
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    d_ff: int  # hidden size of the dense MLP layers
    # grouped-query attention (qwen2 / llama3)
    n_kv_heads: int = 0  # 0: same as n_heads
    head_dim: int = 0  # 0: d_model // n_heads
    qkv_bias: bool = False
    # multi-head latent attention (deepseek)
    q_lora_rank: int | None = None  # None: full query projection (DeepSeek-V2-Lite)
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    # positions
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_seq_len: int = 4096
    # mixture of experts (n_routed_experts = 0: every layer dense)
    n_routed_experts: int = 0
    first_k_dense_replace: int = 0
    n_shared_experts: int = 0
    num_experts_per_tok: int = 0
    moe_d_ff: int = 0
    score_func: Literal["sigmoid", "softmax"] = "sigmoid"
    n_group: int = 1
    topk_group: int = 1
    group_score: Literal["top2_sum", "max"] = "top2_sum"  # V3: sum of top-2; V2: max
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    moe_impl: Literal["auto", "ragged_dot", "tiled", "mosaic_gpu"] = "auto"  # grouped matmul (models/gmm.py)
    # expert-parallel dispatch (models/moe.py): all-gather the expert group's tokens, or send each
    # (token, choice) row to its expert's shard with a ragged all-to-all (models/dispatch.py);
    # auto: all_to_all when the expert axis that shards the tokens is larger than num_experts_per_tok
    moe_dispatch: Literal["auto", "all_to_all", "gather"] = "auto"
    # all-to-all receive buffer per round, as a multiple of the rows a shard routes (tokens x k);
    # rows beyond it go in further rounds (nothing is dropped)
    moe_capacity: float = 2.0
    # all-to-all: a device's tokens per dispatch (0: all at once); longer inputs go in chunks of at
    # most this many tokens, one after another, so the dispatch buffers follow the chunk
    moe_chunk: int = 0
    # multi-token prediction (DeepSeek-V3 section 2.2)
    mtp_depth: int = 0
    mtp_loss_weight: float = 0.3
    # a scalar head on the final hidden state (reward models: `r1jax rm`, models/transformer.py score)
    score_head: bool = False
    # numerics
    norm_eps: float = 1e-6
    tie_embeddings: bool = False
    init_std: float = 0.02
    param_dtype: Literal["float32", "bfloat16"] = "float32"
    dtype: Literal["float32", "bfloat16"] = "float32"
    # rematerialisation of each scanned block in the backward pass: none (keep activations),
    # full (recompute the block), dots (keep matmul outputs, recompute the rest)
    remat: Literal["none", "full", "dots"] = "none"
    # attention implementation (models/attention.py): auto picks by backend (TPU splash, GPU cuDNN
    # where its constraints hold, else blockwise); dense builds the [S, S] scores (the reference)
    attention: Literal["auto", "dense", "blockwise", "splash", "cudnn"] = "auto"
    attention_block: int = 512  # query and key block of blockwise attention (tokens)
    # sequence chunk of the output head in losses and log-prob passes (tokens; 0: one chunk): no
    # [B, S, vocab] array is built, only [B, chunk, vocab] at a time (train/losses.py)
    logits_chunk: int = 1024

    # ---- derived ----
    @property
    def is_mla(self) -> bool:
        return self.family in ("deepseek_v3", "deepseek_v2")

    @property
    def is_moe(self) -> bool:
        return self.n_routed_experts > 0

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def gqa_head_dim(self) -> int:
        return self.head_dim or self.d_model // self.n_heads

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def rope_dim(self) -> int:
        return self.qk_rope_head_dim if self.is_mla else self.gqa_head_dim

    @property
    def n_dense_layers(self) -> int:
        return min(self.first_k_dense_replace, self.n_layers) if self.is_moe else self.n_layers

    @property
    def n_moe_layers(self) -> int:
        return self.n_layers - self.n_dense_layers

    def errors(self) -> list[tuple[str, str]]:
        """Impossible combinations, as (key, message) pairs."""
        out = []
        positive = ["vocab_size", "d_model", "n_layers", "n_heads", "d_ff", "max_seq_len", "attention_block"]
        for key in positive:
            if getattr(self, key) <= 0:
                out.append((key, f"must be > 0, got {getattr(self, key)}"))
        if self.is_mla:
            if self.q_lora_rank is not None and self.q_lora_rank <= 0:
                out.append(("q_lora_rank", "must be > 0 or null (full query projection)"))
            if self.qk_rope_head_dim % 2:
                out.append(("qk_rope_head_dim", f"must be even for rotary pairs, got {self.qk_rope_head_dim}"))
            for key in ("kv_lora_rank", "qk_nope_head_dim", "v_head_dim"):
                if getattr(self, key) <= 0:
                    out.append((key, f"must be > 0, got {getattr(self, key)}"))
        else:
            if self.n_heads % self.kv_heads:
                out.append(("n_kv_heads", f"{self.kv_heads} does not divide n_heads={self.n_heads}"))
            if self.gqa_head_dim % 2:
                out.append(("head_dim", f"must be even for rotary, got {self.gqa_head_dim}"))
            if self.is_moe:
                out.append(("n_routed_experts", f"family {self.family} is dense; MoE needs a deepseek family"))
            if self.mtp_depth:
                out.append(("mtp_depth", f"family {self.family} has no multi-token prediction module"))
        if self.family != "qwen2" and self.qkv_bias:
            out.append(("qkv_bias", f"only the qwen2 family has qkv bias, not {self.family}"))
        if self.is_moe:
            e, g = self.n_routed_experts, self.n_group
            if self.num_experts_per_tok <= 0 or self.num_experts_per_tok > e:
                out.append(("num_experts_per_tok", f"must be in 1..n_routed_experts={e}, got {self.num_experts_per_tok}"))
            if self.moe_d_ff <= 0:
                out.append(("moe_d_ff", f"must be > 0 for an MoE model, got {self.moe_d_ff}"))
            if self.moe_capacity <= 0:
                out.append(("moe_capacity", f"must be > 0, got {self.moe_capacity}"))
            if self.moe_impl == "mosaic_gpu" and (self.d_model % 128 or self.moe_d_ff % 128):
                out.append(("moe_impl", f"mosaic_gpu tiles d_model and moe_d_ff by 128 (models/gmm.py "
                                        f"MOSAIC_BLOCKS), got {self.d_model} and {self.moe_d_ff}"))
            if self.moe_chunk < 0:
                out.append(("moe_chunk", f"must be >= 0 (0: no chunks), got {self.moe_chunk}"))
            if g <= 0 or e % g:
                out.append(("n_group", f"{g} does not divide n_routed_experts={e}"))
            elif self.topk_group <= 0 or self.topk_group > g:
                out.append(("topk_group", f"must be in 1..n_group={g}, got {self.topk_group}"))
            elif self.num_experts_per_tok > self.topk_group * (e // g):
                out.append(("num_experts_per_tok", (f"{self.num_experts_per_tok} > topk_group*experts_per_group"
                            f" = {self.topk_group}*{e // g}: not enough experts in the selected groups")))
            elif g > 1 and self.group_score == "top2_sum" and e // g < 2:
                out.append(("group_score", "top2_sum needs at least 2 experts per group"))
            if self.first_k_dense_replace < 0 or self.first_k_dense_replace > self.n_layers:
                out.append(("first_k_dense_replace", f"must be in 0..n_layers={self.n_layers}"))
        if self.mtp_depth < 0:
            out.append(("mtp_depth", f"must be >= 0, got {self.mtp_depth}"))
        if self.rope_scaling is not None and self.rope_scaling.factor <= 0:
            out.append(("rope_scaling.factor", "must be > 0"))
        if self.attention == "cudnn":  # what jax.nn.dot_product_attention(implementation="cudnn") takes
            head = max(self.qk_head_dim, self.v_head_dim) if self.is_mla else self.gqa_head_dim
            if self.dtype != "bfloat16":
                out.append(("attention", f"cudnn needs dtype bfloat16, got {self.dtype}"))
            if head % 8 or head > 256:
                out.append(("attention", f"cudnn needs a head dim that is a multiple of 8 and <= 256, got {head}"))
        for key in ("n_kv_heads", "head_dim", "n_routed_experts", "n_shared_experts", "mtp_loss_weight", "init_std",
                    "logits_chunk"):
            if getattr(self, key) < 0:
                out.append((key, f"must be >= 0, got {getattr(self, key)}"))
        for key in ("rope_theta", "norm_eps", "routed_scaling_factor"):
            if getattr(self, key) <= 0:
                out.append((key, f"must be > 0, got {getattr(self, key)}"))
        return out


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh sizes. One axis may be -1: it takes the devices left over."""

    data: int = 1
    fsdp: int = -1
    expert: int = 1
    tensor: int = 1

    def errors(self) -> list[tuple[str, str]]:
        out = []
        fills = [k for k in ("data", "fsdp", "expert", "tensor") if getattr(self, k) == -1]
        if len(fills) > 1:
            out.append((fills[1], f"only one mesh axis may be -1, got {', '.join(fills)}"))
        for k in ("data", "fsdp", "expert", "tensor"):
            v = getattr(self, k)
            if v == 0 or v < -1:
                out.append((k, f"must be >= 1 or -1 (fill), got {v}"))
        return out

    def resolve(self, n_devices: int) -> dict[str, int]:
        """Axis sizes for `n_devices` devices, filling the -1 axis."""
        sizes = {k: getattr(self, k) for k in ("data", "fsdp", "expert", "tensor")}
        fixed = math.prod(v for v in sizes.values() if v != -1)
        for k, v in sizes.items():
            if v == -1:
                if n_devices % fixed:
                    raise ConfigError(f"mesh.{k}: -1 cannot fill {n_devices} devices, the other axes take {fixed}")
                sizes[k] = n_devices // fixed
        if math.prod(sizes.values()) != n_devices:
            raise ConfigError(f"mesh: {sizes} has {math.prod(sizes.values())} devices, but {n_devices} are present")
        return sizes


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW with warmup then cosine / linear decay (or constant), global-norm clipping.

    Precision (train/state.py make_optimizer, train/update.py apply_gradients): the Adam arithmetic
    and the update p + u run in float32 for any model.param_dtype; the moments are stored in
    `moments_dtype`, the new params in model.param_dtype, rounded to nearest or, with
    `stochastic_rounding` (bfloat16 params only), stochastically so that updates below half a
    bfloat16 ulp still move the weights on average.
    """

    lr: float = 3e-4
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = 0
    final_lr_ratio: float = 0.1  # the decayed lr at train.steps, as a fraction of lr
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    decay_norms: bool = False  # apply weight decay to norm scales too
    decay_biases: bool = False
    decay_embeddings: bool = False  # the input embedding table (and the head when tied)
    grad_clip: float = 1.0  # global-norm clip; 0 disables
    # Adam's first and second moments: float32 whatever the params are, or the params' own dtype
    # (half the optimizer memory with bfloat16 params)
    moments_dtype: Literal["float32", "params"] = "float32"
    # round p + u to bfloat16 params stochastically (unbiased) instead of to nearest; needs
    # model.param_dtype bfloat16 (float32 params take the update exactly)
    stochastic_rounding: bool = False

    def model_errors(self, model: ModelConfig) -> list[tuple[str, str]]:
        """Settings that do not fit the model, as (key in this section, message) pairs."""
        if self.stochastic_rounding and model.param_dtype != "bfloat16":
            return [("stochastic_rounding", f"needs model.param_dtype bfloat16, got {model.param_dtype} "
                                            "(float32 params take each update exactly)")]
        return []

    def errors(self) -> list[tuple[str, str]]:
        out = []
        if self.lr < 0:
            out.append(("lr", f"must be >= 0, got {self.lr}"))
        if self.warmup_steps < 0:
            out.append(("warmup_steps", "must be >= 0"))
        if not 0 <= self.final_lr_ratio <= 1:
            out.append(("final_lr_ratio", f"must be in [0, 1], got {self.final_lr_ratio}"))
        if self.grad_clip < 0:
            out.append(("grad_clip", "must be >= 0 (0 disables clipping)"))
        for key in ("b1", "b2"):
            if not 0 <= getattr(self, key) < 1:
                out.append((key, f"must be in [0, 1), got {getattr(self, key)}"))
        for key in ("eps", "weight_decay"):
            if getattr(self, key) < 0:
                out.append((key, f"must be >= 0, got {getattr(self, key)}"))
        return out


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000
    batch_size: int = 8  # global rows (packed sequences) per optimizer step
    seq_len: int = 512
    grad_accum: int = 1  # microbatches per step; batch_size must divide by it
    seed: int = 0
    balance_loss_coef: float = 1e-4  # alpha of the sequence-wise balance loss (V3 section 2.1.2)
    bias_update_speed: float = 1e-3  # gamma of the aux-loss-free balancer (V3 section 2.1.2)
    mtp: bool = True  # add the MTP loss (weight model.mtp_loss_weight) when the model has MTP modules
    log_every: int = 10
    eval_every: int = 0  # held-out greedy evaluation every N steps (and always at the end); 0: end only
    eval_examples: int = 256
    eval_max_new_tokens: int = 64

    def errors(self) -> list[tuple[str, str]]:
        out = []
        for key in ("steps", "batch_size", "seq_len", "grad_accum", "log_every", "eval_max_new_tokens"):
            if getattr(self, key) <= 0:
                out.append((key, f"must be > 0, got {getattr(self, key)}"))
        for key in ("eval_every", "eval_examples"):
            if getattr(self, key) < 0:
                out.append((key, f"must be >= 0, got {getattr(self, key)}"))
        if self.grad_accum > 0 and self.batch_size % self.grad_accum:
            out.append(("grad_accum", f"{self.grad_accum} does not divide batch_size={self.batch_size}"))
        if self.balance_loss_coef < 0 or self.bias_update_speed < 0:
            out.append(("balance_loss_coef" if self.balance_loss_coef < 0 else "bias_update_speed", "must be >= 0"))
        return out


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    dir: str = ""  # the run directory; "" keeps no checkpoints
    every: int = 100  # save every N steps (and at the end, and on SIGTERM)
    keep: int = 3  # keep the last K
    async_save: bool = True
    init_from: str = ""  # start from the params of this earlier stage's checkpoint (run dir or step dir)

    def errors(self) -> list[tuple[str, str]]:
        return [(key, f"must be > 0, got {getattr(self, key)}") for key in ("every", "keep") if getattr(self, key) <= 0]


@dataclasses.dataclass(frozen=True)
class TokenizerConfig:
    path: str = ""  # an existing tokenizer: .model, tokenizer.json, or a directory holding one
    train_vocab_size: int = 0  # > 0: train a sentencepiece model on the training data at the start
    train_examples: int = 20000  # how many training examples to train it on

    def errors(self) -> list[tuple[str, str]]:
        if not self.path and self.train_vocab_size <= 0:
            return [("path", "set tokenizer.path or tokenizer.train_vocab_size")]
        return self.count_errors()

    def count_errors(self) -> list[tuple[str, str]]:
        """Counts out of range (checked on every load; `errors` adds the need for some tokenizer)."""
        out = []
        if self.train_vocab_size < 0:
            out.append(("train_vocab_size", f"must be >= 0 (0: no training), got {self.train_vocab_size}"))
        if self.train_vocab_size > 0 and self.train_examples <= 0:
            out.append(("train_examples", f"must be > 0 to train a tokenizer, got {self.train_examples}"))
        return out


@dataclasses.dataclass(frozen=True)
class DataConfig:
    source: Literal["arithmetic", "countdown", "jsonl", "gsm8k", "math500", "aime2024", "tfds",
                    "parity_preference"] = "arithmetic"  # parity_preference: pairs for reward models
    path: str = ""  # jsonl: the file; tfds: the data_dir
    train_path: str = ""  # a JSONL that replaces the training split (held-out evaluation keeps `source`)
    name: str = ""  # tfds: the builder name
    split: str = "train"
    eval_split: str = "test"
    template: Literal["r1_zero", "r1"] = "r1_zero"
    pack: bool = True  # first-fit packing of several examples per row (segment ids keep them apart)
    packing_bins: int = 16
    shuffle: bool = True
    seed: int = 0
    size: int = 1_000_000  # procedural tasks: examples per epoch
    min_digits: int = 3  # arithmetic
    max_digits: int = 3
    ops: tuple[str, ...] = ("+",)
    flaw_rate: float = 0.0  # arithmetic +: share of training demonstrations that forget their first carry
    # share of prompts drawn from the general parity task (scenario "general", no verifiable answer)
    # mixed into `source`'s reasoning prompts: R1's "RL for all scenarios" (1.0: general prompts only)
    general_share: float = 0.0
    # share of the general prompts' demonstrations ("response", what SFT trains on) whose summary
    # misses the hidden preference: an imperfect demonstrator whose preference a reward model can
    # correct; general_flaw_wrong_share of those state the wrong parity, the rest none at all
    general_flaw_rate: float = 0.5
    general_flaw_wrong_share: float = 0.5
    n_numbers: int = 4  # countdown
    num_shards: int = 0  # loader shards composing the global batch; 0: one per process
    worker_count: int = 0  # grain worker processes per loader shard
    # JSONL files: a line longer than this many bytes is never read whole; `oversized` says what then:
    # skip it (a warning names file:line and size, and the source counts it) or refuse the file
    max_record_bytes: int = MAX_RECORD_BYTES
    oversized: Literal["skip", "error"] = "skip"

    def errors(self) -> list[tuple[str, str]]:
        out = []
        if self.source in ("jsonl", "tfds") and not self.path:
            out.append(("path", f"source {self.source} needs data.path"))
        if self.source == "tfds" and not self.name:
            out.append(("name", "source tfds needs data.name"))
        if self.min_digits < 1 or self.max_digits < self.min_digits:
            out.append(("max_digits", f"need 1 <= min_digits <= max_digits, got {self.min_digits}..{self.max_digits}"))
        bad = [o for o in self.ops if o not in ("+", "-", "*")]
        if bad:
            out.append(("ops", f"unknown operations {bad} (known: + - *)"))
        if not 0 <= self.general_share <= 1:
            out.append(("general_share", f"must be in [0, 1], got {self.general_share}"))
        for key in ("general_flaw_rate", "general_flaw_wrong_share"):
            if not 0 <= getattr(self, key) <= 1:
                out.append((key, f"must be in [0, 1], got {getattr(self, key)}"))
        if not 0 <= self.flaw_rate <= 1:
            out.append(("flaw_rate", f"must be in [0, 1], got {self.flaw_rate}"))
        elif self.flaw_rate and (self.source != "arithmetic" or tuple(self.ops) != ("+",)):
            out.append(("flaw_rate", "flawed demonstrations exist for arithmetic addition only (ops: [\"+\"])"))
        for key in ("size", "packing_bins", "max_record_bytes"):
            if getattr(self, key) <= 0:
                out.append((key, f"must be > 0, got {getattr(self, key)}"))
        if self.n_numbers < 2:
            out.append(("n_numbers", f"must be >= 2 (countdown combines at least two numbers), got {self.n_numbers}"))
        for key in ("num_shards", "worker_count"):
            if getattr(self, key) < 0:
                out.append((key, f"must be >= 0, got {getattr(self, key)}"))
        return out


@dataclasses.dataclass(frozen=True)
class RewardWeights:
    """Weights of the rule-based reward components (R1: accuracy + format + language consistency)."""

    accuracy: float = 1.0
    format: float = 0.0
    language: float = 0.0
    code: float = 0.0


@dataclasses.dataclass(frozen=True)
class GRPOConfig:
    """Group Relative Policy Optimization (DeepSeekMath section 4.1; R1 section 2.2) and its variants.

    One iteration (train.steps counts them): prompts_per_step prompts x group_size samples (drawn
    with the `sampling` section) -> rewards -> group advantages -> inner_epochs passes over
    `minibatches` minibatches, one optimizer step each (of train.grad_accum microbatches).
    """

    group_size: int = 16  # G (R1-Zero: 16)
    prompts_per_step: int = 32  # R1-Zero: 32
    clip_low: float = 0.2  # epsilon below 1
    clip_high: float = 0.2  # epsilon above 1 (DAPO clip-higher: 0.28)
    beta: float = 0.001  # KL coefficient (R1-Zero: 0.001); 0 keeps no reference model at all
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"
    ref_refresh_every: int = 400  # iterations between copies of the policy into the reference (R1-Zero: 400)
    std_normalize: bool = True  # False: Dr. GRPO advantages
    # the std that divides them: each group's own (DeepSeekMath), or "batch": one per scenario over
    # the iteration's rollouts (REINFORCE++-baseline), so groups whose rewards barely differ (a reward
    # model's scores of equally good samples) keep small advantages instead of being scaled to +-1
    std_over: Literal["group", "batch"] = "group"
    leave_one_out: bool = False
    aggregation: Literal["seq-mean-token-mean", "token-mean", "seq-mean-token-sum-norm"] = "seq-mean-token-mean"
    ratio_level: Literal["token", "sequence"] = "token"  # sequence: GSPO
    inner_epochs: int = 1  # mu
    minibatches: int = 1
    dynamic_sampling: bool = False  # DAPO: drop groups whose rewards are all equal
    # sampler/trainer mismatch correction (train/losses.py importance_weights): per-token weight
    # w = pi_old (training forward) / pi_sampler, truncated at mismatch_cap (tis), or tokens /
    # sequences with w outside [1/cap, cap] masked out (token_mask / sequence_mask)
    mismatch: Literal["off", "tis", "token_mask", "sequence_mask"] = "off"
    mismatch_cap: float = 2.0
    # routing replay (MoE): "rollout" records the experts the sampler selected per token and MoE
    # layer and makes the log-prob passes and updates select the same ones (gate weights still
    # from the current router, so it learns); "off": every forward routes by itself
    routing_replay: Literal["off", "rollout"] = "off"
    overlong_max_len: int = 0  # DAPO soft overlong punishment: > 0 turns it on
    overlong_cache: int = 0
    rewards: RewardWeights = RewardWeights()
    # a reward model (a `r1jax rm` run directory or step) scoring the rollouts of general prompts
    # (records with scenario "general"), frozen, in-graph on the training mesh; reasoning prompts
    # keep the rule rewards (R1 section 2.3.4). It reads what its rm.view says.
    reward_model: str = ""
    reward_model_weight: float = 1.0
    reward_timeout: float = 10.0  # seconds per completion in a reward worker (killed and replaced past it)
    reward_workers: int = 0  # 0: min(4, cpu count); also scores evaluation and rejection sampling
    reward_memory_mb: int = 2048  # address-space cap of each reward worker (0: none)
    reward_max_chars: int = 262144  # a longer completion scores 0 on every component, unread (0: no limit)

    def errors(self) -> list[tuple[str, str]]:
        out = []
        for key in ("group_size", "prompts_per_step", "inner_epochs", "minibatches", "ref_refresh_every"):
            if getattr(self, key) <= 0:
                out.append((key, f"must be > 0, got {getattr(self, key)}"))
        if self.group_size == 1:
            out.append(("group_size", "GRPO needs at least 2 samples per prompt"))
        if (self.prompts_per_step * self.group_size) % self.minibatches:
            out.append(("minibatches", f"{self.minibatches} does not divide prompts_per_step*group_size"))
        if self.overlong_max_len and not 0 < self.overlong_cache < self.overlong_max_len:
            out.append(("overlong_cache", "needs 0 < overlong_cache < overlong_max_len"))
        for key in ("clip_low", "clip_high", "beta", "overlong_max_len", "reward_workers", "reward_memory_mb",
                    "reward_max_chars"):
            if getattr(self, key) < 0:
                out.append((key, f"must be >= 0, got {getattr(self, key)}"))
        if self.mismatch_cap <= 0 or (self.mismatch in ("token_mask", "sequence_mask") and self.mismatch_cap < 1):
            out.append(("mismatch_cap", f"must be > 0 (tis) or >= 1 (masks: the band [1/cap, cap]), got "
                                        f"{self.mismatch_cap}"))
        if self.reward_timeout <= 0:
            out.append(("reward_timeout", f"must be > 0 seconds, got {self.reward_timeout}"))
        return out


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How grpo rollouts, eval samples and rejection samples are drawn (`sampling.generate`).

    The defaults sample the model's own distribution (what GRPO's importance ratios assume). R1
    evaluates at temperature 0.6, top-p 0.95 (section 3.1) and samples R1-Zero's rollouts at 1.0."""

    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0  # nucleus: the smallest set of tokens whose probability reaches top_p
    top_k: int = 0  # 0: no top-k cut
    max_new_tokens: int = 256
    # reshard the params once per rollout into the decode layout (sharding.DECODE_RULES: no FSDP
    # split of d_model, so no weight all-gather per generated token), sample, drop the copy
    decode_layout: bool = True

    def errors(self) -> list[tuple[str, str]]:
        out = []
        if self.max_new_tokens <= 0:
            out.append(("max_new_tokens", f"must be > 0, got {self.max_new_tokens}"))
        if self.top_k < 0:
            out.append(("top_k", f"must be >= 0 (0: no cut), got {self.top_k}"))
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            out.append(("temperature" if self.temperature < 0 else "top_p", "temperature >= 0 and 0 < top_p <= 1"))
        return out


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Sampled evaluation as in R1 (section 3.1): pass@1 averaged over k samples (drawn with the
    `sampling` section; R1: temperature 0.6, top-p 0.95), cons@k majority vote over the same
    samples, and greedy accuracy."""

    sets: tuple[str, ...] = ("heldout",)  # heldout (the data source's eval split), gsm8k, math500, aime2024
    examples: int = 0  # problems per set; 0: all (heldout: train.eval_examples)
    k: int = 4  # samples per problem (R1: 4 to 64 depending on the set's size)
    greedy: bool = True
    seed: int = 0
    batch_size: int = 128  # rows per sampling call (fixed shapes: one compilation)

    def errors(self) -> list[tuple[str, str]]:
        out = []
        known = ("heldout", "gsm8k", "math500", "aime2024")
        bad = [s for s in self.sets if s not in known]
        if bad:
            out.append(("sets", f"unknown eval sets {bad} (known: {', '.join(known)})"))
        for key in ("k", "batch_size"):
            if getattr(self, key) <= 0:
                out.append((key, f"must be > 0, got {getattr(self, key)}"))
        if self.examples < 0:
            out.append(("examples", "must be >= 0"))
        return out


@dataclasses.dataclass(frozen=True)
class RejectionConfig:
    """Rejection sampling (R1 section 2.3.3): sample from a checkpoint (with the `sampling` section),
    keep the correct and readable chains of thought, mix in non-reasoning data. A limit of 0 means
    "no limit"."""

    prompts: int = 256  # prompts drawn from data.split (procedural sources: the first N; files: up to N, 0: all)
    samples_per_prompt: int = 4  # completions sampled per prompt
    prompts_per_batch: int = 64  # prompts sampled at once
    require_format: bool = True  # the template's <think>/<answer> layout (rewards.format_reward)
    target_language: str = "en"  # a key of rewards.LANGUAGE_PREDICATES
    min_language_consistency: float = 0.99  # share of target-language words in the CoT (R1 section 2.3.2)
    min_reasoning_chars: int = 1  # chain-of-thought length, characters, after stripping
    max_reasoning_chars: int = 0
    reject_code_blocks: bool = True  # a fenced code block (``` or ~~~) in the CoT
    max_paragraph_chars: int = 2000  # longest CoT paragraph (blank-line separated), characters
    dedupe: bool = True  # drop a kept (reasoning, answer) seen before for the prompt, whitespace-normalised
    max_kept_per_prompt: int = 0  # keep at most this many per prompt, in sampling order
    non_reasoning_ratio: float = 0.0  # share of non-reasoning examples in the output (R1: 200k of 800k)
    non_reasoning_path: str = ""  # JSONL of non-reasoning SFT examples (question, answer[, reasoning])
    seed: int = 0  # sampling, the mix's sampling and shuffling
    out: str = ""  # the dataset directory; "": <checkpoint.dir>/dataset

    def errors(self) -> list[tuple[str, str]]:
        from r1jax.rewards.language import LANGUAGE_PREDICATES

        out = []
        for key in ("samples_per_prompt", "prompts_per_batch"):
            if getattr(self, key) <= 0:
                out.append((key, f"must be > 0, got {getattr(self, key)}"))
        for key in ("prompts", "min_reasoning_chars", "max_reasoning_chars", "max_paragraph_chars",
                    "max_kept_per_prompt"):
            if getattr(self, key) < 0:
                out.append((key, f"must be >= 0, got {getattr(self, key)}"))
        if self.max_reasoning_chars and self.max_reasoning_chars < self.min_reasoning_chars:
            out.append(("max_reasoning_chars", (f"{self.max_reasoning_chars} < min_reasoning_chars "
                                                f"{self.min_reasoning_chars}")))
        if self.target_language not in LANGUAGE_PREDICATES:
            out.append(("target_language", f"unknown {self.target_language!r}; known: {', '.join(LANGUAGE_PREDICATES)}"))
        if not 0.0 <= self.min_language_consistency <= 1.0:
            out.append(("min_language_consistency", f"must be in [0, 1], got {self.min_language_consistency}"))
        if not 0.0 <= self.non_reasoning_ratio < 1.0:
            out.append(("non_reasoning_ratio", f"must be in [0, 1), got {self.non_reasoning_ratio}"))
        return out


@dataclasses.dataclass(frozen=True)
class RMConfig:
    """A reward-model stage (`r1jax rm`): Bradley-Terry on preference pairs (train/reward_model.py).

    The pairs come from `data` (source jsonl: lines {"prompt", "chosen", "rejected"[, "margin"]};
    or the procedural parity_preference task); held-out pair accuracy is measured on
    train.eval_examples pairs of data.eval_split (eval_path: a JSONL of pairs instead)."""

    margin: float = 0.0  # m in -log sigmoid(r_chosen - r_rejected - m), added to each pair's own "margin"
    eval_path: str = ""
    # what the model reads of a response: all of it, or only the summary after the last </think>
    # (R1 judges helpfulness on the summary); GRPO scores rollouts the same way (grpo.reward_model)
    view: Literal["response", "summary"] = "response"

    def errors(self) -> list[tuple[str, str]]:
        return [("margin", f"must be >= 0, got {self.margin}")] if self.margin < 0 else []


@dataclasses.dataclass(frozen=True)
class DistillConfig:
    """Distillation into a (dense) student. `sequence`: SFT on the teacher's accepted samples (R1
    section 2.4, the paper's method: point data.path at a rejection-sampling dataset); `logits`: match
    the frozen teacher's token distribution on the same data (forward / reverse KL or generalised JSD
    at a temperature, full or top-k teacher)."""

    mode: Literal["sequence", "logits"] = "sequence"
    teacher: str = ""  # logits: the teacher checkpoint (run dir or step dir); same tokenizer as the student
    loss: Literal["forward_kl", "reverse_kl", "jsd"] = "forward_kl"
    jsd_beta: float = 0.5  # generalised JSD mixing weight
    temperature: float = 1.0
    top_k: int = 0  # 0: the full teacher distribution; k: its top-k, renormalised
    ce_weight: float = 0.0  # add this times the hard-label cross-entropy

    def errors(self) -> list[tuple[str, str]]:
        out = []
        if self.mode == "logits" and not self.teacher:
            out.append(("teacher", "logit distillation needs distill.teacher (a checkpoint)"))
        if not 0 < self.jsd_beta < 1:
            out.append(("jsd_beta", f"must be in (0, 1), got {self.jsd_beta}"))
        if self.temperature <= 0:
            out.append(("temperature", f"must be > 0, got {self.temperature}"))
        if self.top_k < 0 or self.ce_weight < 0:
            out.append(("top_k" if self.top_k < 0 else "ce_weight", "must be >= 0"))
        return out


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """Multi-process (multi-host) runtime; empty fields come from the environment (see r1jax.distributed)."""

    coordinator_address: str = ""  # host:port of process 0
    num_processes: int = 0
    process_id: int = -1
    initialization_timeout: int = 300  # seconds to wait for every process to join
    heartbeat_timeout: int = 30  # seconds after which a silent peer counts as dead

    def errors(self) -> list[tuple[str, str]]:
        out = [(key, f"must be > 0 seconds, got {getattr(self, key)}")
               for key in ("initialization_timeout", "heartbeat_timeout") if getattr(self, key) <= 0]
        if self.num_processes < 0:
            out.append(("num_processes", f"must be >= 0 (0: from the environment), got {self.num_processes}"))
        if self.process_id < -1 or (self.num_processes and self.process_id >= self.num_processes):
            why = f"must be -1 (from the environment) or in 0..num_processes-1, got {self.process_id}"
            out.append(("process_id", why))
        return out


@dataclasses.dataclass(frozen=True)
class Config:
    """A whole run: the model, the mesh, and (for training stages) what and how to train."""

    model: ModelConfig
    mesh: MeshConfig = MeshConfig()
    train: TrainConfig = TrainConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    data: DataConfig = DataConfig()
    tokenizer: TokenizerConfig = TokenizerConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    distributed: DistributedConfig = DistributedConfig()
    grpo: GRPOConfig = GRPOConfig()
    sampling: SamplingConfig = SamplingConfig()
    eval: EvalConfig = EvalConfig()
    rejection: RejectionConfig = RejectionConfig()
    distill: DistillConfig = DistillConfig()
    rm: RMConfig = RMConfig()
    name: str = ""


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


_MERGE_TAG = "tag:yaml.org,2002:merge"


class _DuplicateKey(ConfigError):
    """A mapping key given twice (kept apart: an override that is not YAML is a string, but one
    with a duplicate key is an error)."""


def _duplicate_keys(node: yaml.Node, where: str, prefix: str = "", seen: set | None = None,
                    lines: bool = True) -> None:
    """Raise ConfigError at the second occurrence of a key in any one mapping of `node` (PyYAML keeps
    the last value silently), naming `where`:line and the dotted key. Merge keys (`<<: *base`) may be
    overridden, as YAML allows."""
    seen = set() if seen is None else seen
    if id(node) in seen:  # an alias to a node already checked
        return
    seen.add(id(node))
    if isinstance(node, yaml.MappingNode):
        first: dict = {}
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE_TAG:
                _duplicate_keys(value_node, where, prefix, seen, lines)
                continue
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
            line = key_node.start_mark.line + 1
            if key is not None and (key_node.tag, key) in first:
                at, before = (f"{where}:{line}", f" (first given on line {first[key_node.tag, key]})") if lines \
                    else (where, "")
                raise _DuplicateKey(f"{at}: {prefix}{key}: duplicate key{before}; give each key once")
            if key is not None:
                first[key_node.tag, key] = line
            _duplicate_keys(value_node, where, f"{prefix}{key}." if key is not None else prefix, seen, lines)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _duplicate_keys(item, where, f"{prefix.rstrip('.')}[{i}].", seen, lines)


def load_yaml(text: str, where: str, prefix: str = "") -> Any:
    """Parse YAML `text` safely, refusing duplicate keys; errors are one-line ConfigErrors at `where`
    (a file name, with the line; or "command line" with `prefix`, the dotted key of the override)."""
    loader = None
    try:
        loader = yaml.SafeLoader(text)  # checks the characters first
        node = loader.get_single_node()
        if node is None:
            return None
        _duplicate_keys(node, where, prefix, lines=where != CLI)
        return loader.construct_document(node)
    except yaml.reader.ReaderError as e:  # a control character: a binary file, most likely
        raise ConfigError(f"{where}: not a text file (character #x{e.character:04x} at offset {e.position})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f"{where}:{mark.line + 1}" if mark else where
        what = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{at}: not valid YAML ({what})") from None
    except RecursionError:
        raise ConfigError(f"{where}: not valid YAML (nested too deeply)") from None
    finally:
        if loader is not None:
            loader.dispose()


def read_text_file(path: str | Path, what: str = "config file") -> str:
    """The UTF-8 text of `path`; ConfigError naming the file if it is missing, a directory, not a
    regular file, unreadable, or not UTF-8 text."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path}: is a directory, not a {what}")
    if not path.exists():
        raise ConfigError(f"{path}: {what} not found")
    if not path.is_file():
        raise ConfigError(f"{path}: not a regular file, cannot be a {what}")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the {what} ({e.strerror or e})") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not a UTF-8 text file (byte 0x{raw[e.start]:02x} at offset {e.start}); "
                          f"a {what} is YAML text") from None


def read_yaml(path: str | Path, what: str = "config file") -> Any:
    """`read_text_file` + `load_yaml`: the parsed YAML of a file, every problem one ConfigError line."""
    return load_yaml(read_text_file(path, what), str(path))


def _read_yaml(path: Path) -> dict:
    where = _show(path)
    data = load_yaml(read_text_file(where), where) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data


def _merge(dst: dict, src: dict) -> None:
    """Deep-merge `src` into `dst` (mappings merge, anything else replaces)."""
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _merge(dst[k], v)
        else:
            dst[k] = v


def _dotted_keys(d: dict, prefix: str = "") -> list[str]:
    out = []
    for k, v in d.items():
        out.append(f"{prefix}{k}")
        if isinstance(v, dict):
            out.extend(_dotted_keys(v, f"{prefix}{k}."))
    return out


def _load_tree(path: Path, stack: tuple = ()) -> tuple[dict, dict]:
    """(merged tree, {dotted key: file that set it}) of `path` and its `base:` files."""
    path = path.resolve()
    if path in stack:
        raise ConfigError(f"{_show(path)}: `base` includes itself via {' -> '.join(_show(p) for p in stack)}")
    data = _read_yaml(path)
    bases = data.pop("base", None)
    tree: dict = {}
    origins: dict = {}
    for base in [bases] if isinstance(bases, str) else (bases or []):
        if not isinstance(base, str):
            raise ConfigError(f"{_show(path)}: base: expected a path or a list of paths, got {base!r}")
        base_tree, base_origins = _load_tree(path.parent / base, stack + (path,))
        _merge(tree, base_tree)
        origins.update(base_origins)
    _merge(tree, data)
    origins.update({k: _show(path) for k in _dotted_keys(data)})
    return tree, origins


def _show(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def parse_override(text: str) -> tuple[str, Any]:
    """`model.n_layers=4` -> ("model.n_layers", 4). The value is read as YAML (ints, floats, null...)."""
    if "=" not in text:
        raise ConfigError(f"{CLI}: override {text!r} is not of the form key.sub=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    try:
        value = load_yaml(raw, CLI, f"{key}.") if raw.strip() else ""
    except _DuplicateKey:
        raise
    except ConfigError:
        value = raw  # not YAML: the raw string (the schema says whether a string fits)
    return key, value


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (),
                data: dict | None = None) -> Config:
    """Load `path` (YAML, with `base:` includes) or a dict, apply `key=value` overrides, validate."""
    tree: dict = {}
    origins: dict[str, str] = {}
    if path is not None:
        tree, origins = _load_tree(Path(path))
    if data is not None:
        _merge(tree, data)
        origins.update({k: "<dict>" for k in _dotted_keys(data)})
    for ov in overrides:
        key, value = parse_override(ov)
        nested: Any = value
        for part in reversed(key.split(".")):
            nested = {part: nested}
        _merge(tree, nested)
        origins.update({k: CLI for k in _dotted_keys(nested)})
    return build(Config, tree, origins)


def build(cls, tree: dict, origins: dict | None = None, prefix: str = ""):
    """Build dataclass `cls` from a nested dict with type checks and cross-field validation."""
    origins = origins or {}
    obj = _build_dataclass(cls, tree, origins, prefix)
    _validate(obj, origins, prefix)
    return obj


def _where(origins: dict, key: str) -> str:
    # The most specific source that set this key or one of its parents.
    parts = key.split(".")
    for i in range(len(parts), 0, -1):
        src = origins.get(".".join(parts[:i]))
        if src:
            return src
    return "defaults"


def _fail(origins: dict, key: str, msg: str):
    raise ConfigError(f"{_where(origins, key)}: {key}: {msg}")


# Keys that moved to another section: their old spelling gets an error that says where they went.
MOVED = {f"{section}.{key}": f"sampling.{key}" for section, keys in (
    ("grpo", ("temperature", "top_p", "top_k", "max_new_tokens")), ("eval", ("temperature", "top_p", "top_k",
    "max_new_tokens")), ("rejection", ("temperature", "top_p", "max_new_tokens"))) for key in keys}


def _build_dataclass(cls, tree, origins, prefix):
    if not isinstance(tree, dict):
        _fail(origins, prefix.rstrip("."), f"expected a mapping for {cls.__name__}, got {tree!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if dotted in MOVED:
            _fail(origins, dotted, f"moved to {MOVED[dotted]} (one sampling section for grpo, eval and rejection)")
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.6)
            hint = f" (did you mean '{close[0]}'?)" if close else f" (known: {', '.join(sorted(fields))})"
            _fail(origins, dotted, f"unknown key{hint}")
        kwargs[key] = _coerce(hints[key], value, origins, dotted)
    for name, f in fields.items():
        if name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            hint = hints[name]
            if dataclasses.is_dataclass(hint):
                kwargs[name] = _coerce(hint, {}, origins, f"{prefix}{name}")
            else:
                _fail(origins, f"{prefix}{name}", f"missing required key ({_type_name(hint)})")
    return cls(**kwargs)


def _type_name(t) -> str:
    if typing.get_origin(t) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(t))
    if typing.get_origin(t) in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(t))
    return "null" if t is type(None) else getattr(t, "__name__", str(t))


def _coerce(t, value, origins, key):
    origin = typing.get_origin(t)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(t)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(a, value, origins, key)
            except ConfigError:
                if len([x for x in args if x is not type(None)]) == 1:
                    raise
        _fail(origins, key, f"expected {_type_name(t)}, got {value!r}")
    if origin is Literal:
        choices = typing.get_args(t)
        if value not in choices:
            close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            _fail(origins, key, f"expected one of {', '.join(repr(c) for c in choices)}, got {value!r}{hint}")
        return value
    if dataclasses.is_dataclass(t):
        return _build_dataclass(t, value, origins, key + ".")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            _fail(origins, key, f"expected a list, got {value!r}")
        (elem, *_rest) = typing.get_args(t)
        return tuple(_coerce(elem, v, origins, f"{key}[{i}]") for i, v in enumerate(value))
    if t is bool:
        if not isinstance(value, bool):
            _fail(origins, key, f"expected true/false, got {value!r}")
        return value
    if t is int:
        if isinstance(value, bool) or not isinstance(value, int):
            _fail(origins, key, f"expected an integer, got {value!r}")
        return value
    if t is float:
        if isinstance(value, str):  # PyYAML (YAML 1.1) reads 1e-3 as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            _fail(origins, key, f"expected a number, got {value!r}")
        try:
            value = float(value)
        except OverflowError:  # an integer beyond the float range
            _fail(origins, key, f"must be a finite number, got an integer of {len(str(abs(value)))} digits")
        if not math.isfinite(value):
            _fail(origins, key, f"must be a finite number, got {value!r}")
        return value
    if t is str:
        if not isinstance(value, str):
            _fail(origins, key, f"expected a string, got {value!r}")
        return value
    raise TypeError(f"config schema: unsupported type {t} at {key}")


def _validate(cfg, origins, prefix):
    if isinstance(cfg, Config):
        for key, msg in cfg.model.errors():
            _fail(origins, f"model.{key}", msg)
        for key, msg in cfg.mesh.errors():
            _fail(origins, f"mesh.{key}", msg)
        for key, msg in mesh_model_errors(cfg.mesh, cfg.model):
            _fail(origins, key, msg)
        for key, msg in cfg.optimizer.model_errors(cfg.model):
            _fail(origins, f"optimizer.{key}", msg)
        for section in ("train", "optimizer", "data", "checkpoint", "distributed", "grpo", "sampling", "eval",
                        "rejection", "distill", "rm"):
            for key, msg in getattr(cfg, section).errors():
                _fail(origins, f"{section}.{key}", msg)
        for key, msg in cfg.tokenizer.count_errors():
            _fail(origins, f"tokenizer.{key}", msg)
        for key, msg in length_errors(cfg, set_keys=set(origins)):
            _fail(origins, key, msg)
    elif hasattr(cfg, "errors"):
        for key, msg in cfg.errors():
            _fail(origins, f"{prefix}{key}", msg)


def length_errors(cfg: Config, set_keys: set[str] | None = None) -> list[tuple[str, str]]:
    """Sequence lengths that do not fit model.max_seq_len, as (dotted key, message) pairs.

    train.seq_len is the packed row (SFT, distillation) or the whole rollout buffer, prompt + new
    tokens (GRPO); sampling.max_new_tokens and train.eval_max_new_tokens must leave room for a prompt.
    With `set_keys`, only the lengths named there are checked: a stage config that sets a length must
    fit its model, while defaults stay usable with any model (converting or summarising a model with a
    short max_seq_len). Prompt lengths are known only at run time (GRPO checks its prompt budget,
    `r1jax sample` the longest prompt + --max-new-tokens).
    """
    m = cfg.model.max_seq_len
    out = []
    checks = (("train.seq_len", cfg.train.seq_len, m, "exceeds"),
              ("sampling.max_new_tokens", cfg.sampling.max_new_tokens, m - 1, "leaves no room for a prompt within"),
              ("train.eval_max_new_tokens", cfg.train.eval_max_new_tokens, m - 1, "leaves no room for a prompt within"))
    for key, value, limit, what in checks:
        if (set_keys is None or key in set_keys) and value > limit:
            out.append((key, f"{value} {what} model.max_seq_len={m} (the longest sequence the model takes)"))
    return out


def mesh_model_errors(mesh: MeshConfig | dict, model: ModelConfig) -> list[tuple[str, str]]:
    """Divisibility of the model by the mesh axes that shard it (axes given as -1 are skipped)."""
    sizes = mesh if isinstance(mesh, dict) else dataclasses.asdict(mesh)
    out = []
    t, e, f = sizes["tensor"], sizes["expert"], sizes["fsdp"]
    checks = []
    if t > 1:
        checks += [("model.n_heads", model.n_heads, t, "mesh.tensor"), ("model.vocab_size", model.vocab_size, t, "mesh.tensor"),
                   ("model.d_ff", model.d_ff, t, "mesh.tensor")]
        if not model.is_mla:
            checks.append(("model.n_kv_heads", model.kv_heads, t, "mesh.tensor"))
        if model.is_moe:
            checks.append(("model.moe_d_ff", model.moe_d_ff, t, "mesh.tensor"))
    if e > 1 and model.is_moe:
        checks.append(("model.n_routed_experts", model.n_routed_experts, e, "mesh.expert"))
    if f > 1:
        checks.append(("model.d_model", model.d_model, f, "mesh.fsdp"))
    for key, value, size, axis in checks:
        if value % size:
            out.append((axis, f"{axis.split('.')[1]}={size} does not divide {key}={value}"))
    return out


def to_dict(cfg) -> dict:
    """Plain nested dict (for saving next to checkpoints and for printing)."""
    return dataclasses.asdict(cfg)
