"""Run untrusted Python (model-written code) in a separate, limited process.

Nothing is ever ``exec``-ed in the caller's process. :func:`run_python` writes the code
into a fresh temporary directory and starts ``python -I`` there in a new session, with
layered guards (each one catches what the others miss):

1. **a fresh process** in its own session and process group, a scrubbed environment,
   the temporary directory as cwd and ``HOME`` (removed afterwards), no stdin;
2. **resource limits**, set by a small launcher process before the interpreter that
   runs the code starts: CPU seconds, address space (memory), file size, processes,
   open files, no core dumps. (A launcher rather than ``preexec_fn``: Python code
   between fork and exec can deadlock in a threaded caller, and :func:`score_batch
   <glassbox.tasks.scoring.score_batch>` runs sandboxes from threads.) As root, the
   interpreter is the first one an unprivileged user can start (``sys.executable``
   may live under ``/root``), so it may be the system's Python rather than ours;
3. **an unprivileged user** when the caller is root (as in containers and CI): the code
   runs as a uid of its own (a fresh one per run where the uid map allows, else
   ``nobody``), so the process limit counts only its processes, file permissions apply,
   and every process of that uid is killed when the run ends;
4. **a network namespace** (``unshare(CLONE_NEWNET)``; for an unprivileged caller, in a
   new user namespace mapping only its own uid) where the kernel permits it: no
   interfaces but a down loopback; silently skipped where not permitted;
5. **an audit hook** (``sys.addaudithook``) installed before the code runs, refusing
   sockets (connect, bind, getaddrinfo, sendto), new processes (fork, exec, spawn,
   subprocess, os.system), signals, ctypes, gc object walks, frames and tracing, files
   under ``/proc``, and writing, removing or renaming files outside the sandbox
   directory. The program's file is removed before it runs, so neither it nor a
   checker's secret in it (the line a code check prints after its asserts) can be read.

The wall-clock timeout kills the whole process group (and the sandbox uid's processes);
stdout and stderr are read with a cap, and a flood past it is killed. An audit hook
is not a security boundary on its own (C extensions can bypass it), which is why the
process limits and the unprivileged user sit under it. :func:`sandbox_layers` says which
layers are active on this machine.
"""

from __future__ import annotations

import functools
import json
import os
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from glassbox.errors import GlassboxError

NOBODY = 65534
_UID_BASE = 0x6C000000  # a range no real account uses, when the uid map covers it
_UID_SPAN = 1 << 20

# Runs as the caller's user in a fresh process: limits, namespace, privilege drop, exec.
LAUNCHER = r"""
import json, os, resource, sys
cfg = json.loads(sys.argv[1])
layers = ["fresh process", "resource limits"]
def own_network():
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(0x40000000) == 0:  # CLONE_NEWNET: needs root (CAP_SYS_ADMIN)
        return True
    if cfg["uid"] is not None:
        return False
    uid, gid = os.getuid(), os.getgid()  # unprivileged: in a user namespace of our own,
    if libc.unshare(0x10000000 | 0x40000000) != 0:  # CLONE_NEWUSER | CLONE_NEWNET
        return False
    for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"),
                       ("gid_map", f"{gid} {gid} 1")):
        with open(f"/proc/self/{name}", "w") as f:
            f.write(text)  # the same ids inside; exec then drops the namespace's capabilities
    return True
if cfg["netns"]:
    try:
        if own_network():
            layers.append("network namespace")
    except Exception:
        pass
for name, value in cfg["limits"].items():
    resource.setrlimit(getattr(resource, name), (value, value))
if cfg["uid"] is not None:
    os.setgroups([])
    os.setgid(cfg["uid"])
    os.setuid(cfg["uid"])
    layers.append("unprivileged user")
if cfg["audit"]:
    layers.append("audit hook")
os.write(cfg["report_fd"], json.dumps(layers).encode())
os.close(cfg["report_fd"])
python = cfg["python"]
argv = [python, "-I", "-c", cfg["prelude"], cfg["root"], cfg["program"], str(int(cfg["audit"]))]
os.execve(python, argv, cfg["env"])
"""

