"""What every training stage driver does before its loop: runtime, mesh, tokenizer, train state.

A stage starts in one of three ways, decided in this order:
  resume     checkpoint.dir already holds steps: the newest intact one is restored exactly (state,
             data position, tokenizer), after checking the config still fits it; a damaged newer
             step is reported in one line and left in place, and the step resumed from is named;
  hand-off   checkpoint.init_from names an earlier stage: its params and router biases (and its
             tokenizer, unless tokenizer.path is set) start this stage, with a fresh optimizer; the
             step used is named, and a damaged one is refused (never an older step unasked);
  fresh      random init (and a tokenizer from tokenizer.path, or trained on the stage's data).
"""

from __future__ import annotations

import dataclasses
import functools
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from r1jax import distributed
from r1jax.checkpoint import RunCheckpointer, find_stage_checkpoint, restore_params, sealed
from r1jax.config import Config, ConfigError
from r1jax.data.pipeline import tokenizer_corpus
from r1jax.errors import CheckpointDamaged, CheckpointError
from r1jax.sharding import make_mesh
from r1jax.tokenizer import Tokenizer
from r1jax.train.state import (StepContext, abstract_train_state, init_train_state, make_context, split_model,
                               state_from_params, train_state_shardings)


@dataclass
class StageStart:
    ctx: StepContext
    mesh: jax.sharding.Mesh
    state: object  # TrainState
    tokenizer: Tokenizer
    checkpointer: RunCheckpointer | None
    data_state: dict | None  # the loader position to restore (resume only)
    how: str  # "resume" | "hand-off" | "fresh"


def _with_shardings(abstract, shardings):
    """`abstract`'s tree (Variable nodes kept, as saved) with each leaf carrying its sharding."""
    leaves, treedef = jax.tree.flatten(abstract)
    sh = jax.tree.leaves(shardings)
    assert len(sh) == len(leaves), (len(sh), len(leaves))
    return treedef.unflatten([jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s) for a, s in zip(leaves, sh)])


def _log(text: str) -> None:
    """One line on stderr from process 0: how the stage starts (the step used, damage skipped)."""
    if jax.process_index() == 0:
        sys.stderr.write(text + "\n")  # one write: no other thread's output inside the line
        sys.stderr.flush()


def _unverified(directory) -> str:
    return "" if sealed(directory) else " (unverified: it has no integrity manifest)"


def _saved_has_score_head(path, step) -> bool:
    from r1jax.checkpoint import load_model_config

    if step is None:
        return load_model_config(path).score_head
    saved = RunCheckpointer(path, every=1, keep=1, async_save=False, read_only=True).saved_config(step)
    return bool((saved.get("model") or {}).get("score_head", False))


def _fresh_score_head(cfg: Config, mesh) -> nnx.State:
    """Just the score head of a new reward model (normal(0, init_std), as init_model draws it),
    sharded as the run shards it: no second copy of the decoder is made."""
    from r1jax.models.transformer import abstract_model
    from r1jax.sharding import state_shardings

    _, abstract, _ = split_model(abstract_model(cfg.model))
    head = nnx.State({"score_head": abstract["score_head"]})
    sharding = state_shardings(head, mesh)["score_head"].get_value()
    shape = head["score_head"].get_value().shape
    value = jax.random.normal(jax.random.key(cfg.train.seed), shape, jnp.float32) * cfg.model.init_std
    return nnx.State({"score_head": head["score_head"].replace(jax.device_put(value, sharding))})


def _handoff_params(cfg: Config, ctx: StepContext, mesh) -> tuple[nnx.State, nnx.State, dict[str, bytes] | None]:
    """Params + router biases (+ tokenizer files) of the earlier stage named by checkpoint.init_from:
    a params checkpoint, or a run's newest step (or the step <run>/<step> names), verified. The one
    used is named in the log; a damaged one is refused in one line that names the newest intact
    step there, never replaced by it unasked. A model with a score head (a reward model) starting
    from a checkpoint without one (a policy) takes the checkpoint's decoder and a fresh head."""
    path, step = find_stage_checkpoint(cfg.checkpoint.init_from)
    if cfg.model.score_head and not _saved_has_score_head(path, step):
        base = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, score_head=False))
        params, bias, files = _handoff_params(base, make_context(base), mesh)
        _log("checkpoint.init_from: the score head (model.score_head) starts fresh; the decoder is the checkpoint's")
        return nnx.merge_state(params, _fresh_score_head(cfg, mesh)), bias, files
    if step is None:  # a params checkpoint (e.g. converted from HF)
        _, _, state = restore_params(path, cfg.model, mesh)
        _, params, bias = split_model(nnx.merge(ctx.graphdef, state))
        tok = path / "tokenizer"
        files = {p.name: p.read_bytes() for p in tok.iterdir()} if tok.is_dir() else None
        _log(f"checkpoint.init_from: starting from the params checkpoint {path}{_unverified(path)}")
        return params, bias, files
    shardings = train_state_shardings(ctx, mesh)
    abstract = abstract_train_state(ctx)
    target = {"params": _with_shardings(abstract.params, shardings.params),
              "router_bias": _with_shardings(abstract.router_bias, shardings.router_bias)}
    src = RunCheckpointer(path, every=1, keep=1, async_save=False, read_only=True)
    try:
        params, bias, files = src.restore_model(step, target)
    except CheckpointDamaged as e:
        intact = src.newest_intact_step(below=step)
        hint = (f"its newest intact step is {intact}: checkpoint.init_from={src.step_dir(intact)} starts from it"
                if intact is not None else "it holds no intact step")
        raise CheckpointError(f"checkpoint.init_from: {e}; not starting from an older step unasked ({hint})") from None
    _log(f"checkpoint.init_from: starting from step {step} of {path}{_unverified(src.step_dir(step))}")
    return params, bias, files


