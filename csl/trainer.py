"""The CSL trainer: the training loop around :func:`csl.step.train_step`, evaluation and checkpoints.

:class:`Trainer` wires data, model, optimizer, schedule, logging, evaluation, checkpoints and DDP around the step.
``Trainer(cfg).train()`` (or :func:`train`) is what ``csl train`` runs.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import random
import time

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from csl_kernels import IGNORE_INDEX, metrics_from_counts, unavailable_reason
from csl_kernels._backends import requested

from . import stop
from .checkpoint import (
    BEST,
    FORMAT_VERSION,
    LATEST,
    atomic_save,
    capture_rng,
    checkpoint_iteration,
    checkpoint_weights,
    load_checkpoint,
    load_weights,
    restore_rng,
)
from .config import DEFAULTS, ConfigError, dotted_leaves, dump_config
from .distributed import (
    DistEnv,
    ResumableDistributedSampler,
    SeededDataset,
    adopted_srun_launch,
    all_gather_objects,
    all_reduce_sum,
    barrier,
    broadcast_buffers,
    init_distributed,
    prepare_model,
    sample_seed,
)
from .logging_utils import (
    MetricsWriter,
    held_records,
    log_to_files,
    one_line,
    progress_bar,
    prune_metrics,
    setup_logging,
)
from .losses import build_labeled_criterion
from .run_folder import RUN_CONFIG_HEADER, claim_run_folder, put_back_replaced_run
from .selection import build_selector, unused_selection_settings
from .step import StepConfig, resolve_amp, supervised_step, train_step

log = logging.getLogger("csl")

LOSS_KEYS = ("loss", "loss_x", "loss_s", "loss_m", "loss_fp")


# ---------------------------------------------------------------------------------------------------------------
# Building blocks of the loop.


def build_optimizer(model: nn.Module, train_cfg: dict) -> torch.optim.SGD:
    """SGD with momentum and weight decay; the decoder at ``lr * head_lr_mult``."""
    groups = model.param_groups(train_cfg["lr"], train_cfg["head_lr_mult"])
    return torch.optim.SGD(groups, lr=train_cfg["lr"], momentum=train_cfg["momentum"],
                           weight_decay=train_cfg["weight_decay"])


def build_scheduler(optimizer: torch.optim.Optimizer, total_iters: int, power: float = 0.9):
    """Poly decay ``lr_i = lr_0 * (1 - i / total) ** power`` for every group (stepped once per iteration)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: max(1.0 - i / total_iters, 0.0) ** power)


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def epoch_length(num_images: int, batch_size: int, world_size: int) -> int:
    """Iterations in an epoch as UniMatch counts them (``len(trainloader_u)``): each process's
    ``DistributedSampler`` takes ``ceil(num_images / world_size)`` images (repeating some to fill the last share)
    and its loader drops the last incomplete batch of ``batch_size``; at least 1."""
    return max(-(-num_images // world_size) // batch_size, 1)


def make_train_loader(dataset, sampler: ResumableDistributedSampler, batch_size: int, num_workers: int,
                      device: torch.device, seed: int) -> DataLoader:
    from .data import seed_worker, worker_init

    # Its own generator: creating an iterator never draws from torch's global generator (that would shift dropout
    # and make a resumed run diverge).
    return DataLoader(SeededDataset(dataset), batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                      pin_memory=device.type == "cuda", drop_last=True, persistent_workers=num_workers > 0,
                      worker_init_fn=worker_init(seed_worker), generator=torch.Generator().manual_seed(seed))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Accumulator:
    """Sums of step outputs kept as device tensors (read once per log interval / epoch, never per step)."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0

    def add(self, values: dict[str, torch.Tensor]) -> None:
        for k, v in values.items():
            v = v.double() if v.is_floating_point() else v
            self.sums[k] = self.sums[k] + v if k in self.sums else v.clone()
        self.count += 1

    def reset(self) -> None:
        self.sums, self.count = {}, 0

    def state_dict(self) -> dict:
        return {"sums": {k: v.cpu() for k, v in self.sums.items()}, "count": self.count}

    def load_state_dict(self, state: dict, device: torch.device) -> None:
        self.sums = {k: v.to(device) for k, v in state["sums"].items()}
        self.count = int(state["count"])


# ---------------------------------------------------------------------------------------------------------------
# The trainer.


# Keys a resume takes from the checkpoint (its optimizer, scheduler and scaler state), not from the config.
RESUMED_FROM_CHECKPOINT = ("lr", "head_lr_mult", "momentum", "weight_decay", "poly_power")


DATA_PATH_KEYS = ("root", "split_dir", "labeled_list", "unlabeled_list", "val_list")

# What the resumed steps train on and how, taken from the config given now (README): a value that differs from the
# checkpoint's is named in a warning. Whole sections (dotted prefixes) and train's loss keys; the keys that change no
# step (loader workers, the label check) aside.
TRAINING_SECTIONS = ("data.", "selection.", "tmp.")
TRAINING_TRAIN_KEYS = tuple(f"train.{k}" for k in ("mode", "criterion", "ohem_thresh", "ohem_min_kept", "lambda_s",
                                                   "lambda_m", "lambda_fp", "cutmix_p", "amp"))
NOT_TRAINING_SETTINGS = ("data.num_workers", "data.check_labels")


def resolve_data_paths(cfg: dict) -> dict:
    """A copy of ``cfg`` with its data paths absolute (what a run stores in its config.yaml and checkpoints)."""
    cfg = copy.deepcopy(cfg)
    for key in DATA_PATH_KEYS:
        if cfg["data"].get(key):
            cfg["data"][key] = os.path.abspath(cfg["data"][key])
    return cfg


class NonFiniteTrainingError(RuntimeError):
    """The loss or the weights became NaN / inf; nothing of that state was saved."""


# The kernels a training run calls with kernels.backend (selection, TMP, the unlabeled loss, evaluation).
TRAINING_OPS = ("pcos_weights", "residual_features", "trusted_mask", "weighted_cross_entropy", "confusion_matrix")


def check_kernels_backend(backend: str, device: torch.device, ops: tuple[str, ...] = TRAINING_OPS) -> None:
    """A backend named in ``kernels.backend`` must run every kernel of the command (``ops``) on ``device``: a
    ConfigError with the reason at the start, not a failure at the first step (``auto`` chooses per op and says so
    in the log)."""
    named = requested(backend)  # kernels.backend=auto: the one CSL_BACKEND names, if any
    if named == "auto":
        return
    setting = f"kernels.backend={backend}" if backend != "auto" else f"CSL_BACKEND={named}"
    for op in ops:
        reason = unavailable_reason(op, named, device)
        if reason is not None:
            raise ConfigError(f"{setting} cannot run on {device}: {reason} (kernels.backend=auto, with CSL_BACKEND "
                              f"unset, chooses a backend that can)")


def stored_config(cfg: dict) -> dict:
    """What a run writes to its ``config.yaml``: the run's configuration, without how this start of it was asked
    for (``train.resume``, ``train.overwrite``). Started again from that file, a run is not silently replaced; the
    checkpoints keep the whole configuration."""
    return {**cfg, "train": {**cfg["train"], "resume": None, "overwrite": False}}


def saved_device_type(ckpt: dict) -> str | None:
    """The device type a checkpoint's "step" generator state belongs to: its ``device_type``; for a checkpoint
    written before that key, told by the state's size (16 bytes for CUDA's Philox seed and offset, ~5 KB for the CPU's
    Mersenne Twister); None without one."""
    if "device_type" in ckpt:
        return ckpt["device_type"]
    rng = ckpt.get("rng") or []
    step = rng[0].get("generators", {}).get("step") if rng and isinstance(rng[0], dict) else None
    if not isinstance(step, torch.Tensor):
        return None
    return "cuda" if step.numel() == 16 else "cpu"


def check_start_files(cfg: dict, resume_from: str | None) -> None:
    """The files a start reads besides the data, and the data's root folder: a missing one is an error now, not after
    the data is built. ``cfg`` as given: a relative path is said as written and as read from the current folder."""
    from .data import as_given, check_data_root

    files = [("--resume / train.resume", resume_from)]
    if resume_from is None:  # a resume takes every weight from its checkpoint
        files.append(("train.init_from", cfg["train"]["init_from"]))
        if cfg["model"]["pretrained"] != "imagenet":
            files.append(("model.pretrained", cfg["model"]["pretrained"]))
        else:  # a backbone (or stem) torchvision has no weights of: said now, not once the data is built
            from .model.backbone import check_imagenet_available

            check_imagenet_available(cfg["model"]["backbone"], cfg["model"]["stem"])
    for key, path in files:
        if path and os.path.isdir(path):  # a run folder given for its checkpoint: there, but not a file
            which = "the weights file in it" if key == "model.pretrained" else "its latest.pt or best.pt"
            raise IsADirectoryError(f"{key}: {as_given(path)} is a folder; give {which}")
        if path and not os.path.isfile(path):
            source = ""
            if key == "model.pretrained":
                from .model.backbone import weights_source

                source = f"; {weights_source(cfg['model']['backbone'], cfg['model']['stem'])}"
            raise FileNotFoundError(f"{key}: file not found: {as_given(path)}{source}")
    if cfg["data"].get("dataset", "synthetic") != "synthetic" and cfg["data"].get("root"):
        check_data_root(cfg["data"]["root"])


def unused_training_settings(cfg: dict) -> list[tuple[str, str]]:
    """``(keys, why)`` for the keys set away from their defaults that this training does not read: the unlabeled
    losses, selection and TMP in supervised training, TMP's settings with TMP off, the OHEM settings with the plain
    CE criterion, ``train.epochs`` with ``train.iters`` set, the generated scenes' settings with a dataset of files."""
    t, s, m = cfg["train"], cfg["selection"], cfg["tmp"]

    def changed(section: str, keys) -> list[str]:
        return [f"{section}.{k}={cfg[section][k]}" for k in keys if cfg[section][k] != DEFAULTS[section][k]]

    found = []
    if t["mode"] == "supervised":
        # tmp.enabled=false agrees with a run that has no unlabeled data: not named
        tmp_keys = [k for k in m if k in DEFAULTS["tmp"] and not (k == "enabled" and not m[k])]
        keys = changed("train", ("lambda_s", "lambda_m", "lambda_fp", "cutmix_p")) + changed("selection", [
            k for k in s if k in DEFAULTS["selection"]]) + changed("tmp", tmp_keys)
        found.append((keys, "not used by train.mode=supervised (no unlabeled data)"))
    elif not m["enabled"]:
        # (tmp.other_view is used either way: it also decides whether the second strong view is CutMix-ed)
        found.append((changed("tmp", ("block", "rate", "fraction")), "not used with tmp.enabled=false"))
    if t["criterion"] == "ce":
        found.append((changed("train", ("ohem_thresh", "ohem_min_kept")), "not used by train.criterion=ce"))
    if t["iters"] is not None:
        found.append((changed("train", ("epochs",)), f"not used: train.iters={t['iters']} sets the length"))
    dataset = cfg["data"]["dataset"]
    if dataset != "synthetic":  # (a stored config evaluated on other data keeps its own: said, not refused)
        found.append(([f"data.synthetic.{k}={v}" for k, v in cfg["data"]["synthetic"].items()
                       if v != DEFAULTS["data"]["synthetic"][k]], f"not used by data.dataset={dataset}"))
    return [(", ".join(keys), why) for keys, why in found if keys]


def unused_eval_settings(eval_cfg: dict, mode: str) -> list[str]:
    """``eval`` keys set to a value the evaluation ``mode`` ignores: the crop outside center_crop / sliding_window,
    the stride outside sliding_window."""
    unused = []
    if eval_cfg["crop_size"] is not None and mode == "original":
        unused.append(f"eval.crop_size={eval_cfg['crop_size']}")
    if eval_cfg["stride_ratio"] != DEFAULTS["eval"]["stride_ratio"] and mode != "sliding_window":
        unused.append(f"eval.stride_ratio={eval_cfg['stride_ratio']:g}")
    return unused


class Trainer:
    """Builds everything from a validated config (see :mod:`csl.config`) and runs ``train()``."""

    def __init__(self, cfg: dict, env: DistEnv | None = None):
        # Stored resolved: the checkpoint's config then works from any directory.
        given, cfg = cfg, resolve_data_paths(cfg)
        self.cfg = cfg
        self.env = env or init_distributed(cfg["device"], cfg["dist_timeout_min"])
        self.device = self.env.device
        check_kernels_backend(cfg["kernels"]["backend"], self.device)  # before the run folder is touched
        t = cfg["train"]
        self.semi = t["mode"] == "semi"
        if not self.semi and t["batch_size"] < 2 and not (self.env.world_size > 1 and self.device.type == "cuda"):
            # Semi-supervised steps forward the labeled and unlabeled batches together; SyncBatchNorm (several GPUs)
            # normalises over every process's images.
            raise ConfigError("train.mode=supervised with train.batch_size=1: the BatchNorm of the ASPP image-pooling "
                              "branch needs >= 2 images per forward pass; use train.batch_size >= 2")
        self.output_dir = cfg["output_dir"]
        held: list[logging.LogRecord] = []  # what is said before train.log exists, written into it once it does
        with held_records(held):
            self.damaged_best: str | None = None  # a best.pt that resume=auto found unreadable
            if self.env.is_main and os.path.isdir(self.output_dir):
                put_back_replaced_run(self.output_dir)  # a killed replacing start's run: there to be resumed
            barrier()
            self.resume_from = self._resume_path()  # read once: resume=auto compares the checkpoints' iterations
            self._check_ranks_resume_alike()
            check_start_files(given, self.resume_from)  # a missing file is said before the folder is touched
            self.run_lock = None
            if self.env.is_main:  # before anything is written: refuse another run's folder, lock this one
                self.run_lock = claim_run_folder(self.output_dir, resuming=self.resume_from is not None,
                                                 resume_auto=t["resume"] == "auto", overwrite=t["overwrite"],
                                                 resume_path=self.resume_from)
        barrier()
        self.logging_set_up = False
        try:
            self._set_up(cfg, held)
        except BaseException as e:
            if self.logging_set_up and isinstance(e, Exception):  # this run's train.log ends with why, not empty
                log_to_files(f"the run could not start: {type(e).__name__}: {one_line(e)}")
            if self.run_lock is not None:
                self.run_lock.restore_replaced()  # a replaced run is only gone once this start has succeeded
                self.run_lock.release()
            raise
        if self.run_lock is not None:
            self.run_lock.discard_replaced()

    def _set_up(self, cfg: dict, held: list[logging.LogRecord] = ()) -> None:
        setup_logging(self.output_dir, self.env.is_main, held=held)
        self.logging_set_up = True
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True

        seed_everything(cfg["seed"])  # same model initialisation on every rank
        self._build_data()
        self._build_model()
        seed_everything(sample_seed(cfg["seed"], self.env.rank, 3))  # dropout etc.: a stream per rank
        self.generator = torch.Generator(device=self.device).manual_seed(sample_seed(cfg["seed"], self.env.rank, 5))

        self.iteration = 0
        self.pending_eval: dict | None = None  # an evaluation a stopped run left undone (see _evaluate_and_save)
        self.best_miou: float | None = None
        self.last_eval: dict | None = None
        self.window = Accumulator()
        self.epoch_acc = Accumulator()
        self.weighted_partial = False
        self._maybe_resume()  # before the metrics file is opened: a resume drops the records logged after it
        if self.env.is_main:  # once the start has succeeded, with what the run uses (a resume's checkpoint values)
            dump_config(stored_config(self.cfg), os.path.join(self.output_dir, "config.yaml"),
                        header=RUN_CONFIG_HEADER)
        self.metrics = MetricsWriter(self.output_dir, enabled=self.env.is_main,
                                     resumed_at=self.iteration if self.resume_from is not None else None,
                                     eval_pending=self.pending_eval is not None)
        self._log_setup()

    # -- set-up ---------------------------------------------------------------------------------------------------

    def _build_data(self) -> None:
        from .data import build_datasets, default_eval_mode

        cfg, env = self.cfg, self.env
        data_cfg = {k: v for k, v in cfg["data"].items() if v is not None}
        bundle = build_datasets(data_cfg, need_unlabeled=self.semi)
        if self.semi and bundle.unlabeled is None:
            raise ValueError("train.mode=semi needs unlabeled data: set data.split_dir (with unlabeled.txt) or "
                             "data.unlabeled_list, or use train.mode=supervised")
        self.labeled, self.unlabeled, self.val = bundle.labeled, bundle.unlabeled if self.semi else None, bundle.val
        self.num_classes = int(self.labeled.source.num_classes)
        self.has_unlabeled_gt = bool(self.semi and getattr(self.unlabeled.source, "has_masks", False))
        if self.semi and cfg["selection"]["mode"] == "oracle" and not self.has_unlabeled_gt:
            raise ConfigError("selection.mode=oracle trains on the unlabeled frames' true masks, and the unlabeled "
                              "list has frames without one: give every unlabeled frame its mask, or choose another "
                              "selection.mode")
        if self.semi and cfg["selection"]["mode"] == "oracle":
            self.unlabeled.masks_required = True  # a missing mask would be trained on at weight 0, without a word
        self.eval_mode = cfg["eval"]["mode"] or default_eval_mode(cfg["data"]["dataset"])
        self.eval_crop = cfg["eval"]["crop_size"] or cfg["data"]["crop_size"]

        t = cfg["train"]
        self.batch_size = t["batch_size"]
        global_batch = self.batch_size * env.world_size
        for name, dataset in (("labeled", self.labeled), ("unlabeled", self.unlabeled)):
            if dataset is not None and global_batch > len(dataset) and env.is_main:
                log.warning("a batch of %d is larger than the %d %s image(s): every batch repeats images (lower "
                            "train.batch_size)", global_batch, len(dataset), name)
        base = len(self.unlabeled) if self.semi else len(self.labeled)
        self.iters_per_epoch = t["iters_per_epoch"] or epoch_length(base, self.batch_size, env.world_size)
        self.total_iters = t["iters"] or t["epochs"] * self.iters_per_epoch
        self.num_epochs = math.ceil(self.total_iters / self.iters_per_epoch)

        per_rank = self.iters_per_epoch * self.batch_size
        workers = cfg["data"]["num_workers"]
        seed = cfg["seed"]
        self.samplers = [ResumableDistributedSampler(len(self.labeled), per_rank, seed=seed, stream=0, rank=env.rank,
                                                     world_size=env.world_size)]
        self.loaders = [make_train_loader(self.labeled, self.samplers[0], self.batch_size, workers, self.device,
                                          seed)]
        if self.semi:
            for stream in (1, 2):  # the unlabeled batch and the CutMix source batch
                sampler = ResumableDistributedSampler(len(self.unlabeled), per_rank, seed=seed, stream=stream,
                                                      rank=env.rank, world_size=env.world_size)
                self.samplers.append(sampler)
                self.loaders.append(make_train_loader(self.unlabeled, sampler, self.batch_size, workers, self.device,
                                                      seed + stream))
        self.val_loader = None
        if cfg["data"]["check_labels"]:
            self._check_labels()
        if self.val is not None:
            from .evaluate import make_eval_loader

            self.val_loader = make_eval_loader(self.val, batch_size=cfg["eval"]["batch_size"],
                                               num_workers=min(workers, 2), pin_memory=self.device.type == "cuda")

    def _build_model(self) -> None:
        from .model import build_model

        cfg = self.cfg
        model_cfg = cfg["model"]
        if self.resume_from is not None:  # the checkpoint holds every weight: the start weights are not needed
            skipped = [f"{key}={value}" for key, value in (("model.pretrained", model_cfg["pretrained"]),
                                                           ("train.init_from", cfg["train"]["init_from"])) if value]
            if skipped:
                log.info("resuming from %s: %s not loaded", self.resume_from, " and ".join(skipped))
            model_cfg = dict(model_cfg, pretrained=None)
        model = build_model(model_cfg, self.num_classes)
        if cfg["train"]["init_from"] and self.resume_from is None:
            path = cfg["train"]["init_from"]
            state, _ = checkpoint_weights(cfg["model"], load_checkpoint(path), path, num_classes=self.num_classes,
                                          classes_from="the training data's class count")
            load_weights(model, state, path)
            log.info("model initialised from %s", path)
        self._log_model(model)
        self.model, self.bare_model = prepare_model(model, self.env)
        self.amp_dtype = resolve_amp(cfg["train"]["amp"], self.device)
        self.eval_amp = resolve_amp(cfg["eval"]["amp"], self.device, "eval.amp")
        self.optimizer = build_optimizer(self.bare_model, cfg["train"])
        self.scheduler = build_scheduler(self.optimizer, self.total_iters, cfg["train"]["poly_power"])
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self.criterion = build_labeled_criterion(cfg["train"], IGNORE_INDEX)  # the datasets map the files' value
        self.selector = build_selector(cfg["selection"], cfg["kernels"]["backend"])
        self.step_cfg = StepConfig.from_config(cfg, self.amp_dtype,
                                               self.num_classes if self.has_unlabeled_gt else 0)

    def _log_model(self, model: torch.nn.Module) -> None:
        """The network and where its start weights come from; a semi-supervised run from random weights is warned
        about (self-training on a random network's pseudo-labels falls far behind)."""
        m, t = self.cfg["model"], self.cfg["train"]
        params = sum(p.numel() for p in model.parameters())
        random_start = self.resume_from is None and not t["init_from"] and not m["pretrained"]
        if self.resume_from is not None or t["init_from"]:
            start = f"the weights of {self.resume_from or t['init_from']}"
        elif m["pretrained"]:
            start = f"backbone weights {m['pretrained']}, decoder at random"
        else:
            start = "random weights"
        stem = f"{m['stem']} stem, " if m["backbone"].startswith("resnet") else ""
        log.info("model: DeepLabV3+ on %s (%soutput stride %d, ASPP rates %s), %.1f M parameters, from %s",
                 m["backbone"], stem, m["output_stride"], "/".join(str(d) for d in m["dilations"]), params / 1e6,
                 start)
        if self.semi and random_start:
            example = ("UniMatch's xception.pth" if m["backbone"] == "xception" else
                       f"UniMatch's {m['backbone']}.pth" if m["stem"] == "deep" else "imagenet")
            log.warning("train.mode=semi from random weights (no model.pretrained, train.init_from or resume): the "
                        "pseudo-labels of an untrained network are noise; set model.pretrained (e.g. %s) or "
                        "train.init_from a supervised run", example)

    def _log_setup(self) -> None:
        env, t = self.env, self.cfg["train"]
        srun = adopted_srun_launch()
        if srun is not None:
            log.info("%s", srun.description)
        g = self.batch_size * env.world_size
        batches = f"{g} labeled + {g} unlabeled + {g} mix" if self.semi else f"{g} labeled"
        groups = ", ".join(f"{pg.get('name', i)} {pg['initial_lr']:.3g}" for i, pg in
                           enumerate(self.optimizer.param_groups))
        log.info("world size %d on %s (%s); global batch %s (%d per process); lr %s (poly %.1f); amp %s",
                 env.world_size, self.device, env.backend or "single process", batches, self.batch_size, groups,
                 t["poly_power"], {None: "fp32"}.get(self.amp_dtype, str(self.amp_dtype).replace("torch.", "")))
        selection = (f"selection {self.selector.mode}, TMP {'on' if self.cfg['tmp']['enabled'] else 'off'}"
                     if self.semi else "supervised only")
        unused = unused_selection_settings(self.cfg["selection"]) if self.semi else []
        if unused:
            log.warning("%s: not used by selection.mode=%s", ", ".join(unused), self.selector.mode)
        for keys, why in unused_training_settings(self.cfg):
            log.warning("%s: %s", keys, why)
        unused_eval = unused_eval_settings(self.cfg["eval"], self.eval_mode)
        if unused_eval:
            log.warning("%s: not used by eval.mode=%s", ", ".join(unused_eval), self.eval_mode)
        full, rest = divmod(self.total_iters, self.iters_per_epoch)
        epochs = (f"{full} epoch(s) of {self.iters_per_epoch}" if full else "") + (
            f"{' + ' if full else ''}{rest} of an epoch of {self.iters_per_epoch}" if rest else "")
        log.info("%s; %d classes; %d iterations (%s); eval %s every %d epoch(s); output %s",
                 selection, self.num_classes, self.total_iters, epochs, self.eval_mode,
                 self.cfg["eval"]["every_epochs"], self.output_dir)
        if self.iteration:
            log.info("resumed at iteration %d (epoch %d)", self.iteration, self.iteration // self.iters_per_epoch)

    # -- checkpoints ----------------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """This rank's view; :meth:`save` gathers every rank's random state into ``rng``."""
        return {
            "format": FORMAT_VERSION,
            "model": {k: v.detach().cpu() for k, v in self.bare_model.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "iteration": self.iteration,
            "iters_per_epoch": self.iters_per_epoch,
            "total_iters": self.total_iters,
            "world_size": self.env.world_size,
            "batch_size": self.batch_size,
            "num_classes": self.num_classes,
            "device_type": self.device.type,  # the "step" generator's kind (a CPU and a CUDA state differ)
            "best_miou": self.best_miou,
            "last_eval": self.last_eval,
            "window": self.window.state_dict(),
            "epoch_acc": self.epoch_acc.state_dict(),
            "config": self.cfg,
        }

    def _rank_state(self) -> dict:
        """What differs between ranks besides the random streams: the BatchNorm running statistics where each
        process keeps its own (CPU, between evaluations), and the sums of the log window and of the epoch's
        pseudo-labels. ``model`` / ``window`` / ``epoch_acc`` of a checkpoint are rank 0's."""
        return {"buffers": {k: v.detach().cpu() for k, v in self.bare_model.named_buffers()},
                "window": self.window.state_dict(), "epoch_acc": self.epoch_acc.state_dict()}

    def save(self, names: tuple[str, ...] = (LATEST,)) -> None:
        rng = all_gather_objects(capture_rng({"step": self.generator}))  # every rank takes part
        ranks = all_gather_objects(self._rank_state()) if self.env.world_size > 1 else None
        if self.env.is_main:
            if self.run_lock is not None:
                self.run_lock.check_held()  # a folder removed while the run trained is not made again
            payload = self.state_dict()
            payload["rng"] = rng
            if ranks is not None:
                payload["ranks"] = ranks
            atomic_save(payload, *(os.path.join(self.output_dir, name) for name in names))
        barrier()

    def _check_ranks_resume_alike(self) -> None:
        """Each process looks for the checkpoint itself: one that sees another folder (a run folder local to each
        node, a stale network mount) would start anew beside the others resuming, pair its collectives with theirs
        and fail only after rank 0 had written a run's files. Every rank raises the same error instead."""
        if self.env.world_size == 1:
            return
        path = self.resume_from
        stat = os.stat(path) if path is not None and os.path.isfile(path) else None
        found = all_gather_objects((path, stat and (stat.st_size, stat.st_mtime_ns)))  # the file, not its name
        if len(set(found)) > 1:
            views = "; ".join(f"rank {rank}: " + ("no checkpoint" if p is None else p if s else f"{p} (not found)")
                              + (f" ({s[0]} bytes)" if s else "") for rank, (p, s) in enumerate(found))
            raise ConfigError(f"the processes do not see the same checkpoint to resume in {self.output_dir} ({views}); "
                              f"output_dir must be on storage every node sees alike")

    def _resume_path(self) -> str | None:
        resume = self.cfg["train"]["resume"]
        if not resume:
            return None
        if resume == "auto":
            # The newer of latest.pt and best.pt (latest.pt on a tie): an improving epoch writes its state to best.pt
            # first, so a kill between the two writes leaves best.pt one epoch ahead of latest.pt (or alone).
            found = [os.path.join(self.output_dir, name) for name in (LATEST, BEST)]
            found = [path for path in found if os.path.isfile(path)]
            if len(found) == 2:
                try:
                    latest = checkpoint_iteration(found[0])
                except ValueError as e:  # a damaged latest.pt: say which other checkpoint there is
                    try:
                        other = (f"{found[1]} is readable (iteration {checkpoint_iteration(found[1])}): continue "
                                 f"from it with --resume {found[1]} (train.resume={found[1]})")
                    except ValueError:
                        other = f"{found[1]} is not readable either"
                    raise ValueError(f"{e}; {other}") from None
                try:
                    best = checkpoint_iteration(found[1])
                except ValueError as e:  # a damaged best.pt: latest.pt holds the run
                    log.warning("train.resume=auto: %s; resuming from %s (iteration %d), which is readable", e,
                                found[0], latest)
                    self.damaged_best = found[1]
                    return found[0]
                if best > latest:
                    return found[1]
            return found[0] if found else None
        return resume

    def _maybe_resume(self) -> None:
        path = self.resume_from
        if path is None:
            return
        ckpt = load_checkpoint(path)
        if os.path.basename(path) == BEST and self.cfg["train"]["resume"] == "auto":
            log.warning("train.resume=auto: %s has no %s of the same or a later iteration (the run was stopped "
                        "between the two checkpoint writes, or it was removed); resuming from %s", self.output_dir,
                        LATEST, BEST)
        missing = [k for k in ("model", "optimizer", "scheduler", "iteration") if k not in ckpt]
        if missing and "model" in ckpt and "iteration" in ckpt and "config" in ckpt:
            raise ValueError(f"{path} is the slimmed checkpoint of a finished csl demo stage (no optimizer state is "
                             f"left), so it cannot be continued; to train on from its weights, start a new output_dir "
                             f"with train.init_from={path}")
        if missing:
            raise ValueError(f"{path} is not a training checkpoint of csl train (no {', '.join(missing)}), so there is "
                             f"no run to resume; to start a new run from its weights use train.init_from={path}")
        if ckpt.get("num_classes") not in (None, self.num_classes):
            raise ConfigError(f"{path} was trained with {ckpt['num_classes']} classes, this config's data has "
                              f"{self.num_classes}: it cannot be resumed here (train.init_from cannot change the "
                              f"class count either; start a new output_dir)")
        self._adopt_resumed_settings(path, ckpt.get("config") or {})
        self._name_changed_training_settings(path, ckpt.get("config") or {})
        saved_seed = (ckpt.get("config") or {}).get("seed")
        if saved_seed is not None and saved_seed != self.cfg["seed"]:
            log.warning("resuming %s: seed was %s, now %s; the samplers' order and augmentations follow the seed, so "
                        "the run will not continue exactly (seed=%s continues it)", path, saved_seed,
                        self.cfg["seed"], saved_seed)
        for key, mine in (("world_size", self.env.world_size), ("batch_size", self.batch_size)):
            if ckpt.get(key, mine) != mine:  # the samplers' positions are counted per process and batch
                raise ConfigError(
                    f"{path} was trained with {key} {ckpt[key]}, this run has {mine}: its sampler positions, epochs "
                    f"and per-process statistics do not carry over to another {key}. Resume with "
                    + (f"{ckpt[key]} processes (torchrun --nproc_per_node / --nnodes, or srun -n)"
                       if key == "world_size" else f"train.batch_size={ckpt[key]}")
                    + f", or start a new output_dir with train.init_from={path} (its weights, a fresh optimizer)")
        for key, mine in (("iters_per_epoch", self.iters_per_epoch), ("total_iters", self.total_iters)):
            if ckpt.get(key) != mine:
                log.warning("resuming %s: %s was %s, now %s; the run will not continue exactly", path, key,
                            ckpt.get(key), mine)
        saved_model = (ckpt.get("config") or {}).get("model") or {}
        for key in ("output_stride", "dilations"):  # the same weights, another network: load_weights cannot tell
            if key in saved_model and saved_model[key] != self.cfg["model"][key]:
                log.warning("resuming %s: model.%s was %s, now %s; the weights load, but the network computes "
                            "differently from the one trained so far (model.%s=%s continues it)", path, key,
                            saved_model[key], self.cfg["model"][key], key, saved_model[key])
        load_weights(self.bare_model, ckpt["model"], path)
        # The schedule again with the checkpoint's poly_power, before the optimizer's state: building a scheduler
        # sets the learning rates, which the optimizer's load then replaces with the checkpoint's.
        self.scheduler = build_scheduler(self.optimizer, self.total_iters, self.cfg["train"]["poly_power"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        if self.scaler.is_enabled() and not ckpt["scaler"]:
            log.warning("resuming %s: the checkpoint has no float16 loss-scaler state (it did not train in float16); "
                        "the scaler starts afresh", path)
        else:
            self.scaler.load_state_dict(ckpt["scaler"])
        self.iteration = int(ckpt["iteration"])
        self.best_miou, self.last_eval = ckpt.get("best_miou"), ckpt.get("last_eval")
        self.pending_eval = ckpt.get("pending_eval")
        # This rank's own state where the checkpoint holds every rank's (a multi-process run; the world size is
        # the same, checked above), else the checkpoint's, which is rank 0's.
        mine = ckpt["ranks"][self.env.rank] if "ranks" in ckpt else ckpt
        if "buffers" in mine:
            with torch.no_grad():
                for name, buffer in self.bare_model.named_buffers():
                    buffer.copy_(mine["buffers"][name])
        self.window.load_state_dict(mine["window"], self.device)
        self.epoch_acc.load_state_dict(mine["epoch_acc"], self.device)
        # A checkpoint from before the soft weights' sums were kept: this epoch's weighted metrics would cover only
        # the iterations after the resume, so they are left out of its record.
        self.weighted_partial = "pl_counts" in self.epoch_acc.sums and "pl_weighted" not in self.epoch_acc.sums
        self._restore_best(path, ckpt)
        if self.env.is_main:
            prune_metrics(os.path.join(self.output_dir, "metrics.jsonl"), self.iteration,
                          eval_pending=self.pending_eval is not None)
        rng = ckpt.get("rng") or []
        saved_type = saved_device_type(ckpt) or self.device.type
        if len(rng) != self.env.world_size:
            log.warning("checkpoint has random states of %d rank(s), this run has %d: random streams not restored",
                        len(rng), self.env.world_size)
        elif saved_type != self.device.type:
            log.warning("checkpoint trained on %s, this run is on %s: the step's random generator (CutMix boxes, "
                        "TMP grids) starts afresh; the other random streams are restored", saved_type,
                        self.device.type)
            restore_rng(rng[self.env.rank])
        else:
            restore_rng(rng[self.env.rank], {"step": self.generator})

    def _check_labels(self) -> None:
        """Read every labeled-training and validation image and mask once now (cached by file stamps; the unlabeled
        ones too where the run trains on their masks, ``selection.mode=oracle``), and look for
        every unlabeled image file and check that it ends as its format ends, so a bad label value or a missing or
        damaged file stops the run before training, not when a loader worker first draws it or at the first
        evaluation after an epoch of work."""
        datasets = (self.labeled, self.val) + ((self.unlabeled,) if getattr(self.unlabeled, "masks_required", False)
                                               else ())
        sources = [getattr(ds, "source", None) for ds in datasets]
        sources = [s for s in sources if s is not None and hasattr(s, "check_cached")]
        unlabeled = getattr(self.unlabeled, "source", None)
        if self.env.is_main:
            missing = unlabeled.missing_images() if hasattr(unlabeled, "missing_images") else []  # masks optional
            if missing:
                raise FileNotFoundError(f"{len(missing)} of the {len(unlabeled)} unlabeled image files not found, "
                                        f"e.g. {', '.join(missing[:3])} (listed in {unlabeled.list_path})")
            damaged = unlabeled.damaged_images() if hasattr(unlabeled, "damaged_images") else []
            if damaged:
                raise ValueError(f"{len(damaged)} of the {len(unlabeled)} unlabeled image files cannot be read to "
                                 f"their end (cut short?): {'; '.join(damaged[:3])}; replace them or remove their "
                                 f"lines from {unlabeled.list_path}")
            self._warn_val_images_in_training()
            for source in sources:
                ran, counts = source.check_cached(progress=self.cfg["train"]["progress"])
                if ran:
                    log.info("labels checked: %s", source.description)
                if not any(counts):  # the supervised loss would be 0 throughout, or the mIoU never defined
                    raise ValueError(f"every mask pixel of {source.description} is ignored: no pixel holds one of "
                                     f"the {self.num_classes} classes (data.ignore_index "
                                     f"{source.file_ignore_index}, data.ignore_labels {list(source.ignore_labels)}, "
                                     f"data.reduce_zero_label {source.reduce_zero_label}); check these against "
                                     f"the values the masks store")
                if source is not getattr(self.val, "source", None):
                    continue
                present = [k for k, n in enumerate(counts) if n > 0]
                if present and present[-1] + 1 < self.num_classes:
                    stored_255 = ("; a class the files store as 255 (a binary mask of 0 / 255) is read as ignored "
                                  "(data.ignore_index 255): store it as its class id" if
                                  source.file_ignore_index == 255 else "")
                    log.warning("data.num_classes is %d but the validation masks hold classes 0..%d only: the "
                                "model gets %d class(es) no label ever shows; set data.num_classes to the "
                                "dataset's count%s", self.num_classes, present[-1], self.num_classes - present[-1] - 1,
                                stored_255)
        if sources:
            barrier()

    def _warn_val_images_in_training(self) -> None:
        """A validation image that a training list also names makes the mIoU an evaluation on training data: said
        with a WARNING (a split written by hand from the wrong lists), not refused."""
        val = getattr(self.val, "source", None)
        if not hasattr(val, "image_path"):
            return
        val_paths = {os.path.abspath(val.image_path(i)) for i in range(len(val))}
        for name, dataset in (("labeled", self.labeled), ("unlabeled", self.unlabeled)):
            source = getattr(dataset, "source", None)
            if not hasattr(source, "image_path"):
                continue
            shared = [p for i in range(len(source)) if (p := os.path.abspath(source.image_path(i))) in val_paths]
            if shared:
                log.warning("%d of the %d validation images are also in the %s training list %s (e.g. %s): the "
                            "mIoU is then measured partly on training images", len(shared), len(val_paths), name,
                            source.list_path, shared[0])

    def _adopt_resumed_settings(self, path: str, saved: dict) -> None:
        """A resume continues the checkpoint's optimizer, schedule and scaler: the keys set otherwise here take the
        checkpoint's values (said with a warning), so that the log, config.yaml and the schedule agree."""
        now, then = self.cfg["train"], saved.get("train", {})
        for key in RESUMED_FROM_CHECKPOINT:
            if key in then and then[key] != now[key]:
                log.warning("resuming %s: train.%s is %s here but %s in the checkpoint; a resume continues the "
                            "checkpoint's optimizer and schedule, so %s is what the run uses", path, key, now[key],
                            then[key], then[key])
                now[key] = then[key]

    def _name_changed_training_settings(self, path: str, saved: dict) -> None:
        """The data, selection, TMP and loss settings of a resume are the config's (README), e.g. to continue on
        another split on purpose; a value that differs from the checkpoint's is said in one warning, since the run's
        records then mix two settings."""
        then, now = dotted_leaves(saved), dotted_leaves(resolve_data_paths(self.cfg))
        changed = [f"{key} {then[key]!r} -> {now.get(key)!r}" for key in sorted(then)  # keys an older run lacks aside
                   if (key.startswith(TRAINING_SECTIONS) or key in TRAINING_TRAIN_KEYS)
                   and key not in NOT_TRAINING_SETTINGS and then[key] != now.get(key)]
        if changed:
            log.warning("resuming %s with training settings that differ from the checkpoint's: %s; the steps from "
                        "here use the values given now (config.yaml records them), those before used the "
                        "checkpoint's", path, ", ".join(changed))

    def _restore_best(self, path: str, ckpt: dict) -> None:
        """``best.pt`` missing while the checkpoint records a best mIoU (deleted, or a checkpoint written before
        its ``best.pt``) or unreadable (moved aside to ``best.pt.damaged`` first): rewrite it when the resumed state
        is that best one, else say that it is lost."""
        best = os.path.join(self.output_dir, BEST)
        if self.damaged_best is not None and self.env.is_main and os.path.isfile(best):
            os.replace(best, best + ".damaged")  # kept for a look, out of the way of the next reader of best.pt
            log.warning("%s is unreadable: moved to %s.damaged", best, best)
        if self.best_miou is None or os.path.isfile(best) or not self.env.is_main:
            return
        last = self.last_eval or {}
        if last.get("iter") == self.iteration and last.get("miou") == self.best_miou:
            payload = self.state_dict()
            payload["rng"] = ckpt.get("rng") or []
            payload["device_type"] = saved_device_type(ckpt) or self.device.type  # the kind of those states
            atomic_save(payload, best)
            log.warning("%s was missing; rewritten from %s, whose state is the best one (mIoU %.2f)", best, path,
                        100 * self.best_miou)
        else:
            log.warning("%s is missing and %s is not the best state (mIoU %.2f, from iteration %s): that model is "
                        "lost; best.pt will be written at the next improvement", best, path, 100 * self.best_miou,
                        last.get("iter"))

    # -- the loop -------------------------------------------------------------------------------------------------

    def train(self, stop_at: int | None = None) -> dict:
        """Train to ``total_iters`` (or stop after iteration ``stop_at``, as if interrupted). Returns a summary."""
        end = self.total_iters if stop_at is None else min(stop_at, self.total_iters)
        bar = progress_bar(self.total_iters, self.iteration, enabled=self.env.is_main and self.cfg["train"]["progress"])
        start_time, start_iteration = time.perf_counter(), self.iteration
        if self.pending_eval is not None:
            log.info("resumed before the evaluation at iteration %d: evaluating first", self.iteration)
            pending, self.pending_eval = self.pending_eval, None
            self._evaluate_and_save(pending["epoch"], pending["pseudo_labels"])
        self.window_start = time.perf_counter()  # sec_per_iter counts the steps: evaluations and saves are left out
        try:
            # A Ctrl-C / SIGTERM (with csl's handler installed) ends the current iteration, saves, then stops; with
            # several processes it stops at once, as the ranks could not agree on the iteration without a collective.
            with stop.deferred(enabled=self.env.world_size == 1):
                while self.iteration < end:
                    self.train_epoch(end, bar)
        finally:
            bar.close()
        elapsed = time.perf_counter() - start_time
        summary = {"iterations": self.iteration, "best_miou": self.best_miou, "last_eval": self.last_eval,
                   "seconds": elapsed}
        if self.iteration >= self.total_iters:
            resumed = "" if not start_iteration else " (none in this start)" if start_iteration == self.iteration \
                else f" (iterations {start_iteration + 1}-{self.iteration} in this start)"
            log.info("done: %d iterations%s in %.1f s; best mIoU %s", self.iteration, resumed, elapsed,
                     "n/a" if self.best_miou is None else f"{100 * self.best_miou:.2f}")
        return summary

    def _batches(self, epoch: int, start_iter: int):
        for sampler in self.samplers:
            sampler.set_epoch(epoch, start_iter * self.batch_size)
        return zip(*self.loaders, strict=False)

    def train_epoch(self, end: int, bar) -> None:
        ipe = self.iters_per_epoch
        epoch, pos = divmod(self.iteration, ipe)
        self.model.train()
        batch_iter = iter(self._batches(epoch, pos))
        while True:
            try:
                batches = next(batch_iter)
            except StopIteration:
                return
            except Exception:
                if stop.requested():  # Ctrl-C reached the loader's workers too: stop as asked, with the state saved
                    self._stop_as_requested(epoch_done=False, epoch=epoch)
                raise
            values = self._step([to_device(b, self.device) for b in batches])
            self.window.add(values)
            self.epoch_acc.add({k: v for k, v in values.items()
                                if k in ("weight_sum", "valid", "pl_counts", "pl_weighted")})
            self.iteration += 1
            bar.update(1)
            if self.iteration % self.cfg["train"]["log_every"] == 0 or self.iteration == self.total_iters:
                self._log_window(bar)
            epoch_done = self.iteration % ipe == 0 or self.iteration == self.total_iters
            if stop.requested():
                self._stop_as_requested(epoch_done, epoch)
            paused = time.perf_counter()
            if epoch_done:
                self._end_epoch(epoch)
            elif self.cfg["train"]["ckpt_every"] and self.iteration % self.cfg["train"]["ckpt_every"] == 0:
                self._check_weights_finite()
                self.save()
            self.window_start += time.perf_counter() - paused  # the evaluation and the saves are not step time
            if self.iteration >= end or epoch_done:
                return

    def _step(self, batches: list[dict]) -> dict[str, torch.Tensor]:
        if not self.semi:
            return supervised_step(self.model, self.optimizer, self.scheduler, self.scaler, batches[0],
                                   criterion=self.criterion, amp_dtype=self.amp_dtype)
        return train_step(self.model, self.optimizer, self.scheduler, self.scaler, *batches, selector=self.selector,
                          criterion=self.criterion, cfg=self.step_cfg, generator=self.generator)

    def _log_window(self, bar) -> None:
        if not self.window.count:
            return
        n = self.window.count
        keys = [k for k in LOSS_KEYS if k in self.window.sums]
        ratio_keys = ["weight_sum", "valid"] if "valid" in self.window.sums else []
        stacked = torch.stack([self.window.sums[k] for k in keys + ratio_keys])  # float64 sums
        # Summed over ranks in one collective: the losses (their mean over ranks is the global batch's), the mask
        # ratio's sums, and which losses are non-finite on any rank: every rank stops at the same iteration (one
        # rank stopping alone would leave the others waiting in the next step's collectives).
        non_finite = (~torch.isfinite(stacked[: len(keys)])).to(stacked.dtype)
        host = all_reduce_sum(torch.cat([stacked, non_finite])).cpu().tolist()  # the only sync per interval
        values, ratio, non_finite = host[: len(keys)], host[len(keys): -len(keys)], host[-len(keys):]
        # the rate iteration `iter` trained with (the optimizer holds the next one: the scheduler steps after it)
        lr = self.scheduler.base_lrs[0] * self.scheduler.lr_lambdas[0](self.iteration - 1)
        record = {"kind": "train", "iter": self.iteration, "epoch": (self.iteration - 1) // self.iters_per_epoch,
                  "lr": lr}
        if any(non_finite):
            bad = [k for k, flag in zip(keys, non_finite, strict=True) if flag]
            raise NonFiniteTrainingError(
                f"the training loss ({', '.join(bad)}) became NaN / inf within iterations "
                f"{self.iteration - n + 1}-{self.iteration}; stopped without saving this state ({self._last_good()}). "
                f"Lower train.lr, use train.amp=fp32, or check the input data")
        record.update({k: v / (n * self.env.world_size) for k, v in zip(keys, values, strict=True)})
        if ratio:
            w, v = ratio
            record["mask_ratio"] = w / v if v else float("nan")
        record["sec_per_iter"] = (time.perf_counter() - self.window_start) / n
        self.window.reset()
        self.window_start = time.perf_counter()
        self.metrics.write(record, step=self.iteration)
        bar.set_postfix(loss=f"{record['loss']:.3f}")
        extra = f", mask {record['mask_ratio']:.3f}" if "mask_ratio" in record else ""
        log.info("iter %d/%d  loss %.4f  (x %.4f%s)  lr %.2e%s", self.iteration, self.total_iters, record["loss"],
                 record["loss_x"], "".join(f", {k[5:]} {record[k]:.4f}" for k in ("loss_s", "loss_m", "loss_fp")
                                           if k in record), record["lr"], extra)

    def pseudo_label_metrics(self) -> dict:
        """The epoch's pseudo-labels so far, summed over ranks: ``mask_ratio`` (mean weight over the non-padded
        unlabeled pixels) and, with unlabeled ground truth (over its labelled pixels), the reliable pixels' (w = 1)
        ``sampling_rate`` / ``accuracy`` / ``recall`` and the soft weights' ``weighted_share`` / ``weighted_accuracy``
        / ``weighted_recall`` (docs/selection.md Sec. 6; equal to the former for a 0/1 selection)."""
        sums = self.epoch_acc.sums
        if "valid" not in sums:
            return {}
        ratio = all_reduce_sum(torch.stack([sums["weight_sum"], sums["valid"]]).clone()).cpu().tolist()
        out = {"mask_ratio": ratio[0] / ratio[1] if ratio[1] else float("nan")}
        if "pl_counts" in sums:
            counts = all_reduce_sum(sums["pl_counts"].clone()).cpu()
            m = metrics_from_counts(counts)
            out.update({"sampling_rate": float(m["overall_sampling_rate"]), "accuracy": float(m["overall_accuracy"]),
                        "recall": float(m["overall_recall"])})
            if "pl_weighted" in sums and not self.weighted_partial:
                w_sum, w_correct = all_reduce_sum(sums["pl_weighted"].clone()).cpu().tolist()
                scored, correct = float(counts[0].sum()), float(counts[2].sum())
                nan = float("nan")
                out.update({"weighted_share": w_sum / scored if scored else nan,
                            "weighted_accuracy": w_correct / w_sum if w_sum else nan,
                            "weighted_recall": w_correct / correct if correct else nan})
        return out

    def _stop_as_requested(self, epoch_done: bool, epoch: int) -> None:
        """Save the state of this iteration boundary (an epoch's end: with its evaluation pending, which a resume
        runs first), say how to continue, and raise the requested stop."""
        saved = True
        if epoch_done:
            saved = self._end_epoch(epoch, evaluate=False)
        else:
            self._check_weights_finite()
            self.save()
        if saved:
            log.warning("stopped at iteration %d of %d as asked; %s holds it: continue with the same command and "
                        "--resume auto, without --overwrite (csl demo: the same command)", self.iteration,
                        self.total_iters, os.path.join(self.output_dir, LATEST))
        stop.raise_requested()

    def _end_epoch(self, epoch: int, evaluate: bool = True) -> bool:
        """The epoch's pseudo-label record, then its evaluation (when due) and checkpoints. ``evaluate=False`` (a
        stop): the evaluation is saved as pending instead. Returns whether the epoch was saved."""
        pl = self.pseudo_label_metrics()
        self.epoch_acc.reset()
        self.weighted_partial = False
        if pl:
            self.metrics.write({"kind": "pseudo_labels", "iter": self.iteration, "epoch": epoch, **pl},
                               step=self.iteration)
            log.info("epoch %d pseudo-labels: %s", epoch, ", ".join(f"{k} {v:.4f}" for k, v in pl.items()))
        self._check_weights_finite()
        last = self.iteration >= self.total_iters
        if self.val_loader is not None and ((epoch + 1) % self.cfg["eval"]["every_epochs"] == 0 or last):
            if not evaluate:
                return self._save_pending_eval(epoch, pl, self._eval_rng(), started=False)
            self._evaluate_and_save(epoch, pl)
        else:
            self.save()
        return True

    def _evaluate_and_save(self, epoch: int, pl: dict) -> None:
        """The epoch's evaluation, then ``best.pt`` (when it improved) and ``latest.pt``. A failure or a stop during
        the evaluation (out of memory, Ctrl-C, SIGTERM) first saves the epoch's training to ``latest.pt`` with the
        evaluation marked pending, which a resume runs before it trains on."""
        names = [LATEST]
        # The random streams as the evaluation finds them (its loader draws a seed from torch's generator): a resumed
        # pending evaluation starts from them and draws the same, so the run continues as if never stopped.
        rng = self._eval_rng()
        try:
            with stop.immediate():  # a stop during the evaluation saves the epoch as pending (below)
                result = self.evaluate()
        except BaseException:
            self._save_pending_eval(epoch, pl, rng)
            raise
        self.last_eval = {"iter": self.iteration, "epoch": epoch, "miou": result["miou"], "iou": result["iou"],
                          "pseudo_labels": pl}
        self.metrics.write({"kind": "eval", "iter": self.iteration, "total_iters": self.total_iters, "epoch": epoch,
                            "mode": self.eval_mode,
                            "miou": result["miou"], "pixel_acc": result["pixel_acc"], "iou": result["iou"]},
                           step=self.iteration)
        defined = result["miou"] == result["miou"]  # NaN when no validation pixel has a label
        improved = defined and (self.best_miou is None or result["miou"] > self.best_miou)
        if improved:
            self.best_miou = result["miou"]
            names.insert(0, BEST)  # before latest.pt, which records best_miou: a kill between them loses nothing
        if not defined:
            log.warning("epoch %d eval (%s): no validation pixel has a label (every mask ignored?): mIoU undefined, "
                        "best.pt not written", epoch, self.eval_mode)
        else:
            best = " (best)" if improved else f" (best {100 * self.best_miou:.2f})"
            log.info("epoch %d eval (%s): mIoU %.2f%s", epoch, self.eval_mode, 100 * result["miou"], best)
        self.save(tuple(names))

    def _eval_rng(self) -> dict | None:
        return capture_rng({"step": self.generator}) if self.env.world_size == 1 else None

    def _save_pending_eval(self, epoch: int, pl: dict, rng: dict | None, started: bool = True) -> bool:
        """``latest.pt`` with the epoch's evaluation marked pending (``started``: it began and did not finish, else
        a stop came before it); returns whether it was written."""
        what = "did not finish" if started else "was not run (stopped before it)"
        if self.env.world_size > 1:  # the other ranks may not reach the collective of a save
            log.warning("the evaluation at iteration %d %s; with %d processes the epoch is not saved",
                        self.iteration, what, self.env.world_size)
            return False
        try:
            if self.run_lock is not None:
                self.run_lock.check_held()
            payload = self.state_dict()
            payload["rng"] = [rng]
            payload["pending_eval"] = {"epoch": epoch, "pseudo_labels": pl}
            atomic_save(payload, os.path.join(self.output_dir, LATEST))
        except Exception as e:  # noqa: BLE001 - the evaluation's own error is the one raised
            log.error("the evaluation at iteration %d %s, and saving the epoch failed too: %s",
                      self.iteration, what, e)
            return False
        log.warning("the evaluation at iteration %d %s; the epoch's training is saved in %s, and "
                    "--resume auto evaluates it first", self.iteration, what, LATEST)
        return True

    def _last_good(self) -> str:
        latest = os.path.join(self.output_dir, LATEST)
        if not os.path.isfile(latest):
            return "no checkpoint was written yet"
        return f"{latest} holds the last finite state"

    def _check_weights_finite(self) -> None:
        """One synchronisation per save: weights that became NaN / inf are never saved or evaluated."""
        params = [p.detach() for p in self.bare_model.parameters()]
        if not bool(torch.stack([torch.isfinite(p).all() for p in params]).all()):
            raise NonFiniteTrainingError(
                f"model weights became NaN / inf by iteration {self.iteration}; stopped without saving them "
                f"({self._last_good()}). Lower train.lr, use train.amp=fp32, or check the input data")

    def evaluate(self) -> dict:
        from .evaluate import evaluate

        broadcast_buffers(self.bare_model)  # every rank evaluates and saves rank 0's statistics
        return evaluate(self.bare_model, self.val_loader, self.num_classes, mode=self.eval_mode,
                        crop_size=self.eval_crop, stride_ratio=self.cfg["eval"]["stride_ratio"], device=self.device,
                        amp_dtype=self.eval_amp, ignore_index=IGNORE_INDEX,
                        backend=self.cfg["kernels"]["backend"],
                        progress=self.env.is_main and self.cfg["train"]["progress"])

    def close(self) -> None:
        """End the run: close the metric files, release the run folder and drop the DDP wrapper (``model`` is the
        bare model from here on). DDP holds itself in a reference cycle; dropped here, the garbage collection of
        :func:`csl.distributed.cleanup_distributed` frees it while its process group is still alive."""
        self.metrics.close()
        if self.run_lock is not None:
            self.run_lock.release()
        self.model = self.bare_model


def train(cfg: dict, stop_at: int | None = None) -> dict:
    """Run a training from a validated config; returns :meth:`Trainer.train`'s summary."""
    trainer = Trainer(cfg)
    try:
        return trainer.train(stop_at=stop_at)
    except Exception as e:  # the error ends the run's train.log too, not only the console (stops log their own)
        log_to_files(f"the run stopped on an error: {type(e).__name__}: {one_line(e)}")
        raise
    finally:
        trainer.close()


__all__ = ["Accumulator", "Trainer", "build_optimizer", "build_scheduler", "epoch_length", "make_train_loader",
           "seed_everything", "to_device", "train"]
