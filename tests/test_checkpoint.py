"""csl.checkpoint: atomic writes (a crash while saving keeps the previous file), weights_only loading, RNG capture."""

from __future__ import annotations

import os
import random
import signal

import numpy as np
import pytest
import torch

from csl import checkpoint as ck


def _payload(value: float) -> dict:
    return {"model": {"w": torch.full((3,), value)}, "iteration": int(value), "name": "x", "nested": [1, (2.5, None)]}


def test_atomic_save_roundtrip(tmp_path):
    path = str(tmp_path / "sub" / "latest.pt")
    ck.atomic_save(_payload(1.0), path)
    obj = ck.load_checkpoint(path)
    assert obj["iteration"] == 1 and torch.equal(obj["model"]["w"], torch.ones(3))
    assert obj["nested"] == [1, (2.5, None)]
    assert os.listdir(tmp_path / "sub") == ["latest.pt"]  # no temporary file left behind
    # The umask's permissions, as torch.save gives (0644 under umask 022): colleagues on a shared file system can
    # evaluate a run's checkpoints, not only its config and logs.
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~_umask()


def test_crash_during_save_keeps_previous(tmp_path, monkeypatch):
    path = str(tmp_path / "latest.pt")
    ck.atomic_save(_payload(1.0), path)
    real_save = torch.save

    def crashing_save(obj, f, *args, **kwargs):
        f.write(b"partial garbage")  # some bytes reach the disk, then the process "dies"
        raise KeyboardInterrupt("killed while saving")

    monkeypatch.setattr(torch, "save", crashing_save)
    with pytest.raises(KeyboardInterrupt):
        ck.atomic_save(_payload(2.0), path)
    monkeypatch.setattr(torch, "save", real_save)
    obj = ck.load_checkpoint(path)
    assert obj["iteration"] == 1 and torch.equal(obj["model"]["w"], torch.ones(3))
    assert os.listdir(tmp_path) == ["latest.pt"]

    # A crash after the data was written but before the rename also leaves the old file.
    def failing_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        ck.atomic_save(_payload(3.0), path)
    monkeypatch.undo()
    assert ck.load_checkpoint(path)["iteration"] == 1
    assert os.listdir(tmp_path) == ["latest.pt"]


def test_a_ctrl_c_inside_torch_save_is_an_interrupt_not_a_disk_error(tmp_path, monkeypatch):
    """A second Ctrl-C while torch.save writes: the signal's KeyboardInterrupt, raised in a write call of torch's zip
    writer, surfaces as the writer's RuntimeError ("unexpected pos") on closing; it is the interrupt again."""
    real_save = torch.save

    class InterruptedFile:
        def __init__(self, f):
            self.f, self.calls = f, 0

        def write(self, data):
            self.calls += 1
            if self.calls == 3:
                raise KeyboardInterrupt
            return self.f.write(data)

        def flush(self):
            self.f.flush()

    def save_interrupted(obj, f, *args, **kwargs):
        return real_save(obj, InterruptedFile(f), *args, **kwargs)

    payload = {"model": {"w": torch.ones(4096)}, "iteration": 1}
    with pytest.raises(RuntimeError):  # what torch itself raises (the mechanism this guards against)
        with open(tmp_path / "raw.pt", "wb") as f:
            save_interrupted(payload, f)
    monkeypatch.setattr(torch, "save", save_interrupted)
    with pytest.raises(KeyboardInterrupt):
        ck.atomic_save(payload, str(tmp_path / "latest.pt"))
    assert not (tmp_path / "latest.pt").exists() and not list(tmp_path.glob(".*.tmp"))


