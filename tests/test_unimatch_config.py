"""UniMatch's configs and unimatch.py's flags given to ``csl train`` (csl/unimatch_config.py, csl/cli.py)."""

from __future__ import annotations

import json
import os
import shutil
import warnings

import pytest
import yaml
from conftest import written

from csl.cli import main, take_local_rank, use_port
from csl.config import ConfigError, dotted_leaves, load_config
from csl.data.synthetic import write_synthetic_folder

# UniMatch's configs/*.yaml at commit 818609d (MIT; github.com/LiheYoung/UniMatch), as its train.sh gives them.
PASCAL = """\
# arguments for dataset
dataset: pascal
nclass: 21
crop_size: 321
data_root: Your/Pascal/Path

# arguments for training
epochs: 80
batch_size: 2 # per GPU x 4 GPUs
lr: 0.001
lr_multi: 10.0
criterion:
  name: CELoss
  kwargs:
    ignore_index: 255
conf_thresh: 0.95

# arguments for model
model: deeplabv3plus
backbone: resnet101
replace_stride_with_dilation: [False, False, True]
dilations: [6, 12, 18]
"""
CITYSCAPES = """\
dataset: cityscapes
nclass: 19
crop_size: 801
data_root: Your/Cityscapes/Path
epochs: 240
batch_size: 2 # per GPU x 4 GPUs
lr: 0.005
lr_multi: 1.0
criterion:
  name: OHEM
  kwargs:
    ignore_index: 255
    thresh: 0.7
    min_kept: 200000
conf_thresh: 0
backbone: resnet101
replace_stride_with_dilation: [False, False, True]
dilations: [6, 12, 18]
"""
COCO = """\
dataset: coco
nclass: 81
crop_size: 513
data_root: Your/COCO/Path
epochs: 30
batch_size: 2 # per GPU x 4 GPUs
lr: 0.004
lr_multi: 10.0
criterion:
  name: CELoss
  kwargs:
    ignore_index: 255
conf_thresh: 0.95
backbone: xception
dilations: [6, 12, 18]
"""
# Settings UniMatch's files leave to its code, which the bundled configs set for their own runs.
RUN_SETTINGS = ("output_dir", "data.root", "data.split", "data.num_workers", "train.ckpt_every")


def quietly(*args) -> dict:
    """``load_config(*args)`` without its account of the reading (tested once, below)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "read .* as a UniMatch config", UserWarning)
        return load_config(*args)


def unimatch_config(tmp_path, text: str, name: str = "pascal.yaml") -> str:
    (tmp_path / "configs").mkdir(exist_ok=True)
    return written(tmp_path / "configs" / name, text)


@pytest.mark.parametrize("text, bundled, differences", [
    (PASCAL, "voc_321", []),
    (COCO, "coco", []),
    # csl's cityscapes_801 is CSL's / the paper's output stride 8; UniMatch's file has 16 (the bundled config says so)
    (CITYSCAPES, "cityscapes_801", ["model.output_stride=16", "model.dilations=[6,12,18]"]),
])
def test_unimatchs_configs_train_the_recipe_of_the_bundled_ones(tmp_path, monkeypatch, text, bundled, differences):
    """Each of UniMatch's three files is read as the bundled config of its dataset, setting for setting, but for the
    folders and the run's bookkeeping; the account of the reading is said once."""
    monkeypatch.chdir(tmp_path)
    with pytest.warns(UserWarning, match=r"read .* as a UniMatch config: .*conf_thresh .* -> selection\.tau") as seen:
        got = dotted_leaves(load_config(unimatch_config(tmp_path, text)))
    assert len([w for w in seen if "UniMatch config" in str(w.message)]) == 1
    want = dotted_leaves(load_config(bundled, differences))
    differ = {k: (got[k], want[k]) for k in want if got[k] != want[k] and k not in RUN_SETTINGS}
    assert differ == {"selection.tau": (0.0, 0.95)} if bundled == "cityscapes_801" else differ == {}
    assert got["data.root"] == yaml.safe_load(text)["data_root"]
    assert got["selection.mode"] == "csl" and got["data.val_list"] is None  # no splits/<dataset>/val.txt here


