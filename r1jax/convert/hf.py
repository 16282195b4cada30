"""HF checkpoints <-> r1jax parameters for DeepSeek-V3/R1, DeepSeek-V2, Qwen2/2.5 and Llama 3.

Names follow the released checkpoints (`model.layers.{i}.mlp.experts.{e}.gate_proj.weight`, MTP
modules as `model.layers.{n_layers + k}.*`). HF linear weights are [out, in]; r1jax kernels are
[in..., out...] with the head dimension split out, so a weight converts by a transpose and a
reshape. Loading builds each parameter with `jax.make_array_from_callback`: a device's shard is
read straight from the memory-mapped file (only the rows and columns it owns, FP8 dequantised on
the way), so host memory never holds the checkpoint, and on a multi-host mesh each host reads only
what its devices hold. Saving fetches one layer-and-expert slice at a time and streams it to disk.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
from flax import nnx

from r1jax.config import ConfigError, ModelConfig, build
from r1jax.convert.safetensors_io import SCALE_SUFFIX, Checkpoint, SafetensorsWriter
from r1jax.errors import CheckpointError
from r1jax.models.transformer import abstract_model
from r1jax.progress import Progress
from r1jax.sharding import state_shardings

NP_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16)}


@dataclasses.dataclass(frozen=True)
class Entry:
    """One r1jax parameter and the HF tensors it is made of.

    kind: "linear"  HF [out, in] <-> r1jax [*in_dims, *out_dims] (first n_in dims are `in`)
          "vector"  HF [n] <-> r1jax [*dims] with prod(dims) = n
          "same"    identical shapes (embedding table)
    layers: HF layer index for each slice of r1jax's leading stacked axis (None: not stacked).
    experts: number of per-expert HF tensors along the axis after `layers` (0: none).
    """

    path: tuple[str, ...]
    hf: str  # template with {layer} and {expert}
    kind: str
    n_in: int = 1
    layers: tuple[int, ...] | None = None
    experts: int = 0

    @property
    def n_lead(self) -> int:
        return (self.layers is not None) + (self.experts > 0)

    def names(self) -> list[tuple[tuple[int, ...], str]]:
        """[(index into the leading axes, HF name)] for every HF tensor of this entry."""
        layers = list(enumerate(self.layers)) if self.layers is not None else [(None, None)]
        experts = range(self.experts) if self.experts else [None]
        return [(tuple(i for i in (li, e) if i is not None), self.hf.format(layer=layer, expert=e))
                for li, layer in layers for e in experts]

    def hf_shape(self, inner: Sequence[int]) -> tuple[int, ...]:
        if self.kind == "linear":
            return (math.prod(inner[self.n_in:]), math.prod(inner[:self.n_in]))
        if self.kind == "vector":
            return (math.prod(inner),)
        return tuple(inner)

    def to_hf(self, inner: np.ndarray) -> np.ndarray:
        if self.kind == "linear":
            return inner.reshape(math.prod(inner.shape[:self.n_in]), -1).T
        return inner.reshape(self.hf_shape(inner.shape))


def _block_entries(cfg: ModelConfig, moe: bool) -> list[tuple[tuple[str, ...], str, str, int, bool]]:
    """(r1jax sub-path, HF suffix after `model.layers.{i}.`, kind, n_in, per_expert) of one block."""
    e = [(("attn_norm", "scale"), "input_layernorm.weight", "vector", 1, False),
         (("mlp_norm", "scale"), "post_attention_layernorm.weight", "vector", 1, False)]
    a = "self_attn."
    if cfg.is_mla:
        if cfg.q_lora_rank:
            e += [(("attn", "wq_a"), a + "q_a_proj.weight", "linear", 1, False),
                  (("attn", "q_norm", "scale"), a + "q_a_layernorm.weight", "vector", 1, False),
                  (("attn", "wq_b"), a + "q_b_proj.weight", "linear", 1, False)]
        else:
            e += [(("attn", "wq"), a + "q_proj.weight", "linear", 1, False)]
        e += [(("attn", "wkv_a"), a + "kv_a_proj_with_mqa.weight", "linear", 1, False),
              (("attn", "kv_norm", "scale"), a + "kv_a_layernorm.weight", "vector", 1, False),
              (("attn", "wkv_b"), a + "kv_b_proj.weight", "linear", 1, False)]
    else:
        for p in "qkv":
            e.append((("attn", f"w{p}"), a + f"{p}_proj.weight", "linear", 1, False))
            if cfg.qkv_bias:
                e.append((("attn", f"b{p}"), a + f"{p}_proj.bias", "vector", 1, False))
    e.append((("attn", "wo"), a + "o_proj.weight", "linear", 2, False))
    mlp = [("w_gate", "gate_proj"), ("w_up", "up_proj"), ("w_down", "down_proj")]
    if moe:
        e.append((("mlp", "router"), "mlp.gate.weight", "linear", 1, False))
        if cfg.family == "deepseek_v3":
            e.append((("mlp", "router_bias"), "mlp.gate.e_score_correction_bias", "vector", 1, False))
        e += [(("mlp", r), f"mlp.experts.{{expert}}.{h}.weight", "linear", 1, True) for r, h in mlp]
        if cfg.n_shared_experts:
            e += [(("mlp", "shared", r), f"mlp.shared_experts.{h}.weight", "linear", 1, False) for r, h in mlp]
    else:
        e += [(("mlp", r), f"mlp.{h}.weight", "linear", 1, False) for r, h in mlp]
    return e


def hf_layout(cfg: ModelConfig) -> list[Entry]:
    """Every r1jax parameter of `cfg` with its HF tensor names, in HF order."""
    out = [Entry(("embed",), "model.embed_tokens.weight", "same")]
    groups = [("dense_blocks", range(cfg.n_dense_layers), False),
              ("moe_blocks", range(cfg.n_dense_layers, cfg.n_layers), True)]
    for group, layers, moe in groups:
        if len(layers):
            for sub, suffix, kind, n_in, per_expert in _block_entries(cfg, moe):
                out.append(Entry((group, *sub), "model.layers.{layer}." + suffix, kind, n_in, tuple(layers),
                                 cfg.n_routed_experts if per_expert else 0))
    out.append(Entry(("final_norm", "scale"), "model.norm.weight", "vector"))
    if not cfg.tie_embeddings:
        out.append(Entry(("lm_head",), "lm_head.weight", "linear"))
    if cfg.mtp_depth:
        layers = tuple(range(cfg.n_layers, cfg.n_layers + cfg.mtp_depth))
        t = "model.layers.{layer}."
        out += [Entry(("mtp", "enorm", "scale"), t + "enorm.weight", "vector", layers=layers),
                Entry(("mtp", "hnorm", "scale"), t + "hnorm.weight", "vector", layers=layers),
                Entry(("mtp", "eh_proj"), t + "eh_proj.weight", "linear", layers=layers)]
        for sub, suffix, kind, n_in, per_expert in _block_entries(cfg, cfg.is_moe):
            out.append(Entry(("mtp", "block", *sub), t + suffix, kind, n_in, layers,
                             cfg.n_routed_experts if per_expert else 0))
        out.append(Entry(("mtp", "norm", "scale"), t + "shared_head.norm.weight", "vector", layers=layers))
    return out


def _mtp_shared_copies(cfg: ModelConfig) -> list[tuple[str, str]]:
    """HF MTP layers repeat the shared embedding and head: (HF name, source HF name)."""
    head = "model.embed_tokens.weight" if cfg.tie_embeddings else "lm_head.weight"
    out = []
    for layer in range(cfg.n_layers, cfg.n_layers + cfg.mtp_depth):
        out += [(f"model.layers.{layer}.embed_tokens.weight", "model.embed_tokens.weight"),
                (f"model.layers.{layer}.shared_head.head.weight", head)]
    return out


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


def _flat_range(dims: Sequence[int], idx: Sequence[slice]) -> tuple[slice, tuple[slice, ...]]:
    """Map slices over `dims` to one contiguous slice of the flattened dims + slices still to apply."""
    norm = [slice(*s.indices(d)) for s, d in zip(idx, dims)]
    rest = math.prod(dims[1:])
    if all(s == slice(0, d, 1) for s, d in zip(norm[1:], dims[1:])) and norm[0].step == 1:
        return slice(norm[0].start * rest, norm[0].stop * rest), (slice(None),) * len(dims)
    return slice(0, math.prod(dims)), tuple(norm)


def _read_inner(ckpt: Checkpoint, name: str, entry: Entry, inner: Sequence[int], idx: tuple[slice, ...]) -> np.ndarray:
    """r1jax-layout float32 block inner[idx] of HF tensor `name`, reading only what it needs."""
    if entry.kind == "same":
        return ckpt.read(name, idx)
    if entry.kind == "vector":
        return ckpt.read(name).reshape(inner)[idx]
    in_dims, out_dims = inner[:entry.n_in], inner[entry.n_in:]
    in_rng, in_rest = _flat_range(in_dims, idx[:entry.n_in])
    out_rng, out_rest = _flat_range(out_dims, idx[entry.n_in:])
    block = ckpt.read(name, (out_rng, in_rng)).T  # [in_flat, out_flat] window
    shape_in = _window_shape(in_dims, idx[:entry.n_in], in_rest)
    shape_out = _window_shape(out_dims, idx[entry.n_in:], out_rest)
    return block.reshape(shape_in + shape_out)[in_rest + out_rest]


def _window_shape(dims, idx, rest) -> tuple[int, ...]:
    if all(r == slice(None) for r in rest):  # only the first dim was cut
        first = len(range(*idx[0].indices(dims[0])))
        return (first, *dims[1:])
    return tuple(dims)


def model_config_from_hf(hf: dict, param_dtype: str | None = None, dtype: str | None = None,
                         tensor_names: Sequence[str] | None = None) -> ModelConfig:
    """ModelConfig for an HF config.json dict (transformers 4 or 5 key spellings).

    With `tensor_names`, MTP depth is taken from the MTP layers actually present (transformers
    drops them when it saves, though its config still says num_nextn_predict_layers = 1).
    """
    mt = hf.get("model_type")
    family = {"deepseek_v3": "deepseek_v3", "deepseek_v2": "deepseek_v2", "qwen2": "qwen2", "llama": "llama3"}.get(mt)
    if family is None:
        raise ConfigError(f"HF config: model_type {mt!r} is not supported (deepseek_v3, deepseek_v2, qwen2, llama)")
    rope = dict(hf.get("rope_parameters") or {})
    theta = rope.pop("rope_theta", hf.get("rope_theta", 10000.0))
    scaling = rope or dict(hf.get("rope_scaling") or {})
    rtype = scaling.get("rope_type", scaling.get("type", "default"))
    rope_scaling = None
    if rtype == "yarn":
        rope_scaling = {"type": "yarn", "factor": scaling["factor"],
                        "original_max_position_embeddings": scaling["original_max_position_embeddings"],
                        "beta_fast": scaling.get("beta_fast") or 32.0, "beta_slow": scaling.get("beta_slow") or 1.0,
                        "mscale": scaling.get("mscale") or 0.0, "mscale_all_dim": scaling.get("mscale_all_dim") or 0.0}
    elif rtype == "llama3":
        rope_scaling = {k: scaling[k] for k in ("factor", "original_max_position_embeddings", "low_freq_factor",
                                                  "high_freq_factor")} | {"type": "llama3"}
    elif rtype != "default":
        raise ConfigError(f"HF config: rope type {rtype!r} is not supported (default, yarn, llama3)")
    hf_dtype = str(hf.get("dtype") or hf.get("torch_dtype") or "bfloat16")
    param_dtype = param_dtype or (hf_dtype if hf_dtype in ("float32", "bfloat16") else "bfloat16")
    m = {"family": family, "vocab_size": hf["vocab_size"], "d_model": hf["hidden_size"],
         "n_layers": hf["num_hidden_layers"], "n_heads": hf["num_attention_heads"],
         "d_ff": hf["intermediate_size"], "rope_theta": float(theta), "rope_scaling": rope_scaling,
         "max_seq_len": hf.get("max_position_embeddings", 4096), "norm_eps": float(hf.get("rms_norm_eps", 1e-6)),
         "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
         "param_dtype": param_dtype, "dtype": dtype or param_dtype}
    if family.startswith("deepseek"):
        if hf.get("attention_bias"):
            raise ConfigError("HF config: attention_bias=true is not supported for DeepSeek models")
        if hf.get("moe_layer_freq", 1) != 1:
            raise ConfigError(f"HF config: moe_layer_freq={hf['moe_layer_freq']} is not supported (every layer "
                              "after first_k_dense_replace is MoE)")
        v3 = family == "deepseek_v3"
        method = hf.get("topk_method", "noaux_tc" if v3 else "greedy")
        grouped = method in ("noaux_tc", "group_limited_greedy")
        n_mtp = int(hf.get("num_nextn_predict_layers", 0) or 0) if v3 else 0
        if tensor_names is not None:
            n_mtp = min(n_mtp, len({n.split(".")[2] for n in tensor_names if n.startswith("model.layers.")
                                    and int(n.split(".")[2]) >= hf["num_hidden_layers"]}))
        m.update({
            "q_lora_rank": hf.get("q_lora_rank"), "kv_lora_rank": hf["kv_lora_rank"],
            "qk_nope_head_dim": hf["qk_nope_head_dim"], "qk_rope_head_dim": hf["qk_rope_head_dim"],
            "v_head_dim": hf["v_head_dim"], "n_routed_experts": hf.get("n_routed_experts") or 0,
            "first_k_dense_replace": hf.get("first_k_dense_replace") or 0,
            "n_shared_experts": hf.get("n_shared_experts") or 0, "num_experts_per_tok": hf.get("num_experts_per_tok") or 0,
            "moe_d_ff": hf.get("moe_intermediate_size") or 0,
            "score_func": hf.get("scoring_func", "sigmoid" if v3 else "softmax"),
            "n_group": (hf.get("n_group") or 1) if grouped else 1,
            "topk_group": (hf.get("topk_group") or 1) if grouped else 1,
            "group_score": "top2_sum" if v3 else "max",
            "norm_topk_prob": bool(hf.get("norm_topk_prob", v3)),
            "routed_scaling_factor": float(hf.get("routed_scaling_factor", 1.0)), "mtp_depth": n_mtp,
        })
    else:
        if hf.get("use_sliding_window"):
            raise ConfigError("HF config: use_sliding_window=true is not supported")
        if family == "llama3" and (hf.get("attention_bias") or hf.get("mlp_bias")):
            raise ConfigError("HF config: Llama with attention_bias/mlp_bias is not supported")
        head_dim = hf.get("head_dim") or 0
        if head_dim == hf["hidden_size"] // hf["num_attention_heads"]:
            head_dim = 0  # the default; keeps configs canonical
        m.update({"n_kv_heads": hf.get("num_key_value_heads") or hf["num_attention_heads"],
                  "head_dim": head_dim, "qkv_bias": family == "qwen2"})
    return build(ModelConfig, m, {}, "model.")


def hf_config_from_model(cfg: ModelConfig, dtype: str | None = None) -> dict:
    """config.json for `cfg` in the released checkpoints' spelling (readable by transformers 4 and 5)."""
    dtype = dtype or cfg.param_dtype
    arch = {"deepseek_v3": ("DeepseekV3ForCausalLM", "deepseek_v3"), "deepseek_v2": ("DeepseekV2ForCausalLM", "deepseek_v2"),
            "qwen2": ("Qwen2ForCausalLM", "qwen2"), "llama3": ("LlamaForCausalLM", "llama")}[cfg.family]
    hf = {"architectures": [arch[0]], "model_type": arch[1], "vocab_size": cfg.vocab_size,
          "hidden_size": cfg.d_model, "intermediate_size": cfg.d_ff, "num_hidden_layers": cfg.n_layers,
          "num_attention_heads": cfg.n_heads, "max_position_embeddings": cfg.max_seq_len,
          "rms_norm_eps": cfg.norm_eps, "tie_word_embeddings": cfg.tie_embeddings, "hidden_act": "silu",
          "rope_theta": cfg.rope_theta, "torch_dtype": dtype, "attention_dropout": 0.0}
    s = cfg.rope_scaling
    if s is not None and s.type == "yarn":
        hf["rope_scaling"] = {"type": "yarn", "rope_type": "yarn", "factor": s.factor,
                              "original_max_position_embeddings": s.original_max_position_embeddings,
                              "beta_fast": s.beta_fast, "beta_slow": s.beta_slow, "mscale": s.mscale,
                              "mscale_all_dim": s.mscale_all_dim}
    elif s is not None:
        hf["rope_scaling"] = {"rope_type": "llama3", "factor": s.factor, "low_freq_factor": s.low_freq_factor,
                              "high_freq_factor": s.high_freq_factor,
                              "original_max_position_embeddings": s.original_max_position_embeddings}
    if cfg.is_mla:
        v3 = cfg.family == "deepseek_v3"
        hf.update({"num_key_value_heads": cfg.n_heads, "q_lora_rank": cfg.q_lora_rank, "kv_lora_rank": cfg.kv_lora_rank,
                   "qk_nope_head_dim": cfg.qk_nope_head_dim, "qk_rope_head_dim": cfg.qk_rope_head_dim,
                   "v_head_dim": cfg.v_head_dim, "attention_bias": False,
                   "n_routed_experts": cfg.n_routed_experts or None, "n_shared_experts": cfg.n_shared_experts or None,
                   "num_experts_per_tok": cfg.num_experts_per_tok or None, "moe_intermediate_size": cfg.moe_d_ff,
                   "first_k_dense_replace": cfg.first_k_dense_replace, "norm_topk_prob": cfg.norm_topk_prob,
                   "routed_scaling_factor": cfg.routed_scaling_factor, "scoring_func": cfg.score_func,
                   "n_group": cfg.n_group, "topk_group": cfg.topk_group})
        if v3:
            hf.update({"topk_method": "noaux_tc", "num_nextn_predict_layers": cfg.mtp_depth, "rope_interleave": True})
        else:
            hf["topk_method"] = "group_limited_greedy" if cfg.n_group > 1 else "greedy"
    else:
        hf.update({"num_key_value_heads": cfg.kv_heads, "head_dim": cfg.gqa_head_dim})
        if cfg.family == "llama3":
            hf.update({"attention_bias": False, "mlp_bias": False})
        else:
            hf["use_sliding_window"] = False
    return hf


