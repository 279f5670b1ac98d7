"""Run one command confined by the native `vzero-sandbox` launcher (sandbox/vzero_sandbox.c), from Python.

Model-written code (SVG to render, matplotlib scripts) never runs unconfined: callers hand its argv and
stdin to `run_confined` and get back a `Confined(returncode, stdout, stderr, limit, seconds)`.

Decisions:
  - The launcher does the confinement (namespaces, read-only mounts, a per-run uid, rlimits, Landlock, a
    seccomp allow-list, a wall-clock timeout that kills the whole pid namespace, an output cap); this file
    only builds its command line, feeds stdin, and reads what came back. No torch import: it is light.
  - Which limit stopped the command comes from the launcher's `--report-fd` line (a pipe the command
    cannot write to), never from stderr, which the confined code could forge.
  - Belt and braces: the parent waits at most `timeout + PARENT_GRACE_S`; past that it kills the
    launcher (whose init child dies with it through PR_SET_PDEATHSIG, taking the namespace along) and
    reports a timeout. The trainer can never hang on a render.
  - The binary: `$VZERO_SANDBOX` if set, else `vzero_fast/_bin/vzero-sandbox` (built by setup.py's
    build_ext: `pip install -e .`); missing, it raises `SandboxUnavailable` naming that fix. Nothing falls
    back to running unconfined.

Exit statuses (the launcher's): the command's own; 128+N when it died of signal N; 124 wall-clock
timeout; 137 a limit ("memory", "output", "processes", "cpu", "file_size"); 125 the sandbox could not be
set up; 126 the command cannot be executed; 127 it was not found.

Test: `pytest -q tests/test_sandbox.py`; `vzero-sandbox --probe` (or `probe()`) says what this kernel offers.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

PACKAGE_BINARY = Path(__file__).resolve().parent / "_bin" / "vzero-sandbox"
# Seconds the parent waits beyond `timeout` before it kills the launcher itself.
PARENT_GRACE_S = 5.0
DEFAULT_OUTPUT_LIMIT = 16 << 20  # bytes of stdout + stderr together

EXIT_TIMEOUT, EXIT_SETUP, EXIT_CANNOT_EXEC, EXIT_NOT_FOUND, EXIT_LIMIT = 124, 125, 126, 127, 137
LIMITS = ("timeout", "memory", "output", "processes", "cpu", "file_size", "interrupted")


class SandboxUnavailable(RuntimeError):
    """The vzero-sandbox executable is missing or not runnable."""


@dataclass(frozen=True)
class Confined:
    """What one confined run gave back."""

    returncode: int
    """The launcher's exit status (see the module docstring)."""
    stdout: bytes
    """The command's stdout (at most `output_limit` bytes together with stderr)."""
    stderr: bytes
    """The command's stderr, then the launcher's own line when it stopped the command."""
    limit: str | None
    """Which limit stopped it (one of LIMITS), or None when the command ended by itself."""
    seconds: float
    """Wall-clock seconds of the run, as measured by the launcher (by the parent if it had to kill it)."""


def sandbox_binary() -> Path:
    """The vzero-sandbox executable: `$VZERO_SANDBOX`, else the one built into the package."""
    override = os.environ.get("VZERO_SANDBOX")
    if override:
        path = Path(override)
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise SandboxUnavailable(f"$VZERO_SANDBOX={override} is not an executable file")
        return path
    if PACKAGE_BINARY.is_file() and os.access(PACKAGE_BINARY, os.X_OK):
        return PACKAGE_BINARY
    raise SandboxUnavailable(
        f"vzero-sandbox is not built ({PACKAGE_BINARY} is missing): run `pip install -e .` in the repository "
        "(its build_ext compiles sandbox/vzero_sandbox.c with CMake), or point $VZERO_SANDBOX at a binary")


def _parse_report(text: str) -> dict[str, str]:
    line = text.strip().splitlines()[-1] if text.strip() else ""
    return dict(field.split("=", 1) for field in line.split() if "=" in field)


def run_confined(argv: Sequence[str], *, stdin: bytes = b"", timeout: float = 30, memory_mib: int = 1024,
                 cpu_seconds: float | None = None, output_limit: int = DEFAULT_OUTPUT_LIMIT,
                 env: Mapping[str, str] | None = None, extra_args: Sequence[str] = ()) -> Confined:
    """Run `argv` inside vzero-sandbox with `stdin`; returns its status, output and the limit that hit it.

    `env` adds variables to the clean environment (PATH, HOME, TMPDIR, LANG); `extra_args` are more
    launcher options (e.g. ["--procs", "16"]); `cpu_seconds` sets RLIMIT_CPU (default: timeout + 1).
    """
    if not argv:
        raise ValueError("run_confined: argv is empty")
    if not (timeout > 0 and math.isfinite(timeout)):
        raise ValueError(f"run_confined: timeout must be > 0 seconds, got {timeout}")
    if memory_mib < 1 or output_limit < 1:
        raise ValueError(f"run_confined: memory_mib ({memory_mib}) and output_limit ({output_limit}) must be >= 1")
    cmd = [str(sandbox_binary()), "--timeout", repr(float(timeout)), "--memory", str(int(memory_mib)),
           "--output", str(int(output_limit))]
    if cpu_seconds is not None:
        cmd += ["--cpu", str(max(1, math.ceil(cpu_seconds)))]
    for key, value in (env or {}).items():
        if not key or "=" in key:
            raise ValueError(f"run_confined: bad environment variable name {key!r}")
        cmd += ["--env", f"{key}={value}"]
    read_end, write_end = os.pipe()
    cmd += ["--report-fd", str(write_end), *extra_args, "--", *argv]
    start = time.perf_counter()
    try:
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                pass_fds=(write_end,))
    finally:
        os.close(write_end)
    try:
        try:
            out, err = proc.communicate(stdin, timeout=timeout + PARENT_GRACE_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            seconds = time.perf_counter() - start
            line = f"vzero-sandbox (parent): no answer after {timeout + PARENT_GRACE_S:g} s; launcher killed\n"
            return Confined(EXIT_TIMEOUT, out, err + line.encode(), "timeout", seconds)
        os.set_blocking(read_end, False)  # written before the launcher exited; never wait for more
        try:
            report = _parse_report(os.read(read_end, 4096).decode("ascii", errors="replace"))
        except BlockingIOError:
            report = {}
    finally:
        os.close(read_end)
    limit = report.get("limit")
    seconds = float(report["seconds"]) if "seconds" in report else time.perf_counter() - start
    return Confined(proc.returncode, out, err, None if limit in (None, "none") else limit, seconds)


def probe() -> dict:
    """Which confinement features work here (`vzero-sandbox --probe`), plus `binary`; `ready` is the verdict."""
    try:
        binary = sandbox_binary()
    except SandboxUnavailable as e:
        return {"ready": False, "error": str(e)}
    proc = subprocess.run([str(binary), "--probe"], capture_output=True, timeout=60)
    try:
        features = json.loads(proc.stdout.decode())
    except ValueError:
        return {"ready": False, "binary": str(binary),
                "error": f"--probe exited {proc.returncode}: {proc.stderr.decode(errors='replace')[-300:]}"}
    features["binary"] = str(binary)
    return features


def main() -> None:
    """The `vzero-sandbox` console script: exec the binary with the same arguments."""
    try:
        binary = sandbox_binary()
    except SandboxUnavailable as e:
        print(f"vzero-sandbox: {e}", file=sys.stderr)
        raise SystemExit(EXIT_SETUP) from None
    os.execv(binary, [str(binary), *sys.argv[1:]])


if __name__ == "__main__":
    main()
