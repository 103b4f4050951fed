"""Files and directories that must stay private on a machine shared with other users.

Session directories, the agent's socket directory and token files live in places such
as /tmp where any local user can create names first. Everything here follows these
rules:

* a directory we use must be a real directory (not a symlink), owned by us (or by
  root, where the caller allows it) and not writable by group or others. Every
  directory above it must be one that nobody else can rename it out of: owned by
  us or root and not writable by group or others unless sticky (as /tmp is); any
  symlink on the way must belong to us or root too. Anything else is refused with
  :class:`UnsafePathError`, a one-line message naming the path and what is wrong;
* a directory we create is created with its final mode; we never chmod a path we did
  not just create;
* a file we write is created with ``O_CREAT|O_EXCL|O_NOFOLLOW`` (never through a
  planted symlink or into a file someone else made), then renamed into place inside a
  directory already proven private;
* a file or socket we are about to trust (a token, a cluster address, an agent to
  ask for one) must belong to us (or root) and sit in a directory that passes the
  checks above; a file is checked on the open descriptor, so it cannot be swapped
  between the check and the read;
* one exception, for the system-wide agent: a socket in one of the service's own
  directories (/run/node-agent, /var/lib/node-agent) may belong to the user that owns
  that directory, when only root can have made it there (see system_dir_owner).
  That is how root and the members of group node-agent reach an agent that systemd
  runs as the node-agent user.
"""
from __future__ import annotations

import os
import stat
from typing import Iterable, Optional, Tuple

__all__ = [
    "UnsafePathError", "check_private_dir", "ensure_private_dir", "write_private_file",
    "owned_by_trusted_user", "default_session_root", "check_trusted_socket",
    "read_trusted_file", "replace_symlink", "SYSTEM_SERVICE_DIRS", "system_dir_owner",
    "trusted_socket_uids",
]

#: The directories systemd makes for the node-agent service (RuntimeDirectory=,
#: StateDirectory=) and hands to its User=. See system_dir_owner.
SYSTEM_SERVICE_DIRS = ("/run/node-agent", "/var/lib/node-agent")

#: Largest file read_trusted_file reads: cluster.json and tokens are tiny, and a planted
#: /dev/zero look-alike must not make a driver read forever.
MAX_TRUSTED_FILE_BYTES = 1 << 20


class UnsafePathError(PermissionError):
    """A path we were about to trust is a symlink, owned by another user or writable by
    others. The message names the path and the problem; fix or remove it and retry."""


def _owners(allow_root: bool) -> tuple:
    uid = os.getuid()
    return (uid, 0) if allow_root else (uid,)


def _owner_text(owners: Iterable[int]) -> str:
    me = os.getuid()
    names = [f"uid {me}"]
    names += [f"uid {uid}" for uid in dict.fromkeys(owners) if uid not in (me, 0)]
    if 0 in owners and me != 0:
        names.append("root")
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


def _describe_problem(path: str, st: os.stat_result, owners: Iterable[int],
                      kind: str) -> Optional[str]:
    owners = tuple(owners)
    if stat.S_ISLNK(st.st_mode):
        return f"{path} is a symlink; refusing to use it as a {kind} (remove it and retry)"
    if kind == "directory" and not stat.S_ISDIR(st.st_mode):
        return f"{path} is not a directory"
    if kind == "socket" and not stat.S_ISSOCK(st.st_mode):
        return f"{path} is not a unix socket"
    if kind == "file" and not stat.S_ISREG(st.st_mode):
        return f"{path} is not a regular file"
    if st.st_uid not in owners:
        return (f"{path} is owned by uid {st.st_uid}, not by {_owner_text(owners)}; refusing to "
                f"use another user's {kind} (remove it, or choose another path)")
    if kind != "socket" and st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return (f"{path} is writable by {'others' if st.st_mode & stat.S_IWOTH else 'its group'} "
                f"(mode {stat.S_IMODE(st.st_mode):04o}); refusing to use it as a private {kind} "
                f"(chmod go-w it, or remove it)")
    return None


