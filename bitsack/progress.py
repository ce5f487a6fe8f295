"""Progress of long stages, readable on a terminal and in a log file alike.

Three modes (``progress_mode`` picks one):

- ``bar``: a tqdm bar on stderr (stderr is a terminal);
- ``lines``: a plain, timestamped line every ``interval`` seconds (stderr is a file or a pipe:
  a log then shows ``2025-06-01 12:03:04 bitsack compress: 12/30 layers (40%), 3m10s elapsed,
  ~4m45s left`` instead of nothing for half an hour). A heartbeat thread repeats the latest
  state every ``interval`` seconds even when the stage reports nothing, and says for how long
  nothing was reported, so progress, a slow step and a hang can be told apart. A stage shorter
  than ``interval`` prints nothing (a refusal stays one line); one that printed ends with
  ``done in …`` (or ``failed``/``interrupted``);
- ``off``: nothing (``--quiet``, ``--json``).

A ``Progress`` is also the ``(stage, done, total)`` callback that library stages accept
(``bitsack.apply.compress(progress=...)``, ``bitsack.evaluate.perplexity(progress=...)``)::

    with Progress("compress", unit="layer", mode=progress_mode(quiet)) as prog:
        compress(model, plan, calib, cfg, progress=prog)

Library code takes the callback and never builds a ``Progress`` itself; the command decides the
mode. ``Progress.stage(name)`` names a coarse step that reports no counts (loading a model).
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from typing import IO, Literal

Mode = Literal["bar", "lines", "off"]
#: What a library stage accepts: ``progress(stage, done, total)`` after each step.
ProgressFn = Callable[[str, int, "int | None"], None]

#: Seconds between two plain lines (the ``lines`` mode).
DEFAULT_INTERVAL = 30.0


def progress_mode(quiet: bool = False, stream: IO[str] | None = None) -> Mode:
    """``off`` when ``quiet``, else ``bar`` if ``stream`` (default stderr) is a terminal,
    else ``lines``."""
    if quiet:
        return "off"
    stream = sys.stderr if stream is None else stream
    try:
        tty = stream.isatty()
    except (AttributeError, ValueError):  # a closed or unusual stream
        tty = False
    return "bar" if tty else "lines"


def format_duration(seconds: float) -> str:
    """``45s``, ``3m10s``, ``2h05m``."""
    s = int(round(max(0.0, seconds)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


class Progress:
    """One long stage's progress (see the module docstring).

    Args:
        desc: who is working, printed first (``bitsack profile``).
        total: expected count, if known (``update``/``set``/the callback may give it later).
        unit: what is counted (``layer``, ``window``).
        mode: ``bar``, ``lines`` or ``off``; default ``progress_mode(stream=stream)``
            (the command passes ``progress_mode(quiet=args.json or args.quiet)``).
        interval: seconds between plain lines (``lines`` mode; default
            ``DEFAULT_INTERVAL``).
        stream: where to write (default stderr).
        heartbeat: in ``lines`` mode, a daemon thread prints the state every ``interval``
            seconds even without updates.
        clock: monotonic seconds (tests pass a fake one).
    """

    def __init__(self, desc: str, total: int | None = None, *, unit: str = "it",
                 mode: Mode | None = None, interval: float | None = None,
                 stream: IO[str] | None = None, heartbeat: bool = True,
                 clock: Callable[[], float] = time.monotonic):
        mode = progress_mode(stream=stream) if mode is None else mode
        if mode not in ("bar", "lines", "off"):
            raise ValueError(f"mode: {mode!r}; valid: bar, lines, off")
        interval = DEFAULT_INTERVAL if interval is None else interval
        if not interval > 0:
            raise ValueError(f"interval: {interval!r}; valid: a positive number of seconds")
        self.desc, self.unit, self.mode, self.interval = desc, unit, mode, float(interval)
        self.stream = sys.stderr if stream is None else stream
        self.clock = clock
        self.total = total
        self.done = 0
        self.stage_name = ""
        self._lock = threading.Lock()
        self._start = clock()
        self._last_line = self._start
        self._last_change = self._start
        self._closed = False
        self._printed = False
        self._bar = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if mode == "bar":
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, desc=desc, unit=unit, file=self.stream,
                             dynamic_ncols=True, leave=False)
        elif mode == "lines":
            if heartbeat:
                self._thread = threading.Thread(target=self._beat, name=f"progress:{desc}",
                                                daemon=True)
                self._thread.start()

    # ---- reporting -------------------------------------------------------------------------
    def __call__(self, stage: str, done: int, total: int | None) -> None:
        """The library callback: ``stage`` (``layers``) reached ``done`` of ``total``."""
        self.set(done, total, stage=stage)

    def update(self, n: int = 1) -> None:
        """Count ``n`` more units of work."""
        self.set(self.done + n)

    def set(self, done: int, total: int | None = None, *, stage: str | None = None) -> None:
        """Absolute progress: ``done`` of ``total`` (unchanged when None), in ``stage``."""
        if self.mode == "off" or self._closed:
            return
        with self._lock:
            if stage is not None and stage != self.stage_name:
                self.stage_name = stage
            if total is not None:
                self.total = total
            if done != self.done:
                self._last_change = self.clock()
            self.done = done
            if self._bar is not None:
                self._bar.total = self.total
                self._bar.n = done
                self._bar.set_description(self._label(), refresh=False)
                self._bar.refresh()
                return
        self._maybe_line()

    def stage(self, name: str) -> None:
        """Enter a coarse step (its name shows in the next line); the counts start over."""
        if self.mode == "off" or self._closed:
            return
        with self._lock:
            self.stage_name = name
            self.done, self.total = 0, None
            self._last_change = self.clock()
            if self._bar is not None:
                self._bar.reset(total=None)
                self._bar.set_description(self._label())
                return
        self._maybe_line()

    def close(self, status: str = "done") -> None:
        """Stop the heartbeat and write the final line (``lines``) or close the bar."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=1.0)
        if self._bar is not None:
            self._bar.close()
        elif self.mode == "lines" and self._printed:
            elapsed = format_duration(self.clock() - self._start)
            self._emit(f"{status} in {elapsed}")

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        elif issubclass(exc_type, KeyboardInterrupt):
            self.close("interrupted")
        else:
            self.close("failed")

    # ---- the lines mode ----------------------------------------------------------------------
    def _label(self) -> str:
        return f"{self.desc}: {self.stage_name}" if self.stage_name else self.desc

    def _state(self) -> str:
        now = self.clock()
        parts = []
        # a library stage named like the unit ("layers" of layers) is said once
        prefix = f"{self.stage_name} " if self.stage_name not in ("", self.unit) else ""
        if self.total:
            pct = 100.0 * self.done / self.total
            parts.append(f"{prefix}{self.done}/{self.total} {self.unit} ({pct:.0f}%)")
        elif self.done:
            parts.append(f"{prefix}{self.done} {self.unit}")
        else:
            parts.append(self.stage_name or "running")
        elapsed = now - self._start
        parts.append(f"{format_duration(elapsed)} elapsed")
        if self.total and 0 < self.done < self.total:
            left = elapsed * (self.total - self.done) / self.done
            parts.append(f"~{format_duration(left)} left")
        quiet_for = now - self._last_change
        if quiet_for >= self.interval:
            parts.append(f"no progress reported for {format_duration(quiet_for)}")
        return ", ".join(parts)

    def _emit(self, text: str) -> None:
        self._printed = True
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        try:
            self.stream.write(f"{stamp} {self.desc}: {text}\n")
            self.stream.flush()
        except (OSError, ValueError):  # a closed log must not end the work it reports on
            pass

    def _maybe_line(self) -> None:
        if self.mode != "lines" or self._closed:
            return
        with self._lock:
            now = self.clock()
            if now - self._last_line < self.interval:
                return
            self._last_line = now
            text = self._state()
        self._emit(text)

    def _beat(self) -> None:
        while not self._stop.wait(max(self.interval / 4, 0.01)):
            self._maybe_line()