def test_text_files_are_written_whole_or_not_at_all(tmp_path, monkeypatch):
    """config.yaml, summaries, reports, analyses, split lists: a write that fails half-way (a kill, a full disk)
    leaves the previous file and no temporary one."""
    from csl.files import atomic_write_text

    path = tmp_path / "sub" / "summary.json"
    atomic_write_text(str(path), '{"a": 1}')
    assert path.read_text() == '{"a": 1}'
    mode = path.stat().st_mode & 0o777
    assert mode == 0o666 & ~_umask()  # what open() gives, not a private temporary file's 0600

    real_fdopen = os.fdopen

    class Torn:  # the file fills up after 3 characters
        def __init__(self, fd, mode):
            self.file = real_fdopen(fd, mode)

        def __enter__(self):
            return self

        def write(self, text):
            self.file.write(text[:3])
            self.file.flush()
            raise OSError(28, "No space left on device")

        def __exit__(self, *exc):
            self.file.close()

    monkeypatch.setattr("csl.files.os.fdopen", Torn)
    with pytest.raises(OSError, match="No space left"):
        atomic_write_text(str(path), '{"a": 2, "b": 3}')
    monkeypatch.undo()
    assert path.read_text() == '{"a": 1}'
    assert os.listdir(path.parent) == ["summary.json"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_failed_save_says_where_and_how_much_space_is_left(tmp_path, monkeypatch):
    """A full disk shows up in torch.save as a RuntimeError about zip positions; the error names the file and the
    free space, and the previous checkpoint stays."""
    path = str(tmp_path / "latest.pt")
    ck.atomic_save(_payload(1.0), path)

    def full_disk_save(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 35348800 vs 35348696")

    monkeypatch.setattr(torch, "save", full_disk_save)
    with pytest.raises(OSError, match=r"could not write checkpoint .*latest\.pt: RuntimeError: .*unexpected pos.* MiB "
                                      r"free on its file system; the previous file, if any, is unchanged"):
        ck.atomic_save(_payload(2.0), path)
    monkeypatch.undo()
    assert ck.load_checkpoint(path)["iteration"] == 1 and os.listdir(tmp_path) == ["latest.pt"]


@pytest.mark.skipif(not hasattr(signal, "SIGXFSZ"), reason="needs a file size limit (RLIMIT_FSIZE)")
def test_failed_save_names_the_writes_own_error(tmp_path):
    """torch.save replaces a failed write's error with "unexpected pos ..."; the write's own error is said instead
    (here a file size limit, ulimit -f, beside plenty of free space; a quota or a full disk likewise)."""
    import resource

    path = str(tmp_path / "latest.pt")
    ck.atomic_save(_payload(1.0), path)
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, limits[1]))  # Python ignores SIGXFSZ: writes fail with EFBIG
    try:
        with pytest.raises(OSError, match=r"could not write checkpoint .*latest\.pt: OSError: \[Errno 27\] File too "
                                          r"large \(.* MiB free on its file system; the previous file, if any, is "
                                          r"unchanged\)"):
            ck.atomic_save({"iteration": 2, "big": torch.zeros(100_000)}, path)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
    assert ck.load_checkpoint(path)["iteration"] == 1 and os.listdir(tmp_path) == ["latest.pt"]


def test_one_serialisation_gives_every_copy_and_a_failed_copy_keeps_the_rest(tmp_path, monkeypatch):
    """best.pt and latest.pt of an improving epoch: torch.save runs once and the second file gets its bytes; a copy
    that fails (a full disk) names its file, leaves its previous version and no temporary file, and the first stays."""
    best, latest = str(tmp_path / "best.pt"), str(tmp_path / "latest.pt")
    ck.atomic_save(_payload(1.0), latest)
    saves = []
    save = torch.save
    monkeypatch.setattr(torch, "save", lambda obj, f, *a, **k: (saves.append(1), save(obj, f, *a, **k))[1])
    ck.atomic_save(_payload(2.0), best, latest)
    assert len(saves) == 1 and open(best, "rb").read() == open(latest, "rb").read()
    assert ck.load_checkpoint(latest)["iteration"] == 2
    assert os.stat(latest).st_mode & 0o777 == 0o666 & ~_umask()

    def full_disk(source, target, length=0):
        target.write(source.read(10))
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ck.shutil, "copyfileobj", full_disk)
    with pytest.raises(OSError, match=r"could not write checkpoint .*latest\.pt: OSError: \[Errno 28\] No space left "
                                      r"on device \(.* MiB free on its file system; the previous file, if any, is "
                                      r"unchanged\)"):
        ck.atomic_save(_payload(3.0), best, latest)
    assert ck.load_checkpoint(best)["iteration"] == 3 and ck.load_checkpoint(latest)["iteration"] == 2
    assert sorted(os.listdir(tmp_path)) == ["best.pt", "latest.pt"]


