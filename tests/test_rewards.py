"""Rule-based rewards: answer extraction and equivalence (GSM8K, MATH-500, AIME references), format,
language consistency, the code sandbox (each escape attempt), and the parallel RewardFn."""

import dataclasses
import glob
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from r1jax.data import aime2024, gsm8k, math500
from r1jax.rewards import (
    RewardFn,
    accuracy_reward,
    answers_equivalent,
    extract_answer,
    extract_boxed,
    extract_program,
    format_reward,
    language_consistency,
    run_program,
    run_tests,
    sandbox_report,
)


def wrap(answer: str) -> str:
    """The r1_zero completion shape around an answer."""
    return f" <think> x </think> <answer> {answer} </answer>"


# --------------------------------------------------------------------------------------------------
# Extraction
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    (" <think> 3+4 </think> <answer> 7 </answer>", "7"),
    ("<answer>1</answer> then <answer> 2 </answer>", "2"),
    ("<answer> so \\boxed{\\frac{1}{2}} </answer>", "\\frac{1}{2}"),
    ("\\boxed{3} outside <answer> 5 </answer>", "5"),
    ("the answer is \\boxed{\\frac{\\sqrt{2}}{2}}.", "\\frac{\\sqrt{2}}{2}"),
    ("first \\boxed{1} then \\boxed{2}", "2"),
    ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),
    ("\\fbox{x+1}", "x+1"),
    ("$\\boxed 7$", "7"),
    ("\\boxed{4} and an unclosed \\boxed{5", "4"),
    ("<answer> 9 (never closed) \\boxed{8}", "8"),
    ("Natalia sold 48/2 = 24 clips.\n#### 72", "72"),
    ("#### 1\n#### 1,234\n", "1,234"),
    ("the answer is 42", None),
    ("", None),
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def findall_last_tag(text):
    """The last <answer>...</answer> as the regex scan finds it (the old parser, re-derived)."""
    found = [(m.start(), m.group(1)) for m in re.finditer(r"<answer>(.*?)</answer>", text, re.DOTALL)]
    return found[-1] if found else None


@given(st.lists(st.sampled_from(["<answer>", "</answer>", "a", "<ans", "wer>", "\n", "</", "x y"]), max_size=30))
@settings(max_examples=300, deadline=None)
def test_answer_tag_pairs_tags_as_a_left_to_right_scan(parts):
    from r1jax.rewards import answer_tag

    text = "".join(parts)
    got = answer_tag(text)
    assert (None if got is None else (got.start, got.content)) == findall_last_tag(text)


def test_answer_tag_on_a_flood_of_opening_tags():
    """100,000 unclosed tags (800 KB; the regex scan took over 8 s on them, this parser is linear)."""
    from r1jax.rewards import answer_tag

    assert answer_tag("<answer>" * 100_000) is None
    assert answer_tag("<answer>" * 100_000 + "7</answer>").content == "<answer>" * 99_999 + "7"


def test_boxed_round_trips_every_math500_answer():
    """Brace matching on real LaTeX: nested groups, \\left( \\right), \\{ \\}, matrices."""
    src = math500()
    for i in range(len(src)):
        answer = src[i]["answer"]
        assert extract_boxed(f"so the answer is $\\boxed{{{answer}}}$. Done") == answer.strip(), answer


# --------------------------------------------------------------------------------------------------
# Equivalence and the accuracy reward
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("expected, got", [
    ("1/2", "\\frac{1}{2}"),
    ("\\frac{1}{2}", "1/2"),
    ("0.5", "\\frac12"),
    ("\\frac12", "0.5"),
    ("1,000", "1000"),
    ("1000", "1,000"),
    ("72", "72.0"),
    ("025", "25"),
    ("\\sqrt{2}/2", "\\frac{\\sqrt2}{2}"),
    ("\\frac{\\sqrt2}{2}", "\\sqrt{2}/2"),
    ("11,\\! 111,\\! 111,\\! 100", "11111111100"),
    ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3, \\frac{\\pi}{2})"),
    ("\\dfrac{33}{100}", "0.33"),
    ("\\begin{pmatrix} 16/49 \\\\ 48/49 \\end{pmatrix}",
     "\\begin{pmatrix} \\frac{16}{49} \\\\ \\frac{48}{49} \\end{pmatrix}"),
    ("$18", "18"),
    ("18.", "18"),
])
def test_equivalent(expected, got):
    assert answers_equivalent(expected, got)


