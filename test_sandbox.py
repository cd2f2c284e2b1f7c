"""
Tests of the sandbox (sandbox.py) and of the judges' immunity to what runs in it (judges.py,
data/harness.py). Plain `def test_*()` functions with asserts: run under pytest, or
`python test_sandbox.py`.

Invariants: importing runs no process and the layers are probed on first use; a run holds no
privilege; hostile programs cannot hang, escape, reach the network or outlive their run, and never
fool the oracle.
"""
import os
import re
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import env
import sandbox

ADD = next(p for p in env.load_problems("simple", "all") if p.id == "simple/add_const/0")   # x + 2
ALL_MODES = env.MODES + ("none",)


def _python(code, **env_vars):
    """Run `code` in a fresh interpreter in this directory: (returncode, stdout, stderr)."""
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       cwd=os.path.dirname(os.path.abspath(__file__)), env={**os.environ, **env_vars})
    return p.returncode, p.stdout, p.stderr


IMPORT_THEN_GRADE = """
import os, subprocess
real = subprocess.Popen, subprocess.run, os.system, os.fork, os.posix_spawn
def refuse(*a, **k):
    raise RuntimeError("a process started at import")
subprocess.Popen = subprocess.run = os.system = os.fork = os.posix_spawn = refuse
import sandbox, judges, env, detector
subprocess.Popen, subprocess.run, os.system, os.fork, os.posix_spawn = real
print("imported", flush=True)
print(env.grade(env.load_problems()[0], "x = 1", "none").sandbox)
"""


def test_sandbox_is_probed_on_first_use():
    """Importing starts no process; the first grading call probes the layers. If no sandbox can
    run the interpreter, that call (not the import) exits non-zero with one line."""
    rc, out, err = _python(IMPORT_THEN_GRADE)
    assert rc == 0 and out == f"imported\n{sandbox.layers()}\n", (rc, out, err)
    rc, out, err = _python(IMPORT_THEN_GRADE, SANDBOX_PYTHON="/nonexistent/python")
    assert rc != 0 and out == "imported\n", (rc, out, err)
    assert err.strip() == "sandbox.py: a sandbox cannot run /nonexistent/python; set SANDBOX_PYTHON", err


# ---- hostile programs: each in every mode -----------------------------------------------------
TOKEN = os.urandom(4).hex()
OUTSIDE = [f"/root/pwned_{TOKEN}", os.path.join(os.getcwd(), f"pwned_{TOKEN}"),
           f"/tmp/pwned_{TOKEN}"] if sandbox.bwrap() else [f"/root/pwned_{TOKEN}"]
HOSTILE = {
    "infinite loop": "while True:\n    pass",
    "fork bomb": "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass",
    "memory bomb": "x = []\nwhile True:\n    x.append(bytearray(10 ** 7))",
    "gigabyte of stdout": "import sys\nfor _ in range(1000):\n    sys.stdout.write('x' * 10 ** 6)",
    "deep recursion": "import sys\nsys.setrecursionlimit(10 ** 8)\ndef f(n):\n    return f(n + 1)\nf(0)",
    "kill the parent": "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\n"
                       "os.kill(-1, signal.SIGKILL)",
    "SIGTERM ignored": "import signal\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\nwhile True:\n"
                       "    pass",
    "endless thread": "import threading, time\ndef spin():\n    while True:\n        time.sleep(0.01)\n"
                      "threading.Thread(target=spin).start()\ndef add_const(x):\n    return x",
    "write outside": f"for p in {OUTSIDE!r}:\n    try:\n        open(p, 'w').write('x')\n"
                     "    except OSError:\n        pass",
    "open a socket": "import socket\nfor addr in [('127.0.0.1', PORT), ('1.1.1.1', 53)]:\n    try:\n"
                     "        socket.create_connection(addr, timeout=0.3).sendall(b'hi')\n"
                     "    except OSError:\n        pass",
    "/dev/zero forever": "f = open('/dev/zero', 'rb')\nwhile True:\n    f.read(1 << 20)",
    "patch print": "import builtins\nbuiltins.print = lambda *a, **k: None\n"
                   "def add_const(x):\n    return None",
    "patch open/exit": "import builtins, sys, os\nsys.exit = lambda *a: None\nos._exit = lambda *a: None\n"
                       "builtins.open = lambda *a, **k: None\ndef add_const(x):\n    return 0",
    "patch builtins": "import builtins\nbuiltins.type = lambda *a: int\nbuiltins.repr = lambda x: '1'\n"
                      "builtins.all = lambda x: True\nbuiltins.len = lambda x: 0\n"
                      "builtins.isinstance = lambda *a: True\ndef add_const(x):\n    return None",
    "guess the nonce": "import os, secrets\nfor fd in range(0, 16):\n    for _ in range(50):\n"
                       "        try:\n            os.write(fd, (secrets.token_hex(16) + '\\n').encode())\n"
                       "        except OSError:\n            break",
    "fake success lines": "import os\nprint('PASS')\nprint('All tests passed')\nfor fd in range(0, 16):\n"
                          "    try:\n        os.write(fd, b'C1\\nR\\nV 0\\nPASS\\nOK\\n')\n"
                          "    except OSError:\n        pass\ndef add_const(x):\n    return 0",
    "setsid daemon": "import os, time\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n"
                     "        time.sleep(60)\n    os._exit(0)\ndef add_const(x):\n    return 0",
    "read the tests": "import ast, __main__\ncases = getattr(__main__, 'CFG', {}).get('cases') or []\n"
                      "table = {a: e for a, e in cases}\ndef add_const(x):\n    return table[(x,)]",
    "segfault": "import ctypes\nctypes.string_at(0)",
    "sleep forever": "import time\ntime.sleep(10 ** 6)",
    "huge return": "def add_const(x):\n    return 'x' * 10 ** 8",
    "close all fds": "import os\nfor fd in range(64):\n    try:\n        os.close(fd)\n    except OSError:\n"
                     "        pass\ndef add_const(x):\n    return 0",
}


