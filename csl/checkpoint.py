"""Checkpoints: atomic writes, ``weights_only`` loading, and capture / restore of every random stream.

A checkpoint holds only tensors and plain Python values (dict, list, tuple, str, int, float, bool, None), so it loads
with ``torch.load(..., weights_only=True)``: loading never runs code from the file. :func:`atomic_save` writes to a
temporary file in the target folder, fsyncs it and renames it over the target, so a crash while saving leaves the
previous file intact. :func:`load_checkpoint` compares every record of the archive with the CRC-32 ``torch.save``
stored beside it before loading (``torch.load`` does not), so a bit changed on disk or in a copy is an error naming
the record, never a silently different weight.
"""

from __future__ import annotations

import logging
import os
import pickle
import random
import re
import shutil
import zipfile
from typing import Any

import numpy as np
import torch

from .files import atomic_open

log = logging.getLogger("csl")

LATEST = "latest.pt"
BEST = "best.pt"
FORMAT_VERSION = 1
_PLAIN = (str, int, float, bool, type(None))


def check_plain(obj: Any, where: str = "checkpoint") -> None:
    """Raise TypeError when ``obj`` holds anything but tensors and plain containers / scalars (what
    ``weights_only=True`` loads)."""
    if isinstance(obj, (torch.Tensor, *_PLAIN)):
        return
    if isinstance(obj, dict):
        for k, v in obj.items():
            if not isinstance(k, (str, int)):
                raise TypeError(f"{where}: key {k!r} of type {type(k).__name__} (keys must be str or int)")
            check_plain(v, f"{where}[{k!r}]")
        return
    if isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            check_plain(v, f"{where}[{i}]")
        return
    raise TypeError(f"{where} is a {type(obj).__name__}; checkpoints hold only tensors and plain Python values")


def atomic_save(payload: dict, path: str, *copies: str) -> None:
    """``torch.save`` to ``path`` whole or not at all (:func:`csl.files.atomic_open`: a temporary file beside it,
    fsync, rename), with the umask's permissions as ``torch.save`` gives, then the file's bytes to each of ``copies``
    the same way (one serialisation for ``best.pt`` and ``latest.pt``). A failed write raises OSError naming the file
    and the free space on its file system; the files written before it stay."""
    check_plain(payload)
    _write_whole(path, lambda f: torch.save(payload, f))
    for copy in copies:
        with open(path, "rb") as source:
            _write_whole(copy, lambda f, source=source: shutil.copyfileobj(source, f, 1 << 24))


def _write_whole(path: str, write) -> None:
    """``write(file)`` into a temporary file renamed over ``path`` when it succeeds; its errors as :func:`atomic_save`
    says."""
    writer = None
    try:
        with atomic_open(path, binary=True, durable=True) as f:
            writer = _WriteErrorKept(f)
            write(writer)
    except Exception as exc:  # KeyboardInterrupt, SystemExit: as they are
        interrupt = _interrupt_behind(exc)
        if interrupt is not None:  # a Ctrl-C inside torch.save surfaces as the zip writer's error on closing
            raise interrupt from None
        # torch.save reports a failed write (a full disk, a quota, a file size limit) as e.g. "RuntimeError: [enforce
        # fail at inline_container.cc] unexpected pos"; the write's own error says which.
        if writer is not None and writer.error is not None and not isinstance(exc, OSError):
            exc = writer.error
        if isinstance(exc, OSError) and isinstance(exc.__cause__, OSError):  # atomic_open's, naming the file
            exc = exc.__cause__
        raise OSError(f"could not write checkpoint {path}: {type(exc).__name__}: {exc} ({_free_space(path)}; the "
                      f"previous file, if any, is unchanged)") from exc


class _WriteErrorKept:
    """A file for ``torch.save`` that keeps the OSError of a failed write, which torch's zip writer replaces with its
    own message."""

    def __init__(self, file):
        self.file = file
        self.error: OSError | None = None

    def write(self, data) -> int:
        try:
            return self.file.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.file.flush()