@pytest.mark.parametrize("expected, got", [
    ("3", "4"),
    ("x+1", "x-1"),
    ("1/2", "0.51"),
    ("1,000", "100"),
    ("1,000", "1.000"),
    ("\\sqrt{2}", "2"),
    ("(1, 2)", "(2, 1)"),
    ("\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", "\\begin{pmatrix} 2 \\\\ 1 \\end{pmatrix}"),
    ("0", ""),
    ("5", None),
])
def test_not_equivalent(expected, got):
    assert not answers_equivalent(expected, got)


def _records(src):
    return [src[i] for i in range(len(src))]


def _same_by_rule(a: str, b: str) -> bool:
    """Different-looking references that mean the same: written here, not by the code under test.
    Whitespace, '$', a leading 'x=' (MATH writes "x=5" where another problem has "5"), digit-group
    commas and trailing zeros after a decimal point are ignored."""
    def canon(s):
        s = re.sub(r"\s|\$|\\!|\\,", "", s)
        s = re.sub(r"^[a-z]=", "", s)
        if re.fullmatch(r"-?[\d,]+(\.\d*)?", s):
            s = s.replace(",", "")
            s = s.rstrip("0").rstrip(".") if "." in s else s
            s = s.lstrip("0") or "0"
        return s
    return canon(a) == canon(b)


@pytest.mark.parametrize("load", [gsm8k, math500, aime2024], ids=["gsm8k", "math500", "aime2024"])
def test_reference_answers_score_themselves_and_not_their_neighbour(load):
    """Every reference answer, as a completion, is right for its own problem and wrong for the next
    problem (whenever the two references differ by the plain rule above)."""
    records = _records(load())
    for rec in records:
        assert accuracy_reward(wrap(rec["answer"]), rec) == 1.0, rec["answer"]
    crossed = 0
    for i, rec in enumerate(records):
        other = records[(i + 1) % len(records)]
        if _same_by_rule(rec["answer"], other["answer"]):
            continue
        crossed += 1
        assert accuracy_reward(wrap(other["answer"]), rec) == 0.0, (rec["answer"], other["answer"])
        assert accuracy_reward(wrap(rec["answer"]), other) == 0.0, (other["answer"], rec["answer"])
    assert crossed > 0.8 * len(records)


def test_accuracy_dispatches_on_record_kind():
    arithmetic = {"id": "arithmetic:7", "question": "What is 347 + 589?", "answer": "936", "operands": [347, 589],
                  "op": "+"}
    assert accuracy_reward(wrap("936"), arithmetic) == 1.0
    assert accuracy_reward(wrap("936.0"), arithmetic) == 0.0  # exact integers only (math would accept it)
    countdown = {"id": "countdown:3", "numbers": [2, 3, 7], "target": 13, "answer": "2*3+7"}
    assert accuracy_reward(wrap("7 + 2*3"), countdown) == 1.0
    assert accuracy_reward(wrap("13"), countdown) == 0.0  # must use the numbers (math would accept 13)
    assert accuracy_reward(wrap("3*3+2+2"), countdown) == 0.0  # 3 used twice
    code = {"question": "echo", "answer": "", "tests": [{"input": "hi\n", "output": "hi\n"}]}
    assert accuracy_reward(wrap("```python\nprint(input())\n```"), code) == 1.0
    assert accuracy_reward(wrap("```python\nprint('no')\n```"), code) == 0.0
    assert accuracy_reward("no answer at all", {"answer": "1"}) == 0.0


# --------------------------------------------------------------------------------------------------
# Format
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text", [
    " <think> 3 + 4 = 7 </think> <answer> 7 </answer>",
    "<think></think><answer>x</answer>",
    "\n<think>\nline one\nline two\n</think>\n<answer>\n7\n</answer>\n\n",
])
def test_format_accepts(text):
    assert format_reward(text) == 1.0


