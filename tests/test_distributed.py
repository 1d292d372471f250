"""Launches by ``srun -n N``: torchrun's variables from SLURM's (emulated environments: no SLURM cluster here)."""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import free_port, spawn_and_join

from csl.cli import main
from csl.distributed import SRUN_DEFAULT_PORT, expand_hostlist, srun_launch, srun_step_tasks

# What a batch script's one process sees (sbatch --ntasks 4): SLURM_NTASKS, SLURM_PROCID and SLURM_LOCALID, but not
# srun's SLURM_STEP_* variables.
BATCH_SCRIPT = {"SLURM_JOB_ID": "77", "SLURM_NTASKS": "4", "SLURM_PROCID": "0", "SLURM_LOCALID": "0",
                "SLURM_NODEID": "0", "SLURM_JOB_NODELIST": "gpu[01-02]", "SLURM_NODELIST": "gpu[01-02]"}


def srun_task(rank: int, local_rank: int, tasks: int = 4, nodelist: str = "gpu[01-02]", **extra: str) -> dict:
    """The environment srun gives task ``rank`` of a step of ``tasks`` inside the batch script above."""
    return {**BATCH_SCRIPT, "SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": str(tasks), "SLURM_STEP_NODELIST": nodelist,
            "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(local_rank), **extra}


@pytest.mark.parametrize(("hostlist", "hosts"), [
    ("gpu07", ["gpu07"]),
    ("gpu[01-04,07],cpu3", ["gpu01", "gpu02", "gpu03", "gpu04", "gpu07", "cpu3"]),
    ("n[8-11]", ["n8", "n9", "n10", "n11"]),  # padded as the range's first number is written
    ("n[098-101]", ["n098", "n099", "n100", "n101"]),
    ("rack[1-2]-n[3,5]", ["rack1-n3", "rack1-n5", "rack2-n3", "rack2-n5"]),
    ("a[1]b,c", ["a1b", "c"]),
])
def test_expand_hostlist(hostlist, hosts):
    assert expand_hostlist(hostlist) == hosts


@pytest.mark.parametrize(("hostlist", "why"), [
    ("gpu[01-04", "brackets do not pair up"), ("gpu]1[", "brackets do not pair up"), ("a[[1]]", "brackets"),
    ("a,,b", "an empty host name"), ("", "an empty host name"), ("n[4-2]", "the range '4-2' runs backwards"),
    ("n[a-b]", "'a-b' in \\[a-b\\] is neither a number nor a range"), ("n[]", "'' in \\[\\] is neither"),
])
def test_expand_hostlist_refuses_what_it_cannot_read(hostlist, why):
    with pytest.raises(ValueError, match=f"cannot read the SLURM hostlist .*: {why}"):
        expand_hostlist(hostlist)


def test_srun_tasks_get_torchruns_variables():
    launch = srun_launch(srun_task(rank=3, local_rank=1, nodelist="gpu[03-04]"), port=12345)
    assert launch.variables == {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "gpu03",
                                "MASTER_PORT": "12345"}
    assert launch.tasks == 4
    assert launch.description == ("launched by srun: 4 tasks (RANK = SLURM_PROCID, LOCAL_RANK = SLURM_LOCALID); "
                                  "MASTER_ADDR gpu03 (first host of SLURM_STEP_NODELIST), MASTER_PORT 12345 (--port)")
    # --port over the environment's MASTER_PORT (as UniMatch under SLURM), that over the default; the environment's
    # MASTER_ADDR stays; the job's node list where the step's is missing
    assert srun_launch(srun_task(0, 0, MASTER_PORT="2222"), port=3333).variables["MASTER_PORT"] == "3333"
    assert srun_launch(srun_task(0, 0, MASTER_PORT="2222")).variables["MASTER_PORT"] == "2222"
    default = srun_launch(srun_task(0, 0))
    assert default.variables["MASTER_PORT"] == str(SRUN_DEFAULT_PORT)
    assert f"MASTER_PORT {SRUN_DEFAULT_PORT} (the default; --port or MASTER_PORT choose another)" in default.description
    assert srun_launch(srun_task(0, 0, MASTER_ADDR="10.0.0.5")).variables["MASTER_ADDR"] == "10.0.0.5"
    job_list = {k: v for k, v in srun_task(0, 0).items() if k != "SLURM_STEP_NODELIST"}
    assert srun_launch(job_list).variables["MASTER_ADDR"] == "gpu01"
    # a task that sees one GPU (srun --gpus-per-task=1) uses it, whatever its SLURM_LOCALID
    one_gpu = srun_launch(srun_task(3, 1), cuda_devices=1)
    assert one_gpu.variables["LOCAL_RANK"] == "0"
    assert "LOCAL_RANK = 0, as each task sees one GPU)" in one_gpu.description
    assert srun_launch(srun_task(3, 1), cuda_devices=4).variables["LOCAL_RANK"] == "1"


@pytest.mark.parametrize("environ", [
    {},  # not under SLURM
    BATCH_SCRIPT,  # the batch script's one process: a plain run, or the torchrun it starts
    {**BATCH_SCRIPT, "SLURM_NTASKS": "1"},
    srun_task(0, 0, tasks=1),  # srun -n 1
    {**srun_task(1, 1), "RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1"},  # torchrun, started by srun
], ids=["no-slurm", "batch-script", "batch-script-one-task", "srun-one-task", "torchrun-under-srun"])
def test_other_processes_are_left_alone(environ):
    assert srun_launch(environ, port=12345) is None and srun_step_tasks(environ) == 1


@pytest.mark.parametrize(("environ", "message"), [
    ({**srun_task(0, 0), "SLURM_PROCID": "x"}, r"SLURM_PROCID is 'x' in a task of an srun job step"),
    ({k: v for k, v in srun_task(0, 0).items() if k != "SLURM_LOCALID"}, "SLURM_LOCALID is not set"),
    (srun_task(4, 0), "SLURM_PROCID 4 is not below SLURM_STEP_NUM_TASKS 4"),
    (srun_task(1, 1, RANK="0"), "RANK=0 is set without WORLD_SIZE in a task of srun, whose SLURM_PROCID is 1"),
    (srun_task(1, 1, LOCAL_RANK="0"), "LOCAL_RANK=0 is set without WORLD_SIZE .* whose SLURM_LOCALID is 1"),
    ({k: v for k, v in srun_task(0, 0).items() if "NODELIST" not in k},
     "neither SLURM_STEP_NODELIST nor SLURM_JOB_NODELIST is set: set MASTER_ADDR"),
    (srun_task(0, 0, nodelist="gpu[01"), "cannot read the SLURM hostlist 'gpu\\[01'"),
])
def test_a_task_environment_that_does_not_add_up_is_refused(environ, message):
    with pytest.raises(ValueError, match=message):
        srun_launch(environ)
    assert srun_launch({**srun_task(1, 1), "RANK": "1", "LOCAL_RANK": "1"}) is not None  # agreeing ones are fine


def test_one_process_commands_refuse_several_srun_tasks(monkeypatch, tmp_path, capsys):
    for name, value in srun_task(1, 1, tasks=2).items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert main(["split", "--list", str(tmp_path / "list.txt"), "--fractions", "1/2", "--out", str(tmp_path)]) == 2
    assert ("csl split: error: srun started 2 tasks of csl split, which runs as one process (train and eval run as "
            "the tasks of one job): srun -n 1, or no srun") in capsys.readouterr().err


TINY = ["data.crop_size=40", "data.num_workers=0", "data.synthetic.num_labeled=4", "data.synthetic.num_unlabeled=8",
        "data.synthetic.num_val=2", "data.synthetic.size=48", "train.batch_size=2", "train.progress=false",
        "tmp.block=16", "train.log_every=1", "device=cpu", "kernels.backend=reference", "model.backbone=resnet18",
        "data.num_classes=4", "train.iters=2", "train.iters_per_epoch=2"]


def _srun_task_worker(rank: int, tasks: int, port: int, out_dir: str) -> None:
    """``srun -n 2 python -m csl train ... --port P``: SLURM's variables only, none of torchrun's."""
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID"):
        os.environ.pop(name, None)
    os.environ.update(srun_task(rank, rank, tasks=tasks, nodelist="localhost"))
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    code = main(["train", "--config", "demo", *TINY, f"output_dir={out_dir}", "--port", str(port)])
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"code": code, "environ": {k: os.environ[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}}, f)


