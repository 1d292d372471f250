"""Nothing lost, nothing silent in a run folder: refused reuse, the lock, best.pt across kills, NaN runs, resumes."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import sys

import pytest
import torch
from test_train import TINY

from csl import checkpoint as checkpoint_mod
from csl import run_folder
from csl.cli import main
from csl.config import ConfigError, build_config
from csl.logging_utils import read_metrics
from csl.run_folder import LOCK_NAME, RunFolderError
from csl.trainer import NonFiniteTrainingError, Trainer, train

SUPERVISED = {**TINY, "train.mode": "supervised", "train.iters": 4, "train.iters_per_epoch": 2}


def config(out, **overrides) -> dict:
    return build_config({}, {**SUPERVISED, "output_dir": str(out), **overrides})


def test_a_folder_holding_a_run_is_refused_unless_resumed_or_overwritten(tmp_path):
    train(config(tmp_path))
    before = (tmp_path / "best.pt").read_bytes()
    with pytest.raises(RunFolderError, match="already holds a run .*--resume auto.*--overwrite"):
        Trainer(config(tmp_path, **{"model.backbone": "resnet34"}))
    assert (tmp_path / "best.pt").read_bytes() == before  # nothing was touched
    assert not (tmp_path / LOCK_NAME).exists()
    summary = train(config(tmp_path, **{"train.overwrite": True, "train.iters": 2}))
    assert summary["iterations"] == 2
    assert [r["iter"] for r in read_metrics(str(tmp_path / "metrics.jsonl"), "train")] == [1, 2]  # not appended
    # The CLI says it in one line, exit 2.
    rc = main(["train", "--config", "demo", f"output_dir={tmp_path}", "device=cpu"])
    assert rc == 2


def test_two_trainers_on_one_folder(tmp_path):
    first = Trainer(config(tmp_path))
    try:
        with pytest.raises(RunFolderError, match=f"in use by process {os.getpid()}"):
            Trainer(config(tmp_path, **{"train.resume": "auto"}))
    finally:
        first.close()
    assert not (tmp_path / LOCK_NAME).exists()
    # A lock left by a process that no longer runs is taken over, and the run's log says so (it was said before
    # the log file existed).
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": 2**22 + 12345, "host": os.uname().nodename,
                                                  "started": "earlier"}))
    Trainer(config(tmp_path, **{"train.overwrite": True})).close()
    log = (tmp_path / "train.log").read_text()
    assert f"WARNING taking over {tmp_path / LOCK_NAME}, left by process {2**22 + 12345}" in log
    assert log.index("taking over") < log.index("INFO")  # first, as it happened


def test_a_run_whose_folder_was_removed_while_it_trained_stops_without_making_it_again(tmp_path):
    """The first checkpoint after the removal made the folder again, holding a checkpoint and none of the run's
    records (its metrics and log went to the removed files), and the run went on; with its lock removed, another
    trainer could take the folder and the two wrote one run."""
    folder = tmp_path / "run"
    trainer = Trainer(config(folder))
    try:
        shutil.rmtree(folder)
        with pytest.raises(RunFolderError, match=f"{folder} no longer holds this run's lock .*the folder is gone"):
            trainer.save()  # what an epoch's end or train.ckpt_every does
    finally:
        trainer.close()
    assert not folder.exists()
    # A lock removed by hand and taken by another trainer: the first stops at its next checkpoint, and its end
    # leaves the other's lock in place.
    trainer = Trainer(config(folder))
    try:
        (folder / LOCK_NAME).write_text(json.dumps({"pid": 1, "host": "another-host", "started": "now"}))
        with pytest.raises(RunFolderError, match="process 1 on another-host holds it now"):
            trainer.save()
    finally:
        trainer.close()
    assert json.loads((folder / LOCK_NAME).read_text())["host"] == "another-host"
    assert not (folder / "latest.pt").exists()


def test_a_run_folder_made_read_only_is_said_by_the_failed_checkpoint_not_by_the_lock(tmp_path, monkeypatch):
    """A folder made read-only while the run trained: the checkpoint's write fails, then the lock's removal at the
    run's end failed too, and its PermissionError replaced the checkpoint's error (csl train: error: [Errno 13]
    Permission denied: '.../.csl.lock')."""
    import errno

    def read_only_save(payload, path, *copies):
        raise OSError(f"could not write checkpoint {path}: PermissionError: [Errno 13] Permission denied")

    real_remove = os.remove

    def read_only_remove(path, *args, **kwargs):
        if os.path.basename(path) == LOCK_NAME:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), path)
        return real_remove(path, *args, **kwargs)

    monkeypatch.setattr("csl.trainer.atomic_save", read_only_save)
    monkeypatch.setattr(os, "remove", read_only_remove)
    with pytest.raises(OSError, match=f"could not write checkpoint {tmp_path / 'latest.pt'}"):
        train(config(tmp_path, **{"train.iters": 2, "train.iters_per_epoch": 1, "eval.every_epochs": 2}))
    monkeypatch.undo()
    assert "could not remove the run folder's lock" in (tmp_path / "train.log").read_text()


def test_the_lock_appears_with_its_holder_written(tmp_path, monkeypatch):
    """The lock file is never seen empty (a second trainer would take an empty one for a stale lock and remove it):
    it appears under its name already written, also where the file system has no hard links."""
    from csl.run_folder import RunLock

    seen = []
    real_link = os.link

    def link(src, dst):
        seen.append(json.loads(open(src).read()))  # what the lock will hold, complete before it has its name
        return real_link(src, dst)

    monkeypatch.setattr(os, "link", link)
    lock = RunLock(str(tmp_path))
    lock.acquire()
    assert seen and seen[0]["pid"] == os.getpid()
    assert json.loads((tmp_path / LOCK_NAME).read_text()) == seen[0]
    with pytest.raises(RunFolderError, match="in use by process"):
        RunLock(str(tmp_path)).acquire()
    lock.release()
    monkeypatch.setattr(os, "link", lambda src, dst: (_ for _ in ()).throw(PermissionError(1, "no hard links")))
    lock = RunLock(str(tmp_path))
    lock.acquire()
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert sorted(p.name for p in tmp_path.iterdir()) == [LOCK_NAME]  # no temporary file left
    lock.release()


def test_two_trainers_taking_over_one_stale_lock_do_not_both_hold_it(tmp_path):
    """Two starts after a kill (a scheduler's retry and a user's) both find the dead process's lock stale; the one
    that removed it second removed the first one's new, live lock and both trained into the folder."""
    from csl.run_folder import RunLock

    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": 2**22 + 12345, "host": os.uname().nodename,
                                                  "started": "earlier"}))
    first, second = RunLock(str(tmp_path)), RunLock(str(tmp_path))

    def stale_and_meanwhile_taken_over(holder):
        if not first.held:
            first.acquire()  # between the second's look at the lock and its removal of it
        return RunLock._stale(holder)

    second._stale = stale_and_meanwhile_taken_over
    with pytest.raises(RunFolderError, match=f"in use by process {os.getpid()}"):
        second.acquire()
    assert first.held and not second.held
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert sorted(p.name for p in tmp_path.iterdir()) == [LOCK_NAME]
    first.release()


