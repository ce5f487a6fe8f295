"""``bitsack.progress``: a bar on a terminal, a timestamped line at most every N seconds in a
log (with a heartbeat that says when nothing was reported), nothing in --quiet/--json."""

from __future__ import annotations

import io
import re
import time

import pytest

from bitsack.progress import Progress, format_duration, progress_mode

STAMP = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d"


class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def lines_of(stream: io.StringIO) -> list[str]:
    return stream.getvalue().splitlines()


def test_mode_follows_the_stream_and_quiet():
    assert progress_mode(quiet=True, stream=Tty()) == "off"
    assert progress_mode(stream=Tty()) == "bar"
    assert progress_mode(stream=io.StringIO()) == "lines"


def test_format_duration():
    assert [format_duration(s) for s in (0, 45.4, 190, 7500)] == ["0s", "45s", "3m10s",
                                                                  "2h05m"]


def test_lines_at_most_every_interval_with_counts_and_eta():
    out, clock = io.StringIO(), FakeClock()
    prog = Progress("bitsack compress", unit="layers", stream=out, interval=30,
                    heartbeat=False, clock=clock)
    clock.t = 1
    prog("layers", 1, 10)  # the library callback signature
    clock.t = 20
    prog.update(2)
    assert lines_of(out) == []  # not 30 s yet
    clock.t = 31
    prog.update()
    clock.t = 32
    prog.update()
    clock.t = 100
    prog.close()
    got = lines_of(out)
    assert len(got) == 2
    assert all(re.match(STAMP + " bitsack compress: ", line) for line in got)
    # the stage named like the unit is said once; 4 of 10 in 31 s: ~46 s left
    assert got[0].endswith("bitsack compress: 4/10 layers (40%), 31s elapsed, ~46s left")
    assert got[1].endswith("bitsack compress: done in 1m40s")


def test_a_short_stage_prints_nothing():
    out, clock = io.StringIO(), FakeClock()
    with Progress("x", stream=out, interval=30, heartbeat=False, clock=clock) as prog:
        prog("layers", 1, 2)
        clock.t = 29
        prog("layers", 2, 2)
    assert out.getvalue() == ""  # a quick command (or a refusal) keeps stderr to itself


def test_a_stage_starts_the_counts_over_and_shows_its_name():
    out, clock = io.StringIO(), FakeClock()
    prog = Progress("bitsack eval", unit="windows", stream=out, interval=30, heartbeat=False,
                    clock=clock)
    prog.set(3, 4)
    clock.t = 40
    prog.stage("loading the model")
    assert len(lines_of(out)) == 1
    assert lines_of(out)[-1].endswith("bitsack eval: loading the model, 40s elapsed")
    clock.t = 80
    prog("windows", 1, 8)
    assert lines_of(out)[-1].endswith("1/8 windows (12%), 1m20s elapsed, ~9m20s left")


def test_the_heartbeat_says_when_nothing_was_reported():
    out = io.StringIO()
    with Progress("bitsack profile", stream=out, interval=0.05) as prog:
        prog.stage("estimating (fisher, 12 units)")
        time.sleep(0.4)
    got = lines_of(out)
    beats = [line for line in got if "estimating (fisher, 12 units)" in line]
    assert len(beats) >= 2  # a log shows the process alive, in which step
    assert any("no progress reported for" in line for line in beats)
    assert got[-1].endswith("done in 0s")
    n = len(got)
    time.sleep(0.2)
    assert len(lines_of(out)) == n  # closed: the heartbeat stopped


def test_a_failure_or_interrupt_is_the_last_line():
    for exc, word in ((RuntimeError("boom"), "failed"), (KeyboardInterrupt(), "interrupted")):
        out, clock = io.StringIO(), FakeClock()
        with pytest.raises(type(exc)), Progress("x", stream=out, interval=30, heartbeat=False,
                                                clock=clock) as prog:
            clock.t = 45
            prog.update()
            clock.t = 60
            raise exc
        assert lines_of(out)[-1].endswith(f"x: {word} in 1m00s")


def test_off_prints_nothing_and_bar_draws_on_the_stream():
    out = io.StringIO()
    with Progress("x", mode="off", stream=out) as prog:
        prog("layers", 1, 2)
        prog.stage("y")
    assert out.getvalue() == ""
    tty = Tty()
    with Progress("bitsack eval", unit="windows", mode="bar", stream=tty) as prog:
        prog("windows", 2, 4)
    assert "bitsack eval" in tty.getvalue() and "2/4" in tty.getvalue()


def test_a_closed_log_does_not_stop_the_work():
    out = io.StringIO()
    prog = Progress("x", stream=out, interval=30, heartbeat=False, clock=FakeClock())
    out.close()
    prog.update()  # writing to a closed stream is ignored
    prog.close()


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="mode"):
        Progress("x", mode="loud")
    with pytest.raises(ValueError, match="interval"):
        Progress("x", interval=0)


def test_run_heartbeat_clips_a_stage_message_at_a_word():
    from bitsack.commands.run import clip

    msg = "search: the plan applied for real (sequential GPTQ) to compare"
    out = clip(msg, 60)
    assert len(out) <= 60 and out.endswith("…")
    assert out == "search: the plan applied for real (sequential GPTQ) to…"
    assert clip("short", 60) == "short"
    assert len(clip("x" * 100, 60)) == 60  # no space to cut at: cut in the word