# Runs in the sandboxed interpreter before the user's code: the audit hook, then the code.
PRELUDE = r"""
import os, stat, sys
def _glassbox_guard(root):
    # Everything the hook uses is bound here, before the user's code runs: that code may
    # replace builtins and module attributes later, not these references.
    _type, _str, _bytes, _int, _len, _list = type, str, bytes, int, len, list
    _isinstance, _PermissionError, _range, _repr = isinstance, PermissionError, range, repr
    _startswith, _split, _join, _decode = str.startswith, str.split, str.join, bytes.decode
    _getcwd, _stat, _isdir, _readlink = os.getcwd, os.stat, stat.S_ISDIR, os.readlink
    _realpath = os.path.realpath  # best effort (it calls os functions late); see normal()
    root = os.path.realpath(root)
    refused = frozenset((
        "os.system", "os.fork", "os.forkpty", "os.exec", "os.posix_spawn", "os.spawn",
        "subprocess.Popen", "pty.spawn", "os.kill", "os.killpg", "signal.pthread_kill",
        "socket.connect", "socket.bind", "socket.getaddrinfo", "socket.gethostbyname",
        "socket.gethostbyaddr", "socket.sendto", "socket.sendmsg",
        "ctypes.dlopen", "ctypes.dlsym", "ctypes.cdata", "ctypes.call_function",
        "os.symlink", "os.link", "os.mknod", "os.mkfifo",
        "gc.get_objects", "gc.get_referrers", "gc.get_referents", "sys.settrace",
        "sys.setprofile", "sys._current_frames", "sys._current_exceptions",
    ))
    # Frames would show the program's own code object (and a checker's secrets in it):
    # refused as "not available", which namedtuple and typing already tolerate.
    frame_attrs = frozenset(("tb_frame", "f_back", "f_code", "f_globals", "f_locals",
                             "gi_frame", "cr_frame", "ag_frame", "gi_code", "cr_code"))
    _ValueError, _AttributeError = ValueError, AttributeError
    # event -> (indices of path arguments, indices of dir_fd arguments)
    changes = {
        "os.remove": ((0,), (1,)), "os.rmdir": ((0,), (1,)), "os.mkdir": ((0,), (2,)),
        "os.chmod": ((0,), (2,)), "os.chown": ((0,), (3,)), "os.utime": ((0,), (3,)),
        "os.truncate": ((0,), ()), "os.rename": ((0, 1), (2, 3)), "shutil.rmtree": ((0,), (1,)),
        "shutil.copyfile": ((1,), ()), "shutil.move": ((0, 1), ()), "os.setxattr": ((0,), ()),
        "os.removexattr": ((0,), ()), "os.chflags": ((0,), ()),
    }
    writing = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC
    busy = []

    def text(path):
        # A str path (copied out of any str subclass), bytes decoded, else None.
        if _isinstance(path, _str):
            return _str.__str__(path)
        if _isinstance(path, _bytes):
            return _decode(_bytes(path), "utf-8", "surrogateescape")
        return None

    def normal(path, dir_fd=None):
        if not _startswith(path, "/"):
            base = _getcwd() if dir_fd is None else _readlink("/proc/self/fd/" + _str(dir_fd))
            path = base + "/" + path
        parts = _list()
        for part in _split(path, "/"):
            if part == ".." and parts:
                parts.pop()
            elif part not in ("", ".", ".."):
                parts.append(part)
        return "/" + _join("/", parts)

    def inside(path, dir_fd=None):
        if _type(path) is _int:
            return True  # an open descriptor, checked when it was opened
        path = text(path)
        if path is None:
            return False  # only str and bytes paths may change files
        try:
            path = normal(path, dir_fd)
        except OSError:
            return False  # a dir_fd whose directory cannot be named
        return path == root or _startswith(path, root + "/")

    def process_file(path):
        path = text(path)
        if path is None:
            return False
        try:
            real = _realpath(path)
        except (OSError, ValueError):
            return True
        return any_prefix(normal(path)) or any_prefix(real)

    def any_prefix(path):
        return path == "/proc" or _startswith(path, "/proc/") or _startswith(path, "/dev/fd")

    def directory(path):
        path = text(path)
        try:
            return path is not None and _isdir(_stat(path).st_mode)
        except OSError:
            return False

    def check(event, args):
        if event in refused:
            raise _PermissionError("sandbox: " + event + " is not allowed")
        if event == "sys._getframe":
            raise _ValueError("sandbox: frames are not available")
        if event == "object.__getattr__" and args[1] in frame_attrs:
            raise _AttributeError("sandbox: " + args[1] + " is not available")
        if event == "open":
            path, mode, flags = args
            wants = (_isinstance(mode, _str) and ("w" in mode or "a" in mode or "x" in mode
                     or "+" in mode)) or (_isinstance(flags, _int) and flags & writing)
            if ((wants or directory(path)) and not inside(path)) or process_file(path):
                # (a directory outside could be a dir_fd for writing relative to it;
                # /proc/self/mem holds the program's memory)
                raise _PermissionError("sandbox: opening " + _repr(path) + " is not allowed")
        elif event in changes:
            paths, dir_fds = changes[event]
            fds = [args[i] if i < _len(args) else None for i in dir_fds]
            fds = [fd if _type(fd) is _int and fd >= 0 else None for fd in fds]  # AT_FDCWD < 0
            for j in _range(_len(paths)):
                i, fd = paths[j], fds[j] if j < _len(fds) else None
                if i < _len(args) and not inside(args[i], fd):
                    raise _PermissionError("sandbox: " + event + " on " + _repr(args[i])
                                           + " is not allowed")

    def hook(event, args):
        if busy:
            return
        busy.append(1)
        try:
            check(event, args)
        finally:
            busy.pop()

    sys.addaudithook(hook)

if sys.argv[3] == "1":
    # Modules whose import reads a frame (types: FrameType), imported before the hook.
    import collections, dataclasses, enum, functools, inspect, itertools, json, math, re
    import string, traceback, types, typing
    _glassbox_guard(sys.argv[1])
with open(sys.argv[2], encoding="utf-8") as _f:
    _source = _f.read()
os.remove(sys.argv[2])  # the program cannot read itself back (nor a checker's secret in it)
del _glassbox_guard, _f
sys.argv = ["<sandbox>"]
exec(compile(globals().pop("_source"), "<sandbox>", "exec"),
     {"__name__": "__main__", "__builtins__": __builtins__})
"""


