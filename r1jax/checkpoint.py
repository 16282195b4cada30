"""Orbax checkpoints of model parameters, with the resolved model config beside them.

Layout of a params checkpoint directory:
    config.yaml   the resolved model config (`model:` section), enough to rebuild the model
    state/        Orbax StandardCheckpointer tree of the model state (params + router biases)

Restores onto any mesh: arrays are read directly into the target shardings. A checkpoint whose
shapes do not fit the requested config fails naming the field and both shapes. Existing
checkpoints are never overwritten.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax

import orbax.checkpoint as ocp
import yaml
from flax import nnx

from r1jax.config import ModelConfig, build, to_dict
from r1jax.errors import CheckpointError
from r1jax.models.transformer import abstract_model
from r1jax.sharding import state_shardings


def save_params(path: str | Path, cfg: ModelConfig, state: nnx.State) -> Path:
    """Write `state` and `cfg` to a new directory `path` (refused if it exists)."""
    path = Path(path).absolute()
    if path.exists():
        raise CheckpointError(f"{path}: already exists; refusing to overwrite a checkpoint")
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(yaml.safe_dump({"model": to_dict(cfg)}, sort_keys=False))
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(path / "state", nnx.to_pure_dict(state))
    ckptr.wait_until_finished()
    return path


def load_model_config(path: str | Path) -> ModelConfig:
    f = Path(path) / "config.yaml"
    if not f.is_file():
        raise CheckpointError(f"{Path(path)}: not an r1jax params checkpoint (no config.yaml)")
    data = yaml.safe_load(f.read_text()) or {}
    return build(ModelConfig, data.get("model", {}), {k: str(f) for k in _keys(data.get("model", {}), "model.")},
                 "model.")


def _keys(d: dict, prefix: str) -> list[str]:
    return [prefix + k for k in d]


def restore_params(path: str | Path, cfg: ModelConfig | None = None, mesh=None) -> tuple[ModelConfig, nnx.GraphDef, nnx.State]:
    """(config, graphdef, state) from `path`, in the shardings of `mesh` (default: one device)."""
    path = Path(path).absolute()
    saved = load_model_config(path)
    cfg = cfg or saved
    graphdef, abstract = nnx.split(abstract_model(cfg))
    if mesh is not None:
        shardings = state_shardings(abstract, mesh)
    else:
        dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree.map(lambda v: v.replace(dev), abstract, is_leaf=lambda x: isinstance(x, nnx.Variable))
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          nnx.to_pure_dict(abstract), nnx.to_pure_dict(shardings))
    ckptr = ocp.StandardCheckpointer()
    meta = ckptr.metadata(path / "state")
    tree = getattr(meta, "item_metadata", meta)
    tree = getattr(tree, "tree", tree)
    _check_fits(path, target, tree, saved, cfg)
    restored = ckptr.restore(path / "state", target)
    nnx.replace_by_pure_dict(abstract, restored)
    return cfg, graphdef, abstract


def _check_fits(path: Path, target: dict, saved_tree, saved_cfg: ModelConfig, cfg: ModelConfig) -> None:
    """One clear error for the first field whose presence or shape differs."""
    want = {"/".join(map(str, k)): v.shape for k, v in _flat(target)}
    have = {"/".join(map(str, k)): tuple(getattr(v, "shape", ())) for k, v in _flat(saved_tree)}
    diff = [f.name for f in dataclasses.fields(cfg) if getattr(cfg, f.name) != getattr(saved_cfg, f.name)]
    hint = f" (config fields that differ from the saved one: {', '.join(diff)})" if diff else ""
    for k, shape in want.items():
        if k not in have:
            raise CheckpointError(f"{path}: parameter {k} is not in the checkpoint{hint}")
        if tuple(have[k]) != tuple(shape):
            raise CheckpointError(f"{path}: parameter {k} has shape {tuple(have[k])} in the checkpoint but the "
                                  f"model config expects {tuple(shape)}{hint}")
    extra = sorted(set(have) - set(want))
    if extra:
        raise CheckpointError(f"{path}: checkpoint parameters not in the model config: {', '.join(extra[:3])}{hint}")


def _flat(tree) -> list:
    out = []

    def walk(prefix, node):
        if isinstance(node, dict):
            for k, v in node.items():
                walk(prefix + (k,), v)
        else:
            out.append((prefix, node))

    walk((), tree)
    return out


__all__ = ["save_params", "restore_params", "load_model_config"]

