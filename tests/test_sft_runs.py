"""Whole SFT runs in subprocesses: exact resume after SIGKILL, SIGTERM, bad input, divergence,
stage hand-off, damaged checkpoints (resume and hand-off), and two processes x 4 devices against
one process x 8 devices."""

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
import yaml

from conftest import CONFIGS, ROOT, xla_flags
from r1jax.checkpoint import RunCheckpointer
from r1jax.config import load_config
from r1jax.stages.start import _with_shardings
from r1jax.train.state import abstract_train_state, make_context

pytestmark = pytest.mark.slow  # every test here runs whole SFT runs in subprocesses

# Resume, preemption, bad input, divergence and hand-off are the stage loop's and the checkpointer's
# behaviour, whatever the model: they run the dense student (the cheapest program to compile); the
# multi-process tests below run the MoE, whose experts shard across processes.
TINY = {"base": str(CONFIGS / "models" / "tiny_qwen2.yaml"),
        "train": {"steps": 12, "batch_size": 8, "seq_len": 96, "log_every": 1, "eval_examples": 0},
        # constant after warmup: the compiled step does not depend on train.steps, so the runs of
        # different lengths below share one program (the persistent compilation cache)
        "optimizer": {"lr": 3e-3, "warmup_steps": 2, "schedule": "constant"},
        "data": {"source": "arithmetic", "template": "r1", "size": 5000},
        "tokenizer": {"train_vocab_size": 330, "train_examples": 800},
        "checkpoint": {"every": 4, "keep": 5}}


def write_config(path: Path, run_dir: Path, **sections) -> Path:
    cfg = json.loads(json.dumps(TINY))
    cfg["checkpoint"]["dir"] = str(run_dir)
    for section, values in sections.items():
        if section == "base":
            cfg["base"] = values
        else:
            cfg.setdefault(section, {}).update(values)
    path.write_text(yaml.safe_dump(cfg))
    return path


def env(devices=1):
    return dict(os.environ, XLA_FLAGS=xla_flags(devices), JAX_PLATFORMS="cpu",
                PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")


def sft(config: Path, *overrides, devices=1, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "r1jax.cli", "sft", str(config), *overrides], env=env(devices),
                          capture_output=True, text=True, timeout=timeout)


def start(config: Path, *overrides, devices=1) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "r1jax.cli", "sft", str(config), *overrides], env=env(devices),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def logged(run_dir: Path) -> list[dict]:
    f = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in f.read_text().splitlines()] if f.exists() else []


def wait_for_step(run_dir: Path, step: int, proc: subprocess.Popen, timeout=300):
    t0 = time.time()
    while time.time() - t0 < timeout:
        rows = logged(run_dir)
        if rows and rows[-1]["step"] >= step:
            return rows[-1]["step"]
        if proc.poll() is not None:
            raise AssertionError(f"run ended early: {proc.stderr.read()[-2000:]}")
        time.sleep(0.2)
    raise AssertionError(f"step {step} not reached in {timeout}s")


def final_params(config: Path, run_dir: Path) -> list[np.ndarray]:
    cfg = load_config(config)
    ctx = make_context(cfg)
    dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = abstract_train_state(ctx)
    target = _with_shardings(abstract, jax.tree.map(lambda _: dev, abstract))
    ck = RunCheckpointer(run_dir, every=1, keep=10, async_save=False)
    state, _, _ = ck.restore(ck.latest_step(), target)
    return [np.asarray(x) for x in jax.tree.leaves(state)]


def tree_digest(path: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(path)).encode() + p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """An uninterrupted 12-step run."""
    d = tmp_path_factory.mktemp("ref")
    config = write_config(d / "cfg.yaml", d / "run")
    r = sft(config)
    assert r.returncode == 0, r.stderr[-3000:]
    return config, d / "run", logged(d / "run"), final_params(config, d / "run")


