"""csl.config: YAML loading, dotted overrides with type parsing, validation errors, bundled configs."""

from __future__ import annotations

import datetime

import pytest
from conftest import ROOT, written

from csl.config import (
    CHOICES,
    DEFAULTS,
    ConfigError,
    build_config,
    get_dotted,
    load_config,
    load_yaml,
    parse_override,
    parse_value,
    validate,
)

BUNDLED = ("demo", "voc_321", "voc_513", "cityscapes_801", "coco")


@pytest.mark.parametrize("name", BUNDLED)
def test_bundled_configs_load(name):
    cfg = load_config(name)
    assert set(cfg) == set(DEFAULTS)
    assert cfg["train"]["lambda_s"] == 0.25 and cfg["train"]["lambda_m"] == 0.25 and cfg["train"]["lambda_fp"] == 0.5
    assert cfg["train"]["momentum"] == 0.9 and cfg["train"]["weight_decay"] == 1e-4
    assert cfg["selection"]["mode"] == "csl"


def test_bundled_config_specifics():
    assert load_config("voc_321")["data"]["crop_size"] == 321
    assert load_config("voc_513")["data"]["crop_size"] == 513
    city = load_config("cityscapes_801")
    assert city["data"]["crop_size"] == 801 and city["train"]["criterion"] == "ohem"
    assert city["train"]["ohem_thresh"] == 0.7 and city["train"]["ohem_min_kept"] == 200000
    assert city["eval"]["mode"] == "sliding_window"
    coco = load_config("coco")
    assert coco["data"]["num_classes"] == 81 and coco["data"]["crop_size"] == 513
    assert coco["model"]["backbone"] == "xception" and coco["model"]["pretrained"] == "pretrained/xception.pth"
    assert coco["train"]["lr"] == 0.004 and coco["train"]["batch_size"] == 2 and coco["train"]["epochs"] == 30
    demo = load_config("demo")
    assert demo["model"]["backbone"] == "resnet18" and demo["model"]["pretrained"] is None
    assert demo["data"]["dataset"] == "synthetic"


@pytest.mark.parametrize("text, expected", [
    ("0.01", 0.01), ("1e-4", 1e-4), ("3", 3), ("true", True), ("null", None), ("[12, 24, 36]", [12, 24, 36]),
    ("resnet50", "resnet50"), ("'5'", "5"), ("nan", "nan"), ("-2E3", -2000.0), ("-.5e-2", -0.005),
])
def test_parse_value(text, expected):
    assert parse_value(text) == expected


def test_overrides_are_typed_and_applied():
    cfg = build_config({}, ["train.lr=1e-3", "train.epochs=5", "model.dilations=[12,24,36]", "tmp.enabled=false",
                            "model.pretrained=null", "data.synthetic.num_labeled=8", "seed=7", "train.lambda_m=1"])
    assert cfg["train"]["lr"] == 1e-3 and isinstance(cfg["train"]["lr"], float)
    assert cfg["train"]["epochs"] == 5
    assert cfg["model"]["dilations"] == [12, 24, 36]
    assert cfg["tmp"]["enabled"] is False
    assert cfg["data"]["synthetic"]["num_labeled"] == 8 and cfg["data"]["synthetic"]["num_val"] == 24
    assert cfg["seed"] == 7
    assert cfg["train"]["lambda_m"] == 1.0 and isinstance(cfg["train"]["lambda_m"], float)
    assert build_config({}, {"train.batch_size": 4})["train"]["batch_size"] == 4
    # a whole number written as a float (YAML reads 1e4 as one) is an int, with a default or without
    cfg = build_config({}, ["train.iters=1e4", "train.epochs=1e2", "data.num_classes=4.0"])
    assert (cfg["train"]["iters"], cfg["train"]["epochs"], cfg["data"]["num_classes"]) == (10000, 100, 4)
    assert all(isinstance(v, int) for v in (cfg["train"]["iters"], cfg["data"]["num_classes"]))