def load_tokenizer(path) -> Tokenizer:
    """tokenizer.path: a tokenizer file or directory, or a stage run directory (its checkpoint's
    tokenizer: a student distilled from a teacher's run shares the teacher's tokenizer)."""
    p = Path(path)
    if p.is_dir() and any(c.name.isdigit() for c in p.iterdir()):
        run, step = find_stage_checkpoint(p)
        if step is not None:
            try:
                files = RunCheckpointer(run, every=1, keep=1, async_save=False, read_only=True).tokenizer_files(step)
            except CheckpointDamaged as e:
                raise CheckpointError(f"tokenizer.path: {e}") from None
            if not files:
                raise ConfigError(f"tokenizer.path: the checkpoint {run}/{step} holds no tokenizer")
            return Tokenizer.from_files(files)
    return Tokenizer.load(path)


def _tokenizer(cfg: Config, source, files: dict[str, bytes] | None) -> Tokenizer:
    if cfg.tokenizer.path:
        return load_tokenizer(cfg.tokenizer.path)
    if files:
        return Tokenizer.from_files(files)
    if cfg.tokenizer.train_vocab_size <= 0:
        raise ConfigError("tokenizer.path: set tokenizer.path or tokenizer.train_vocab_size (or start from a stage "
                          "checkpoint that carries a tokenizer)")
    with tempfile.TemporaryDirectory() as tmp:
        texts = tokenizer_corpus(source, cfg.data.template, cfg.tokenizer.train_examples)
        tok = Tokenizer.train_sentencepiece(texts, tmp, cfg.tokenizer.train_vocab_size, seed=cfg.data.seed)
        return Tokenizer.from_files(tok.files())


def _keep(tree):
    return tree


def start_stage(cfg: Config, source, *, ctx: StepContext | None = None, wrap=None) -> StageStart:
    """Runtime + mesh + tokenizer + train state for a stage over `source` (its training records).

    `ctx` overrides the default make_context(cfg) (e.g. a schedule over more optimizer steps than
    train.steps). `wrap(train_state, copy)` turns the TrainState into the stage's own state pytree
    (GRPO adds its reference params); it is applied to the abstract target of a resume too, with
    `copy` the identity there and an array copy otherwise.
    """
    distributed.initialize(cfg.distributed)
    mesh = make_mesh(cfg.mesh, model=cfg.model)
    ctx = ctx or make_context(cfg)
    wrap = wrap or (lambda state, copy: state)
    fresh_copy = functools.partial(jax.tree.map, jnp.copy)
    ckpt = restored = None
    if cfg.checkpoint.dir:
        ckpt = RunCheckpointer(cfg.checkpoint.dir, cfg.checkpoint.every, cfg.checkpoint.keep, cfg.checkpoint.async_save)
        if ckpt.latest_step() is not None:
            target = wrap(_with_shardings(abstract_train_state(ctx), train_state_shardings(ctx, mesh)), _keep)
            restored = ckpt.restore_newest(target, cfg, log=_log)
    if restored is not None:
        _, state, data_state, files = restored
        tok = Tokenizer.from_files(files) if files and not cfg.tokenizer.path else _tokenizer(cfg, source, files)
        how = "resume"
    elif cfg.checkpoint.init_from:
        params, bias, files = _handoff_params(cfg, ctx, mesh)
        state = wrap(state_from_params(ctx, params, bias, mesh), fresh_copy)
        tok, data_state, how = _tokenizer(cfg, source, files), None, "hand-off"
    else:
        state = wrap(init_train_state(ctx, jax.random.key(cfg.train.seed), mesh), fresh_copy)
        tok, data_state, how = _tokenizer(cfg, source, None), None, "fresh"
    if tok.vocab_size > cfg.model.vocab_size:
        raise ConfigError(f"model.vocab_size: {cfg.model.vocab_size} is smaller than the tokenizer's {tok.vocab_size} ids")
    return StageStart(ctx=ctx, mesh=mesh, state=state, tokenizer=tok, checkpointer=ckpt, data_state=data_state, how=how)


@dataclass
class Policy:
    """A model loaded from any stage checkpoint, ready to sample: graph + state on `mesh`."""

    cfg: Config  # the run config (params checkpoints: a default config around their model section)
    graphdef: nnx.GraphDef
    state: nnx.State  # params + router biases
    tokenizer: Tokenizer | None
    mesh: jax.sharding.Mesh


def load_policy(path, overrides: list[str] | None = None) -> Policy:
    """The latest params of a run directory (or of the step <run>/<step> names), or a params
    checkpoint (conversion output), on a mesh of this host's devices (mesh.* overrides apply), with
    the tokenizer saved beside them."""
    from r1jax.config import load_config, to_dict

    path, step = find_stage_checkpoint(path)
    if step is None:
        from r1jax.checkpoint import load_model_config

        data = {"model": to_dict(load_model_config(path))}
    else:
        data = RunCheckpointer(path, every=1, keep=1, async_save=False, read_only=True).saved_config(step)
        data.pop("checkpoint", None)
    source = path if step is None else path / str(step)
    cfg = load_config(data=data, overrides=[*(overrides or []), f"checkpoint.init_from={source}"])
    mesh = make_mesh(cfg.mesh, model=cfg.model)
    ctx = make_context(cfg)
    params, bias, files = _handoff_params(cfg, ctx, mesh)
    tok = Tokenizer.from_files(files) if files else (Tokenizer.load(cfg.tokenizer.path) if cfg.tokenizer.path else None)
    return Policy(cfg=cfg, graphdef=ctx.graphdef, state=nnx.merge_state(params, bias), tokenizer=tok, mesh=mesh)
