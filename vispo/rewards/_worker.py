"""The reward worker process: how it is started, what it may do, and its main loop.

A worker is a fresh Python interpreter (``subprocess``, never ``fork``) started by
:class:`vispo.rewards.RewardRunner` with:

* a minimal environment: ``PATH``, the locale variables, ``HOME``/``TMPDIR`` set to its own
  working directory, one-thread settings for numeric libraries, and only those other variables
  that ``Limits.env`` names (so credentials in the trainer's environment do not reach it; the
  kernel's copy in ``/proc/<pid>/environ`` is the minimal one too);
* its own empty working directory (removed when the worker is replaced or the runner closes);
* its own process group, which the runner kills as a whole on a timeout and at exit;
* stdin, stdout and stderr detached from the terminal (one socket to the runner is its only
  channel).

Before any user code is loaded, the worker restricts itself (:func:`restrict`): no network
(a new, empty network namespace, ``unshare(CLONE_NEWNET)``, which needs root, or else a new
user namespace), resource limits (``RLIMIT_AS`` address space, ``RLIMIT_CPU`` CPU seconds,
``RLIMIT_FSIZE`` file size, ``RLIMIT_NPROC`` processes, no core files), an unprivileged user
(``nobody``) when it was started as root, and ``PR_SET_PDEATHSIG`` so that it dies with the
trainer. Whatever the OS refuses is reported back and logged once by the runner.
"""

from __future__ import annotations

import ctypes
import os
import pickle
import resource
import signal
import sys
from dataclasses import dataclass

__all__ = ["Limits", "restrict", "worker_env", "worker_main"]

_CLONE_NEWNET = 0x40000000
_CLONE_NEWUSER = 0x10000000
_PR_SET_PDEATHSIG = 1

#: Environment variables every worker gets from the trainer's environment (none is a secret).
BASE_ENV = ("PATH", "LANG", "LC_ALL", "LC_CTYPE", "TZ")
#: Numeric libraries in a reward run on one thread unless the config passes these through.
ONE_THREAD = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


@dataclass(frozen=True)
class Limits:
    """What a reward worker may do. Sizes in MiB, times in CPU seconds; 0 means no limit."""

    env: tuple[str, ...] = ()
    memory_mb: int = 4096
    cpu_s: int = 3600
    file_size_mb: int = 64
    max_processes: int = 16
    user: str = "nobody"
    network: bool = False


def worker_env(limits: Limits, workdir: str) -> dict[str, str]:
    """The whole environment of a worker: :data:`BASE_ENV`, the names in ``limits.env``."""
    env = {k: os.environ[k] for k in BASE_ENV if k in os.environ}
    env.update({k: "1" for k in ONE_THREAD})
    env.update(HOME=workdir, TMPDIR=workdir, PYTHONDONTWRITEBYTECODE="1")
    for name in limits.env:
        if name in os.environ:
            env[name] = os.environ[name]
    return env


def _libc_call(name: str, *args: int) -> int:
    """Call a libc function; 0 on success, else the errno."""
    libc = ctypes.CDLL(None, use_errno=True)
    if getattr(libc, name)(*args) != 0:
        return ctypes.get_errno() or -1
    return 0


def _tasks_of(uid: int) -> int:
    """Threads (what ``RLIMIT_NPROC`` counts) currently owned by real user ``uid``."""
    n = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status") as f:
                status = f.read()
        except OSError:
            continue
        real_uid = threads = None
        for line in status.splitlines():
            if line.startswith("Uid:"):
                real_uid = int(line.split()[1])
            elif line.startswith("Threads:"):
                threads = int(line.split()[1])
        if real_uid == uid:
            n += threads or 1
    return n


def _needed_paths() -> list[str]:
    """Folders the worker needs: the standard library, site-packages, vispo, the runner's
    ``sys.path`` entries, its own working folder."""
    import sysconfig

    paths = {sysconfig.get_paths()[k] for k in ("stdlib", "platstdlib", "purelib", "platlib")}
    paths.add(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    paths.update(p for p in sys.path if p)
    paths.add(os.getcwd())
    return sorted(os.path.abspath(p) for p in paths if os.path.isdir(p))


_MS_BIND, _MS_REC, _MS_PRIVATE, _MNT_DETACH, _CLONE_NEWNS = 4096, 16384, 1 << 18, 2, 0x20000


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str = ""):
    libc = ctypes.CDLL(None, use_errno=True)
    enc = [None if x is None else x.encode() for x in (source, target, fstype)]
    if libc.mount(*enc, flags, data.encode() if data else None) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {target}: {os.strerror(err)}")