def test_a_lock_whose_process_id_was_taken_again_is_stale(tmp_path):
    """After a crash in a container the restarted trainer is often PID 1 again, and the crashed one's lock names a
    live process (itself, or the host's init): the lock's process start time and boot id tell the two apart."""
    from csl.run_folder import RunLock, _boot_id, _process_start

    if _process_start(os.getpid()) is None or _boot_id() is None:
        pytest.skip("no /proc/<pid>/stat or boot id on this system: a live process id is taken as the holder")
    me = {"pid": os.getpid(), "host": os.uname().nodename, "started": "earlier"}
    lock_file = tmp_path / LOCK_NAME
    for holder, stale in (({**me, "boot": _boot_id(), "process_start": _process_start(os.getpid())}, False),
                          ({**me, "boot": _boot_id(), "process_start": _process_start(os.getpid()) - 1}, True),
                          ({**me, "boot": "another boot", "process_start": _process_start(os.getpid())}, True),
                          (me, False),  # a lock of an earlier version: a live process id holds it
                          ({**me, "host": "another-host", "process_start": 0}, False)):
        lock_file.write_text(json.dumps(holder))
        lock = RunLock(str(tmp_path))
        if stale:
            lock.acquire()
            assert json.loads(lock_file.read_text())["process_start"] == _process_start(os.getpid())
            lock.release()
        else:
            with pytest.raises(RunFolderError, match="in use by process"):
                lock.acquire()


def test_best_is_written_before_latest(tmp_path, monkeypatch):
    """A kill after the first checkpoint write of an improving epoch leaves best.pt, not only latest.pt."""
    trainer = Trainer(config(tmp_path))
    written = []
    real = checkpoint_mod._write_whole

    def dying_write(path, write):
        real(path, write)
        written.append(os.path.basename(path))
        raise KeyboardInterrupt  # killed right after the first file

    monkeypatch.setattr(checkpoint_mod, "_write_whole", dying_write)
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    trainer.close()
    assert written == ["best.pt"]
    # --resume auto continues from best.pt (the state latest.pt would have held), it does not replace the run.
    monkeypatch.setattr(checkpoint_mod, "_write_whole", real)
    summary = train(config(tmp_path, **{"train.resume": "auto"}))
    assert summary["iterations"] == 4
    assert [r["iter"] for r in read_metrics(str(tmp_path / "metrics.jsonl"), "train")] == [1, 2, 3, 4]
    log = (tmp_path / "train.log").read_text()
    assert "has no latest.pt" in log and "resumed at iteration 2" in log  # continued, not started over


def test_a_stop_during_the_evaluation_keeps_the_epoch(tmp_path, monkeypatch):
    """Ctrl-C / SIGTERM / out of memory while evaluating: the epoch's training is saved with its evaluation pending,
    and --resume auto evaluates it before training on (nothing trained again, no evaluation skipped)."""
    real = Trainer.evaluate
    before = {}

    def stopped(self):
        before["torch"] = torch.get_rng_state()
        torch.rand(3)  # as the validation loader's iterator draws its seed, before the stop
        raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "evaluate", stopped)
    trainer = Trainer(config(tmp_path))
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    trainer.close()
    ckpt = torch.load(tmp_path / "latest.pt", weights_only=True)
    assert ckpt["iteration"] == 2 and ckpt["pending_eval"]["epoch"] == 0 and not (tmp_path / "best.pt").exists()
    assert torch.equal(ckpt["rng"][0]["torch"], before["torch"])  # the resumed evaluation draws what this one drew
    assert "the evaluation at iteration 2 did not finish; the epoch's training is saved" in (
        tmp_path / "train.log").read_text()
    monkeypatch.setattr(Trainer, "evaluate", real)
    summary = train(config(tmp_path, **{"train.resume": "auto"}))
    assert summary["iterations"] == 4
    assert [r["iter"] for r in read_metrics(str(tmp_path / "metrics.jsonl"), "train")] == [1, 2, 3, 4]
    assert [r["iter"] for r in read_metrics(str(tmp_path / "metrics.jsonl"), "eval")] == [2, 4]
    assert "resumed before the evaluation at iteration 2: evaluating first" in (tmp_path / "train.log").read_text()
    assert "pending_eval" not in torch.load(tmp_path / "latest.pt", weights_only=True)


class FakeTensorBoard:
    """A stand-in for ``torch.utils.tensorboard`` (not installed here) that keeps what TensorBoard would show: a
    writer opened with ``purge_step`` hides the scalars logged before it at that step and later ones."""

    def __init__(self):
        self.scalars: list[tuple[str, int, float]] = []
        board = self

        class SummaryWriter:
            def __init__(self, log_dir, purge_step=None):
                if purge_step is not None:
                    board.scalars = [s for s in board.scalars if s[1] < purge_step]

            def add_scalar(self, tag, value, step):
                board.scalars.append((tag, step, value))

            def close(self):
                pass

        self.SummaryWriter = SummaryWriter

    def steps(self, tag: str) -> list[int]:
        return [step for t, step, _ in self.scalars if t == tag]


def test_a_pending_evaluation_killed_before_its_save_is_recorded_once(tmp_path, monkeypatch):
    """The resumed pending evaluation logs its record, then saves; a kill in between leaves latest.pt pending at the
    same iteration, so the next resume evaluates again: the first record goes (as the records after a checkpoint do),
    not two evaluations of one model at one iteration; in metrics.jsonl and in TensorBoard, which still shows the
    training scalars of that iteration once."""
    board = FakeTensorBoard()
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", board)
    monkeypatch.setattr(Trainer, "evaluate", lambda self: (_ for _ in ()).throw(KeyboardInterrupt))
    trainer = Trainer(config(tmp_path))
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    trainer.close()
    monkeypatch.undo()

    def killed(self, names=("latest.pt",)):
        raise KeyboardInterrupt  # as a kill -9 before the checkpoint lands

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", board)
    monkeypatch.setattr(Trainer, "save", killed)
    trainer = Trainer(config(tmp_path, **{"train.resume": "auto"}))
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    trainer.close()
    assert board.steps("eval/miou") == [2]
    monkeypatch.undo()
    assert [r["iter"] for r in read_metrics(str(tmp_path / "metrics.jsonl"), "eval")] == [2]
    assert torch.load(tmp_path / "latest.pt", weights_only=True)["pending_eval"]["epoch"] == 0
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", board)
    train(config(tmp_path, **{"train.resume": "auto"}))
    assert [r["iter"] for r in read_metrics(str(tmp_path / "metrics.jsonl"), "eval")] == [2, 4]
    assert board.steps("eval/miou") == [2, 4]
    assert sorted(board.steps("train/loss")) == [1, 2, 3, 4]
    assert sorted(board.steps("pseudo_labels/mask_ratio")) == sorted(
        r["iter"] for r in read_metrics(str(tmp_path / "metrics.jsonl"), "pseudo_labels"))


def test_a_pending_evaluation_resume_logs_the_iterations_kept_scalars_again_nan_included(tmp_path, monkeypatch):
    """With the evaluation at the resumed iteration pending, TensorBoard hides that iteration's scalars and they are
    logged again from metrics.jsonl: a NaN one (written there as null) among them, not left out."""
    from csl.logging_utils import MetricsWriter

    board = FakeTensorBoard()
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", board)
    writer = MetricsWriter(str(tmp_path))
    writer.write({"kind": "train", "iter": 2, "loss": 0.5, "mask_ratio": float("nan")}, step=2)
    writer.write({"kind": "pseudo_labels", "iter": 2, "epoch": 0, "weighted_accuracy": float("inf")}, step=2)
    writer.write({"kind": "eval", "iter": 2, "miou": 0.25}, step=2)
    writer.close()
    MetricsWriter(str(tmp_path), resumed_at=2, eval_pending=True).close()
    assert sorted((tag, step) for tag, step, _ in board.scalars) == [
        ("pseudo_labels/weighted_accuracy", 2), ("train/loss", 2), ("train/mask_ratio", 2)]
    values = {tag: value for tag, _, value in board.scalars}
    assert values["train/loss"] == 0.5 and math.isnan(values["train/mask_ratio"])
    assert math.isnan(values["pseudo_labels/weighted_accuracy"])  # inf is kept as null, so NaN: its point is shown


