"""Reward models (issue 14 item 1): the Bradley-Terry loss and its gradient against a plain
re-derivation, the scalar head read at each side's eos, the step's microbatching, preference JSONL
errors by file:line, the dry-run plan against XLA, and the `rm` stage (hand-off from a policy
checkpoint with a fresh head, held-out pair accuracy, resume)."""

import functools
import math
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import CONFIGS
from r1jax.config import load_config
from r1jax.errors import DataError


def test_bradley_terry_loss_and_gradient_match_the_formula():
    """-log sigmoid(c - r - m) = log(1 + exp(-(c - r - m))); d/dc = -sigmoid(-(c - r - m)) = -d/dr."""
    from r1jax.train.reward_model import bradley_terry_loss

    rng = np.random.default_rng(0)
    c, r = rng.normal(size=6) * 3, rng.normal(size=6) * 3
    m = np.abs(rng.normal(size=6))
    loss = bradley_terry_loss(jnp.asarray(c, jnp.float32), jnp.asarray(r, jnp.float32), jnp.asarray(m, jnp.float32))
    want = [math.log1p(math.exp(-(ci - ri - mi))) for ci, ri, mi in zip(c, r, m)]
    np.testing.assert_allclose(np.asarray(loss), want, rtol=1e-5)
    dc, dr = jax.grad(lambda a, b: jnp.mean(bradley_terry_loss(a, b, jnp.asarray(m, jnp.float32))), argnums=(0, 1))(
        jnp.asarray(c, jnp.float32), jnp.asarray(r, jnp.float32))
    sig = [1 / (1 + math.exp(ci - ri - mi)) for ci, ri, mi in zip(c, r, m)]  # sigmoid(-(c - r - m))
    np.testing.assert_allclose(np.asarray(dc), -np.asarray(sig) / 6, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(dr), np.asarray(sig) / 6, rtol=1e-5)


def _tiny(*overrides):
    return load_config(CONFIGS / "models" / "tiny_qwen2.yaml",
                       ["model.score_head=true", "train.batch_size=4", "train.seq_len=24", "mesh.fsdp=1",
                        "data.source=parity_preference", "data.template=r1", *overrides])


def _pairs(cfg, n=4, seed=0):
    rng = np.random.default_rng(seed)
    out = {}
    for side in ("chosen", "rejected"):
        lens = rng.integers(5, cfg.train.seq_len + 1, n)
        out[f"{side}_tokens"] = rng.integers(4, cfg.model.vocab_size, (n, cfg.train.seq_len)).astype(np.int32)
        out[f"{side}_segment_ids"] = (np.arange(cfg.train.seq_len)[None] < lens[:, None]).astype(np.int32)
        out[f"{side}_last"] = (lens - 1).astype(np.int32)
    out["margin"] = np.zeros(n, np.float32)
    return out


def test_score_reads_the_eos_and_ignores_padding():
    """The score of a row is the head at its last token: what follows (padding) does not move it,
    and it equals the head dotted with the forward's final hidden state there."""
    from flax import nnx

    from r1jax.models import init_model

    cfg = _tiny()
    graphdef, state = init_model(cfg.model, jax.random.key(0))
    model = nnx.merge(graphdef, state)
    tokens = np.random.default_rng(1).integers(4, cfg.model.vocab_size, (2, 12)).astype(np.int32)
    seg = np.ones_like(tokens)
    seg[:, 7:] = 0
    last = np.array([6, 6], np.int32)
    s1, _ = model.score(jnp.asarray(tokens), jnp.asarray(last), None, jnp.asarray(seg))
    other = tokens.copy()
    other[:, 7:] = 5  # different padding
    s2, _ = model.score(jnp.asarray(other), jnp.asarray(last), None, jnp.asarray(seg))
    np.testing.assert_allclose(np.asarray(s1), np.asarray(s2), rtol=1e-6)
    h, _ = model(jnp.asarray(tokens), None, jnp.asarray(seg), logits=False)
    want = np.asarray(h)[:, 6] @ np.asarray(state["score_head"].get_value())
    np.testing.assert_allclose(np.asarray(s1), want, rtol=1e-5)


