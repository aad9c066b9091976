"""Another process's CPU time is read to well below a clock tick, its exited threads included."""

import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import psutil
import pytest

from threadline.bench.loadgen import cpu_seconds

BURN_S = 0.002
# What a step may cost beyond its burn: reading the order, a thread's start and join, the answer.
OVERHEAD_S = 0.004

_CHILD = f"""
import sys, threading, time

def burn():
    end = time.thread_time() + {BURN_S}
    while time.thread_time() < end:
        pass

for order in sys.stdin:
    if order.strip() == "thread":
        worker = threading.Thread(target=burn)
        worker.start()
        worker.join()
    else:
        burn()
    print("done", flush=True)
"""


@contextmanager
def burner() -> Iterator[subprocess.Popen[str]]:
    """A child that burns BURN_S of CPU, on its main thread or a new one, each time it is told to."""
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        yield child
    finally:
        child.kill()
        child.wait()


def burn_once(child: subprocess.Popen[str], order: str) -> None:
    """Have the child burn once and wait until it has."""
    assert child.stdin is not None
    assert child.stdout is not None
    child.stdin.write(f"{order}\n")
    child.stdin.flush()
    assert child.stdout.readline() == "done\n"


@pytest.mark.parametrize("order", ["main", "thread"])
def test_each_burn_of_two_milliseconds_is_read_as_about_that(order: str) -> None:
    """Ticks (10 ms) would read most burns as 0 and some as 10 ms; an exited thread's time counts."""
    with burner() as child:
        processes = {"child": psutil.Process(child.pid)}
        burn_once(child, order)
        for _ in range(5):
            before = cpu_seconds(processes)["child"]
            burn_once(child, order)
            spent = cpu_seconds(processes)["child"] - before
            assert BURN_S <= spent < BURN_S + OVERHEAD_S


def test_a_process_that_has_gone_is_reported_as_gone() -> None:
    """Reading a process that exited raises psutil's NoSuchProcess, as psutil's own readings do."""
    with burner() as child:
        processes = {"child": psutil.Process(child.pid)}
        assert cpu_seconds(processes)["child"] >= 0
    with pytest.raises(psutil.NoSuchProcess):
        cpu_seconds(processes)
