"""Config: precedence (preset < file < CLI), validation errors that name the field, unknown keys."""

import dataclasses

import pytest

from vzero_fast import config as C


def _write(tmp_path, text):
    path = tmp_path / "run.toml"
    path.write_text(text)
    return path


def test_defaults_are_the_papers():
    cfg = C.Config()
    # ALGORITHMS.md section 0 and 1.
    assert (cfg.solver.lr, cfg.solver.weight_decay, cfg.solver.grad_clip) == (1e-6, 0.01, 1.0)
    assert (cfg.solver.kl_coef, cfg.solver.kl_type) == (0.01, "k3")
    assert (cfg.solver.clip_low, cfg.solver.clip_high, cfg.solver.mini_batches) == (0.2, 0.2, 2)
    assert (cfg.questioner.rollout_n, cfg.solver.rollout_n) == (4, 5)
    assert (cfg.questioner.max_response_tokens, cfg.solver.max_response_tokens) == (2048, 4096)
    assert (cfg.vzero.reward_votes, cfg.vzero.reward_top_k, cfg.vzero.label_top_p) == (10, 40, 0.9)
    assert (cfg.vzero.band_low, cfg.vzero.band_high) == (0.3, 0.8)


@pytest.mark.parametrize("preset", sorted(C.PRESETS))
def test_presets_resolve(preset):
    """Every value the preset sets reaches the resolved config; every other field keeps its default."""
    got, sets, default = C.to_dict(C.resolve(preset)), C.PRESETS[preset](), C.to_dict(C.Config())
    assert set(sets) <= set(got)
    for section, values in got.items():
        assert set(sets.get(section, {})) <= set(values), section
        for key, value in values.items():
            want = sets.get(section, {}).get(key, default[section][key])
            assert value == (list(want) if isinstance(want, tuple) else want), f"{preset}: {section}.{key}"


def test_tiny_preset_runs_on_a_cpu():
    cfg = C.resolve("tiny")
    assert cfg.model.path == "" and cfg.train.device == "cpu" and cfg.train.cpu_threads == 1
    assert cfg.vzero.format_warmup_steps > 0 and cfg.rollout.backend == "native"


@pytest.mark.parametrize("preset", ["vzero-3b", "vzero-7b"])
def test_paper_presets_match_algorithms_md(preset):
    cfg = C.resolve(preset)
    for role, n, longest in ((cfg.questioner, 4, 2048), (cfg.solver, 5, 4096)):  # sections 0 and 1
        assert (role.prompts_per_step, role.rollout_n, role.max_response_tokens) == (64, n, longest)
        assert (role.lr, role.weight_decay, role.grad_clip, role.temperature) == (1e-6, 0.01, 1.0, 1.0)
        assert (role.kl_coef, role.kl_type, role.clip_low, role.clip_high, role.clip_c) == (0.01, "k3", 0.2, 0.2, 0.0)
        assert (role.loss_agg, role.advantage, role.mini_batches, role.epochs) == ("token-mean", "grpo", 2, 1)
        assert not role.drop_zero_variance
    vz = cfg.vzero
    assert (vz.reward_votes, vz.reward_temperature, vz.reward_top_k, vz.reward_max_tokens) == (10, 1.0, 40, 2048)
    assert (vz.question_temperature, vz.question_repetition_penalty) == (1.0, 1.1)
    assert (vz.label_votes, vz.label_temperature, vz.label_top_p) == (10, 1.0, 0.9)
    assert (vz.band_low, vz.band_high, vz.format_warmup_steps) == (0.3, 0.8, 0)
    assert cfg.train.iterations == 2 and cfg.model.dtype == "auto"


def test_every_field_has_a_reader():
    """A field nothing reads is a promise nothing keeps: each leaf name appears as an attribute access in
    the package outside config.py."""
    import pathlib
    import re

    root = pathlib.Path(C.__file__).parent
    source = "\n".join(p.read_text() for p in sorted(root.rglob("*.py")) if p.name != "config.py")
    unread = [k for k in C._all_keys(C.Config) if not re.search(rf"\.{k.split('.')[-1]}\b", source)]
    assert not unread, f"config fields that no code reads: {unread}"


