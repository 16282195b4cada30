"""The pipeline runner: a pipeline file's checks, and a small R1 pipeline (cold-start SFT -> GRPO ->
rejection sampling -> logit distillation of a dense student -> evaluation) that, killed with SIGKILL
in the middle of a stage and rerun with the same command, finishes with the same final metrics as an
uninterrupted run without redoing the finished stages.

What is tested is the runner (hand-offs, skips, resumes, the report), whatever the model: teacher and
student are the dense tiny model (the cheapest program to compile), scored by one reward worker. The
README's main job runs the same stages with the MoE teacher."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import CONFIGS, ROOT, xla_flags
from r1jax.config import ConfigError
from r1jax.pipeline import heldout_accuracy, load_pipeline, stage_config

TASK = """\
data: {source: arithmetic, template: r1, min_digits: 1, max_digits: 2, ops: ["+"], size: 5000}
train: {seq_len: 80, batch_size: 8, log_every: 1, eval_examples: 8, eval_max_new_tokens: 24}
tokenizer: {train_vocab_size: 330, train_examples: 800}
mesh: {data: 1, fsdp: -1, expert: 1, tensor: 1}
grpo: {reward_workers: 1}
"""
FILES = {
    "task.yaml": TASK,
    "teacher.yaml": f"""base: [{CONFIGS / 'models' / 'tiny_qwen2.yaml'}, task.yaml]
train: {{steps: 6, eval_every: 3}}
optimizer: {{lr: 3e-3, warmup_steps: 0, schedule: constant}}
checkpoint: {{every: 2, keep: 2, async_save: false}}
""",
    "grpo.yaml": """base: teacher.yaml
train: {steps: 4, eval_every: 2}
grpo: {group_size: 4, prompts_per_step: 4, minibatches: 2, beta: 0.0}
sampling: {max_new_tokens: 16, temperature: 1.0}
""",
    "rejection.yaml": """base: teacher.yaml
rejection: {prompts: 8, samples_per_prompt: 2, prompts_per_batch: 4}
sampling: {max_new_tokens: 16, temperature: 0.6, top_p: 0.95}
""",
    "student.yaml": f"""base: [{CONFIGS / 'models' / 'tiny_qwen2.yaml'}, task.yaml]
train: {{steps: 6, eval_every: 3}}
optimizer: {{lr: 3e-3, warmup_steps: 0, schedule: constant}}
distill: {{mode: logits, loss: forward_kl, temperature: 2.0}}
checkpoint: {{every: 2, keep: 2, async_save: false}}
""",
    "eval.yaml": """base: teacher.yaml
eval: {sets: [heldout], k: 2, examples: 8}
sampling: {max_new_tokens: 16, temperature: 0.6, top_p: 0.95}
""",
    "pipeline.yaml": """name: mini
dir: RUN
stages:
  - {name: cold_start, kind: sft, config: teacher.yaml}
  - {name: rl, kind: grpo, config: grpo.yaml, init_from: cold_start}
  - {name: rejection, kind: rejection, config: rejection.yaml, init_from: rl}
  - {name: student, kind: distill, config: student.yaml, teacher_from: rl}
  - {name: eval_student, kind: eval, config: eval.yaml, init_from: student}
