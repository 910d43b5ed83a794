"""The code sandbox: real processes, real limits. Every hostile program here would do
damage (hang, fork, eat memory, write, connect, flood) if its guard were missing."""

from __future__ import annotations

import os
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path

import pytest

from glassbox.errors import GlassboxError
from glassbox.tasks.sandbox import _identity, _pids_of, run_python, sandbox_layers

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the sandbox needs Linux")


def test_a_correct_function_passes_and_a_wrong_one_fails():
    tests = "assert double(3) == 6\nassert double(-1) == -2\n"
    good = run_python("def double(x):\n    return 2 * x\n" + tests)
    bad = run_python("def double(x):\n    return x + 2\n" + tests)
    assert good.passed and good.returncode == 0
    assert not bad.passed and "AssertionError" in bad.stderr


def test_layers_are_reported():
    layers = sandbox_layers()
    assert {"fresh process", "resource limits", "audit hook"} <= set(layers)
    if os.geteuid() == 0 and _identity()[0]:
        assert "unprivileged user" in layers
    assert "audit hook" not in run_python("pass", audit_hook=False).layers


def test_code_runs_in_a_fresh_temporary_directory_that_is_removed(tmp_path):
    result = run_python("import os\nprint(os.getcwd())\nprint(sorted(os.environ))")
    cwd, env = result.stdout.splitlines()
    assert cwd != os.getcwd() and "glassbox-sandbox-" in cwd
    assert not os.path.exists(cwd)
    assert "GLASSBOX_CACHE" not in env and "PYTHONPATH" not in env


def test_an_infinite_loop_is_killed_within_its_time_limit():
    start = time.monotonic()
    result = run_python("while True:\n    pass\n", timeout_s=1.0)
    assert result.timed_out and not result.passed
    assert time.monotonic() - start < 4.0


BOMBS = {
    "os.fork": "import os\nwhile True:\n    os.fork()\n",
    "subprocess": "import subprocess, sys\nwhile True:\n"
    "    subprocess.Popen([sys.executable, '-c', 'import os\\nwhile True: os.fork()'])\n",
}
# Without the audit hook: start sleepers until the process limit refuses, then say how many.
COUNTED = {
    "os.fork": "import os, time\nn = 0\nwhile True:\n    try:\n        pid = os.fork()\n"
    "    except BlockingIOError:\n        break\n    if pid == 0:\n        time.sleep(60)\n"
    "        os._exit(0)\n    n += 1\nprint(n, os.getpgrp())\n",
    "subprocess": "import subprocess, sys\nn = 0\nwhile True:\n    try:\n"
    "        subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
    "    except BlockingIOError:\n        break\n    n += 1\nimport os\nprint(n, os.getpgrp())\n",
}


@pytest.mark.parametrize("how", sorted(BOMBS))
def test_a_fork_bomb_is_refused_by_the_audit_hook(how):
    result = run_python(BOMBS[how], timeout_s=2.0, max_processes=8)
    assert not result.passed and not result.timed_out
    assert "is not allowed" in result.stderr


@pytest.mark.parametrize("how", sorted(COUNTED))
def test_the_process_limit_stops_forking_and_every_process_is_killed(how):
    """Under the hook: RLIMIT_NPROC refuses the 9th process, and the end of the run kills
    the sleepers it left (the machine is fine afterwards)."""
    result = run_python(COUNTED[how], timeout_s=5.0, max_processes=8, audit_hook=False)
    assert result.passed, result.stderr
    started, group = map(int, result.stdout.split())
    assert 0 <= started < 8
    assert _live_members(group) == []  # the sleepers are gone (zombies wait for init)
    assert run_python("print('still fine')").stdout == "still fine\n"


def _live_members(group: int) -> list[int]:
    """Processes of a process group that are not zombies, read from /proc."""
    live = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            fields = open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == group and fields[0] != "Z":
            live.append(int(entry))
    return live


def test_no_sandbox_process_outlives_its_run():
    if not (os.geteuid() == 0 and _identity()[0]):
        pytest.skip("only a root caller runs the code as a uid of its own")
    code = "import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(60)\n"
    result = run_python(code + "print(os.getuid())", audit_hook=False)
    uid = int(result.stdout.split()[-1])
    assert uid != 0 and _pids_of(uid) == []  # the setsid'd child escaped the group: killed too


@pytest.mark.parametrize("audit_hook", [True, False])
def test_a_memory_hog_fails_within_the_memory_limit(audit_hook):
    result = run_python("x = bytearray(4 * 1024**3)\nprint('allocated')", memory_mb=256,
                        audit_hook=audit_hook)  # fmt: skip
    assert not result.passed and "allocated" not in result.stdout
    assert "MemoryError" in result.stderr