def _check(ckpt: Checkpoint, cfg: ModelConfig, entries: list[Entry], flat: dict) -> None:
    """Every expected tensor present with the expected shape, nothing unexplained left over."""
    expected: dict[str, tuple[int, ...]] = {}
    for entry in entries:
        inner = flat[entry.path].shape[entry.n_lead:]
        for _, name in entry.names():
            expected[name] = entry.hf_shape(inner)
    for name, shape in expected.items():
        if name not in ckpt:
            raise CheckpointError(f"{ckpt.path}: tensor {name} is missing (needed by the {cfg.family} model config)")
        if ckpt.shape(name) != shape:
            raise CheckpointError(f"{ckpt.path}: tensor {name} has shape {ckpt.shape(name)} "
                                  f"but the model config expects {shape}")
    allowed = {n for n, _ in _mtp_shared_copies(cfg)}
    leftover = []
    for name in ckpt.names:
        if name in expected or name in allowed or name.endswith(SCALE_SUFFIX) or name.endswith("rotary_emb.inv_freq"):
            continue
        parts = name.split(".")
        if cfg.family == "deepseek_v3" and len(parts) > 2 and parts[1] == "layers" and int(parts[2]) >= cfg.n_layers:
            continue  # MTP modules beyond the configured depth
        if name == "lm_head.weight" and cfg.tie_embeddings:
            continue
        leftover.append(name)
    if leftover:
        more = f" and {len(leftover) - 3} more" if len(leftover) > 3 else ""
        raise CheckpointError(f"{ckpt.path}: tensors not used by the {cfg.family} model config: "
                              f"{', '.join(leftover[:3])}{more}")