def test_the_account_of_the_reading_is_said_once_under_torchrun(tmp_path, monkeypatch):
    """Every process of a launched job reads the file; the line is said by rank 0 (or a process without a launcher),
    not once per GPU."""
    monkeypatch.chdir(tmp_path)
    config = unimatch_config(tmp_path, PASCAL)
    monkeypatch.setenv("RANK", "1")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert load_config(config)["data"]["num_classes"] == 21
    assert [str(w.message) for w in seen] == []
    monkeypatch.setenv("RANK", "0")
    with pytest.warns(UserWarning, match="as a UniMatch config"):
        load_config(config)


def test_the_account_says_what_every_command_reading_the_file_does(tmp_path, monkeypatch):
    """The account is written before the overrides and said by eval / predict / analyze too: it claims no selection
    that an override replaces, and names the command that prints the config (only `csl train` has --print-config);
    the data error of those commands names the flag as `csl train`'s (they have no --labeled-id-path)."""
    monkeypatch.chdir(tmp_path)
    config = unimatch_config(tmp_path, PASCAL)
    with pytest.warns(UserWarning) as seen:
        cfg = load_config(config, ["selection.mode=threshold", "tmp.enabled=false"])
    account = str(seen[0].message)
    assert cfg["selection"]["mode"] == "threshold" and "this run selects with CSL" not in account
    assert account.endswith(f"selection.mode=csl, CSL's selection, unless overridden; csl train --config {config} "
                            f"--print-config shows every setting")
    from csl.data import _resolve_lists

    with pytest.raises(ValueError, match=r"data\.labeled_list \(csl train's --labeled-id-path\) is required"):
        _resolve_lists({}, "pascal", str(tmp_path))


def test_conf_thresh_is_the_threshold_of_unimatchs_own_selection(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = quietly(unimatch_config(tmp_path, CITYSCAPES), ["selection.mode=threshold", "tmp.enabled=false"])
    assert cfg["selection"]["tau"] == 0.0 and cfg["train"]["criterion"] == "ohem"
    assert (cfg["train"]["ohem_thresh"], cfg["train"]["ohem_min_kept"]) == (0.7, 200000)
    assert cfg["eval"]["mode"] == "sliding_window"
    # an OHEM without its kwargs: UniMatch's ProbOhemCrossEntropy2d defaults (0.7, 256), not csl's 200000
    bare = CITYSCAPES.replace("    thresh: 0.7\n    min_kept: 200000\n", "")
    cfg = quietly(unimatch_config(tmp_path, bare, "bare.yaml"))
    assert (cfg["train"]["ohem_thresh"], cfg["train"]["ohem_min_kept"]) == (0.7, 256)
    # a loss that ignores another label value: the files' ignored value
    with pytest.raises(ConfigError, match=r"criterion CELoss ignore_index 0: UniMatch's data marks padding and "
                                          r"boundaries with 255, .* data\.ignore_index=<their value>"):
        quietly(unimatch_config(tmp_path, PASCAL.replace("ignore_index: 255", "ignore_index: 0"), "z.yaml"))
    assert quietly(unimatch_config(tmp_path, PASCAL, "z.yaml"), ["data.ignore_index=0"])["data"]["ignore_index"] == 0
    deeper = quietly(unimatch_config(tmp_path, PASCAL.replace("[False, False, True]", "[False, True, True]"),
                                         "os8.yaml"))
    assert deeper["model"]["output_stride"] == 8


def test_the_validation_list_is_unimatchs_when_its_splits_folder_is_here(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "splits" / "pascal").mkdir(parents=True)
    written(tmp_path / "splits" / "pascal" / "val.txt", "JPEGImages/a.jpg SegmentationClass/a.png\n")
    with pytest.warns(UserWarning, match=r"validation list splits/pascal/val\.txt \(as UniMatch's\)"):
        cfg = load_config(unimatch_config(tmp_path, PASCAL))
    assert cfg["data"]["val_list"] == os.path.join("splits", "pascal", "val.txt")
    assert quietly(unimatch_config(tmp_path, PASCAL), ["data.val_list=mine.txt"])["data"]["val_list"] == "mine.txt"


@pytest.mark.parametrize("edit, message", [
    (lambda t: t + "warmup: 3\n", r"unknown key\(s\) 'warmup'; UniMatch's keys are dataset, nclass"),
    (lambda t: t.replace("lr_multi: 10.0\n", ""), r"missing lr_multi \(UniMatch's unimatch.py reads every one\)"),
    (lambda t: t.replace("dataset: pascal", "dataset: ade20k"), r"dataset 'ade20k': csl reads UniMatch's pascal, "
                                                                r"cityscapes, coco .*data\.dataset=folder"),
    (lambda t: t.replace("model: deeplabv3plus", "model: pspnet"), r"model 'pspnet': csl trains DeepLabV3\+"),
    (lambda t: t.replace("backbone: resnet101", "backbone: resnet18"), r"backbone 'resnet18': UniMatch's DeepLabV3\+ "
                                                                       r"has resnet50, resnet101, xception"),
    (lambda t: t.replace("[False, False, True]", "[True, True, True]"), r"replace_stride_with_dilation \[True, True, "
                                                                        r"True\]: csl's ResNet has .*output stride 8"),
    (lambda t: t.replace("replace_stride_with_dilation: [False, False, True]\n", ""),
     r"missing replace_stride_with_dilation \(UniMatch's resnet101 needs it"),
    (lambda t: t.replace("name: CELoss", "name: FocalLoss"), r"criterion .*FocalLoss.*UniMatch's are"),
    (lambda t: t.replace("ignore_index: 255", "ignore_index: 255\n    label_smoothing: 0.1"),
     r"criterion CELoss kwargs label_smoothing: csl's loss takes ignore_index"),
])
def test_what_csl_cannot_train_as_unimatch_would_is_refused_by_name(tmp_path, monkeypatch, edit, message):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"configs/pascal\.yaml \(a UniMatch config: nclass, data_root, conf_thresh, "
                                          r"lr_multi\)|configs/pascal\.yaml \(a UniMatch config: nclass, data_root, "
                                          r"conf_thresh\)") as e:
        load_config(unimatch_config(tmp_path, edit(PASCAL)))
    assert e.match(message)