def _free_space(path: str) -> str:
    """The free space on the file system of ``path``'s nearest folder that exists (its own may be what failed)."""
    folder = os.path.dirname(os.path.abspath(path))
    while not os.path.isdir(folder) and os.path.dirname(folder) != folder:
        folder = os.path.dirname(folder)
    try:
        return f"{shutil.disk_usage(folder).free / 2**20:.0f} MiB free on its file system"
    except OSError:
        return "free space unknown"


def _interrupt_behind(error: BaseException) -> KeyboardInterrupt | None:
    """The KeyboardInterrupt (a signal) among the exceptions ``error`` was raised while handling, if any."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, KeyboardInterrupt):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def _load_error(error: Exception) -> str:
    """One line of a ``torch.load`` error: torch's weights-only refusal spans a paragraph of advice whose specific
    part names what the file holds (``WeightsUnpickler error: Unsupported global: ...``)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error))
    _, marker, specific = text.partition("WeightsUnpickler error:")
    lines = [line.strip() for line in (specific if marker else text).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0] if lines else ''}"


def _numpy_scalar_globals() -> list:
    """What a pickled NumPy number needs (its ``multiarray.scalar`` with its dtype): UniMatch's and CSL's
    checkpoints hold ``previous_best = max(np.mean(iou), previous_best)``, a numpy.float64. Files written under
    NumPy 1 name ``numpy.core.multiarray.scalar``, under NumPy 2 ``numpy._core.multiarray.scalar``: both allowed.
    Numeric and bool dtypes only: an object scalar stays refused."""
    core = getattr(np, "_core", None) or np.core  # NumPy 2, NumPy 1
    kinds = (np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64,
             np.float16, np.float32, np.float64)
    scalar = core.multiarray.scalar
    return [(scalar, "numpy.core.multiarray.scalar"), (scalar, "numpy._core.multiarray.scalar"), np.dtype,
            *{type(np.dtype(kind)) for kind in kinds}]


def _load_weights_only(path: str, **kwargs) -> Any:
    # Only what the caller's own allowlist lacks: the context removes what it added when it ends.
    present = torch.serialization.get_safe_globals()
    with torch.serialization.safe_globals([g for g in _numpy_scalar_globals() if g not in present]):
        return torch.load(path, weights_only=True, **kwargs)


# How a file in torch's legacy (non-zip) format starts: its magic number, pickled with torch.save's default protocol.
_LEGACY_START = pickle.dumps(torch.serialization.MAGIC_NUMBER, protocol=2)[:-1]  # without the pickle's STOP


def _legacy_refused(path: str, error: Exception) -> bool:
    """Whether ``error`` is weights_only's refusal of what a whole file in torch's legacy format holds (e.g. a NumPy
    array), not a sign of a file cut short or of another kind."""
    with open(path, "rb") as f:
        start = f.read(len(_LEGACY_START))
    return start == _LEGACY_START and "WeightsUnpickler error: Unsupported global" in str(error)


def _damaged_record(path: str) -> tuple[str, str] | None:
    """The first record of the zip archive ``path`` (what ``torch.save`` writes) that cannot be read back as written,
    as (its name, what is wrong), or None. A record whose bytes do not match the CRC-32 stored beside them is one:
    ``torch.load`` does not compare them, so a bit flipped on disk or in a copy would load as a silently different
    weight. So is one whose headers no longer describe it (zipfile then raises EOFError, NotImplementedError for a
    compression method, RuntimeError for encryption, ...). An archive written without checksums (torch's
    ``serialization.config.save.compute_crc32 = False``: every CRC 0) cannot be checked and gives None; a file that
    is no zip archive (torch's legacy format, a file cut short) is left to ``torch.load`` to judge."""
    try:
        with zipfile.ZipFile(path) as archive:
            records = archive.infolist()
            if all(record.CRC == 0 for record in records):
                return None
            for record in records:
                try:
                    with archive.open(record) as f:
                        while f.read(1 << 24):
                            pass
                except Exception as e:  # noqa: BLE001 - any failure to read a record back is damage to name
                    if isinstance(e, zipfile.BadZipFile) and str(e).startswith("Bad CRC-32"):
                        return record.filename, "does not match the CRC-32 stored with it"
                    return record.filename, f"cannot be read as the archive's headers describe it ({_load_error(e)})"
    except (zipfile.BadZipFile, OSError, NotImplementedError):  # no directory zipfile reads ("zip file version 12.8")
        return None
    return None


