"""benchmarks/kernel_report.py on the CPU: the log-prob kernels, compiled for sm_90 as a launch specializes
them, keep their Hopper shape -- TMA operands, a pipelined wgmma main loop, no register spills. The full
table (every config) is a CI step; this checks one config per kernel so that a change that breaks the
shape fails here first. Needs triton's CUDA backend (its ptxas), not a GPU."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")

_PATH = Path(__file__).resolve().parent.parent / "benchmarks" / "kernel_report.py"


def _report_module():
    spec = importlib.util.spec_from_file_location("kernel_report", _PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_ONE_CASE = """
import json, sys
sys.path.insert(0, {bench!r})
import kernel_report as report  # the kernels compile: TRITON_INTERPRET=0 is in the environment
case = next(c for c in report.cases() if c["kernel"] == {kernel!r} and c["variant"] == "bf16 entropy=1"
            and c["constexprs"]["BLOCK_V"] == 128 and c["num_warps"] == 8)
row = report.compile_case(case)
print(json.dumps({{**row, "misses": report.verdict(row)}}))
"""


@pytest.mark.slow
@pytest.mark.parametrize("kernel", ["logprob_fwd", "logprob_bwd"])
def test_logprob_kernels_pipeline_without_spills(kernel):
    """bf16 with the entropy (the training call), 128 x 128 tiles on 8 warps: a config every GPU run tunes.
    In a subprocess: the test session runs the kernels in the interpreter, which cannot compile."""
    code = _ONE_CASE.format(bench=str(_PATH.parent), kernel=kernel)
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "error" not in row, row.get("error")
    assert row["wgmma"] and row["tma"], row
    assert row["stages"] >= 2, row
    assert row["spill_bytes"] == 0, row
    assert row["misses"] == []


def test_stage_count_reads_the_ttgir():
    """The stage parser on the two shapes a main loop takes: operands staged in a ring, or one buffer."""
    report = _report_module()
    staged = ("%0 = ttg.local_alloc : () -> !ttg.memdesc<3x128x64xbf16, #shared, #smem, mutable>\n"
              "%1 = ttng.warp_group_dot %a, %b, %c")
    single = ("%a = ttg.local_alloc %x : (tensor<128x64xbf16, #blocked>) -> !ttg.memdesc<128x64xbf16, #shared>\n"
              "%1 = ttng.warp_group_dot %a, %b, %c")
    assert report.main_loop_stages(staged) == 3
    assert report.main_loop_stages(single) == 1
    assert report.main_loop_stages("tt.load %p") is None
