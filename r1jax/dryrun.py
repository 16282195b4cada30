"""Dry run: validate a stage config at its full scale and estimate memory per device, allocating nothing.

`dry_run(cfg, kind, devices)` checks what the run would check (every config section the stage
reads, the mesh resolved for `devices` and its divisibility of the model, the batch over the batch
axes) and returns a printable per-device memory report. Nothing is allocated and no device is
needed: the model and train state are `jax.eval_shape`d, and the shardings are the very ones the
run uses (`train_state_shardings`, `state_shardings`, RULES) built on a `jax.sharding.AbstractMesh`
of the resolved sizes. A 671B model on 256 devices is checked on a laptop CPU in a few seconds.

What the report counts, per device:
  persistent  params, AdamW moments (their dtype as optax keeps them), router biases; GRPO's
              reference params when grpo.beta > 0; logit distillation's frozen teacher.
  phases      what one step of the stage holds on top: SFT / distillation a train step (grads:
              the float32 accumulator at grad_accum > 1, else one buffer in the param dtype;
              saved activations of one microbatch, one layer's buffers, the head's chunk); GRPO a
              rollout (KV cache of prompts_per_step x group_size sequences of train.seq_len,
              written in place, each prompt prefilled once), the log-prob passes in microbatches
              (pi_old, pi_ref) and a minibatch update; rejection sampling and eval a sampling batch.
A phase counts its ungrouped items as held throughout and, of its groups (one layer of the dense
stack, of the MoE stack, the output head's sequence chunk, the prefill), the largest: they are live
at different times. The peak is the persistent state plus the largest phase. Activation bytes
follow the arrays the code materialises (blockwise attention, chunked log-probs: no [S, S] or
[S, vocab] array past one block or chunk), with per-element sizes measured with XLA's CPU
memory_analysis at small shapes (tests/test_dryrun.py keeps tiny SFT steps, rollouts and log-prob
passes within 25% of it); other backends fuse differently, and communication buffers and
fragmentation are not counted: the peak is an estimate, not a bound.

The teacher of logit distillation is sized from its checkpoint's saved model config (a params
checkpoint's config.yaml, or a run directory's saved config). A teacher that does not exist yet can
be sized with `teacher=` (a ModelConfig or a model YAML such as configs/models/deepseek_r1.yaml);
a missing checkpoint without it is a ConfigError, since the real run would fail there too.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import AbstractMesh, AxisType

from r1jax.config import Config, ConfigError, ModelConfig, build, load_config, mesh_model_errors
from r1jax.models.dispatch import window_rows
from r1jax.models.moe import dispatch_path, route_dtype, token_chunks
from r1jax.models.transformer import abstract_model
from r1jax.sharding import BATCH_AXES, MESH_AXES, bytes_per_device, logical_to_spec, use_layout
from r1jax.stages.registry import STAGES

GiB = 2**30
PROMPT_TOKENS = 1024  # rejection / eval sampling: the longest prompt assumed (their buffers are sized to it)

@dataclasses.dataclass(frozen=True)
class Item:
    name: str
    bytes: int  # per device
    detail: str = ""
    # items of one phase with the same non-empty group are live at the same time, and each group
    # at a different time (e.g. the layers' buffers, then the output head's): see Phase.total
    group: str = ""


@dataclasses.dataclass(frozen=True)
class Phase:
    name: str
    items: tuple[Item, ...]

    @property
    def total(self) -> int:
        """Ungrouped items (held through the phase) plus the largest group (Item.group)."""
        groups: dict[str, int] = {}
        for i in self.items:
            if i.group:
                groups[i.group] = groups.get(i.group, 0) + i.bytes
        return sum(i.bytes for i in self.items if not i.group) + max(groups.values(), default=0)


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """Per-device memory of one stage at full scale (see the module docstring)."""

    kind: str
    name: str
    devices: int
    mesh: dict[str, int]
    summary: tuple[str, ...]  # model and run lines for the report
    persistent: Phase
    phases: tuple[Phase, ...]
    assumptions: tuple[str, ...]
    notes: tuple[str, ...]  # warnings that do not stop the run

    @property
    def peak_phase(self) -> Phase | None:
        return max(self.phases, key=lambda p: p.total, default=None)

    @property
    def total(self) -> int:
        return self.persistent.total + (self.peak_phase.total if self.phases else 0)

    def item(self, name: str, phase: str | None = None) -> Item:
        """The item called `name` (in the phase whose name starts with `phase`, if given)."""
        for p in (self.persistent, *self.phases):
            if phase is not None and not p.name.startswith(phase):
                continue
            for it in p.items:
                if it.name == name:
                    return it
        raise KeyError(f"no item {name!r}" + (f" in phase {phase!r}" if phase else ""))


# --------------------------------------------------------------------------------------------------
# Mesh and validation
# --------------------------------------------------------------------------------------------------


def abstract_mesh(sizes: dict[str, int]) -> AbstractMesh:
    """A device-free mesh with r1jax's axes and axis types (Auto, as sharding.make_mesh builds)."""
    return AbstractMesh(tuple(sizes[a] for a in MESH_AXES), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def resolve_mesh(cfg: Config, devices: int | None = None) -> dict[str, int]:
    """Mesh axis sizes for `devices` devices (default: the product of the configured sizes)."""
    for key, msg in cfg.mesh.errors():
        raise ConfigError(f"mesh.{key}: {msg}")
    if devices is None:
        fill = [a for a in MESH_AXES if getattr(cfg.mesh, a) == -1]
        if fill:
            raise ConfigError(f"mesh.{fill[0]}: -1 fills the devices present; a dry run needs the device count "
                              f"(devices=, --devices) or an explicit mesh.{fill[0]}")
        devices = math.prod(getattr(cfg.mesh, a) for a in MESH_AXES)
    if devices <= 0:
        raise ConfigError(f"mesh: {devices} devices is not a device count")
    sizes = cfg.mesh.resolve(devices)
    for key, msg in mesh_model_errors(sizes, cfg.model):
        raise ConfigError(f"{key}: {msg}")
    return sizes


def _axes(entry) -> tuple[str, ...]:
    return () if entry is None else (entry if isinstance(entry, tuple) else (entry,))


def batch_shards(rows: int, sizes: dict[str, int]) -> int:
    """Into how many parts the batch axes split `rows` rows (RULES: axes that do not divide are skipped)."""
    return math.prod(sizes[a] for a in _axes(logical_to_spec(("batch",), sizes, (rows,))[0]))


def rows_per_device(rows: int, sizes: dict[str, int]) -> int:
    return -(-rows // batch_shards(rows, sizes))


def _split(n: int, logical: str, sizes: dict[str, int]) -> int:
    """n / the mesh axes that shard logical axis `logical` of length n."""
    return n // math.prod(sizes[a] for a in _axes(logical_to_spec((logical,), sizes, (n,))[0]))


def _check_sections(cfg: Config, kind: str) -> None:
    for key, msg in cfg.model.errors():
        raise ConfigError(f"model.{key}: {msg}")
    for section in STAGES[kind].sections:
        for key, msg in getattr(cfg, section).errors():
            raise ConfigError(f"{section}.{key}: {msg}")


def _check_batches(cfg: Config, kind: str, sizes: dict[str, int]) -> list[str]:
    """Errors for global batches the run could not shard; notes for (micro)batches that replicate."""
    full = math.prod(sizes[a] for a in BATCH_AXES)
    notes = []

    def partial(what: str, rows: int) -> None:
        if rows % full:
            notes.append(f"{what} of {rows} rows does not split over all {full} batch shards (data*fsdp*expert): "
                         f"it is replicated over {full // batch_shards(rows, sizes)}x the devices it needs")

    if kind in ("sft", "distill"):
        b = cfg.train.batch_size
        if b % full:
            raise ConfigError(f"train.batch_size: {b} rows do not split over the {full} batch shards "
                              f"(data*fsdp*expert = {full}); the loader shards every batch over all of them")
        partial("a microbatch (train.batch_size / train.grad_accum)", b // cfg.train.grad_accum)
    if kind == "grpo":
        g, rows = cfg.grpo, cfg.grpo.prompts_per_step * cfg.grpo.group_size
        if cfg.train.seq_len <= cfg.sampling.max_new_tokens:
            raise ConfigError(f"train.seq_len: {cfg.train.seq_len} leaves no room for prompts after "
                              f"sampling.max_new_tokens={cfg.sampling.max_new_tokens}")
        if (rows // g.minibatches) % cfg.train.grad_accum:
            raise ConfigError(f"train.grad_accum: {cfg.train.grad_accum} does not divide a GRPO minibatch of "
                              f"{rows // g.minibatches} rollouts (grpo.prompts_per_step * group_size / minibatches)")
        if rows % full:
            raise ConfigError(f"grpo.prompts_per_step: {g.prompts_per_step} x group_size {g.group_size} = {rows} "
                              f"rollouts do not split over the {full} batch shards (data*fsdp*expert)")
        partial("a GRPO minibatch (prompts_per_step*group_size / minibatches)", rows // g.minibatches)
    if kind == "rejection":
        partial("a sampling batch (prompts_per_batch*samples_per_prompt)",
                cfg.rejection.prompts_per_batch * cfg.rejection.samples_per_prompt)
    if kind == "eval":
        partial("an eval sampling batch (eval.batch_size)", cfg.eval.batch_size)
    return notes


# --------------------------------------------------------------------------------------------------
# Teacher (logit distillation)
# --------------------------------------------------------------------------------------------------


def teacher_model_config(cfg: Config, teacher: ModelConfig | str | Path | None = None) -> tuple[ModelConfig, str]:
    """(the teacher's ModelConfig, where it came from) for distill.mode=logits.

    `teacher` overrides: a ModelConfig, or a YAML config file whose `model:` section is the teacher.
    Otherwise distill.teacher must be a checkpoint: a params checkpoint (its config.yaml) or a run
    directory (the config saved with its latest step)."""
    if isinstance(teacher, ModelConfig):
        return teacher, "given"
    if teacher is not None:
        return load_config(teacher).model, str(teacher)
    from r1jax.errors import CheckpointError

    path = cfg.distill.teacher
    try:
        return _saved_model_config(path)
    except (CheckpointError, KeyError) as e:
        raise ConfigError(f"distill.teacher: {path}: cannot read the teacher's model config ({e}); to size a "
                          f"teacher that does not exist yet, pass teacher= a ModelConfig or a model YAML") from None


def _saved_model_config(path: str) -> tuple[ModelConfig, str]:
    """The model config saved with a checkpoint (a params checkpoint's config.yaml, or a run
    directory's latest step) and where it was read; CheckpointError / KeyError when there is none."""
    from r1jax.checkpoint import RunCheckpointer, find_stage_checkpoint, load_model_config

    directory, step = find_stage_checkpoint(path)
    if step is None:
        return load_model_config(directory), f"{directory}/config.yaml"
    saved = RunCheckpointer(directory, every=1, keep=1, async_save=False, read_only=True).saved_config(step)
    return build(ModelConfig, saved["model"], {}, "model."), f"{directory}/{step}/config"


def _reward_model_items(cfg: Config, sizes: dict[str, int]) -> tuple[list[Item], list[str]]:
    """grpo.reward_model's frozen params and router biases per device (sharded like the policy's),
    read from its checkpoint's saved model config; a reward model not trained yet (a pipeline's
    rm stage) is sized as the policy's decoder with a score head, and a note says so."""
    from r1jax.errors import CheckpointError

    path, notes = cfg.grpo.reward_model, []
    try:
        rm, source = _saved_model_config(path)
    except (CheckpointError, KeyError, OSError):
        rm, source = dataclasses.replace(cfg.model, score_head=True), "the policy's architecture"
        notes.append(f"grpo.reward_model: {path} cannot be read yet; sized as the policy's decoder with a score head")
    p_bytes, b_bytes = _model_state_bytes(rm, sizes)
    return [Item("reward model params", p_bytes, f"{rm.param_dtype}, frozen (grpo.reward_model, {source})"),
            Item("reward model router biases", b_bytes, "float32")], notes


# --------------------------------------------------------------------------------------------------
# Bytes of sharded abstract state
# --------------------------------------------------------------------------------------------------


def _local_bytes(abstract, shardings) -> int:
    """Bytes one device holds: each leaf's shard shape under its NamedSharding, times its itemsize."""
    leaves, shards = jax.tree.leaves(abstract), jax.tree.leaves(shardings)
    if len(leaves) != len(shards):
        raise ValueError(f"{len(leaves)} arrays but {len(shards)} shardings")
    return sum(math.prod(s.shard_shape(a.shape)) * np.dtype(a.dtype).itemsize for a, s in zip(leaves, shards))


def _model_state_bytes(model: ModelConfig, sizes: dict[str, int]) -> tuple[int, int]:
    """(params, router biases) bytes per device of `model`, sharded as the run shards them."""
    from r1jax.models.layers import RouterBias

    _, params, bias = nnx.split(abstract_model(model), nnx.Param, RouterBias)
    return bytes_per_device(params, sizes), bytes_per_device(bias, sizes)


def _dtype_names(tree) -> str:
    names = sorted({str(x.dtype) for x in jax.tree.leaves(tree) if x.ndim})
    return "/".join(names) or "none"


# --------------------------------------------------------------------------------------------------
# Activations: per device, from shapes
# --------------------------------------------------------------------------------------------------


def _itemsize(dtype: str) -> int:
    return np.dtype(dtype).itemsize


# Bytes per element of the buffers below were measured with XLA's CPU memory_analysis of the code's
# own functions at small shapes (bfloat16 compute; tests/test_dryrun.py keeps the whole-step figures
# within 25%). XLA:CPU computes bfloat16 matmuls in float32, so its buffers are at the wide end; a
# TPU or GPU keeps more of them in bfloat16. One layer's buffers (attention, MLP or experts) of the
# dense stack, of the MoE stack, and the output head's are live at different times (Item.group): a
# phase counts the largest.
SCORE_BYTES = 12  # blockwise attention: float32 logits, probabilities, their gradient per block-pair element
QKV_BYTES_BWD = 6.5  # blockwise backward: q, k, v, output blocks and their float32 gradients, per token x head x dim
MLP_BYTES = (3, 11)  # x act: gate, up, product (forward); and their float32 gradients (backward), per token x d_ff
LAYER_BYTES_BWD = 32  # a layer's backward: its [rows, S, d_model] activations and float32 gradients, per element
HEAD_COPIES = (2, 3)  # float32 [rows, chunk, vocab] arrays per head chunk: logits, log-softmax (+ gradient)


def attention_path(m: ModelConfig, length: int) -> tuple[str, int]:
    """(how attention runs at `length` tokens, its block): "dense" (model.attention=dense: the
    [S, S] reference), "one block" (a blockwise path whose one block covers the row: a plain masked
    softmax, [S, S] too), or "blockwise" (flash-style, [block, block] at a time; splash and cuDNN
    keep block-sized buffers as well and are counted as blockwise)."""
    if m.attention == "dense":
        return "dense", length
    n = -(-length // m.attention_block)
    return ("one block", length) if n == 1 else ("blockwise", -(-length // n))


def _attention_buffers(m: ModelConfig, sizes: dict[str, int], rows: int, length: int, backward: bool) -> list[Item]:
    act, r = _itemsize(m.dtype), rows_per_device(rows, sizes)
    heads = _split(m.n_heads, "act_heads", sizes)
    path, c = attention_path(m, length)
    if path != "blockwise":  # [S, S]: the mask, float32 logits, masked, softmax; act probabilities (+ gradient)
        return [Item("attention mask", r * length * length, f"[{r}, {length}, {length}] bool ({path})"),
                Item("attention scores", r * heads * length * length * (12 + (2 if backward else 1) * act),
                     f"[{r}, {heads} heads, {length}, {length}] ({path}): float32 logits, masked, softmax; "
                     f"{m.dtype} probabilities" + (" and their gradient" if backward else ""))]
    dk, dv = (m.qk_head_dim, m.v_head_dim) if m.is_mla else (m.gqa_head_dim, m.gqa_head_dim)
    items = [Item("attention block scores", r * heads * c * c * SCORE_BYTES,
                  f"[{r}, {heads} heads, {c}, {c}] float32, one block pair at a time ({length // c + (length % c > 0)} "
                  f"blocks of {c}, model.attention_block={m.attention_block})")]
    if backward:
        items.append(Item("attention q/k/v blocks and gradients", int(r * length * heads * (dk + dv) * QKV_BYTES_BWD),
                          f"[{r}, {length}, {heads} heads, {dk} + {dv}]: blocked inputs, output, float32 dq/dk/dv"))
    return items


def _layer_buffers(m: ModelConfig, sizes: dict[str, int], rows: int, length: int, backward: bool,
                   who: str = "") -> list[Item]:
    """One layer's buffers in each scanned stack (one group per stack: the stacks' loops run at
    different times): attention and the MLP or routed experts."""
    act, r = _itemsize(m.dtype), rows_per_device(rows, sizes)
    f = _split(m.d_ff, "act_mlp", sizes)
    mlp = Item("MLP hidden", MLP_BYTES[backward] * r * length * f * act,
               f"gate, up, product [{r}, {length}, {f}]" + (" and their gradients" if backward else ""))
    attn = _attention_buffers(m, sizes, rows, length, backward)
    if backward:  # the layer's recomputed inputs, outputs and norms with their float32 gradients
        attn.append(Item("layer activations and gradients", LAYER_BYTES_BWD * r * length * m.d_model,
                         f"[{r}, {length}, {m.d_model}]: residual, norms, projections, float32 gradients"))
    stacks = [("dense blocks", m.n_dense_layers > 0, mlp), ("MoE blocks", m.n_moe_layers > 0, None)]
    per_stack = [[dataclasses.replace(it, name=f"{who}{stack}: {it.name} (one layer)", group=f"{who}{stack}")
                  for it in (*attn, ffn or _moe_buffers(m, sizes, rows, length, backward))]
                 for stack, present, ffn in stacks if present]
    if backward:  # each stack's loop at its own time
        return [it for items in per_stack for it in items]
    return max(per_stack, key=lambda items: sum(it.bytes for it in items))  # forward loops share them


def _moe_buffers(m: ModelConfig, sizes: dict[str, int], rows: int, length: int, backward: bool) -> Item:
    """What models.moe.routed_experts_sharded materialises for one layer, by its dispatch path.

    gather: the tokens all-gathered over the expert axes that also shard the batch, then every
    (token, choice) row of them, local expert or not: sorted inputs, gate / up / product hidden,
    float32 outputs before and after unsorting. all_to_all (models/dispatch.py): the device's own
    rows sorted, their outputs and float32 combine; one round's window of moe_capacity x rows with
    its hidden (backward: the window's inputs and output cotangents, exchanged together)."""
    act, d, k = _itemsize(m.dtype), m.d_model, m.num_experts_per_tok
    token_axes = _axes(logical_to_spec(("batch", None, None), sizes, (rows, length, d))[0])
    w_spec = logical_to_spec(("experts", "embed", "mlp"), sizes, (m.n_routed_experts, d, m.moe_d_ff))
    gather = math.prod(sizes[a] for a in _axes(w_spec[0]) if a in token_axes)
    replicated = [a for a in _axes(w_spec[0]) if a not in token_axes]
    f = m.moe_d_ff // math.prod(sizes[a] for a in _axes(w_spec[2]))
    t_local = rows_per_device(rows, sizes) * length
    shared = MLP_BYTES[backward] * t_local * m.n_shared_experts * f * act
    shared_note = f"; shared experts {shared / GiB:.2f} GiB" if shared else ""
    per_row = d * act + 3 * f * act + 2 * d * 4  # sorted input, gate/up/product hidden, float32 output x2
    if not replicated and dispatch_path(m.moe_dispatch, gather, k) == "all_to_all":
        chunks = token_chunks(t_local, m.moe_chunk)
        n = t_local // chunks * k  # one chunk's rows
        w = window_rows(n, m.moe_capacity)
        window = w * per_row
        total = 2 * t_local * d * act + n * d * (2 * act + 2 * 4)  # sorted rows, their outputs, float32 combine
        total += 3 * window + n * d * 3 * act + w * 2 * d * act if backward else window * 5 // 4
        if backward and chunks > 1:  # the backward keeps every chunk's sorted rows and float32 outputs
            total += t_local * k * d * (act + 4)
        return Item("routed experts", total + shared,
                    f"all-to-all over {gather} expert shards: {n} rows of {d} (top-{k} of {t_local // chunks} "
                    f"tokens{f', {chunks} chunks, model.moe_chunk={m.moe_chunk}' if chunks > 1 else ''}), a window "
                    f"of {w} rows (model.moe_capacity={m.moe_capacity:g}) with {f} hidden" + shared_note)
    t = t_local * gather
    base = t * k * per_row
    total = 2 * t * d * act + (3 * base if backward else base * 5 // 4)
    return Item("routed experts", total + shared,
                f"{t} tokens (x{gather}: gathered over the expert axis) x top-{k} rows of {d} and {f} hidden"
                + shared_note)


def _logits(m: ModelConfig, sizes: dict[str, int], rows: int, length: int, backward: bool, what: str,
            depth: int = 1, chunk: int | None = None) -> Item:
    """The output head's float32 arrays (group "head"): one sequence chunk of `chunk` (default
    model.logits_chunk) tokens at a time (losses.head_chunks), or the whole sequence with chunk 0."""
    r = rows_per_device(rows, sizes)
    v = _split(m.vocab_size, "act_vocab", sizes)
    chunk = m.logits_chunk if chunk is None else chunk
    chunk = chunk if 0 < chunk < length else length
    copies = HEAD_COPIES[backward]
    how = f"one chunk of {chunk} at a time" if chunk < length else "the whole sequence (model.logits_chunk=0)"
    return Item(f"logits ({what})", copies * depth * r * chunk * v * 4,
                f"{copies} x {depth} x [{r}, {chunk}, {v}] float32, {how}", group="head")


def _train_activations(cfg: Config, sizes: dict[str, int], rows: int, length: int, with_mtp: bool,
                       head: bool = True) -> list[Item]:
    """A microbatch of `rows` rows through the forward and backward pass (see _layer_buffers); with
    `head`, the output head's logits chunk (a reward model's scalar head has none)."""
    m, act = cfg.model, _itemsize(cfg.model.dtype)
    r = rows_per_device(rows, sizes)
    layers = m.n_layers + (m.mtp_depth if with_mtp else 0)
    saved = layers * r * length * m.d_model * act
    bound = "" if m.remat == "full" else f" (remat={m.remat}: a lower bound, see notes)"
    items = [Item("saved layer inputs", saved, f"{layers} layers x [{r}, {length}, {m.d_model}] {m.dtype}{bound}")]
    items += _layer_buffers(m, sizes, rows, length, backward=True)
    if with_mtp:  # the MTP depths' outputs feed the main stack's gradient: their buffers outlive their loop
        items.append(Item("MTP activations and gradients", m.mtp_depth * LAYER_BYTES_BWD * r * length * m.d_model,
                          f"{m.mtp_depth} depths x [{r}, {length}, {m.d_model}], held through the main stacks' backward"))
    if head:
        depth = 1 + (m.mtp_depth if with_mtp else 0)
        what = "and their gradient" + (", MTP depths included" if with_mtp else "")
        items.append(_logits(m, sizes, rows, length, True, what, depth))
    return items


def _kv_cache(m: ModelConfig, sizes: dict[str, int], rows: int, length: int) -> Item:
    """init_cache: MLA keeps c_kv + k_rope per token and layer, GQA K and V; sharded over the batch."""
    act, r = _itemsize(m.dtype), rows_per_device(rows, sizes)
    per = (m.kv_lora_rank + m.qk_rope_head_dim) if m.is_mla else 2 * m.kv_heads * m.gqa_head_dim
    what = (f"MLA ({m.kv_lora_rank} + {m.qk_rope_head_dim})" if m.is_mla
            else f"GQA K+V (2 x {m.kv_heads} x {m.gqa_head_dim})")
    return Item("KV cache", m.n_layers * r * length * per * act,
                f"{m.n_layers} layers x [{r}, {length}] x {what} {m.dtype}, updated in place")


def _sampling_phase(cfg: Config, sizes: dict[str, int], prompts: int, samples: int, prompt: int, max_new: int,
                    name: str) -> Phase:
    """generate(samples_per_prompt=samples): one cache and token buffer of prompt + max_new per
    sampled row, written in place; each prompt prefilled once (prompts rows over the prompt width),
    its cache entries then copied to its rows; decode reads the cache block by block."""
    m, length, rows = cfg.model, prompt + max_new, prompts * samples
    r, rp = rows_per_device(rows, sizes), rows_per_device(prompts, sizes)
    v = _split(m.vocab_size, "act_vocab", sizes)
    prompt_cache = dataclasses.replace(_kv_cache(m, sizes, prompts * samples, prompt), name="prefill: prompt cache",
                                       group="prefill",
                                       detail=f"the prompts' entries, [{r}, {prompt}] per layer, copied to the rows")
    items = [_kv_cache(m, sizes, rows, length),
             Item("token buffer", r * length * 4, f"[{r}, {length}] int32"),
             Item("next-token logits", 3 * r * v * 4, f"3 x [{r}, {v}] float32: logits, filtered, log-softmax"),
             prompt_cache,
             *[dataclasses.replace(it, group="prefill")
               for it in _layer_buffers(m, sizes, prompts, prompt, backward=False, who="prefill: ")]]
    return Phase(f"{name} ({prompts} prompts x {samples} samples = {rows} sequences x {length} tokens, {r} per "
                 f"device; each prompt prefilled once, {rp} per device, width {prompt})", tuple(items))


# --------------------------------------------------------------------------------------------------
# The plan
# --------------------------------------------------------------------------------------------------


def plan_memory(cfg: Config, kind: str, devices: int | None = None, *,
                teacher: ModelConfig | str | Path | None = None) -> MemoryPlan:
    """Validate `cfg` for stage `kind` on `devices` devices and estimate its memory per device.

    Raises ConfigError (one line naming the key) for anything the run would reject: a section's
    errors, a mesh that cannot be resolved or does not divide the model, a batch that cannot be
    sharded, an unreadable logit-distillation teacher."""
    if kind not in STAGES:
        raise ValueError(f"unknown stage kind {kind!r}; known: {', '.join(STAGES)}")
    _check_sections(cfg, kind)
    sizes = resolve_mesh(cfg, devices)
    notes = _check_batches(cfg, kind, sizes)
    mesh, m = abstract_mesh(sizes), cfg.model
    logit_distill = kind == "distill" and cfg.distill.mode == "logits"
    tcfg, source = teacher_model_config(cfg, teacher) if logit_distill else (None, "")
    if tcfg is not None:
        for key, msg in mesh_model_errors(sizes, tcfg):
            raise ConfigError(f"distill.teacher: the teacher ({source}) does not fit the mesh: {key}: {msg}")

    from r1jax.summary import count_params

    counts = count_params(m)
    summary = [f"model: {counts.total / 1e9:.2f}B params" + (f" (+{counts.mtp / 1e9:.2f}B MTP)" if counts.mtp else "")
               + f", {m.family}, params {m.param_dtype}, compute {m.dtype}, remat {m.remat}"]
    if STAGES[kind].plan == "sampling":
        p_bytes, b_bytes = _model_state_bytes(m, sizes)
        persistent = [Item("params", p_bytes, f"{m.param_dtype}, sharded by sharding.RULES"),
                      Item("router biases", b_bytes, "float32")]
        phases = [_inference_phase(cfg, kind, sizes)]
    else:
        persistent, phases = _training(cfg, kind, sizes, mesh, tcfg)
        notes += _training_notes(cfg)
    if tcfg is not None:
        summary.append(f"teacher ({source}): {count_params(tcfg).total / 1e9:.2f}B params, {tcfg.family}")
    if cfg.train.seq_len > m.max_seq_len and kind != "eval":
        notes.append(f"train.seq_len {cfg.train.seq_len} exceeds model.max_seq_len {m.max_seq_len}")
    notes += _missing_paths(cfg, kind)
    if STAGES[kind].plan == "grpo" and cfg.grpo.reward_model:
        notes += _reward_model_items(cfg, sizes)[1]
    return MemoryPlan(kind=kind, name=cfg.name or m.family, devices=math.prod(sizes.values()), mesh=sizes,
                      summary=tuple(summary), persistent=Phase("persistent", tuple(persistent)), phases=tuple(phases),
                      assumptions=_ASSUMPTIONS, notes=tuple(notes))


def _inference_phase(cfg: Config, kind: str, sizes: dict[str, int]) -> Phase:
    if kind == "rejection":
        r = cfg.rejection
        prompts, samples = r.prompts_per_batch, r.samples_per_prompt
    else:
        prompts, samples = cfg.eval.batch_size, 1
    max_new = cfg.sampling.max_new_tokens
    return _sampling_phase(cfg, sizes, prompts, samples, PROMPT_TOKENS, max_new, "sampling")


def _training(cfg: Config, kind: str, sizes: dict[str, int], mesh: AbstractMesh,
              tcfg: ModelConfig | None) -> tuple[list[Item], list[Phase]]:
    """Persistent items (the TrainState as the run shards it, + reference or teacher) and the phases."""
    from r1jax.train.state import abstract_train_state, make_context, train_state_shardings

    m = cfg.model
    ctx = make_context(cfg)
    state, shard = abstract_train_state(ctx), train_state_shardings(ctx, mesh)
    p_bytes = _local_bytes(state.params, shard.params)
    persistent = [Item("params", p_bytes, f"{m.param_dtype}, sharded by sharding.RULES"),
                  Item("optimizer state", _local_bytes(state.opt_state, shard.opt_state),
                       f"AdamW moments in {_dtype_names(state.opt_state)}, sharded like the params"),
                  Item("router biases", _local_bytes(state.router_bias, shard.router_bias), "float32")]
    if cfg.train.grad_accum == 1:
        grads = Item("grads", p_bytes, f"{m.param_dtype}, like the params (grad_accum 1: no accumulator)")
    else:
        grads = Item("grads", p_bytes * 4 // _itemsize(m.param_dtype),
                     f"float32: the scan carry summing {cfg.train.grad_accum} microbatch grads (the step's grads)")
    if STAGES[kind].plan == "grpo":
        if cfg.grpo.beta > 0:
            persistent.append(Item("reference params", p_bytes, f"grpo.beta={cfg.grpo.beta} > 0: a frozen copy"))
        if cfg.grpo.reward_model:
            persistent += _reward_model_items(cfg, sizes)[0]
        return persistent, _grpo_phases(cfg, sizes, grads)
    if tcfg is not None:
        t_params, t_bias = _model_state_bytes(tcfg, sizes)
        persistent += [Item("teacher params", t_params, f"{tcfg.param_dtype}, frozen"),
                       Item("teacher router biases", t_bias, "float32")]
    if kind == "rm":
        return persistent, [_reward_model_phase(cfg, sizes, grads)]
    return persistent, [_train_step_phase(cfg, kind, sizes, grads, tcfg)]


def _reward_model_phase(cfg: Config, sizes: dict[str, int], grads: Item) -> Phase:
    """reward_model_step: both sides of a microbatch's pairs in one forward and backward (2 rows
    per pair), scored by the scalar head at each row's eos: no [rows, S, vocab] logits."""
    s, a = cfg.train.seq_len, cfg.train.grad_accum
    pairs = cfg.train.batch_size // a
    rb = rows_per_device(cfg.train.batch_size, sizes)
    items = [grads, *_accumulator(grads, cfg),
             Item("pair arrays", 2 * 2 * rb * s * 4, f"2 sides x 2 x [{rb}, {s}] int32 (tokens, segment ids)"),
             *_train_activations(cfg, sizes, 2 * pairs, s, with_mtp=False, head=False)]
    r = rows_per_device(2 * pairs, sizes)
    return Phase(f"train step (microbatch of {pairs} pairs = {2 * pairs} rows x {s} tokens, {r} per device; "
                 f"{a} per step)", tuple(items))


def _accumulator(grads: Item, cfg: Config) -> list[Item]:
    """update.accumulate_gradients at grad_accum > 1: one microbatch's grads, in the param dtype,
    beside the float32 carry ("grads"); at grad_accum 1 there is only the one grads buffer."""
    if cfg.train.grad_accum == 1:
        return []
    b = grads.bytes * _itemsize(cfg.model.param_dtype) // 4
    return [Item("microbatch grads", b, f"{cfg.model.param_dtype}, added into the float32 carry")]


def _grpo_phases(cfg: Config, sizes: dict[str, int], grads: Item) -> list[Phase]:
    """GRPOIteration: generate all rollouts at once, pi_old (and pi_ref) over all of them, then
    `minibatches` updates (grpo_step over train.grad_accum microbatches)."""
    g, m, s = cfg.grpo, cfg.model, cfg.train.seq_len
    rows = g.prompts_per_step * g.group_size
    mb = rows // g.minibatches
    micro = mb // cfg.train.grad_accum
    r = rows_per_device(rows, sizes)
    new = cfg.sampling.max_new_tokens
    shared = g.prompts_per_step % math.prod(sizes[a] for a in BATCH_AXES) == 0  # stages/grpo.py rollout
    prompts, samples = (g.prompts_per_step, g.group_size) if shared else (rows, 1)
    rollout = _sampling_phase(cfg, sizes, prompts, samples, s - new, new, "rollout")
    if cfg.sampling.decode_layout:  # stages/grpo.py rollout: sampling.decode_state's copy
        train_bytes = sum(_model_state_bytes(m, sizes))
        with use_layout("decode"):
            decode_bytes = sum(_model_state_bytes(m, sizes))
        if decode_bytes != train_bytes:
            copy = Item("decode-layout params", decode_bytes,
                        "the params resharded once for decoding (sampling.decode_layout: d_model not split over "
                        "fsdp/expert, so no weight all-gather per token); dropped after the rollout")
            rollout = dataclasses.replace(rollout, items=(copy, *rollout.items))
    replay = []
    if g.routing_replay != "off" and m.n_moe_layers:  # sampling.generate(record_routes=True): kept to the updates
        dt = jnp.dtype(route_dtype(m.n_routed_experts))
        k = m.num_experts_per_tok
        replay = [Item("recorded routes", r * s * m.n_moe_layers * k * dt.itemsize,
                       f"[{r}, {s}, {m.n_moe_layers}, {k}] {dt.name}: the experts the sampler selected per token "
                       f"and MoE layer (grpo.routing_replay), kept from the rollout to the last update")]
        rollout = dataclasses.replace(rollout, items=(*rollout.items, *replay))
    passes = "pi_old and pi_ref, one after the other" if g.beta > 0 else "pi_old"
    n_pass = g.minibatches * cfg.train.grad_accum  # GRPOIteration.pass_micro
    pass_rows = rows // n_pass
    outputs = (2 if g.beta > 0 else 1) * r * s * 4
    logprob = Phase(f"log-prob pass ({passes}; {n_pass} microbatches of {pass_rows} sequences, "
                    f"{rows_per_device(pass_rows, sizes)} per device; packed by length: at most this)",
                    (Item("log-probs", outputs, f"[{r}, {s}] float32 per pass"), *replay,
                     *_layer_buffers(m, sizes, pass_rows, s, backward=False),
                     _logits(m, sizes, pass_rows, s, False, "and their log-softmax")))
    arrays = Item("rollout batch arrays", 7 * r * s * 4, f"7 x [{r}, {s}] (tokens, targets, masks, log-probs)")
    update = Phase(f"update (minibatch of {mb} sequences, {rows_per_device(mb, sizes)} per device; "
                   f"{cfg.train.grad_accum} microbatches)",
                   (grads, *_accumulator(grads, cfg), arrays, *replay,
                    *_train_activations(cfg, sizes, micro, s, with_mtp=False)))
    return [rollout, logprob, update]


def _train_step_phase(cfg: Config, kind: str, sizes: dict[str, int], grads: Item, tcfg: ModelConfig | None) -> Phase:
    """sft_step / distill_step: one microbatch's forward and backward (update.accumulate_gradients:
    at grad_accum > 1 a scan summing into a float32 carry); a logit-distillation teacher runs its
    forward first and keeps only its final hidden state, its logits coming chunk by chunk with the
    student's (train/distill.py)."""
    m, s, a = cfg.model, cfg.train.seq_len, cfg.train.grad_accum
    micro, rb = cfg.train.batch_size // a, rows_per_device(cfg.train.batch_size, sizes)
    items = [grads, *_accumulator(grads, cfg), Item("batch arrays", 5 * rb * s * 4, f"5 x [{rb}, {s}] int32")]
    with_mtp = kind == "sft" and cfg.train.mtp and m.mtp_depth > 0
    items += _train_activations(cfg, sizes, micro, s, with_mtp)
    r = rows_per_device(micro, sizes)
    if tcfg is not None:
        items.append(Item("teacher hidden", r * s * tcfg.d_model * _itemsize(tcfg.dtype),
                          f"[{r}, {s}, {tcfg.d_model}] {tcfg.dtype}, held through the student's pass"))
        # the teacher's head runs in the student's chunks, its logits beside the student's
        items.append(dataclasses.replace(_logits(tcfg, sizes, micro, s, False, "", chunk=m.logits_chunk),
                                         name="teacher logits"))
        items += _layer_buffers(tcfg, sizes, micro, s, backward=False, who="teacher: ")
    return Phase(f"train step (microbatch of {micro} rows x {s} tokens, {r} per device; {a} per step)", tuple(items))


def _training_notes(cfg: Config) -> list[str]:
    m, notes = cfg.model, []
    if m.remat != "full":
        notes.append(f"model.remat={m.remat}: each layer keeps more than its input for the backward pass; "
                     f"'saved layer inputs' is then only a lower bound on the saved activations")
    if m.param_dtype == "bfloat16" and not cfg.optimizer.stochastic_rounding:
        lr = cfg.optimizer.lr
        notes.append(f"params are bfloat16 with no float32 master copy and round-to-nearest updates "
                     f"(optimizer.stochastic_rounding: false): an AdamW step (about lr = {lr:g} per "
                     f"weight) is below half a bfloat16 ulp for |w| > {lr * 2**8:.1e}, so most updates round away")
    return notes


def _missing_paths(cfg: Config, kind: str) -> list[str]:
    paths = {"checkpoint.init_from": cfg.checkpoint.init_from, "tokenizer.path": cfg.tokenizer.path}
    if kind != "eval" and cfg.data.source in ("jsonl", "tfds"):
        paths["data.path"] = cfg.data.path
    if kind == "rejection":
        paths["rejection.non_reasoning_path"] = cfg.rejection.non_reasoning_path
    return [f"{key}: {value} does not exist here (the run needs it)" for key, value in paths.items()
            if value and not Path(value).exists()]


_ASSUMPTIONS = (
    "shardings: the run's own (train_state_shardings / state_shardings over sharding.RULES) on an AbstractMesh",
    "activations per device from shapes; remat=full keeps each scanned block's input for the backward pass",
    "a phase holds its ungrouped items throughout and the largest of its groups (one layer of the dense stack, "
    "of the MoE stack, the output head's chunk, the prefill) at once; bytes per element measured with XLA's CPU "
    "memory_analysis (bfloat16 compute, which XLA:CPU widens to float32: other backends hold less)",
    "attention: model.attention=dense or a sequence within one model.attention_block holds [S, S] scores; longer "
    "sequences run blockwise (splash / cuDNN counted alike), [block, block] at a time",
    f"KV cache sharded over the batch axes only; GRPO rollouts fill train.seq_len, rejection / eval sampling "
    f"assumes prompts of at most {PROMPT_TOKENS} tokens + max_new_tokens",
    "peak = persistent + the largest phase; compiler temporaries, collectives and fragmentation not counted",
)


# --------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------


def _gib(n: float) -> str:
    return f"{n / GiB:10.2f}"


def check_fits(plan: MemoryPlan, hbm_gib: float) -> tuple[bool, str]:
    """(whether the estimated peak fits in `hbm_gib` GiB per device, a one-line verdict)."""
    need, have = plan.total, hbm_gib * GiB
    if need <= have:
        return True, f"fits: {need / GiB:.2f} of {hbm_gib:g} GiB per device ({100 * need / have:.0f}%)"
    items = [i for p in (plan.persistent, plan.peak_phase) if p for i in p.items]
    top = ", ".join(f"{i.name} {i.bytes / GiB:.1f}" for i in sorted(items, key=lambda i: -i.bytes)[:3])
    return False, (f"does NOT fit: {need / GiB:.2f} GiB needed, {hbm_gib:g} GiB per device "
                   f"({100 * need / have:.0f}%); largest: {top} GiB")


def format_plan(plan: MemoryPlan, hbm_gib: float | None = None) -> str:
    """The printable report of `plan` (GiB per device; with `hbm_gib`, the check_fits verdict)."""
    mesh = " ".join(f"{k}={v}" for k, v in plan.mesh.items())
    lines = [f"dry run: {plan.kind} {plan.name} on {plan.devices} devices, mesh {mesh}",
             *(f"  {s}" for s in plan.summary),
             "  checks passed: config sections, mesh resolution and divisibility, batch sharding",
             "  memory per device (GiB):"]
    for phase in (plan.persistent, *plan.phases):
        lines.append(f"    {phase.name}: {phase.total / GiB:.2f}"
                     + (" (ungrouped items + the largest group)" if any(i.group for i in phase.items) else ""))
        for it in phase.items:
            at = f" [at one time: {it.group}]" if it.group else ""
            lines.append(f"       {it.name:48s}{_gib(it.bytes)}   {it.detail}{at}")
    peak = plan.peak_phase
    lines.append(f"  peak estimate: persistent {plan.persistent.total / GiB:.2f}"
                 + (f" + {peak.name.split(' (')[0]} {peak.total / GiB:.2f}" if peak else "")
                 + f" = {plan.total / GiB:.2f} GiB per device")
    if hbm_gib is not None:
        lines.append("  " + check_fits(plan, hbm_gib)[1])
    lines.append("  assumptions:")
    lines += [f"    - {a}" for a in plan.assumptions]
    if plan.notes:
        lines.append("  notes:")
        lines += [f"    - {n}" for n in plan.notes]
    return "\n".join(lines)


def dry_run(cfg: Config, kind: str, devices: int | None = None, hbm_gib: float | None = None, *,
            teacher: ModelConfig | str | Path | None = None) -> str:
    """Validate `cfg` as stage `kind` (sft, grpo, rejection, distill, eval) on `devices` devices
    (default: the product of the configured mesh sizes) and return the per-device memory report;
    with `hbm_gib`, the report ends with whether the estimate fits. Allocates nothing large and
    needs no devices. Raises ConfigError naming the key for anything the run would reject."""
    return format_plan(plan_memory(cfg, kind, devices, teacher=teacher), hbm_gib)