def test_reward_model_step_grad_accumulation_equals_one_batch():
    from r1jax.train.reward_model import reward_model_step
    from r1jax.train.state import init_train_state, make_context

    batch = _pairs(_tiny())
    out = {}
    for accum in (1, 2):
        # lr 1e-5: Adam's first step is about lr * sign(g), so at a large lr the ~1e-7 differences of
        # summing microbatches move near-zero gradients' updates by more than the tolerance
        cfg = _tiny(f"train.grad_accum={accum}", "optimizer.lr=1e-5", "optimizer.warmup_steps=0")
        ctx = make_context(cfg, loss=0.5)
        state = init_train_state(ctx, jax.random.key(0))
        new, metrics = jax.jit(functools.partial(reward_model_step, ctx=ctx))(state, batch, None)
        out[accum] = (jax.tree.leaves(new.params), metrics)
    (p1, m1), (p2, m2) = out[1], out[2]
    assert float(m1["loss"]) == pytest.approx(float(m2["loss"]), abs=1e-6)
    assert float(m1["accuracy"]) == float(m2["accuracy"])
    for a, b in zip(p1, p2):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


@pytest.mark.parametrize("line,what", [
    ('{"prompt": "p", "chosen": "a"}', "missing field 'rejected'"),
    ('{"prompt": "p", "chosen": 3, "rejected": "b"}', "field 'chosen' must be a string"),
    ('{"prompt": "p", "chosen": "a", "rejected": "b", "margin": -1}', "field 'margin' must be a finite number >= 0"),
    ('{"prompt": "p", "chosen": "a", "rejected": ', "invalid JSON"),
])
def test_malformed_preference_lines_are_named_by_file_and_line(tmp_path, line, what):
    from r1jax.data.preferences import preference_source

    path = tmp_path / "pairs.jsonl"
    path.write_text('{"prompt": "q", "chosen": "a", "rejected": "b"}\n' + line + "\n")
    with pytest.raises(DataError) as e:
        preference_source(load_config(CONFIGS / "models" / "tiny_qwen2.yaml").data, "train", str(path))
    assert f"{path}:2: {what}" in str(e.value)


def test_reward_model_plan_is_near_xla_memory_analysis():
    """The dry-run's rm train step (both sides of each pair, no logits) within 25% of XLA's temp bytes
    (1,024 tokens: two attention blocks, the case tests/test_dryrun.py checks for SFT)."""
    from r1jax.dryrun import plan_memory
    from r1jax.train.reward_model import reward_model_step
    from r1jax.train.state import abstract_train_state, make_context

    cfg = load_config(CONFIGS / "models" / "tiny_v3.yaml",
                      ["model.score_head=true", "mesh.fsdp=1", "model.remat=full", "train.seq_len=1024",
                       "train.batch_size=4", "model.dtype=bfloat16", "model.param_dtype=bfloat16", "train.mtp=false",
                       "data.source=parity_preference"])
    ctx = make_context(cfg, loss=0.0)
    shapes = {"chosen_tokens": (4, 1024), "chosen_segment_ids": (4, 1024), "chosen_last": (4,),
              "rejected_tokens": (4, 1024), "rejected_segment_ids": (4, 1024), "rejected_last": (4,)}
    batch = {k: jax.ShapeDtypeStruct(v, jnp.int32) for k, v in shapes.items()}
    batch["margin"] = jax.ShapeDtypeStruct((4,), jnp.float32)
    compiled = jax.jit(functools.partial(reward_model_step, ctx=ctx)).lower(abstract_train_state(ctx), batch,
                                                                            None).compile()
    plan = plan_memory(cfg, "rm", 1)
    (phase,) = plan.phases
    xla = compiled.memory_analysis().temp_size_in_bytes
    est = phase.total - plan.item("pair arrays").bytes
    assert abs(est - xla) <= 0.25 * xla, (est, xla)
    with pytest.raises(KeyError):
        plan.item("logits (and their gradient)")