def test_yaml_file_and_overrides(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("train:\n  lr: 0.02\n  epochs: 3\nselection:\n  mode: threshold\n")
    cfg = load_config(str(path), ["train.epochs=4"])
    assert cfg["train"]["lr"] == 0.02 and cfg["train"]["epochs"] == 4
    assert cfg["selection"]["mode"] == "threshold"
    assert cfg["train"]["head_lr_mult"] == 10.0  # defaults fill the rest


@pytest.mark.parametrize("override, message", [
    ("train.lrr=0.1", "did you mean 'train.lr'"),
    ("nosuch.key=1", "unknown config key 'nosuch.key'"),
    ("train.lr", "key=value"),
    ("=3", "empty key"),
    ("train.epochs=abc", "train.epochs must be an integer"),
    ("train.epochs=2.5", "train.epochs must be an integer"),
    ("train.lr=fast", "train.lr must be a number"),
    ("tmp.enabled=3", "tmp.enabled must be true or false"),
    ("selection.mode=magic", "selection.mode must be one of"),
    ("train.criterion=focal", "train.criterion must be one of"),
    ("tmp.rate=1.5", "tmp.rate must be in [0, 1]"),
    ("train.lr=-1", "train.lr must be > 0"),
    ("model.dilations=[1,2]", "model.dilations must be three positive integers"),
    ("model.output_stride=4", "model.output_stride must be one of"),
    ("train=1", "train is a section"),
    ("data.num_classes=true", "data.num_classes must be int or null"),
    ("train.lr=[0.1", "cannot parse value"),
    ("train.momentum=1", "train.momentum must be in [0, 1) (SGD diverges from 1 on), got 1"),
    ("data.synthetic.num_labeled=0", "data.synthetic.num_labeled must be >= 1, got 0"),
    ("data.synthetic.num_unlabeled=0", "data.synthetic.num_unlabeled must be >= 1 with train.mode=semi, got 0"),
    ("data.synthetic.num_val=0", "data.synthetic.num_val must be >= 1, got 0"),
    ("data.synthetic.size=10", "data.synthetic.size must be >= 16, got 10"),
    ("data.synthetic.seed=-1", "data.synthetic.seed must be >= 0, got -1"),
    ("output_dir=''", "output_dir must name a folder, got an empty string"),
    ("seed=-1", "seed must be in [0, 2**63), got -1"),
    ("seed=18446744073709551615", "seed must be in [0, 2**63), got 18446744073709551615"),
    ("model.dilations=[true,12,18]", "model.dilations must be three positive integers"),
    ("data.mean=[true,0,0]", "data.mean must be 3 numbers"),
    # the data's own checks, before the run folder is touched
    ("data.std=[0,0,0]", "data.mean and data.std must be 3 values (std > 0)"),
    ("data.mean=[123.7,116.3,103.5]", "data.mean and data.std are for images scaled to [0, 1]"),
    ("data.num_classes=8", "synthetic data has 2 to 6 classes, got data.num_classes=8"),
    # a key in another section than its own: that key is the hint
    ("train.tau=0.9", "unknown config key 'train.tau'; did you mean 'selection.tau'?"),
    ("selection.block=16", "did you mean 'tmp.block'?"),
    ("train.seed=1", "did you mean 'seed' or 'data.synthetic.seed'?"),
    # YAML's comment would cut the value
    ("output_dir=runs/exp #3", "value 'runs/exp #3' holds ' #', which YAML reads as the start of a comment"),
])
def test_override_errors(override, message):
    with pytest.raises(ConfigError, match=_escape(message)):
        build_config({}, [override])


def _escape(text: str) -> str:
    import re

    return re.escape(text)


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(str(tmp_path / "missing.yaml"))
    with pytest.raises(ConfigError, match="is a folder; give a YAML file"):
        load_config(str(tmp_path))
    binary = tmp_path / "best.pt"
    binary.write_bytes(b"PK\x03\x04\x80\xff" * 20)
    with pytest.raises(ConfigError, match=r"best\.pt is not a YAML config \(not UTF-8 text\)"):
        load_config(str(binary))
    with pytest.raises(ConfigError, match="cannot parse"):
        load_config(written(tmp_path / "bad.yaml", "train: [1, 2\n"))
    with pytest.raises(ConfigError, match="mapping at the top level"):
        load_config(written(tmp_path / "list.yaml", "- 1\n- 2\n"))
    with pytest.raises(ConfigError, match=r"unknown config key 'train.epoch'; did you mean 'train.epochs'.*unknown"):
        load_config(written(tmp_path / "unknown.yaml", "train:\n  epoch: 3\n"))
    with pytest.raises(ConfigError, match="model must be a section"):
        load_config(written(tmp_path / "section.yaml", "model: resnet50\n"))
    # A second section of the same name would silently drop every key of the first.
    twice = written(tmp_path / "twice.yaml",
                    "train:\n  iters: 5\n  lr: 0.01\nmodel:\n  backbone: resnet18\ntrain:\n  lr: 0.002\n")
    with pytest.raises(ConfigError, match=r"while constructing a mapping; found the key 'train' twice "
                       r"\(line 6, column 1\)") as e:
        load_config(twice)
    assert "\n" not in str(e.value)  # PyYAML's own text spans four lines
    with pytest.raises(ConfigError, match="found the key 'lr' twice"):
        load_config(written(tmp_path / "nested.yaml", "train:\n  lr: 0.01\n  lr: 0.02\n"))
    # A merge key is not a duplicate, and the keys written beside it override the merged ones.
    raw = load_yaml(written(tmp_path / "merged.yaml",
                            "base: &base\n  lr: 0.01\n  iters: 7\ntrain:\n  <<: *base\n  lr: 0.02\n"))
    assert raw["train"] == {"lr": 0.02, "iters": 7}


def test_parse_override_splits_on_first_equals():
    assert parse_override("data.root=/a=b") == ("data.root", "/a=b")


def test_data_split_stays_a_string_and_can_be_unset(tmp_path):
    """``1_8`` is the split's name, not YAML's integer 18; ``null`` unsets a config's split so that
    ``data.split_dir`` can name a folder instead."""
    assert parse_override("data.split=1_8") == ("data.split", "1_8")
    assert parse_override('data.split="1_4"') == ("data.split", "1_4")
    for unset in ("null", "~", "", "None"):
        assert parse_override(f"data.split={unset}") == ("data.split", None)
    cfg = load_config("camvid", ["data.split=null", f"data.split_dir={tmp_path}"])
    assert cfg["data"]["split"] is None and cfg["data"]["split_dir"] == str(tmp_path)


def test_kernels_backend_and_the_old_selection_backend_key(tmp_path):
    """``kernels.backend`` drives every kernel; the old ``selection.backend`` still loads (file, override, stored
    checkpoint config) with a FutureWarning, as ``kernels.backend``."""
    assert build_config({})["kernels"]["backend"] == "auto" and "backend" not in build_config({})["selection"]
    assert build_config({}, ["kernels.backend=reference"])["kernels"]["backend"] == "reference"
    with pytest.raises(ConfigError, match="kernels.backend must be one of"):
        build_config({}, ["kernels.backend=bogus"])
    path = tmp_path / "old.yaml"
    path.write_text("selection:\n  mode: threshold\n  backend: cpu\n")
    with pytest.warns(FutureWarning, match="selection.backend"):
        cfg = load_config(str(path))
    assert cfg["kernels"]["backend"] == "cpu" and cfg["selection"] == build_config({}, ["selection.mode=threshold"])[
        "selection"]
    with pytest.warns(FutureWarning, match="selection.backend"):
        assert build_config({}, ["selection.backend=triton"])["kernels"]["backend"] == "triton"
    stored = build_config({})
    stored["selection"]["backend"] = "reference"
    del stored["kernels"]
    with pytest.warns(FutureWarning):
        assert validate(stored)["kernels"]["backend"] == "reference"
    with pytest.warns(FutureWarning), pytest.raises(ConfigError, match="set kernels.backend only"):
        build_config({"selection": {"backend": "cpu"}, "kernels": {"backend": "triton"}})


@pytest.mark.parametrize(("overrides", "message"), [
    # paths with the default dataset: the synthetic scenes would be trained on, the user's files never read
    (["data.root=/data/VOC2012", "data.split=1464"], "data.root, data.split set but data.dataset is synthetic"),
    (["data.val_list=/data/val.txt"], "data.val_list set but data.dataset is synthetic"),
    # what applies to files read from disk, set for generated scenes
    (["data.image_scale=0.5", "data.reduce_zero_label=true"],
     "data.image_scale=0.5, data.reduce_zero_label=True set but data.dataset is synthetic"),
    (["data.ignore_labels=[11]"], r"data.ignore_labels=\[11\] set but data.dataset is synthetic"),
    (["train.resume=auto", "train.overwrite=true"], "train.resume=auto and train.overwrite=true exclude each other"),
    (["data.scale_range=[a,b]"], "data.scale_range must be"),
])
def test_contradictory_settings_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        build_config({}, overrides)


def test_an_unquoted_split_name_in_yaml_is_explained(tmp_path):
    """YAML 1.1 reads split: 1_8 as the integer 18; the missing split's error says how to write it."""
    from csl.data import named_split_dir

    (tmp_path / "c.yaml").write_text("data:\n  dataset: camvid\n  split: 1_8\n")
    cfg = load_config(str(tmp_path / "c.yaml"))
    assert cfg["data"]["split"] == 18
    with pytest.raises(FileNotFoundError, match='write split: "1_8"'):
        named_split_dir("camvid", cfg["data"]["split"])


def test_a_supervised_batch_of_one_is_refused(tmp_path):
    from csl.trainer import Trainer

    cfg = build_config({}, ["device=cpu", "train.mode=supervised", "train.batch_size=1", f"output_dir={tmp_path}"])
    with pytest.raises(ConfigError, match="needs >= 2 images per forward pass"):
        Trainer(cfg)
    assert not any(tmp_path.iterdir())  # refused before the run folder was written


def test_a_key_given_twice_and_where_an_error_comes_from(tmp_path):
    with pytest.warns(UserWarning, match=r"train.lr is given twice \(0.1, then 0.2\); the last one is used"):
        assert build_config({}, ["train.lr=0.1", "train.lr=0.2"])["train"]["lr"] == 0.2
    path = tmp_path / "mine.yaml"
    path.write_text("train:\n  lr: 0.01\n")
    with pytest.raises(ConfigError) as err:  # the command line's mistake is not blamed on the file
        load_config(str(path), ["train.lr=abc"])
    assert "mine.yaml" not in str(err.value) and "train.lr" in str(err.value)
    path.write_text("train:\n  lr: abc\n")
    with pytest.raises(ConfigError, match=r"mine\.yaml"):
        load_config(str(path), ["train.iters=5"])
    # A base file that the overrides complete: their mistake is the error, not what the file alone lacks.
    path.write_text("data:\n  root: /data\n  split_dir: /data/splits\n")
    with pytest.raises(ConfigError) as err:
        load_config(str(path), ["data.dataset=folder", "data.num_classes=3", "train.epochs=abc"])
    assert "train.epochs must be an integer" in str(err.value) and "mine.yaml" not in str(err.value)
    # An old and a new name of one key on the command line: said as two settings of one key, the last one used.
    with pytest.warns(UserWarning, match=r"kernels.backend and selection.backend set one key \('reference', then "
                                         r"'cpu'\)"), pytest.warns(FutureWarning):
        assert build_config({}, ["kernels.backend=reference", "selection.backend=cpu"])["kernels"]["backend"] == "cpu"
    assert build_config({}, ["output_dir='runs/exp #3'"])["output_dir"] == "runs/exp #3"  # quoted: kept
    with pytest.raises(ConfigError, match="holds ' #'"):  # a '#' kept before the comment hides nothing
        build_config({}, ["output_dir=runs/a#1 #2"])


def test_demo_refuses_overrides_it_would_replace(tmp_path):
    from csl.demo import run_demo

    for item, hint in (("selection.mode=csl_class", "--methods"), ("output_dir=x", "--out"),
                       ("train.resume=auto", "--fresh")):
        with pytest.raises(ValueError, match=rf"csl demo sets {item.split('=')[0]} itself.*{hint}"):
            run_demo(str(tmp_path), overrides=[item])



def test_supervised_synthetic_runs_need_no_unlabeled_scenes():
    cfg = build_config({}, ["train.mode=supervised", "data.synthetic.num_unlabeled=0", "train.momentum=0"])
    assert cfg["data"]["synthetic"]["num_unlabeled"] == 0 and cfg["train"]["momentum"] == 0


def test_exponents_without_a_dot_are_numbers_in_files_and_lists(tmp_path):
    """YAML 1.1 reads 1e-3 as a string: a config file (and a list in an override) means the number."""
    path = tmp_path / "exp.yaml"
    path.write_text("train: {lr: 1e-3, weight_decay: 1E-4}\ndata: {mean: [0.5, 0.5, 5e-1]}\nmodel: {backbone: '1e3'}\n")
    raw = load_yaml(str(path))
    assert raw["train"] == {"lr": 1e-3, "weight_decay": 1e-4} and raw["data"]["mean"] == [0.5, 0.5, 0.5]
    assert raw["model"]["backbone"] == "1e3"  # quoted: a string
    cfg = build_config({}, ["data.scale_range=[1,1e1]", "train.lr=2e-3"])
    assert cfg["data"]["scale_range"] == [1, 10.0] and cfg["train"]["lr"] == 2e-3


@pytest.mark.parametrize("text", ["", "# only a comment\n"])
def test_an_empty_config_file_is_refused(tmp_path, text):
    from csl.config import ConfigError

    path = tmp_path / "empty.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=f"{path} holds no settings"):
        load_config(str(path))


def test_a_section_with_every_key_commented_out_keeps_its_defaults(tmp_path):
    """``train:`` with each line under it commented out is YAML's null; it reads as the empty section it looks
    like, at the top level and inside a section; a section given a value is still refused."""
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  dataset: synthetic\n  synthetic:\n    # size: 64\ntrain:\n  # lr: 0.1\n"
                    "model:\neval:\n")
    cfg = load_config(str(path))
    assert cfg == build_config({"data": {"dataset": "synthetic"}})
    path.write_text("data:\n  dataset: synthetic\nmodel: 3\n")
    with pytest.raises(ConfigError, match="model must be a section"):
        load_config(str(path))


