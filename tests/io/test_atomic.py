"""Saving: leftovers of killed saves are recovered or cleaned by the next save or load, symlinked targets keep
their link, files follow the umask, read-only parents and the current folder are handled before any write,
a full disk is a clean OSError that leaves nothing behind."""
import os
import stat

import pytest
from safetensors import SafetensorError

import modelpress as mp
import modelpress.io.atomic as atomic
import modelpress.io.writer as writer
from io_helpers import make, quantized, same_model

DEAD_PID = 2**22 + 12345  # above the default pid_max: never a running process


@pytest.fixture
def two(tmp_path):
    a, b = quantized(seed=0), quantized(seed=1)
    return a, b, mp.save(a, tmp_path / "q")


def leftover(path, kind, pid=DEAD_PID):
    d = path.parent / f".{path.name}.{kind}-{pid}-0badc0de"
    d.mkdir()
    return d


def test_killed_between_the_two_renames_next_load_brings_the_old_copy_back(two, tmp_path):
    a, b, path = two
    old = leftover(path, "old")
    os.replace(path, old / "x")  # the state a kill after the first rename leaves
    tmp = leftover(path, "tmp")
    mp.save(b, tmp / "ignored")  # a complete new copy that was never renamed into place
    assert same_model(a, mp.load(path, make()))
    assert sorted(os.listdir(tmp_path)) == ["q"]


def test_killed_between_the_two_renames_next_save_recovers_then_refuses(two, tmp_path):
    a, b, path = two
    old = leftover(path, "old")
    os.replace(path, old / "x")
    with pytest.raises(FileExistsError, match="not empty"):  # the old copy is back: not silently replaced
        mp.save(b, path)
    assert same_model(a, mp.load(path, make()))
    mp.save(b, path, overwrite=True)
    assert same_model(b, mp.load(path, make())) and sorted(os.listdir(tmp_path)) == ["q"]


def test_stale_leftovers_are_cleaned_live_ones_kept(two, tmp_path):
    a, _, path = two
    leftover(path, "tmp")
    leftover(path, "old")  # a kill after the second rename: the target is the new copy
    (tmp_path / ".q.tmp-abcd1234").mkdir()  # an earlier version's name (no process id)
    live = leftover(path, "tmp", pid=os.getpid())  # a save running now
    other = tmp_path / ".qq.tmp-99999999-00"  # another target's
    other.mkdir()
    assert same_model(a, mp.load(path, make()))
    assert sorted(os.listdir(tmp_path)) == sorted(["q", live.name, other.name])


def test_missing_target_names_the_old_copy_when_it_cannot_be_restored(two, tmp_path, monkeypatch):
    _, _, path = two
    old = leftover(path, "old")
    os.replace(path, old / "x")
    monkeypatch.setattr(atomic, "recover", lambda p: None)  # e.g. no write access to the parent
    with pytest.raises(FileNotFoundError, match=r"previous copy in .*\.q\.old-.*/x"):
        mp.load(path, make())


def test_symlinked_target_keeps_its_link(two, tmp_path):
    a, b, path = two
    link = tmp_path / "link"
    link.symlink_to(path, target_is_directory=True)
    mp.save(b, link, overwrite=True)
    assert link.is_symlink() and os.readlink(link) == str(path)
    assert same_model(b, mp.load(link, make())) and same_model(b, mp.load(path, make()))
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "target")
    mp.save(a, dangling)
    assert dangling.is_symlink() and same_model(a, mp.load(tmp_path / "target", make()))


@pytest.mark.parametrize("umask, dir_mode, file_mode", [(0o022, 0o755, 0o644), (0o077, 0o700, 0o600),
                                                        (0o002, 0o775, 0o664)])
def test_files_follow_the_umask(tmp_path, umask, dir_mode, file_mode):
    old = os.umask(umask)
    try:
        path = mp.save(quantized(), tmp_path / "q")
        f = mp.save_dequantized(quantized(), tmp_path / "plain.safetensors")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == dir_mode
    for p in (path / "model.safetensors", path / "modelpress.json", f):
        assert stat.S_IMODE(p.stat().st_mode) == file_mode, p


