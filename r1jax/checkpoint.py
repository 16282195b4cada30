"""Orbax checkpoints: training runs (RunCheckpointer) and plain model params (save/restore_params).

A run directory (checkpoint.dir) holds one Orbax step directory per saved step:
    <run>/<step>/state      the TrainState (step, params, optimizer state, router biases)
    <run>/<step>/data       every loader shard's iterator state (JSON)
    <run>/<step>/config     the resolved run config (JSON)
    <run>/<step>/tokenizer  the tokenizer files (JSON, base64), so a stage hands its tokenizer on
Saves are asynchronous, every N steps, keeping the last K; a step that exists is never written
again. Restores go straight into the shardings of the current mesh (resharding on the way), and a
config or checkpoint that does not fit fails naming the field, touching nothing on disk.

A params checkpoint directory (conversion output, stage hand-off):
    config.yaml   the resolved model config (`model:` section), enough to rebuild the model
    state/        Orbax StandardCheckpointer tree of the model state (params + router biases)
"""

from __future__ import annotations

import base64
import dataclasses
import json
from pathlib import Path
from typing import Any

import jax

import orbax.checkpoint as ocp
import yaml
from flax import nnx

from r1jax.config import Config, ConfigError, ModelConfig, build, to_dict
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


# --------------------------------------------------------------------------------------------------
# Training runs
# --------------------------------------------------------------------------------------------------

# Config fields a run may change when it resumes (everything else must match the checkpoint).
RESUMABLE_CHANGES = ("train.steps", "train.log_every", "train.eval_", "mesh.", "checkpoint.", "distributed.",
                     "data.worker_count", "name")


def _dotted(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_dotted(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v
    return out


def config_differences(saved: dict, cfg: Config) -> list[tuple[str, Any, Any]]:
    """(key, saved value, current value) for fields that must not change across a resume."""
    now = _dotted(json.loads(json.dumps(to_dict(cfg))))
    old = _dotted(saved)
    out = []
    for key in sorted(set(now) | set(old)):
        if any(key == p or (p.endswith((".", "_")) and key.startswith(p)) for p in RESUMABLE_CHANGES):
            continue
        if now.get(key) != old.get(key):
            out.append((key, old.get(key), now.get(key)))
    return out


class RunCheckpointer:
    """Orbax CheckpointManager over a run directory (see the module docstring)."""

    ITEMS = ("state", "data", "config", "tokenizer")

    def __init__(self, directory: str | Path, every: int, keep: int, async_save: bool = True):
        self.directory = Path(directory).absolute()
        # Every N steps (and forced saves: the end, SIGTERM); not orbax's default extra save at the
        # first step of a fresh run, which would write a whole model for one step of progress.
        policy = ocp.checkpoint_managers.AnySavePolicy([ocp.checkpoint_managers.FixedIntervalPolicy(every),
                                                        ocp.checkpoint_managers.PreemptionCheckpointingPolicy()])
        options = ocp.CheckpointManagerOptions(save_decision_policy=policy, max_to_keep=keep,
                                               enable_async_checkpointing=async_save, create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=self.ITEMS)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def saved_config(self, step: int | None = None) -> dict:
        step = self.latest_step() if step is None else step
        return self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config

    def check_resumable(self, cfg: Config, step: int | None = None) -> None:
        """Raise naming the first field that differs from the checkpoint's config (nothing is touched)."""
        diffs = config_differences(self.saved_config(step), cfg)
        if diffs:
            key, old, new = diffs[0]
            more = f" (and {len(diffs) - 1} more: {', '.join(d[0] for d in diffs[1:4])})" if len(diffs) > 1 else ""
            raise ConfigError(f"{key}: is {new!r} but the checkpoint in {self.directory} was made with {old!r}; "
                              f"resume with the same value or use a new checkpoint.dir{more}")

    def save(self, step: int, state, data_state: dict, cfg: Config, tokenizer_files: dict[str, bytes],
             force: bool = False) -> bool:
        """Start saving `step` (async). Returns whether a save started (interval policy, or force)."""
        if step in self.manager.all_steps():
            return False  # never rewrite a finished checkpoint
        tok = {name: base64.b64encode(data).decode() for name, data in tokenizer_files.items()}
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
                                  config=ocp.args.JsonSave(json.loads(json.dumps(to_dict(cfg)))),
                                  tokenizer=ocp.args.JsonSave(tok))
        return self.manager.save(step, args=args, force=force)

    def restore(self, step: int, target) -> tuple[Any, dict, dict[str, bytes]]:
        """(state, data state, tokenizer files) of `step`; `target` is the abstract TrainState with
        shardings (its leaves' shardings decide where the arrays land)."""
        args = ocp.args.Composite(state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore(),
                                  tokenizer=ocp.args.JsonRestore())
        try:
            out = self.manager.restore(step, args=args)
        except ValueError as e:  # orbax reports tree/shape mismatches as ValueError
            raise CheckpointError(f"{self.directory}/{step}: the saved train state does not fit this config: "
                                  f"{str(e).splitlines()[0]}") from None
        files = {name: base64.b64decode(data) for name, data in (out.tokenizer or {}).items()}
        return out.state, out.data, files

    def tokenizer_files(self, step: int | None = None) -> dict[str, bytes]:
        """The tokenizer files saved with `step` (default: the latest)."""
        step = self.latest_step() if step is None else step
        out = self.manager.restore(step, args=ocp.args.Composite(tokenizer=ocp.args.JsonRestore()))
        return {name: base64.b64decode(data) for name, data in (out.tokenizer or {}).items()}

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def write_atomic(path: str | Path, data: str | bytes) -> Path:
    """Write a run output file whole or not at all: a temporary file beside it, renamed over it (a
    kill leaves the old file or the new one, never half of one). Returns the path."""
    import os
    import tempfile

    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # as open() would create it (mkstemp makes 0600)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def find_stage_checkpoint(path: str | Path) -> tuple[Path, int | None]:
    """A run directory (latest step) or a params checkpoint: (directory, step or None)."""
    path = Path(path).absolute()
    if (path / "config.yaml").is_file():
        return path, None
    if path.is_dir():
        steps = sorted(int(p.name) for p in path.iterdir() if p.name.isdigit() and (p / "state").is_dir())
        if steps:
            return path, steps[-1]
    raise CheckpointError(f"{path}: no r1jax checkpoint here (neither a run directory with steps nor a params "
                          f"checkpoint with config.yaml)")


__all__ = ["RunCheckpointer", "config_differences", "find_stage_checkpoint", "load_model_config", "restore_params",
           "save_params", "write_atomic"]