""",
}


def write_pipeline(folder: Path, run: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in FILES.items():
        (folder / name).write_text(text.replace("RUN", str(run)))
    return folder / "pipeline.yaml"


def env():
    e = dict(os.environ)
    e["XLA_FLAGS"] = xla_flags(1)
    e["PYTHONPATH"] = str(ROOT) + os.pathsep + e.get("PYTHONPATH", "")
    return e


def command(path):
    return [sys.executable, "-m", "r1jax.cli", "pipeline", str(path)]


TIMING = ("seconds", "how", "dataset", "tokens_per_s", "mfu", "samples_per_second", "sampling_tokens_per_s",
          "training_tokens_per_s", "step_time")


def untimed(obj):
    """`obj` without wall-clock measurements (and without how the stage started)."""
    if isinstance(obj, dict):
        return {k: untimed(v) for k, v in obj.items()
                if k not in TIMING and "per_s" not in k and not k.endswith("seconds")}
    if isinstance(obj, list):
        return [untimed(v) for v in obj]
    return obj


def final_metrics(run: Path) -> dict:
    """What the pipeline ends with: each stage's summary minus wall-clock figures."""
    out = {}
    for stage in ("cold_start", "rl", "rejection", "student", "eval_student"):
        out[stage] = untimed(json.loads((run / stage / "stage.json").read_text()))
    out["eval_results"] = (run / "eval_student" / "heldout.jsonl").read_text()
    return out


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    base = tmp_path_factory.mktemp("pipe")
    run = base / "run"
    path = write_pipeline(base / "cfg", run)
    r = subprocess.run(command(path), env=env(), capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    return run, r


@pytest.mark.slow
def test_pipeline_runs_every_stage_and_writes_a_report(uninterrupted):
    run, r = uninterrupted
    report = (run / "report.md").read_text()
    for stage in ("cold_start", "rl", "rejection", "student", "eval_student"):
        assert (run / stage / "stage.json").is_file()
        assert f"| {stage} |" in report
    assert (run / "curves.png").stat().st_size > 1000
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The training stages' held-out accuracy is the last evaluation they logged.
    for stage in ("cold_start", "rl", "student"):
        s = json.loads((run / stage / "stage.json").read_text())
        logged = [json.loads(line) for line in (run / stage / "evals.jsonl").read_text().splitlines()]
        assert heldout_accuracy(s) == logged[-1]["accuracy"]
        assert f"{heldout_accuracy(s):.1%}" in report
    ev = json.loads((run / "eval_student" / "stage.json").read_text())["sets"]["heldout"]
    rows = [json.loads(line) for line in (run / "eval_student" / "heldout.jsonl").read_text().splitlines()]
    assert len(rows) == ev["n"] == 8 and all(len(row["samples"]) == 2 for row in rows)
    assert ev["pass@1"] == sum(row["n_correct"] for row in rows) / (2 * 8)
    rej = json.loads((run / "rejection" / "stage.json").read_text())
    assert rej["samples"] == 16 and rej["accepted"] + sum(rej["rejected"].values()) == 16
    # The dataset's report says how its samples were drawn: the rejection config's sampling section.
    drawn = json.loads((run / "rejection" / "dataset" / "report.json").read_text())["sampling"]
    assert (drawn["temperature"], drawn["top_p"], drawn["max_new_tokens"]) == (0.6, 0.95, 16)
    # A second run of the same command does nothing but report.
    again = subprocess.run(command(run.parent / "cfg" / "pipeline.yaml"), env=env(), capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stderr.count("finished earlier; skipped") == 5


def _kill_when(path: Path, proc: subprocess.Popen, predicate, timeout: float = 600) -> None:
    t0 = time.time()
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"pipeline exited ({proc.returncode}) before the kill point: "
                                 f"{proc.stderr.read()[-3000:]}")
        if time.time() - t0 > timeout:
            proc.kill()
            raise AssertionError("kill point never reached")
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


@pytest.mark.slow
def test_sigkill_then_rerun_gives_the_same_final_metrics(uninterrupted, tmp_path):
    """SIGKILL once the GRPO stage has written its first checkpoint (mid-stage), rerun and SIGKILL again
    in the middle of the distillation stage, rerun to the end: finished stages are skipped (their
    stage.json untouched), the killed ones resume, and every final metric equals the uninterrupted run's."""
    ref_run, _ = uninterrupted
    run = tmp_path / "run"
    path = write_pipeline(tmp_path / "cfg", run)
    for kill_in in ("rl", "student"):
        proc = subprocess.Popen(command(path), env=env(), stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
        stage_dir = run / kill_in
        _kill_when(stage_dir, proc, lambda d=stage_dir: d.is_dir() and any(
            p.name.isdigit() and (p / "state").is_dir() for p in d.iterdir()))
        assert not (stage_dir / "stage.json").exists()
    finished = {p.parent.name: p.stat().st_mtime_ns for p in run.glob("*/stage.json")}
    assert sorted(finished) == ["cold_start", "rejection", "rl"]
    r = subprocess.run(command(path), env=env(), capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    for name, mtime in finished.items():
        assert (run / name / "stage.json").stat().st_mtime_ns == mtime, f"{name} was redone"
        kind = json.loads((run / name / "stage.json").read_text())["kind"]
        assert f"stage {name} ({kind}) finished earlier" in r.stderr
    for name in ("rl", "student"):  # both killed after their first checkpoint: both resumed
        assert json.loads((run / name / "stage.json").read_text())["how"] == "resume"
    assert final_metrics(run) == final_metrics(ref_run)


def test_pipeline_file_errors_name_the_key(tmp_path):
    path = write_pipeline(tmp_path / "cfg", tmp_path / "run")
    good = path.read_text()

    def bad(text, match):
        path.write_text(text)
        with pytest.raises(ConfigError, match=match):
            load_pipeline(path)

    bad(good.replace("name: mini", "name: mini\nstagez: []"), r"pipeline.yaml: stagez: unknown key")
    bad(good.replace("init_from: rl}", "init_from: rll}"), r"stage rejection.init_from: 'rll' is neither an earlier")
    bad(good.replace("kind: grpo", "kind: ppo"), r"stage rl.kind: expected one of")
    bad(good.replace("grpo.yaml", "nope.yaml"), r"stage rl.config: .*nope.yaml: not found")
    bad(good.replace("teacher_from: rl}", "data_from: rl}"), r"stage student.data_from: 'rl' is a grpo stage")
    bad(good.replace("- {name: rl,", "- {name: cold_start,"), r"stage cold_start: a second stage")
    bad(good.replace("dir: ", "dirr: "), r"dirr: unknown key")
    path.write_text(good)
    with pytest.raises(ConfigError, match=r"overrides name unknown stages: nosuch"):
        load_pipeline(path, ["nosuch.train.steps=3"])
    pipe = load_pipeline(path, ["rl.train.stepz=3"])
    with pytest.raises(ConfigError, match=r"train.stepz: unknown key"):
        stage_config(pipe, pipe.stages[1])


def test_stage_wiring(tmp_path):
    run = tmp_path / "run"
    pipe = load_pipeline(write_pipeline(tmp_path / "cfg", run), ["rl.train.steps=7", f"dir={run}"])
    cfgs = {s.name: stage_config(pipe, s) for s in pipe.stages}
    assert cfgs["rl"].train.steps == 7 and cfgs["cold_start"].train.steps == 6
    assert cfgs["rl"].checkpoint.init_from == str(run / "cold_start")
    assert cfgs["student"].distill.teacher == str(run / "rl")
    assert cfgs["student"].tokenizer.path == str(run / "rl")  # logits: the teacher's tokenizer
    assert cfgs["eval_student"].checkpoint.init_from == str(run / "student")
    for name, cfg in cfgs.items():
        assert cfg.checkpoint.dir == str(run / name)


def test_reward_from_and_seed_wiring(tmp_path):
    """The main job's last RL stage reads the reward-model stage (grpo.reward_model); `seed=N`
    gives every stage that data and init seed; a reward model only goes to a grpo stage, from an
    rm stage."""
    path = CONFIGS / "tiny_r1" / "pipeline.yaml"
    pipe = load_pipeline(path, ["seed=5", "dir=/tmp/elsewhere"])
    cfgs = {s.name: stage_config(pipe, s) for s in pipe.stages}
    assert cfgs["all_scenarios"].grpo.reward_model == "/tmp/elsewhere/reward_model"
    assert cfgs["reasoning_rl"].grpo.reward_model == ""
    assert all(c.data.seed == 5 and c.train.seed == 5 for c in cfgs.values())
    assert cfgs["cold_start"].data.general_share > 0 and cfgs["all_scenarios"].data.general_share > 0
    assert cfgs["reasoning_rl"].data.general_share == 0
    text = path.read_text()
    bad = {"kind: grpo, config: all_scenarios.yaml, init_from: reasoning_rl, reward_from: reward_model":
           ("kind: grpo, config: all_scenarios.yaml, init_from: reasoning_rl, reward_from: rejection",
            r"stage all_scenarios.reward_from: 'rejection' is a rejection stage, not rm"),
           "config: student.yaml, data_from: rejection}":
           ("config: student.yaml, data_from: rejection, reward_from: reward_model}",
            r"stage student.reward_from: only a grpo stage takes a reward model")}
    for folder in ("tiny_r1", "models"):  # the stage configs name ../models/...
        shutil.copytree(CONFIGS / folder, tmp_path / folder)
    for good, (wrong, match) in bad.items():
        copy = tmp_path / "tiny_r1" / "bad_pipeline.yaml"
        copy.write_text(text.replace(good, wrong))
        with pytest.raises(ConfigError, match=match):
            load_pipeline(copy)


def test_data_from_a_rejection_stage_trains_on_its_dataset(tmp_path):
    path = write_pipeline(tmp_path / "cfg", tmp_path / "run")
    path.write_text(path.read_text().replace("teacher_from: rl}", "data_from: rejection}"))
    (tmp_path / "cfg" / "student.yaml").write_text(FILES["student.yaml"].replace("mode: logits", "mode: sequence"))
    pipe = load_pipeline(path)
    cfg = stage_config(pipe, pipe.stages[3])
    data = tmp_path / "run" / "rejection" / "dataset"
    assert cfg.data.train_path == str(data / "train.jsonl") and cfg.data.source == "arithmetic"
    assert cfg.tokenizer.path == str(data / "tokenizer")


@pytest.mark.parametrize("path", [CONFIGS / "tiny_r1" / "pipeline.yaml", CONFIGS / "paper" / "pipelines" / "r1.yaml",
                                  CONFIGS / "paper" / "pipelines" / "r1_zero.yaml"])
def test_shipped_pipelines_load_and_dry_run(path):
    """The main job's pipeline and the paper pipelines: every stage config loads with its wiring and
    passes the dry-run checks (shapes only; nothing allocated)."""
    from r1jax.dryrun import dry_run

    pipe = load_pipeline(path)
    for spec in pipe.stages:
        cfg = stage_config(pipe, spec)
        assert cfg.checkpoint.dir == str(pipe.stage_dir(spec.name))
        report = dry_run(cfg, spec.kind, devices=None if "paper" in str(path) else 1)
        assert "memory per device" in report
