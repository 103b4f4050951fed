"""Packages of local files a runtime_env names: made where the path is (the driver, or the
worker that submits), stored in the GCS's KV under their content hash, unpacked on each
node that runs a worker for them (runtime/runtime_env/installer.py).

* A directory (``working_dir``, or a ``py_modules`` entry) becomes a zip of its files
  minus ``excludes`` and what its ``.gitignore`` files name. Its URI is
  ``gcs://_ray_pkg_<hash>.zip``, the hash covering every file's path, mode and content:
  a directory is packed and uploaded once per content, whoever asks.
* A local ``.zip`` (``excludes`` has no effect, as in Ray) travels as it is, except that
  a single top-level directory holding everything is taken as its root (what ``zip -r
  project.zip project/`` makes); a ``.whl`` (``py_modules``) travels as it is, keeping
  its file name, which pip needs. So a package's root is always the directory it stands
  for, and nodes unpack every package the same way.
* Packages are bounded (``RUNTIME_ENV_PACKAGE_MAX_BYTES``, 100 MiB by default, the size
  Ray documents): beyond it the error names the largest entries and says how to exclude
  them, before anything is read or sent.
"""
from __future__ import annotations

import hashlib
import io
import os
import shutil
import stat
import tempfile
import zipfile
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from runtime.runtime_env.excludes import PatternList

__all__ = ["PACKAGE_NS", "Package", "PackageTooLargeError", "max_package_bytes",
           "package_local", "is_package_uri", "package_key", "wheel_name", "extract_zip"]

#: The GCS KV namespace of packages.
PACKAGE_NS = "runtime_env_packages"
GCS_SCHEME = "gcs://"
PKG_PREFIX = "_ray_pkg_"
HASH_CHARS = 16
_MIB = 1024 * 1024
#: .gitignore files are honoured unless this is "1" (Ray: RAY_RUNTIME_ENV_IGNORE_GITIGNORE).
IGNORE_GITIGNORE_ENV = "RUNTIME_ENV_IGNORE_GITIGNORE"
MAX_BYTES_ENV = "RUNTIME_ENV_PACKAGE_MAX_BYTES"
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)


class PackageTooLargeError(ValueError):
    """A working_dir or py_modules entry is larger than a package may be."""


def max_package_bytes() -> int:
    """The largest package, in bytes (read each time, so an operator's setting applies
    without a restart of the driver's imports)."""
    raw = os.environ.get(MAX_BYTES_ENV)
    return int(raw) if raw else 100 * _MIB


def _mib(n: float) -> str:
    return f"{n / _MIB:.1f} MiB"


@dataclass(frozen=True)
class Package:
    uri: str
    data: bytes  # b"" when the caller said it already has this URI stored


def is_package_uri(value: str) -> bool:
    return value.startswith(GCS_SCHEME + PKG_PREFIX)


def package_key(uri: str) -> bytes:
    """The GCS KV key of a package URI."""
    return uri[len(GCS_SCHEME):].encode()


def wheel_name(uri: str) -> str:
    """The wheel's own file name, kept in its URI after the hash (only a file name: the URI
    came over the network)."""
    name = uri[len(GCS_SCHEME) + len(PKG_PREFIX):]
    return os.path.basename(name[HASH_CHARS + 1:]) or "package.whl"


# -- making packages (where the files are) -------------------------------------------------------
@dataclass
class _File:
    rel: str
    path: str
    size: int
    mtime_ns: int
    mode: int