def test_resume_auto_takes_the_newer_of_latest_and_best(tmp_path):
    """An improving epoch after the first killed between its two writes leaves best.pt one epoch ahead of latest.pt:
    --resume auto continues from best.pt (latest.pt's older state would also reset the best mIoU)."""
    train(config(tmp_path / "a"))  # the same run to its end: its last state is what best.pt holds after the kill
    train(config(tmp_path / "b"), stop_at=2)
    shutil.copy(tmp_path / "a" / "latest.pt", tmp_path / "b" / "best.pt")
    trainer = Trainer(config(tmp_path / "b", **{"train.resume": "auto"}))
    trainer.close()
    assert trainer.iteration == 4
    assert trainer.best_miou == torch.load(tmp_path / "a" / "latest.pt", weights_only=True)["best_miou"]
    assert "has no latest.pt of the same or a later iteration" in (tmp_path / "b" / "train.log").read_text()


def test_resume_rewrites_a_missing_best_when_the_latest_is_best(tmp_path):
    train(config(tmp_path), stop_at=2)
    ckpt = torch.load(tmp_path / "latest.pt", weights_only=True)
    assert ckpt["best_miou"] is not None and ckpt["last_eval"]["iter"] == 2
    os.remove(tmp_path / "best.pt")  # as an older version could leave it after a kill
    Trainer(config(tmp_path, **{"train.resume": "auto"})).close()
    assert (tmp_path / "best.pt").is_file()
    assert "best.pt was missing; rewritten from" in (tmp_path / "train.log").read_text()
    best = torch.load(tmp_path / "best.pt", weights_only=True)
    assert all(torch.equal(best["model"][k], ckpt["model"][k]) for k in ckpt["model"])


def test_resume_auto_with_a_damaged_latest_names_the_readable_best(tmp_path):
    train(config(tmp_path), stop_at=2)
    with open(tmp_path / "latest.pt", "r+b") as f:
        f.truncate(1000)
    with pytest.raises(ValueError, match=r"latest.pt is not a readable PyTorch checkpoint.*best.pt is readable "
                                         r"\(iteration 2\): continue from it with --resume .*best.pt"):
        Trainer(config(tmp_path, **{"train.resume": "auto"}))
    with open(tmp_path / "best.pt", "r+b") as f:
        f.truncate(1000)
    with pytest.raises(ValueError, match="best.pt is not readable either"):
        Trainer(config(tmp_path, **{"train.resume": "auto"}))


def test_resume_auto_with_a_flipped_bit_in_the_latest_names_the_readable_best(tmp_path):
    """A latest.pt whose tensor data no longer matches its checksums is damaged like a cut-short one: the start stops,
    naming the best.pt to continue from, and never trains on the changed weights."""
    from test_checkpoint import flip_a_bit_in_record

    train(config(tmp_path), stop_at=2)
    flip_a_bit_in_record(tmp_path / "latest.pt", "data/0")
    with pytest.raises(ValueError, match=r"latest.pt is damaged: its record '.*data/0' \(tensor data\).*best.pt is "
                                         r"readable \(iteration 2\): continue from it with --resume .*best.pt"):
        Trainer(config(tmp_path, **{"train.resume": "auto"}))


def test_a_run_without_a_checkpoint_is_not_offered_a_resume(tmp_path):
    """A folder with the metrics of a run that saved no checkpoint: the refusal does not suggest --resume auto (which
    finds nothing to continue and replaces the run), only --overwrite."""
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"kind": "train", "iter": 1, "loss": 1.0}) + "\n")
    with pytest.raises(RunFolderError, match=r"holds the files of a run but no checkpoint \(metrics.jsonl\), so "
                                             r"there is nothing to continue; replace it with --overwrite") as err:
        Trainer(config(tmp_path))
    assert "--resume" not in str(err.value)


def test_resume_auto_with_a_damaged_best_continues_from_the_latest(tmp_path):
    """Only best.pt damaged: the run continues from latest.pt with a WARNING naming the damage; a changed seed on
    resume is warned about (the samplers follow it)."""
    train(config(tmp_path), stop_at=2)
    with open(tmp_path / "best.pt", "r+b") as f:
        f.truncate(1000)
    trainer = Trainer(config(tmp_path, **{"train.resume": "auto", "seed": 7}))
    assert trainer.iteration == 2
    trainer.close()
    text = (tmp_path / "train.log").read_text()
    assert "best.pt is not a readable PyTorch checkpoint" in text and "resuming from" in text
    assert "seed was 0, now 7" in text and "seed=0 continues it" in text
    # The damaged file is moved aside and, the resumed state being the best one, best.pt is written again from it.
    assert (tmp_path / "best.pt.damaged").stat().st_size == 1000 and "moved to" in text
    assert torch.load(tmp_path / "best.pt", weights_only=True)["iteration"] == 2


def test_resume_drops_records_logged_after_the_checkpoint_and_orphan_temp_files(tmp_path):
    train(config(tmp_path), stop_at=2)
    with open(tmp_path / "metrics.jsonl", "a") as f:  # what a run killed at iteration 3 had logged
        f.write(json.dumps({"kind": "train", "iter": 3, "loss": 1.0}) + "\n")
        f.write('{"kind": "tra')  # its last line torn by the kill (or a full disk)
    with open(tmp_path / "metrics.jsonl", "ab") as f:  # and bytes that are not UTF-8 at all
        f.write(b"\n\xff\xfe\x00garbage\n")
    (tmp_path / ".latest.pt.abc123.tmp").write_bytes(b"half a checkpoint")
    train(config(tmp_path, **{"train.resume": "auto"}))
    iters = [r["iter"] for r in read_metrics(str(tmp_path / "metrics.jsonl"), "train")]
    assert iters == [1, 2, 3, 4]
    log = (tmp_path / "train.log").read_text()
    assert "metrics.jsonl: line 5 is not a JSON record" in log and "metrics.jsonl: line 6 is not a JSON record" in log
    assert not list(tmp_path.glob(".*.tmp"))


def test_non_finite_values_are_refused_and_a_diverging_run_saves_nothing(tmp_path):
    for key in ("train.lr", "train.weight_decay", "selection.alpha"):
        with pytest.raises(ConfigError, match=f"{key} must be a finite number"):
            config(tmp_path, **{key: float("inf")})
    with pytest.raises(ConfigError, match="must be a finite number"):
        config(tmp_path, **{"train.lr": float("nan")})
    # A huge learning rate: the loss becomes NaN, the run stops, no NaN model is saved as best.
    with pytest.raises(NonFiniteTrainingError, match="NaN / inf"):
        train(config(tmp_path, **{"train.lr": 1e30, "train.log_every": 1}))
    assert not (tmp_path / "best.pt").exists() and not (tmp_path / "latest.pt").exists()
    rc = main(["train", "--config", "demo", "device=cpu", "train.lr=1e30", "train.log_every=1", "train.iters=2",
               "train.progress=false", "data.synthetic.num_val=2", f"output_dir={tmp_path / 'cli'}"])
    assert rc == 1
    # The error ends the run's log as well as the console.
    last = (tmp_path / "cli" / "train.log").read_text().strip().splitlines()[-1]
    assert "ERROR the run stopped on an error: NonFiniteTrainingError:" in last and "NaN / inf" in last