@pytest.mark.parametrize("text", [
    " <think> reasoning </think>",  # no answer
    " <answer> 7 </answer>",  # no think
    " <answer> 7 </answer> <think> r </think>",  # wrong order
    " <think> r </think> <answer> 7 </answer> <answer> 8 </answer>",  # two answers
    " <think> r </think> <think> s </think> <answer> 7 </answer>",  # two thinks
    " <think> r </think> <answer> 7 </answer> and more",  # text after the answer
    "preamble <think> r </think> <answer> 7 </answer>",  # text before the think
    " <think> r </think> so <answer> 7 </answer>",  # text between
    " <think> r </think> <answer>   </answer>",  # blank answer
    " <think> r <answer> 7 </answer> </think>",  # answer inside think
    " <think> r </think> <answer> 7",  # unclosed
    "",
])
def test_format_rejects(text):
    assert format_reward(text) == 0.0


def test_format_follows_the_r1_template():
    good = "<think>\n7+9=16, write 6.\n</think>\nThe answer is <answer> 1797 </answer>."
    assert format_reward(good, "r1") == 1.0
    assert format_reward(" <think> r </think> <answer> 7 </answer>", "r1") == 1.0  # an empty summary is fine
    assert format_reward(good, "r1_zero") == 0.0  # a summary between the blocks is not the r1_zero layout
    for bad in ["<think>\nx\n</think>\nThe answer is <answer> 1 </answer>. And more",
                "The answer is <answer> 1 </answer>.", "<think> x </think> The answer is <answer>  </answer>.",
                "<think> x </think> <answer> 1 </answer> <answer> 2 </answer>"]:
        assert format_reward(bad, "r1") == 0.0, bad
    assert format_reward(good, "no-such-template") == 0.0
    fn = RewardFn({"format": 1.0}, template="r1", inline=True)
    assert fn([good, "<think> x </think>"], [{}, {}])["format"].tolist() == [1.0, 0.0]


# --------------------------------------------------------------------------------------------------
# Language consistency
# --------------------------------------------------------------------------------------------------

def test_language_consistency():
    english = " <think> First add the two numbers, then halve it. </think> <answer> 3 </answer>"
    assert language_consistency(english) == 1.0
    half = " <think> we add all the numbers 我们计算和 </think> <answer> 3 </answer>"  # 5 English words, 5 characters
    assert language_consistency(half) == pytest.approx(0.5)
    assert language_consistency(half, target="zh") == pytest.approx(0.5)
    # numbers and symbols count neither way
    assert language_consistency(" <think> so 3 + 4 = 7 , 12 * 2 = 24 !!! </think>") == 1.0
    assert language_consistency(" <think> 我们 3 + 4 = 7 得到 </think>") == 0.0
    assert language_consistency(" <think> 我们 3 + 4 = 7 得到 </think>", target="zh") == 1.0
    assert language_consistency(" <think> 1 + 1 = 2 </think>") == 1.0  # nothing countable
    # only the chain of thought counts, not the answer; without tags the whole text does
    assert language_consistency(" <think> all english here </think> <answer> 中文答案 </answer>") == 1.0
    assert language_consistency("english 中文") == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="klingon"):
        language_consistency("x", target="klingon")


# --------------------------------------------------------------------------------------------------
# Never raise, always in [0, 1]
# --------------------------------------------------------------------------------------------------

FRAGMENTS = ["<think>", "</think>", "<answer>", "</answer>", " ", "\n", "\\boxed{", "\\fbox", "{", "}", "\\{",
             "####", "42", "-7.5", "1,000", "\\frac{1}{2}", "\\sqrt", "x", "=", "^", "$", "(", ")", ",", "我们",
             "\\text{", "```python\n", "```", "e", "\\infty", "\\pi", "%", "\\\\", "\x00"]