def _walk(root: str, excludes: Sequence[str]) -> List[_File]:
    """Every file under root that is not excluded, sorted; directories that are excluded are
    not entered. Symlinks are followed (a linked directory once)."""
    specs = [PatternList(list(excludes))] if excludes else []
    use_gitignore = os.environ.get(IGNORE_GITIGNORE_ENV) != "1"
    files: List[_File] = []
    seen_dirs = set()

    def visit(dir_path: str, rel_dir: str, specs: List[PatternList]) -> None:
        real = os.path.realpath(dir_path)
        if real in seen_dirs:
            return
        seen_dirs.add(real)
        if use_gitignore:
            gi = os.path.join(dir_path, ".gitignore")
            if os.path.isfile(gi):
                with open(gi, encoding="utf-8", errors="replace") as fh:
                    spec = PatternList(fh.read().splitlines(), base=rel_dir)
                if spec:
                    specs = specs + [spec]
        with os.scandir(dir_path) as it:
            entries = sorted(it, key=lambda e: e.name)
        for entry in entries:
            rel = f"{rel_dir}/{entry.name}" if rel_dir else entry.name
            try:
                st = os.stat(entry.path)
            except OSError:
                continue  # a dangling symlink: nothing to send
            is_dir = stat.S_ISDIR(st.st_mode)
            if any(s.excludes(rel, is_dir) for s in specs):
                continue
            if is_dir:
                visit(entry.path, rel, specs)
            elif stat.S_ISREG(st.st_mode):
                files.append(_File(rel, entry.path, st.st_size, st.st_mtime_ns, st.st_mode))

    visit(root, "", specs)
    files.sort(key=lambda f: f.rel)
    return files


def _too_large(field: str, path: str, total: int, files: List[_File], limit: int) -> str:
    sizes: Dict[str, int] = {}
    for f in files:
        top = f.rel.split("/", 1)
        name = top[0] + ("/" if len(top) > 1 else "")
        sizes[name] = sizes.get(name, 0) + f.size
    largest = sorted(sizes.items(), key=lambda kv: -kv[1])[:5]
    listing = ", ".join(f"{name} ({_mib(size)})" for name, size in largest)
    return (f"runtime_env {field} {path!r} is {_mib(total)}, over the limit of {_mib(limit)} "
            f"for a package ({MAX_BYTES_ENV}); its largest entries: {listing}. Leave out what "
            f"the workers do not need with runtime_env 'excludes' (gitignore patterns, e.g. "
            f"[{largest[0][0]!r}]) or a .gitignore file.")


#: (kind, real path, prefix, excludes, file list fingerprint) -> URI, so a directory used
#: again unchanged is neither read nor hashed again.
_known: Dict[Tuple, str] = {}


def _package_directory(field: str, path: str, excludes: Sequence[str], include_dir: bool,
                       need: Callable[[str], bool]) -> Package:
    files = _walk(path, excludes)
    total = sum(f.size for f in files)
    limit = max_package_bytes()
    if total > limit:
        raise PackageTooLargeError(_too_large(field, path, total, files, limit))
    prefix = os.path.basename(os.path.normpath(path)) + "/" if include_dir else ""
    listing = hashlib.sha256()
    for f in files:
        listing.update(f"{f.rel}\0{f.size}\0{f.mtime_ns}\0{f.mode}\n".encode())
    key = ("dir", os.path.realpath(path), prefix, tuple(excludes), listing.hexdigest())
    uri = _known.get(key)
    if uri is not None and not need(uri):
        return Package(uri, b"")
    content = hashlib.sha256()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for f in files:
            with open(f.path, "rb") as fh:
                data = fh.read()
            executable = bool(f.mode & 0o111)
            content.update(f"{prefix}{f.rel}\0{int(executable)}\0{len(data)}\0".encode())
            content.update(data)
            info = zipfile.ZipInfo(prefix + f.rel, date_time=_ZIP_TIME)
            info.external_attr = (0o755 if executable else 0o644) << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, data)
    uri = f"{GCS_SCHEME}{PKG_PREFIX}{content.hexdigest()[:HASH_CHARS]}.zip"
    _known[key] = uri
    return Package(uri, buf.getvalue())


def _package_file(field: str, path: str, suffix: str, need: Callable[[str], bool]) -> Package:
    with open(path, "rb") as fh:
        data = fh.read()
    limit = max_package_bytes()
    size = len(data)
    if suffix == ".zip":
        try:
            with zipfile.ZipFile(io.BytesIO(data)) as zf:
                size = sum(i.file_size for i in zf.infolist())
        except zipfile.BadZipFile as exc:
            raise ValueError(f"runtime_env {field} {path!r} is not a valid zip file: {exc}") from None
    if size > limit:
        raise PackageTooLargeError(
            f"runtime_env {field} {path!r} unpacks to {_mib(size)}, over the limit of "
            f"{_mib(limit)} for a package ({MAX_BYTES_ENV}); make it smaller")
    digest = hashlib.sha256(data).hexdigest()[:HASH_CHARS]
    if suffix == ".whl":
        uri = f"{GCS_SCHEME}{PKG_PREFIX}{digest}_{os.path.basename(path)}"
        return Package(uri, data if need(uri) else b"")
    uri = f"{GCS_SCHEME}{PKG_PREFIX}{digest}.zip"
    return Package(uri, _without_top_directory(data) if need(uri) else b"")


