"""Confining a model-running process: what it may still do once it runs untrusted artifacts.

The worker loop (the prefork child) confines itself once, after its Redis client exists and
before it reads its first artifact or starts a thread; an isolation child, forked per suspect job,
adds a stricter step. Layers, each applied where the kernel has it (see docs/sandbox.md):

1. ``PR_SET_NO_NEW_PRIVS``: no set-uid binary, no file capability, ever again.
2. Started as root: uid/gid ``uid`` (65532, the container's), no supplementary groups, every other
   capability dropped from the bounding set. Only where Landlock confines reads and a path the
   worker must read is closed to that uid (a Python under ``/root``, a 0600 TLS key) does it keep
   one capability, ``CAP_DAC_READ_SEARCH`` (read, never write), which Landlock then bounds to the
   read-only paths below.
3. Resource limits: address space, open files, processes (per real uid: a fork bomb stops there),
   no core dumps, no file growth (unless stdout/stderr are files, as the logs of ``bastion up``).
4. seccomp (default allow, a kill list): ``execve``, ``ptrace``, ``mount``, namespaces, kernel
   modules, ``bpf``, io_uring (which would bypass the socket rules) and the rest kill the process;
   ``socket()`` is refused (EPERM) but for TCP (and UDP for DNS when a host is a name) over IPv4/6,
   plus ``AF_UNIX`` when Redis is a unix socket. The isolation child: any socket call or fork kills.
5. Landlock: read-only files (the artifact store, the Python installation, shared libraries, TLS
   files, name-service files), ``/dev/null`` read-write, nothing else; TCP connect to the Redis
   (and OTLP) ports only, and to the ports of the upstream servers ``upstream_hosts`` names (Landlock
   rules name ports, not hosts: which host the worker forwards to is checked by the worker, see
   ``bastion.runtime.upstream``); TCP bind to the worker's metrics port only; no abstract unix
   sockets or signals outside the process's own domain.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import resource
import socket
import stat
import sys
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from bastion import logs, procs
from bastion.text.upstream import host_ports

log = logs.get("bastion.worker")

_PR_SET_NO_NEW_PRIVS = 38
_PR_SET_KEEPCAPS = 8
_PR_CAPBSET_DROP = 24
_CAP_DAC_READ_SEARCH = 2
_CAP_LAST_CAP = 63  # PR_CAPBSET_DROP answers EINVAL past the kernel's last one
_LINUX_CAPABILITY_VERSION_3 = 0x20080522

# Files a name lookup reads (getaddrinfo of the Redis host), the CA store and the time zone.
_SYSTEM_READ = (
    "/usr/lib",
    "/usr/lib64",
    "/lib",
    "/lib64",
    "/usr/local/lib",
    "/etc/ld.so.cache",
    "/etc/hosts",
    "/etc/resolv.conf",
    "/etc/nsswitch.conf",
    "/etc/gai.conf",
    "/etc/host.conf",
    "/etc/localtime",
    "/usr/share/zoneinfo",
    "/etc/ssl/certs",
    "/etc/ssl/openssl.cnf",
    "/usr/share/ca-certificates",
    "/dev/urandom",
    "/sys/devices/system/cpu",  # onnxruntime sizes its thread pools from it
)


@dataclass(frozen=True)
class Confinement:
    """What a confined worker may still do. Built from settings by ``from_settings``."""

    enabled: bool = True
    uid: int = 65532
    memory_mb: int = 4096
    max_files: int = 256
    max_procs: int = 256
    read_paths: tuple[Path, ...] = ()  # the artifact store, TLS files: read-only
    tls_files: tuple[Path, ...] = ()  # among them: files a rotation replaces (see ``replaced``)
    connect_ports: tuple[int, ...] = ()  # TCP connect allowed (Redis, OTLP, upstream servers)
    bind_ports: tuple[int, ...] = ()  # TCP bind allowed (the worker's metrics port)
    unix_socket: Path | None = None  # Redis over a unix socket
    dns: bool = False  # a host is a name: UDP sockets for the resolver, TCP to port 53
    hidden: tuple[Path, ...] = field(default=())  # never readable, even through sys.path (the data dir)

    @classmethod
    def from_settings(cls, settings: Any, environ: Mapping[str, str] = os.environ) -> Confinement:
        read: list[Path] = [Path(settings.resolved_artifact_dir).absolute()]
        tls = [Path(v).absolute() for v in (settings.tls_ca, settings.tls_cert, settings.tls_key) if v]
        read.extend(tls)
        hosts: list[str] = []
        ports: list[int] = []
        unix: Path | None = None
        redis_url = settings.redis_url or ""
        parts = urlsplit(redis_url)
        if parts.scheme == "unix":
            unix = Path(parts.path).absolute()
        elif redis_url:
            hosts.append(parts.hostname or "localhost")
            ports.append(parts.port or 6379)
        otlp = environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        if otlp:
            url = urlsplit(otlp)
            hosts.append(url.hostname or "localhost")
            ports.append(url.port or (443 if url.scheme == "https" else 4318))
        elif environ.get("OTEL_TRACES_EXPORTER", "").strip().lower() == "otlp":
            hosts.append("localhost")
            ports.append(4318)
        for host, port in host_ports(getattr(settings, "upstream_hosts", "") or ""):  # ValueError: refused
            hosts.append(host)
            ports.append(port)
        for name in ("CERTIFICATE", "CLIENT_CERTIFICATE", "CLIENT_KEY"):
            for var in (f"OTEL_EXPORTER_OTLP_TRACES_{name}", f"OTEL_EXPORTER_OTLP_{name}"):
                if environ.get(var):
                    read.append(Path(environ[var]).absolute())
        dns = any(not _is_ip(h) for h in hosts)
        if dns:
            ports.append(53)
        bind = (settings.worker_metrics_port,) if settings.worker_metrics_port else ()
        return cls(
            enabled=settings.worker_confine,
            uid=settings.worker_uid,
            memory_mb=settings.worker_memory_mb,
            max_files=settings.worker_max_files,
            max_procs=settings.worker_max_procs,
            read_paths=tuple(read),
            tls_files=tuple(tls),
            connect_ports=tuple(sorted(set(ports))),
            bind_ports=bind,
            unix_socket=unix,
            dns=dns,
            hidden=(Path(settings.data_dir).absolute(),),
        )


_confined = False  # this process confined itself: its isolation children confine themselves further


def confine(c: Confinement) -> dict[str, object]:
    """Confine this process (the worker loop) for good; returns what was applied (also logged).
    A layer the kernel has but that fails to apply is an error (the loop does not run unconfined)."""
    global _confined
    if not c.enabled:
        log.warning("confinement_off")
        return {"enabled": False}
    if threading.active_count() > 1:  # Landlock and capabilities are per thread
        log.warning("confinement_threads_running", threads=threading.active_count())
    try:
        applied = _confine(c)
    except OSError as exc:
        log.error("confinement_failed", error=str(exc))
        raise
    _confined = True
    log.info("confined", **applied)
    return applied


def _confine(c: Confinement) -> dict[str, object]:
    applied: dict[str, object] = {}
    prepare()
    abi = Landlock.abi()
    read = _read_paths(c)
    ruleset = None
    if abi > 0:  # rules are added while still root: every path opens
        ruleset = Landlock(abi)
        for path in read:
            ruleset.allow_read(path)
        ruleset.allow_read_write(Path("/dev/null"))
    _limits(c, applied)
    _prctl(_PR_SET_NO_NEW_PRIVS, 1)
    applied["no_new_privs"] = True
    if os.geteuid() == 0:
        parent, deathsig = os.getppid(), procs.death_signal()
        _drop_uid(c, read, keep_read=abi > 0, applied=applied)
        if deathsig:  # a change of credentials clears the parent-death signal: set it again
            procs.die_with_parent(deathsig)
            if os.getppid() != parent:  # the master died in between: no orphaned loop
                os._exit(1)
    if ruleset is not None:
        ruleset.restrict(connect=c.connect_ports, bind=c.bind_ports)
    else:
        log.warning("landlock_unavailable", reason="the kernel has no Landlock (or it is disabled)")
    applied["landlock_abi"] = abi
    applied["seccomp"] = _seccomp_worker(c)
    if not applied["seccomp"]:  # pyseccomp is a dependency: without it (or libseccomp) the install is broken
        raise OSError(
            "seccomp is unavailable (pyseccomp or libseccomp.so.2 missing): not running unconfined; "
            "install libseccomp2, or set BASTION_WORKER_CONFINE=false to run without any sandbox"
        )
    return applied


def confine_child(keep_fd: int) -> bool:
    """The isolation child's stricter step, on top of its worker loop's confinement (none where the
    loop is not confined): every descriptor closed but stdio and ``keep_fd`` (the answer's pipe;
    the parent's Redis connections stay the parent's), then no socket call of any kind and no new
    process (threads are allowed), or the child is killed. Returns whether it confined."""
    if not _confined:
        return False
    os.closerange(3, keep_fd)
    os.closerange(keep_fd + 1, resource.getrlimit(resource.RLIMIT_NOFILE)[0])
    filt = _seccomp_filter()
    if filt is None:
        return False
    sc, f = filt
    _prctl(_PR_SET_NO_NEW_PRIVS, 1)
    for name in ("socket", "socketpair", "connect", "bind", "listen", "accept", "accept4", "fork", "vfork"):
        _rule(f, sc.KILL_PROCESS, name)
    clone_thread = 0x00010000
    _rule(f, sc.KILL_PROCESS, "clone", sc.Arg(0, sc.MASKED_EQ, clone_thread, 0))
    _rule(f, sc.ERRNO(errno.ENOSYS), "clone3")  # glibc falls back to clone, which is checked
    f.load()
    return True


def identities(paths: Iterable[Path]) -> dict[Path, tuple[int, int]]:
    """(device, inode) of each path, to tell later whether it was replaced."""
    found = {}
    for path in paths:
        try:
            st = os.stat(path)
        except OSError:
            continue
        found[path] = (st.st_dev, st.st_ino)
    return found


def replaced(before: Mapping[Path, tuple[int, int]]) -> list[Path]:
    """The files of ``before`` now replaced by others. Landlock's rule for a file holds its inode: a
    certificate rotation writes new files (``os.replace``), which the confined loop may not read;
    its worker loop is then stopped and forked again, confined to the new ones."""
    now = identities(before)
    return [p for p, ident in before.items() if now.get(p, ident) != ident]


# resource limits, privileges ---------------------------------------------------------------


def _limits(c: Confinement, applied: dict[str, object]) -> None:
    def lower(which: int, value: int) -> None:
        _, hard = resource.getrlimit(which)
        if hard != resource.RLIM_INFINITY:
            value = min(value, hard)
        resource.setrlimit(which, (value, value))

    lower(resource.RLIMIT_CORE, 0)
    lower(resource.RLIMIT_AS, c.memory_mb << 20)
    lower(resource.RLIMIT_NOFILE, c.max_files)
    # RLIMIT_NPROC counts every process and thread of the real uid, machine-wide: it bounds a fork
    # bomb once a root-started worker runs as its own uid; under an ordinary user's uid (a developer's
    # bastion up) it would count their desktop too and could starve the worker, so it is left alone.
    if os.getuid() == 0:
        lower(resource.RLIMIT_NPROC, c.max_procs)
    # Writes to a regular file past the limit raise SIGXFSZ; stdout/stderr may be a log file.
    if not any(_is_regular(fd) for fd in (1, 2)):
        lower(resource.RLIMIT_FSIZE, 0)
        applied["fsize"] = 0
    applied.update(
        address_space_mb=c.memory_mb, max_files=c.max_files, max_procs=c.max_procs if os.getuid() == 0 else "unset"
    )


def _drop_uid(c: Confinement, read: Iterable[Path], keep_read: bool, applied: dict[str, object]) -> None:
    uid = c.uid
    closed = [str(p) for p in read if not _readable_by(p, uid, uid)]
    why = ""
    if closed and not keep_read:  # without Landlock a kept CAP_DAC_READ_SEARCH would read every file
        why = "paths closed to the unprivileged uid, and no Landlock to bound a read capability"
    elif c.unix_socket is not None and not _allows(c.unix_socket, uid, uid, 2):
        why = "the Redis unix socket is closed to the unprivileged uid"
    if why:  # root, but without a capability: NPROC does not bind root, the other layers do
        log.warning("uid_kept", uid=os.getuid(), reason=why, paths=closed[:5])
        _capset(0)
        applied.update(uid=os.getuid(), capabilities="none")
        return
    for cap in range(_CAP_LAST_CAP + 1):
        if not (closed and cap == _CAP_DAC_READ_SEARCH):
            try:
                _prctl(_PR_CAPBSET_DROP, cap)
            except OSError:
                break  # past the kernel's last capability
    if closed:
        _prctl(_PR_SET_KEEPCAPS, 1)
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)
    if closed:
        _capset(1 << _CAP_DAC_READ_SEARCH)
        _prctl(_PR_SET_KEEPCAPS, 0)
        applied["capabilities"] = "CAP_DAC_READ_SEARCH"
        log.info("read_capability_kept", paths=closed[:5])
    else:
        applied["capabilities"] = "none"
    applied["uid"] = uid


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def _capset(caps: int) -> None:
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    low, high = caps & 0xFFFFFFFF, caps >> 32
    data = (_CapData * 2)(_CapData(low, low, 0), _CapData(high, high, 0))
    if _libc().capset(ctypes.byref(header), data) != 0:
        raise _oserror("capset")


def _allows(path: Path, uid: int, gid: int, bits: int) -> bool:
    """Whether the mode bits of ``path`` give ``uid``/``gid`` (no other group) ``bits`` (r=4, w=2, x=1)."""
    try:
        st = os.stat(path)
    except OSError:
        return True  # absent: nothing to refuse
    shift = 6 if st.st_uid == uid else 3 if st.st_gid == gid else 0
    return (st.st_mode >> shift) & bits == bits


def _readable_by(path: Path, uid: int, gid: int) -> bool:
    """Whether ``uid``/``gid`` may reach ``path`` (search every directory above) and read it."""
    if not all(_allows(parent, uid, gid, 1) for parent in path.parents):
        return False
    return _allows(path, uid, gid, 5 if path.is_dir() else 4)


def _read_paths(c: Confinement) -> list[Path]:
    """The read-only paths: ours, the Python installation (imports happen lazily), the system's.
    A ``sys.path`` entry above a hidden directory (the current directory holding the data
    directory, say) is left out: it would open the control plane's files."""
    python = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix, *sys.path}
    paths: list[Path] = []
    for entry in sorted(python):
        path = Path(entry or ".").absolute()
        if path == Path("/") or any(h == path or h.is_relative_to(path) for h in c.hidden):
            log.info("landlock_path_left_out", path=str(path))
            continue
        paths.append(path)
    paths.extend(c.read_paths)
    paths.extend(Path(p) for p in _SYSTEM_READ)
    return [p for p in dict.fromkeys(paths) if p.exists()]


