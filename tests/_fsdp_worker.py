"""Run by tests/test_distributed.py under `torchrun --nproc_per_node=2`: a sharded tiny model generates, on
each rank, responses of a different length, and the all-gathers issued during `generate` are counted. Then
the weight stream the vLLM engine loads from (rollout_vllm.weight_stream) is read on the sharded model and
compared with an unsharded copy, counting the units unsharded at each yield.

Prints one JSON line per rank: {"rank", "all_gathers", "groups", "decode_steps", "sharded_after",
"stream_equal", "stream_tensors", "stream_max_unsharded", "stream_sharded_after"}.
Usage: torchrun --standalone --nproc_per_node=2 tests/_fsdp_worker.py MODEL_DIR
"""

import json
import sys

import torch
import torch.distributed as tdist

from vzero_fast import distributed as dist
from vzero_fast.config import DistConfig
from vzero_fast.data import synthetic_figure
from vzero_fast.model import load_policy
from vzero_fast.rollout import NativeEngine, Request, SamplingParams


def main(model_dir: str) -> None:
    world = dist.init(DistConfig(timeout_s=60), "cpu")
    policy = load_policy(model_dir, dtype="float32", device="cpu", attn_implementation="sdpa")
    dist.shard_model(policy.model, world)
    groups = len(dist._fsdp_modules(policy.model))
    calls = []
    # FSDP2 looks its all-gather up on torch.distributed at call time (all_gather_single in torch 2.13,
    # all_gather_into_tensor in older releases): count both.
    originals = {name: getattr(tdist, name) for name in ("all_gather_single", "all_gather_into_tensor")
                 if hasattr(tdist, name)}

    def counting(fn):
        def wrapped(*args, **kwargs):
            calls.append(1)
            return fn(*args, **kwargs)
        return wrapped

    for name, fn in originals.items():
        setattr(tdist, name, counting(fn))
    # Rank r decodes 3 + 9 r tokens: with per-token all-gathers the ranks would fall out of step and hang.
    req = Request.from_image_text(synthetic_figure(world.rank, size=56), "Describe the figure.",
                                  SamplingParams(n=2, max_new_tokens=3 + 9 * world.rank, temperature=0))
    engine = NativeEngine(policy)
    engine.generate([req])
    for name, fn in originals.items():
        setattr(tdist, name, fn)
    from torch.distributed.tensor import DTensor

    sharded = all(isinstance(p, DTensor) for p in policy.model.parameters())

    from vzero_fast.rollout_vllm import weight_stream

    prefixes = sorted((n for n, m in policy.model.named_modules() if m in dist._fsdp_modules(policy.model)),
                      key=len, reverse=True)  # the root is ""

    def unit_of(name: str) -> str:  # the innermost FSDP unit that owns a parameter
        return next(p for p in prefixes if not p or name.startswith(p + "."))
    plain = load_policy(model_dir, dtype="float32", device="cpu", attn_implementation="sdpa").model
    want = {**dict(plain.named_parameters()), **dict(plain.named_buffers())}
    got, most_unsharded = {}, 0
    for name, t in weight_stream(policy.model, torch.bfloat16):
        unsharded = len({unit_of(n) for n, p in policy.model.named_parameters() if not isinstance(p, DTensor)})
        most_unsharded = max(most_unsharded, unsharded)
        got[name] = t.clone()
    equal = (set(got) <= set(want) and {n for n, _ in plain.named_parameters()} <= set(got)
             and all(got[n].dtype == torch.bfloat16 and torch.equal(got[n], want[n].to(torch.bfloat16)) for n in got))
    stream_sharded = all(isinstance(p, DTensor) for p in policy.model.parameters())
    finish({"rank": world.rank, "all_gathers": len(calls), "groups": groups,
            "decode_steps": engine.stats.decode_steps, "sharded_after": sharded, "stream_equal": equal,
            "stream_tensors": len(got), "stream_max_unsharded": most_unsharded,
            "stream_sharded_after": stream_sharded})


def finish(row: dict) -> None:
    """Print this rank's JSON line and end the rank the way the trainer does."""
    # One write per line: the ranks share torchrun's stdout, and print() writes the text and the newline
    # separately (unbuffered under PYTHONUNBUFFERED), so two ranks' lines could interleave.
    sys.stdout.write(json.dumps(row) + "\n")
    sys.stdout.flush()
    dist.shutdown()  # a barrier, then the group is destroyed
    dist.end_process(0)  # no interpreter finalization under torchrun (vzero_fast/distributed.py)


if __name__ == "__main__":
    main(sys.argv[1])
