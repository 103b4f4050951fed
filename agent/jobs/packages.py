"""Uploaded working_dir packages: stored on the head's disk, unpacked safely.

``ray job submit --working-dir .`` zips the directory on the client, asks
``GET /api/packages/gcs/_ray_pkg_<hash>.zip`` whether the head has it, ``PUT``s
it if not, and submits with ``runtime_env.working_dir = "gcs://_ray_pkg_<hash>.zip"``.
Ray keeps these zips in the GCS's memory; we keep them as files in the session
directory (0700), so a 100 MiB upload costs disk, not GCS memory, and goes away
with the session.

Limits: one package at most ``max_bytes`` (Ray's 100 MiB by default), all of them
together at most ``max_total_bytes``; unpacked, at most ``max_unpacked_bytes`` and
``MAX_ENTRIES`` entries. Unpacking writes only regular files and directories
strictly inside the target: absolute names, ``..``, symlinks and device entries
are refused (zip slip), each file is created with O_EXCL|O_NOFOLLOW, and sizes
are counted as the bytes are written, not taken from the zip's headers.
"""
from __future__ import annotations

import os
import re
import shutil
import stat
import tempfile
import zipfile
from typing import AsyncIterator, Optional

from runtime.private_fs import ensure_private_dir

#: A package name the client may use: Ray's ``_ray_pkg_<hash>.zip`` and the like.
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}\.zip$")
PROTOCOL = "gcs"
MAX_ENTRIES = 100_000
_CHUNK = 1 << 20


class PackageError(ValueError):
    """A package request or package that cannot be used; ``status`` is the HTTP code."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def check_name(protocol: str, name: str) -> str:
    if protocol != PROTOCOL:
        raise PackageError(f"package protocol {protocol!r} is not supported: this job server "
                           f"stores packages uploaded as {PROTOCOL}://<name>.zip")
    if not _NAME.match(name) or ".." in name:
        raise PackageError(f"package name {name!r} is not allowed: 1 to 128 letters, digits, "
                           f"'.', '_' or '-', ending in .zip")
    return name


def uri_name(uri: str) -> str:
    """``gcs://_ray_pkg_x.zip`` -> ``_ray_pkg_x.zip`` (PackageError for any other URI)."""
    protocol, sep, name = uri.partition("://")
    if not sep:
        raise PackageError(f"{uri!r} is not a package URI")
    return check_name(protocol, name)