@pytest.mark.parametrize("override, message", [
    ("train.lambda_s=-0.25", "train.lambda_s must be >= 0"),
    ("train.lambda_m=-1", "train.lambda_m must be >= 0"),
    ("train.lambda_fp=-0.5", "train.lambda_fp must be >= 0"),
    ("train.poly_power=0", "train.poly_power must be > 0"),
    ("train.poly_power=-0.9", "train.poly_power must be > 0"),
    ("train.head_lr_mult=0", "train.head_lr_mult must be > 0"),
    ("train.cutmix_p=1.5", "train.cutmix_p must be in [0, 1]"),
    ("selection.tau=1.5", "selection.tau must be in [0, 1]"),
    ("selection.alpha=0", "selection.alpha must be > 0"),
    ("tmp.fraction=2", "tmp.fraction must be in [0, 1]"),
    ("tmp.block=0", "tmp.block must be >= 1"),
    ("eval.crop_size=4", "eval.crop_size must be >= 8"),
    ("eval.stride_ratio=1.5", "eval.stride_ratio must be in (0, 1]"),
    ("train.weight_decay=-1e-4", "train.weight_decay must be >= 0"),
])
def test_training_numbers_out_of_range_are_refused(override, message):
    """The loss weights, the schedule and the selection / TMP / evaluation numbers are checked when the config is
    read: a negative lambda or poly power would train (ascend the unlabeled loss, grow the rate) without an error."""
    with pytest.raises(ConfigError, match=_escape(message)):
        build_config({}, [override])