tagged_text = st.lists(st.sampled_from(FRAGMENTS), max_size=40).map("".join)
any_text = st.one_of(st.text(max_size=200), tagged_text)
RECORDS = [
    {"id": "gsm8k:1", "answer": "72"},
    {"id": "math500:1", "answer": "\\frac{14}{3}"},
    {"id": "math500:2", "answer": "\\left( 3, \\frac{\\pi}{2} \\right)"},
    {"id": "arithmetic:1", "answer": "936"},
    {"id": "countdown:1", "numbers": [2, 3, 7], "target": 13, "answer": "2*3+7"},
    {"answer": None},
    {},
]


def _unit(x) -> bool:
    return isinstance(x, float) and 0.0 <= x <= 1.0


@settings(max_examples=300, deadline=None)
@given(any_text, st.sampled_from(RECORDS))
def test_rewards_never_raise(text, record):
    assert _unit(accuracy_reward(text, record))
    assert _unit(format_reward(text))
    assert _unit(language_consistency(text))
    assert _unit(language_consistency(text, target="zh"))
    assert extract_answer(text) is None or isinstance(extract_answer(text), str)
    assert isinstance(answers_equivalent(text, text), bool)


INLINE = RewardFn({"accuracy": 1.0, "format": 0.5, "language": 0.25, "code": 1.0}, inline=True)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(any_text, st.sampled_from(RECORDS)), max_size=4))
def test_reward_fn_inline_never_raises(batch):
    out = INLINE([t for t, _ in batch], [r for _, r in batch])
    assert set(out) == {"accuracy", "format", "language", "code", "total"}
    for name in ("accuracy", "format", "language", "code"):
        assert out[name].dtype == np.float32 and out[name].shape == (len(batch),)
        assert np.all((out[name] >= 0) & (out[name] <= 1))


# --------------------------------------------------------------------------------------------------
# Code sandbox
# --------------------------------------------------------------------------------------------------

ADD = "a, b = map(int, input().split())\nprint(a + b)\n"
ADD_TESTS = [{"input": "1 2\n", "output": "3\n"}, {"input": "40 2", "output": "42"}]


def _group_members(pgid: int) -> list[int]:
    pids = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid:
                pids.append(int(name))
    return pids


def _sandbox_processes(root: str = "") -> list[int]:
    """Sandboxed programs alive (under `root` when given: another test process's do not count)."""
    pids = []
    marker = os.path.join(root, "r1jax-sandbox-").encode() if root else b"r1jax-sandbox-"
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/cmdline", "rb") as f:
                    if marker in f.read():
                        pids.append(int(name))
            except OSError:
                pass
    return pids


def _host_can_spawn():
    out = subprocess.run([sys.executable, "-c", "print(6 * 7)"], capture_output=True, text=True, timeout=30)
    return out.stdout.strip() == "42"


def test_correct_and_wrong_programs():
    assert run_tests(ADD, ADD_TESTS) == 1.0
    assert run_tests(ADD.replace("a + b", "a - b"), ADD_TESTS) == 0.0
    assert run_tests("print(3)", ADD_TESTS) == 0.0  # right on one test only: all-or-nothing
    assert run_tests("print(3)", ADD_TESTS, mode="fraction") == 0.5
    assert run_tests("print(3, end='   \\n\\n\\n')", ADD_TESTS[:1]) == 1.0  # trailing whitespace ignored
    assert run_tests("print(' 3')", ADD_TESTS[:1]) == 0.0  # leading whitespace is not
    assert run_tests(ADD + "raise SystemExit(1)", ADD_TESTS) == 0.0  # right output, failing exit
    assert run_tests(ADD, []) == 0.0
    big = "".join(f"{i} {i}\n" for i in range(50_000))
    prog = "import sys\nprint(sum(int(a) + int(b) for a, b in (l.split() for l in sys.stdin)))"
    assert run_tests(prog, [{"input": big, "output": str(50_000 * 49_999)}]) == 1.0
    with pytest.raises(ValueError):
        run_tests(ADD, ADD_TESTS, mode="most")


