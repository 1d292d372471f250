"""csl.stop: a Ctrl-C / SIGTERM is never lost, also where Python drops the exception it raised."""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import time

import pytest
import torch

from csl import stop


def _dropped(signum: int) -> None:
    """A signal whose exception Python drops: raised inside an at-fork callback while a DataLoader starts its workers,
    it is printed as "Exception ignored" and the code goes on."""
    try:
        stop.handle_signal(signum, None)
    except KeyboardInterrupt:
        pass


@pytest.mark.parametrize(("signum", "raised"), [(signal.SIGINT, KeyboardInterrupt), (signal.SIGTERM, stop.Terminated)])
def test_a_stop_dropped_during_an_evaluation_is_raised_when_it_ends(signum, raised):
    reached = []
    with pytest.raises(raised), stop.deferred():
        with stop.immediate():  # the evaluation: a signal raises at once
            _dropped(signum)
            reached.append("the evaluation went on")
        reached.append("training went on")
    assert reached == ["the evaluation went on"]
    assert not stop.requested()
    with stop.deferred():  # nothing is left over for the next block
        pass


def test_a_stop_that_leaves_its_block_is_not_raised_twice():
    with pytest.raises(KeyboardInterrupt), stop.deferred(), stop.immediate():
        stop.handle_signal(signal.SIGINT, None)
    with stop.deferred(), stop.immediate():
        pass


def test_a_dropped_stop_outside_any_block_is_forgotten_by_clear():
    _dropped(signal.SIGINT)
    stop.clear()
    with stop.deferred():
        pass


def test_a_stop_raised_outside_any_block_is_not_raised_again_in_a_later_block():
    """A stop during set-up propagates as it should; a later run in the same process (a notebook, without the CLI's
    clear()) must not get it again at the end of its training."""
    with pytest.raises(KeyboardInterrupt):
        stop.handle_signal(signal.SIGINT, None)
    with stop.deferred(), stop.immediate():
        pass


def test_a_dropped_second_signal_is_still_a_request_the_loop_sees():
    with pytest.raises(KeyboardInterrupt), stop.deferred():
        stop.handle_signal(signal.SIGINT, None)  # the first: waits for the iteration's end
        assert stop.requested()
        _dropped(signal.SIGINT)  # the second: raised at once, dropped
        assert stop.requested()  # the loop's check still stops the run


def test_a_second_signal_raises_where_it_lands():
    """Ctrl-C twice: the first waits for the iteration's end, the second stops at once (the rest of the iteration
    does not run)."""
    reached = []
    with pytest.raises(KeyboardInterrupt), stop.deferred():
        stop.handle_signal(signal.SIGINT, None)
        reached.append("the iteration goes on")
        stop.handle_signal(signal.SIGINT, None)
        reached.append("the iteration went on after the second signal")
    assert reached == ["the iteration goes on"]
    assert not stop.requested()


def test_a_stop_that_left_an_evaluation_is_not_raised_again_when_training_ends():
    """A stop raised at once inside an evaluation that leaves it (and is handled outside it) is done with: the training
    block around it ends without raising it a second time, and nothing is left pending."""
    with stop.deferred():
        with pytest.raises(KeyboardInterrupt), stop.immediate():
            stop.handle_signal(signal.SIGINT, None)
        assert not stop.requested()


def test_a_stop_raised_outside_any_block_leaves_nothing_pending():
    with pytest.raises(KeyboardInterrupt):
        stop.handle_signal(signal.SIGINT, None)
    assert not stop.requested()


def _loader_worker(worker_init_fn, ready) -> None:
    worker_init_fn(0)  # as a DataLoader worker starts
    ready.set()
    time.sleep(60)


def _train_loader():
    from csl.distributed import ResumableDistributedSampler
    from csl.trainer import make_train_loader

    return make_train_loader([0, 1], ResumableDistributedSampler(2, 2), 1, 1, torch.device("cpu"), 0)


def _eval_loader():
    from csl.evaluate import make_eval_loader

    return make_eval_loader([0, 1], num_workers=1)


@pytest.mark.parametrize("start_method", ["fork", "forkserver"])
@pytest.mark.parametrize("make_loader", [_train_loader, _eval_loader])
def test_a_sigterm_sent_to_the_whole_job_leaves_the_loader_workers_to_the_main_process(make_loader, start_method):
    """A scheduler's stop signals every process of the job: a DataLoader worker that died of it would make torch
    raise in the middle of the main process's step or evaluation (which then cannot finish and save). The worker
    outlives a SIGTERM of another sender; one of the main process (the loader's terminate(), multiprocessing's at
    exit) ends it. A worker of a fork server (Python 3.14's default start method on Linux) runs torch's threads
    before its init, which could take the signal: there a SIGTERM ends it as before, whoever sends it."""
    context = multiprocessing.get_context(start_method)
    ready = context.Event()
    worker = context.Process(target=_loader_worker, args=(make_loader().worker_init_fn, ready), daemon=True)
    worker.start()
    try:
        assert ready.wait(30)
        if start_method == "forkserver":
            subprocess.run(["kill", "-TERM", str(worker.pid)], check=True)
            worker.join(10.0)
            assert worker.exitcode == -signal.SIGTERM
            return
        subprocess.run(["kill", "-TERM", str(worker.pid)], check=True)  # another sender: as the scheduler's
        worker.join(1.0)
        assert worker.is_alive()
        os.kill(worker.pid, signal.SIGTERM)  # this process started it: as the loader's terminate()
        worker.join(10.0)
        assert worker.exitcode == 0
    finally:
        if worker.is_alive():
            worker.kill()
            worker.join()