def test_precedence_cli_over_file_over_preset(tmp_path):
    preset = C.resolve("tiny")
    path = _write(tmp_path, "[solver]\nrollout_n = 7\nlr = 3e-5\n[train]\nseed = 11\n")
    from_file = C.resolve("tiny", path)
    assert from_file.solver.rollout_n == 7 and from_file.solver.lr == 3e-5 and from_file.train.seed == 11
    # What the file does not set keeps the preset's value, not the dataclass default.
    assert from_file.solver.max_response_tokens == preset.solver.max_response_tokens != C.SolverConfig().max_response_tokens
    cli = C.resolve("tiny", path, C.parse_overrides(["--solver.rollout_n", "10", "--train.seed=12"]))
    assert cli.solver.rollout_n == 10 and cli.train.seed == 12 and cli.solver.lr == 3e-5


def test_override_types_are_parsed():
    cfg = C.resolve(None, None, C.parse_overrides([
        "--solver.betas", "0.9,0.95", "--model.gradient_checkpointing", "true", "--solver.lr", "2e-6",
        "--questioner.micro-batch-tokens", "4096"]))
    assert cfg.solver.betas == (0.9, 0.95)
    assert cfg.model.gradient_checkpointing is True
    assert cfg.solver.lr == 2e-6
    assert cfg.questioner.micro_batch_tokens == 4096


@pytest.mark.parametrize("args, match", [
    (["--solver.rollout_n", "0"], r"solver\.rollout_n: must be an integer >= 1, got 0"),
    (["--solver.kl_type", "k4"], r"solver\.kl_type: must be one of \('k1', 'k2', 'k3'\)"),
    (["--solver.loss_agg", "mean"], r"solver\.loss_agg"),
    (["--questioner.top_p", "1.5"], r"questioner\.top_p: must be in \(0, 1\]"),
    (["--vzero.band_low", "0.9"], r"vzero\.band_low/band_high"),
    (["--model.dtype", "fp8"], r"model\.dtype: must be one of"),
    (["--solver.rollout_n", "ten"], r"solver\.rollout_n: must be an integer, got 'ten'"),
    (["--model.gradient_checkpointing", "maybe"], r"model\.gradient_checkpointing: must be a boolean"),
    (["--solver.clip_c", "0.5"], r"solver\.clip_c: must be 0 \(off\) or > 1"),
])
def test_validation_names_field_and_allowed(args, match):
    with pytest.raises(C.ConfigError, match=match):
        C.resolve("tiny", None, C.parse_overrides(args))


def test_unknown_keys_suggest(tmp_path):
    with pytest.raises(C.ConfigError, match=r"unknown config key 'solver.rollout_m'.*did you mean 'solver.rollout_n'"):
        C.resolve(None, None, C.parse_overrides(["--solver.rollout_m", "3"]))
    path = _write(tmp_path, "[train]\nsede = 3\n")
    with pytest.raises(C.ConfigError, match=r"'train.sede' in config file .*did you mean 'train.seed'"):
        C.resolve(None, path)
    with pytest.raises(C.ConfigError, match=r"unknown config key 'solvr'"):
        C.resolve(None, None, {"solvr": {"lr": 1}})
    with pytest.raises(C.ConfigError, match=r"unknown preset 'tinny'.*did you mean 'tiny'"):
        C.resolve("tinny")


def test_bad_files_and_flags(tmp_path):
    with pytest.raises(C.ConfigError, match="does not exist"):
        C.resolve(None, tmp_path / "nope.toml")
    with pytest.raises(C.ConfigError, match="not valid TOML"):
        C.resolve(None, _write(tmp_path, "[solver\n"))
    with pytest.raises(C.ConfigError, match="is a section"):
        C.resolve(None, _write(tmp_path, "solver = 3\n"))
    with pytest.raises(C.ConfigError, match="needs a value"):
        C.parse_overrides(["--solver.lr"])
    with pytest.raises(C.ConfigError, match="dotted override"):
        C.parse_overrides(["lr", "3"])


def test_dataclasses_are_keyword_only():
    with pytest.raises(TypeError):
        C.SolverConfig(5)  # noqa  -- positional use must fail


def test_saved_config_round_trips(tmp_path):
    cfg = C.resolve("tiny", None, C.parse_overrides(["--solver.betas", "0.8,0.9", "--model.path", 'a "b" \\c']))
    path = C.save_config(cfg, tmp_path / "out" / "config.toml")
    again = C.resolve(None, path)
    assert again == cfg
    assert dataclasses.asdict(again) == dataclasses.asdict(cfg)


def test_every_field_has_a_docstring():
    docs = C.field_docs()
    keys = C._all_keys(C.Config)
    missing = [k for k in keys if not docs.get(k)]
    assert not missing, f"fields without a docstring: {missing}"
    assert "PPO clip epsilon" in docs["solver.clip_low"]
