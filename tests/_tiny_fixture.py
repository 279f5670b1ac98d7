"""Session fixtures with the offline tiny Qwen2.5-VL (vzero_fast/tiny.py), shared by test files.

Use in a test file:  `pytest_plugins = ["_tiny_fixture"]`  (then take `tiny_model_dir` / `tiny_policy` as
arguments). Registered as a plugin, the fixtures exist once per session; `from _tiny_fixture import ...`
also works but makes one definition per importing module (and trips ruff F811), hence the cache below.

- `tiny_model_dir`: the model directory built once with seed 0 (about 2 s).
- `tiny_policy`: that directory loaded once by `load_policy` (fp32, CPU, sdpa). It is shared by every
  test of the session: do not change its weights or modes; to train, `load_policy(tiny_model_dir)` anew.
"""

from __future__ import annotations

import pytest

_cache: dict = {}


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    if "dir" not in _cache:
        from vzero_fast.tiny import build_tiny

        _cache["dir"] = build_tiny(tmp_path_factory.mktemp("tiny_qwen2_5_vl"), seed=0)
    return _cache["dir"]


@pytest.fixture(scope="session")
def tiny_policy(tiny_model_dir):
    if "policy" not in _cache:
        from vzero_fast.model import load_policy

        _cache["policy"] = load_policy(tiny_model_dir, dtype="float32", device="cpu", attn_implementation="sdpa")
    return _cache["policy"]