class _Custom:
    pass


def test_only_plain_data_is_saved(tmp_path):
    with pytest.raises(TypeError, match=r"checkpoint\['extra'\] is a _Custom"):
        ck.atomic_save({"extra": _Custom()}, str(tmp_path / "x.pt"))
    with pytest.raises(TypeError, match="keys must be str or int"):
        ck.atomic_save({"d": {(1, 2): 3}}, str(tmp_path / "x.pt"))
    assert not os.listdir(tmp_path)


def test_weights_only_refuses_arbitrary_objects(tmp_path):
    path = str(tmp_path / "evil.pt")
    torch.save({"extra": _Custom()}, path)  # written without the plain-data check
    # One line naming what the file holds, not torch's paragraph of advice.
    with pytest.raises(ValueError, match=r"weights_only=True: UnpicklingError: Unsupported global: .*_Custom") as e:
        ck.load_checkpoint(path)
    assert "\n" not in str(e.value) and "\x1b" not in str(e.value)
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        ck.load_checkpoint(str(tmp_path / "missing.pt"))
    torch.save([1, 2], str(tmp_path / "list.pt"))
    with pytest.raises(ValueError, match="expected a dict"):
        ck.load_checkpoint(str(tmp_path / "list.pt"))


def test_a_unimatch_checkpoint_with_numpy_numbers_loads(tmp_path):
    """UniMatch's unimatch.py saves previous_best = max(np.mean(iou_class), previous_best), a numpy.float64 (also at
    0: max keeps its first argument on a tie): weights_only loading takes NumPy numbers, and still refuses a NumPy
    object array."""
    path = str(tmp_path / "best.pth")
    iou = np.mean(np.array([0.5, 0.75]))
    torch.save({"model": {"module.w": torch.ones(2)}, "optimizer": {"state": {}, "param_groups": []}, "epoch": 3,
                "previous_best": max(iou, 0.0), "counts": np.int64(7), "flag": np.bool_(True)}, path)
    ckpt = ck.load_checkpoint(path)
    assert ckpt["previous_best"] == 0.625 and ckpt["counts"] == 7 and ckpt["flag"]
    assert torch.equal(ck.model_state(ckpt)["w"], torch.ones(2)) and ck.checkpoint_iteration(path) == -1
    # As NumPy 1 wrote it (UniMatch's released runs): the scalar's module is numpy.core.multiarray.
    import zipfile

    numpy1 = str(tmp_path / "numpy1.pth")
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(numpy1, "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            if item.filename.endswith("data.pkl"):
                assert b"numpy._core.multiarray" in data
                data = data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
            dst.writestr(item, data)
    assert ck.load_checkpoint(numpy1)["previous_best"] == 0.625
    # The caller's own allowlist is kept.
    before = torch.serialization.get_safe_globals()
    torch.serialization.add_safe_globals([np.dtype])
    try:
        ck.load_checkpoint(path)
        assert np.dtype in torch.serialization.get_safe_globals()
    finally:
        torch.serialization.clear_safe_globals()
        torch.serialization.add_safe_globals(before)
    torch.save({"model": {"w": torch.ones(2)}, "ids": np.array(["a", None], dtype=object)}, path)
    with pytest.raises(ValueError, match="weights_only=True: UnpicklingError"):
        ck.load_checkpoint(path)
    # The same refusal of a file in torch's legacy (non-zip) format, which older torch versions wrote: said as the
    # refusal, not as a file "cut short, corrupt, or another kind of file".
    torch.save({"model": {"w": torch.ones(2)}, "ids": np.array([1.5, 2.5])}, path,
               _use_new_zipfile_serialization=False)
    with pytest.raises(ValueError, match=r"cannot load checkpoint .* with weights_only=True: UnpicklingError: .*"
                                         r"numpy") as e:
        ck.load_checkpoint(path)
    assert "corrupt" not in str(e.value) and "\n" not in str(e.value)


def test_rng_capture_restore_every_stream(tmp_path):
    gen = torch.Generator().manual_seed(7)
    state = ck.capture_rng({"step": gen})
    path = str(tmp_path / "rng.pt")
    ck.atomic_save({"rng": state}, path)

    def draw():
        return (random.random(), float(np.random.rand()), float(np.random.randn()), torch.rand(3),
                torch.rand(2, generator=gen))

    first = draw()
    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    gen.manual_seed(99)
    ck.restore_rng(ck.load_checkpoint(path)["rng"], {"step": gen})
    second = draw()
    assert first[:3] == second[:3]
    assert torch.equal(first[3], second[3]) and torch.equal(first[4], second[4])
    with pytest.raises(KeyError, match="no state for the random generator 'other'"):
        ck.restore_rng(state, {"other": torch.Generator()})


def test_model_state_accepts_trainer_and_bare_checkpoints():
    sd = {"module.a": torch.zeros(1), "module.b": torch.ones(2)}
    assert set(ck.model_state({"model": sd})) == {"a", "b"}
    assert set(ck.model_state({"a": torch.zeros(1)})) == {"a"}
    with pytest.raises(ValueError, match="no model state dict"):
        ck.model_state({"model": {"a": 1}})


def test_checkpoint_iteration_reads_zip_and_legacy_files(tmp_path):
    from csl.checkpoint import checkpoint_iteration

    torch.save({"iteration": 7, "model": {"w": torch.zeros(3)}}, tmp_path / "zip.pt")
    torch.save({"iteration": 9}, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    torch.save({"model": {"w": torch.zeros(3)}}, tmp_path / "weights.pt")
    assert [checkpoint_iteration(str(tmp_path / n)) for n in ("zip.pt", "legacy.pt", "weights.pt")] == [7, 9, -1]
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(ValueError, match="junk.pt is not a readable PyTorch checkpoint"):
        checkpoint_iteration(str(tmp_path / "junk.pt"))


def test_a_file_that_is_no_checkpoint_is_said_to_be_one(tmp_path):
    """An empty file, a cut-short checkpoint, a text file and a folder: each named as what it is."""
    good = tmp_path / "good.pt"
    torch.save({"model": {"w": torch.ones(64)}, "iteration": 3}, good)
    assert ck.load_checkpoint(str(good))["iteration"] == 3
    cut = tmp_path / "cut.pt"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    cut_in_end_record = tmp_path / "cut_in_end_record.pt"  # its signature written, not the record's last bytes
    cut_in_end_record.write_bytes(good.read_bytes()[:-5])
    text = tmp_path / "text.pt"
    text.write_text("not a checkpoint\n")
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    folder = tmp_path / "latest.pt"
    folder.mkdir()
    cut_short = r"not a readable PyTorch checkpoint \(a zip archive cut short: \d+ bytes, a copy or a save that did " \
                r"not finish\?\)$"
    for path, match in ((cut, cut_short), (cut_in_end_record, cut_short),
                        (text, r"not a readable PyTorch checkpoint .*17 bytes, starting b'not a checkpoint\\n'\)$"),
                        (empty, r"is empty \(0 bytes\)"),
                        (folder, "is a folder; give the checkpoint file in it")):
        with pytest.raises(ValueError, match=match) as e:
            ck.load_checkpoint(str(path))
        assert "\n" not in str(e.value), str(e.value)
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        ck.load_checkpoint(str(tmp_path / "missing.pt"))


def flip_a_bit_in_record(path, record_suffix: str, at: int = 100) -> str:
    """Flip one bit of the record of the ``torch.save`` archive ``path`` whose name ends in ``record_suffix``, as a
    bad disk sector or a damaged copy would; the record's name."""
    import zipfile

    with zipfile.ZipFile(path) as archive:
        record = next(r for r in archive.infolist() if r.filename.endswith(record_suffix))
    with open(path, "r+b") as f:
        f.seek(record.header_offset + 26)
        name_length, extra_length = (int.from_bytes(f.read(2), "little") for _ in range(2))
        f.seek(record.header_offset + 30 + name_length + extra_length + min(at, record.file_size - 1))
        byte = f.read(1)[0]
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte ^ 0x10]))
    return record.filename