def test_extract_program():
    assert extract_program(wrap("```python\nprint(1)\n```\nand\n```python\nprint(2)\n```")) == "print(2)\n"
    assert extract_program(wrap("print(5)")) == "print(5)"
    assert extract_program("no tags\n```py\nprint(3)\n```") == "print(3)\n"
    assert extract_program("```python\nprint(1)\n``` <answer> ```python\nprint(4)\n``` </answer>") == "print(4)\n"
    assert extract_program("no program here") is None


@pytest.mark.parametrize("program", ["while True: pass", "import time\ntime.sleep(60)"], ids=["busy", "sleep"])
def test_timeout_kills(program):
    start = time.monotonic()
    res = run_program(program, timeout=1.0)
    elapsed = time.monotonic() - start
    assert res.timed_out and res.returncode == -9
    assert elapsed < 2.5
    assert _group_members(res.pgid) == []
    assert run_tests(program + "\nprint(3)", ADD_TESTS[:1], timeout=1.0) == 0.0


@pytest.mark.parametrize("program", [
    "x = bytearray(10 * 1024**3)\nprint(3)",
    "chunks = []\nwhile True:\n    chunks.append(bytearray(8 * 1024**2))\nprint(3)",
    "x = [0] * (2 * 1024**3)\nprint(3)",
], ids=["10GB", "gradual", "list"])
def test_memory_limit(program):
    start = time.monotonic()
    assert run_tests(program, ADD_TESTS[:1], timeout=5.0, memory_mb=256) == 0.0
    assert time.monotonic() - start < 6.0
    assert _host_can_spawn()


@pytest.mark.parametrize("program", [
    "import os\nwhile True:\n    os.fork()",
    "import os\nos.system('echo 3')",
    "import subprocess\nprint(subprocess.check_output(['echo', '3']).decode().strip())",
    "import multiprocessing as mp\np = mp.Process(target=print, args=(3,))\np.start()\np.join()",
    "import os\nos.execv('/bin/echo', ['echo', '3'])",
    "import os\nos.posix_spawn('/bin/echo', ['echo', '3'], {})\nimport time\ntime.sleep(0.5)",
], ids=["fork-bomb", "system", "subprocess", "multiprocessing", "exec", "posix_spawn"])
def test_no_processes(program):
    start = time.monotonic()
    res = run_program(program, timeout=3.0)
    assert res.returncode != 0 and "3" not in res.stdout
    assert time.monotonic() - start < 4.0
    assert _group_members(res.pgid) == []
    assert run_tests(program, [{"input": "", "output": "3"}], timeout=3.0) == 0.0
    assert _host_can_spawn()


