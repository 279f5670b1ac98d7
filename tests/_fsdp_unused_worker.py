"""Run by tests/test_gpu_readiness.py under `torchrun --nproc_per_node=2`: FSDP2 as on torch 2.11, which has
no FSDPModule.set_reduce_scatter_unused_params (removed here before sharding).

Each rank runs one training pass with an image (forward + backward: reduce-scatters on both ranks) and one
without (must raise before any collective). Prints one JSON line per rank:
{"rank", "image_pass_grad_norm", "text_only_error"}.
Usage: torchrun --standalone --nproc_per_node=2 tests/_fsdp_unused_worker.py MODEL_DIR
"""

import sys

from _fsdp_worker import finish  # the same directory: torchrun runs this file as a script
from torch.distributed.fsdp import FSDPModule

from vzero_fast import distributed as dist
from vzero_fast.config import DistConfig
from vzero_fast.data import synthetic_figure
from vzero_fast.model import encode_prompts, forward_hidden, load_policy


def main(model_dir: str) -> None:
    delattr(FSDPModule, dist.UNUSED_PARAMS_API)  # what torch 2.11 looks like
    world = dist.init(DistConfig(timeout_s=60), "cpu")
    policy = load_policy(model_dir, dtype="float32", device="cpu", attn_implementation="sdpa")
    dist.shard_model(policy.model, world)
    policy.model.train()
    batch = encode_prompts(policy, [synthetic_figure(world.rank, size=56)], ["Describe the figure."])
    hidden = forward_hidden(policy, **batch)
    hidden.float().pow(2).mean().backward()
    params = [p for p in policy.model.parameters() if p.grad is not None]
    norm = dist.clip_grad_norm_(params, max_norm=1e9)
    try:
        forward_hidden(policy, input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        error = ""
    except RuntimeError as exc:
        error = str(exc)
    finish({"rank": world.rank, "image_pass_grad_norm": float(norm), "text_only_error": error})


if __name__ == "__main__":
    main(sys.argv[1])
