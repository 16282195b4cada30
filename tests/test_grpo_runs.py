"""The GRPO stage end to end on a tiny MoE (8 fake devices): rollouts agree with the training forward,
the update moves the policy toward higher reward, dynamic sampling, the reference policy, exact
resume, and the `grpo` / `sample` commands."""

import json
import shutil

import jax
import numpy as np
import pytest

from conftest import CONFIGS
from r1jax import cli
from r1jax.config import load_config
from r1jax.stages.grpo import run_grpo
from r1jax.train.grpo import GRPOState, prompt_indices

BASE = ["train.seq_len=80", "train.log_every=1", "train.eval_examples=0", "data.source=arithmetic",
        "data.template=r1", "data.size=5000", "tokenizer.train_vocab_size=330", "tokenizer.train_examples=800",
        "grpo.group_size=4", "grpo.prompts_per_step=4", "sampling.max_new_tokens=24", "grpo.minibatches=2",
        "optimizer.warmup_steps=0", "optimizer.schedule=constant", "optimizer.lr=3e-3"]


def config(*overrides):
    return load_config(CONFIGS / "models" / "tiny_v3.yaml", [*BASE, *overrides])


def digit_share(texts, records):
    """A reward the random policy can climb: the share of digits in the completion."""
    r = np.array([sum(c.isdigit() for c in t) / max(len(t), 1) for t in texts], np.float32)
    return {"total": r, "digits": r}


def constant(texts, records):
    return {"total": np.ones(len(texts), np.float32)}


def leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_prompt_indices_are_a_permutation_per_epoch_and_stateless():
    n, per = 10, 4
    drawn = np.concatenate([prompt_indices(n, 3, it, per) for it in range(5)])  # 20 draws = 2 epochs
    assert sorted(drawn[:10]) == list(range(10)) and sorted(drawn[10:20]) == list(range(10))
    assert not np.array_equal(drawn[:10], drawn[10:20])
    np.testing.assert_array_equal(prompt_indices(n, 3, 2, per), drawn[8:12])  # straddles the epoch boundary


@pytest.fixture(scope="module")
def learning_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("grpo") / "run"
    cfg = config("train.steps=10", "grpo.beta=0.04", "grpo.ref_refresh_every=400", "grpo.inner_epochs=2",
                 f"checkpoint.dir={run}", "checkpoint.every=5")
    return cfg, run, run_grpo(cfg, reward_fn=digit_share)


def test_policy_moves_toward_higher_reward(learning_run):
    _, _, out = learning_run
    rewards = [h["reward"] for h in out.history]
    assert len(rewards) == 10
    assert np.mean(rewards[-3:]) > 2 * np.mean(rewards[:3]), rewards  # measured: 0.05 -> 0.15


def test_rollout_logprobs_match_the_training_forward_and_metrics(learning_run):
    _, _, out = learning_run
    for h in out.history:
        assert h["logp_mismatch"] < 1e-4  # sampler log-probs == pi_old recomputed by the training forward
        assert h["updates"] == 4  # inner_epochs x minibatches
        for key in ("kl", "clip_fraction", "entropy", "reward_digits", "response_length", "sampling_tokens_per_s",
                    "training_tokens_per_s", "grad_norm", "load_max_over_mean"):
            assert np.isfinite(h[key]), key
    assert out.history[-1]["kl"] > 0  # the policy left the (never refreshed) reference


def test_checkpoint_holds_the_reference_and_moe_biases_moved(learning_run):
    cfg, run, out = learning_run
    state = out.state
    assert isinstance(state, GRPOState) and int(state.step) == 10 and int(state.opt_step) == 40
    assert state.ref_params is not None
    ref, params = leaves(state.ref_params), leaves(state.params)
    assert any(not np.array_equal(a, b) for a, b in zip(ref, params))
    assert any(np.any(b != 0) for b in leaves(state.router_bias))  # aux-loss-free balancing kept running
    assert sorted(int(p.name) for p in run.iterdir() if p.name.isdigit()) == [5, 10]


