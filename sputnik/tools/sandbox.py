"""A Python sandbox for tool calls: the code runs in a fresh `python -I` subprocess, in its own temp directory.

What is enforced, and by what:
- CPU time (RLIMIT_CPU), address space (RLIMIT_AS), file size (RLIMIT_FSIZE), open files (RLIMIT_NOFILE): the kernel
  (set by the child on itself before the user's code runs: no preexec_fn, which is unsafe in a threaded parent).
- Wall time: the parent kills the child's whole process group when it runs past `wall_s`.
- Output: stdout/stderr are read up to `max_output` characters each, the rest dropped.
- Processes: RLIMIT_NPROC, and when the parent runs as root the child drops to uid/gid `nobody` first (`unshare -S
  -G`; root ignores RLIMIT_NPROC, and nobody cannot write outside the temp dir, which is handed to it).
- Network: a new network namespace (`unshare -n`, only a loopback that is down) where the kernel lets us make one;
  in any case an audit hook in the child refuses every socket.* event.
- Files: the audit hook refuses opening, listing, changing or removing anything outside the temp dir, except reading
  the Python installation (imports); it also refuses fork/exec/spawn/subprocess, os.system, os.kill and ctypes.
The audit hook is a guard rail inside the interpreter (code that reached native code could remove it); the kernel's
limits, the namespace and the unprivileged uid are what hold against such code.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass

# Runs inside the child before the user's code: installs the audit hook, then executes the code from stdin.
_GUARD = r"""
import os, resource, sys
_mb = 2**20
_cpu, _mem, _fsize, _nproc = (int(x) for x in sys.argv[1:5])
for _what, _n in ((resource.RLIMIT_CPU, _cpu), (resource.RLIMIT_AS, _mem * _mb), (resource.RLIMIT_FSIZE, _fsize * _mb),
                  (resource.RLIMIT_NOFILE, 64), (resource.RLIMIT_CORE, 0), (resource.RLIMIT_NPROC, _nproc)):
    resource.setrlimit(_what, (_n, _n))
_tmp = os.path.realpath(os.getcwd())
_ro = tuple({os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix,
                                           os.path.dirname(os.__file__))})
_deny = ("os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty", "subprocess.Popen",
         "os.kill", "os.killpg", "ctypes.", "socket.", "os.chroot", "os.setuid", "pty.")
_paths = {"os.listdir", "os.scandir", "os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.chmod", "os.chown",
          "os.link", "os.symlink", "os.truncate", "os.utime", "shutil.rmtree", "shutil.copyfile", "os.chdir"}
def _inside(path, base):
    return path == base or path.startswith(base + os.sep)
def _hook(event, args):
    if event.startswith(_deny) or (event == "import" and args[0] in ("ctypes", "_ctypes")):
        raise PermissionError(f"sandbox: {event} is not allowed")
    if event == "open" or event in _paths:
        target = args[0] if args else None
        if isinstance(target, int) or target is None:
            return
        path = os.path.realpath(os.fsdecode(target))
        if _inside(path, _tmp):
            return
        reading = event in ("open", "os.listdir", "os.scandir")
        writing = not reading or (len(args) > 1 and isinstance(args[1], str) and any(c in args[1] for c in "wax+"))
        if event == "open" and len(args) > 2 and isinstance(args[2], int) and args[2] & (os.O_WRONLY | os.O_RDWR):
            writing = True
        if not writing and any(_inside(path, r) for r in _ro):
            return
        raise PermissionError(f"sandbox: {event} {path} is outside the sandbox")
_code = sys.stdin.read()
sys.addaudithook(_hook)
del _hook
exec(compile(_code, "<sandbox>", "exec"), {"__name__": "__main__"})
"""


@dataclass
class SandboxConfig:
    """The sandbox's limits."""

    cpu_s: int = 5
    wall_s: float = 10.0
    memory_mb: int = 512
    max_output: int = 4000
    max_processes: int = 16
    max_file_mb: int = 16
    network_namespace: bool = True  # use `unshare -n` when it works here


