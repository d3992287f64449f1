"""Progress where there is no terminal: periodic reports instead of a progress bar.

A worker's log (what the Prefect UI shows) has no terminal, so a bar is drawn nowhere and a long
stage used to stay silent for minutes. :class:`ProgressLog` is the bar's stand-in: call it with the
number of items just finished (and the loss, in training); at most every ``every_s`` seconds
(``MYDISTILL_PROGRESS_EVERY_S``, default 30) it reports done / total, the rate, the loss and the
time left.

Where a report goes is the caller's choice, not the library's: :func:`reporting_to` sends every
report made inside it to a callback (the Prefect task layer's, which logs it into the flow run and
moves a progress artifact); without one it is a log line. A training worker launched under
torchrun has no such callback: its rank 0 prints each report as one marked line
(:func:`print_marked`), and the launcher's side turns those lines back into reports
(:func:`relay_marked`), so launched training reports exactly as in-process training does.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass


EVERY_S_ENV = "MYDISTILL_PROGRESS_EVERY_S"
MARK = "[mydistill progress] "
MARKED_ENV = "MYDISTILL_PROGRESS_MARKED"  # set by the launcher: its workers print marked lines


@dataclass(frozen=True)
class Progress:
    """One report: ``done`` of ``total`` items (``unit``) of the stage part ``label``."""

    label: str
    done: int
    total: int
    rate: float  # items per second since this part started (or resumed)
    left_s: float  # estimated seconds to go; inf when nothing is done yet
    unit: str = "items"
    loss: float | None = None
    part: tuple[int, int] | None = None  # (index, count): this is part index+1 of a stage of count parts

    @property
    def percent(self) -> float:
        return 100.0 * min(self.done, self.total) / self.total if self.total > 0 else 100.0

    @property
    def stage_percent(self) -> float:
        """How far the whole stage is: this part's share on top of the parts before it."""
        if self.part is None:
            return self.percent
        index, count = self.part
        return (100.0 * index + self.percent) / count

    def line(self) -> str:
        """``distill: 40/200 steps (20%), 1.3 steps/s, loss 2.314, about 2 min left``."""
        loss = f", loss {self.loss:.4g}" if self.loss is not None else ""
        part = f" (part {self.part[0] + 1} of {self.part[1]})" if self.part else ""
        return (
            f"{self.label}: {self.done}/{self.total} {self.unit} ({self.percent:.0f}%), "
            f"{self.rate:.3g} {self.unit}/s{loss}, about {_duration(self.left_s)} left{part}"
        )


ProgressSink = Callable[[Progress], None]
_sink: contextvars.ContextVar[ProgressSink | None] = contextvars.ContextVar("mydistill_progress_sink", default=None)


@contextlib.contextmanager
def reporting_to(sink: ProgressSink) -> Iterator[None]:
    """Send every report made in this block (this thread and context) to ``sink`` instead of the log."""
    token = _sink.set(sink)
    try:
        yield
    finally:
        _sink.reset(token)


def current_sink() -> ProgressSink | None:
    """The callback a report made here goes to (for code that starts threads: pass it on)."""
    return _sink.get()


def default_every_s() -> float:
    """The interval between reports, from ``MYDISTILL_PROGRESS_EVERY_S`` (default 30 s)."""
    raw = os.environ.get(EVERY_S_ENV, "30")
    try:
        return float(raw)
    except ValueError:
        raise ValueError(f"{EVERY_S_ENV}={raw!r} is not a number of seconds") from None


class ProgressLog:
    """Call with the number of items just finished; reports at most every ``every_s`` seconds and
    always when the last item is done. ``start`` items done before (a resumed run) count as done but
    not in the rate."""

    def __init__(
        self, label: str, total: int, logger: logging.Logger, every_s: float | None = None, *, unit: str = "items", start: int = 0,
        part: tuple[int, int] | None = None,
    ):
        self.label, self.total, self.logger, self.unit, self.part = label, total, logger, unit, part
        self.every_s = every_s if every_s is not None else default_every_s()
        self.done = self.start = start
        self.sink = _sink.get()  # now: the calls may come from a backend's own thread
        self.started = self.last = time.monotonic()

    def __call__(self, n: int = 1, *, loss: float | Callable[[], float] | None = None) -> None:
        """``loss`` may be a function, called only when a report is due (``tensor.item`` waits for
        the device: not on every step)."""
        self.done += n
        now = time.monotonic()
        if now - self.last < self.every_s and self.done < self.total:
            return
        self.last = now
        if callable(loss):
            loss = float(loss())
        rate = (self.done - self.start) / max(now - self.started, 1e-9)
        left = (self.total - self.done) / rate if rate > 0 else float("inf")
        report(Progress(self.label, self.done, self.total, rate, max(left, 0.0), self.unit, loss, self.part), self.logger, self.sink)


def report(progress: Progress, logger: logging.Logger | None = None, sink: ProgressSink | None = None) -> None:
    """Hand ``progress`` to ``sink`` or the current one, else log its line."""
    sink = sink or _sink.get()
    if sink is not None:
        sink(progress)
    else:
        (logger or logging.getLogger("mydistill.progress")).info(progress.line())


def print_marked(progress: Progress) -> None:
    """A sink for a launched worker: one marked line on stdout, which the launcher streams."""
    fields = asdict(progress)
    fields["left_s"] = None if progress.left_s == float("inf") else progress.left_s
    fields["part"] = list(progress.part) if progress.part else None
    print(MARK + json.dumps(fields), flush=True)


def relay_marked(on_line: Callable[[str], None] | None) -> Callable[[str], None]:
    """Wrap a line callback: marked progress lines from workers become reports (to the sink current
    here, or the log); every other line goes to ``on_line`` as before."""
    sink = _sink.get()

    def relay(line: str) -> None:
        at = line.find(MARK)
        if at >= 0:
            try:
                fields = json.loads(line[at + len(MARK):])
                fields["left_s"] = float("inf") if fields.get("left_s") is None else fields["left_s"]
                fields["part"] = tuple(fields["part"]) if fields.get("part") else None
                progress = Progress(**fields)
            except (ValueError, TypeError):
                pass  # not one of ours after all: an ordinary line
            else:
                if sink is not None:
                    sink(progress)
                    return
                if on_line is None:
                    report(progress)
                    return
                line = progress.line()
        if on_line is not None:
            on_line(line)

    return relay


def _duration(seconds: float) -> str:
    if seconds == float("inf"):
        return "?"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
