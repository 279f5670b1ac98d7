"""vote_count vs a plain Python counter with the same tie rule (earliest first occurrence), on both paths
(Triton in the interpreter on CPU): random groups full of ties, hand-written tie cases, all-invalid and
single-sample groups, ids beyond int32."""

from __future__ import annotations

import pytest
import torch

from vzero_fast.kernels import force_backend, vote_count, vote_count_reference

TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # CPU = the interpreter (tests/conftest.py)
BACKENDS = ["triton", "torch"]


def _device(backend):
    return TRITON_DEVICE if backend == "triton" else "cpu"


def _check(backend, ids):
    with force_backend(backend):
        got = vote_count(ids.to(_device(backend)))
    for name, a, e in zip(("majority_id", "majority_count", "valid_count"), got, vote_count_reference(ids), strict=True):
        assert a.dtype == torch.int64 and a.shape == (ids.shape[0],), name
        assert torch.equal(a.cpu(), e), (name, ids, a, e)


@pytest.mark.parametrize("n", [1, 5, 10, 33])  # 33: more columns than one 32-wide comparison block
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_python_counter(backend, n):
    g = torch.Generator().manual_seed(n)
    ids = torch.randint(-1, 4, (12, n), generator=g)  # 4 answers + invalid: ties are common
    ids[0] = -1  # all invalid
    ids[1, 1:] = -1  # one valid sample
    _check(backend, ids)


@pytest.mark.parametrize("backend", BACKENDS)
def test_tie_rule_and_edge_groups(backend):
    rows = [
        [2, 1, 1, 2, -1, -1],    # 2 and 1 tie at 2: 2 occurs first
        [1, 2, 2, 1, -1, -1],    # ... and the other way round
        [-1, 3, -1, 5, 5, 3],    # tie after invalid entries: 3 (first at position 1)
        [-1, -1, -1, -1, -1, -1],  # no valid answer -> (-1, 0, 0)
        [7, -1, -1, -1, -1, -1],   # a single valid answer
        [0, 0, 0, 1, 1, 1],      # id 0 is a valid answer
        [4, 9, 9, 4, 4, 9],      # 3 vs 3: 4 first
        [6, 5, 4, 3, 2, 1],      # all distinct: the first
    ]
    _check(backend, torch.tensor(rows))
    with force_backend(backend):
        maj, cnt, valid = vote_count(torch.tensor([[-1, -1, -1, -1, -1, -1]], device=_device(backend)))
    assert (maj.item(), cnt.item(), valid.item()) == (-1, 0, 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_single_sample_groups_and_large_ids(backend):
    _check(backend, torch.tensor([[5], [-1], [0], [2**40 + 3]]))
    big = torch.tensor([[2**40 + 1, 2**40 + 2**32 + 1, 2**40 + 2**32 + 1, 2**40 + 1, 2**40 + 1]])
    _check(backend, big)  # ids that agree in their low 32 bits must still differ


def test_shapes():
    maj, cnt, valid = vote_count(torch.empty(3, 0, dtype=torch.int64))
    assert maj.tolist() == [-1] * 3 and cnt.tolist() == [0] * 3 and valid.tolist() == [0] * 3
    assert vote_count(torch.empty(0, 4, dtype=torch.int64))[0].shape == (0,)
    with pytest.raises(ValueError):
        vote_count(torch.zeros(4, dtype=torch.int64))


@pytest.mark.gpu
def test_cuda_many_groups():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(-1, 6, (4096, 64), generator=g)
    _check("triton", ids)