def _expose(paths: list[str], uid: int, gid: int) -> None:
    """Make ``paths`` readable to ``uid`` without changing any permission on disk.

    A folder above them that the user may not enter (e.g. ``/root``, 0700, when Python lives
    in ``/root/.pyenv``) is covered, in a private mount namespace of this process only, by an
    empty tmpfs into which just the needed folders are bind-mounted back: the worker sees them
    and nothing else of that folder. Raises ``OSError`` if that is refused or not enough.
    """
    blocked = [p for p in paths if not _readable_by(p, uid, gid)]
    if not blocked:
        return
    err = _libc_call("unshare", _CLONE_NEWNS)
    if err:
        raise OSError(err, f"it cannot read {blocked[0]} (unshare: {os.strerror(err)})")
    _mount(None, "/", None, _MS_REC | _MS_PRIVATE)
    staged: dict[str, str] = {}  # covered folder -> where its original content is reachable
    for path in blocked:
        top = _first_blocking(path, uid, gid)
        if top is None or top == path:
            continue
        if top not in staged:
            stage = os.path.join(os.getcwd(), f".stage{len(staged)}")
            os.mkdir(stage, 0o700)
            _mount(top, stage, None, _MS_BIND | _MS_REC)
            _mount("tmpfs", top, "tmpfs", 0, "mode=0755,size=1m")
            staged[top] = stage
        rel = os.path.relpath(path, top)
        os.makedirs(os.path.join(top, rel), mode=0o755, exist_ok=True)
        _mount(os.path.join(staged[top], rel), path, None, _MS_BIND | _MS_REC)
    libc = ctypes.CDLL(None, use_errno=True)
    for stage in staged.values():  # the rest of a covered folder stays out of reach
        libc.umount2(stage.encode(), _MNT_DETACH)
        os.rmdir(stage)
    still = [p for p in paths if not _readable_by(p, uid, gid)]
    if still:
        raise OSError(f"it cannot read {still[0]}, which the worker needs")


def _first_blocking(path: str, uid: int, gid: int) -> str | None:
    """The outermost folder on the way to ``path`` that ``uid`` cannot enter or list."""
    parts = os.path.abspath(path).split(os.sep)
    for i in range(2, len(parts) + 1):
        prefix = os.sep.join(parts[:i])
        if not _readable_by(prefix, uid, gid):
            return prefix
    return None


def _readable_by(path: str, uid: int, gid: int) -> bool:
    """Whether user ``uid`` (group ``gid``, no other groups) can list ``path`` and reach it
    (mode bits of the folder and of every folder above it)."""
    import stat

    path = os.path.abspath(path)
    while True:
        try:
            st = os.stat(path)
        except OSError:
            return False
        if st.st_uid == uid:
            bits = (st.st_mode >> 6) & 7
        elif st.st_gid == gid:
            bits = (st.st_mode >> 3) & 7
        else:
            bits = st.st_mode & 7
        if not bits & 1 or (stat.S_ISDIR(st.st_mode) and not bits & 4 and path != "/"):
            return False
        parent = os.path.dirname(path)
        if parent == path:
            return True
        path = parent


def _set_limit(which: int, value: int) -> None:
    _, hard = resource.getrlimit(which)
    if hard != resource.RLIM_INFINITY:
        value = min(value, hard)
    resource.setrlimit(which, (value, value))