def test_a_checkpoint_with_a_flipped_bit_is_named_damaged_not_loaded(tmp_path):
    """torch.load does not compare a record's bytes with the CRC-32 stored beside them: one flipped bit in a tensor
    loads as a silently different weight. Every reader of checkpoints checks them first and names the record."""
    from csl.demo import slim_checkpoints

    weights = torch.linspace(-1, 1, 4096)
    for suffix, meaning in (("data/0", "tensor data"), ("data.pkl", "the pickled structure")):
        path = tmp_path / suffix.replace("/", "_") / "latest.pt"
        path.parent.mkdir()
        torch.save({"model": {"w": weights}, "iteration": 3}, path)
        record = flip_a_bit_in_record(path, suffix)
        if suffix == "data/0":  # what torch.load alone makes of it
            assert not torch.equal(torch.load(path, weights_only=True)["model"]["w"], weights)
        for read in (ck.load_checkpoint, ck.checkpoint_iteration, slim_checkpoints):
            with pytest.raises(ValueError, match=rf"checkpoint .*latest.pt is damaged: its record '{record}' "
                                                 rf"\({meaning}.*does not match the CRC-32 stored with it"):
                read(str(path) if read is not slim_checkpoints else str(path.parent))
    intact = tmp_path / "intact.pt"
    torch.save({"model": {"w": weights}, "iteration": 4}, intact)
    assert torch.equal(ck.load_checkpoint(str(intact))["model"]["w"], weights)
    assert ck.checkpoint_iteration(str(intact)) == 4