def test_resume_after_a_crash_reproduces_the_run(learning_run, tmp_path):
    cfg, run, out = learning_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    shutil.rmtree(copy / "10")  # as if killed between the checkpoints at 5 and 10
    (copy / "metrics.jsonl").unlink()
    again = run_grpo(config(*[f"{k}" for k in ("train.steps=10", "grpo.beta=0.04", "grpo.ref_refresh_every=400",
                                               "grpo.inner_epochs=2", "checkpoint.every=5")],
                            f"checkpoint.dir={copy}"), reward_fn=digit_share)
    assert again.how == "resume" and again.step == 10
    first = {h["step"]: h for h in out.history}
    for h in again.history:
        assert h["reward"] == pytest.approx(first[h["step"]]["reward"], abs=1e-6)
        assert h["loss"] == pytest.approx(first[h["step"]]["loss"], rel=1e-4, abs=1e-7)
    for a, b in zip(leaves(out.state.params), leaves(again.state.params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    for a, b in zip(leaves(out.state.ref_params), leaves(again.state.ref_params)):
        np.testing.assert_array_equal(a, b)


def test_dynamic_sampling_drops_uninformative_groups_and_beta_zero_keeps_no_reference():
    cfg = config("train.steps=2", "grpo.beta=0", "grpo.dynamic_sampling=true")
    out = run_grpo(cfg, reward_fn=constant)
    state = out.state
    assert state.ref_params is None
    assert all(h["groups_kept"] == 0 and h["updates"] == 0 for h in out.history)
    assert int(state.opt_step) == 0  # no optimizer step: all-equal groups carry no signal


def test_reference_refresh_copies_the_policy():
    """(With routing replay on: the rollouts' routes reach the log-prob passes and the updates: pi_old
    is the sampler's log-prob, and the metrics say how often the routers disagreed.)"""
    out = run_grpo(config("train.steps=2", "grpo.beta=0.04", "grpo.ref_refresh_every=2",
                          "grpo.routing_replay=rollout"), reward_fn=digit_share)
    for a, b in zip(leaves(out.state.ref_params), leaves(out.state.params)):
        np.testing.assert_array_equal(a, b)
    for h in out.history:
        assert h["logp_mismatch"] < 1e-4 and h["updates"] == 2
        # the share of replayed selections that pi_old's router / the updated policy's would change
        assert 0 <= h["routing_mismatch"] <= 1 and 0 <= h["routing_flips"] <= 1


def test_sample_command_reads_the_run(learning_run, capsys, tmp_path):
    _, run, _ = learning_run
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"question": "What is 100 + 200?"}) + "\n")
    rc = cli.main(["sample", str(run), "--prompt", "What is 1 + 2?", "--prompts", str(prompts), "--num-samples", "3",
                   "--temperature", "0", "--max-new-tokens", "8"])
    assert rc == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [x["prompt"] for x in lines] == ["What is 1 + 2?"] * 3 + ["What is 100 + 200?"] * 3
    assert len({x["completion"] for x in lines[:3]}) == 1  # greedy: every sample the same
    assert all(0 < x["tokens"] <= 8 and x["logprob"] <= 0 for x in lines)


def test_bad_input_is_one_clear_error(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json\n")
    assert cli.main(["sample", str(tmp_path), "--prompt", "x"]) == 2
    assert "no r1jax checkpoint here" in capsys.readouterr().err
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"base: {CONFIGS / 'models' / 'tiny_v3.yaml'}\ngrpo: {{group_size: 1, clip_hihg: 0.3}}\n")
    assert cli.main(["grpo", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "grpo.clip_hihg" in err and str(cfg) in err


@pytest.mark.slow
def test_two_processes_score_their_own_rows(tmp_path):
    """Rewards by process: in a two-process job each process scores only its half of the rollouts,
    and the advantages every iteration trains on are those of the same run on one process. (The dense
    student: which rows a process scores is the data axis's business, whatever the model; the MoE's
    experts across processes are test_sft_runs.py's two-process test.)"""
    import os
    import subprocess
    import sys

    from conftest import ROOT, xla_flags

    from grpo_process_run import run

    helper = str(ROOT / "tests" / "grpo_process_run.py")
    mesh = ["mesh.data=2", "mesh.fsdp=4", "mesh.expert=1", "mesh.tensor=1", "train.steps=2",
            "checkpoint.every=2", "distributed.heartbeat_timeout=10", "distributed.initialization_timeout=120"]
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1",
               XLA_FLAGS=xla_flags(4))
    # here: one process, 8 devices
    run(tmp_path / "one", "tiny_qwen2", [*BASE, *mesh, f"checkpoint.dir={tmp_path / 'run1'}"])
    two = subprocess.run([sys.executable, str(ROOT / "launch" / "local.py"), "--processes", "2",
                          "--devices-per-process", "4", "--", sys.executable, helper, str(tmp_path / "two"),
                          "tiny_qwen2", *BASE, *mesh, f"checkpoint.dir={tmp_path / 'run2'}"], env=env,
                         capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stdout[-3000:]
    ref = json.loads((tmp_path / "one" / "p0.json").read_text())
    n = 4 * 4  # prompts x group size
    assert ref["scored"] == [n, n]
    for p in ("p0", "p1"):
        got = json.loads((tmp_path / "two" / f"{p}.json").read_text())
        assert got["scored"] == [n // 2, n // 2], p  # its own half of the rows only
        np.testing.assert_allclose(got["advantages"], ref["advantages"], atol=1e-6)
    assert np.std(ref["advantages"]) > 0  # the reward has variance: the comparison can fail
