"""The session's thread policy for interactive work (no viewer)."""

import contextlib

import torch

from napari_medsam._qt import session as session_mod


def test_a_click_takes_one_thread_while_a_job_holds_the_cores():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with session_mod.worker_threads(background_busy=True):
            busy = torch.get_num_threads()
        after = torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
    assert (busy, after) == (1, 2)


def test_preview_steps_tell_the_thread_policy_about_running_jobs(monkeypatch):
    seen = []

    class Stop(Exception):
        pass

    def fake_worker_threads(*, background_busy=False):
        seen.append(background_busy)
        raise Stop

    monkeypatch.setattr(session_mod, "worker_threads", fake_worker_threads)
    s = session_mod.Session(disk_cache=False)
    for jobs in (0, 1):
        s.cpu_jobs = jobs
        gen = s.preview_steps(None, 0, None)
        next(gen)
        with contextlib.suppress(Stop):
            next(gen)
    assert seen == [False, True]