def test_srun_tasks_train_as_one_job(tmp_path):
    port = free_port()
    spawn_and_join(_srun_task_worker, (2, port, str(tmp_path)), nprocs=2, timeout_s=300)
    for rank in range(2):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert result == {"code": 0, "environ": {"RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank)}}
    ckpt = torch.load(tmp_path / "latest.pt", weights_only=True)
    assert ckpt["world_size"] == 2 and ckpt["iteration"] == 2 and len(ckpt["rng"]) == 2
    log = (tmp_path / "train.log").read_text()
    assert log.count("launched by srun: 2 tasks") == 1
    assert f"MASTER_ADDR localhost (first host of SLURM_STEP_NODELIST), MASTER_PORT {port} (--port)" in log
    assert "world size 2 on cpu (gloo); global batch 4 labeled" in log


def test_a_process_waiting_for_a_missing_one_says_so_then_stops_with_the_reason(monkeypatch, caplog):
    """Rank 0 of a job of 2 whose rank 1 never starts (a failed srun task): it says that it waits, at the notice
    times, and when dist_timeout_min runs out it stops with csl's error naming its rank, the master and torch's
    reason, not torch's traceback."""
    import torch.distributed as dist

    import csl.distributed

    monkeypatch.setattr(csl.distributed, "JOIN_NOTICES_S", (0.3, 0.6))
    monkeypatch.setattr(csl.distributed, "JOIN_NOTICE_EVERY_S", 0.5)
    port = free_port()
    for name, value in {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": str(port)}.items():
        monkeypatch.setenv(name, value)
    with caplog.at_level("WARNING", logger="csl"), \
            pytest.raises(csl.distributed.ProcessGroupError) as error:
        csl.distributed.init_distributed("cpu", timeout_min=2.5 / 60)
    assert not dist.is_initialized()
    where = f"rank 0 of 2, master 127.0.0.1:{port}"
    assert str(error.value).startswith(f"the job's process group did not start ({where}; after ")
    assert "1/2 clients joined" in str(error.value) and isinstance(error.value.__cause__, dist.DistError)
    waits = [r.getMessage() for r in caplog.records if "for the job's other processes to join" in r.getMessage()]
    assert len(waits) >= 3, waits  # at 0.3, 0.6 and 1.1 s, then every 0.5 s until 2.5 s
    assert all(w.startswith(f"{where}: waiting ") and "dist_timeout_min = 0.0416667 min" in w for w in waits)
    assert "csl-join-notices" not in [t.name for t in __import__("threading").enumerate()]


def test_a_process_group_that_starts_in_time_says_nothing(monkeypatch, caplog):
    import threading
    import time

    import torch.distributed as dist

    import csl.distributed

    monkeypatch.setattr(csl.distributed, "JOIN_NOTICES_S", (0.2,))
    for name, value in {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}.items():
        monkeypatch.setenv(name, value)
    started = []
    monkeypatch.setattr(dist, "init_process_group", lambda **kwargs: started.append(kwargs))
    with caplog.at_level("WARNING", logger="csl"):
        env = csl.distributed.init_distributed("cpu", timeout_min=5)
        time.sleep(0.4)  # past the first notice time: the notices ended with the start
    assert started and env.rank == 1 and env.world_size == 2
    assert not [r for r in caplog.records if "other processes to join" in r.getMessage()]
    assert "csl-join-notices" not in [t.name for t in threading.enumerate()]


def test_csl_train_says_a_process_group_that_did_not_start_in_one_line(monkeypatch, tmp_path, capsys):
    import torch.distributed as dist

    for name, value in {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "node7",
                        "MASTER_PORT": "29533"}.items():
        monkeypatch.setenv(name, value)

    def unreachable(**kwargs):
        raise dist.DistNetworkError("The client socket has timed out after 3600000ms while trying to connect to "
                                    "(node7, 29533).")

    monkeypatch.setattr(dist, "init_process_group", unreachable)
    assert main(["train", "--config", "demo", *TINY, f"output_dir={tmp_path / 'run'}"]) == 1
    err = capsys.readouterr().err
    assert ("csl train: error: the job's process group did not start (rank 1 of 2, master node7:29533; after 0 s, "
            "dist_timeout_min = 60 min): The client socket has timed out after 3600000ms while trying to connect to "
            "(node7, 29533).") in err
    assert "Traceback" not in err and not (tmp_path / "run").exists()


def test_the_readme_gives_the_join_notice_times():
    import csl.distributed

    readme = open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")).read()
    assert (csl.distributed.JOIN_NOTICES_S, csl.distributed.JOIN_NOTICE_EVERY_S) == ((30.0, 120.0, 300.0), 300.0)
    assert ("a process still waiting after 30 s says so (its rank, the master's address and port), again\nafter 2 "
            "and 5 minutes and then every 5") in readme