def _record_meaning(record: str) -> str:
    """What a record of a ``torch.save`` archive holds, for an error message."""
    name = record.split("/", 1)[-1]
    if name.startswith("data/"):
        return "tensor data"
    if name == "data.pkl":
        return "the pickled structure (keys, shapes, plain values)"
    return "archive metadata"


def load_checkpoint(path: str, map_location: str | torch.device = "cpu") -> dict:
    """Load with ``weights_only=True`` (NumPy numbers allowed), after comparing every record of the archive with its
    stored CRC-32. Raises FileNotFoundError / ValueError with the path on failure; a file that is no PyTorch
    checkpoint (empty, cut short, another kind of file) is said to be that, a damaged one names its damaged record."""
    _check_intact(path)
    try:
        obj = _load_weights_only(path, map_location=map_location)
    except Exception as e:  # noqa: BLE001 - re-raised with the path
        raise _unreadable(path, e) from e
    if not isinstance(obj, dict):
        raise ValueError(f"checkpoint {path} holds a {type(obj).__name__}, expected a dict")
    return obj


def _check_intact(path: str) -> None:
    """Raise FileNotFoundError / ValueError naming ``path`` when it is a folder, missing, empty, or damaged (a record
    whose CRC-32 does not match)."""
    if os.path.isdir(path):
        raise ValueError(f"checkpoint {os.path.abspath(path)} is a folder; give the checkpoint file in it (latest.pt "
                         f"or best.pt)")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {os.path.abspath(path)}")
    if os.path.getsize(path) == 0:
        raise ValueError(f"checkpoint {path} is empty (0 bytes): a copy or a save that did not finish?")
    damaged = _damaged_record(path)
    if damaged is not None:
        record, fault = damaged
        raise ValueError(f"checkpoint {path} is damaged: its record {record!r} ({_record_meaning(record)}) {fault} "
                         f"(bits changed on disk or in a copy since it was written); its values cannot be trusted")


def _is_zip_archive(path: str) -> bool:
    """zipfile.is_zipfile, False also where a damaged end record makes it raise (BadZipFile: "zipfiles that span
    multiple disks are not supported")."""
    try:
        return zipfile.is_zipfile(path)
    except zipfile.BadZipFile:
        return False


# A zip archive ends with its end of central directory record (22 bytes and a comment of up to 64 KiB).
_END_RECORD = b"PK\x05\x06"
_END_RECORD_BYTES = 22
_END_RECORD_SPAN = _END_RECORD_BYTES + (1 << 16)