@dataclass
class SandboxResult:
    """What a run printed and how it ended (returncode < 0: killed by that signal)."""

    stdout: str
    stderr: str
    returncode: int
    timed_out: bool = False

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out


_NETNS: dict[str, bool] = {}


def _unshare_works() -> bool:
    if "ok" not in _NETNS:
        exe = shutil.which("unshare")
        flags = ["-n"] if os.geteuid() == 0 else ["-rn"]
        try:
            _NETNS["ok"] = exe is not None and subprocess.run([exe, *flags, "true"], check=False,
                                                              capture_output=True,
                                                              timeout=5).returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            _NETNS["ok"] = False
    return _NETNS["ok"]


def _nobody() -> tuple[int, int] | None:
    if os.geteuid() != 0:
        return None
    import pwd

    try:
        entry = pwd.getpwnam("nobody")
    except KeyError:
        return None
    return entry.pw_uid, entry.pw_gid


def _world_executable(path: str) -> bool:
    path = os.path.realpath(path)
    parts = [path, *iter_parents(path)]
    return all(os.stat(p).st_mode & 0o001 for p in parts)


def iter_parents(path: str):
    while True:
        parent = os.path.dirname(path)
        if parent == path:
            return
        yield parent
        path = parent


def _interpreter(drop: bool) -> str | None:
    """The Python to run: this one, or (for a child dropped to nobody) one that nobody may execute."""
    candidates = [sys.executable, getattr(sys, "_base_executable", sys.executable), shutil.which("python3") or ""]
    if not drop:
        return sys.executable
    return next((c for c in candidates if c and _world_executable(c)), None)


def run_python(code: str, cfg: SandboxConfig | None = None) -> SandboxResult:
    """Run `code` in the sandbox and return what it printed (see the module's docstring for what is enforced)."""
    cfg = cfg or SandboxConfig()
    drop_to = _nobody()
    exe = _interpreter(drop_to is not None)
    if exe is None or not (cfg.network_namespace and _unshare_works()):
        # unshare is what drops the uid; without it (or an interpreter nobody may run) the child keeps ours, and
        # only the audit hook refuses fork/exec, sockets and files outside its directory.
        drop_to, exe = None, exe or sys.executable
    with tempfile.TemporaryDirectory(prefix="sputnik-sandbox-") as tmp:
        if drop_to is not None:
            os.chown(tmp, *drop_to)
        argv = [exe, "-I", "-c", _GUARD, str(cfg.cpu_s), str(cfg.memory_mb), str(cfg.max_file_mb),
                str(cfg.max_processes)]
        if cfg.network_namespace and _unshare_works():
            if drop_to is not None:  # root makes the namespace, then unshare itself drops to nobody before python
                ids = ["-S", str(drop_to[0]), "-G", str(drop_to[1])]
                argv = [shutil.which("unshare") or "unshare", "-n", *ids, "--", *argv]
            else:  # a user namespace maps the caller to root inside it, with no rights outside
                argv = [shutil.which("unshare") or "unshare", "-rn", "--", *argv]
        proc = subprocess.Popen(argv, cwd=tmp, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                env={"PATH": "/usr/bin:/bin", "HOME": tmp, "TMPDIR": tmp},
                                start_new_session=True)
        try:
            out, err = proc.communicate(code.encode(), timeout=cfg.wall_s)
            timed_out = False
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            out, err = proc.communicate()
            timed_out = True
        _kill_group(proc)  # anything it left behind
    limit = cfg.max_output
    return SandboxResult(out.decode(errors="replace")[:limit], err.decode(errors="replace")[-limit:], proc.returncode,
                         timed_out)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def python(code: str) -> str:
    """Run Python code in a sandbox (no network, no files outside its temp dir, limited CPU, memory and time) and
    return what it printed.

    Args:
        code: the program; print what you want to see
    """
    result = run_python(code)
    if result.timed_out:
        raise TimeoutError("the program ran out of time")
    if result.returncode != 0:
        tail = result.stderr.strip().splitlines()[-1:] or [f"exit status {result.returncode}"]
        raise RuntimeError(tail[0])
    return result.stdout