@dataclass
class SandboxResult:
    """What one sandboxed run did. ``passed``: exit status 0, within every limit."""

    returncode: int | None
    stdout: str
    stderr: str
    timed_out: bool = False
    killed_reason: str | None = None  # "timeout", "output limit", "signal SIGXCPU", ...
    duration_s: float = 0.0
    layers: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return self.returncode == 0 and not self.timed_out and self.killed_reason is None


def run_python(
    code: str,
    timeout_s: float = 5.0,
    memory_mb: int = 512,
    max_output_bytes: int = 64_000,
    max_processes: int = 16,
    max_file_bytes: int = 1_000_000,
    audit_hook: bool = True,
) -> SandboxResult:
    """Run ``code`` with ``python -I`` in a fresh sandbox (see the module docstring) and
    return its exit status, capped output and which guards were active.

    ``timeout_s`` is wall-clock time (CPU time is limited to it too), ``memory_mb`` the
    address space, ``max_output_bytes`` the cap on stdout and on stderr (a flood past it
    is killed), ``max_processes`` the processes the sandbox user may have, and
    ``max_file_bytes`` the largest file it may write. ``audit_hook=False`` leaves out
    the audit hook, only so tests can check the layers under it on their own."""
    _check_limits(timeout_s, memory_mb, max_output_bytes, max_processes)
    drop, python = _identity()
    limits = {
        "RLIMIT_CPU": int(timeout_s) + 1,
        "RLIMIT_AS": memory_mb * 1024 * 1024,
        "RLIMIT_FSIZE": max_file_bytes,
        "RLIMIT_NPROC": max_processes,
        "RLIMIT_NOFILE": 64,
        "RLIMIT_CORE": 0,
    }
    uid = _fresh_uid() if drop else None
    return _run(code, python, uid, limits, timeout_s, max_output_bytes, audit_hook)