def _without_top_directory(data: bytes) -> bytes:
    """The zip with its single top-level directory, if everything is in one, as its root."""
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        infos = [i for i in zf.infolist() if not i.filename.startswith("__MACOSX/")]
        names = [i.filename for i in infos]
        tops = {n.split("/", 1)[0] for n in names}
        if len(tops) != 1 or not all("/" in n for n in names):
            return data
        strip = len(next(iter(tops))) + 1
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as out:
            for info in infos:
                name = info.filename[strip:]
                if not name:
                    continue
                copy = zipfile.ZipInfo(name, date_time=info.date_time)
                copy.external_attr = info.external_attr
                copy.compress_type = zipfile.ZIP_DEFLATED
                out.writestr(copy, zf.read(info))
        return buf.getvalue()


def package_local(field: str, value: str, excludes: Sequence[str],
                  need: Callable[[str], bool]) -> Optional[Package]:
    """The package for the local path `value` of `field` ("working_dir" or "py_modules"),
    or None when it is already a package URI. ``need(uri)`` says whether the caller still
    has to store that URI (else the package comes without its bytes)."""
    if is_package_uri(value):
        return None
    if value.startswith(GCS_SCHEME):
        raise ValueError(f"runtime_env {field} {value!r} is not a package of this cluster "
                         f"(gcs://{PKG_PREFIX}...); pass a local path")
    path = os.path.abspath(os.path.expanduser(value))
    if os.path.isdir(path):
        return _package_directory(field, path, excludes, field == "py_modules", need)
    if not os.path.exists(path):
        raise ValueError(f"runtime_env {field} {value!r} does not exist (relative paths are "
                         f"taken from the current directory, {os.getcwd()!r})")
    lower = path.lower()
    if field == "working_dir" and lower.endswith(".zip"):
        return _package_file(field, path, ".zip", need)
    if field == "py_modules" and lower.endswith(".whl"):
        return _package_file(field, path, ".whl", need)
    what = "a directory or a .zip file" if field == "working_dir" else "a directory or a .whl"
    raise ValueError(f"runtime_env {field} {value!r} is a file; it must be {what}")


# -- unpacking (on the node) -----------------------------------------------------------------------
def extract_zip(data: bytes, dest: str, limit: int) -> None:
    """Unpack a package into dest, atomically (a temporary directory renamed into place),
    refusing entries that would land outside it and packages over `limit` bytes."""
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        infos = [i for i in zf.infolist() if not i.filename.startswith("__MACOSX/")]
        total = sum(i.file_size for i in infos)
        if total > limit:
            raise PackageTooLargeError(f"the package unpacks to {_mib(total)}, over this "
                                       f"node's limit of {_mib(limit)} ({MAX_BYTES_ENV})")
        parent = os.path.dirname(dest)
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".unpack-", dir=parent)
        try:
            for info in infos:
                name = info.filename
                parts = [p for p in name.split("/") if p not in ("", ".")]
                if not parts:
                    continue
                if name.startswith("/") or ".." in parts:
                    raise ValueError(f"the package has the entry {info.filename!r}, which "
                                     f"would land outside its directory")
                target = os.path.join(tmp, *parts)
                if info.is_dir():
                    os.makedirs(target, exist_ok=True)
                    continue
                os.makedirs(os.path.dirname(target), exist_ok=True)
                with zf.open(info) as src, open(target, "wb") as out:
                    shutil.copyfileobj(src, out, 1024 * 1024)
                if (info.external_attr >> 16) & 0o111:
                    os.chmod(target, 0o755)
            try:
                os.rename(tmp, dest)
            except OSError:
                if not os.path.isdir(dest):
                    raise
                shutil.rmtree(tmp, ignore_errors=True)  # someone else unpacked it first
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