@pytest.mark.parametrize("text, message", [
    # a csl config whose class count was written as UniMatch's key: csl's key is named, not UniMatch's others
    ("output_dir: runs/x\nnclass: 21\n", r"typo\.yaml holds csl's output_dir and UniMatch's nclass: a config is "
                                          r"one or the other\. In a csl config write data\.num_classes for nclass;"),
    ("data:\n  dataset: pascal\nnclass: 21\ntrain:\n  iters: 2\n", r"holds csl's data, train and UniMatch's "
                                                                   r"nclass: .*write data\.num_classes for nclass"),
    # UniMatch's file with a csl section added: csl's settings go as overrides
    (PASCAL + "train:\n  lr: 0.1\n", r"holds csl's train and UniMatch's dataset, nclass, crop_size, data_root, .*"
                                      r"a UniMatch config takes csl's settings as key=value overrides"),
])
def test_a_file_holding_keys_of_both_kinds_names_the_csl_key_of_the_unimatch_one(tmp_path, monkeypatch, text,
                                                                                 message):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=message):
        load_config(written(tmp_path / "typo.yaml", text))


def test_an_ohem_using_cityscapes_class_weights_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    text = CITYSCAPES.replace("min_kept: 200000", "min_kept: 200000\n    use_weight: true")
    with pytest.raises(ConfigError, match="criterion OHEM kwargs use_weight: csl's loss takes ignore_index, thresh, "
                                          "min_kept"):
        load_config(unimatch_config(tmp_path, text, "cityscapes.yaml"))


