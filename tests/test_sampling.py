"""The KV-cache sampler against plain re-derivations: a full-recompute greedy decode written here,
log-probabilities from the training forward, and token frequencies against the renormalised softmax;
against the outside reference: greedy tokens equal HF transformers `generate` (golden outputs from
scripts/make_golden.py everywhere, fresh models when torch is installed); and on a device mesh:
sharded parameters give the single-device tokens."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import hf_reference as R
import r1jax.models.moe as moe
from conftest import CONFIGS, GOLDEN
from r1jax.config import MeshConfig, load_config
from r1jax.convert import load_hf
from r1jax.models import forward, init_model
from r1jax.sampling import decode_layout_state, generate, pad_prompts
from r1jax.sharding import make_mesh, state_shardings

fwd = jax.jit(forward, static_argnums=0)


@functools.cache
def model(name):
    cfg = load_config(CONFIGS / "models" / f"{name}.yaml").model
    graphdef, state = init_model(cfg, jax.random.key(0))
    state = jax.tree.map(lambda x: x * 3 if x.ndim >= 2 else x, state)  # peaked, varied predictions
    return cfg, graphdef, state


def naive_greedy(graphdef, state, prompt, n, stops, width=32):
    """Re-run the whole sequence for every new token (in a fixed-width buffer whose tail is padding,
    segment id 0, so one compilation serves every length); stop after a stop token."""
    seq = list(prompt)
    for _ in range(n):
        buf = np.zeros((1, width), np.int32)
        buf[0, :len(seq)] = seq
        seg = (np.arange(width) < len(seq)).astype(np.int32)[None]
        logits, _ = fwd(graphdef, state, jnp.asarray(buf), None, jnp.asarray(seg))
        nxt = int(jnp.argmax(logits[0, len(seq) - 1]))
        seq.append(nxt)
        if nxt in stops:
            break
    return seq


@pytest.mark.parametrize("name", ["tiny_v3", "tiny_v2", "tiny_qwen2", "tiny_llama3"])
def test_greedy_equals_full_recompute(name):
    cfg, graphdef, state = model(name)
    rng = np.random.default_rng(1)
    prompts = [rng.integers(1, cfg.vocab_size, n).astype(np.int32) for n in (5, 11, 2, 8)]
    n_new = 9
    free = [naive_greedy(graphdef, state, p, n_new, ()) for p in prompts]
    eos = free[1][len(prompts[1]) + 3]  # a token row 1 emits: it must stop there, others maybe too
    expect = [naive_greedy(graphdef, state, p, n_new, (eos,)) for p in prompts]
    toks, lens = pad_prompts(prompts, 11 + n_new + 1, 0)
    out = generate(graphdef, state, toks, lens, jax.random.key(0), max_new_tokens=n_new, eos_id=eos)
    got = [list(np.asarray(out["tokens"][i, :int(out["lengths"][i])])) for i in range(len(prompts))]
    assert got == expect
    assert len(got[1]) == len(prompts[1]) + 4
    # logprobs are log softmax of the model at each generated position (from the training forward)
    for i, seq in enumerate(got):
        buf = np.zeros((1, 32), np.int32)
        buf[0, :len(seq)] = seq
        logits, _ = fwd(graphdef, state, jnp.asarray(buf), None, jnp.asarray((buf != 0) | (np.arange(32) < len(seq))))
        lp = jax.nn.log_softmax(logits[0], -1)
        p = len(prompts[i])
        want = [float(lp[p - 1 + j, seq[p + j]]) for j in range(len(seq) - p)]
        np.testing.assert_allclose(np.asarray(out["logprobs"][i, :len(want)]), want, atol=2e-5)
        assert np.all(np.asarray(out["logprobs"][i, len(want):]) == 0)


def first_token_counts(name, n, **kw):
    cfg, graphdef, state = model(name)
    prompt = np.arange(1, 7, dtype=np.int32)
    toks, lens = pad_prompts([prompt] * n, 8, 0)
    out = generate(graphdef, state, toks, lens, jax.random.key(123), max_new_tokens=1, eos_id=-1, **kw)
    first = np.asarray(out["tokens"][:, 6])
    logits, _ = fwd(graphdef, state, jnp.asarray([prompt]))
    return np.bincount(first, minlength=cfg.vocab_size), np.asarray(logits[0, -1], np.float64)


def test_temperature_top_p_frequencies_match_renormalised_softmax():
    temperature, top_p, n = 0.7, 0.8, 6000
    counts, logits = first_token_counts("tiny_llama3", n, temperature=temperature, top_p=top_p)
    p = np.exp((logits - logits.max()) / temperature)
    p /= p.sum()
    order = np.argsort(-p)
    mass_before = np.cumsum(p[order]) - p[order]
    kept = order[mass_before < top_p]  # the nucleus: smallest prefix whose mass reaches top_p
    q = np.zeros_like(p)
    q[kept] = p[kept] / p[kept].sum()
    assert counts[q == 0].sum() == 0, "sampled outside the nucleus"
    # chi-square over the kept tokens (small ones pooled so every expected count is >= 5)
    exp = q[kept] * n
    obs = counts[kept].astype(float)
    big = exp >= 5
    e = np.append(exp[big], exp[~big].sum())
    o = np.append(obs[big], obs[~big].sum())
    e, o = e[e > 0], o[e > 0]
    chi2, df = float(((o - e) ** 2 / e).sum()), len(e) - 1
    assert df >= 5, df
    assert chi2 < df + 4 * np.sqrt(2 * df), (chi2, df)  # ~4 sigma above the mean of chi2(df)


def test_top_k_never_leaves_the_k_best():
    counts, logits = first_token_counts("tiny_v3", 2000, temperature=1.5, top_k=5)
    top5 = set(np.argsort(-logits)[:5])
    assert set(np.nonzero(counts)[0]) <= top5 and len(set(np.nonzero(counts)[0])) >= 3


# --------------------------------------------------------------------------------------------------
# Greedy tokens against HF transformers `generate`

live = pytest.mark.skipif(not R.available(), reason="torch/transformers not installed "
                          "(run `python3 dev.py test --reference` for the live comparison)")


def r1jax_greedy(path, prompts, n_new):
    """Greedy continuations [len(prompts), n_new] of the checkpoint at `path`, all prompts in one
    right-padded batch; eos -1 never matches, so every row runs to n_new."""
    _, graphdef, state = load_hf(path)
    toks, lens = pad_prompts([np.asarray(p, np.int32) for p in prompts], max(map(len, prompts)) + n_new, 0)
    out = generate(graphdef, state, toks, lens, jax.random.key(0), max_new_tokens=n_new, eos_id=-1)
    assert np.all(np.asarray(out["num_new"]) == n_new)
    return np.stack([np.asarray(out["tokens"])[i, n:n + n_new] for i, n in enumerate(lens)])


@pytest.mark.parametrize("name", sorted(R.TINY))
def test_greedy_equals_hf_generate_golden(name):
    g = np.load(GOLDEN / name / "generate.npz")
    prompts = [g["prompts"][i, :n] for i, n in enumerate(g["lengths"])]
    assert len(set(g["lengths"])) == len(prompts), "the batch must mix prompt lengths"
    assert g["margins"].min() >= R.MIN_MARGIN  # no near-tie: float32 noise cannot flip an argmax
    np.testing.assert_array_equal(r1jax_greedy(GOLDEN / name, prompts, g["tokens"].shape[1]), g["tokens"])


@live
@pytest.mark.reference
@pytest.mark.parametrize("name", sorted(R.TINY))
def test_greedy_equals_hf_generate_live(name, tmp_path):
    model = R.build_hf_model(name, seed=17)
    model.save_pretrained(tmp_path)
    _, prompts, ref, _ = R.decisive_prompts(model, seed=900)
    np.testing.assert_array_equal(r1jax_greedy(tmp_path, prompts, R.GEN_NEW), np.array(ref))


# --------------------------------------------------------------------------------------------------
# Sampling with sharded parameters


@pytest.mark.parametrize("name,sizes", [("tiny_v3", dict(data=2, fsdp=1, expert=4, tensor=1)),
                                        ("tiny_v3", dict(data=1, fsdp=2, expert=2, tensor=2)),
                                        ("tiny_llama3", dict(data=2, fsdp=2, expert=1, tensor=2))],
                         ids=["v3-data2-expert4", "v3-fsdp2-expert2-tensor2", "llama3-data2-fsdp2-tensor2"])
def test_sharded_greedy_equals_single_device(devices8, name, sizes, monkeypatch):
    """The trainer's sharded parameters go to `generate` as they are, under `jax.set_mesh`."""
    cfg, graphdef, state = model(name)
    calls = []
    orig = moe.routed_experts_sharded
    monkeypatch.setattr(moe, "routed_experts_sharded", lambda *a: calls.append(1) or orig(*a))
    rng = np.random.default_rng(2)
    prompts = [rng.integers(1, cfg.vocab_size, n).astype(np.int32) for n in (5, 11, 2, 8, 7, 3, 9, 4)]
    toks, lens = pad_prompts(prompts, 11 + 10, 0)
    kw = dict(max_new_tokens=10, eos_id=-1)
    ref = generate(graphdef, state, toks, lens, jax.random.key(0), **kw)
    mesh = make_mesh(MeshConfig(**sizes), devices8, cfg)
    sharded = jax.device_put(state, state_shardings(state, mesh))
    flat = dict(nnx.to_flat_state(sharded))
    big = ("moe_blocks", "mlp", "w_gate") if cfg.is_moe else ("dense_blocks", "mlp", "w_gate")
    w = flat[big].get_value()
    assert all(s.data.size < w.size for s in w.addressable_shards), w.sharding  # really split
    with jax.set_mesh(mesh):
        out = generate(graphdef, sharded, toks, lens, jax.random.key(0), **kw)
    assert bool(calls) == cfg.is_moe, "MoE layers must take the expert-parallel shard_map path"
    assert flat[big].get_value() is w and not w.is_deleted()  # used in place: not donated, not replaced
    np.testing.assert_array_equal(np.asarray(out["tokens"]), np.asarray(ref["tokens"]))
    np.testing.assert_array_equal(np.asarray(out["lengths"]), np.asarray(ref["lengths"]))
    np.testing.assert_allclose(np.asarray(out["logprobs"]), np.asarray(ref["logprobs"]), atol=1e-5)