def load_hf(path: str | Path, cfg: ModelConfig | None = None, mesh=None,
            progress: bool = False) -> tuple[ModelConfig, nnx.GraphDef, nnx.State]:
    """(config, graphdef, state) from an HF checkpoint directory, each shard read in place.

    Without `cfg` the model config comes from the checkpoint's config.json. With `mesh`,
    parameters are created in their shardings (see r1jax.sharding); otherwise on one device.
    `progress`: a progress bar over the HF tensors read (r1jax.progress).
    """
    ckpt = Checkpoint(path)
    if cfg is None:
        if not ckpt.config:
            raise CheckpointError(f"{ckpt.dir}: config.json not found (or pass a model config)")
        cfg = model_config_from_hf(ckpt.config, tensor_names=ckpt.names)
    graphdef, abstract = nnx.split(abstract_model(cfg))
    flat_vars = dict(nnx.to_flat_state(abstract))
    flat = {p: v.get_value() for p, v in flat_vars.items()}
    entries = hf_layout(cfg)
    _check(ckpt, cfg, entries, flat)
    if mesh is not None:
        shard_vars = dict(nnx.to_flat_state(state_shardings(abstract, mesh)))
        shardings = {p: v.get_value() for p, v in shard_vars.items()}
    else:
        dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = {p: dev for p in flat}
    arrays = {}
    bar = Progress(sum(len(e.names()) for e in entries), "reading HF tensors", "tensor",
                   active=None if progress else False)
    for entry in entries:
        arrays[entry.path] = _load_entry(ckpt, entry, flat[entry.path], shardings[entry.path])
        bar.update(len(entry.names()))
    bar.close()
    for p, struct in flat.items():  # e.g. V2 has no correction bias: it starts at zero
        if p not in arrays:
            arrays[p] = jax.make_array_from_callback(
                struct.shape, shardings[p], lambda idx, s=struct: np.zeros(s.shape, s.dtype)[idx])
    state = nnx.from_flat_state([(p, flat_vars[p].replace(arrays[p])) for p in flat_vars])
    return cfg, graphdef, state


