"""Logits parity with HF transformers (the outside reference), through r1jax.convert.

Golden: tests/golden/<name>/ holds a tiny random HF checkpoint saved by transformers and the logits
transformers computed for a batch of varied-length sequences (scripts/make_golden.py). These run
everywhere. Live: with torch + transformers installed (`python3 dev.py test --reference`), fresh
random models are built, saved, converted and compared in the same run.
"""

import numpy as np
import pytest

import hf_reference as R
from conftest import GOLDEN
from r1jax.convert import load_hf
from r1jax.models import forward

TOL = 1e-4
live = pytest.mark.skipif(not R.available(), reason="torch/transformers not installed "
                          "(run `python3 dev.py test --reference` for the live comparison)")


def r1jax_logits(path, ids, mask):
    cfg, graphdef, state = load_hf(path)
    logits, _ = forward(graphdef, state, ids, segment_ids=mask)
    return cfg, np.asarray(logits)


@pytest.mark.parametrize("name", sorted(R.TINY))
def test_golden_logits(name):
    d = GOLDEN / name
    io = np.load(d / "io.npz")
    ids, mask, ref = io["input_ids"], io["attention_mask"], io["logits"]
    assert len(set(mask.sum(1))) == len(mask), "the batch must mix sequence lengths"
    cfg, got = r1jax_logits(d, ids, mask)
    assert cfg.param_dtype == "float32"
    valid = mask.astype(bool)
    err = np.abs(got - ref)[valid].max()
    assert err <= TOL, f"{name}: max |dlogits| {err:.2e}"
    assert np.abs(ref[valid]).max() > 0.3  # the comparison is not between near-zero logits


def test_golden_configs_cover_the_variants():
    """The golden set exercises every feature the parity requirement names."""
    from r1jax.convert import model_config_from_hf
    from r1jax.convert.safetensors_io import Checkpoint

    cfgs = {}
    for name in R.TINY:
        ck = Checkpoint(GOLDEN / name)
        cfgs[name] = model_config_from_hf(ck.config, tensor_names=ck.names)
    v3 = cfgs["deepseek_v3"]
    assert v3.n_group > 1 and v3.topk_group < v3.n_group and v3.score_func == "sigmoid"
    assert v3.n_shared_experts >= 1 and v3.first_k_dense_replace >= 1 and v3.q_lora_rank
    assert cfgs["deepseek_v2_lite"].q_lora_rank is None and cfgs["deepseek_v2_lite"].score_func == "softmax"
    assert cfgs["deepseek_v2_grouped"].n_group > 1 and cfgs["deepseek_v2_grouped"].group_score == "max"
    assert all(cfgs[n].rope_scaling.type == "yarn" for n in ("deepseek_v3", "deepseek_v2_lite"))
    assert cfgs["llama3"].rope_scaling.type == "llama3"
    assert cfgs["qwen2_tied"].tie_embeddings and not cfgs["qwen2_untied"].tie_embeddings
    assert {c.family for c in cfgs.values()} == {"deepseek_v3", "deepseek_v2", "qwen2", "llama3"}


@live
@pytest.mark.reference
@pytest.mark.parametrize("name", sorted(R.TINY))
def test_live_logits(name, tmp_path):
    model = R.build_hf_model(name, seed=7)
    model.save_pretrained(tmp_path)
    ids, mask = R.sample_batch(model.config.vocab_size, seed=8)
    ref = R.hf_logits(model, ids, mask)
    _, got = r1jax_logits(tmp_path, ids, mask)
    err = np.abs(got - ref)[mask.astype(bool)].max()
    assert err <= TOL, f"{name}: max |dlogits| {err:.2e}"


@live
@pytest.mark.reference
@pytest.mark.parametrize("name", sorted(R.TINY))
def test_golden_matches_installed_transformers(name):
    """The committed golden logits are what the installed transformers computes today."""
    io = np.load(GOLDEN / name / "io.npz")
    ref = R.hf_logits_from_dir(GOLDEN / name, io["input_ids"], io["attention_mask"])
    valid = io["attention_mask"].astype(bool)
    assert np.abs(ref - io["logits"])[valid].max() <= 1e-5


@live
@pytest.mark.reference
@pytest.mark.parametrize("preset", ["tiny_v3", "tiny_v2", "tiny_qwen2", "tiny_llama3"])
def test_transformers_loads_our_export(preset, tmp_path):
    """r1jax -> HF: transformers reads the exported config.json + safetensors and computes our logits."""
    import jax

    from conftest import CONFIGS
    from r1jax.config import load_config
    from r1jax.convert import save_hf
    from r1jax.models import init_model

    cfg = load_config(CONFIGS / "models" / f"{preset}.yaml", ["model.mtp_depth=0"] if preset == "tiny_v3" else []).model
    graphdef, state = init_model(cfg, jax.random.key(11))
    state = jax.tree.map(lambda x: x * 4 if x.ndim >= 2 else x, state)  # larger weights: decisive routing
    save_hf(state, cfg, tmp_path / "hf", dtype="float32")
    ids, mask = R.sample_batch(cfg.vocab_size, seed=12)
    ours, _ = forward(graphdef, state, ids, segment_ids=mask)
    ref = R.hf_logits_from_dir(tmp_path / "hf", ids, mask)
    err = np.abs(np.asarray(ours) - ref)[mask.astype(bool)].max()
    assert err <= TOL, f"{preset}: max |dlogits| {err:.2e}"