def _has_end_record(path: str) -> bool:
    """Whether the last bytes of ``path`` hold a whole zip end record (its signature and the record's other bytes): a
    save that finished wrote one, a file cut short before its end has none."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        f.seek(max(0, size - _END_RECORD_SPAN))
        tail = f.read()
    return 0 <= tail.rfind(_END_RECORD) <= len(tail) - _END_RECORD_BYTES


def _unreadable(path: str, error: Exception) -> ValueError:
    """The ValueError for a ``torch.load`` failure of ``path``: a file that is no PyTorch checkpoint is said to be
    that (torch.save writes a zip archive, a cut-short one has no directory, a damaged one an end record that does
    not lead to it; older torch its legacy format)."""
    if not _is_zip_archive(path) and not _legacy_refused(path, error):
        with open(path, "rb") as f:
            start = f.read(24)
        size = os.path.getsize(path)
        if not start.startswith(b"PK\x03\x04"):
            what = f"cut short, corrupt, or another kind of file; {size} bytes, starting {start!r}"
        elif _has_end_record(path):
            what = (f"a zip archive whose end records do not lead to its directory: {size} bytes, ended as a save "
                    f"ends, then changed on disk or in a copy?")
        else:
            what = f"a zip archive cut short: {size} bytes, a copy or a save that did not finish?"
        return ValueError(f"checkpoint {path} is not a readable PyTorch checkpoint ({what})")
    return ValueError(f"cannot load checkpoint {path} with weights_only=True: {_load_error(error)}")


def checkpoint_iteration(path: str) -> int:
    """The training iteration a trainer checkpoint holds (-1 when it has none), read without loading its tensors
    into memory; a damaged checkpoint raises as in :func:`load_checkpoint`."""
    _check_intact(path)
    try:
        obj = _load_weights_only(path, map_location="cpu", mmap=True)
    except Exception:  # noqa: BLE001 - e.g. a file in torch's legacy (non-zip) format, which mmap cannot read
        obj = load_checkpoint(path)
    return int(obj.get("iteration", -1)) if isinstance(obj, dict) else -1


def model_state(obj: dict, path: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The model state dict of a trainer checkpoint (``obj["model"]``) or of a bare state dict; a ``module.``
    prefix (DDP) is removed."""
    sd = obj.get("model", obj) if isinstance(obj, dict) else obj
    if not isinstance(sd, dict) or not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"{path} holds no model state dict (expected a trainer checkpoint with a 'model' entry or "
                         f"a state dict of tensors)")
    if all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


# Output stride and ASPP dilations of every UniMatch (and CSL) model: VOC, Cityscapes and COCO alike.
UNIMATCH_GEOMETRY = (16, [6, 12, 18])


def _unimatch_backbone(state: dict) -> str:
    """The backbone of a UniMatch / CSL state dict: ``xception``, ``resnet50`` / ``resnet101`` (by ``layer3``'s block
    count), ``resnet`` (another count), or ``unknown``."""
    if "backbone.block1.skip.weight" in state:
        return "xception"
    blocks = {k.split(".")[2] for k in state if k.startswith("backbone.layer3.")}
    if not blocks:
        return "unknown"
    return {6: "resnet50", 23: "resnet101"}.get(len(blocks), "resnet")


def checkpoint_weights(model_cfg: dict, ckpt: dict, path: str, num_classes: int | None = None,
                       classes_from: str = "data.num_classes") -> tuple[dict[str, torch.Tensor], int]:
    """The model weights of a csl, UniMatch or CSL checkpoint under this package's module names, and the number of
    classes it predicts; a ConfigError when they cannot be a model of ``model_cfg`` (no DeepLabV3+ classifier, or
    UniMatch's deep-stem ResNet for a torchvision-stem model) or predict another class count than ``num_classes``
    (when given; ``classes_from`` names where that count comes from)."""
    from .config import ConfigError
    from .model import from_unimatch_state_dict, is_unimatch_state_dict

    state = model_state(ckpt, path)
    if is_unimatch_state_dict(state):
        theirs = _unimatch_backbone(state)
        if theirs == "xception" and model_cfg["backbone"] != "xception":
            stem = " model.stem=torchvision" if model_cfg["stem"] != "torchvision" else ""  # the deep stem is ResNets'
            raise ConfigError(f"{path} is a UniMatch / CSL checkpoint of an Xception-65; pass model.backbone=xception"
                              f"{stem} (the coco config sets it)")
        if theirs.startswith("resnet"):
            # another block count than resnet50's / resnet101's: the config's ResNet is taken at its word
            depth = theirs if theirs != "resnet" else str(model_cfg["backbone"])
            if not depth.startswith("resnet"):
                depth = "resnet50 / resnet101 (its depth)"
            if model_cfg["stem"] != "deep" or model_cfg["backbone"] != depth:
                raise ConfigError(f"{path} is a UniMatch / CSL checkpoint: its ResNet has the deep stem; pass "
                                  f"model.backbone={depth} model.stem=deep (the voc / cityscapes configs set them)")
        state = from_unimatch_state_dict(state)
        log.info("%s: UniMatch / CSL module names mapped to this package's", path)
        built = (int(model_cfg.get("output_stride", 16)), [int(d) for d in model_cfg.get("dilations") or ()])
        if built != UNIMATCH_GEOMETRY:
            # The weights fit in shape at any stride and dilation, so only this says that the model computes otherwise.
            log.warning("%s is a UniMatch / CSL checkpoint: those models are trained at output stride %d with ASPP "
                        "dilations %s (every UniMatch config), but this config builds stride %d with dilations %s; "
                        "the weights load, the predictions differ. To run them as trained, add "
                        "model.output_stride=16 'model.dilations=[6,12,18]'", path, *UNIMATCH_GEOMETRY, *built)
    if "classifier.weight" not in state:
        raise ConfigError(f"{path} holds no DeepLabV3+ classifier (classifier.weight); is it a csl checkpoint?")
    predicted = int(ckpt.get("num_classes") or state["classifier.weight"].shape[0])
    if num_classes is not None and int(num_classes) != predicted:
        raise ConfigError(f"{path} predicts {predicted} classes but {classes_from} is {num_classes}: its classifier "
                          f"does not fit; use data with {predicted} classes")
    return state, predicted