def test_exact_resume_after_sigkill(tmp_path, reference_run):
    _, _, ref_log, ref_params = reference_run
    config = write_config(tmp_path / "cfg.yaml", tmp_path / "run")
    proc = start(config)
    wait_for_step(tmp_path / "run", 6, proc)
    while not (tmp_path / "run" / "4").is_dir():  # the step-4 save finished (async: about at step 6)
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = logged(tmp_path / "run")[-1]["step"]
    assert killed_at < 12
    r = sft(config)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resume" in r.stdout
    resumed_from = re.search(rf"resuming from step (\d+) in {tmp_path / 'run'}", r.stderr)
    assert resumed_from, r.stderr[-3000:]
    assert int(resumed_from[1]) in (4, 8) and int(resumed_from[1]) < killed_at  # back to the last checkpoint
    rows = logged(tmp_path / "run")
    assert [x["step"] for x in rows] == list(range(1, 13))  # each step once: the replayed ones replaced
    for x, ref in zip(rows, ref_log):  # same batches in the same order give bit-identical losses
        assert x["loss"] == ref["loss"], x["step"]
    for a, b in zip(ref_params, final_params(config, tmp_path / "run")):
        np.testing.assert_array_equal(a, b)


def test_sigterm_saves_the_current_step(tmp_path):
    config = write_config(tmp_path / "cfg.yaml", tmp_path / "run", train={"steps": 400}, checkpoint={"every": 1000})
    proc = start(config)
    wait_for_step(tmp_path / "run", 3, proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err[-2000:]
    last = logged(tmp_path / "run")[-1]["step"]
    ck = RunCheckpointer(tmp_path / "run", every=1000, keep=3, async_save=False)
    assert ck.latest_step() == last and 3 <= last < 400
    assert "preempted" in err


def sft_here(config: Path, *overrides) -> subprocess.CompletedProcess:
    """`r1jax sft` in this process (for runs refused before any step: no process start-up to pay)."""
    import contextlib
    import io

    from r1jax import cli

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli.main(["sft", str(config), *overrides])
    return subprocess.CompletedProcess(["r1jax", "sft", str(config)], rc, out.getvalue(), err.getvalue())


def test_bad_input_fails_clearly_and_touches_nothing(tmp_path, reference_run):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "1+1", "answer": "2"}\n{"question": "2+2", "answer": "4"}\n{"question": "3+\n')
    config = write_config(tmp_path / "cfg.yaml", tmp_path / "run", data={"source": "jsonl", "path": str(bad)})
    r = sft_here(config)
    assert r.returncode == 2 and "bad.jsonl:3" in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())
    ref_config, run_dir, _, _ = reference_run
    before = tree_digest(run_dir)
    r = sft_here(ref_config, "model.d_ff=96", "train.steps=20")
    assert r.returncode == 2 and "model.d_ff" in r.stderr and "128" in r.stderr, r.stderr
    r = sft_here(ref_config, "data.ops=['+','-']", "train.steps=20")
    assert r.returncode == 2 and "data.ops" in r.stderr
    assert tree_digest(run_dir) == before


def test_nonfinite_loss_stops_with_last_good_checkpoint(tmp_path):
    config = write_config(tmp_path / "cfg.yaml", tmp_path / "run", optimizer={"lr": 1e30, "warmup_steps": 0,
                                                                             "grad_clip": 0.0},
                          checkpoint={"every": 1})
    r = sft(config)
    assert r.returncode == 3, r.stderr[-2000:]
    ck = RunCheckpointer(tmp_path / "run", every=1, keep=5, async_save=False)
    good = ck.latest_step()
    assert f"step {good + 1}: loss is nan" in r.stderr and f"step {good}" in r.stderr
    assert all(np.isfinite(x).all() for x in final_params(config, tmp_path / "run"))