def restrict(limits: Limits, parent_pid: int) -> list[str]:
    """Apply ``limits`` to this process; return one note per protection the OS refused."""
    notes: list[str] = []
    # 1. Network: a new network namespace has only a loopback device, which is down.
    in_user_ns = False
    own_user = _user_name()  # before a user namespace hides it
    if not limits.network:
        err = _libc_call("unshare", _CLONE_NEWNET)
        if err and os.geteuid() != 0:
            err = _libc_call("unshare", _CLONE_NEWUSER | _CLONE_NEWNET)
            in_user_ns = not err
        if err:
            notes.append(f"network not isolated (unshare: {os.strerror(err)})")
    # 2. An unprivileged user, when started as root.
    if limits.user:
        if os.geteuid() == 0 and not in_user_ns:
            try:
                import pwd

                pw = pwd.getpwnam(limits.user)
                os.chown(os.getcwd(), pw.pw_uid, pw.pw_gid)
                _expose(_needed_paths(), pw.pw_uid, pw.pw_gid)
                os.setgroups([])
                os.setgid(pw.pw_gid)
                os.setuid(pw.pw_uid)
            except (KeyError, OSError) as e:
                notes.append(f"runs as root (cannot switch to user {limits.user!r}: {e})")
        elif limits.user != own_user:
            notes.append(
                f"runs as the trainer's user {own_user!r} (switching to {limits.user!r} "
                "needs root): it can signal the trainer and read and write its files"
            )
    # 3. Resource limits (soft = hard: the reward cannot raise them again).
    mib = 1024 * 1024
    for which, value, what in (
        (resource.RLIMIT_AS, limits.memory_mb * mib, "address space"),
        (resource.RLIMIT_CPU, limits.cpu_s, "CPU time"),
        (resource.RLIMIT_FSIZE, limits.file_size_mb * mib, "file size"),
        (resource.RLIMIT_CORE, 0, "core files"),
    ):
        if value or which == resource.RLIMIT_CORE:
            try:
                _set_limit(which, value)
            except (OSError, ValueError) as e:
                notes.append(f"{what} not limited ({e})")
    if os.geteuid() == 0:
        notes.append("process count not limited (the kernel does not apply it to root)")
    else:
        try:
            _set_limit(resource.RLIMIT_NPROC, _tasks_of(os.getuid()) + limits.max_processes)
        except (OSError, ValueError) as e:
            notes.append(f"process count not limited ({e})")
    # 4. Die with the trainer (set after the user switch, which clears it).
    if sys.platform.startswith("linux") and _libc_call("prctl", _PR_SET_PDEATHSIG, signal.SIGKILL):
        notes.append("may outlive a killed trainer (prctl refused)")
    if os.getppid() != parent_pid:  # the trainer died before the signal was armed
        os._exit(1)
    return notes


def _user_name() -> str:
    try:
        import pwd

        return pwd.getpwuid(os.getuid()).pw_name
    except (KeyError, ImportError):
        return str(os.getuid())


def _load(payload: tuple):
    """The reward callable from the runner's payload (executes user code)."""
    if payload[0] == "file":
        from vispo.rewards.composite import FileReward

        _, path, name, source = payload
        return FileReward(path, name, source)
    fn = pickle.loads(payload[1])
    if callable(getattr(fn, "load", None)):  # e.g. a MultiReward holding reward files
        fn.load()
    return fn


def _watchdog(watch_fd: int) -> None:
    """Fork a process that kills this worker's process group once the trainer is gone.

    It blocks reading a pipe whose only write end the trainer holds (EOF = the trainer died,
    even by SIGKILL), then kills the group, taking the processes the reward started with it
    (the worker itself also has ``PR_SET_PDEATHSIG``, which its children do not inherit).
    Forked before the user switch, so the reward cannot signal it.
    """
    if os.fork() != 0:
        os.close(watch_fd)
        return
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        while os.read(watch_fd, 1):
            pass
    finally:
        os.killpg(0, signal.SIGKILL)
        os._exit(0)


def worker_main(fd: int, watch_fd: int) -> None:
    """Entry point of a worker process; ``fd`` is its socket to the runner, ``watch_fd`` the
    read end of the trainer's lifeline pipe."""
    from multiprocessing.connection import Connection

    from vispo.rewards.sandbox import _call, _CappedWriter, _describe

    os.set_inheritable(fd, False)  # children the reward starts do not get the channel
    conn = Connection(fd)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the trainer's to handle
    limits, payload, output_limit, parent_pid = conn.recv()
    _watchdog(watch_fd)
    notes = restrict(limits, parent_pid)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)  # C-level and subprocess output goes nowhere
    os.dup2(devnull, 2)
    writer = _CappedWriter(output_limit)
    sys.stdout = sys.stderr = writer
    conn.send(("loading", os.getpid(), notes))
    try:
        fn = _load(payload)  # the user's module-level code runs here, under the runner's timeout
    except BaseException as e:  # noqa: BLE001 (reported to the runner)
        clear = isinstance(e, (ImportError, AttributeError, TypeError, FileNotFoundError))
        conn.send(("init_error", str(e) if clear else _describe(e)))
        return
    conn.send(("ready", dict(getattr(fn, "weights", None) or {}) or None))
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        task_id, completions, answers, columns = msg
        outcome = _call(fn, completions, answers, columns, catch_all=True)
        usage = resource.getrusage(resource.RUSAGE_SELF)
        conn.send((task_id, outcome, writer.take(), usage.ru_utime + usage.ru_stime))