def load_weights(model: torch.nn.Module, state: dict[str, torch.Tensor], path: str) -> None:
    """``model.load_state_dict(state)``; a ConfigError that counts and names the first differences when the model is
    built otherwise (another backbone, stem or head; an output stride or dilations change no weight's shape)."""
    from .config import ConfigError

    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    reshaped = [f"{k} {tuple(state[k].shape)} in the checkpoint, {tuple(v.shape)} in the model"
                for k, v in expected.items() if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if missing or unexpected or reshaped:
        parts = []
        for what, keys in (("of the model's weights missing from the checkpoint", missing),
                           ("of the checkpoint's weights not in the model", unexpected),
                           ("weights of another shape", reshaped)):
            if keys:
                parts.append(f"{len(keys)} {what} (e.g. {'; '.join(keys[:3])})")
        raise ConfigError(f"{path} does not fit the model of this config (model.backbone / stem, "
                          f"data.num_classes): {', '.join(parts)}")
    model.load_state_dict(state)


# ---------------------------------------------------------------------------------------------------------------
# Random streams.


def capture_rng(generators: dict[str, torch.Generator] | None = None) -> dict:
    """The state of python ``random``, ``numpy.random``, torch's CPU generator, every CUDA device's generator and the
    named extra ``generators``, as plain values and tensors."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
        "cuda": [torch.cuda.get_rng_state(i) for i in range(torch.cuda.device_count())]
        if torch.cuda.is_available() else [],
        "generators": {name: g.get_state() for name, g in (generators or {}).items()},
    }
    return state


def restore_rng(state: dict, generators: dict[str, torch.Generator] | None = None) -> None:
    """Inverse of :func:`capture_rng`. A missing named generator in ``state`` is an error (the run would diverge)."""
    random.setstate(_as_tuple(state["python"]))
    npst = state["numpy"]
    np.random.set_state((npst["name"], npst["keys"].numpy().astype(np.uint32), npst["pos"], npst["has_gauss"],
                         npst["cached_gaussian"]))
    torch.set_rng_state(state["torch"].cpu())
    cuda_states = state.get("cuda") or []
    if torch.cuda.is_available():
        for i, s in enumerate(cuda_states[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s.cpu(), i)
    for name, g in (generators or {}).items():
        if name not in state["generators"]:
            raise KeyError(f"checkpoint has no state for the random generator {name!r}")
        g.set_state(state["generators"][name].cpu())


def _as_tuple(obj):
    if isinstance(obj, list):
        return tuple(_as_tuple(x) for x in obj)
    if isinstance(obj, tuple):
        return tuple(_as_tuple(x) for x in obj)
    return obj


__all__ = ["BEST", "FORMAT_VERSION", "LATEST", "atomic_save", "capture_rng", "check_plain", "load_checkpoint",
           "model_state", "restore_rng"]