def test_resume_from_a_bare_state_dict_and_changed_lr(tmp_path):
    trainer = Trainer(config(tmp_path / "a"))
    bare = tmp_path / "weights.pt"
    torch.save(trainer.bare_model.state_dict(), bare)
    trainer.close()
    with pytest.raises(ValueError, match="not a training checkpoint.*train.init_from="):
        Trainer(config(tmp_path / "b", **{"train.resume": str(bare)}))
    # train.init_from takes it; weights of another class count or model are refused with the reason.
    Trainer(config(tmp_path / "d", **{"train.init_from": str(bare)})).close()
    assert f"model initialised from {bare}" in (tmp_path / "d" / "train.log").read_text()
    from csl.model import build_model

    cfg = config(tmp_path / "e")
    for name, model_cfg, classes, message in (
            ("classes.pt", cfg["model"], 7, "predicts 7 classes but the training data's class count is 4"),
            ("r34.pt", dict(cfg["model"], backbone="resnet34"), 4, "does not fit the model of this config")):
        torch.save(build_model(dict(model_cfg, pretrained=None), classes).state_dict(), tmp_path / name)
        with pytest.raises(ConfigError, match=message):
            Trainer(config(tmp_path / "e", **{"train.init_from": str(tmp_path / name), "train.overwrite": True}))
    train(config(tmp_path / "c"), stop_at=2)
    resumed = Trainer(config(tmp_path / "c", **{"train.resume": "auto", "train.lr": 0.5, "train.poly_power": 2.0}))
    log_text = (tmp_path / "c" / "train.log").read_text()
    assert "train.lr is 0.5 here but 0.01 in the checkpoint" in log_text
    assert "train.poly_power is 2.0 here but 0.9 in the checkpoint" in log_text
    # What the warning says is what the run uses: the checkpoint's schedule, logged and stored as such.
    total = resumed.total_iters
    assert resumed.scheduler.lr_lambdas[0](3) == pytest.approx((1 - 3 / total) ** 0.9)
    assert resumed.optimizer.param_groups[0]["initial_lr"] == pytest.approx(0.01)
    assert "(poly 0.9)" in log_text.split("resuming")[-1]
    resumed.close()
    stored = (tmp_path / "c" / "config.yaml").read_text()
    assert "lr: 0.01" in stored and "poly_power: 0.9" in stored


def test_a_failed_resume_leaves_config_yaml_and_says_why(tmp_path):
    train(config(tmp_path), stop_at=2)
    before = (tmp_path / "config.yaml").read_text()
    # Another class count: refused with the reason, and config.yaml still describes the run in the folder.
    with pytest.raises(ConfigError, match="trained with 4 classes, this config's data has 6"):
        Trainer(config(tmp_path, **{"train.resume": "auto", "data.num_classes": 6, "train.iters": 8}))
    assert (tmp_path / "config.yaml").read_text() == before
    # A checkpoint of another device type (named, or told by its generator state's size in a checkpoint written
    # before the key): the step's generator starts afresh with a warning, the other streams are restored.
    from csl.trainer import saved_device_type

    ckpt = torch.load(tmp_path / "latest.pt", weights_only=True)
    assert ckpt["device_type"] == "cpu" and saved_device_type({"rng": ckpt["rng"]}) == "cpu"
    cuda_state = torch.zeros(16, dtype=torch.uint8)  # a CUDA generator's state: Philox seed and offset
    assert saved_device_type({"rng": [{"generators": {"step": cuda_state}}]}) == "cuda"
    assert saved_device_type({}) is None
    del ckpt["device_type"]
    ckpt["rng"][0]["generators"]["step"] = cuda_state
    torch.save(ckpt, tmp_path / "latest.pt")
    resumed = Trainer(config(tmp_path, **{"train.resume": "auto"}))
    assert torch.equal(torch.get_rng_state(), ckpt["rng"][0]["torch"])
    resumed.close()
    assert "checkpoint trained on cuda, this run is on cpu: the step's random generator" in (
        tmp_path / "train.log").read_text()
    # A float16 loss scaler resumed from a float32 run starts afresh (its saved state is empty).
    Trainer(config(tmp_path, **{"train.resume": "auto", "train.amp": "fp16"})).close()
    assert "no float16 loss-scaler state (it did not train in float16); the scaler starts afresh" in (
        tmp_path / "train.log").read_text()
    # A finished demo stage's slimmed checkpoint is named as such.
    from csl.demo import slim_checkpoints

    slim_checkpoints(str(tmp_path))
    with pytest.raises(ValueError, match="slimmed checkpoint of a finished csl demo stage.*train.init_from="):
        Trainer(config(tmp_path, **{"train.resume": "auto"}))


def test_slimming_a_stage_after_a_kill_between_the_link_and_its_rename(tmp_path):
    """A kill after slim_checkpoints linked latest.pt to best.pt.link and before the rename left that name, and the
    stage's next slimming (the demo again with --fresh) failed on it with FileExistsError after its training."""
    from csl.demo import slim_checkpoints

    state = {"model": {"w": torch.zeros(2)}, "iteration": 4, "optimizer": {"state": {}}}
    torch.save(state, tmp_path / "latest.pt")
    torch.save(state, tmp_path / "best.pt")
    (tmp_path / "best.pt.link").write_bytes(b"the earlier run's latest.pt, linked")
    slim_checkpoints(str(tmp_path))
    assert os.path.samefile(tmp_path / "best.pt", tmp_path / "latest.pt")
    assert "optimizer" not in torch.load(tmp_path / "best.pt", weights_only=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "latest.pt"]


def test_a_bad_labeled_or_validation_mask_stops_the_run_before_training(tmp_path, monkeypatch):
    import numpy as np
    from PIL import Image

    from csl.data.synthetic import write_synthetic_folder

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    info = write_synthetic_folder(str(tmp_path / "data"), layout="folder", num_labeled=2, num_unlabeled=2, num_val=2,
                                  size=48)
    data = {"data.dataset": "folder", "data.root": info["root"], "data.split_dir": info["split_dir"],
            "data.num_classes": 5}
    trainer = Trainer(config(tmp_path / "run1", **data))  # checked: fine, and remembered
    trainer.close()
    stamps = list((tmp_path / "cache" / "csl" / "validated").iterdir())
    assert len(stamps) == 2  # the labeled list and the validation list
    # A stamp of another shape (damaged, or from another version) is checked again and rewritten, never trusted.
    good = {p: p.read_text() for p in stamps}
    for damaged in ("[]", "null", '{"class_pixels": null}', '{"class_pixels": [1, 2]}', "\x00\x00"):
        for stamp in stamps:
            stamp.write_text(damaged)
        Trainer(config(tmp_path / "run1", **data, **{"train.overwrite": True})).close()
        assert {p: p.read_text() for p in stamps} == good, damaged
    # Too many classes for these masks (a config's num_classes left over): said in the log.
    Trainer(config(tmp_path / "run0", **{**data, "data.num_classes": 8})).close()
    assert "data.num_classes is 8 but the validation masks hold classes 0..4 only" in (
        tmp_path / "run0" / "train.log").read_text()
    val_mask = os.path.join(info["root"], open(info["val_list"]).readline().split()[1])
    mask = np.array(Image.open(val_mask))
    mask[0, 0] = 9  # not one of the 5 classes
    Image.fromarray(mask).save(val_mask)
    with pytest.raises(ValueError, match=r"(?s)1 bad item\(s\) in .*val.txt.*label values outside \[0, 5\).*: 9"):
        Trainer(config(tmp_path / "run2", **data))
    assert not (tmp_path / "run2" / "latest.pt").exists()
    with pytest.warns(FutureWarning, match="data.check_val_labels"):  # the old key turns the check off too
        Trainer(config(tmp_path / "run3", **data, **{"data.check_val_labels": False})).close()
    # A labeled mask is read before training too, not first in a loader worker.
    Image.fromarray(np.zeros_like(mask)).save(val_mask)
    labeled_mask = os.path.join(info["root"], open(info["labeled_list"]).readlines()[1].split()[1])
    Image.fromarray(np.full_like(np.array(Image.open(labeled_mask)), 7)).save(labeled_mask)
    with pytest.raises(ValueError, match=r"(?s)1 bad item\(s\) in .*labeled.txt.*label values outside"):
        Trainer(config(tmp_path / "run4", **data))