def test_rm_stage_hands_off_trains_and_resumes(tmp_path, capsys):
    """`rm` from a policy checkpoint without a head: the decoder is the checkpoint's, the head is
    fresh; held-out pair accuracy rises well above chance on the parity task; rerun resumes."""
    from flax import nnx

    from r1jax.checkpoint import RunCheckpointer
    from r1jax.stages.registry import STAGES
    from r1jax.train.state import init_train_state, make_context

    policy_cfg = load_config(CONFIGS / "models" / "tiny_qwen2.yaml", ["mesh.fsdp=1"])
    policy = init_train_state(make_context(policy_cfg), jax.random.key(3))
    ckpt = RunCheckpointer(tmp_path / "policy", every=1, keep=1, async_save=False)
    ckpt.save(5, policy, {}, policy_cfg, {})
    ckpt.close()
    over = [f"checkpoint.dir={tmp_path / 'rm'}", f"checkpoint.init_from={tmp_path / 'policy'}", "train.steps=60",
            "train.batch_size=16", "train.seq_len=48", "train.eval_examples=64", "train.eval_every=60",
            "train.log_every=20", "optimizer.lr=2e-3", "optimizer.warmup_steps=5", "tokenizer.train_vocab_size=300",
            "tokenizer.train_examples=1000", "data.size=5000", "checkpoint.every=30", "mesh.fsdp=-1"]
    cfg = _tiny(*over)
    out = STAGES["rm"].run(cfg)
    assert out.how == "hand-off" and "score head (model.score_head) starts fresh" in capsys.readouterr().err
    assert out.evals[-1]["accuracy"] >= 0.75, out.evals  # chance is 0.5
    saved = dict(nnx.to_flat_state(policy.params))
    trained = dict(nnx.to_flat_state(out.state.params))
    assert ("score_head",) in trained and ("score_head",) not in saved
    assert set(saved) == set(trained) - {("score_head",)}
    again = STAGES["rm"].run(_tiny(*over, "train.steps=70", "train.eval_examples=0"))
    assert again.how == "resume" and again.step == 70

    # GRPO's frozen scorer of rollouts (grpo.reward_model) reads the run back: its scores of rows
    # are the trained model's; a checkpoint without a score head, or another tokenizer, is refused
    from r1jax.config import ConfigError
    from r1jax.stages.reward_model import RolloutRewardModel

    scorer = RolloutRewardModel(str(tmp_path / "rm"), cfg, None, again.tokenizer, micro=2)
    batch = _pairs(cfg, n=4, seed=5)
    got = scorer.scores(jnp.asarray(batch["chosen_tokens"]), jnp.zeros(4, jnp.int32),
                        jnp.asarray(batch["chosen_last"] + 1))
    model = nnx.merge(again.ctx.graphdef, again.state.params, again.state.router_bias)
    want, _ = model.score(jnp.asarray(batch["chosen_tokens"]), jnp.asarray(batch["chosen_last"]), None,
                          jnp.asarray(batch["chosen_segment_ids"]))
    np.testing.assert_allclose(got, np.asarray(want), rtol=1e-4, atol=1e-5)
    with pytest.raises(ConfigError, match="is not a reward model"):
        RolloutRewardModel(str(tmp_path / "policy"), cfg, None, again.tokenizer)


@pytest.mark.parametrize("view", ["response", "summary"])
def test_rollout_rows_read_the_response_or_its_summary(view):
    """What the reward model reads of a rollout, re-derived row by row: the prompt, then the whole
    response or what follows its last </think> (the whole response when there is none)."""
    from r1jax.train.reward_model import rollout_rows

    END, PAD = 9, 0
    rows = [([1, 2, 3], [4, END, 5, 6, 7]), ([1, 2], [4, 5, 6]), ([1], [END, 4, END, 8])]
    t = 10
    tokens = np.full((3, t), 7, np.int32)  # junk past each row's end
    for i, (p, r) in enumerate(rows):
        tokens[i, :len(p) + len(r)] = p + r
    plens = np.array([len(p) for p, _ in rows])
    lens = np.array([len(p) + len(r) for p, r in rows])
    got, seg, last = (np.asarray(a) for a in rollout_rows(jnp.asarray(tokens), jnp.asarray(plens), jnp.asarray(lens),
                                                           view, END, PAD))
    for i, (p, r) in enumerate(rows):
        if view == "summary" and END in r:
            r = r[len(r) - r[::-1].index(END):]
        want = p + r
        assert got[i, :len(want)].tolist() == want and last[i] == len(want) - 1
        assert seg[i].tolist() == [1] * len(want) + [0] * (t - len(want))
        if view == "summary":
            assert set(got[i, len(want):].tolist()) <= {PAD}