def sandbox_layers() -> list[str]:
    """The guards active on this machine, e.g. ``["fresh process", "resource limits",
    "unprivileged user", "network namespace", "audit hook"]``."""
    return list(run_python("pass").layers)


def _check_limits(timeout_s: float, memory_mb: int, max_output: int, max_procs: int) -> None:
    checks = [
        ("timeout_s", timeout_s, 0.1, 600), ("memory_mb", memory_mb, 64, 1 << 20),
        ("max_output_bytes", max_output, 1, 1 << 30), ("max_processes", max_procs, 1, 4096),
    ]  # fmt: skip
    for name, value, lo, hi in checks:
        if not lo <= value <= hi:
            raise GlassboxError(f"sandbox {name}={value} is out of range; use {lo}..{hi}.")


# ---------------------------------------------------------------------------------------
# Who runs the code, with which interpreter
# ---------------------------------------------------------------------------------------


def _uid_range_mapped(lo: int, hi: int) -> bool:
    try:
        rows = Path("/proc/self/uid_map").read_text().split("\n")
    except OSError:
        return False
    for row in rows:
        parts = row.split()
        if len(parts) == 3 and int(parts[0]) <= lo and hi <= int(parts[0]) + int(parts[2]):
            return True
    return False


def _fresh_uid() -> int:
    """A uid of its own for one run (so limits and the final kill touch only it)."""
    if not _uid_range_mapped(_UID_BASE, _UID_BASE + _UID_SPAN):
        return NOBODY
    return _UID_BASE + secrets.randbelow(_UID_SPAN)  # concurrent runs, any process: distinct


@functools.lru_cache(maxsize=1)
def _identity() -> tuple[bool, str]:
    """(whether to drop to an unprivileged uid, the interpreter the sandbox runs). As
    root: the first interpreter an unprivileged user can start (ours may be under /root)."""
    if os.name != "posix":
        raise GlassboxError("The code sandbox needs Linux or macOS (POSIX process limits).")
    if os.geteuid() != 0:
        return False, sys.executable
    candidates = [sys.executable, sys._base_executable, shutil.which("python3"),
                  "/usr/local/bin/python3", "/usr/bin/python3"]  # fmt: skip
    for python in dict.fromkeys(c for c in candidates if c and os.path.exists(c)):
        limits = {"RLIMIT_AS": 512 << 20, "RLIMIT_NPROC": 16, "RLIMIT_CORE": 0}
        probe = _run("print('ok')", python, _fresh_uid(), limits, 10.0, 1000)
        if probe.passed and probe.stdout.strip() == "ok":
            return True, python
    return False, sys.executable  # no interpreter an unprivileged user can run


# ---------------------------------------------------------------------------------------
# One run
# ---------------------------------------------------------------------------------------


def _run(
    code: str,
    python: str,
    uid: int | None,
    limits: dict,
    timeout_s: float,
    cap: int,
    audit: bool = True,
) -> SandboxResult:
    root = Path(tempfile.mkdtemp(prefix="glassbox-sandbox-"))
    report_r, report_w = os.pipe()
    start = time.monotonic()
    try:
        program = root / "main.py"
        program.write_bytes(code.encode("utf-8", "surrogatepass"))  # (bad text fails to run)
        if uid is not None:
            os.chown(root, uid, uid)
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(root), "TMPDIR": str(root),
               "LANG": "C.UTF-8"}  # fmt: skip
        cfg = {
            "netns": sys.platform == "linux", "limits": limits, "uid": uid, "python": python,
            "prelude": PRELUDE, "root": str(root), "program": str(program), "env": env,
            "report_fd": report_w, "audit": audit,
        }  # fmt: skip
        proc = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", LAUNCHER, json.dumps(cfg)],
            cwd=root, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, start_new_session=True, pass_fds=(report_w,),
        )  # fmt: skip
        os.close(report_w)
        report_w = -1
        try:
            (out, err), reason = _collect(proc, start + timeout_s, cap)
        finally:
            _kill_all(proc, uid)
        layers = _read_report(report_r)
    finally:
        if report_w >= 0:
            os.close(report_w)
        os.close(report_r)
        shutil.rmtree(root, ignore_errors=True)
    rc = proc.returncode
    if reason is None and rc is not None and rc < 0:
        reason = f"signal {signal.Signals(-rc).name}"
    return SandboxResult(
        returncode=rc, stdout=out.decode("utf-8", "replace"), stderr=err.decode("utf-8", "replace"),
        timed_out=reason == "timeout", killed_reason=reason,
        duration_s=time.monotonic() - start, layers=layers,
    )  # fmt: skip