def test_labeled_masks_whose_every_pixel_is_ignored_stop_the_run_before_training(tmp_path, monkeypatch):
    """Masks whose values are all ignore values (a wrong data.ignore_labels / reduce_zero_label) would train with a
    labeled loss of 0 throughout: refused at the start, naming the list and the settings."""
    from csl.data.synthetic import write_synthetic_folder

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    info = write_synthetic_folder(str(tmp_path / "data"), layout="folder", num_labeled=2, num_unlabeled=2, num_val=2,
                                  size=32)
    data = {"data.dataset": "folder", "data.root": info["root"], "data.split_dir": info["split_dir"],
            "data.num_classes": 5, "data.ignore_labels": [0, 1, 2, 3, 4]}
    with pytest.raises(ValueError, match=r"every mask pixel of .*labeled.txt \(2 items\) is ignored: .*"
                                         r"data.ignore_labels \[0, 1, 2, 3, 4\]"):
        Trainer(config(tmp_path / "run", **data))
    assert not (tmp_path / "run" / "latest.pt").exists()


def test_binary_masks_of_0_and_255_are_said_to_lose_their_foreground(tmp_path, monkeypatch):
    """A binary mask's foreground stored as 255 is read as ignored: the validation masks then hold class 0 alone, and
    the warning says why instead of only asking for another class count."""
    import numpy as np
    from PIL import Image

    from csl.data.synthetic import write_synthetic_folder

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    info = write_synthetic_folder(str(tmp_path / "data"), layout="folder", num_labeled=2, num_unlabeled=2, num_val=2,
                                  size=32)
    for name in os.listdir(os.path.join(info["root"], "masks")):
        mask = os.path.join(info["root"], "masks", name)
        Image.fromarray(np.where(np.array(Image.open(mask)) > 0, 255, 0).astype(np.uint8)).save(mask)
    data = {"data.dataset": "folder", "data.root": info["root"], "data.split_dir": info["split_dir"],
            "data.num_classes": 2}
    Trainer(config(tmp_path / "run", **data)).close()
    assert ("the validation masks hold classes 0..0 only: the model gets 1 class(es) no label ever shows; set "
            "data.num_classes to the dataset's count; a class the files store as 255 (a binary mask of 0 / 255) is "
            "read as ignored") in (tmp_path / "run" / "train.log").read_text()


def test_a_missing_unlabeled_image_stops_the_run_before_training(tmp_path, monkeypatch):
    """The unlabeled images are looked for at the start (their masks are optional), not when a loader first draws
    the missing one, maybe hours in."""
    from csl.data.synthetic import write_synthetic_folder

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    info = write_synthetic_folder(str(tmp_path / "data"), layout="folder", num_labeled=2, num_unlabeled=3, num_val=2,
                                  size=48)
    with open(os.path.join(info["split_dir"], "unlabeled.txt"), "a") as f:
        f.write("images/not_there.png\n")
    data = {"data.dataset": "folder", "data.root": info["root"], "data.split_dir": info["split_dir"],
            "data.num_classes": 5, "train.mode": "semi"}
    with pytest.raises(FileNotFoundError, match=r"1 of the 4 unlabeled image files not found, e.g. .*not_there.png "
                                                r"\(listed in .*unlabeled.txt\)"):
        Trainer(config(tmp_path / "run", **data))
    assert not (tmp_path / "run" / "latest.pt").exists()
    # A file name with a space: the line's two fields are that name, which the message says.
    shutil.copy(os.path.join(info["root"], "images", os.listdir(os.path.join(info["root"], "images"))[0]),
                os.path.join(info["root"], "images", "my pic.png"))
    lines = tmp_path.joinpath(info["split_dir"], "unlabeled.txt")  # an absolute split_dir replaces tmp_path
    lines.write_text(lines.read_text().replace("images/not_there.png\n", "images/my pic.png\n"))
    with pytest.raises(FileNotFoundError, match=r"e.g. .*images/my \(the line names .*images/my pic.png, a file name "
                                                r"with a space: split files separate fields by whitespace"):
        Trainer(config(tmp_path / "run", **data))


def test_a_backend_or_device_that_cannot_run_stops_before_the_folder_is_touched(tmp_path, capsys):
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match=r"kernels.backend=cuda cannot run on cpu: the cuda backend needs CUDA "
                                          r"tensors.*kernels.backend=auto"):
        Trainer(config(out, **{"kernels.backend": "cuda", "device": "cpu"}))
    assert not out.exists()
    assert main(["train", "--config", "demo", "device=cpu", "kernels.backend=cuda", f"output_dir={out}"]) == 2
    assert "csl train: error: kernels.backend=cuda cannot run on cpu" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["train", "--config", "demo", "device=cuda", f"output_dir={out}"]) == 2
        assert "error: device=cuda was asked for but no CUDA device is visible" in capsys.readouterr().err
    assert not out.exists()


def test_a_resume_does_not_need_the_start_weights(tmp_path):
    """model.pretrained / train.init_from are replaced by the checkpoint's weights: a resume after they were moved
    (or offline, for model.pretrained=imagenet) does not read them."""
    train(config(tmp_path), stop_at=2)
    gone = {"model.pretrained": str(tmp_path / "gone" / "resnet18.pth"),
            "train.init_from": str(tmp_path / "gone" / "init.pt")}
    summary = train(config(tmp_path, **{"train.resume": "auto", **gone}))
    assert summary["iterations"] == 4
    assert (f"model.pretrained={gone['model.pretrained']} and train.init_from={gone['train.init_from']} not loaded"
            in (tmp_path / "train.log").read_text())


def test_a_runs_stored_config_started_again_does_not_replace_the_run(tmp_path):
    """config.yaml holds the run, not how one start was asked for: reused, it is refused like any other start."""
    from csl.config import load_config

    train(config(tmp_path, **{"train.overwrite": True}))
    before = (tmp_path / "latest.pt").read_bytes()
    stored = load_config(str(tmp_path / "config.yaml"))
    assert stored["train"]["overwrite"] is False and stored["train"]["resume"] is None
    with pytest.raises(RunFolderError, match="already holds a run"):
        Trainer(stored)
    assert (tmp_path / "latest.pt").read_bytes() == before
    assert torch.load(tmp_path / "latest.pt", weights_only=True)["config"]["train"]["overwrite"] is True


def test_a_checkpoint_of_another_folder_resumes_only_into_a_folder_without_a_run(tmp_path):
    train(config(tmp_path / "a"), stop_at=2)
    train(config(tmp_path / "b"))
    before = (tmp_path / "b" / "latest.pt").read_bytes()
    other = str(tmp_path / "a" / "latest.pt")
    with pytest.raises(RunFolderError, match="b already holds a run .* is another folder's; resume it into its own"):
        Trainer(config(tmp_path / "b", **{"train.resume": other}))
    assert (tmp_path / "b" / "latest.pt").read_bytes() == before
    assert train(config(tmp_path / "c", **{"train.resume": other}))["iterations"] == 4  # an empty folder: a fork
    assert train(config(tmp_path / "a", **{"train.resume": other}))["iterations"] == 4  # its own folder


def test_missing_start_files_are_said_before_the_folder_is_touched(tmp_path, monkeypatch):
    gone = str(tmp_path / "gone.pt")
    source = "; model.pretrained is a local file, or 'imagenet' to use torchvision's download: ResNet18_Weights"
    for key in ("train.resume", "train.init_from", "model.pretrained"):
        out = tmp_path / key
        end = re.escape(source) if key == "model.pretrained" else "$"
        with pytest.raises(FileNotFoundError, match=f"{key}: file not found: {gone}{end}"):
            Trainer(config(out, **{key: gone}))
        assert not out.exists()
    # A folder (a run folder given for its checkpoint) is there: said to be a folder, not a file not found.
    for key, which in (("train.resume", "its latest.pt or best.pt"), ("train.init_from", "its latest.pt or best.pt"),
                       ("model.pretrained", "the weights file in it")):
        out = tmp_path / f"{key}_folder"
        with pytest.raises(IsADirectoryError, match=f"{key}: {tmp_path} is a folder; give {which}$"):
            Trainer(config(out, **{key: str(tmp_path)}))
        assert not out.exists()
    # A relative path (the camvid config's ../shared/weights/...) is read from the current folder, which is said.
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=rf"model.pretrained: file not found: \.\./w/gone\.pt \(read from the "
                                                rf"current folder: {tmp_path.parent}/w/gone\.pt\); "):
        Trainer(config(tmp_path / "rel", **{"model.pretrained": "../w/gone.pt"}))