def test_a_pair_side_and_a_sampled_rollout_give_the_reward_model_the_same_ids(tmp_path):
    """Training and scoring read the same thing: a preference side encoded for training
    (`encode_side`) and the same prompt + response as the sampler lays it out (prompt ids, then the
    response's ids and eos) cut by `rollout_rows` give identical ids, for both views. (Cutting the
    summary from the text instead dropped the space piece that follows </think> in a response, so
    the reward model never saw at training the ids it scored.)"""
    from r1jax.data.preferences import encode_side
    from r1jax.data.procedural import ParityPreferenceTask
    from r1jax.tokenizer import Tokenizer, encode_prompt
    from r1jax.train.reward_model import rollout_rows

    task = ParityPreferenceTask(0, "train", 200)
    texts = [t for i in range(200) for t in (task[i]["question"], task[i]["chosen"], task[i]["rejected"])]
    tok = Tokenizer.train_sentencepiece(texts, tmp_path, 300)
    think_end = tok.special_id("</think>")
    rec = task[0]
    for view in ("response", "summary"):
        for response in (rec["chosen"], rec["rejected"], "no tags here, 12 is even."):
            want = encode_side(tok, "r1", rec["question"], response, 128, view).tolist()
            prompt = encode_prompt(tok, "r1", rec["question"]).tolist()
            sampled = prompt + tok.encode(response, add_eos=True)
            tokens = np.full((1, len(sampled) + 5), tok.pad_id, np.int32)
            tokens[0, :len(sampled)] = sampled
            got, seg, last = rollout_rows(jnp.asarray(tokens), jnp.asarray([len(prompt)]),
                                          jnp.asarray([len(sampled)]), view, think_end, tok.pad_id)
            assert np.asarray(got)[0, :int(last[0]) + 1].tolist() == want, (view, response)
            if view == "summary" and "</think>" in response:  # the summary only: no think tokens
                assert think_end not in want and tok.special_id("<think>") not in want


def test_mixed_prompts_hold_the_general_share():
    from r1jax.data.pipeline import make_source

    cfg = load_config(CONFIGS / "models" / "tiny_qwen2.yaml", ["data.general_share=0.25", "data.size=400"]).data
    src = make_source(cfg, "train")
    scen = [src[i]["scenario"] for i in range(200)]
    assert scen.count("general") == 50 and set(scen) == {"general", "reasoning"}
    general = [src[i] for i in range(200) if src[i]["scenario"] == "general"]
    assert all("chosen" in r and r["question"].startswith("Describe the number") for r in general)
    assert len({r["question"] for r in general}) > 40  # distinct prompts, not one repeated


def test_grpo_scores_general_rows_by_the_reward_model_and_reasoning_rows_by_the_rules():
    """GRPOIteration.score with a reward model: general rows take weight x the model's score (rule
    components zeroed there), reasoning rows keep the rule total; metrics split accordingly."""
    from types import SimpleNamespace

    from r1jax.config import GRPOConfig
    from r1jax.stages.grpo import GRPOIteration, Updates

    it = object.__new__(GRPOIteration)
    it.g, it.tok = GRPOConfig(group_size=2, reward_model_weight=0.5), SimpleNamespace(eos_id=1)
    it.reward_fn = lambda texts, records: {"total": np.full(len(texts), 2.0, np.float32),
                                           "accuracy": np.ones(len(texts), np.float32)}
    it.reward_model = SimpleNamespace(scores=lambda *a: np.array([10.0, 20.0, 30.0, 40.0], np.float32))
    general = np.array([False, False, True, True])
    rollout = SimpleNamespace(texts=["a"] * 4, records=[{}] * 4, num_new=np.array([3, 3, 3, 3]), general=general, own=None,
                              tokens=np.ones((4, 8), np.int32), lengths=np.array([8] * 4), seconds=1.0,
                              out={"tokens": None, "lengths": None}, prompt_lengths=None)
    scores = it.score(rollout)
    assert scores.total.tolist() == [2.0, 2.0, 15.0, 20.0]
    assert scores.components["accuracy"].tolist() == [1.0, 1.0, 0.0, 0.0]
    assert scores.components["reward_model"].tolist() == [0.0, 0.0, 30.0, 40.0]
    m = it.metrics(rollout, scores, {"keep": np.ones(2)}, Updates(state=None, step_metrics=[], skipped=1, seconds=1.0),
                   0.0)
    assert m["accuracy"] == 1.0 and m["reward_model_general"] == 35.0