def test_empty_target_under_a_read_only_parent_is_written_in_place(tmp_path, monkeypatch):
    target = tmp_path / "ro" / "out"
    target.mkdir(parents=True)
    real_writable = atomic.writable
    monkeypatch.setattr(atomic, "writable", lambda d, probe=None: d != target.parent and real_writable(d, probe))
    m = quantized()
    mp.save(m, target)
    assert sorted(os.listdir(target)) == ["model.safetensors", "modelpress.json"]
    assert same_model(m, mp.load(target, make()))
    with pytest.raises(PermissionError, match="parent folder .* is not writable"):  # replacing it cannot be atomic
        mp.save(quantized(seed=2), target, overwrite=True)
    assert same_model(m, mp.load(target, make()))


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_parent_for_real(tmp_path):
    (tmp_path / "ro" / "out").mkdir(parents=True)
    (tmp_path / "ro").chmod(0o555)
    try:
        m = quantized()
        mp.save(m, tmp_path / "ro" / "out")
        assert same_model(m, mp.load(tmp_path / "ro" / "out", make()))
        with pytest.raises(PermissionError):
            mp.save(m, tmp_path / "ro" / "new")
    finally:
        (tmp_path / "ro").chmod(0o755)


def test_unwritable_location_is_refused_before_writing(tmp_path, monkeypatch):
    monkeypatch.setattr(atomic, "writable", lambda d, probe=None: False)
    with pytest.raises(PermissionError, match="is not writable"):
        writer.check_target(tmp_path / "a" / "b")
    with pytest.raises(PermissionError):
        mp.save(quantized(), tmp_path / "a" / "b")
    assert os.listdir(tmp_path) == []


def test_the_current_folder_is_never_replaced(tmp_path, monkeypatch):
    (tmp_path / "mine.txt").write_text("keep")
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "sub")
    for target in (".", "..", str(tmp_path)):
        with pytest.raises(ValueError, match="current folder or contains it"):
            mp.save(quantized(), target, overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["mine.txt", "sub"]


def test_disk_full_is_a_clean_error_and_leaves_nothing(two, tmp_path, monkeypatch):
    a, b, path = two

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: IoError(No space left on device (os error 28))")

    monkeypatch.setattr(writer, "save_file", full)
    with pytest.raises(OSError, match="cannot write .*No space left on device"):
        mp.save(b, path, overwrite=True)
    with pytest.raises(OSError, match="No space left"):
        mp.save(b, tmp_path / "new")
    assert sorted(os.listdir(tmp_path)) == ["q"] and same_model(a, mp.load(path, make()))


def test_report_files_follow_the_umask_too(tmp_path):
    from modelpress.report import Report

    old = os.umask(0o022)
    try:
        size = {"reference_bytes": 8, "compressed_bytes": 2, "ratio": 4.0}
        paths = Report(model="m", recipe={}, metrics={}, size=size, latency={}, layers=[], seconds=0.0).save(tmp_path)
    finally:
        os.umask(old)
    assert [stat.S_IMODE(p.stat().st_mode) for p in paths] == [0o644, 0o644]


def test_mount_point_target_is_filled_in_place(tmp_path, monkeypatch):
    """A mount point (a container volume) cannot be renamed away: an empty one is filled in place, a full one
    cannot be replaced atomically and is refused before writing."""
    target = tmp_path / "vol"
    target.mkdir()
    real_ismount = os.path.ismount
    monkeypatch.setattr(os.path, "ismount", lambda p: os.fspath(p) == str(target) or real_ismount(p))
    m = quantized()
    mp.save(m, target)
    assert same_model(m, mp.load(target, make())) and sorted(os.listdir(tmp_path)) == ["vol"]
    with pytest.raises(PermissionError, match="is a mount point"):
        mp.save(quantized(seed=2), target, overwrite=True)