def test_a_missing_unimatch_weights_file_is_said_with_where_to_get_it(tmp_path, monkeypatch):
    """The VOC / Cityscapes / COCO configs read UniMatch's ImageNet files from pretrained/: a missing one is named
    with the link of UniMatch's README that has it, before anything else is read."""
    from csl.config import load_config
    from csl.model.backbone import UNIMATCH_RESNET_URLS
    from csl.model.xception import UNIMATCH_XCEPTION_URL
    from csl.trainer import check_start_files

    monkeypatch.chdir(tmp_path)
    for name, file, url in (("coco", "xception.pth", UNIMATCH_XCEPTION_URL),
                            ("voc_321", "resnet101.pth", UNIMATCH_RESNET_URLS["resnet101"])):
        with pytest.raises(FileNotFoundError, match=rf"model.pretrained: file not found: pretrained/{file} .*"
                                                    rf"UniMatch's ImageNet {file} from {re.escape(url)}"):
            check_start_files(load_config(name), None)


def test_imagenet_weights_of_a_backbone_torchvision_lacks_are_refused_before_the_folder_is_touched(tmp_path):
    """torchvision has no ImageNet Xception: model.pretrained=imagenet is refused at the start check, with where
    UniMatch's file is, not once the data and the model are built (after the run folder was claimed)."""
    from csl.model.xception import UNIMATCH_XCEPTION_URL

    out = tmp_path / "run"
    with pytest.raises(ValueError, match="model.pretrained=imagenet: torchvision has no ImageNet xception; .*"
                                         f"UniMatch's ImageNet xception.pth from {re.escape(UNIMATCH_XCEPTION_URL)}"):
        Trainer(config(out, **{"model.backbone": "xception", "model.pretrained": "imagenet"}))
    assert not out.exists()
    # nor has it the deep stem's: refused before a download of weights that cannot load
    with pytest.raises(ValueError, match="model.pretrained=imagenet: torchvision's ImageNet resnet50 has "
                                         "torchvision's stem, not model.stem=deep; .*UniMatch's ImageNet resnet50.pth"):
        Trainer(config(out, **{"model.backbone": "resnet50", "model.stem": "deep", "model.pretrained": "imagenet"}))
    assert not out.exists()


def test_a_periodic_checkpoint_never_holds_non_finite_weights(tmp_path):
    """train.ckpt_every saves between the loss checks of train.log_every: the weights are checked first."""
    with pytest.raises(NonFiniteTrainingError, match="weights became NaN / inf"):
        train(config(tmp_path, **{"train.lr": 1e30, "train.ckpt_every": 1, "train.log_every": 100,
                                  "train.iters_per_epoch": 4}))
    if (tmp_path / "latest.pt").exists():
        state = torch.load(tmp_path / "latest.pt", weights_only=True)["model"]
        assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def test_a_new_run_replaces_the_old_runs_tensorboard_scalars(tmp_path):
    (tmp_path / "tb").mkdir()
    (tmp_path / "tb" / "events.out.tfevents.old").write_text("old")
    train(config(tmp_path, **{"train.iters": 2}))
    assert not (tmp_path / "tb" / "events.out.tfevents.old").exists()


def _files(folder) -> dict:
    """Every file's bytes; train.log's first lines (this process's earlier runs log the warnings a claim gives into
    the run's log before the new start opens its own)."""
    files = {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
    files["train.log"] = files["train.log"][:files["train.log"].index(b"done: ")]
    return files


def test_a_start_that_fails_after_its_log_exists_ends_the_log_with_why(tmp_path, monkeypatch):
    import csl.data

    def unreadable(*args, **kwargs):
        raise OSError("the data disk is gone")

    monkeypatch.setattr(csl.data, "build_datasets", unreadable)
    with pytest.raises(OSError, match="the data disk is gone"):
        Trainer(config(tmp_path))
    assert "ERROR the run could not start: OSError: the data disk is gone" in (tmp_path / "train.log").read_text()


def test_a_second_failed_start_leaves_its_own_reason_in_the_log(tmp_path, monkeypatch):
    """The files a failed start leaves (train.log, no run) are the next start's to replace, not a run to put back:
    a second failed start's log said the first one's reason."""
    import csl.data

    def unreadable(why):
        def build(*args, **kwargs):
            raise OSError(why)
        return build

    monkeypatch.setattr(csl.data, "build_datasets", unreadable("the data disk is gone"))
    with pytest.raises(OSError):
        Trainer(config(tmp_path))
    monkeypatch.setattr(csl.data, "build_datasets", unreadable("the second disk is gone too"))
    with pytest.raises(OSError):
        Trainer(config(tmp_path))
    text = (tmp_path / "train.log").read_text()
    assert "ERROR the run could not start: OSError: the second disk is gone too" in text
    assert "the data disk is gone" not in text
    assert sorted(os.listdir(tmp_path)) == ["train.log"]


def test_a_replacing_start_that_fails_keeps_the_run(tmp_path, monkeypatch):
    """--overwrite with a set-up that fails (here the data cannot be read): the run is put back as it was; a kill
    during the set-up leaves it aside, and the next start puts it back."""
    import csl.data
    from csl.run_folder import REPLACED_DIR, claim_run_folder

    train(config(tmp_path))
    before = _files(tmp_path)

    def unreadable(*args, **kwargs):
        raise OSError("the data disk is gone")

    with monkeypatch.context() as m:
        m.setattr(csl.data, "build_datasets", unreadable)
        with pytest.raises(OSError, match="the data disk is gone"):
            Trainer(config(tmp_path, **{"train.overwrite": True}))
    assert _files(tmp_path) == before
    # A start killed after setting the run aside (the lock is left behind, its process gone).
    lock = claim_run_folder(str(tmp_path), resuming=False, resume_auto=False, overwrite=True)
    assert (tmp_path / REPLACED_DIR).is_dir() and not (tmp_path / "latest.pt").exists()
    lock.held = False  # as after a kill: neither released nor restored, the lock names a process that is gone
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": 2**22 + 12345, "host": os.uname().nodename,
                                                  "started": "earlier"}))
    with pytest.raises(RunFolderError, match="already holds a run"):
        Trainer(config(tmp_path))
    assert _files(tmp_path) == before and not (tmp_path / REPLACED_DIR).exists()
    # A start that succeeds replaces the run and leaves nothing aside.
    train(config(tmp_path, **{"train.overwrite": True, "train.iters": 2}))
    assert not (tmp_path / REPLACED_DIR).exists()
    assert [r["iter"] for r in read_metrics(str(tmp_path / "metrics.jsonl"), "train")] == [1, 2]