def _gathered_param_shapes(hlo: str, state) -> list[str]:
    """The all-gathers of a compiled program whose result has a weight matrix's shape (whole, or
    one layer of a stacked one): the gathers a sharded weight needs before a matmul. (Vectors such
    as norms and router biases are left out: their shapes also fit token-sized activations.)"""
    import re

    shapes = set()
    for leaf in jax.tree.leaves(state):
        shape = tuple(leaf.shape)
        shapes.update({shape} if len(shape) == 2 else {shape, shape[1:]} if len(shape) > 2 else set())
    found = []
    for dims in re.findall(r"= \w+\[([\d,]*)\]\{[^}]*\} all-gather\(", hlo):
        shape = tuple(int(d) for d in dims.split(",") if d)
        if shape in shapes:
            found.append(str(shape))
    return found


@pytest.mark.parametrize("name,sizes", [("tiny_v3", dict(data=1, fsdp=2, expert=2, tensor=2)),
                                        ("tiny_llama3", dict(data=2, fsdp=2, expert=1, tensor=2))],
                         ids=["v3-fsdp2-expert2-tensor2", "llama3-data2-fsdp2-tensor2"])
def test_decode_layout_gathers_no_parameter(devices8, name, sizes):
    """Resharded once into the decode layout (sampling.decode_layout_state), the sampler's
    compiled program all-gathers no parameter (the training layout's FSDP shards all-gather per
    layer and step), samples what one device samples, and leaves the training params as they were."""
    cfg, graphdef, state = model(name)
    rng = np.random.default_rng(3)
    toks, lens = pad_prompts([rng.integers(1, cfg.vocab_size, n).astype(np.int32) for n in (5, 9, 3, 7)] * 2,
                             9 + 6, 0)
    kw = dict(max_new_tokens=6, eos_id=-1)
    ref = generate(graphdef, state, toks, lens, jax.random.key(0), **kw)
    mesh = make_mesh(MeshConfig(**sizes), devices8, cfg)
    sharded = jax.device_put(state, state_shardings(state, mesh))
    before = jax.tree.map(np.asarray, sharded)
    with jax.set_mesh(mesh):
        decode = decode_layout_state(sharded, mesh)
        hlo = {layout: generate.lower(graphdef, st, toks, lens, jax.random.key(0), layout=layout, **kw)
               .compile().as_text() for layout, st in [("train", sharded), ("decode", decode)]}
        out = generate(graphdef, decode, toks, lens, jax.random.key(0), layout="decode", **kw)
    assert _gathered_param_shapes(hlo["train"], state), "the training layout should gather FSDP shards"
    assert _gathered_param_shapes(hlo["decode"], state) == []
    np.testing.assert_array_equal(np.asarray(out["tokens"]), np.asarray(ref["tokens"]))
    np.testing.assert_allclose(np.asarray(out["logprobs"]), np.asarray(ref["logprobs"]), atol=1e-5)
    for a, b in zip(jax.tree.leaves(sharded), jax.tree.leaves(before)):  # the trained params are untouched
        assert not a.is_deleted()
        np.testing.assert_array_equal(np.asarray(a), b)


def test_profiles_name_prefill_and_decode():
    """The sampler's program names its two phases (jax.named_scope) and the model's parts (read from
    the lowered program's op locations: an executable from the compilation cache has no op names)."""
    import re

    cfg, graphdef, state = model("tiny_qwen2")
    toks, lens = pad_prompts([np.arange(1, 6, dtype=np.int32)], 12, 0)
    text = generate.lower(graphdef, state, toks, lens, jax.random.key(0), max_new_tokens=4,
                          eos_id=-1).as_text(debug_info=True)
    names = set(re.findall(r'loc\("([^"]*)"', text))
    assert any(n.startswith("jit(generate)/prefill/") for n in names)
    assert any(n.startswith("jit(generate)/decode/while/body/") for n in names)
    scopes = {part for n in names for part in n.split("/")}
    assert {"attention", "mlp", "head"} <= scopes, scopes