def _load_entry(ckpt: Checkpoint, entry: Entry, struct, sharding) -> jax.Array:
    """One parameter, filled layer by layer so the host holds at most one layer's local slices.

    Stacked parameters are allocated (sharded) on device, then each layer is built with
    make_array_from_callback, where every device reads only its own slice (its experts, its FSDP
    rows, its heads), and written in place by a donated dynamic_update_slice.
    """
    np_dtype = np.dtype(struct.dtype)
    inner = struct.shape[entry.n_lead:]
    names = dict(entry.names())

    def build(shape, shard, layer):
        def callback(index: tuple[slice, ...]) -> np.ndarray:
            lead, inner_idx = index[:entry.n_lead - (layer is not None)], tuple(index[len(index) - len(inner):])
            keys = [(layer,) if layer is not None else ()]
            if entry.experts:
                keys = [k + (e,) for k in keys for e in range(*lead[-1].indices(entry.experts))]
            parts = [_read_inner(ckpt, names[k], entry, inner, inner_idx).astype(np_dtype) for k in keys]
            return np.stack(parts) if entry.experts else parts[0]

        return jax.make_array_from_callback(shape, shard, callback)

    if entry.layers is None:
        return build(struct.shape, sharding, None)
    layer_shape = struct.shape[1:]
    layer_sharding = _drop_leading_dim(sharding, len(struct.shape))
    out = _zeros(struct.shape, struct.dtype, sharding)
    for i in range(len(entry.layers)):
        out = _set_layer(out, build(layer_shape, layer_sharding, i), i)
    return out


