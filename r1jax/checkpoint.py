"""Orbax checkpoints: training runs (RunCheckpointer) and plain model params (save/restore_params).

A run directory (checkpoint.dir) holds one Orbax step directory per saved step:
    <run>/<step>/state      the TrainState (step, params, optimizer state, router biases)
    <run>/<step>/data       every loader shard's iterator state (JSON)
    <run>/<step>/config     the resolved run config (JSON)
    <run>/<step>/tokenizer  the tokenizer files (JSON, base64), so a stage hands its tokenizer on
    <run>/<step>/r1jax_manifest.<process>.json   size + sha256 of each file (see Integrity below)
Saves are asynchronous, every N steps, keeping the last K; a step that exists is never written
again. Restores go straight into the shardings of the current mesh (resharding on the way), and a
config or checkpoint that does not fit fails naming the field, touching nothing on disk.

A params checkpoint directory (conversion output, stage hand-off):
    config.yaml   the resolved model config (`model:` section), enough to rebuild the model
    state/        Orbax StandardCheckpointer tree of the model state (params + router biases)
    r1jax_manifest.<process>.json

Integrity. Orbax checks no file contents (its crc32c covers only the index of a zarr3 shard), so
each checkpoint gets a manifest once its save is complete: every file's size and sha256, one
manifest per process for the files that process wrote, each written whole or not at all. A run
hashes in a background thread after Orbax's async save finishes, off the training step's path
(sha256 runs at ~1.5 GB/s per core, files in parallel; the next save waits for it, as Orbax's own
save waits for the previous one, so hashing slower than checkpoint.every steps would slow the
run). Every restore checks first: the sizes (one stat a file), then the contents (one more read
of the checkpoint, split across processes), before Orbax reads anything. A damaged checkpoint is
a CheckpointDamaged naming it and its first damaged file; nothing is deleted or rewritten. A
checkpoint without a complete manifest (saved before r1jax wrote them, or the process died before
the hashing finished) restores unverified: an error reading it is still reported as damage, in
one line.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import hashlib
import json
import os
import re
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
import yaml
from flax import nnx

from r1jax.config import Config, ConfigError, ModelConfig, build, to_dict
from r1jax.errors import CheckpointDamaged, CheckpointError
from r1jax.models.transformer import abstract_model
from r1jax.sharding import state_shardings

# --------------------------------------------------------------------------------------------------
# Integrity
# --------------------------------------------------------------------------------------------------

MANIFEST = "r1jax_manifest"  # <checkpoint>/r1jax_manifest.<process>.json
# Files Orbax writes per process (each process's OCDBT database and array metadata); the rest: process 0.
_PER_PROCESS = re.compile(r"(?:^|/)(?:ocdbt\.process_|array_metadatas/process_)(\d+)(?:/|$)")
# Tensorstore raises its I/O and decoding failures as ValueError("DATA_LOSS: ...", "OUT_OF_RANGE: ...").
_TS_STATUS = re.compile(r"^[A-Z][A-Z_]+: ")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 23):
            h.update(chunk)
    return h.hexdigest()


def _hash_all(directory: Path, rels: list[str]) -> list[str]:
    """sha256 of each file in `rels` (paths under `directory`), several files at a time."""
    with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
        return list(pool.map(lambda rel: _sha256(directory / rel), rels))


def seal(directory: str | Path) -> Path | None:
    """Write directory/r1jax_manifest.<process>.json: the size and sha256 of every file this process
    wrote under `directory`, a checkpoint whose save has finished. Returns the manifest's path, or
    None when the directory went away meanwhile (an old step deleted by checkpoint.keep)."""
    directory = Path(directory)
    process, count = jax.process_index(), jax.process_count()
    try:
        rels = sorted(str(p.relative_to(directory)) for p in directory.rglob("*")
                      if p.is_file() and MANIFEST not in p.name)
        mine = [rel for rel in rels if _writer(rel) == process]
        files = {rel: {"size": (directory / rel).stat().st_size, "sha256": digest}
                 for rel, digest in zip(mine, _hash_all(directory, mine))}
    except FileNotFoundError:
        if not directory.exists():
            return None
        raise
    record = {"version": 1, "process": process, "processes": count, "files": files}
    return write_atomic(directory / f"{MANIFEST}.{process}.json", json.dumps(record, indent=1))


def _writer(rel: str) -> int:
    m = _PER_PROCESS.search(rel)
    return int(m.group(1)) if m else 0


def _manifests(directory: Path) -> tuple[dict[str, dict], bool]:
    """({file: {"size", "sha256"}} from every manifest in `directory`, whether all its processes'
    manifests are there). Raises CheckpointDamaged for a manifest that does not parse."""
    files: dict[str, dict] = {}
    expected, found = 1, 0
    for m in sorted(directory.glob(f"{MANIFEST}.*.json")):
        try:
            record = json.loads(m.read_text())
            files.update({rel: {"size": int(f["size"]), "sha256": str(f["sha256"])} for rel, f in record["files"].items()})
            expected = int(record["processes"])
        except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError):
            raise CheckpointDamaged(f"{directory}: its integrity manifest {m.name} is not readable") from None
        found += 1
    return files, found > 0 and found >= expected


def sealed(directory: str | Path) -> bool:
    """Whether `directory` (a checkpoint) has the manifests of every process that wrote it."""
    try:
        return _manifests(Path(directory))[1]
    except CheckpointDamaged:
        return True  # a manifest is there, damaged: `verify` reports it


def verify(directory: str | Path, items: tuple[str, ...] | None = None) -> None:
    """Check every file the manifests of `directory` record (only those under the top-level
    `items`, if given) against its size and sha256; raise CheckpointDamaged naming `directory` and
    the first damaged file. A checkpoint without manifests passes (see `sealed`).

    Cost: one stat per file, then one read of the recorded files, split across processes (each
    hashes every P-th file; the first damaged one is agreed by an all-gather). Every process must
    see the same files (a shared filesystem, as Orbax needs for multi-host checkpoints anyway)."""
    directory = Path(directory)
    files, _ = _manifests(directory)
    rels = sorted(rel for rel in files if items is None or rel.split("/")[0] in items)
    for rel in rels:
        problem = _size_problem(directory, rel, files[rel]["size"])
        if problem:
            raise CheckpointDamaged(f"{directory}: {problem}")
    share = rels[jax.process_index()::jax.process_count()]
    bad = [i * jax.process_count() + jax.process_index()
           for i, digest in enumerate(_hash_all(directory, share)) if digest != files[share[i]]["sha256"]]
    first = _min_across_processes(min(bad, default=len(rels)))
    if first < len(rels):
        raise CheckpointDamaged(f"{directory}: {rels[first]} is not the file that was written (its sha256 differs "
                                f"from the one recorded at save)")


def _size_problem(directory: Path, rel: str, size: int) -> str | None:
    path = directory / rel
    if not path.is_file():
        parts = Path(rel).parts
        top = next((k for k in range(1, len(parts) + 1) if not directory.joinpath(*parts[:k]).exists()), None)
        if top is None:
            return f"{rel} is not a file"
        return f"{'/'.join(parts[:top])}{'/' if top < len(parts) else ''} is missing"
    have = path.stat().st_size
    if have < size:
        return f"{rel} is truncated ({have} of {size} bytes)"
    if have > size:
        return f"{rel} has grown ({have} bytes, {size} were written)"
    return None


def _min_across_processes(index: int) -> int:
    if jax.process_count() == 1:
        return index
    from jax.experimental import multihost_utils

    return int(np.min(multihost_utils.process_allgather(np.int32(index))))


@contextlib.contextmanager
def _reading(where: Path, what: str):
    """Around an Orbax read of `what` from the checkpoint `where`: a tree or shape mismatch becomes
    a CheckpointError (does not fit this config); in a checkpoint without manifests any other
    failure is damage (CheckpointDamaged); in a verified one it is raised as it is (not a damaged
    file: a bug, out of memory, ...)."""
    try:
        yield
    except (CheckpointError, ConfigError):  # already one line naming the file
        raise
    except Exception as e:
        first = (str(e).splitlines() or [type(e).__name__])[0].split(" See full TensorStore details")[0]
        first = first if len(first) <= 200 else first[:200] + "..."
        if type(e) is ValueError and not _TS_STATUS.match(str(e)):  # orbax: tree / shape mismatch
            raise CheckpointError(f"{where}: does not fit this config ({what}: {first})") from None
        if not sealed(where):
            raise CheckpointDamaged(f"{where}: cannot read its {what} (the checkpoint has no integrity manifest): "
                                    f"{type(e).__name__}: {first}") from None
        raise


# --------------------------------------------------------------------------------------------------
# Params checkpoints
# --------------------------------------------------------------------------------------------------


def save_params(path: str | Path, cfg: ModelConfig, state: nnx.State) -> Path:
    """Write `state` and `cfg` to a new directory `path` (refused if it exists), then its manifest."""
    path = Path(path).absolute()
    if path.exists():
        raise CheckpointError(f"{path}: already exists; refusing to overwrite a checkpoint")
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(yaml.safe_dump({"model": to_dict(cfg)}, sort_keys=False))
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(path / "state", nnx.to_pure_dict(state))
    ckptr.wait_until_finished()
    seal(path)
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
    """(config, graphdef, state) from `path`, in the shardings of `mesh` (default: one device),
    verified first (CheckpointDamaged names the damaged file)."""
    path = Path(path).absolute()
    verify(path)
    with _reading(path, "config.yaml"):
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
    with _reading(path, "params metadata"):
        meta = ckptr.metadata(path / "state")
    tree = getattr(meta, "item_metadata", meta)
    tree = getattr(tree, "tree", tree)
    if not isinstance(tree, dict) or not tree:  # orbax logs an unreadable state/_METADATA and returns nothing
        raise CheckpointDamaged(f"{path}: cannot read its params metadata (state/_METADATA)")
    _check_fits(path, target, tree, saved, cfg)
    with _reading(path, "params"):
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


def _make_run_dir(directory: Path) -> None:
    """Create checkpoint.dir (and its parents); ConfigError in one line if it is a file, sits under
    a file, or cannot be created (permissions, read-only filesystem)."""
    if directory.exists() and not directory.is_dir():
        raise ConfigError(f"checkpoint.dir: {directory} is a file, not a directory")
    blocker = next((p for p in directory.parents if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise ConfigError(f"checkpoint.dir: cannot create {directory}: {blocker} is a file")
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"checkpoint.dir: cannot create {directory}: {e.strerror or e}") from None


class RunCheckpointer:
    """Orbax CheckpointManager over a run directory (see the module docstring). `read_only`: for
    reading another stage's run (nothing is created; saving is not for it)."""

    ITEMS = ("state", "data", "config", "tokenizer")

    def __init__(self, directory: str | Path, every: int, keep: int, async_save: bool = True, read_only: bool = False):
        self.directory = Path(directory).absolute()
        if not read_only:
            _make_run_dir(self.directory)
        # Every N steps (and forced saves: the end, SIGTERM); not orbax's default extra save at the
        # first step of a fresh run, which would write a whole model for one step of progress.
        policy = ocp.checkpoint_managers.AnySavePolicy([ocp.checkpoint_managers.FixedIntervalPolicy(every),
                                                        ocp.checkpoint_managers.PreemptionCheckpointingPolicy()])
        options = ocp.CheckpointManagerOptions(save_decision_policy=policy, max_to_keep=keep,
                                               enable_async_checkpointing=async_save, create=not read_only)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=self.ITEMS)
        self._verified: set[tuple[int, tuple[str, ...] | None]] = set()
        self._unsealed: list[int] = []  # saved steps not yet hashed
        self._sealer: threading.Thread | None = None
        self._seal_errors: list[str] = []

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def step_dir(self, step: int) -> Path:
        return self.directory / str(step)

    def verify(self, step: int, items: tuple[str, ...] | None = None) -> None:
        """Raise CheckpointDamaged naming `step` and its first damaged file (module `verify`; each
        step and item set is checked once per RunCheckpointer)."""
        if (step, None) in self._verified or (step, items) in self._verified:
            return
        verify(self.step_dir(step), items)
        self._verified.add((step, items))

    def saved_config(self, step: int | None = None) -> dict:
        step = self.latest_step() if step is None else step
        self.verify(step, ("config",))
        with _reading(self.step_dir(step), "config"):
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
        """Start saving `step` (async). Returns whether a save started (interval policy, or force).
        Steps whose save has finished are hashed meanwhile, in a background thread (`seal`)."""
        self._seal_finished()
        if step in self.manager.all_steps():
            return False  # never rewrite a finished checkpoint
        if force or self.manager.should_save(step):
            self._join_sealer()  # before Orbax deletes old steps (checkpoint.keep): one may be being hashed
        tok = {name: base64.b64encode(data).decode() for name, data in tokenizer_files.items()}
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
                                  config=ocp.args.JsonSave(json.loads(json.dumps(to_dict(cfg)))),
                                  tokenizer=ocp.args.JsonSave(tok))
        started = self.manager.save(step, args=args, force=force)
        if started:
            self._unsealed.append(step)
            self._seal_finished()
        return started

    def _seal_finished(self) -> None:
        """Start hashing the saved steps once Orbax has finished writing them (one thread at a time)."""
        if not self._unsealed or self.manager.is_saving_in_progress():
            return
        self._join_sealer()
        steps, self._unsealed = self._unsealed, []
        self._sealer = threading.Thread(target=self._seal, args=(steps,), name="r1jax-seal")
        self._sealer.start()

    def _join_sealer(self) -> None:
        if self._sealer is not None:
            self._sealer.join()
            self._sealer = None

    def _seal(self, steps: list[int]) -> None:
        for step in steps:
            try:
                seal(self.step_dir(step))
            except Exception as e:  # noqa: BLE001 (the step itself is saved; it will restore unverified)
                self._seal_errors.append(f"{self.step_dir(step)}: its integrity manifest was not written "
                                         f"({type(e).__name__}: {e}); it will restore unverified")

    def restore(self, step: int, target) -> tuple[Any, dict, dict[str, bytes]]:
        """(state, data state, tokenizer files) of `step`, verified first; `target` is the abstract
        TrainState with shardings (its leaves' shardings decide where the arrays land)."""
        self.verify(step)
        args = ocp.args.Composite(state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore(),
                                  tokenizer=ocp.args.JsonRestore())
        with _reading(self.step_dir(step), "train state"):
            out = self.manager.restore(step, args=args)
        files = {name: base64.b64decode(data) for name, data in (out.tokenizer or {}).items()}
        return out.state, out.data, files

    def restore_newest(self, target, cfg: Config | None = None, log: Callable[[str], None] = print,
                       ) -> tuple[int, Any, dict, dict[str, bytes]] | None:
        """(step, state, data state, tokenizer files) of the newest intact step (`restore`), or None
        when there is no step. Each damaged newer step is reported by `log` in one line and left in
        place; then one line names the step resumed from. With `cfg`, a step it must not resume
        from (check_resumable) raises. Raises CheckpointError when every step is damaged."""
        damaged = []
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                if cfg is not None:
                    self.check_resumable(cfg, step)
                out, problem = self.restore(step, target), None
            except CheckpointDamaged as e:
                out, problem = None, str(e)
            if _min_across_processes(int(problem is None)) == 0:  # damaged here or on another process
                log(f"checkpoint {problem or f'{self.step_dir(step)}: another process cannot read it'}; left in place")
                damaged.append(step)
                continue
            newest = f", the newest intact step (damaged: {', '.join(map(str, damaged))})" if damaged else ""
            unverified = "" if sealed(self.step_dir(step)) else " (unverified: it has no integrity manifest)"
            log(f"resuming from step {step} in {self.directory}{newest}{unverified}")
            return (step, *out)
        if damaged:
            raise CheckpointError(f"{self.directory}: every checkpoint step is damaged ({', '.join(map(str, damaged))}); "
                                  f"they are left in place: move them away or use a new checkpoint.dir")
        return None

    def newest_intact_step(self, below: int | None = None) -> int | None:
        """The newest step (older than `below`) that `verify` passes, or None."""
        for step in sorted(self.manager.all_steps(), reverse=True):
            if below is not None and step >= below:
                continue
            try:
                self.verify(step)
            except CheckpointDamaged:
                continue
            return step
        return None

    def restore_model(self, step: int, target: dict) -> tuple[nnx.State, nnx.State, dict[str, bytes] | None]:
        """(params, router biases, tokenizer files or None) of `step`, verified first; `target`:
        {"params", "router_bias"} abstract trees with shardings (the optimizer state is not read)."""
        self.verify(step, ("state", "tokenizer"))
        with _reading(self.step_dir(step), "params"):
            out = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.PyTreeRestore(item=target, partial_restore=True,
                                           restore_args=ocp.checkpoint_utils.construct_restore_args(target)),
                tokenizer=ocp.args.JsonRestore()))
        files = {n: base64.b64decode(d) for n, d in (out.tokenizer or {}).items()} or None
        return out.state["params"], out.state["router_bias"], files

    def tokenizer_files(self, step: int | None = None) -> dict[str, bytes]:
        """The tokenizer files saved with `step` (default: the latest), verified first."""
        step = self.latest_step() if step is None else step
        self.verify(step, ("tokenizer",))
        with _reading(self.step_dir(step), "tokenizer"):
            out = self.manager.restore(step, args=ocp.args.Composite(tokenizer=ocp.args.JsonRestore()))
        return {name: base64.b64decode(data) for name, data in (out.tokenizer or {}).items()}

    def wait(self) -> None:
        """Block until every started save is written and hashed."""
        self.manager.wait_until_finished()
        self._seal_finished()
        self._join_sealer()
        for line in self._seal_errors:
            print(f"warning: {line}", file=sys.stderr, flush=True)
        self._seal_errors.clear()

    def close(self) -> None:
        self.wait()
        self.manager.close()


def write_atomic(path: str | Path, data: str | bytes) -> Path:
    """Write a run output file whole or not at all: a temporary file beside it, renamed over it (a
    kill leaves the old file or the new one, never half of one). Returns the path."""
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
    """A run directory (its newest step, intact or not: restoring it checks), one step directory of
    a run (<run>/<step>), or a params checkpoint: (directory, step or None)."""
    path = Path(path).absolute()
    if (path / "config.yaml").is_file():
        return path, None
    if path.is_dir():
        steps = sorted(int(p.name) for p in path.iterdir() if p.name.isdigit() and p.is_dir())
        if steps:
            return path, steps[-1]
        if path.name.isdigit() and any(path.iterdir()):  # <run>/<step>
            return path.parent, int(path.name)
    raise CheckpointError(f"{path}: no r1jax checkpoint here (neither a run directory with steps, a step of one, "
                          f"nor a params checkpoint with config.yaml)")


__all__ = ["RunCheckpointer", "config_differences", "find_stage_checkpoint", "load_model_config", "restore_params",
           "save_params", "seal", "sealed", "verify", "write_atomic"]
