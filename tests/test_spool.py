"""The spool directory (serve_app.media.spool): ownership, modes, random names, cleanup, sweeping."""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import stat

import numpy as np
import pytest

from serve_app.media.spool import Spool, SpooledFile
from tests.support.spool import age, spool_entries


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_a_missing_directory_is_created_private(tmp_path):
    Spool(tmp_path / "spool")
    assert mode(tmp_path / "spool") == 0o700


def test_the_job_spool_made_first_leaves_the_request_spool_private(tmp_path):
    """The job runner's spool lives inside the request spool; whichever replica starts first makes it."""
    old = os.umask(0o022)
    try:
        Spool(tmp_path / "spool" / "jobs")
        Spool(tmp_path / "spool")  # refused (open to others) when its parent was made with the umask's mode
    finally:
        os.umask(old)
    assert mode(tmp_path / "spool") == 0o700 and mode(tmp_path / "spool" / "jobs") == 0o700


def test_a_directory_open_to_group_or_others_is_refused(tmp_path):
    directory = tmp_path / "shared"
    directory.mkdir(mode=0o750)
    directory.chmod(0o750)
    with pytest.raises(ValueError, match="group or others"):
        Spool(directory)


@pytest.mark.skipif(os.getuid() != 0, reason="only root can give a directory to another user")
def test_a_directory_owned_by_another_user_is_refused(tmp_path):
    directory = tmp_path / "theirs"
    directory.mkdir(mode=0o700)
    os.chown(directory, 4242, -1)
    with pytest.raises(ValueError, match="not owned"):
        Spool(directory)


def test_a_committed_file_holds_what_was_written(tmp_path):
    spool = Spool(tmp_path)
    chunks = [os.urandom(65536) for _ in range(5)] + [b"tail"]
    with spool.writer("upload") as writer:
        for chunk in chunks:
            writer.write(memoryview(chunk))
        assert writer.size == 5 * 65536 + 4
        spooled = writer.commit()
    content = b"".join(chunks)
    assert spooled == SpooledFile(spooled.path, len(content), hashlib.sha256(content).hexdigest())
    assert open(spooled.path, "rb").read() == content
    assert os.path.dirname(spooled.path) == str(tmp_path) and mode(spooled.path) == 0o600
    name = os.path.basename(spooled.path)
    assert name.startswith("upload-") and len(name) == len("upload-") + 32


def test_item_sizes_are_counted_in_bytes(tmp_path):
    # int16 PCM arrives as a numpy buffer: two bytes an item.
    with Spool(tmp_path).writer("pcm") as writer:
        writer.write(memoryview(np.arange(10, dtype="<i2")))
        assert writer.commit().size == 20


def test_names_are_random(tmp_path):
    spool = Spool(tmp_path)
    paths = set()
    for _ in range(20):
        with spool.writer("pcm") as writer:
            paths.add(writer.commit().path)
    assert len(paths) == 20


def test_leaving_without_commit_deletes_the_file(tmp_path):
    spool = Spool(tmp_path)
    with spool.writer("upload") as writer:
        writer.write(b"partial")
    with pytest.raises(RuntimeError):
        with spool.writer("upload") as writer:
            writer.write(b"partial")
            raise RuntimeError("client went away")
    assert spool_entries(tmp_path) == []


def test_an_unknown_kind_is_refused(tmp_path):
    with pytest.raises(ValueError):
        Spool(tmp_path).writer("../../etc/passwd")


def test_remove_is_idempotent_and_stays_inside_the_spool(tmp_path):
    spool = Spool(tmp_path / "spool")
    with spool.writer("upload") as writer:
        spooled = writer.commit()
    spool.remove(spooled)
    spool.remove(spooled)
    spool.remove(spooled.path)
    assert not os.path.exists(spooled.path)
    outside = tmp_path / "keep"
    outside.write_text("mine")
    for path in (str(outside), str(tmp_path / "spool" / ".." / "keep"), str(tmp_path / "spool")):
        with pytest.raises(ValueError):
            spool.remove(path)
    assert outside.exists()


def _committed(spool: Spool, *kinds: str) -> list:
    files = []
    for kind in kinds:
        with spool.writer(kind) as writer:
            files.append(writer.commit())
    return files


def test_sweep_deletes_only_old_spool_files(tmp_path):
    spool = Spool(tmp_path)
    files = _committed(spool, "upload", "pcm", "upload")
    unrelated = tmp_path / "notes.txt"
    unrelated.write_text("not the spool's")
    age(files[0].path, files[1].path, unrelated, tmp_path / ".volume", seconds=3600)
    assert spool.sweep(older_than_s=600) == 2
    assert sorted(tmp_path.iterdir()) == sorted([tmp_path / os.path.basename(files[2].path), unrelated, tmp_path / ".volume"])


def test_sweep_spares_the_files_it_is_told_are_held(tmp_path):
    spool = Spool(tmp_path)
    files = _committed(spool, "pcm", "envelope", "pcm")
    age(*(file.path for file in files), seconds=3600)
    assert spool.sweep(older_than_s=600, keep={files[0].path, files[1].path}) == 1
    assert not os.path.exists(files[2].path) and os.path.exists(files[0].path) and os.path.exists(files[1].path)


def test_every_process_that_sees_the_same_directory_reads_the_same_mark(tmp_path):
    directory = tmp_path / "shared"
    with multiprocessing.get_context("fork").Pool(8) as pool:  # all racing to write the first mark
        marks = pool.map(_mark_of, [directory] * 16)
    assert len(set(marks)) == 1 and len(marks[0]) == 32
    assert Spool(directory).volume == marks[0]
    assert [entry.name for entry in directory.iterdir()] == [".volume"]  # no draft left behind
    assert Spool(tmp_path / "elsewhere").volume != marks[0]  # another directory: another filesystem, for all a process knows


def _mark_of(directory) -> str:
    return Spool(directory).volume