def _check_ancestors(path: str) -> None:
    """Refuse path when someone else could rename it away and put their own in its place:
    an ancestor (or a symlink on the way) owned by another user, or an ancestor writable
    by group/others without the sticky bit. Root's are fine: root owns /, /tmp, /run."""
    owners = _owners(True)
    parts = os.path.abspath(path).split(os.sep)[1:-1]
    cur = os.sep
    for part in parts:
        if not part:
            continue
        cur = os.path.join(cur, part)
        try:
            lst = os.lstat(cur)
            if stat.S_ISLNK(lst.st_mode):
                if lst.st_uid not in owners:
                    raise UnsafePathError(
                        f"{cur} (above {path}) is a symlink owned by uid {lst.st_uid}; "
                        f"refusing to trust a path another user can redirect")
                st = os.stat(cur)
            else:
                st = lst
        except FileNotFoundError:
            return  # nothing further down exists; the caller reports the missing path
        except OSError as exc:
            raise UnsafePathError(f"cannot inspect {cur} (above {path}): {exc.strerror}") from None
        if st.st_uid not in owners:
            raise UnsafePathError(
                f"{cur} (above {path}) is owned by uid {st.st_uid}, who could replace {path}; "
                f"use a path under directories of yours or root's")
        if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not st.st_mode & stat.S_ISVTX:
            raise UnsafePathError(
                f"{cur} (above {path}) is writable by "
                f"{'others' if st.st_mode & stat.S_IWOTH else 'its group'} without the sticky "
                f"bit (mode {stat.S_IMODE(st.st_mode):04o}); another user could replace {path}")