def test_handoff_starts_from_the_earlier_stage(tmp_path, reference_run):
    _, ref_run, _, ref_params = reference_run
    config = write_config(tmp_path / "cfg.yaml", tmp_path / "run", train={"steps": 1},
                          optimizer={"lr": 0.0, "warmup_steps": 0}, tokenizer={"train_vocab_size": 0},
                          checkpoint={"init_from": str(ref_run)})
    r = sft(config)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "hand-off" in r.stdout
    assert f"checkpoint.init_from: starting from step 12 of {ref_run}\n" in r.stderr  # names the step it uses
    cfg = load_config(config)
    ctx = make_context(cfg)
    n_params = len(jax.tree.leaves(abstract_train_state(ctx).params))
    got = final_params(config, tmp_path / "run")
    ref_state_params = ref_params[1:1 + n_params]  # leaves order: step, params, opt_state, router_bias
    for a, b in zip(ref_state_params, got[1:1 + n_params]):
        np.testing.assert_array_equal(a, b)  # lr 0: the hand-off params are kept as they were


def largest_file(directory: Path) -> Path:
    return max((p for p in directory.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def test_a_damaged_step_is_skipped_and_the_run_ends_as_the_reference(tmp_path, reference_run):
    """The reference run as a kill after step 10 leaves it (checkpoints 4 and 8, metrics to step
    10), with the step-8 checkpoint truncated: the run resumes from step 4, saying so in one line
    per fact, leaves step 8 as it is, logs each step once and ends bit-identical to the reference;
    then rerunning the finished run adds nothing."""
    _, ref_run, ref_log, ref_params = reference_run
    run = tmp_path / "run"
    shutil.copytree(ref_run, run, ignore=lambda d, names: ["12"] if Path(d) == ref_run else [])
    (run / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in ref_log if x["step"] <= 10))
    victim = largest_file(run / "8" / "state")
    size = victim.stat().st_size
    os.truncate(victim, size // 2)
    damaged = tree_digest(run / "8")
    config = write_config(tmp_path / "cfg.yaml", run, train={"eval_examples": 4, "eval_max_new_tokens": 8})
    r = sft(config)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stderr.splitlines()
    assert [line for line in lines if f"{run}/8" in line] == [
        f"checkpoint {run}/8: {victim.relative_to(run / '8')} is truncated ({size // 2} of {size} bytes); left in place"]
    assert f"resuming from step 4 in {run}, the newest intact step (damaged: 8)" in lines
    assert tree_digest(run / "8") == damaged  # left in place: not deleted, not rewritten at step 8
    rows = logged(run)
    assert [x["step"] for x in rows] == list(range(1, 13))
    assert [x["loss"] for x in rows] == [x["loss"] for x in ref_log]
    for a, b in zip(ref_params, final_params(config, run)):
        np.testing.assert_array_equal(a, b)
    evals = (run / "evals.jsonl").read_text()
    assert [json.loads(line)["step"] for line in evals.splitlines()] == [12]
    # the finished run again: nothing to train or evaluate; it reports the last logged step
    metrics = (run / "metrics.jsonl").read_text()
    r = sft_here(config)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "loss nan" not in r.stdout and f"loss {ref_log[-1]['loss']:.4f}" in r.stdout, r.stdout
    assert (run / "evals.jsonl").read_text() == evals and (run / "metrics.jsonl").read_text() == metrics


def test_init_from_a_damaged_step_is_refused_in_one_line(tmp_path, reference_run):
    """Never an older step silently, never "does not fit" for a damaged file: one line naming the
    damaged step, its file and the newest intact step; nothing touched."""
    _, ref_run, _, _ = reference_run
    src = tmp_path / "earlier"
    shutil.copytree(ref_run, src)
    meta = src / "12" / "state" / "_METADATA"
    size = meta.stat().st_size
    os.truncate(meta, 50)
    config = write_config(tmp_path / "cfg.yaml", tmp_path / "run", tokenizer={"train_vocab_size": 0},
                          checkpoint={"init_from": str(src)})
    hint = f"its newest intact step is 8: checkpoint.init_from={src}/8 starts from it"
    for damage, what in ((lambda: None, f"state/_METADATA is truncated (50 of {size} bytes)"),
                         (lambda: shutil.rmtree(src / "12" / "state"), "state/ is missing")):
        damage()
        before = tree_digest(src)
        r = sft_here(config)
        assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
        assert f"{src}/12: {what}" in r.stderr and hint in r.stderr and "does not fit" not in r.stderr, r.stderr
        assert tree_digest(src) == before
        assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


def test_checkpoint_dir_that_is_a_file_or_cannot_be_created(tmp_path):
    f = tmp_path / "not_a_dir"
    f.write_text("x")
    for run_dir, what in ((f, f"{f} is a file, not a directory"), (f / "run", f"cannot create {f}/run: {f} is a file")):
        r = sft_here(write_config(tmp_path / "cfg.yaml", run_dir))
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and what in r.stderr, r.stderr
    assert f.read_text() == "x"


# Data, FSDP and expert parallelism across processes; the MoE without its MTP module (the smallest
# program that still shards every kind of weight).
MULTI = {"base": str(CONFIGS / "models" / "tiny_v3.yaml"),
         "mesh": {"data": 2, "fsdp": 2, "expert": 2, "tensor": 1}, "data": {"num_shards": 2},
         "model": {"mtp_depth": 0}, "train": {"steps": 3}, "checkpoint": {"every": 3},
         "distributed": {"heartbeat_timeout": 10, "initialization_timeout": 120}}


def test_two_processes_match_one_process(tmp_path):
    one = write_config(tmp_path / "one.yaml", tmp_path / "run1", **MULTI)
    r = sft(one, devices=8)
    assert r.returncode == 0, r.stderr[-3000:]
    two = write_config(tmp_path / "two.yaml", tmp_path / "run2", **MULTI)
    r = subprocess.run([sys.executable, str(ROOT / "launch" / "local.py"), "--processes", "2",
                        "--devices-per-process", "4", "--", "r1jax", "sft", str(two)],
                       env=env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:]
    a = final_params(one, tmp_path / "run1")
    b = final_params(two, tmp_path / "run2")  # written by two processes, restored here in one
    for x, y in zip(a, b):
        np.testing.assert_allclose(x, y, atol=1e-6, rtol=0)
    assert [x["loss"] for x in logged(tmp_path / "run1")] == pytest.approx([x["loss"] for x in logged(tmp_path / "run2")],
                                                                            abs=1e-6)


def test_a_dead_process_fails_the_other_within_bounded_time(tmp_path):
    # failure detection is the distributed runtime's, whatever the model: the dense student, data x fsdp
    config = write_config(tmp_path / "cfg.yaml", tmp_path / "run", **dict(
        MULTI, base=TINY["base"], model={}, mesh={"data": 2, "fsdp": 4, "expert": 1, "tensor": 1},
        train={"steps": 5000}, checkpoint={"every": 10000},
        distributed={"heartbeat_timeout": 5, "initialization_timeout": 120}))
    procs = []
    port = __import__("socket").socket()
    port.bind(("127.0.0.1", 0))
    address = f"127.0.0.1:{port.getsockname()[1]}"
    port.close()
    for i in range(2):
        e = dict(env(4), R1JAX_COORDINATOR_ADDRESS=address, R1JAX_NUM_PROCESSES="2", R1JAX_PROCESS_ID=str(i))
        procs.append(subprocess.Popen([sys.executable, "-m", "r1jax.cli", "sft", str(config)], env=e,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    try:
        wait_for_step(tmp_path / "run", 2, procs[0])
        procs[1].kill()
        t0 = time.time()
        procs[0].wait(timeout=120)
        assert time.time() - t0 < 120
        assert procs[0].returncode != 0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