@pytest.mark.parametrize("overrides", [
    [],
    ["output_dir='1e3'"],  # strings that this loader (not PyYAML's own) reads as numbers
    ["data.dataset=camvid", "data.split=1e2", "data.root='5e-1'", "model.pretrained='-2E3'"],
    ["data.dataset=camvid", "data.split=1_8", "output_dir='runs/a #1'", "train.lr=2e-3", "eval.stride_ratio=0.5"],
])
def test_a_written_config_reads_back_as_it_was(tmp_path, overrides):
    """A run folder's config.yaml (dump_config) and ``--print-config``'s text (config_yaml) load as the config they
    hold: a string the loader would read as a number is quoted, and the keys keep their order."""
    from csl.config import config_yaml, dump_config

    cfg = build_config({}, overrides)
    path = tmp_path / "config.yaml"
    dump_config(cfg, str(path), header="# a run's config\n")
    text = path.read_text()
    assert text == "# a run's config\n" + config_yaml(cfg)
    assert load_config(str(path)) == cfg
    assert [line.split(":")[0] for line in text.splitlines() if line[:1].isalpha()] == list(DEFAULTS)


def test_out_of_range_numbers_are_config_errors():
    """Numbers that the run would fail on later (float() of a 400-digit integer, a process-group timeout that
    datetime.timedelta cannot hold) are refused when the config is read."""
    with pytest.raises(ConfigError, match="train.lr must be a finite number, got an integer of 400 digits"):
        build_config({}, ["train.lr=" + "9" * 400])
    assert build_config({}, ["train.weight_decay=" + "1" + "0" * 300])["train"]["weight_decay"] == 1e300
    longest = build_config({}, ["dist_timeout_min=1439999999999"])["dist_timeout_min"]
    assert datetime.timedelta(minutes=longest) == datetime.timedelta.max - datetime.timedelta(seconds=59.999999)
    with pytest.raises(OverflowError):
        datetime.timedelta(minutes=longest + 1)
    for value in ("1440000000000", "1e20", "0"):
        with pytest.raises(ConfigError, match=r"dist_timeout_min must be in \[1, 1439999999999\] \(minutes\)"):
            build_config({}, [f"dist_timeout_min={value}"])


