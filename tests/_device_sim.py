"""A simulated accelerator for CPU tests: real CPU arithmetic behind tensors that say they live elsewhere.

Code written for a GPU fails there in ways a CPU run never shows: a tensor made without `device=` lands on
the host and meets a device tensor ("Expected all tensors to be on the same device"), or a host tensor is
indexed with device indices. Inside `simulated_device()` the device "meta" stands in for the GPU: tensors
created on or moved to it are `SimTensor`s, wrappers that report device meta and hold their values in a CPU
tensor, so the model, the kernels' torch paths and the optimizer compute real numbers; and every op enforces
CUDA's device rules, raising `DeviceMismatch` where CUDA would raise:
- an op may not mix device tensors with host tensors, except 0-dim host tensors (CUDA accepts CPU scalars);
- indexing a device tensor with host indices is allowed, indexing a host tensor with device indices is not.
Moving data (`.to`, `.cpu()`, `copy_`) between host and device is allowed, as on CUDA.

Usage:  with simulated_device() as sim:  model.to(SIM_DEVICE); ...   (`unwrap(t)` gives a tensor's CPU
values; `sim.host_reads` counts the device -> host reads, each of which is a host sync on CUDA)

Not simulated: streams, asynchrony, memory limits, CUDA-only APIs (`torch.cuda.*`), Triton launches (the
kernels' dispatch sees a non-CUDA device and runs their torch paths). Used by tests/test_gpu_readiness.py.
"""

from __future__ import annotations

import contextlib

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

SIM_DEVICE = torch.device("meta")
_HOST = torch.device("cpu")
_INDEX_OPS = {torch.ops.aten.index.Tensor, torch.ops.aten.index_put.default, torch.ops.aten.index_put_.default,
              torch.ops.aten._index_put_impl_.default}
# Factories that copy Python data below the dispatcher: with device=meta the values would be dropped.
_DATA_FACTORIES = {torch.tensor, torch.as_tensor, torch.asarray, torch.Tensor.new_tensor, torch.scalar_tensor}


class DeviceMismatch(RuntimeError):
    """What CUDA would have raised: tensors of the host and of the device met in one op."""


class SimStats:
    """What a simulated run did that costs on a real device."""

    def __init__(self):
        self.host_reads = 0  # device -> host copies, .item(), .tolist(): each one a host sync on CUDA


_stats: list[SimStats] = []  # the innermost active simulation's counters


def _count_host_read() -> None:
    if _stats:
        _stats[-1].host_reads += 1


class SimTensor(torch.Tensor):
    """Reports SIM_DEVICE; its values live in the CPU tensor `elem`."""

    elem: torch.Tensor

    @staticmethod
    def __new__(cls, elem: torch.Tensor):
        if elem.device != _HOST:
            raise AssertionError(f"a simulated tensor holds CPU values, got {elem.device}")
        r = torch.Tensor._make_wrapper_subclass(cls, elem.shape, strides=elem.stride(),
                                                storage_offset=elem.storage_offset(), dtype=elem.dtype,
                                                layout=elem.layout, device=SIM_DEVICE,
                                                requires_grad=elem.requires_grad)
        r.elem = elem
        return r

    def tolist(self):  # torch refuses tolist() on wrapper subclasses
        _count_host_read()
        return self.elem.tolist()

    def numpy(self, *args, **kwargs):
        return self.elem.numpy(*args, **kwargs)

    def __repr__(self):
        return f"SimTensor({self.elem!r})"

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise RuntimeError("a simulated-device tensor was used outside simulated_device()")


def unwrap(t):
    """The CPU values of a simulated tensor (anything else as it is)."""
    return t.elem if isinstance(t, SimTensor) else t


def _host_data(x):
    if isinstance(x, SimTensor):
        return x.elem
    if isinstance(x, (list, tuple)):
        return type(x)(_host_data(v) for v in x)
    return x


