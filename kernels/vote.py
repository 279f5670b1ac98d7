"""Batched majority vote over groups of sampled answers: the inner loop of every pseudo-label.

answer_ids [G, n] int64, -1 for an invalid answer. Per group g:
    count_i   = #{j : id_j == id_i, id_j >= 0}          (0 for an invalid i)
    majority  = id_i* with i* = the smallest i of maximal count_i
    -> (majority_id, majority_count, valid_count); a group without a valid answer gives (-1, 0, 0).
Tie rule: among ids with the top count, the one whose first occurrence comes earliest. The smallest
position of maximal count is exactly that first occurrence (each id's first position has its full count),
so no separate first-occurrence pass is needed.

Triton (CUDA): `_vote_count_fwd_kernel`, one program per group, pairwise equality counts in registers,
columns streamed in blocks of 32. torch (CPU): the same pairwise [G, n, n] comparison, vectorised, in
group chunks of bounded memory. No gradient (ids are integers), so no backward.

Test: pytest tests/test_kernels_vote.py.
"""

from __future__ import annotations

from collections import Counter

import torch

from .dispatch import pick_backend, tl, triton

_BLOCK_J = 32  # columns compared per step
_TORCH_ELEMS = 1 << 24  # [G_chunk, n, n] comparison block of at most 16 M booleans


@triton.jit
def _vote_count_fwd_kernel(
    ids_ptr,    # [G, n] int64 answer ids, -1 = invalid
    maj_ptr,    # [G] int64 out: majority id (-1 if none)
    cnt_ptr,    # [G] int64 out: its count
    valid_ptr,  # [G] int64 out: number of valid answers
    n, stride_g, stride_n,
    BLOCK_N: tl.constexpr, BLOCK_J: tl.constexpr,
):
    g = tl.program_id(0)
    row = ids_ptr + g.to(tl.int64) * stride_g
    offs = tl.arange(0, BLOCK_N)
    ids = tl.load(row + offs * stride_n, mask=offs < n, other=-1)
    valid = ids >= 0
    counts = tl.zeros((BLOCK_N,), dtype=tl.int32)
    for j0 in range(0, n, BLOCK_J):
        js = j0 + tl.arange(0, BLOCK_J)
        other = tl.load(row + js * stride_n, mask=js < n, other=-1)
        # an invalid (or padding) id is -1 and matches no valid one, so its count stays 0
        same = (ids[:, None] == other[None, :]) & (other[None, :] >= 0)  # [BLOCK_N, BLOCK_J]
        counts += tl.sum(same.to(tl.int32), axis=1)
    best = tl.max(counts, axis=0)
    first = tl.min(tl.where(counts == best, offs, BLOCK_N), axis=0)
    majority = tl.sum(tl.where(offs == first, ids, 0), axis=0)
    tl.store(maj_ptr + g, tl.where(best > 0, majority, -1))
    tl.store(cnt_ptr + g, best.to(tl.int64))
    tl.store(valid_ptr + g, tl.sum(valid.to(tl.int64), axis=0))


def _triton_vote(ids: torch.Tensor):
    G, n = ids.shape
    out = torch.empty((3, G), dtype=torch.int64, device=ids.device)  # majority, count, valid
    if G > 0:
        block_n = max(triton.next_power_of_2(n), 16)
        _vote_count_fwd_kernel[(G,)](ids, out[0], out[1], out[2], n, ids.stride(0), ids.stride(1),
                                     BLOCK_N=block_n, BLOCK_J=_BLOCK_J)
    return out[0], out[1], out[2]


def _torch_vote(ids: torch.Tensor):
    G, n = ids.shape
    valid = ids >= 0  # [G, n]
    maj = torch.empty(G, dtype=torch.int64, device=ids.device)
    cnt = torch.empty(G, dtype=torch.int64, device=ids.device)
    step = max(1, _TORCH_ELEMS // max(n * n, 1))
    for lo in range(0, G, step):  # group chunks bound the [g, n, n] comparison, not a per-group loop
        x, v = ids[lo:lo + step], valid[lo:lo + step]
        # count_i = valid j with id_j == id_i; 0 for an invalid i (no valid id equals -1)
        counts = ((x.unsqueeze(2) == x.unsqueeze(1)) & v.unsqueeze(1)).sum(2)  # [g, n]
        best, first = counts.max(1)  # first index of the maximum (documented torch behaviour)
        maj[lo:lo + step] = torch.where(best > 0, x.gather(1, first.unsqueeze(1)).squeeze(1), -1)
        cnt[lo:lo + step] = best
    return maj, cnt, valid.sum(1)


def vote_count(answer_ids: torch.Tensor):
    """[G, n] int64 answer ids (-1 invalid) -> (majority_id, majority_count, valid_count), each [G] int64.

    Ties go to the id whose first occurrence is earliest; a group with no valid answer gives (-1, 0, 0).
    """
    if answer_ids.dim() != 2:
        raise ValueError(f"answer_ids must be [G, n], got {tuple(answer_ids.shape)}")
    ids = answer_ids.to(torch.int64)
    if ids.shape[1] == 0:
        zeros = torch.zeros(ids.shape[0], dtype=torch.int64, device=ids.device)
        return zeros - 1, zeros, zeros.clone()
    backend = pick_backend("vote_count", ids)
    return _triton_vote(ids) if backend == "triton" else _torch_vote(ids)


def vote_count_reference(answer_ids: torch.Tensor):
    """A plain Python counter per group with the same tie rule (tests and benchmarks)."""
    maj, cnt, valid = [], [], []
    for row in answer_ids.tolist():
        votes = Counter(a for a in row if a >= 0)
        best = max(votes.values(), default=0)
        winner = next((a for a in row if a >= 0 and votes[a] == best), -1)
        maj.append(winner)
        cnt.append(best)
        valid.append(sum(votes.values()))
    return tuple(torch.tensor(x, dtype=torch.int64) for x in (maj, cnt, valid))
