"""Independent references for a rollout engine's log-probs, shared by the engine tests (native and vLLM).

- `forward_logprob_gap`: float64 log_softmax(hidden / T) of the training forward (`model.forward_hidden`), one
  prompt's samples at a time, right-padded; the largest |engine - reference| over every sampled token.
- `trainer_logprobs`: the trainer's own scoring of the samples (`grpo.collate` + `token_logprobs`).
"""

from __future__ import annotations

import torch

from vzero_fast.grpo import SampleBatch, collate, token_logprobs
from vzero_fast.model import forward_hidden


def forward_logprob_gap(policy, outputs, temperature: float) -> float:
    weight = policy.lm_head_weight.double()  # [V, H]
    gap = 0.0
    for o in outputs:
        n, p = len(o.samples), len(o.prompt_ids)
        length = max(len(s.token_ids) for s in o.samples)
        ids = torch.full((n, p + length), policy.pad_token_id)  # right-padded responses
        mask = torch.zeros(n, p + length, dtype=torch.long)
        for i, s in enumerate(o.samples):
            ids[i, :p], ids[i, p:p + len(s.token_ids)] = o.prompt_ids, s.token_ids
            mask[i, :p + len(s.token_ids)] = 1
        mm = torch.zeros_like(ids)
        mm[:, :p] = o.mm_token_type_ids
        with torch.no_grad():
            hidden = forward_hidden(policy, input_ids=ids, attention_mask=mask, mm_token_type_ids=mm,
                                    pixel_values=torch.cat([o.pixel_values] * n),
                                    image_grid_thw=o.image_grid_thw.repeat(n, 1))  # [n, p + L, H]
        ref = torch.log_softmax(hidden.double()[:, p - 1:-1] @ weight.T / temperature, -1)  # [n, L, V]
        for i, s in enumerate(o.samples):
            want = ref[i, :len(s.token_ids)].gather(-1, s.token_ids[:, None])[:, 0]
            gap = max(gap, (s.logprobs.double() - want).abs().max().item())
    return gap


def trainer_logprobs(policy, outputs, temperature: float) -> list[torch.Tensor]:
    """The trainer's own log-probs of the sampled tokens (collate + token_logprobs), per sample."""
    batch = SampleBatch.from_outputs(outputs, torch.zeros(sum(len(o.samples) for o in outputs)))
    mb = collate(batch, list(range(len(batch))), policy, batch.max_response)
    with torch.no_grad():
        lp = token_logprobs(policy, policy.lm_head_weight, mb, temperature)  # [B, R]
    return [lp[i, :len(r)] for i, r in enumerate(batch.response_ids)]
