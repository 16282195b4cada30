"""Progress display (r1jax.progress): a tqdm bar with the loop's figures on a terminal, plain
periodic lines in a log, nothing on processes other than 0; and the stage loop's lines."""

import io

from r1jax.progress import Progress, figures_text, hms


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_figures_and_durations_read_as_before():
    assert figures_text({"loss": "0.1234", "reward": "0.500", "tok/s": "1,234", "mfu": "1.0%"}) == \
        "loss 0.1234 reward 0.500 1,234 tok/s mfu 1.0%"
    assert hms(3725.9) == "1:02:05" and hms(-3) == "0:00:00"


def test_terminal_gets_a_bar_with_the_figures():
    out = Terminal()
    bar = Progress(4, "step", "step", stream=out, active=True)
    for i in range(4):
        bar.update(1, {"loss": f"{1 / (i + 1):.4f}"})
    bar.close()
    text = out.getvalue()
    assert "step" in text and "4/4" in text and "loss 0.2500" in text and "\r" in text  # redrawn in place


def test_a_log_gets_plain_lines_every_n_and_at_the_end():
    out = io.StringIO()
    bar = Progress(10, "samples", every=4, stream=out, active=True)
    for _ in range(10):
        bar.update(1, {"kept": "3"})
    lines = out.getvalue().splitlines()
    assert [line.split(" eta ")[0] for line in lines] == ["samples 4/10 kept 3", "samples 8/10 kept 3",
                                                          "samples 10/10 kept 3"]
    assert all("\r" not in line and " eta " in line for line in lines)


def test_a_log_line_on_request_and_from_a_resumed_count():
    out = io.StringIO()
    bar = Progress(20, "step", initial=10, interval=float("inf"), stream=out, active=True)
    bar.update(1)
    bar.update(1, {"loss": "1.0000"}, line=True)
    bar.write("eval at step 12: accuracy 0.5000")
    assert out.getvalue().splitlines()[0].startswith("step 12/20 loss 1.0000 eta ")
    assert out.getvalue().splitlines()[1] == "eval at step 12: accuracy 0.5000"


def test_inactive_processes_print_nothing():
    for stream in (io.StringIO(), Terminal()):
        bar = Progress(3, "step", every=1, stream=stream, active=False)
        bar.update(3, {"loss": "1"}, line=True)
        bar.write("hello")
        bar.close()
        assert stream.getvalue() == ""


def test_the_stage_loop_prints_its_figures(tmp_path, capsys):
    """MetricsLog (the stage loop's display): a line per logged step with the loss, the stage's own
    figures and throughput; metrics.jsonl gets every step."""
    import json

    from r1jax.stages.loop import MetricsLog

    log = MetricsLog(str(tmp_path), total_steps=4, start_step=0, shown=("reward",))
    for step in range(1, 5):
        log.write(step, {"loss": 0.5, "reward": 0.25, "tokens_per_s": 1234.0}, print_line=step % 2 == 0)
    log.close()
    lines = [line for line in capsys.readouterr().err.splitlines() if line]
    assert [line.split(" eta ")[0] for line in lines] == ["step 2/4 loss 0.5000 reward 0.250 1,234 tok/s",
                                                          "step 4/4 loss 0.5000 reward 0.250 1,234 tok/s"]
    assert [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