@pytest.fixture
def listener():
    """A listening TCP socket on 127.0.0.1; yields (port, accepted connections)."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    srv.settimeout(0.1)
    accepted, stop = [], threading.Event()

    def serve():
        while not stop.is_set():
            try:
                conn, addr = srv.accept()
            except TimeoutError:
                continue
            accepted.append(addr)
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield srv.getsockname()[1], accepted
    stop.set()
    thread.join()
    srv.close()


def test_no_network(listener):
    port, accepted = listener
    connect = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)\nprint('connected')"
    alone = "import socket\ns = socket.socket()\nprint('connected')"
    udp = (f"import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
           f"s.sendto(b'x', ('127.0.0.1', {port}))\nprint('connected')")
    for program in (connect, alone, udp):
        start = time.monotonic()
        assert run_tests(program, [{"input": "", "output": "connected"}], timeout=3.0) == 0.0
        assert time.monotonic() - start < 4.0
    time.sleep(0.3)  # give a (wrongly) completed connection time to show up
    assert accepted == []
    # the same connection from an unsandboxed process does get through: the listener works
    subprocess.run([sys.executable, "-c", connect], check=True, capture_output=True, timeout=30)
    time.sleep(0.3)
    assert len(accepted) == 1


def _writers(target: str) -> list[str]:
    t = repr(target)
    return [
        f"open({t}, 'w').write('x')",
        f"open({t}, 'a').write('x')",
        f"import os\nfd = os.open({t}, os.O_WRONLY | os.O_CREAT)\nos.write(fd, b'x')",
        f"import pathlib\npathlib.Path({t}).write_text('x')",
        f"import os\nopen('inside', 'w').write('x')\nos.rename('inside', {t})",
        f"import os\nos.chdir('/')\nopen({t}, 'w').write('x')",
        f"import os\nd = os.open({repr(os.path.dirname(target))}, os.O_RDONLY)\n"
        f"fd = os.open({repr(os.path.basename(target))}, os.O_WRONLY | os.O_CREAT, dir_fd=d)\nos.write(fd, b'x')",
    ]


@pytest.mark.parametrize("where", ["tmp_path", "tmp"])
def test_no_writes_outside(where, tmp_path):
    target = str(tmp_path / "pwned") if where == "tmp_path" else f"/tmp/pwned-{uuid.uuid4().hex}"
    try:
        for program in _writers(target):
            start = time.monotonic()
            assert run_tests(program + "\nprint('wrote')", [{"input": "", "output": "wrote"}]) == 0.0, program
            assert time.monotonic() - start < 3.0
            assert not os.path.exists(target), program
    finally:
        if os.path.exists(target):
            os.remove(target)


def test_sandbox_directory_is_usable_and_private(monkeypatch):
    monkeypatch.setenv("R1JAX_SECRET", "leak")
    program = ("import os, sys\nopen('scratch.txt', 'w').write('hello')\nos.mkdir('d')\n"
               "print(open('scratch.txt').read(), os.environ.get('R1JAX_SECRET'), os.environ['HOME'] == os.getcwd(),"
               " os.getcwd().startswith('/tmp'))")
    res = run_program(program)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["hello", "None", "True", "True"]
    cwd = run_program("import os\nprint(os.getcwd())").stdout.strip()
    assert not os.path.exists(cwd)  # removed afterwards


def test_output_is_capped():
    start = time.monotonic()
    res = run_program("while True:\n    print('x' * 100000)", timeout=10.0)
    assert time.monotonic() - start < 10.0  # stopped by the file-size limit, not the clock
    assert res.returncode != 0 and len(res.stdout) <= 16 * 1024 * 1024


def test_isolation_layers():
    """Each kernel-level layer, seen from inside (reading /proc is allowed); the host-dependent ones
    only where sandbox_report says this host provides them."""
    info = sandbox_report()
    program = ("import os\nprint(open('/proc/self/limits').read())\nprint('UID', os.getuid())\n"
               "print('NET', os.readlink('/proc/self/ns/net'))")
    res = run_program(program, timeout=3.0, memory_mb=300)
    assert res.returncode == 0, res.stderr
    limits = {line[:26].strip(): line[26:].split() for line in res.stdout.splitlines()[1:] if line[:4] == "Max "}
    assert limits["Max address space"][:2] == [str(300 * 1024**2)] * 2
    assert limits["Max cpu time"][:2] == ["4", "4"]
    assert limits["Max open files"][:2] == ["64", "64"]
    assert limits["Max file size"][:2] == [str(16 * 1024**2)] * 2
    assert limits["Max core file size"][:2] == ["0", "0"]
    assert limits["Max processes"][0] != "unlimited"
    uid = int(re.search(r"UID (\d+)", res.stdout).group(1))
    net = re.search(r"NET (\S+)", res.stdout).group(1)
    if info["drop_uid"]:
        assert uid == 65534
    if info["netns"]:
        assert net != os.readlink("/proc/self/ns/net")
    print("sandbox:", info)


# --------------------------------------------------------------------------------------------------
# RewardFn
# --------------------------------------------------------------------------------------------------

MIXED = [
    (wrap("72"), {"id": "gsm8k:1", "answer": "72"}),
    (wrap("71"), {"id": "gsm8k:2", "answer": "72"}),
    (" <think> 我们 think </think> <answer> \\frac{14}{3} </answer>", {"answer": "\\frac{14}{3}"}),
    ("no format \\boxed{14/3}", {"answer": "\\frac{14}{3}"}),
    (wrap("```python\nprint(input())\n```"), {"tests": [{"input": "a\n", "output": "a"}]}),
    (wrap("936"), {"id": "arithmetic:1", "answer": "936"}),
]


@dataclasses.dataclass
class Weights:
    accuracy: float = 1.0
    format: float = 0.5
    language: float = 0.25
    code: float = 0.0


def test_reward_fn_inline_weighted_sum():
    completions, records = zip(*MIXED, strict=True)
    out = RewardFn(Weights(), inline=True)(list(completions), list(records))
    assert set(out) == {"accuracy", "format", "language", "total"}  # code has weight 0
    np.testing.assert_array_equal(out["accuracy"], [1, 0, 1, 1, 1, 1])
    np.testing.assert_array_equal(out["format"], [1, 1, 1, 0, 1, 1])
    np.testing.assert_allclose(out["language"], [1, 1, 1 / 3, 1, 1, 1])
    manual = 1.0 * out["accuracy"] + 0.5 * out["format"] + 0.25 * out["language"]
    np.testing.assert_allclose(out["total"], manual, rtol=1e-6)
    assert all(v.dtype == np.float32 and v.shape == (6,) for v in out.values())
    code = RewardFn({"code": 2.0}, inline=True)(list(completions), list(records))
    np.testing.assert_array_equal(code["code"], [0, 0, 0, 0, 1, 0])
    np.testing.assert_array_equal(code["total"], [0, 0, 0, 0, 2, 0])


def test_reward_fn_weights_validation():
    with pytest.raises(ValueError, match=r"bogus.*known: accuracy, format, language, code"):
        RewardFn({"accuracy": 1.0, "bogus": 1.0})
    with pytest.raises(ValueError, match="klingon"):
        RewardFn({"accuracy": 1.0}, target_language="klingon")
    assert RewardFn(type("W", (), {"accuracy": 0.0, "format": 1.0})()).components == ("format",)
    fn = RewardFn({"accuracy": 1.0}, inline=True)
    with pytest.raises(ValueError, match="2 completions but 1 records"):
        fn(["a", "b"], [{}])
    assert fn([], [])["total"].shape == (0,)


def _wait_until(cond, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return cond()


def _worker_dirs() -> set[str]:
    return {path for pattern in ("r1jax-reward-worker-*", "r1jax-sandbox-*")
            for path in glob.glob(os.path.join(tempfile.gettempdir(), pattern))}


def test_reward_fn_workers_match_inline_and_survive_a_hang(private_tmp):
    dirs_before = _worker_dirs()
    completions, records = map(list, zip(*MIXED, strict=True))
    weights = {"accuracy": 1.0, "format": 0.5, "language": 0.25}
    hang = (wrap("```python\nimport time\ntime.sleep(60)\nprint(1)\n```"),
            {"tests": [{"input": "", "output": "1"}], "time_limit": 60})
    with RewardFn(weights, timeout=3.0, workers=2) as fn:
        inline = RewardFn(weights, inline=True)(completions, records)
        pooled = fn(completions, records)
        for name in inline:
            np.testing.assert_allclose(pooled[name], inline[name], rtol=1e-6)

        start = time.monotonic()
        out = fn([hang[0]] + completions, [hang[1]] + records)
        assert time.monotonic() - start < 3.0 + 5.0  # the hang costs its timeout, not its 60 s
        for name in ("accuracy", "format", "language", "total"):
            assert out[name][0] == 0.0  # every component of the hung item, even its good format
            np.testing.assert_allclose(out[name][1:], inline[name], rtol=1e-6)
        # the killed worker's sandboxed program went with it
        assert _wait_until(lambda: _sandbox_processes(private_tmp) == [], 5.0)

        start = time.monotonic()
        again = fn(completions, records)
        assert time.monotonic() - start < 5.0
        np.testing.assert_allclose(again["total"], inline["total"], rtol=1e-6)
        procs = [w.proc for w in fn._workers]
    assert all(p.poll() is not None for p in procs)  # closed by the context manager
    assert _worker_dirs() == dirs_before  # with the killed worker's sandbox directory