def test_a_checkpoint_with_a_damaged_record_header_is_named_damaged(tmp_path):
    """A bit flipped in a record's headers rather than its bytes makes zipfile raise something other than its CRC
    error (EOFError, NotImplementedError for the compression method, RuntimeError for encryption; BadZipFile from
    zipfile.is_zipfile for a damaged zip64 locator): still a ValueError naming the file, never a bare zipfile error."""
    import zipfile

    intact = tmp_path / "intact.pt"
    torch.save({"model": {"w": torch.linspace(-1, 1, 512)}, "iteration": 3}, intact)
    data = intact.read_bytes()
    with zipfile.ZipFile(intact) as archive:
        tensor = next(r for r in archive.infolist() if r.filename.endswith("data/0"))
        last = archive.infolist()[-1]
    directory = data.index(b"PK\x01\x02")  # the tensor's entry in the central directory
    while not data[directory + 46:directory + 46 + len(tensor.filename)] == tensor.filename.encode():
        directory = data.index(b"PK\x01\x02", directory + 1)
    zip64_locator = data.rindex(b"PK\x06\x07")  # torch.save writes zip64 end records
    cases = {  # offset of the byte, the bits flipped, what the message says
        "extra field length of the last record": (last.header_offset + 29, 0xFF, "its record '.*' .*EOFError"),
        "compression method": (directory + 10, 0x40, r"its record '.*data/0' \(tensor data\) .*NotImplementedError"),
        "encryption flag": (directory + 8, 0x01, r"its record '.*data/0' \(tensor data\) .*RuntimeError"),
        "number of disks in the zip64 locator": (zip64_locator + 16, 0x80, r"not a readable PyTorch checkpoint \(a "
                                                 r"zip archive whose end records do not lead to its directory: \d+ "
                                                 r"bytes, ended as a save ends, then changed on disk or in a copy\?\)"),
    }
    for offset, bits, match in cases.values():
        damaged = bytearray(data)
        damaged[offset] ^= bits
        path = tmp_path / "latest.pt"
        path.write_bytes(bytes(damaged))
        for read in (ck.load_checkpoint, ck.checkpoint_iteration):
            with pytest.raises(ValueError, match=rf"checkpoint .*latest.pt (is damaged: )?.*{match}"):
                read(str(path))


