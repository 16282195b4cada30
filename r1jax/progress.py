"""Progress of long loops, the way users expect it: a tqdm bar (rate, elapsed, ETA, and the loop's
own figures) when stderr is a terminal; plain periodic lines when it is not (CI logs, SLURM
files); nothing on processes other than 0.

    with Progress(total=steps, desc="step", unit="step", every=10) as bar:
        for ...:
            bar.update(1, {"loss": f"{loss:.4f}", "tok/s": f"{tps:,.0f}"})

Plain lines read `<desc> <done>/<total> <name> <value> ... eta H:MM:SS`; one is printed every
`every` updates (0: every `interval` seconds), on `update(..., line=True)`, and at the last update.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

from tqdm import tqdm


def hms(seconds: float) -> str:
    s = int(max(seconds, 0))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def _is_process_zero() -> bool:
    jax = sys.modules.get("jax")  # a loop that runs jax has imported it; a host loop may not need it
    return jax is None or jax.process_index() == 0


def figures_text(figures: dict[str, str]) -> str:
    """{"loss": "0.1234", "tok/s": "1,234"} -> "loss 0.1234 1,234 tok/s" (a unit after its value)."""
    return " ".join(f"{v} {k}" if k.endswith("/s") else f"{k} {v}" for k, v in figures.items())


class Progress:
    """A progress display of `total` units from `initial` (see the module docstring)."""

    def __init__(self, total: int, desc: str, unit: str = "it", *, initial: int = 0, every: int = 0,
                 interval: float = 30.0, stream: TextIO | None = None, active: bool | None = None):
        self.total, self.desc, self.every, self.interval = total, desc, every, interval
        self.stream = stream if stream is not None else sys.stderr
        self.active = _is_process_zero() if active is None else active
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.done, self.start = initial, initial
        self._t0 = self._last = time.perf_counter()
        self.bar = None
        if self.active and self.tty:
            self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, file=self.stream, dynamic_ncols=True,
                            smoothing=0.1)

    def eta(self) -> float:
        """Seconds left at the mean rate of the updates so far."""
        rate = (self.done - self.start) / max(time.perf_counter() - self._t0, 1e-9)
        return (self.total - self.done) / rate if rate > 0 else 0.0

    def update(self, n: int = 1, figures: dict[str, str] | None = None, *, line: bool = False) -> None:
        """Advance by n units showing `figures` (name -> formatted value). Plain mode prints a line when
        one is due (see the module docstring) or when `line` is set."""
        self.done += n
        if not self.active:
            return
        if self.bar is not None:
            if figures:
                self.bar.set_postfix_str(figures_text(figures), refresh=False)
            self.bar.update(n)
            return
        now = time.perf_counter()
        due = (self.every and (self.done - self.start) % self.every == 0) or \
            (not self.every and now - self._last >= self.interval)
        if line or due or self.done >= self.total:
            self._last = now
            text = f"{self.desc} {self.done}/{self.total}"
            if figures:
                text += " " + figures_text(figures)
            print(f"{text} eta {hms(self.eta())}", file=self.stream, flush=True)

    def write(self, text: str) -> None:
        """A message (an eval result, a warning) that keeps the bar below it."""
        if not self.active:
            return
        if self.bar is not None:
            self.bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