def _readme() -> str:
    return (ROOT / "README.md").read_text()


def test_the_readme_defaults_are_the_code_defaults():
    """README's key / default table, and the numbers its rows and the training-step paragraph give in words, are
    :data:`DEFAULTS`; a default shown as depending on something ("dataset's", "the rule's", "per dataset", blank) is
    None in the code."""
    import re

    text = _readme()
    table = text[text.index("| key | default | meaning |"):]
    table = table[:table.index("\n\n")]
    documented = {}
    for row in table.splitlines()[2:]:
        keys_cell, default_cell, meaning = (cell.strip() for cell in re.split(r"(?<!\\)\|", row)[1:-1])
        keys = re.findall(r"`([^`]+)`", keys_cell)
        values = [v.strip().strip("`") for v in default_cell.split(",")] if default_cell else [""] * len(keys)
        assert len(values) == len(keys), row
        documented.update(zip(keys, values, strict=True))
        section = keys[0].split(".")[0]
        for key, value in re.findall(r"`([\w.]+)` \(?([0-9][0-9.e-]*)", meaning):  # "(`selection.tau` 0.95)"
            documented[key if "." in key else f"{section}.{key}"] = value
    words = re.search(r"SGD \(momentum (\S+), wd (\S+)\), poly (\S+);", text)
    documented.update(zip(("train.momentum", "train.weight_decay", "train.poly_power"), words.groups(), strict=True))
    documented["tmp.fraction"] = re.search(r"`tmp\.fraction` \(([^)]+)\)", text).group(1)
    documented["eval.stride_ratio"] = re.search(r"window = crop, stride (\d+)/(\d+)\)", text).groups()
    assert len(documented) >= 30
    for key, value in documented.items():
        if key == "eval.stride_ratio":
            expected = int(value[0]) / int(value[1])
        elif value in ("", "dataset's", "the rule's", "per dataset"):
            expected = None
        else:
            expected = parse_value(value)
        assert get_dotted(DEFAULTS, key) == expected, key


