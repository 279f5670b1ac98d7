"""vzero-sandbox (sandbox/vzero_sandbox.c) through vzero_fast/sandbox.py: each limit and each confinement.

Every escape test has a control that shows it can fail: the same write or connection succeeds unconfined,
or the same code succeeds inside the sandbox when it stays within its limits. Payloads are python3
(`sys.executable`) snippets and the small C program sandbox/tests/payload.c (compiled here with cc).
Uses the installed binary (`pip install -e .`); if it is missing, builds one with CMake into a temporary
folder; skips only where that cannot be done (not Linux x86_64, no compiler, no cmake).

Run: pytest -q tests/test_sandbox.py  (~15 s on 2 cores)
"""

from __future__ import annotations

import errno
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import pytest

from vzero_fast import sandbox

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable


def _installed() -> Path | None:
    try:
        return sandbox.sandbox_binary()
    except sandbox.SandboxUnavailable:
        return None


INSTALLED = _installed()  # before the fixture below builds one of its own


def test_the_install_built_the_launcher():
    """On Linux x86_64 the project's install (`pip install -e .`, setup.py's build_ext) puts the launcher in the
    package, so a broken native build cannot hide behind the fixture's own CMake build."""
    assert INSTALLED is not None, "vzero-sandbox is missing from the package: the install did not build it"
    r = subprocess.run([str(INSTALLED), "--probe"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and json.loads(r.stdout.strip().splitlines()[-1])["ready"], r.stdout + r.stderr


def _build_binary(tmp: Path) -> Path:
    cmake = shutil.which("cmake")
    if cmake is None:
        try:
            import cmake as cmake_wheel

            cmake = str(Path(cmake_wheel.CMAKE_BIN_DIR) / "cmake")
        except ImportError:
            pytest.skip("vzero-sandbox is not built and no cmake is available to build it")
    build = tmp / "build"
    r = subprocess.run([cmake, "-S", str(REPO), "-B", str(build)], capture_output=True, text=True)
    if r.returncode == 0:
        r = subprocess.run([cmake, "--build", str(build), "--target", "vzero-sandbox"], capture_output=True,
                           text=True)
    if r.returncode != 0:
        pytest.skip(f"vzero-sandbox cannot be built here: {(r.stdout + r.stderr)[-400:]}")
    return build / "vzero-sandbox"


@pytest.fixture(scope="session", autouse=True)
def binary(tmp_path_factory) -> Path:
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip(f"vzero-sandbox supports Linux x86_64 only, not {platform.system()} {platform.machine()}")
    try:
        path = sandbox.sandbox_binary()
    except sandbox.SandboxUnavailable:
        path = _build_binary(tmp_path_factory.mktemp("sbx"))
        os.environ["VZERO_SANDBOX"] = str(path)
    return path


@pytest.fixture(scope="session")
def payload(tmp_path_factory) -> str:
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler for the C payloads")
    out = tmp_path_factory.mktemp("payload") / f"sbx-payload-{uuid.uuid4().hex[:8]}"
    subprocess.run([cc, "-O1", "-o", str(out), str(REPO / "sandbox" / "tests" / "payload.c")], check=True)
    return str(out)


def _processes_matching(marker: str) -> list[int]:
    """Pids of live (non-zombie) processes whose command line contains marker."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if marker.encode() in cmdline and state != "Z":
            found.append(int(entry))
    return found


def py(code: str, **kw) -> sandbox.Confined:
    return sandbox.run_confined([PY, "-c", code], **kw)


def test_probe_reports_a_ready_sandbox():
    features = sandbox.probe()
    assert features["ready"] is True, features
    for key in ("mount_ns", "pid_ns", "readonly_remount", "seccomp"):
        assert features[key] is True, (key, features)
    assert isinstance(features["landlock_abi"], int)


def test_normal_program_passes_stdin_stdout_and_status_through():
    data = bytes(range(256)) * 4096  # 1 MiB, every byte value
    r = py("import sys; d = sys.stdin.buffer.read(); sys.stdout.buffer.write(d[::-1]); "
           "print('to stderr', file=sys.stderr); sys.exit(7)", stdin=data)
    assert r.returncode == 7 and r.limit is None
    assert r.stdout == data[::-1]
    assert r.stderr == b"to stderr\n"
    c = sandbox.run_confined(["/bin/echo", "plain", "args"])
    assert (c.returncode, c.stdout, c.limit) == (0, b"plain args\n", None)


def test_infinite_loop_is_killed_at_the_timeout():
    r = py("while True: pass", timeout=1.5)
    assert r.returncode == sandbox.EXIT_TIMEOUT and r.limit == "timeout"
    assert b"vzero-sandbox: wall-clock limit (1.5 s) exceeded" in r.stderr
    assert 1.5 <= r.seconds < 3.5, r.seconds  # killed at the deadline, not before; teardown takes ms


def test_timeout_kills_every_descendant(payload):
    marker = f"vzero-sbx-marker-{uuid.uuid4().hex}"
    # a background grandchild (setsid() is denied, and it could not leave the pid namespace anyway)
    r = sandbox.run_confined(["/bin/bash", "-c", f"(exec -a {marker} sleep 300) & (exec -a {marker} sleep 300) & "
                              "while :; do :; done"], timeout=1)
    assert r.returncode == sandbox.EXIT_TIMEOUT
    time.sleep(0.2)
    assert _processes_matching(marker) == []
    # the command exiting by itself takes its background processes along too
    r = sandbox.run_confined(["/bin/bash", "-c", f"(exec -a {marker} sleep 300) & echo started"], timeout=10)
    assert (r.returncode, r.stdout) == (0, b"started\n")
    assert r.seconds < 5
    time.sleep(0.2)
    assert _processes_matching(marker) == []


def test_cpu_limit():
    r = py("while True: pass", timeout=20, cpu_seconds=1)
    assert r.returncode == sandbox.EXIT_LIMIT and r.limit == "cpu"
    assert b"vzero-sandbox: cpu limit (1 s) exceeded" in r.stderr
    assert r.seconds < 10


@pytest.mark.parametrize("kind", ["c", "python"])
def test_fork_bomb_is_contained(kind, payload):
    # Both bombs keep forking when fork fails (EAGAIN at the limit), as the C one does: a bomb whose processes
    # die of their first failed fork can all be gone before the launcher's 10 ms poll sees the limit (seen
    # under load in CI: status 1 instead of 137).
    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass"
    argv = [payload, "forkbomb"] if kind == "c" else [PY, "-c", bomb]
    r = sandbox.run_confined(argv, timeout=20, extra_args=["--procs", "32"])
    assert r.returncode == sandbox.EXIT_LIMIT and r.limit == "processes", r.stderr[-300:]
    assert b"vzero-sandbox: process limit (32 tasks) reached" in r.stderr
    assert r.seconds < 10
    time.sleep(0.2)
    if kind == "c":
        assert _processes_matching(payload) == []
    # this process is unaffected: it can still start processes
    assert subprocess.run(["/bin/true"]).returncode == 0


def test_memory_hog_is_killed():
    # touched memory (b"x" * n writes every page), 8 MiB at a time
    r = py("x = []\nwhile True:\n    x.append(b'x' * (8 << 20))", memory_mib=200, timeout=30)
    assert r.returncode == sandbox.EXIT_LIMIT and r.limit == "memory", r.stderr[-300:]
    assert r.stderr.endswith(b"vzero-sandbox: memory limit (200 MiB) exceeded\n")
    # control: the same program with a bound runs to the end under the same limit
    ok = py("x = [b'x' * (8 << 20) for _ in range(5)]; print(len(x))", memory_mib=200)
    assert (ok.returncode, ok.stdout, ok.limit) == (0, b"5\n", None)


def test_memory_hog_c_and_refused_huge_allocation(payload):
    r = sandbox.run_confined([payload, "memhog"], memory_mib=128, timeout=30)
    assert r.returncode == sandbox.EXIT_LIMIT and r.limit == "memory"
    assert r.stderr.endswith(b"vzero-sandbox: memory limit (128 MiB) exceeded\n")
    # malloc(64 GiB) fails under RLIMIT_AS and the program aborts, as Rust does: inferred, and said so
    r = sandbox.run_confined([payload, "bigalloc"], memory_mib=128)
    assert r.returncode == sandbox.EXIT_LIMIT and r.limit == "memory"
    assert b"(inferred from SIGABRT under the 256 MiB address-space limit)" in r.stderr


WRITE_PROBE = """
import json, os, sys
result = {}
for path in sys.argv[1:]:
    try:
        with open(path, "w") as f:
            f.write("x")
        result[path] = "ok"
    except OSError as e:
        result[path] = e.errno
print(json.dumps(result))
"""


def test_writing_outside_the_workdir_is_denied(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the caller's cwd
    name = f"vzero-sbx-{uuid.uuid4().hex}"
    outside = [f"/tmp/{name}", str(tmp_path / name), f"/dev/shm/{name}", f"{REPO}/{name}"]
    argv = [PY, "-c", WRITE_PROBE, *outside, "inside.txt", "/dev/null"]
    # control: unconfined, every one of these writes works
    plain = subprocess.run(argv, capture_output=True, text=True, check=True)
    assert set(json.loads(plain.stdout).values()) == {"ok"}
    for p in outside:
        os.unlink(p)
    os.unlink(tmp_path / "inside.txt")
    r = sandbox.run_confined(argv)
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    for p in outside:
        assert result[p] in (errno.EROFS, errno.EACCES, errno.EPERM), (p, result[p])
        assert not os.path.exists(p)
    assert result["inside.txt"] == "ok" and result["/dev/null"] == "ok"
    assert not (tmp_path / "inside.txt").exists()  # the sandbox's cwd is its own, not the caller's


def test_network_is_refused(payload):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    code = ("import socket, sys\ns = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3)\n"
            "print('connected')")
    try:
        # control: unconfined, the connection to the local listener works
        plain = subprocess.run([PY, "-c", code, "127.0.0.1", str(port)], capture_output=True, text=True)
        assert plain.stdout == "connected\n", plain.stderr
        for host, p in (("127.0.0.1", port), ("1.1.1.1", 443)):
            r = sandbox.run_confined([PY, "-c", code, host, str(p)], timeout=10)
            assert r.returncode == 1 and b"PermissionError: [Errno 1] Operation not permitted" in r.stderr, r.stderr
        r = sandbox.run_confined([payload, "connect", "127.0.0.1", str(port)])
        assert (r.returncode, r.stdout) == (3, b"socket: Operation not permitted\n")
    finally:
        server.close()


def test_output_flood_is_capped():
    r = py("import sys\nwhile True:\n    sys.stdout.buffer.write(b'x' * 65536)", output_limit=100_000)
    assert r.returncode == sandbox.EXIT_LIMIT and r.limit == "output"
    assert r.stdout == b"x" * 100_000
    assert r.stderr.endswith(b"vzero-sandbox: output limit (100000 bytes) exceeded\n")


def test_environment_is_clean(monkeypatch):
    monkeypatch.setenv("VZERO_SBX_SECRET", "must-not-leak")
    r = py("import json, os; print(json.dumps({**dict(os.environ), 'cwd': os.getcwd()}))", env={"EXTRA": "1"})
    seen = json.loads(r.stdout)
    cwd = seen.pop("cwd")
    assert set(seen) == {"PATH", "HOME", "TMPDIR", "LANG", "EXTRA"}
    assert seen["HOME"] == seen["TMPDIR"] == cwd and seen["EXTRA"] == "1" and seen["LANG"] == "C.UTF-8"
    assert seen["PATH"] == "/usr/local/bin:/usr/bin:/bin"


def test_workdir_is_fresh_empty_and_removed():
    code = "import os; print(os.getcwd()); print(os.listdir('.')); open('f', 'w').write('x')"
    dirs = []
    for _ in range(2):
        r = py(code)
        cwd, listing = r.stdout.decode().splitlines()
        assert listing == "[]"
        dirs.append(cwd)
        assert not os.path.exists(cwd)
    assert dirs[0] != dirs[1]


def test_exit_statuses_for_setup_problems(tmp_path):
    r = sandbox.run_confined(["no-such-command-vzero"])
    assert r.returncode == sandbox.EXIT_NOT_FOUND and r.limit is None
    assert b"vzero-sandbox: cannot run no-such-command-vzero: No such file or directory" in r.stderr
    not_exec = tmp_path / "script"
    not_exec.write_text("#!/bin/sh\necho hi\n")
    not_exec.chmod(0o644)
    r = sandbox.run_confined([str(not_exec)])
    assert r.returncode == sandbox.EXIT_CANNOT_EXEC
    r = sandbox.run_confined(["/bin/true"], extra_args=["--bogus", "1"])
    assert r.returncode == sandbox.EXIT_SETUP and b"unknown option '--bogus'" in r.stderr


def test_refused_namespaces_fail_loudly():
    # inside the sandbox, seccomp refuses clone() with namespace flags: a nested launcher must say so
    r = sandbox.run_confined([str(sandbox.sandbox_binary()), "--", "/bin/true"])
    assert r.returncode == sandbox.EXIT_SETUP and r.limit is None
    assert b"vzero-sandbox: the kernel refused new" in r.stderr and b"Operation not permitted" in r.stderr


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None, reason="needs root and setpriv")
def test_unprivileged_caller_gets_the_user_namespace_mode(payload):
    # the launcher as uid 65534: the user-namespace path (no uid drop) must confine just as well
    with tempfile.TemporaryDirectory(prefix="vzero-sbx-nobody-") as d:  # pytest's tmp is 0700 root
        shared = Path(d)
        shared.chmod(0o755)
        _run_as_nobody(shared, payload)


def _run_as_nobody(shared: Path, payload: str) -> None:
    for p in (str(sandbox.sandbox_binary()), payload):
        shutil.copy(p, shared)
    sbx, pay = str(shared / "vzero-sandbox"), str(shared / Path(payload).name)
    nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sbx]
    features = json.loads(subprocess.run([*nobody, "--probe"], capture_output=True, text=True).stdout)
    if not features["ready"]:
        pytest.skip(f"unprivileged user namespaces are refused here: {features}")
    assert features["mode"] == "user-namespace"
    r = subprocess.run([*nobody, "--procs", "16", "--timeout", "20", "--", pay, "forkbomb"], capture_output=True)
    assert r.returncode == 137 and b"process limit (16 tasks) reached" in r.stderr
    r = subprocess.run([*nobody, "--", pay, "write", str(shared / "outside")], capture_output=True)
    assert r.returncode == 3 and not (shared / "outside").exists()
    r = subprocess.run([*nobody, "--", pay, "connect", "127.0.0.1", "22"], capture_output=True)
    assert (r.returncode, r.stdout) == (3, b"socket: Operation not permitted\n")
    r = subprocess.run([*nobody, "--", pay, "hello"], capture_output=True)
    assert (r.returncode, r.stdout) == (0, b"hello from the sandbox\n")


def test_parent_timeout_when_the_launcher_hangs(tmp_path, monkeypatch):
    fake = tmp_path / "hanging-launcher"
    fake.write_text("#!/bin/sh\nexec sleep 60\n")
    fake.chmod(0o755)
    monkeypatch.setenv("VZERO_SANDBOX", str(fake))
    monkeypatch.setattr(sandbox, "PARENT_GRACE_S", 0.5)
    start = time.perf_counter()
    r = sandbox.run_confined(["/bin/true"], timeout=0.5)
    assert (r.returncode, r.limit) == (sandbox.EXIT_TIMEOUT, "timeout")
    assert time.perf_counter() - start < 5


def test_missing_binary_names_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("VZERO_SANDBOX", str(tmp_path / "absent"))
    with pytest.raises(sandbox.SandboxUnavailable, match="VZERO_SANDBOX"):
        sandbox.run_confined(["/bin/true"])
    monkeypatch.delenv("VZERO_SANDBOX")
    monkeypatch.setattr(sandbox, "PACKAGE_BINARY", tmp_path / "absent")
    with pytest.raises(sandbox.SandboxUnavailable, match="pip install -e ."):
        sandbox.sandbox_binary()


def test_concurrent_runs_are_independent():
    results = [None] * 4

    def work(i):
        results[i] = py(f"import time; time.sleep(0.3); print({i})")

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [(r.returncode, r.stdout) for r in results] == [(0, f"{i}\n".encode()) for i in range(4)]


def test_resvg_renders_and_a_huge_canvas_is_stopped():
    pytest.importorskip("resvg_py")
    render = ("import sys, resvg_py\n"
              "sys.stdout.buffer.write(bytes(resvg_py.svg_to_bytes(svg_string=sys.stdin.read())))")
    svg = b'<svg xmlns="http://www.w3.org/2000/svg" width="40" height="30"><rect width="20" height="10"/></svg>'
    r = py(render, stdin=svg, memory_mib=512)
    assert r.returncode == 0, r.stderr[-300:]
    assert r.stdout[:8] == b"\x89PNG\r\n\x1a\n"
    assert int.from_bytes(r.stdout[16:20], "big") == 40 and int.from_bytes(r.stdout[20:24], "big") == 30
    huge = b'<svg xmlns="http://www.w3.org/2000/svg" width="100000" height="100000"><rect width="9" height="9"/></svg>'
    r = py(render, stdin=huge, memory_mib=512, timeout=30)
    assert r.returncode == sandbox.EXIT_LIMIT and r.limit == "memory", (r.returncode, r.stderr[-300:])
