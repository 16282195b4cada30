"""Bad configs and bad data through the command line: exit 2 and one line naming the key or file:line
(issue 11, item 4). In-process (`r1jax.cli.main`): every case here is refused before any model,
tokenizer or JAX program is built. The last test runs SFT twice in child processes to show that a
200 MB record costs no memory beyond a warning."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import CONFIGS, ROOT, xla_flags
from r1jax.cli import main

TINY_QWEN2 = CONFIGS / "models" / "tiny_qwen2.yaml"


def records(n: int) -> list[str]:
    """n small, valid SFT records (JSON lines without newline)."""
    out = []
    for i in range(n):
        a, b = 100 + 7 * i % 900, 200 + 13 * i % 800
        out.append(json.dumps({"question": f"What is {a} + {b}?", "reasoning": f"{a} plus {b} is {a + b}.",
                               "answer": str(a + b)}))
    return out


def write_data(path: Path, lines: list[str | bytes]) -> Path:
    path.write_bytes(b"".join((x if isinstance(x, bytes) else x.encode()) + b"\n" for x in lines))
    return path


def stage_config(tmp_path: Path, data_file: Path, name: str = "run.yaml", **sections) -> Path:
    cfg = {"base": str(TINY_QWEN2),
           "train": {"steps": 2, "batch_size": 8, "seq_len": 96, "log_every": 1, "eval_examples": 0},
           "data": {"source": "jsonl", "path": str(data_file), "template": "r1"},
           "tokenizer": {"train_vocab_size": 330, "train_examples": 300}}
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg))
    return path


def refused(capsys, argv: list[str]) -> str:
    """Run the CLI; assert exit 2 with exactly one line on stderr; return that line."""
    assert main([str(a) for a in argv]) == 2
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err and not out.strip()
    return lines[0]


@pytest.fixture
def good_data(tmp_path):
    return write_data(tmp_path / "train.jsonl", records(20))


# ---- configs ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("key, text", [
    ("optimizer.lr", "nan"), ("optimizer.weight_decay", "inf"), ("optimizer.grad_clip", "-inf"),
    ("model.init_std", ".nan"), ("model.rope_theta", ".inf"), ("model.routed_scaling_factor", "NaN"),
])
def test_non_finite_float_on_the_command_line(tmp_path, capsys, good_data, key, text):
    cfg = stage_config(tmp_path, good_data)
    line = refused(capsys, ["sft", cfg, f"{key}={text}"])
    assert re.fullmatch(rf"error: {re.escape(str(cfg))}: command line: {re.escape(key)}: must be a finite number, "
                        r"got -?(nan|inf)", line), line


def test_non_finite_float_in_the_file_names_file_and_key(tmp_path, capsys, good_data):
    cfg = stage_config(tmp_path, good_data)
    cfg.write_text(cfg.read_text() + "optimizer:\n  lr: .nan\n")
    assert refused(capsys, ["sft", cfg]) == f"error: {cfg}: optimizer.lr: must be a finite number, got nan"


@pytest.mark.parametrize("override, message", [
    ("checkpoint.every=0", "checkpoint.every: must be > 0, got 0"),
    ("checkpoint.keep=0", "checkpoint.keep: must be > 0, got 0"),
    ("checkpoint.every=-1", "checkpoint.every: must be > 0, got -1"),
    ("train.seq_len=100000", "train.seq_len: 100000 exceeds model.max_seq_len=1024"),
])
def test_counts_and_lengths(tmp_path, capsys, good_data, override, message):
    cfg = stage_config(tmp_path, good_data, checkpoint={"dir": str(tmp_path / "run")})
    assert refused(capsys, ["sft", cfg, override]).startswith(f"error: {cfg}: command line: {message}")
    assert not (tmp_path / "run").exists()


def test_grpo_sampling_length_beyond_the_model(tmp_path, capsys, good_data):
    cfg = stage_config(tmp_path, good_data, train={"seq_len": 2048})
    line = refused(capsys, ["grpo", cfg, "model.max_seq_len=1024"])
    assert line.startswith(f"error: {cfg}: train.seq_len: 2048 exceeds model.max_seq_len=1024"), line
    line = refused(capsys, ["grpo", cfg, "train.seq_len=512", "sampling.max_new_tokens=4096"])
    assert "command line: sampling.max_new_tokens: 4096 leaves no room for a prompt within model.max_seq_len=1024" \
        in line


def test_duplicate_key_names_file_line_and_key(tmp_path, capsys, good_data):
    cfg = stage_config(tmp_path, good_data)
    cfg.write_text(cfg.read_text() + "optimizer:\n  lr: 0.001\n  warmup_steps: 0\n  lr: 0.1\n")
    n = len(cfg.read_text().splitlines())
    assert refused(capsys, ["sft", cfg]) == (f"error: {cfg}:{n}: optimizer.lr: duplicate key (first given on line "
                                             f"{n - 2}); give each key once")


def test_config_files_that_cannot_be_read(tmp_path, capsys, monkeypatch):
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(bytes(range(128, 256)) * 4)
    assert refused(capsys, ["sft", binary]) == f"error: {binary}: not a UTF-8 text file (byte 0x80 at offset 0); " \
                                               "a config file is YAML text"
    nul = tmp_path / "nul.yaml"
    nul.write_bytes(b"\x00" * 64)
    assert refused(capsys, ["sft", nul]).startswith(f"error: {nul}: not a text file (character #x0000")
    assert refused(capsys, ["sft", tmp_path / "missing.yaml"]) == f"error: {tmp_path / 'missing.yaml'}: " \
                                                                   "config file not found"
    assert refused(capsys, ["grpo", tmp_path]) == f"error: {tmp_path}: is a directory, not a config file"
    assert refused(capsys, ["summary", tmp_path]) == f"error: {tmp_path}: is a directory, not a config file"
    locked = tmp_path / "locked.yaml"
    locked.write_text(f"base: {TINY_QWEN2}\n")
    real = Path.read_bytes

    def read_bytes(self):  # as root, chmod 000 does not stop a read: fail the read itself
        if self.name == "locked.yaml":
            raise PermissionError(13, "Permission denied")
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    assert refused(capsys, ["sft", locked]) == f"error: {locked}: cannot read the config file (Permission denied)"


def test_pipeline_files_that_cannot_be_read_or_repeat_a_key(tmp_path, capsys):
    binary = tmp_path / "pipeline.yaml"
    binary.write_bytes(bytes(range(128, 256)) * 4)
    assert refused(capsys, ["pipeline", binary]).startswith(f"error: {binary}: not a UTF-8 text file")
    twice = tmp_path / "twice.yaml"
    twice.write_text("name: a\ndir: runs/a\nname: b\nstages: []\n")
    assert refused(capsys, ["pipeline", twice]).startswith(f"error: {twice}:3: name: duplicate key (first given on "
                                                           f"line 1)")
    assert refused(capsys, ["pipeline", tmp_path / "none.yaml"]) == f"error: {tmp_path / 'none.yaml'}: pipeline " \
                                                                    "file not found"


# ---- data ------------------------------------------------------------------------------------------

SURROGATE = '{"question": "What is \\ud800?", "answer": "1"}'


def test_lone_surrogate_in_sft_data(tmp_path, capsys):
    data = write_data(tmp_path / "train.jsonl", [*records(2), SURROGATE, *records(3)])
    cfg = stage_config(tmp_path, data)
    line = refused(capsys, ["sft", cfg])
    assert line.startswith(f"error: {data}:3: field 'question': lone surrogate \\ud800 at character 8"), line
    line = refused(capsys, ["sft", cfg, "data.source=arithmetic", f"data.train_path={data}"])
    assert line.startswith(f"error: {data}:3: field 'question': lone surrogate"), line
    line = refused(capsys, ["distill", cfg])
    assert line.startswith(f"error: {data}:3: field 'question': lone surrogate"), line


def test_lone_surrogate_in_grpo_prompts_and_rejection_data(tmp_path, capsys):
    data = write_data(tmp_path / "prompts.jsonl", [*records(4), SURROGATE])
    cfg = stage_config(tmp_path, data, train={"seq_len": 160}, sampling={"max_new_tokens": 64})
    assert refused(capsys, ["grpo", cfg]).startswith(f"error: {data}:5: field 'question': lone surrogate")
    good = write_data(tmp_path / "good.jsonl", records(4))
    cfg = stage_config(tmp_path, good, name="rej.yaml", checkpoint={"init_from": str(tmp_path / "no-policy")},
                       rejection={"non_reasoning_ratio": 0.5, "non_reasoning_path": str(data),
                                  "out": str(tmp_path / "dataset")})
    assert refused(capsys, ["rejection", cfg]).startswith(f"error: {data}:5: field 'question': lone surrogate")


def test_oversized_record_refused_when_asked(tmp_path, capsys):
    big = json.dumps({"question": "x" * 5000, "answer": "1"})
    data = write_data(tmp_path / "train.jsonl", [*records(3), big, *records(3)])
    cfg = stage_config(tmp_path, data, data={"max_record_bytes": 4096, "oversized": "error"})
    assert refused(capsys, ["sft", cfg]) == (f"error: {data}:4: record of {len(big)} bytes exceeds "
                                             "data.max_record_bytes=4096 (data.oversized=skip skips such records)")
    line = refused(capsys, ["sft", cfg, "data.oversized=drop"])
    assert "command line: data.oversized: expected one of 'skip', 'error', got 'drop'" in line


@pytest.mark.parametrize("text", ["", "\n  \n\n"])
def test_empty_or_blank_training_file(tmp_path, capsys, text):
    data = tmp_path / "train.jsonl"
    data.write_text(text)
    cfg = stage_config(tmp_path, data)
    assert refused(capsys, ["sft", cfg]) == (f"error: data.path: {data}: no records to read (it is empty or holds "
                                             "only blank lines)")
    assert refused(capsys, ["grpo", cfg, "train.seq_len=160", "sampling.max_new_tokens=64"]).startswith(
        f"error: data.path: {data}: no records")


def test_sample_prompts_file(tmp_path, capsys):
    def prompts(name, content: bytes) -> str:
        f = tmp_path / name
        f.write_bytes(content)
        return refused(capsys, ["sample", tmp_path / "no-checkpoint", "--prompts", f])

    f = tmp_path / "p.jsonl"
    assert prompts("p.jsonl", b'{"question": "q"}\n' + SURROGATE.encode() + b"\n") == \
        f"error: {f}:2: field 'question': lone surrogate \\ud800 at character 8: not valid Unicode text"
    assert prompts("p.txt", b"fine\n\xff\xfe bad\n") == f"error: {tmp_path / 'p.txt'}:2: not UTF-8 text (byte 0xff)"
    line = prompts("big.txt", b"short\n" + b"y" * (5 << 20) + b"\n")
    assert line == f"error: {tmp_path / 'big.txt'}:2: line of {5 << 20} bytes exceeds the {4 << 20}-byte limit " \
                   "of a prompt"
    assert refused(capsys, ["sample", tmp_path, "--prompts", tmp_path]) == \
        f"error: {tmp_path}: is a directory, not prompts file"
    assert refused(capsys, ["sample", tmp_path, "--prompt", "q", "--max-new-tokens", "0"]) == \
        "error: sample: --max-new-tokens must be > 0, got 0"


def test_sample_length_beyond_the_model(tmp_path, capsys, monkeypatch):
    """`r1jax sample`: the longest prompt + --max-new-tokens must fit model.max_seq_len (the policy is a
    stand-in: the check comes before anything is sampled)."""
    from types import SimpleNamespace

    import r1jax.stages.start
    from r1jax.config import load_config
    from r1jax.tokenizer import Tokenizer

    tok = Tokenizer.train_sentencepiece(records(300), tmp_path / "tok", 320)
    cfg = load_config(TINY_QWEN2, ["model.max_seq_len=64"])
    monkeypatch.setattr(r1jax.stages.start, "load_policy", lambda *a: SimpleNamespace(cfg=cfg, tokenizer=tok))
    n = len(tok.encode("User: What is 1 + 2?\nAssistant: ", add_bos=True))
    line = refused(capsys, ["sample", tmp_path, "--prompt", "What is 1 + 2?", "--template", "r1",
                            "--max-new-tokens", "60"])
    assert line == (f"error: sample: the longest prompt ({n} tokens) + --max-new-tokens 60 = {n + 60} exceeds "
                    "model.max_seq_len=64")


# ---- a 200 MB record: skipped, said, and no memory spent on it -------------------------------------

# Runs r1jax.cli.main, then prints the child's peak resident set size (VmHWM: this process image only).
_MEASURED_MAIN = """
import re, sys
from pathlib import Path
from r1jax.cli import main
rc = main(sys.argv[1:])
hwm = re.search(r"^VmHWM:\\s+(\\d+) kB$", Path("/proc/self/status").read_text(), re.MULTILINE)
print(f"peak_rss_kib {hwm.group(1)}")
sys.exit(rc)
"""


def _measured_sft(config: Path) -> tuple[subprocess.CompletedProcess, int]:
    env = dict(os.environ, XLA_FLAGS=xla_flags(1), JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-c", _MEASURED_MAIN, "sft", str(config)], env=env, capture_output=True,
                       text=True, timeout=600, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    return r, int(re.search(r"peak_rss_kib (\d+)", r.stdout).group(1)) * 1024


@pytest.mark.slow
def test_sft_with_a_200mb_record_skips_it_within_1gb_of_the_run_without(tmp_path):
    normal = records(300)
    plain = write_data(tmp_path / "plain.jsonl", normal)
    big = tmp_path / "big.jsonl"
    size = 200 << 20
    head, tail = b'{"question": "', b'", "answer": "1"}'
    body = size - len(head) - len(tail)
    pieces = [b"7" * (1 << 20)] * (body >> 20) + [b"7" * (body % (1 << 20))]  # one MiB object, many times
    lines = [x.encode() + b"\n" for x in normal]
    with open(big, "wb") as f:  # 10 normal lines, the 200 MB one (line 11), 290 more
        f.writelines([*lines[:10], head, *pieces, tail + b"\n", *lines[10:]])
    assert big.stat().st_size == plain.stat().st_size + size + 1
    # In file order, line 11 falls in the first two batches: a reader that kept it would tokenize it
    # (kept, a 20 MB line at that place costs such a run 1.1 GB more; this one would cost ~10x that).
    unshuffled = {"data": {"shuffle": False}}

    # the run with the line first: if the step program is not in the compilation cache yet, it is
    # this run that pays for compiling it (the comparison errs against the fix, not for it)
    with_big, rss_with = _measured_sft(stage_config(tmp_path, big, name="big.yaml", **unshuffled))
    without, rss_without = _measured_sft(stage_config(tmp_path, plain, name="plain.yaml", **unshuffled))
    print(f"peak RSS without the line {rss_without / 2**20:.0f} MiB, with it {rss_with / 2**20:.0f} MiB")
    said = f"warning: {big}:11: record of {size} bytes exceeds data.max_record_bytes={4 << 20}; skipped it"
    assert said in with_big.stderr and said not in without.stderr
    assert "sft" in with_big.stdout and "step 2" in with_big.stdout  # the run itself went on to the end
    assert rss_with - rss_without < 1 << 30, (rss_with, rss_without)