def test_unimatchs_command_line_runs_csl_as_it_is(tmp_path, monkeypatch, capsys):
    """UniMatch's train.sh line, with `-m csl train` for `unimatch.py`: its config, list and save-path flags and the
    launcher's --local-rank; csl's own overrides after them. It trains, evaluates on UniMatch's val list, and writes
    the run to --save-path."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    info = write_synthetic_folder(str(tmp_path / "VOC2012"), layout="pascal", num_labeled=2, num_unlabeled=3,
                                  num_val=2, size=40, seed=1)
    (tmp_path / "splits" / "pascal").mkdir(parents=True)
    shutil.copy(info["val_list"], tmp_path / "splits" / "pascal" / "val.txt")
    config = unimatch_config(tmp_path, PASCAL.replace("Your/Pascal/Path", "VOC2012"))
    argv = ["--local-rank=0", "train", f"--config={config}", "--labeled-id-path", info["labeled_list"],
            "--unlabeled-id-path", info["unlabeled_list"], "--save-path", "exp/pascal/csl/732", "--port", "29512",
            "model.backbone=resnet50", "model.pretrained=null", "data.crop_size=33", "data.num_workers=0",
            "train.iters=2", "train.progress=false", "data.num_classes=5"]
    monkeypatch.delenv("MASTER_PORT", raising=False)
    assert main(argv) == 0
    assert os.environ["LOCAL_RANK"] == "0" and os.environ["MASTER_PORT"] == "29512"
    err = capsys.readouterr().err
    assert "csl train: warning: read " in err and "as a UniMatch config" in err
    run = tmp_path / "exp" / "pascal" / "csl" / "732"
    stored = yaml.safe_load((run / "config.yaml").read_text())
    assert stored["data"]["labeled_list"] == info["labeled_list"]
    assert stored["data"]["val_list"] == str(tmp_path / "splits" / "pascal" / "val.txt")  # stored resolved
    assert stored["model"]["stem"] == "deep" and stored["selection"]["mode"] == "csl"
    evaluations = [json.loads(line) for line in open(run / "metrics.jsonl") if '"eval"' in line]
    assert evaluations and (run / "latest.pt").is_file()


def test_resume_auto_into_a_unimatch_run_folder_is_refused_not_started_afresh(tmp_path):
    """UniMatch continues from the latest.pth in its --save-path; csl cannot continue that run, so --resume auto into
    such a folder is an error naming the file and train.init_from, not a new run from ImageNet weights beside it."""
    from csl.run_folder import RunFolderError, claim_run_folder

    folder = tmp_path / "exp" / "pascal" / "unimatch" / "r101" / "732"
    folder.mkdir(parents=True)
    written(folder / "latest.pth", "UniMatch's checkpoint")
    with pytest.raises(RunFolderError, match=r"holds UniMatch's latest\.pth, not a csl run .*train\.init_from="
                                             + str(folder / "latest.pth").replace(".", r"\.")):
        claim_run_folder(str(folder), resuming=False, resume_auto=True, overwrite=False)
    assert sorted(os.listdir(folder)) == ["latest.pth"]  # the lock released, nothing written
    claim_run_folder(str(tmp_path / "empty"), resuming=False, resume_auto=True, overwrite=False).release()


def test_a_flag_and_the_key_it_sets_are_not_both_given(tmp_path, capsys):
    assert main(["train", "--config", "demo", "--save-path", str(tmp_path / "a"), f"output_dir={tmp_path / 'b'}",
                 "--print-config"]) == 2
    assert "--save-path and output_dir= are both given; pass one" in capsys.readouterr().err
    assert main(["train", "--config", "demo", "--save-path", str(tmp_path / "a"), "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["output_dir"] == str(tmp_path / "a")


def test_the_launchers_local_rank_is_taken_off_and_checked(monkeypatch, capsys):
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert take_local_rank(["--local-rank=1", "train", "--config", "demo"]) == ["train", "--config", "demo"]
    assert take_local_rank(["train", "--local_rank", "1", "--config", "demo"]) == ["train", "--config", "demo"]
    with pytest.raises(ConfigError, match="--local-rank 0 disagrees with the environment's LOCAL_RANK 1"):
        take_local_rank(["--local-rank=0", "train"])
    with pytest.raises(ConfigError, match="--local_rank 2 disagrees with the environment's LOCAL_RANK 1"):
        take_local_rank(["--local_rank", "2", "train"])
    assert main(["--local_rank=x", "train", "--config", "demo"]) == 2
    assert "--local_rank takes a process's local rank (an integer >= 0), got 'x'" in capsys.readouterr().err
    monkeypatch.delenv("LOCAL_RANK")
    take_local_rank(["--local-rank=3"])
    assert os.environ["LOCAL_RANK"] == "3"


def test_port_is_used_where_the_launcher_set_none(monkeypatch):
    monkeypatch.delenv("MASTER_PORT", raising=False)
    use_port(29500)
    assert os.environ["MASTER_PORT"] == "29500"
    monkeypatch.setenv("MASTER_PORT", "1234")
    with pytest.warns(UserWarning, match="--port 29500 is not used: the launcher's MASTER_PORT 1234 is"):
        use_port(29500)
    assert os.environ["MASTER_PORT"] == "1234"
    monkeypatch.setenv("RANK", "1")  # the job's other processes do not repeat it
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        use_port(29500)
    assert [str(w.message) for w in seen] == [] and os.environ["MASTER_PORT"] == "1234"
    with pytest.raises(ConfigError, match=r"--port must be in \[1, 65535\], got 70000"):
        use_port(70000)