def test_files_the_package_did_not_write_are_kept(tmp_path):
    """A config.yaml csl train did not write (the user's --config in output_dir) is refused, not replaced; a
    user's file in tb/ stays beside the run's scalars; output_dir naming a file is said to be one."""
    (tmp_path / "config.yaml").write_text("# my notes\ntrain: {lr: 0.01}\n")
    with pytest.raises(RunFolderError, match="config.yaml was not written by csl train"):
        Trainer(config(tmp_path))
    assert (tmp_path / "config.yaml").read_text() == "# my notes\ntrain: {lr: 0.01}\n"
    (tmp_path / "config.yaml").unlink()
    (tmp_path / "tb").mkdir()
    (tmp_path / "tb" / "important.txt").write_text("mine")
    train(config(tmp_path, **{"train.iters": 2}))
    assert (tmp_path / "tb" / "important.txt").read_text() == "mine"
    assert (tmp_path / "config.yaml").read_text().startswith("# csl train: the configuration of this run\n")
    train(config(tmp_path, **{"train.iters": 2, "train.overwrite": True}))  # its own config.yaml is replaced
    assert (tmp_path / "tb" / "important.txt").read_text() == "mine"
    (tmp_path / "file").write_text("x")
    for out, where in ((tmp_path / "file", "is a file"), (tmp_path / "file" / "run", "is inside")):
        with pytest.raises(ValueError, match=f"output_dir {out} {where}"):
            Trainer(config(out))


def test_an_undefined_miou_is_never_the_best(tmp_path, monkeypatch):
    """A validation set without a labelled pixel gives mIoU NaN: said at each evaluation, never recorded as best."""
    real = Trainer.evaluate

    def unlabelled(self):
        return {**real(self), "miou": float("nan")}

    monkeypatch.setattr(Trainer, "evaluate", unlabelled)
    summary = train(config(tmp_path))
    assert summary["best_miou"] is None and not (tmp_path / "best.pt").exists() and (tmp_path / "latest.pt").exists()
    assert (tmp_path / "train.log").read_text().count("no validation pixel has a label") == 2


def test_a_metrics_record_that_cannot_be_written_names_the_file(tmp_path):
    from csl.logging_utils import MetricsWriter

    class FullDisk:
        def write(self, text):
            raise OSError(28, "No space left on device")

        def close(self):
            pass

    writer = MetricsWriter(str(tmp_path), tensorboard=False)
    writer._file.close()
    writer._file = FullDisk()
    with pytest.raises(OSError, match=f"could not write {tmp_path / 'metrics.jsonl'}: No space left on device"):
        writer.write({"kind": "train", "iter": 1})


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (every write: no space left)")
def test_closing_the_metrics_after_a_write_failed_on_a_full_disk_raises_nothing_more(tmp_path):
    """A full disk keeps the record's unwritten rest in the file's buffer; closing it (the trainer's close, in a
    finally) raised the bare OSError again, without the file's name, in place of the error that named it."""
    from csl.logging_utils import MetricsWriter

    writer = MetricsWriter(str(tmp_path), tensorboard=False)
    writer._file.close()
    writer._file = open("/dev/full", "w")  # noqa: SIM115 - closed by the writer
    with pytest.raises(OSError, match=f"could not write {tmp_path / 'metrics.jsonl'}: No space left on device"):
        writer.write({"kind": "train", "iter": 1})
    writer.close()
    assert writer._file is None


def test_a_log_file_that_cannot_be_written_is_said_once(tmp_path, capsys):
    import logging

    from csl.logging_utils import setup_logging

    logger = setup_logging(str(tmp_path))
    handler = next(h for h in logger.handlers if isinstance(h, logging.FileHandler))

    class FullDisk:
        def write(self, text):
            raise OSError(28, "No space left on device")

        def flush(self):
            pass

        def close(self):
            pass

    handler.stream.close()
    handler.stream = FullDisk()
    for i in range(3):
        logger.info("line %d", i)
    err = capsys.readouterr().err
    assert err.count(f"could not write {tmp_path / 'train.log'}: [Errno 28] No space left on device") == 1
    assert "Traceback" not in err and "--- Logging error ---" not in err
    setup_logging(None)


def _killed_while_replacing(folder) -> None:
    """A replacing start killed after setting the run aside: the lock is left behind, its process gone."""
    from csl.run_folder import claim_run_folder

    lock = claim_run_folder(str(folder), resuming=False, resume_auto=False, overwrite=True)
    lock.held = False
    (folder / LOCK_NAME).write_text(json.dumps({"pid": 2**22 + 12345, "host": os.uname().nodename,
                                                "started": "earlier"}))


def test_resume_auto_after_a_killed_replacing_start_continues_the_run(tmp_path):
    """The run set aside comes back before the start looks for a checkpoint, so --resume auto finds it and continues
    it (a search before the put-back finds none and would replace the run)."""
    from csl.run_folder import REPLACED_DIR

    train(config(tmp_path, **{"train.iters": 2}))
    before = _files(tmp_path)
    _killed_while_replacing(tmp_path)
    trainer = Trainer(config(tmp_path, **{"train.resume": "auto"}))
    try:
        assert trainer.resume_from is not None and trainer.iteration == 2
        assert not (tmp_path / REPLACED_DIR).exists()
    finally:
        trainer.close()
    assert set(before) <= set(_files(tmp_path))


def test_a_start_killed_while_it_deletes_the_replaced_run_leaves_none_of_it_to_put_back(tmp_path):
    from csl.run_folder import DISCARDED_SUFFIX, REPLACED_DIR

    train(config(tmp_path, **{"train.iters": 2}))
    (tmp_path / (REPLACED_DIR + DISCARDED_SUFFIX)).mkdir()  # what a kill inside the deletion leaves
    (tmp_path / (REPLACED_DIR + DISCARDED_SUFFIX) / "latest.pt").write_bytes(b"part of the old run")
    trainer = Trainer(config(tmp_path, **{"train.resume": "auto"}))
    try:
        assert trainer.iteration == 2 and torch.load(tmp_path / "latest.pt", weights_only=True)["iteration"] == 2
        assert not (tmp_path / (REPLACED_DIR + DISCARDED_SUFFIX)).exists()
    finally:
        trainer.close()


def test_a_full_disk_while_a_file_is_written_whole_names_it(tmp_path, monkeypatch):
    """config.yaml, a pruned metrics.jsonl, summaries: every atomic write's error names its file, and the previous
    file stays."""
    import errno

    from csl.files import atomic_write_text

    path = tmp_path / "config.yaml"
    path.write_text("before")

    class FullDisk:
        def __init__(self, f):
            self.f = f

        def write(self, text):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    import csl.files as files_mod

    real_fdopen = os.fdopen
    monkeypatch.setattr(files_mod.os, "fdopen", lambda fd, mode: _Closing(FullDisk(real_fdopen(fd, mode))))
    with pytest.raises(OSError, match=f"could not write {path}: No space left on device") as raised:
        atomic_write_text(str(path), "after")
    assert raised.value.errno == errno.ENOSPC
    monkeypatch.undo()
    assert path.read_text() == "before" and os.listdir(tmp_path) == ["config.yaml"]


class _Closing:
    """A file object as a context manager that closes the real file it wraps."""

    def __init__(self, wrapped):
        self.wrapped = wrapped

    def __enter__(self):
        return self.wrapped

    def __exit__(self, *exc):
        self.wrapped.f.close()
        return False


def test_a_resume_with_another_output_stride_or_aspp_rates_is_warned_about(tmp_path):
    """Neither changes a weight's shape, so the weights load; the network computes differently from then on."""
    train(config(tmp_path), stop_at=2)
    trainer = Trainer(config(tmp_path, **{"train.resume": "auto", "model.output_stride": 8,
                                          "model.dilations": [12, 24, 36]}))
    assert trainer.iteration == 2
    trainer.close()
    text = (tmp_path / "train.log").read_text()
    assert "model.output_stride was 16, now 8" in text and "model.output_stride=16 continues it" in text
    assert "model.dilations was [6, 12, 18], now [12, 24, 36]" in text