class PackageStore:
    def __init__(self, root: str, max_bytes: int, max_total_bytes: int,
                 max_unpacked_bytes: int) -> None:
        self.root = root
        self.zips = os.path.join(root, "packages")
        self.unpacked = os.path.join(root, "working_dirs")
        self.max_bytes = max_bytes
        self.max_total_bytes = max_total_bytes
        self.max_unpacked_bytes = max_unpacked_bytes

    def _ready(self) -> None:
        for d in (self.root, self.zips, self.unpacked):
            ensure_private_dir(d)

    def path(self, name: str) -> str:
        return os.path.join(self.zips, name)

    def exists(self, name: str) -> bool:
        return os.path.isfile(self.path(name))

    def available(self, name: str) -> bool:
        """Whether a job can use the package here: stored, or already unpacked."""
        return self.exists(name) or os.path.isdir(self._target(name))

    def _target(self, name: str) -> str:
        return os.path.join(self.unpacked, name[:-len(".zip")])

    def _used(self) -> int:
        try:
            return sum(e.stat().st_size for e in os.scandir(self.zips) if e.is_file())
        except OSError:
            return 0

    async def store(self, name: str, declared: Optional[int], chunks: AsyncIterator[bytes]
                    ) -> int:
        """Write an upload under a temporary name and rename it into place; refuse it
        (413) as soon as it is known to be too large, before or while reading."""
        self._ready()
        room = self.max_total_bytes - self._used()
        limit = min(self.max_bytes, room)
        why = (f"the package store is full ({self.max_total_bytes} bytes in all); delete old "
               f"jobs or restart the head" if room < self.max_bytes
               else f"packages are limited to {self.max_bytes} bytes")
        if declared is not None and declared > limit:
            raise PackageError(f"package {name} is {declared} bytes: {why}", 413)
        fd, tmp = tempfile.mkstemp(dir=self.zips, prefix=".upload-")
        size = 0
        try:
            with os.fdopen(fd, "wb") as fh:
                async for chunk in chunks:
                    size += len(chunk)
                    if size > limit:
                        raise PackageError(f"package {name} is over {limit} bytes: {why}", 413)
                    fh.write(chunk)
            if not zipfile.is_zipfile(tmp):
                raise PackageError(f"package {name} is not a zip file")
            os.replace(tmp, self.path(name))
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        return size

    def working_dir(self, name: str) -> str:
        """The package unpacked (once; later jobs share it, as in Ray)."""
        self._ready()
        target = self._target(name)
        if os.path.isdir(target):
            return target
        if not self.exists(name):
            raise PackageError(f"package {PROTOCOL}://{name} was not uploaded to this head (or "
                               f"the head restarted since): submit again to upload it", 404)
        tmp = tempfile.mkdtemp(dir=self.unpacked, prefix=".unpack-")
        try:
            safe_extract(self.path(name), tmp, self.max_unpacked_bytes)
            os.chmod(tmp, 0o700)
            try:
                os.rename(tmp, target)
            except OSError:  # another job unpacked it meanwhile
                if not os.path.isdir(target):
                    raise
                shutil.rmtree(tmp, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return target


def _member_parts(name: str) -> list:
    if name.startswith("/") or "\\" in name or "\0" in name:
        raise PackageError(f"zip entry {name!r} has an absolute or odd path")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if any(p == ".." for p in parts):
        raise PackageError(f"zip entry {name!r} points outside the package (..)")
    return parts


def safe_extract(zip_path: str, target: str, max_bytes: int) -> int:
    """Unpack into the (new, empty) directory ``target``; PackageError for anything
    that would escape it or exceed the limits. Returns the bytes written."""
    written = 0
    dir_fd = os.open(target, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with zipfile.ZipFile(zip_path) as zf:
            infos = zf.infolist()
            if len(infos) > MAX_ENTRIES:
                raise PackageError(f"package has {len(infos)} entries (at most {MAX_ENTRIES})")
            for info in infos:
                parts = _member_parts(info.filename)
                if not parts:
                    continue
                mode = info.external_attr >> 16
                is_dir = info.is_dir()
                kind = stat.S_IFMT(mode)  # 0: no type recorded (e.g. writestr): a file
                if kind and kind not in (stat.S_IFREG, stat.S_IFDIR):
                    raise PackageError(f"zip entry {info.filename!r} is not a regular file or "
                                       f"directory (symlinks and devices are refused)")
                parent = dir_fd
                opened = []
                try:
                    for comp in parts[:-1] if not is_dir else parts:
                        try:
                            os.mkdir(comp, 0o700, dir_fd=parent)
                        except FileExistsError:
                            pass
                        parent = os.open(comp, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW,
                                         dir_fd=parent)
                        opened.append(parent)
                    if is_dir:
                        continue
                    perm = 0o700 if mode & 0o111 else 0o600
                    fd = os.open(parts[-1], os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW,
                                 perm, dir_fd=parent)
                    with os.fdopen(fd, "wb") as out, zf.open(info) as src:
                        while True:
                            chunk = src.read(_CHUNK)
                            if not chunk:
                                break
                            written += len(chunk)
                            if written > max_bytes:
                                raise PackageError(f"package unpacks to more than {max_bytes} "
                                                   f"bytes")
                            out.write(chunk)
                except FileExistsError:
                    raise PackageError(f"zip entry {info.filename!r} appears twice") from None
                except OSError as exc:
                    raise PackageError(f"cannot unpack zip entry {info.filename!r}: "
                                       f"{exc.strerror or exc}") from None
                finally:
                    for fd_ in opened:
                        os.close(fd_)
    except zipfile.BadZipFile as exc:
        raise PackageError(f"package is not a valid zip file: {exc}") from None
    finally:
        os.close(dir_fd)
    return written