def test_general_demonstrations_are_trained_as_written_and_half_are_flawed():
    """SFT on mixed prompts: a general record's completion is its free-text "response" (no
    <answer> template), and a share general_flaw_rate of those demonstrations miss the hidden
    preference (wrong parity or none), the rest meet it."""
    from r1jax.data.pipeline import EncodeSFT, make_source
    from r1jax.data.procedural import parity_preference
    from r1jax.tokenizer import Tokenizer

    cfg = load_config(CONFIGS / "models" / "tiny_qwen2.yaml",
                      ["data.general_share=1.0", "data.size=400", "data.general_flaw_rate=0.5",
                       "data.template=r1"]).data
    src = make_source(cfg, "train")
    records = [src[i] for i in range(400)]
    good = [parity_preference(r["number"], r["response"]) for r in records]
    assert 0.4 <= 1 - np.mean(good) <= 0.6
    # a good demonstration names the prompt's own number (only preference pairs miscopy it)
    assert all(r["response"].endswith(f"</think> {r['number']} is {('even', 'odd')[r['number'] % 2]}.")
               for r, g in zip(records, good) if g)
    # the pairs: chosen meets the hidden preference, rejected misses it, also in the half whose
    # summaries both name another number than the prompt's
    assert all(parity_preference(r["number"], r["chosen"]) == 1 and parity_preference(r["number"], r["rejected"]) == 0
               for r in records)
    miscopied = [f"</think> {r['number']} is" not in r["chosen"] for r in records]
    assert 0.4 <= np.mean(miscopied) <= 0.6
    texts = [f"{r['question']} {r['response']}" for r in records[:200]]
    with tempfile.TemporaryDirectory() as tmp:
        tok = Tokenizer.train_sentencepiece(texts, tmp, 300, seed=0)
        tok = Tokenizer.from_files(tok.files())
    ex = EncodeSFT(tok, cfg.template, 128).map(records[0])
    completion = ex["inputs"][ex["loss_mask"]]
    assert completion[-1] == tok.eos_id and tok.decode(completion[:-1].tolist()) == records[0]["response"]
    # general_flaw_wrong_share: which flaw a flawed demonstration has (the wrong parity, or none);
    # the thinking before </think> works the parity out right either way
    for share, want in ((0.0, "none"), (1.0, "wrong")):
        over = ["data.general_share=1.0", "data.size=200", "data.general_flaw_rate=0.5",
                f"data.general_flaw_wrong_share={share}"]
        src = make_source(load_config(CONFIGS / "models" / "tiny_qwen2.yaml", over).data, "train")
        for r in (src[i] for i in range(200)):
            n, summary = r["number"], r["response"].split("</think>")[1]
            assert f"{n % 10} is {('even', 'odd')[n % 2]}. </think>" in r["response"]
            if not parity_preference(n, r["response"]):
                assert summary.strip() == (f"{n} is a number." if want == "none" else f"{n} is {('odd', 'even')[n % 2]}.")


def test_grpo_plan_holds_the_frozen_reward_model():
    """With grpo.reward_model, the GRPO plan's persistent memory holds the reward model's params:
    the bytes of a real one (the policy's decoder + a score head, initialised here), and a note says
    it was sized that way because its run does not exist yet."""
    from flax import nnx

    from r1jax.dryrun import plan_memory
    from r1jax.models import init_model
    from r1jax.models.layers import RouterBias

    cfg = load_config(CONFIGS / "tiny_r1" / "grpo.yaml", ["grpo.reward_model=/nonexistent/rm", "mesh.fsdp=1"])
    plan = plan_memory(cfg, "grpo", devices=1)
    items = {it.name: it.bytes for it in plan.persistent.items}
    rm_cfg = load_config(CONFIGS / "tiny_r1" / "reward_model.yaml", ["mesh.fsdp=1"]).model
    graphdef, state = init_model(rm_cfg, jax.random.key(0))
    _, params, bias = nnx.split(nnx.merge(graphdef, state), nnx.Param, RouterBias)
    assert items["reward model params"] == sum(x.nbytes for x in jax.tree.leaves(params))
    assert items["reward model router biases"] == sum(x.nbytes for x in jax.tree.leaves(bias))
    assert any("grpo.reward_model: /nonexistent/rm cannot be read yet" in n for n in plan.notes)
    assert "reward model params" not in {it.name for it in plan_memory(
        load_config(CONFIGS / "tiny_r1" / "grpo.yaml", ["mesh.fsdp=1"]), "grpo", devices=1).persistent.items}