def check_private_dir(path: str, *, allow_root: bool = False) -> str:
    """Raise UnsafePathError unless path is a real directory owned by us (or root when
    allow_root), not writable by group or others, under ancestors nobody else can use
    to swap it. Returns path."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise UnsafePathError(f"{path} does not exist") from None
    except OSError as exc:
        raise UnsafePathError(f"cannot inspect {path}: {exc.strerror}") from None
    problem = _describe_problem(path, st, _owners(allow_root), "directory")
    if problem:
        raise UnsafePathError(problem)
    _check_ancestors(path)
    return path


def ensure_private_dir(path: str, mode: int = 0o700, *, allow_root: bool = False) -> str:
    """Create path (and missing parents, each with `mode`) or check the existing one.

    The directories above path are checked before anything is created, so a refused
    path leaves nothing of ours behind in a place someone else controls. Every
    directory created here, and path itself, must then pass :func:`check_private_dir`:
    a parent that someone else created between our check and our mkdir is checked like
    one we made. Parents that already existed are only checked as ancestors (see
    check_private_dir). Returns the absolute path.
    """
    path = os.path.abspath(path)
    _check_ancestors(path)  # stops at the first missing one; what we create is checked below
    parent = os.path.dirname(path)
    if parent != path and not os.path.lexists(parent):
        ensure_private_dir(parent, mode, allow_root=allow_root)
    try:
        os.mkdir(path, mode)
    except FileNotFoundError:
        raise UnsafePathError(f"cannot create {path}: {parent} vanished while we created "
                              f"it") from None
    except FileExistsError:
        pass
    return check_private_dir(path, allow_root=allow_root)


def write_private_file(path: str, data: str | bytes, mode: int = 0o600, *,
                       durable: bool = False) -> None:
    """Write data to path atomically, readable only by us.

    The content goes to a fresh temporary name created with O_EXCL|O_NOFOLLOW in the
    same directory and is then renamed over path, so a reader never sees half a file
    and nothing is ever written through a symlink or into another user's file (a
    symlink planted at path is replaced, not followed). The directory should be
    private (see ensure_private_dir): a rename in a directory others can write is not
    safe. With durable, the content is fsynced before the rename and the directory
    after it, so a crash leaves either the old file or the new one, never an empty one.
    """
    raw = data.encode() if isinstance(data, str) else data
    tmp = f"{path}.tmp.{os.getpid()}.{os.urandom(4).hex()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(raw)
            if durable:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
        if durable:
            dfd = os.open(os.path.dirname(path) or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def replace_symlink(target: str, link: str) -> None:
    """Point link at target atomically: the symlink is made under a fresh random name in
    link's directory (which must be private) and renamed over link, so a name someone
    else created there is never followed or written through."""
    tmp = f"{link}.tmp.{os.getpid()}.{os.urandom(4).hex()}"
    os.symlink(target, tmp)
    try:
        os.replace(tmp, link)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def read_trusted_file(path: str, *, allow_root: bool = False,
                      max_bytes: int = MAX_TRUSTED_FILE_BYTES) -> bytes:
    """The contents of path, if it is a regular file owned by us (or root when
    allow_root) and not writable by group or others; else UnsafePathError.

    The file is opened without following a symlink and checked on the open
    descriptor, so it cannot be swapped between the check and the read. Its
    directory is the caller's to check (check_private_dir). FileNotFoundError
    passes through so callers can tell "absent" from "untrusted".
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise
    except OSError as exc:
        if os.path.islink(path):
            raise UnsafePathError(f"{path} is a symlink; refusing to read it as a private "
                                  f"file (remove it and retry)") from None
        raise UnsafePathError(f"cannot open {path}: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as fh:
        problem = _describe_problem(path, os.fstat(fd), _owners(allow_root), "file")
        if problem:
            raise UnsafePathError(problem)
        data = fh.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise UnsafePathError(f"{path} is larger than {max_bytes} bytes; not a file we wrote")
    return data


def system_dir_owner(path: str) -> Optional[int]:
    """The uid that owns path when path is one of SYSTEM_SERVICE_DIRS and only root can
    have made it; None otherwise.

    Only root can create a name in a directory that belongs to root and that neither
    group nor others may write (no sticky-bit exception here: in /tmp anyone creates
    names). When every directory above path is like that, path was made by root, or by
    systemd for the unit's User=, and whoever owns it was given it by root: the user
    the system agent runs as. Its socket and files are then as trustworthy as root's.
    This holds on these fixed paths only: that root gave a user a directory elsewhere
    (a home directory) says nothing about whether to trust that user. path itself must
    be a real directory that neither group nor others may write.
    """
    path = os.path.abspath(path)
    if path not in SYSTEM_SERVICE_DIRS:
        return None
    try:
        st = os.lstat(path)
        if not stat.S_ISDIR(st.st_mode) or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            return None
        cur = os.path.dirname(path)
        while True:
            up = os.lstat(cur)
            if (not stat.S_ISDIR(up.st_mode) or up.st_uid != 0
                    or up.st_mode & (stat.S_IWGRP | stat.S_IWOTH)):
                return None
            if cur == os.sep:
                return st.st_uid
            cur = os.path.dirname(cur)
    except OSError:
        return None


def trusted_socket_uids(path: str, *, allow_root: bool = True) -> Tuple[int, ...]:
    """Whose socket (and listening process) at path we trust: us, root (allow_root),
    and the owner of a system service directory holding it (system_dir_owner)."""
    owners = _owners(allow_root)
    service = system_dir_owner(os.path.dirname(os.path.abspath(path)))
    return owners + (service,) if service is not None and service not in owners else owners


def check_trusted_socket(path: str, *, allow_root: bool = True) -> str:
    """Raise UnsafePathError unless path is a unix socket bound by us (or root, when
    allow_root) in a directory that passes check_private_dir (with the same owners),
    or by the service user in that user's system directory (system_dir_owner).

    Only its owner (or root) can have bound a socket in such a directory, so a client
    that passes this check talks to an endpoint nobody else planted. Root is trusted
    by default: it can read our memory anyway. FileNotFoundError when nothing is there
    (PermissionError when we may not even look, e.g. a 0750 directory of a group we
    are not in).
    """
    path = os.path.abspath(path)
    st = os.lstat(path)  # FileNotFoundError: the caller reports "nothing there"
    owners = trusted_socket_uids(path, allow_root=allow_root)
    problem = _describe_problem(path, st, owners, "socket")
    if problem:
        raise UnsafePathError(problem)
    if system_dir_owner(os.path.dirname(path)) is None:
        check_private_dir(os.path.dirname(path), allow_root=allow_root)
    return path


def owned_by_trusted_user(path: str, *, allow_root: bool = False) -> bool:
    """True when path (not followed if it is a symlink) is owned by us, or by root when
    allow_root. Discovery uses this before trusting a socket or file someone could
    have planted."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return st.st_uid in _owners(allow_root)


def default_session_root() -> str:
    """Where this user's session directories live: $XDG_RUNTIME_DIR/runtime-cluster when
    XDG_RUNTIME_DIR is a private directory of ours (systemd's /run/user/<uid>), else
    /tmp/runtime-cluster-<uid>. Per user, so no user ever creates names inside a
    directory another user can write."""
    base = os.environ.get("XDG_RUNTIME_DIR")
    if base and os.path.isabs(base):
        try:
            check_private_dir(base)
            return os.path.join(base, "runtime-cluster")
        except UnsafePathError:
            pass
    return f"/tmp/runtime-cluster-{os.getuid()}"
