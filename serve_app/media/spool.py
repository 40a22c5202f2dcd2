"""A spool directory on local disk for uploads and decoded PCM, so no process holds one whole.

Why a spool and not Ray's object store: what is written to a file sits in the page cache, which is
not the writer's resident memory, so a 2 GiB upload costs the ingress one 64 KiB chunk at a time,
and the scanner reads it back the same way. A file also outlives the process that wrote it (the
asynchronous job API needs that), while an object in Ray's store dies with its owner. Replicas hand
each other spool paths, so on several nodes the spool must be one shared filesystem (NFS, EFS, a
ReadWriteMany volume) mounted at the same path everywhere (docs/operations.md). Each spool carries
a mark (`volume`: a random token in its `.volume` file, written once by whichever process comes
first), so processes can tell whether they really see the same directory: the ingress compares
its mark with the scanners' and job runners' and reports a spool that is not shared.

Failure policy:
- the directory must belong to this uid and be closed to group and others (ValueError otherwise):
  uploads are untrusted content and decoded audio is the client's data;
- file names are random (secrets.token_hex) with a kind prefix, never derived from anything the
  client sent; files are created O_EXCL | O_NOFOLLOW, mode 0o600;
- a SpoolWriter left without commit(), by an exception or not, deletes its file, so a refused or
  broken upload leaves nothing behind; committed files are the caller's to remove();
- files orphaned by a crashed process are deleted by sweep(), which spares the files still in use
  that its caller names.

Writes are plain blocking writes: they land in the page cache, microseconds per 64 KiB chunk.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import stat
import time
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

SpoolKind = Literal["upload", "pcm", "envelope"]
VOLUME_MARK = ".volume"  # no kind prefix: sweep() never takes it
_KINDS: tuple[str, ...] = get_args(SpoolKind)
_NAME_BYTES = 16  # 128 random bits: unguessable, never colliding in practice (O_EXCL catches it)


@dataclass(frozen=True)
class SpooledFile:
    """A committed spool file: complete, closed, and the caller's to remove."""

    path: str  # absolute path inside the spool
    size: int  # bytes
    sha256: str  # hex digest of the content


class SpoolWriter:
    """Appends to a new spool file, counting and hashing as it goes; a context manager.

    Leaving the `with` block without commit() deletes the file.
    """

    def __init__(self, path: str, descriptor: int):
        self._path = path
        self._file = os.fdopen(descriptor, "wb")  # buffered: handles short writes, 8 KiB buffer
        self._hash = hashlib.sha256()
        self._size = 0
        self._committed = False

    def __enter__(self) -> SpoolWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if not self._committed:
            self._discard()

    def write(self, chunk: bytes | memoryview) -> None:
        view = memoryview(chunk).cast("B")  # counts bytes, whatever the item size (int16 PCM)
        self._file.write(view)
        self._hash.update(view)
        self._size += len(view)

    @property
    def size(self) -> int:
        return self._size

    def commit(self) -> SpooledFile:
        """Close the file and keep it."""
        if self._committed:
            raise ValueError("this spool file is already committed")
        self._file.close()
        self._committed = True
        return SpooledFile(self._path, self._size, self._hash.hexdigest())

    def _discard(self) -> None:
        try:
            self._file.close()
        finally:
            Path(self._path).unlink(missing_ok=True)


class Spool:
    """The spool directory: hands out writers, removes files, sweeps orphans."""

    def __init__(self, directory: str | Path):
        path = Path(directory).absolute()
        # Each missing directory, parents too, made 0700 (mkdir(parents=True) makes parents with the
        # umask's mode): the job spool inside the request spool, made first by another replica,
        # must not leave the request spool open to others.
        for missing in reversed([path, *path.parents]):
            if not missing.exists():
                missing.mkdir(mode=0o700, exist_ok=True)
        # realpath: remove() compares parents, which must not depend on how the path was spelt.
        self._directory = os.path.realpath(path)
        status = os.stat(self._directory)
        if not stat.S_ISDIR(status.st_mode):
            raise ValueError(f"the spool {self._directory} is not a directory")
        if status.st_uid != os.getuid():
            raise ValueError(f"the spool {self._directory} is not owned by this user")
        if status.st_mode & 0o077:
            raise ValueError(f"the spool {self._directory} is open to group or others (needs mode 0700)")
        self._volume = _volume_mark(self._directory)

    @property
    def volume(self) -> str:
        """The spool's mark: the same in every process, on any node, that sees this very directory."""
        return self._volume

    def writer(self, kind: SpoolKind) -> SpoolWriter:
        if kind not in _KINDS:
            raise ValueError(f"a spool file is one of: {', '.join(_KINDS)}")
        path = os.path.join(self._directory, f"{kind}-{secrets.token_hex(_NAME_BYTES)}")
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        return SpoolWriter(path, os.open(path, flags, 0o600))

    def move_in(self, path: str) -> str:
        """Move a file of another spool on the same filesystem into this one (same name); its new path."""
        name = os.path.basename(path)
        if not name.startswith(tuple(f"{kind}-" for kind in _KINDS)):
            raise ValueError("not a spool file")
        target = os.path.join(self._directory, name)
        os.rename(path, target)  # atomic; never a copy of hours of audio
        return target

    def remove(self, file: SpooledFile | str) -> None:
        """Delete a spool file; a missing one is fine, a path outside the spool is a ValueError."""
        path = os.path.abspath(file.path if isinstance(file, SpooledFile) else file)
        if os.path.dirname(path) != self._directory:
            raise ValueError("not a file in this spool")
        Path(path).unlink(missing_ok=True)

    def sweep(self, older_than_s: float, keep: Collection[str] = ()) -> int:
        """Delete spool files not written for `older_than_s` (orphans), except the paths in `keep`;
        returns how many.

        A writer still receiving data keeps its file's mtime fresh, so only files idle that long go.
        Entries this spool did not name (no kind prefix) are left alone.
        """
        cutoff = time.time() - older_than_s
        prefixes = tuple(f"{kind}-" for kind in _KINDS)
        removed = 0
        with os.scandir(self._directory) as entries:
            for entry in entries:
                if not entry.name.startswith(prefixes) or entry.path in keep:
                    continue
                try:
                    if entry.is_file(follow_symlinks=False) and entry.stat(follow_symlinks=False).st_mtime < cutoff:
                        os.unlink(entry.path)
                        removed += 1
                except FileNotFoundError:  # removed meanwhile by its owner
                    continue
        return removed


def _volume_mark(directory: str) -> str:
    """The directory's mark, written first if no process has: drafted apart, then linked into place,
    so no reader ever sees a half-written mark and the first process to link it wins."""
    path = os.path.join(directory, VOLUME_MARK)
    if not os.path.lexists(path):
        draft = os.path.join(directory, f"{VOLUME_MARK}-{secrets.token_hex(8)}")
        with os.fdopen(os.open(draft, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600), "w") as file:
            file.write(secrets.token_hex(_NAME_BYTES))
        try:
            os.link(draft, path)
        except FileExistsError:  # another process marked it meanwhile: its mark stands
            pass
        finally:
            os.unlink(draft)
    with os.fdopen(os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)) as file:
        return file.read()