def _is_sim(device) -> bool:
    return device is not None and torch.device(device).type == SIM_DEVICE.type


class _DataFactories(TorchFunctionMode):
    """torch.tensor(data, device=meta) and friends: built on the host, then wrapped."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _DATA_FACTORIES:
            device = kwargs.get("device")
            if func is torch.Tensor.new_tensor and device is None and isinstance(args[0], SimTensor):
                device = SIM_DEVICE
            if _is_sim(device):
                kw = {**kwargs, "device": _HOST}
                if func is torch.Tensor.new_tensor:
                    return SimTensor(args[0].elem.new_tensor(_host_data(args[1]), *args[2:], **kw))
                return SimTensor(func(_host_data(args[0]), *args[1:], **kw))
        return func(*args, **kwargs)


class _DeviceRules(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        sim = [t for t in tensors if isinstance(t, SimTensor)]
        host = [t for t in tensors if not isinstance(t, SimTensor)]
        if any(t.device.type == SIM_DEVICE.type for t in host):
            raise AssertionError(f"{func}: a real meta tensor (no values) reached the simulation")
        # The target device: a device= keyword, or a positional device (aten.to.device).
        want = kwargs.get("device")
        if want is None:
            want = next((a for a in args if isinstance(a, torch.device)), None)
        want = torch.device(want) if want is not None else None

        if func is torch.ops.aten._to_copy.default:  # host <-> device copies are allowed
            src = args[0]
            kw = {k: v for k, v in kwargs.items() if k != "device"}
            val = func(unwrap(src), **kw)
            to_sim = _is_sim(want) if want is not None else isinstance(src, SimTensor)
            if isinstance(src, SimTensor) and not to_sim:
                _count_host_read()
            return SimTensor(val) if to_sim else val
        if func is torch.ops.aten._local_scalar_dense.default and sim:  # .item(), bool(t), float(t)
            _count_host_read()
        if func is torch.ops.aten.copy_.default:
            if isinstance(args[1], SimTensor) and not isinstance(args[0], SimTensor):
                _count_host_read()
            unwrap(args[0]).copy_(unwrap(args[1]))
            return args[0]

        if sim and host:
            if func in _INDEX_OPS:
                if not isinstance(args[0], SimTensor):
                    raise DeviceMismatch(f"{func}: a host tensor indexed with device indices")
                indices = args[1] if len(args) > 1 else []
                index_ids = {id(t) for t in indices if isinstance(t, torch.Tensor)}
                bad = [t for t in host if id(t) not in index_ids and t.dim() > 0]
            else:
                bad = [t for t in host if t.dim() > 0]
            if bad:
                raise DeviceMismatch(f"{func}: device tensors mixed with host tensors of shapes "
                                     f"{[tuple(t.shape) for t in bad]}")

        on_sim = _is_sim(want) if want is not None else bool(sim)
        if sim and not on_sim:  # e.g. aten.to.device(t, cpu): a device -> host copy
            _count_host_read()
        if _is_sim(want):
            args = tuple(_HOST if isinstance(a, torch.device) else a for a in args)
            if "device" in kwargs:
                kwargs = {**kwargs, "device": _HOST}
        out = func(*tree_map(unwrap, args), **tree_map(unwrap, kwargs))
        if not on_sim:
            return out
        if isinstance(out, torch.Tensor) and args and isinstance(args[0], SimTensor) and out is args[0].elem:
            return args[0]  # in-place ops return their own self
        return tree_map(lambda t: SimTensor(t) if type(t) is torch.Tensor else t, out)


@contextlib.contextmanager
def simulated_device():
    """Inside: SIM_DEVICE ("meta") behaves as an accelerator with real values and CUDA's device rules.
    Yields the run's SimStats."""
    stats = SimStats()
    _stats.append(stats)
    try:
        with _DataFactories(), _DeviceRules():
            yield stats
    finally:
        _stats.pop()
