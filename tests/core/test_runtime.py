"""The process-wide CPU policy: thread counts, busy cores elsewhere, per-thread budgets."""

from __future__ import annotations

import os

import pytest
import torch

from napari_medsam.core import runtime


def test_configure_runtime_sets_threads_and_reports_previous():
    before = torch.get_num_threads()
    try:
        rt = runtime.configure_runtime(1, allocator=False)
        assert rt.threads == 1 and rt.previous_threads == before and torch.get_num_threads() == 1
        assert not rt.allocator_tuned
    finally:
        torch.set_num_threads(before)


def test_recommended_threads_is_within_the_cpus_we_may_use():
    assert 1 <= runtime.recommended_threads() <= runtime.available_cpus()


def test_recommended_threads_leaves_busy_cores_alone(monkeypatch):
    monkeypatch.setattr(runtime, "physical_cpus", lambda: 8)
    monkeypatch.setattr(runtime, "available_cpus", lambda: 8)
    monkeypatch.setattr(runtime, "busy_cpus_elsewhere", lambda: 2.8)  # a core counts busy from 75 %
    assert runtime.recommended_threads() == 5
    assert runtime.recommended_threads(load_aware=False) == 8
    monkeypatch.setattr(runtime, "busy_cpus_elsewhere", lambda: 20.0)
    assert runtime.recommended_threads() == 1
    monkeypatch.setattr(runtime, "busy_cpus_elsewhere", lambda: None)  # no /proc: all physical cores
    assert runtime.recommended_threads() == 8


def test_busy_cpus_elsewhere_does_not_count_this_process():
    """A busy loop in this process is not "another process" (the load average counted it)."""
    import threading
    import time

    if runtime.busy_cpus_elsewhere(0.05) is None:
        pytest.skip("no /proc on this platform")
    stop = threading.Event()

    def spin():
        x = 0
        while not stop.is_set():
            x += 1

    t = threading.Thread(target=spin, daemon=True)
    t.start()
    hz = os.sysconf("SC_CLK_TCK")
    try:
        time.sleep(0.05)
        a, t0 = runtime._cpu_ticks(), time.perf_counter()
        time.sleep(0.3)
        b, dt = runtime._cpu_ticks(), time.perf_counter() - t0
        elsewhere = runtime.busy_cpus_elsewhere(0.3)
    finally:
        stop.set()
        t.join()
    machine, own = (b[0] - a[0]) / (hz * dt), (b[1] - a[1]) / (hz * dt)
    assert own > 0.5  # the spinning thread kept about one core busy, and the machine saw it
    assert elsewhere is not None and elsewhere <= machine - 0.5


def test_interactive_threads_leave_the_cores_to_a_background_job():
    from napari_medsam.core.runtime import interactive_threads

    assert interactive_threads(4, background_busy=False) == 4
    assert interactive_threads(0, background_busy=False) == 1
    assert interactive_threads(4, background_busy=True) == 1


def test_a_click_takes_one_thread_while_a_job_holds_the_cores():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with runtime.worker_threads(background_busy=True):
            busy = torch.get_num_threads()
        after = torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
    assert (busy, after) == (1, 2)


def test_speed_still_exports_the_policy_for_older_scripts():
    from napari_medsam.core import speed

    assert speed.configure_runtime is runtime.configure_runtime
    assert speed.recommended_threads is runtime.recommended_threads