def test_the_defaults_are_those_of_the_code_that_reads_them():
    """Where the code that a key drives has a default of its own (the kernels' API, the OHEM loss, the synthetic
    scenes' generator, the process group), the config's default is that one: a config and a direct call compute the
    same."""
    import inspect

    import csl_kernels
    from csl.data import SYNTHETIC_DEFAULTS
    from csl.distributed import init_distributed
    from csl.losses import OhemCrossEntropy

    def default(function, name):
        return inspect.signature(function).parameters[name].default

    sel, tmp, train = DEFAULTS["selection"], DEFAULTS["tmp"], DEFAULTS["train"]
    assert (sel["alpha"], sel["rule"]) == (default(csl_kernels.pcos_weights, "alpha"),
                                           default(csl_kernels.pcos_weights, "rule"))
    assert sel["tau"] == default(csl_kernels.threshold_weights, "tau")
    assert (tmp["block"], tmp["rate"]) == (default(csl_kernels.trusted_mask, "block"),
                                           default(csl_kernels.trusted_mask, "rate"))
    assert (train["ohem_thresh"], train["ohem_min_kept"]) == (default(OhemCrossEntropy, "thresh"),
                                                              default(OhemCrossEntropy, "min_kept"))
    assert DEFAULTS["data"]["ignore_index"] == csl_kernels.IGNORE_INDEX
    assert DEFAULTS["data"]["synthetic"] == SYNTHETIC_DEFAULTS
    assert DEFAULTS["dist_timeout_min"] == default(init_distributed, "timeout_min")


def test_the_defaults_not_in_the_voc_config_are_unimatchs():
    """voc_321 ("UniMatch's protocol") leaves these keys to the defaults, which must be UniMatch's recipe
    (configs/pascal.yaml and unimatch.py): scale jitter 0.5-2.0, CutMix with p 0.5, SGD momentum 0.9 and weight
    decay 1e-4, poly 0.9, one evaluation per epoch in float32 (sliding windows at a stride of 2/3 of the crop); the
    model and schedule defaults are its DeepLabV3+ ResNet-101 at output stride 16 (ASPP 6, 12, 18), crop 321, 80
    epochs."""
    cfg = load_config("voc_321")
    d, t, e = cfg["data"], cfg["train"], cfg["eval"]
    assert d["scale_range"] == [0.5, 2.0] and t["cutmix_p"] == 0.5
    assert (t["momentum"], t["weight_decay"], t["poly_power"]) == (0.9, 1e-4, 0.9)
    assert (e["every_epochs"], e["amp"], e["stride_ratio"]) == (1, "fp32", 2 / 3)
    defaults = build_config({})
    assert (defaults["model"]["backbone"], defaults["model"]["output_stride"]) == ("resnet101", 16)
    assert defaults["model"]["dilations"] == [6, 12, 18]
    assert (defaults["data"]["crop_size"], defaults["train"]["epochs"]) == (321, 80)
    # what a plain run does: reads every mask first, shows progress, seed 0, the mode of the paper
    assert defaults["data"]["check_labels"] is True and defaults["train"]["progress"] is True
    assert defaults["seed"] == 0 and defaults["train"]["mode"] == "semi" and defaults["selection"]["mode"] == "csl"


FILES = ["data.dataset=camvid"]  # what applies to files read from disk (refused with the synthetic scenes)