def test_an_output_folder_that_cannot_be_written_in_is_refused_and_the_check_leaves_nothing(tmp_path, monkeypatch):
    run_folder.check_output_folder(str(tmp_path / "new" / "deeper"))
    run_folder.check_output_folder(str(tmp_path))
    assert os.listdir(tmp_path) == []  # neither the folders asked for nor the check's own

    def denied(**kwargs):  # what a folder without write permission, or on a read-only file system, answers
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(run_folder.tempfile, "mkdtemp", denied)
    with pytest.raises(ValueError, match=r"^output_dir .+: cannot write there: Permission denied; give a folder you "
                                         r"can write in$"):
        run_folder.check_output_folder(str(tmp_path), "output_dir")
    with pytest.raises(ValueError, match=r"cannot write there \(in .+, the nearest folder of it that exists\)"):
        run_folder.check_output_folder(str(tmp_path / "new"))


def test_the_temporary_files_of_whole_writes_are_the_ones_a_start_removes(tmp_path):
    """A kill while latest.pt or config.yaml is written leaves the writer's temporary file beside it: the next start
    removes it by its name, and keeps a user's own *.tmp file."""
    from csl.files import atomic_open
    from csl.run_folder import _remove_orphans

    left = []
    for name in ("latest.pt", "config.yaml"):
        with atomic_open(str(tmp_path / name), binary=True) as f:
            left += [n for n in os.listdir(tmp_path) if n not in ("latest.pt", "config.yaml")]
            f.write(b"x")
    assert len(left) == 2
    for name in left:
        (tmp_path / name).write_bytes(b"what a kill left")
    (tmp_path / "notes.tmp").write_text("mine")
    _remove_orphans(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["config.yaml", "latest.pt", "notes.tmp"]


def test_an_empty_metrics_log_is_no_run(tmp_path):
    """A start that failed after opening metrics.jsonl leaves it empty: the folder holds no run, a plain start
    takes it."""
    from csl.run_folder import RUN_CONFIG_HEADER, claim_run_folder

    (tmp_path / "metrics.jsonl").write_text("")
    (tmp_path / "config.yaml").write_text(RUN_CONFIG_HEADER + "seed: 0\n")
    lock = claim_run_folder(str(tmp_path), resuming=False, resume_auto=False, overwrite=False)
    lock.discard_replaced()
    lock.release()
    assert not (tmp_path / "metrics.jsonl").exists()


def test_resume_auto_replaces_a_run_that_saved_no_checkpoint(tmp_path):
    """--resume auto where a run left metrics but no checkpoint: nothing to continue, so it starts anew and replaces
    those files, with a warning that says why."""
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"kind": "train", "iter": 1, "loss": 1.0}) + "\n")
    Trainer(config(tmp_path, **{"train.resume": "auto"})).close()
    assert "train.resume=auto found no checkpoint to continue" in (tmp_path / "train.log").read_text()
    assert read_metrics(str(tmp_path / "metrics.jsonl")) == []


def test_a_kill_while_the_replaced_run_is_deleted_leaves_nothing_to_put_back(tmp_path, monkeypatch):
    """The replaced run is renamed before it is deleted: a kill half-way through the deletion leaves a folder the next
    start deletes, never part of the old run under the name it puts back."""
    import shutil as shutil_mod

    from csl.run_folder import DISCARDED_SUFFIX, REPLACED_DIR, claim_run_folder

    (tmp_path / "latest.pt").write_bytes(b"the old run")
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"kind": "train", "iter": 1}) + "\n")
    lock = claim_run_folder(str(tmp_path), resuming=False, resume_auto=False, overwrite=True)
    real_rmtree = shutil_mod.rmtree

    def killed_half_way(path, ignore_errors=False):
        if os.path.isdir(path):
            os.remove(os.path.join(path, "latest.pt"))
            raise KeyboardInterrupt

    monkeypatch.setattr(shutil_mod, "rmtree", killed_half_way)
    with pytest.raises(KeyboardInterrupt):
        lock.discard_replaced()
    monkeypatch.setattr(shutil_mod, "rmtree", real_rmtree)
    lock.release()
    assert not (tmp_path / REPLACED_DIR).exists() and (tmp_path / (REPLACED_DIR + DISCARDED_SUFFIX)).is_dir()


def test_non_finite_values_are_written_as_null_and_never_the_best(tmp_path):
    """metrics.jsonl is JSON for any reader: NaN and inf are written as null (Python's json would write NaN), and the
    best mIoU is over the defined ones."""
    from csl.logging_utils import MetricsWriter, best_miou

    writer = MetricsWriter(str(tmp_path), tensorboard=False)
    writer.write({"kind": "eval", "iter": 2, "miou": float("nan"), "iou": [0.5, float("inf")]})
    writer.write({"kind": "eval", "iter": 4, "miou": 0.25, "iou": [0.5, 0.0]})
    writer.close()

    def strict(constant):
        raise ValueError(f"{constant} is not JSON")

    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line, parse_constant=strict) for line in lines]
    assert records[0] == {"kind": "eval", "iter": 2, "miou": None, "iou": [0.5, None]}
    assert best_miou(records) == 0.25 and best_miou(records[:1]) is None and best_miou([]) is None


def test_other_ranks_log_warnings_only():
    import logging

    from csl.logging_utils import LOGGERS, setup_logging

    try:
        setup_logging(None, is_main=False)
        assert [logging.getLogger(name).level for name in LOGGERS] == [logging.WARNING] * len(LOGGERS)
        setup_logging(None)
        assert [logging.getLogger(name).level for name in LOGGERS] == [logging.INFO] * len(LOGGERS)
    finally:
        setup_logging(None)


def test_a_metrics_record_is_in_the_file_once_written(tmp_path):
    """A run killed without a chance to close its files (SIGKILL, the out-of-memory killer) keeps every record it
    wrote: each is flushed at once."""
    from csl.logging_utils import MetricsWriter

    writer = MetricsWriter(str(tmp_path), tensorboard=False)
    writer.write({"kind": "train", "iter": 1, "loss": 0.5})
    assert read_metrics(str(tmp_path / "metrics.jsonl")) == [{"kind": "train", "iter": 1, "loss": 0.5}]
    writer.close()


def test_a_final_error_goes_into_the_log_file_not_again_to_the_console(tmp_path, capsys):
    from csl.logging_utils import log_to_files, setup_logging

    try:
        setup_logging(str(tmp_path))
        log_to_files("the run stopped on an error: boom")
        assert "ERROR the run stopped on an error: boom" in (tmp_path / "train.log").read_text()
        assert "boom" not in capsys.readouterr().err
    finally:
        setup_logging(None)


def test_a_resume_names_the_training_settings_that_differ_from_the_checkpoints(tmp_path):
    """The data, selection, TMP and loss settings of a resume are the config's (README); one that differs from the
    checkpoint's is named in a warning (a 1/8 run resumed on another split said nothing). The same config resumed, and
    the keys that change no step (loader workers), say nothing."""
    semi = {**TINY, "train.iters": 4, "train.iters_per_epoch": 2}
    train(build_config({}, {**semi, "output_dir": str(tmp_path)}), stop_at=2)
    log_file = tmp_path / "train.log"
    Trainer(build_config({}, {**semi, "output_dir": str(tmp_path), "train.resume": "auto",
                              "data.num_workers": 1})).close()
    assert "differ from the checkpoint's" not in log_file.read_text()
    Trainer(build_config({}, {**semi, "output_dir": str(tmp_path), "train.resume": "auto", "selection.tau": 0.9,
                              "tmp.rate": 0.5, "train.lambda_fp": 0.0, "data.crop_size": 48})).close()
    line = next(x for x in log_file.read_text().splitlines() if "differ from the checkpoint's" in x)
    for said in ("data.crop_size 40 -> 48", "selection.tau 0.95 -> 0.9", "tmp.rate 0.7 -> 0.5",
                 "train.lambda_fp 0.5 -> 0.0"):
        assert said in line, (said, line)
    assert "num_workers" not in line and "use the values given now" in line