@pytest.mark.parametrize("audit_hook", [True, False])
def test_writing_outside_the_sandbox_fails(tmp_path, audit_hook):
    if not audit_hook and os.geteuid() != 0:
        pytest.skip("without the hook, only a dropped uid stops writes to the caller's files")
    target = tmp_path / "pwned.txt"
    code = f"open({str(target)!r}, 'w').write('x')\n"
    result = run_python(code, audit_hook=audit_hook)
    assert not result.passed
    assert not target.exists()


def test_removing_and_renaming_outside_the_sandbox_fail(tmp_path):
    victim = tmp_path / "keep.txt"
    victim.write_text("mine")
    for code in (f"import os\nos.remove({str(victim)!r})",
                 f"import os\nos.rename({str(victim)!r}, 'stolen.txt')"):  # fmt: skip
        result = run_python(code)
        assert not result.passed and "is not allowed" in result.stderr
    assert victim.read_text() == "mine"


def test_writing_inside_the_sandbox_works():
    code = "open('notes.txt', 'w').write('hi')\nprint(open('notes.txt').read())"
    assert run_python(code).stdout == "hi\n"


@pytest.mark.parametrize("audit_hook", [True, False])
def test_connecting_to_a_listening_localhost_socket_fails(audit_hook):
    if not audit_hook and "network namespace" not in sandbox_layers():
        pytest.skip("no network namespace here: only the audit hook blocks the network")
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.setblocking(False)
    port = server.getsockname()[1]
    try:
        code = f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=2)"
        result = run_python(code + "\nprint('connected')", audit_hook=audit_hook)
        assert not result.passed and "connected" not in result.stdout
        with pytest.raises(BlockingIOError):
            server.accept()  # nobody connected
    finally:
        server.close()


def test_a_stdout_flood_is_capped():
    start = time.monotonic()
    result = run_python("while True:\n    print('x' * 1000)\n", max_output_bytes=10_000)
    assert not result.passed and result.killed_reason == "output limit"
    assert len(result.stdout) <= 10_000
    assert time.monotonic() - start < 4.0


def test_out_of_range_limits_are_clear_errors():
    with pytest.raises(GlassboxError, match="timeout_s=0"):
        run_python("pass", timeout_s=0)
    with pytest.raises(GlassboxError, match="memory_mb=1"):
        run_python("pass", memory_mb=1)


ESCAPES = {
    "relative path": "import os\nrel = os.path.relpath({target!r})\nopen(rel, 'w').write('x')",
    "patched getcwd": "import os\nr = os.getcwd()\nos.getcwd = lambda: r + '/a/b/c/d/e/f/g/h'\n"
    "open('../' * 12 + {target!r}.lstrip('/'), 'w').write('x')",
    "patched builtins": "import builtins\nbuiltins.isinstance = lambda *a: True\n"
    "builtins.str = lambda *a: 'inside'\nopen({target!r}, 'w').write('x')",
    "dir_fd of a directory outside": "import os\nfd = os.open(os.path.dirname({target!r}), "
    "os.O_RDONLY)\nos.open(os.path.basename({target!r}), os.O_WRONLY | os.O_CREAT, dir_fd=fd)",
    "os.open": "import os\nos.open({target!r}, os.O_WRONLY | os.O_CREAT)",
    "bytes path": "open({target!r}.encode(), 'wb').write(b'x')",
}


@pytest.mark.parametrize("how", sorted(ESCAPES))
def test_the_audit_hook_refuses_writes_however_the_path_is_spelled(how):
    """In a world-writable directory, so only the audit hook stands in the way."""
    open_dir = Path(tempfile.mkdtemp(prefix="glassbox-test-open-"))
    try:
        open_dir.chmod(0o777)
        target = open_dir / "escaped.txt"
        result = run_python(ESCAPES[how].format(target=str(target)))
        assert not result.passed and "sandbox:" in result.stderr, result.stderr
        assert not target.exists()
    finally:
        shutil.rmtree(open_dir)


def test_files_inside_the_sandbox_stay_usable():
    code = (
        "import os, shutil, tempfile\nfrom pathlib import Path\n"
        "os.makedirs('a/b')\nPath('a/b/f.txt').write_text('hi')\nos.rename('a', 'c')\n"
        "with tempfile.NamedTemporaryFile() as f:\n    f.write(b'x')\n"
        "shutil.rmtree('c')\nprint(sorted(os.listdir('.')))"
    )
    result = run_python(code)
    assert result.passed, result.stderr
    assert result.stdout.strip() == "[]"  # (the program file is removed before it runs)