@pytest.mark.parametrize("overrides, message", [
    (["data.crop_size=7"], "data.crop_size must be >= 8, got 7"),
    ([*FILES, "data.num_classes=1"], "data.num_classes must be in [2, 255]"),
    ([*FILES, "data.num_classes=256"], "data.num_classes must be in [2, 255]"),
    ([*FILES, "data.image_scale=0"], "data.image_scale must be in (0, 4], got 0.0"),
    ([*FILES, "data.image_scale=4.5"], "data.image_scale must be in (0, 4], got 4.5"),
    ([*FILES, "data.ignore_labels=[11,-1]"], "data.ignore_labels must be a list of label values >= 0"),
    ([*FILES, "data.ignore_labels=[true]"], "data.ignore_labels must be a list of label values >= 0"),
    (["data.num_workers=-1"], "data.num_workers must be >= 0, got -1"),
    (["data.scale_range=[0.5,1,2]"], "data.scale_range must be [lo, hi] with 0 < lo <= hi"),
    (["data.scale_range=[0,1]"], "data.scale_range must be [lo, hi] with 0 < lo <= hi"),
    (["data.scale_range=[2,1]"], "data.scale_range must be [lo, hi] with 0 < lo <= hi"),
    (["data.scale_range=[0.5,.inf]"], "data.scale_range[1] must be a finite number, got inf"),
    (["train.lr=.nan"], "train.lr must be a finite number, got nan"),
    ([*FILES, "data.mean=[0.5,0.5,0.5,0.5]"], "data.mean must be 3 numbers"),
    (["model.dilations=[0,12,18]"], "model.dilations must be three positive integers"),
    (["model.stem=deep", "model.backbone=resnet18"], "model.stem=deep (UniMatch's ResNet) exists for resnet50 / "
                                                      "resnet101, not resnet18"),
    (["model.stem=deep", "model.backbone=xception"], "model.stem=deep (UniMatch's ResNet) exists for resnet50 / "
                                                      "resnet101, not xception"),
    (["model.backbone=xception", "model.output_stride=32"], "model.backbone=xception has output_stride 16 or 8 "
                                                            "(UniMatch's Xception-65), not 32"),
    (["train.epochs=0"], "train.epochs must be >= 1, got 0"),
    (["train.iters=0"], "train.iters must be >= 1 or null, got 0"),
    (["train.iters_per_epoch=0"], "train.iters_per_epoch must be >= 1 or null, got 0"),
    (["train.batch_size=0"], "train.batch_size must be >= 1, got 0"),
    (["train.ohem_min_kept=-1"], "train.ohem_min_kept must be >= 0, got -1"),
    (["train.ohem_thresh=1.5"], "train.ohem_thresh must be in [0, 1], got 1.5"),
    (["train.log_every=0"], "train.log_every must be >= 1, got 0"),
    (["train.ckpt_every=-1"], "train.ckpt_every must be >= 0, got -1"),
    (["train.resume=runs/x/latest.pt", "train.overwrite=true"], "train.resume=runs/x/latest.pt and "
                                                                "train.overwrite=true exclude each other"),
    (["selection.tau=-0.1"], "selection.tau must be in [0, 1], got -0.1"),
    (["tmp.rate=-0.1"], "tmp.rate must be in [0, 1], got -0.1"),
    (["eval.stride_ratio=0"], "eval.stride_ratio must be in (0, 1], got 0.0"),
    (["eval.every_epochs=0"], "eval.every_epochs must be >= 1, got 0"),
    (["eval.batch_size=0"], "eval.batch_size must be >= 1, got 0"),
    (["seed=9223372036854775808"], "seed must be in [0, 2**63), got 9223372036854775808"),
    (["output_dir=' '"], "output_dir must name a folder, got an empty string"),
    (["data.ignore_index=0"], "data.ignore_index=0 set but data.dataset is synthetic"),
    # types: a bool is not a number, nor a number a string or a list
    (["train.lr=true"], "train.lr must be a number, got True (bool)"),
    (["train.epochs=true"], "train.epochs must be an integer, got True (bool)"),
    (["output_dir=3"], "output_dir must be a string, got 3 (int)"),
    (["model.dilations=5"], "model.dilations must be a list, got 5 (int)"),
    # keys
    (["train..lr=1"], "override 'train..lr=1' has an empty key"),
])
def test_each_range_and_type_check(overrides, message):
    with pytest.raises(ConfigError, match=_escape(message)):
        build_config({}, overrides)


@pytest.mark.parametrize("overrides", [
    ["data.crop_size=8"], ["data.num_workers=0"], ["data.scale_range=[1,1]"], ["train.ckpt_every=0"],
    [*FILES, "data.num_classes=255"], [*FILES, "data.num_classes=2"], [*FILES, "data.image_scale=4"],
    [*FILES, "data.ignore_labels=[0]"], ["model.stem=deep", "model.backbone=resnet50"],
    ["train.ohem_min_kept=0"], ["train.ohem_thresh=1"], ["train.cutmix_p=0"], ["selection.tau=0"],
    ["selection.tau=1"], ["tmp.rate=0"], ["tmp.fraction=1"], ["eval.stride_ratio=1"], ["eval.crop_size=8"],
    ["seed=9223372036854775807"], ["dist_timeout_min=1"], ["train.resume=auto", "train.overwrite=false"],
    ["train.weight_decay=0", "train.lambda_s=0", "train.lambda_m=0", "train.lambda_fp=0"],
])
def test_the_ends_of_each_range_are_accepted(overrides):
    cfg = build_config({}, overrides)
    for key, value in (parse_override(o) for o in overrides):
        assert get_dotted(cfg, key) == value