def _drop_leading_dim(sharding, ndim: int):
    if isinstance(sharding, jax.sharding.NamedSharding):
        spec = tuple(sharding.spec) + (None,) * (ndim - len(sharding.spec))
        return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*spec[1:]))
    return sharding


def _zeros(shape, dtype, sharding) -> jax.Array:
    return _zeros_fn(tuple(shape), np.dtype(dtype), sharding)()


@functools.lru_cache(maxsize=None)
def _zeros_fn(shape, dtype, sharding):
    return jax.jit(lambda: jax.numpy.zeros(shape, dtype), out_shardings=sharding)


@functools.partial(jax.jit, donate_argnums=0)
def _set_layer(stack: jax.Array, layer: jax.Array, i) -> jax.Array:
    return jax.lax.dynamic_update_index_in_dim(stack, layer, i, 0)


# --------------------------------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------------------------------


def _host_slice(arr: jax.Array, idx: tuple[int, ...]) -> np.ndarray:
    """arr[idx] as a numpy array on this host (all processes must call it together)."""
    if arr.is_fully_addressable:
        return np.asarray(jax.device_get(arr[idx] if idx else arr))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(arr[idx] if idx else arr, tiled=True))


def save_hf(state: nnx.State, cfg: ModelConfig, out_dir: str | Path, dtype: str | None = None,
            max_shard_bytes: int = 5 * 2**30, progress: bool = False) -> Path:
    """Write `state` as an HF checkpoint (safetensors shards + index + config.json) in `out_dir`.

    Tensors stream to disk one layer-and-expert slice at a time (`progress`: a bar over them). The output is assembled in a
    sibling temporary directory and renamed into place at the end, and an existing non-empty
    `out_dir` is refused, so nothing already saved is overwritten or left half-written.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise CheckpointError(f"{out_dir}: exists and is not empty; refusing to overwrite it")
    dtype = dtype or cfg.param_dtype
    if dtype not in NP_DTYPES:
        raise ConfigError(f"save_hf: dtype must be one of {sorted(NP_DTYPES)}, got {dtype!r}")
    flat = {p: v.get_value() for p, v in nnx.to_flat_state(state)}
    entries = hf_layout(cfg)
    if cfg.family == "deepseek_v2" and cfg.is_moe:
        for p, a in flat.items():
            if p[-1] == "router_bias" and bool(np.any(_host_slice(a, ()) != 0)):
                raise CheckpointError("deepseek_v2 checkpoints have no correction bias, but this state's is non-zero; "
                                      "export it as family deepseek_v3")
    f32_paths = {e.path for e in entries if e.path[-1] in ("router", "router_bias")}

    def out_dtype(path):
        return NP_DTYPES["float32"] if path in f32_paths else NP_DTYPES[dtype]

    copies: dict[str, list[str]] = {}  # HF name -> names of its MTP-layer duplicates
    for name, src in _mtp_shared_copies(cfg):
        copies.setdefault(src, []).append(name)
    plan = []
    for entry in entries:
        inner = flat[entry.path].shape[entry.n_lead:]
        for _, name in entry.names():
            item = (entry.hf_shape(inner), out_dtype(entry.path))
            plan += [(n, *item) for n in [name, *copies.get(name, [])]]
    primary = jax.process_index() == 0
    tmp = out_dir.with_name(f".{out_dir.name}.partial-{os.getpid()}")
    if primary:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        writer = SafetensorsWriter(tmp, plan, max_shard_bytes, metadata={"producer": "r1jax"})
    bar = Progress(len(plan), "writing HF tensors", "tensor", active=None if progress else False)
    try:
        for entry in entries:
            arr = flat[entry.path]
            for idx, name in entry.names():
                piece = entry.to_hf(_host_slice(arr, idx))
                if primary:
                    for n in [name, *copies.get(name, [])]:
                        writer.write(n, piece)
                bar.update(1 + len(copies.get(name, [])))
        bar.close()
        if primary:
            writer.close()
            (tmp / "config.json").write_text(json.dumps(hf_config_from_model(cfg, dtype), indent=2) + "\n")
            if out_dir.exists():
                out_dir.rmdir()
            tmp.rename(out_dir)
    except BaseException:
        if primary:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