# Landlock --------------------------------------------------------------------------------

_LL_CREATE, _LL_ADD_RULE, _LL_RESTRICT = 444, 445, 446  # the same number on every architecture
_LL_VERSION = 1 << 0
_RULE_PATH_BENEATH, _RULE_NET_PORT = 1, 2
_FS_EXECUTE, _FS_WRITE_FILE, _FS_READ_FILE, _FS_READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
_FS_FILE_ONLY = _FS_EXECUTE | _FS_WRITE_FILE | _FS_READ_FILE | (1 << 14) | (1 << 15)  # + truncate, ioctl
_NET_BIND_TCP, _NET_CONNECT_TCP = 1 << 0, 1 << 1
_SCOPE_ABSTRACT_UNIX, _SCOPE_SIGNAL = 1 << 0, 1 << 1


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("fs", ctypes.c_uint64), ("net", ctypes.c_uint64), ("scoped", ctypes.c_uint64)]


class _PathBeneath(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


class _NetPort(ctypes.Structure):
    _fields_ = [("allowed", ctypes.c_uint64), ("port", ctypes.c_uint64)]


class Landlock:
    """A Landlock ruleset handling every access right the kernel's ABI knows: what is not
    allowed by a rule is denied once ``restrict`` is called."""

    def __init__(self, abi: int) -> None:
        fs = (1 << 13) - 1  # ABI 1: execute .. make_sym
        fs |= (1 << 13) if abi >= 2 else 0  # refer
        fs |= (1 << 14) if abi >= 3 else 0  # truncate
        fs |= (1 << 15) if abi >= 5 else 0  # ioctl on devices
        self.fs = fs
        self.net = (_NET_BIND_TCP | _NET_CONNECT_TCP) if abi >= 4 else 0
        scoped = (_SCOPE_ABSTRACT_UNIX | _SCOPE_SIGNAL) if abi >= 6 else 0
        attr = _RulesetAttr(fs, self.net, scoped)
        size = 24 if abi >= 6 else 16 if abi >= 4 else 8
        self.fd = _syscall(_LL_CREATE, ctypes.byref(attr), size, 0)

    @staticmethod
    def abi() -> int:
        """The kernel's Landlock ABI version, 0 without Landlock."""
        try:
            return max(0, _syscall(_LL_CREATE, None, 0, _LL_VERSION))
        except OSError:
            return 0

    def _add_path(self, path: Path, access: int) -> None:
        try:
            fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        except OSError as exc:  # gone since it was listed, or closed to us: it stays unreadable
            log.warning("landlock_path_skipped", path=str(path), error=exc.strerror)
            return
        try:
            if not stat.S_ISDIR(os.fstat(fd).st_mode):
                access &= _FS_FILE_ONLY
            rule = _PathBeneath(access & self.fs, fd)
            _syscall(_LL_ADD_RULE, self.fd, _RULE_PATH_BENEATH, ctypes.byref(rule), 0)
        finally:
            os.close(fd)

    def allow_read(self, path: Path) -> None:
        self._add_path(path, _FS_READ_FILE | _FS_READ_DIR)

    def allow_read_write(self, path: Path) -> None:
        self._add_path(path, _FS_READ_FILE | _FS_WRITE_FILE)

    def restrict(self, connect: Iterable[int] = (), bind: Iterable[int] = ()) -> None:
        if self.net:
            for ports, access in ((connect, _NET_CONNECT_TCP), (bind, _NET_BIND_TCP)):
                for port in ports:
                    rule = _NetPort(access, port)
                    _syscall(_LL_ADD_RULE, self.fd, _RULE_NET_PORT, ctypes.byref(rule), 0)
        try:
            _syscall(_LL_RESTRICT, self.fd, 0)
        finally:
            os.close(self.fd)


# seccomp ---------------------------------------------------------------------------------

# Killed on sight: running code (exec), reaching into other processes, changing the mount or
# namespace view, loading kernel code, and io_uring (its operations bypass seccomp's checks).
_KILLED = (
    "execve",
    "execveat",
    "ptrace",
    "process_vm_readv",
    "process_vm_writev",
    "pidfd_getfd",
    "mount",
    "umount2",
    "pivot_root",
    "chroot",
    "move_mount",
    "open_tree",
    "fsopen",
    "fsconfig",
    "fsmount",
    "fspick",
    "mount_setattr",
    "unshare",
    "setns",
    "kexec_load",
    "kexec_file_load",
    "init_module",
    "finit_module",
    "delete_module",
    "bpf",
    "perf_event_open",
    "keyctl",
    "add_key",
    "request_key",
    "open_by_handle_at",
    "name_to_handle_at",
    "io_uring_setup",
    "io_uring_enter",
    "io_uring_register",
    "userfaultfd",
    "swapon",
    "swapoff",
    "reboot",
    "acct",
    "iopl",
    "ioperm",
    "quotactl",
)
_NAMESPACES = (0x00020000, 0x02000000, 0x04000000, 0x08000000, 0x10000000, 0x20000000, 0x40000000)


def _seccomp_worker(c: Confinement) -> bool:
    filt = _seccomp_filter()
    if filt is None:
        return False
    sc, f = filt
    for name in _KILLED:
        _rule(f, sc.KILL_PROCESS, name)
    for flag in _NAMESPACES:  # clone(CLONE_NEW*): a new namespace, as unshare
        _rule(f, sc.KILL_PROCESS, "clone", sc.Arg(0, sc.MASKED_EQ, flag, flag))
    _rule(f, sc.ERRNO(errno.ENOSYS), "clone3")  # its flags sit in memory seccomp cannot read
    refused = sc.ERRNO(errno.EPERM)
    families = {socket.AF_INET, socket.AF_INET6} | ({socket.AF_UNIX} if c.unix_socket else set())
    for family in range(64):  # AF_MAX is below 64; anything above is refused by the kernel
        if family not in families:
            _rule(f, refused, "socket", sc.Arg(0, sc.EQ, family))
    _rule(f, refused, "socket", sc.Arg(0, sc.GE, 64))
    kinds = {socket.SOCK_STREAM} | ({socket.SOCK_DGRAM} if c.dns else set())
    for kind in range(16):  # the type's low 4 bits (SOCK_NONBLOCK/CLOEXEC sit above)
        if kind not in kinds:
            _rule(f, refused, "socket", sc.Arg(1, sc.MASKED_EQ, 0xF, kind))
    # The protocol: the default (0), TCP or UDP only. IPPROTO_MPTCP (262) makes a stream socket that
    # Landlock's TCP port rules do not see; SCTP and the rest have no business here either.
    protocols = {0, socket.IPPROTO_TCP, socket.IPPROTO_UDP}
    for protocol in range(1, socket.IPPROTO_UDP):
        if protocol not in protocols:
            _rule(f, refused, "socket", sc.Arg(2, sc.EQ, protocol))
    _rule(f, refused, "socket", sc.Arg(2, sc.GT, socket.IPPROTO_UDP))
    f.load()
    return True


def prepare() -> None:
    """Load libseccomp now, once, in the prefork master before it forks (a confined process could not
    open the library file if it is outside the read-only paths)."""
    _pyseccomp()


@functools.cache
def _pyseccomp() -> Any:
    # pyseccomp finds libseccomp with ctypes.util.find_library, which runs ldconfig (absent from a
    # distroless image, and a subprocess): name the library's soname instead, for dlopen to find.
    import ctypes.util

    find = ctypes.util.find_library
    ctypes.util.find_library = lambda name: "libseccomp.so.2" if name == "seccomp" else find(name)
    try:
        import pyseccomp  # type: ignore[import-untyped]
    except (ImportError, OSError, AttributeError, RuntimeError) as exc:  # no binding, or no libseccomp
        log.warning("seccomp_unavailable", reason=f"{type(exc).__name__}: {exc}")
        return None
    finally:
        ctypes.util.find_library = find
    return pyseccomp


def _seccomp_filter() -> tuple[Any, Any] | None:
    sc = _pyseccomp()
    if sc is None:
        return None
    f = sc.SyscallFilter(sc.ALLOW)
    f.set_attr(sc.Attr.CTL_TSYNC, 1)  # every thread of the process, not only this one
    return sc, f


def _rule(f: Any, action: int, name: str, *args: Any) -> None:
    sc = _pyseccomp()
    number = sc.resolve_syscall(sc.Arch.NATIVE, name)
    if number >= 0:  # negative: a syscall this architecture does not have
        f.add_rule(action, number, *args)


# plumbing --------------------------------------------------------------------------------


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _oserror(what: str) -> OSError:
    err = ctypes.get_errno()
    return OSError(err, f"{what}: {os.strerror(err)}")


def _syscall(number: int, *args: Any) -> int:
    libc = _libc()
    libc.syscall.restype = ctypes.c_long
    result = int(libc.syscall(ctypes.c_long(number), *args))
    if result < 0:
        raise _oserror(f"syscall {number}")
    return result


def _prctl(option: int, value: int) -> None:
    libc = _libc()
    if libc.prctl(option, ctypes.c_ulong(value), ctypes.c_ulong(0), ctypes.c_ulong(0), ctypes.c_ulong(0)) != 0:
        raise _oserror(f"prctl {option}")


def _is_regular(fd: int) -> bool:
    try:
        return stat.S_ISREG(os.fstat(fd).st_mode)
    except OSError:
        return False


def _is_ip(host: str) -> bool:
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(family, host)
            return True
        except OSError:
            pass
    return False