@pytest.mark.parametrize("key", sorted(CHOICES))
def test_every_choice_key_refuses_a_value_outside_its_choices(key):
    bogus = 12 if isinstance(CHOICES[key][0], int) else "bogus"
    with pytest.raises(ConfigError, match=_escape(f"{key} must be one of {list(CHOICES[key])}, got {bogus!r}")):
        build_config({}, {key: bogus})


def test_every_optional_key_names_its_types():
    """A key whose default is None takes the types listed for it; without an entry it would take any scalar."""
    from csl.config import _OPTIONAL_TYPES

    optional = {k for k in _walk(DEFAULTS) if get_dotted(DEFAULTS, k) is None}
    assert optional == set(_OPTIONAL_TYPES)


def _walk(tree: dict, prefix: str = "") -> list[str]:
    return [key for k, v in tree.items() for key in (_walk(v, f"{prefix}{k}.") if isinstance(v, dict)
                                                      else [prefix + k])]


def test_python_values_and_sections_as_overrides(tmp_path):
    """Overrides given as a dict (the Python API) take tuples for lists and return lists; a section given as a
    mapping changes only the keys it names; what build_config returns shares no list with DEFAULTS or its input."""
    cfg = build_config({}, {"model.dilations": (12, 24, 36), "data.dataset": "camvid", "data.mean": (0.5, 0.4, 0.3)})
    assert cfg["model"]["dilations"] == [12, 24, 36] and isinstance(cfg["model"]["dilations"], list)
    assert cfg["data"]["mean"] == [0.5, 0.4, 0.3] and isinstance(cfg["data"]["mean"], list)
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  synthetic: {size: 64, num_val: 4}\n")
    cfg = load_config(str(path), ["data.synthetic={num_labeled: 4}"])
    assert cfg["data"]["synthetic"] == {**DEFAULTS["data"]["synthetic"], "size": 64, "num_val": 4, "num_labeled": 4}
    filled = validate({})
    filled["model"]["dilations"].append(1)
    filled["data"]["scale_range"][0] = 0.1
    assert DEFAULTS["model"]["dilations"] == [6, 12, 18] and DEFAULTS["data"]["scale_range"] == [0.5, 2.0]
    raw = {"model": {"dilations": [12, 24, 36]}}
    build_config(raw)["model"]["dilations"].append(1)
    assert raw == {"model": {"dilations": [12, 24, 36]}}


def test_file_structure_errors_are_config_errors(tmp_path):
    """Keys that are not strings, a mapping where a value belongs, a key YAML cannot hash, a top level that is not
    a mapping: each a ConfigError that names the place."""
    path = tmp_path / "c.yaml"
    for text, message in (("train:\n  1: 2\n", "config keys must be strings, got 1 in train"),
                          ("train:\n  lr: {a: 1}\n", "train.lr must be a value, not a section"),
                          ("train:\n  ? [1, 2]\n  : 3\n", "cannot parse")):
        path.write_text(text)
        with pytest.raises(ConfigError, match=_escape(message)):
            load_config(str(path))
    with pytest.raises(ConfigError, match="a config must be a mapping at the top level, got list"):
        validate([])


def test_override_spelling_the_command_line_allows():
    """Spaces around the key are dropped; a key given twice with the same value, or under its old and new names
    with one value, is no contradiction (no UserWarning, no error)."""
    import warnings

    assert build_config({}, [" train.lr = 0.1"])["train"]["lr"] == 0.1
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        assert build_config({}, ["train.lr=0.1", "train.lr=0.1"])["train"]["lr"] == 0.1
        with pytest.warns(FutureWarning):
            cfg = build_config({"selection": {"backend": "cpu"}, "kernels": {"backend": "cpu"}})
    assert cfg["kernels"]["backend"] == "cpu"


def test_old_key_names_warn_at_the_callers_line():
    """data.check_val_labels is read as data.check_labels; the FutureWarning of an old key points at the line that
    called build_config (the user's script), not into csl."""
    with pytest.warns(FutureWarning, match="'data.check_val_labels' is deprecated") as caught:
        assert build_config({}, ["data.check_val_labels=false"])["data"]["check_labels"] is False
    assert caught[0].filename == __file__
    with pytest.warns(FutureWarning) as caught:
        build_config({"selection": {"backend": "cpu"}})
    assert caught[0].filename == __file__


def test_a_bundled_name_with_a_dot_folder(tmp_path, monkeypatch):
    """``./demo`` is the bundled demo when the current folder has no file of that name, and the file when it has."""
    monkeypatch.chdir(tmp_path)
    assert load_config("./demo") == load_config("demo")
    (tmp_path / "demo").write_text("train:\n  iters: 3\n  lr: 0.5\n")
    assert load_config("./demo")["train"]["lr"] == 0.5