def _collect(proc: subprocess.Popen, deadline: float, cap: int) -> tuple[bytes, bytes, str | None]:
    """Read stdout and stderr until the program has exited and its output is drained, the
    deadline passes, or one stream exceeds ``cap`` bytes; return what was read (at most
    ``cap`` bytes each) and why the run was cut short, if it was. Children the program
    left behind may hold the pipes open: they do not keep the run alive."""
    bufs = {proc.stdout: bytearray(), proc.stderr: bytearray()}
    with selectors.DefaultSelector() as sel:
        for stream in bufs:
            sel.register(stream, selectors.EVENT_READ)
        while True:
            exited = proc.poll() is not None
            left = deadline - time.monotonic()
            if left <= 0:  # (after an exit: children still writing)
                return _capped(bufs, proc, cap), None if exited else "timeout"
            ready = sel.select(timeout=0 if exited else min(left, 0.05)) if sel.get_map() else []
            for key, _ in ready:
                chunk = os.read(key.fileobj.fileno(), 65536)
                if not chunk:
                    sel.unregister(key.fileobj)
                bufs[key.fileobj] += chunk
            if any(len(b) > cap for b in bufs.values()):
                return _capped(bufs, proc, cap), "output limit"
            if exited and not ready:
                return _capped(bufs, proc, cap), None


def _capped(bufs: dict, proc: subprocess.Popen, cap: int) -> tuple[bytes, bytes]:
    return bytes(bufs[proc.stdout][:cap]), bytes(bufs[proc.stderr][:cap])


def _kill_all(proc: subprocess.Popen, uid: int | None) -> None:
    """Kill the process group and (as root) every process the sandbox uid still owns,
    and wait until none of them is alive."""
    _kill_until_gone(lambda: _live_pids(pgrp=proc.pid), group=proc.pid)
    proc.wait()
    for stream in (proc.stdout, proc.stderr):
        stream.close()
    if uid is not None and uid != NOBODY:  # nobody may be another run's user too
        _kill_until_gone(lambda: _live_pids(uid=uid))


def _kill_until_gone(find, group: int | None = None, rounds: int = 100) -> None:
    """SIGKILL the group and every pid ``find()`` returns, until it returns none (a fork
    bomb forks while we kill; a killed process takes a moment to die)."""
    for _ in range(rounds):
        if group is not None:
            try:
                os.killpg(group, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        pids = find()
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        time.sleep(0.01)


def _live_pids(uid: int | None = None, pgrp: int | None = None) -> list[int]:
    """Live (not zombie) processes with real uid ``uid`` or in process group ``pgrp``,
    read from /proc (none where there is no /proc)."""
    pids = []
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            status = Path(f"/proc/{entry}/status").read_text() if uid is not None else ""
        except (OSError, IndexError):
            continue
        if stat[0] == "Z":  # dead, waiting for its parent (or init) to reap it
            continue
        uid_line = next((x for x in status.splitlines() if x.startswith("Uid:")), "")
        if (pgrp is not None and int(stat[2]) == pgrp) or (
            uid is not None and uid_line.split()[1:2] == [str(uid)]
        ):
            pids.append(int(entry))
    return pids


def _pids_of(uid: int) -> list[int]:
    """Live (not zombie) processes whose real uid is ``uid``."""
    return _live_pids(uid=uid)


def _read_report(fd: int) -> list[str]:
    os.set_blocking(fd, False)
    try:
        data = os.read(fd, 65536)
    except BlockingIOError:
        return []
    try:
        return list(json.loads(data)) if data else []
    except json.JSONDecodeError:
        return []