def test_a_run_drops_every_privilege():
    """As root a run is a throw-away uid: real, effective and saved uid and gid, no supplementary group, no
    capability, in the same exec chain as a graded program (setpriv when present, else Popen's own)."""
    if not sandbox.ROOT:
        return
    uid = sandbox.UID_BASE + 63
    drop, kw = sandbox._as_uid(uid)
    code = "import os; print(os.getresuid(), os.getresgid(), os.getgroups(), open('/proc/self/status').read())"
    out = subprocess.run(drop + [sandbox.PYTHON, "-I", "-c", code], capture_output=True, text=True, timeout=60,
                         **kw).stdout
    st = dict(line.split(":", 1) for line in out.splitlines()[1:] if ":" in line)
    assert out.startswith(f"({uid}, {uid}, {uid}) ({uid}, {uid}, {uid}) []"), out[:80]
    assert all(int(st[c], 16) == 0 for c in ("CapPrm", "CapEff", "CapInh", "CapAmb")), out


def test_hostile_programs():
    timeout = 1.0
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.setblocking(False)
    port = listener.getsockname()[1]

    def one(name, mode):
        code = "```python\n" + HOSTILE[name].replace("PORT", str(port)) + "\n```"
        t = time.monotonic()
        g = env.grade(ADD, code, mode, timeout=timeout)
        return name, mode, g, time.monotonic() - t

    with ThreadPoolExecutor(4 * (os.cpu_count() or 1)) as ex:  # grade_batch's concurrency
        results = list(ex.map(lambda nm: one(*nm), [(n, m) for n in HOSTILE for m in ALL_MODES]))
    assert len(HOSTILE) >= 15
    for name, mode, g, took in results:
        assert took < timeout + 6.0, (name, mode, took)  # ~2.9 s on 2 loaded cores; 4.1 s with 2 runs beside it
        assert not g.gt_correct, (name, mode, g)
    assert sandbox.leftover() == [], "sandbox processes left running"
    assert not [p for p in OUTSIDE if os.path.exists(p)], "a program wrote outside its temp dir"
    if sandbox.bwrap():
        try:
            listener.accept()
            raise AssertionError("a sandboxed program reached the network")
        except BlockingIOError:
            pass
    listener.close()


def test_the_answers_are_hidden():
    """A program that reads the repo's family references to copy the one matching its prompt's example (it passes
    the oracle where the repo is readable) fails under bwrap, where the repo is an empty tmpfs (sandbox.HIDE)."""
    if not sandbox.bwrap():
        return
    ex = re.search(r"Example: add_const\((.*)\) returns (.*)\.", ADD.prompt)
    path = os.path.join(os.path.dirname(os.path.abspath(env.__file__)), "data", "families.jsonl")
    code = (f"import json\nfrom string import Template\nfor line in open({path!r}):\n"
            f"    f = json.loads(line)\n    for p in f['params'] if f['family'] == 'add_const' else []:\n"
            f"        g = {{}}\n        exec(Template(f['ref']).substitute(p), g)\n"
            f"        if g['add_const']({ex[1]}) == {ex[2]}:\n            add_const = g['add_const']\n")
    g0 = {}
    exec(code, g0)  # unsandboxed, it finds the reference
    assert g0["add_const"](5) == 7
    g = env.grade(ADD, "```python\n" + code + "```", "none", timeout=5.0)
    assert not g.gt_correct, g


if __name__ == "__main__":
    import test_all
    sys.exit(1 if test_all.run_all([sys.modules[__name__]]) else 0)