def test_a_checkpoint_written_without_checksums_loads(tmp_path):
    """torch.save with ``compute_crc32 = False`` stores every CRC as 0: nothing to compare, so it loads as torch.load
    loads it."""
    config = pytest.importorskip("torch.utils.serialization").config
    if not hasattr(config.save, "compute_crc32"):
        pytest.skip(f"torch {torch.__version__} always writes checksums")
    path = tmp_path / "no_crc.pt"
    config.save.compute_crc32 = False
    try:
        torch.save({"model": {"w": torch.arange(5.0)}, "iteration": 2}, path)
    finally:
        config.save.compute_crc32 = True
    assert torch.equal(ck.load_checkpoint(str(path))["model"]["w"], torch.arange(5.0))
    assert ck.checkpoint_iteration(str(path)) == 2


def test_a_checkpoint_is_fsynced_before_its_rename_and_its_folder_after(tmp_path, monkeypatch):
    """A power loss right after a save leaves the new latest.pt or the old one, never a renamed empty file: the data
    reaches the disk before the rename, the folder's new entry after it."""
    import stat

    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", "folder" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file"))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(("rename", os.path.basename(dst)))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    ck.atomic_save(_payload(1.0), str(tmp_path / "latest.pt"))
    assert events == [("fsync", "file"), ("rename", "latest.pt"), ("fsync", "folder")]


def test_a_custom_object_inside_a_list_is_refused_before_saving(tmp_path):
    with pytest.raises(TypeError, match=r"checkpoint\['extra'\]\[1\]\[0\] is a _Custom"):
        ck.atomic_save({"extra": [1, (_Custom(),)]}, str(tmp_path / "x.pt"))
    assert not os.listdir(tmp_path)


def test_rng_restore_keeps_numpys_cached_gaussian(tmp_path):
    """NumPy's legacy generator draws normals in pairs and keeps the second in its state: a checkpoint taken between
    the two continues with that number, not a fresh pair."""
    np.random.seed(3)
    np.random.randn()
    state = ck.capture_rng()
    assert state["numpy"]["has_gauss"] == 1
    path = str(tmp_path / "rng.pt")
    ck.atomic_save({"rng": state}, path)
    expected = np.random.randn(3)
    np.random.seed(99)
    ck.restore_rng(ck.load_checkpoint(path)["rng"])
    np.testing.assert_array_equal(np.random.randn(3), expected)


def test_model_state_strips_the_ddp_prefix_only_when_every_key_has_it():
    sd = {"module.a": torch.zeros(1), "backbone.b": torch.ones(2)}
    assert set(ck.model_state({"model": sd})) == {"module.a", "backbone.b"}


def test_weights_of_another_shape_are_a_config_error_that_names_them():
    from csl.config import ConfigError

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1))
    state = {"0.weight": torch.zeros(5, 3, 1, 1), "0.bias": torch.zeros(5)}  # another class count: same names
    with pytest.raises(ConfigError, match=r"other.pt does not fit the model of this config .*2 weights of another "
                                          r"shape \(e\.g\. 0\.weight \(5, 3, 1, 1\) in the checkpoint, \(4, 3, 1, 1\) "
                                          r"in the model"):
        ck.load_weights(model, state, "other.pt")


def test_a_checkpoint_folder_that_cannot_be_made_is_the_error_said(tmp_path, monkeypatch):
    """The message names the checkpoint and the real cause, not an error of measuring the free space of a folder
    that does not exist."""
    import csl.files

    def denied(path, exist_ok=False):
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr(csl.files.os, "makedirs", denied)
    path = tmp_path / "newdir" / "latest.pt"
    with pytest.raises(OSError, match=rf"could not write checkpoint {path}: PermissionError: .*Permission denied.* "
                                      rf"\(\d+ MiB free on its file system; the previous file, if any, is unchanged\)"):
        ck.atomic_save(_payload(1.0), str(path))
    monkeypatch.undo()
    (tmp_path / "afile").write_text("x")
    with pytest.raises(OSError, match=r"could not write checkpoint .*afile/run/latest.pt: .*\(\d+ MiB free"):
        ck.atomic_save(_payload(1.0), str(tmp_path / "afile" / "run" / "latest.pt"))
