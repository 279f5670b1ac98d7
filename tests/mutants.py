"""Planted bugs that the tests must catch (mutation testing by hand-picked, realistic mutants).

Each mutant is one exact edit (`old` -> `new`, `old` found exactly once, else the mutant is stale: an error)
to one file of a temporary copy of the working tree, and the pytest selection that must fail on it. The
copy is what runs: pytest starts inside it with PYTHONPATH = the copy, so `vzero_fast` and its kernels
(`vzero_fast.kernels`, mapped from kernels/ by vzero_fast/__init__.py when no install maps it) are the copy's,
not the editable install's (checked before any mutant runs, and by the kernel mutants themselves). First the
union of all selections runs once on the unmodified copy (the baseline): a mutant "caught" by a test that
fails anyway would prove nothing.

    python tests/mutants.py            # every mutant, one at a time; exit 1 if any survives
    python tests/mutants.py -j 2       # two at a time
    python tests/mutants.py --list     # names, files and selections
    python tests/mutants.py -k divisor # the mutants whose name contains "divisor"

Tests run with OMP_NUM_THREADS=1 unless set: on 2 shared cores, torch's default threads made the selections
5x slower (tests/test_train_on.py: 98 s with 2 threads under load, 18 s with 1).
Add a mutant with every new component: the bug that component is most likely to get wrong.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Mutant:
    name: str
    file: str  # relative to the repository root
    old: str
    new: str
    tests: tuple[str, ...]  # pytest node ids or test files
    why: str


MUTANTS = [
    # ------------------------------------------------------------------------------------ GRPO (grpo.py)
    Mutant("grpo-divisor-swapped", "vzero_fast/grpo.py",
           'divisor = counts[k] if cfg.loss_agg != "token-mean" else max(counts[n_cfg + k], 1.0)',
           'divisor = counts[n_cfg + k] if cfg.loss_agg != "token-mean" else max(counts[k], 1.0)',
           ("tests/test_train_on.py::test_train_on_loss_and_gradient_norm",),
           "token-mean divided by the sample count: loss and gradient 8x (issue #11)"),
    Mutant("grpo-dual-clip-dropped", "vzero_fast/grpo.py",
           "clip_c=cfg.clip_c or None,", "clip_c=None,",
           ("tests/test_train_on.py::test_accumulate_dual_clip_kl_gradients",),
           "the trainer never passes the dual-clip constant to the loss (issue #11)"),
    Mutant("grpo-kl-dropped", "vzero_fast/grpo.py",
           "kl_coef=cfg.kl_coef if ref is not None else 0.0,", "kl_coef=0.0,",
           ("tests/test_train_on.py::test_accumulate_dual_clip_kl_gradients",),
           "reference log-probs computed but the KL term never reaches the loss"),
    Mutant("grpo-gather-off-by-one", "vzero_fast/grpo.py",
           "gather[row, :r] = torch.arange(p - 1, p - 1 + r)", "gather[row, :r] = torch.arange(p, p + r)",
           ("tests/test_train_on.py::test_train_on_loss_and_gradient_norm",),
           "the hidden state at the response token, not the one before it, scores it (issue #11)"),
    Mutant("grpo-step-never-updates", "vzero_fast/grpo.py",
           "            self.optimizer.step()\n", "",
           ("tests/test_grpo.py::test_grpo_step_updates_and_reports",),
           "no optimizer step: the update test's assert sat under `if reward_std > 0` (issue #11)"),
    Mutant("grpo-biased-std", "vzero_fast/grpo.py",
           "rewards.std(dim=1, unbiased=True, keepdim=True)", "rewards.std(dim=1, unbiased=False, keepdim=True)",
           ("tests/test_grpo.py::test_group_advantages_match_formula",),
           "population std where ALGORITHMS.md says unbiased"),
    Mutant("grpo-drop-zero-variance-ignored", "vzero_fast/grpo.py",
           "keep_groups(rewards, drop_zero_variance=cfg.drop_zero_variance)", "keep_groups(rewards)",
           ("tests/test_grpo.py::test_drop_zero_variance_trains_only_groups_with_signal",),
           "a config field nothing reads (issue #11: fields documented and never read)"),
    Mutant("grpo-band-open-interval", "vzero_fast/grpo.py",
           "(share >= band[0]) & (share <= band[1])", "(share > band[0]) & (share < band[1])",
           ("tests/test_vzero.py::test_pseudo_labels_vectorised_and_band",
            "tests/test_vzero.py::test_question_set_keeps_only_the_difficulty_band"),
           "the difficulty band loses its edges (0.3 and 0.8 are kept in the paper)"),
    # ------------------------------------------------------------------------------ engine seam (grpo.py)
    Mutant("seam-no-sync-after-step", "vzero_fast/grpo.py",
           "            self.engine.sync_weights(self.policy)  # the next rollout samples from the updated weights\n",
           "", ("tests/test_trainer_seams.py::test_engines_come_from_make_engine_and_follow_the_updates",),
           "an engine with its own weights (vLLM) would keep sampling from the old policy"),
    Mutant("seam-never-wakes", "vzero_fast/grpo.py",
           "                self.engine.wake()\n", "                pass\n",
           ("tests/test_trainer_seams.py::test_engines_come_from_make_engine_and_follow_the_updates",),
           "the engine sleeps after the first update and is asked to generate asleep"),
    Mutant("vllm-level2-wake-keeps-nothing", "vzero_fast/rollout_vllm.py",
           "        if self._pending or (self.on_cuda and self.options.sleep_level == 2):",
           "        if self._pending:",
           ("tests/test_vllm_sleep.py",),
           "after a level-2 sleep (weights discarded) and no step, wake leaves the engine without weights"),
    Mutant("selfjudge-threshold-inclusive", "vzero_fast/recipes/selfjudge.py",
           "if counts[maj] / n > threshold:", "if counts[maj] / n >= threshold:",
           ("tests/test_selfjudge_rules.py::test_prior_strict_threshold",),
           "Self-Judge's hard branch at p == 0.85 (the rule is strict)"),
    Mutant("selfjudge-nan-score", "vzero_fast/recipes/selfjudge.py",
           "    return x if math.isfinite(x) else None", "    return x",
           ("tests/test_selfjudge_rules.py::test_parse_judge_score",),
           "a NaN judge score passes into the reward (the reference's bug)"),
    Mutant("selfjudge-judge-seed-by-batch", "vzero_fast/recipes/selfjudge.py",
           'seed=step_seed(self.seed, "judge", iteration, outputs[g].request.meta["position"], j)))',
           'seed=step_seed(self.seed, "judge", iteration, len(which), g, j)))',
           ("tests/test_selfjudge.py::test_skipping_prior_zero_equals_judging_everything",),
           "Judge seeds depend on the batch: skipping b = 0 responses changes the others' scores"),
    Mutant("selfjudge-skips-positive-prior", "vzero_fast/recipes/selfjudge.py",
           "if judge_all or prior[g, j] > 0]", "if judge_all or prior[g, j] > 0.3]",
           ("tests/test_selfjudge.py::test_skipping_prior_zero_equals_judging_everything",),
           "responses with a small but positive prior are not judged (their score silently 0)"),
    Mutant("selfjudge-judge-own-copy", "vzero_fast/recipes/selfjudge.py",
           "frozen, src = self.role.reference, str(", "frozen, src = None, str(",
           ("tests/test_selfjudge.py::test_judge_is_the_frozen_reference",),
           "the Judge loads a second frozen copy beside the KL reference (15 GiB more at 7B)"),
    # ------------------------------------------------------------------------- grpo recipe (recipes/grpo.py)
    Mutant("grpo-maj-reads-label", "vzero_fast/recipes/grpo.py",
           'if self.rules.mode == "label":', 'if self.rules.mode in ("label", "maj"):',
           ("tests/test_grpo_recipe.py::test_rewards_label_maj_and_format_weight",),
           "the majority-vote baseline reads the answer field (a label leak, or no reward without labels)"),
    Mutant("grpo-reward-exact-strings", "vzero_fast/recipes/grpo.py",
           "label is not None and answers_equal(extract_boxed(t), label)",
           "label is not None and extract_boxed(t) == label",
           ("tests/test_grpo_recipe.py::test_rewards_label_maj_and_format_weight",),
           "the verifiable reward compares raw strings: 4.0 is wrong for 4, (b) wrong for B"),
    Mutant("answers-numbers-as-strings", "vzero_fast/answers.py",
           "return abs(gx - tx) <= 1e-6 * max(1.0, abs(tx))", "return g == t",
           ("tests/test_grpo_recipe.py::test_answers_equal",),
           "numbers compared as strings: 3.0 != 3, 1,000 != 1000"),
    # ------------------------------------------------------------------------------------- trainer.py
    Mutant("trainer-reference-always-base", "vzero_fast/trainer.py",
           'return self.model_path if iteration == 1 else self.ckpt.root / role / f"iter-{iteration - 1}"',
           "return self.model_path",
           ("tests/test_trainer_seams.py::test_stage_reference_is_the_stage_start",),
           "every stage's KL reference is the base model (issue #11)"),
    Mutant("trainer-backend-ignored", "vzero_fast/trainer.py",
           "engine = make_engine(policy, self.cfg.rollout.backend,", "engine = make_engine(policy, 'native',",
           ("tests/test_trainer_seams.py::test_engines_come_from_make_engine_and_follow_the_updates",),
           "rollout.backend is never read: every run gets the native engine"),
    Mutant("trainer-resume-no-sync", "vzero_fast/trainer.py",
           "                role.engine.sync_weights(role.policy)\n", "                pass\n",
           ("tests/test_trainer_seams.py::test_engines_come_from_make_engine_and_follow_the_updates",),
           "a resumed run's engines keep the weights they were built with"),
    Mutant("trainer-nonempty-out-reused", "vzero_fast/trainer.py",
           "if busy and not resume:", "if busy and not resume and overwrite:",
           ("tests/test_run_dir.py::test_nonempty_out_refuses_without_resume_or_overwrite",),
           "a new run silently mixes into an old run directory"),
    # ---------------------------------------------------------------------------------- checkpoint.py
    Mutant("checkpoint-latest-before-state", "vzero_fast/checkpoint.py",
           "            tmp = _tmp_sibling(path)\n"
           "            torch.save(payload, tmp)\n",
           "            latest_tmp = _tmp_sibling(self.root / 'latest.json')\n"
           "            latest_tmp.write_text(json.dumps({'trainer_state': path.name, 'roles': role_dirs, 'state': state}))\n"
           "            os.replace(latest_tmp, self.root / 'latest.json')\n"
           "            kill_point('save')\n"
           "            tmp = _tmp_sibling(path)\n"
           "            torch.save(payload, tmp)\n",
           ("tests/test_checkpoint_order.py",),
           "latest.json names a trainer state not yet written: a kill in between leaves no resume point"),
    Mutant("checkpoint-step-not-restored", "vzero_fast/checkpoint.py",
           'role.step = info["step"]', "role.step = 0",
           ("tests/test_trainer_seams.py::test_engines_come_from_make_engine_and_follow_the_updates",),
           "a resumed role restarts its step counter (seeds and checkpoint names repeat)"),
    # --------------------------------------------------------------------------------------- optim.py
    Mutant("optim-unstepped-state-dict", "vzero_fast/optim.py",
           "        if not self.has_state:\n            return {}\n", "",
           ("tests/test_optim.py::test_state_dict_before_a_step_is_empty_and_harmless",),
           "asking for an unstepped optimizer's state runs a zero-gradient step (AdamW's step count 1)"),
    Mutant("optim-masters-not-copied-back", "vzero_fast/optim.py",
           "p.copy_(m)  # round to the compute dtype", "pass",
           ("tests/test_optim.py::test_bf16_compute_keeps_fp32_masters_by_default",),
           "fp32 masters step but the bf16 model never sees the update"),
    # ------------------------------------------------------------------------------ V-Zero (recipes/vzero.py)
    Mutant("vzero-band-dropped", "vzero_fast/recipes/vzero.py",
           "kept = in_band(share, vz.band_low, vz.band_high) & (label >= 0)", "kept = label >= 0",
           ("tests/test_vzero.py::test_question_set_keeps_only_the_difficulty_band",),
           "pseudo-labelled questions kept whatever their share (issue #11)"),
    Mutant("vzero-agree-pays-share", "vzero_fast/recipes/vzero.py",
           "agree = torch.minimum(c, 1 - c)", "agree = c",
           ("tests/test_vzero.py::test_dual_track_reward_hand_built",),
           "an agreeing question paid c instead of min(c, 1 - c): confident Solvers pay most"),
    Mutant("vzero-none-overturns", "vzero_fast/recipes/vzero.py",
           "overturned = torch.where(a_hat != NONE_ID, 0.5 * c, torch.zeros_like(c))", "overturned = 0.5 * c",
           ("tests/test_vzero.py::test_dual_track_reward_hand_built",),
           "a vote won by 'None' pays 0.5c as if reasoning overturned intuition"),
    # --------------------------------------------------------------------------------------- kernels/
    Mutant("kernel-grpo-fwd-one-block", "kernels/grpo_loss.py",
           "for t0 in range(0, T, BLOCK_T):", "for t0 in range(0, BLOCK_T, BLOCK_T):",
           ("tests/test_grpo_loss_long.py",),
           "the forward reads only the first 1024 tokens of each response (issue #11: T > 1024 untested)"),
    Mutant("kernel-grpo-bwd-one-block", "kernels/grpo_loss.py",
           '_grpo_loss_bwd_kernel[(B, triton.cdiv(T, ctx.args["flags"]["BLOCK_T"]))](',
           "_grpo_loss_bwd_kernel[(B, 1)](",
           ("tests/test_grpo_loss_long.py",),
           "the backward launches one block per row: tokens past 1024 get garbage gradients"),
    Mutant("kernel-logprob-fwd-column-mask", "kernels/logprob.py",
           'z = tl.where(col_ok[None, :], z, float("-inf"))', "z = z",
           ("tests/test_kernels_logprob.py::test_fp32_matches_float64_reference",),
           "columns past V (TMA zero-fills them) or of the next split enter the softmax sum (issue #12)"),
    Mutant("kernel-logprob-torch-host-max", "kernels/logprob.py",
           "m = torch.full((N,), _NEG_INIT, dtype=cdt, device=h.device)", "m = torch.full((N,), _NEG_INIT, dtype=cdt)",
           ("tests/test_gpu_readiness.py::test_kernel_torch_paths_on_a_device",),
           "the torch path's running max on the host meets device logits: it crashes on a GPU (issue #12)"),
    # ------------------------------------------------------------------------------------- GPU readiness
    Mutant("grpo-advantages-host-index", "vzero_fast/grpo.py",
           "batch.advantages.to(dev)[mb.rows]", "batch.advantages[mb.rows]",
           ("tests/test_gpu_readiness.py::test_grpo_step_trains_on_a_simulated_accelerator",),
           "host advantages indexed with device rows: every GPU step raises on its first micro-batch (#12)"),
    Mutant("metrics-one-read-per-value", "vzero_fast/metrics.py",
           "values = torch.stack([metrics[k].detach().float().reshape(()) for k in group]).tolist()",
           "values = [metrics[k].detach().float().reshape(()).item() for k in group]",
           ("tests/test_gpu_readiness.py::test_step_metrics_reach_the_host_in_one_read",),
           "~20 host syncs per step instead of one (issue #12)"),
    Mutant("dist-2.11-guard-dropped", "vzero_fast/distributed.py",
           "model.base_model.register_forward_pre_hook(_require_image_in_training_pass, with_kwargs=True)", "pass",
           ("tests/test_gpu_readiness.py::test_fsdp_without_unused_param_reduction",),
           "torch 2.11 (no unused-parameter reduce-scatter): a text-only pass would hang NCCL, not raise (#12)"),
    # -------------------------------------------------------------------------------------- rollout.py
    Mutant("rollout-rope-offset", "vzero_fast/rollout.py",
           "next_pos = pos.amax(dim=(0, 2)) + 1", "next_pos = pos.amax(dim=(0, 2))",
           ("tests/test_rollout.py::test_logprobs_equal_training_forward",),
           "decode positions one short (docs/LOG.md: greedy parity missed it, log-probs did not)"),
    # ------------------------------------------------------------------------- model families (issue 14)
    Mutant("family-class-fixed", "vzero_fast/model.py",
           "model = model_class(fam.model_type).from_pretrained(", 'model = model_class("qwen2_5_vl").from_pretrained(',
           ("tests/test_families.py::test_transformers_loads_every_tensor",),
           "every checkpoint loaded as Qwen2.5-VL, whatever its model_type"),
    Mutant("family-image-factor-ignored", "vzero_fast/data.py",
           "    source.factor = factor\n", "    source.factor = 28\n",
           ("tests/test_families.py::test_data_resizes_to_the_family_factor",),
           "images resized to 28 px multiples for a 32 px family: the processor resizes them again"),
    Mutant("family-state-not-compacted", "vzero_fast/rollout.py",
           "                cache.reorder_cache(keep)\n", "",
           ("tests/test_families.py::test_state_expansion_and_compaction_keep_each_request_alone",),
           "finished rows stay in the KV / recurrent state while the other per-row tensors are compacted"),
    # ------------------------------------------------------------------------------ user tools (issue 18)
    Mutant("profile-window-late", "vzero_fast/profiling.py",
           "if self.prof is None and global_step + 1 == a:", "if self.prof is None and global_step == a:",
           ("tests/test_tools.py::test_profile_holds_every_stage_of_the_chosen_steps",),
           "the profiler starts after step A instead of before it: the trace misses the first chosen step"),
    # --------------------------------------------------------------------------------- V-Zero-OPD (issue 17)
    Mutant("opd-clamp-after-weighting", "vzero_fast/recipes/opd.py",
           "    d = _distill_gap(student_logp, teacher_logp, clamp)\n"
           "    return torch.where(m, -w.unsqueeze(-1).to(d.dtype) * d, 0.0).detach()",
           '    d = _distill_gap(student_logp, teacher_logp, float("inf"))\n'
           "    return torch.where(m, (-w.unsqueeze(-1).to(d.dtype) * d).clamp(-clamp, clamp), 0.0).detach()",
           ("tests/test_opd_rules.py::test_distill_clamps_before_weighting",),
           "d clamped after the gate weight: w = 2 can no longer push past +-10, w = 0.5 lets +-20 through"),
    Mutant("opd-gate-mean-over-padded-length", "vzero_fast/recipes/opd.py",
           "p = gated.sum(-1) / m.sum(-1).to(dtype).clamp(min=LENGTH_FLOOR)", "p = gated.sum(-1) / m.shape[-1]",
           ("tests/test_opd_rules.py::test_mean_over_own_tokens_first",),
           "p averaged over the padded length, not each response's own tokens: short responses lose their say"),
    Mutant("opd-kernel-advantage-per-row", "kernels/grpo_loss.py",
           "adv_ptr + b.to(tl.int64) * stride_ab + ts * stride_at,", "adv_ptr + b.to(tl.int64) * stride_ab + ts * 0,",
           ("tests/test_kernels_grpo_loss.py::test_per_token_advantages_broadcast_parity",),
           "the Triton kernel reads a [B, T] advantage at each row's first token (right for [B] only)"),
    Mutant("opd-token-advantages-from-sampler", "vzero_fast/grpo.py",
           "adv = batch.token_advantages(logp.detach(), mb.rows, mb.mask)",
           "adv = batch.token_advantages(torch.nn.functional.pad(torch.nn.utils.rnn.pad_sequence("
           "[batch.sample_logprobs[i] for i in idx], batch_first=True), (0, R)).to(dev)[:, :R], mb.rows, mb.mask)",
           ("tests/test_train_on.py::test_per_token_advantages_gradients",),
           "d from the sampler's log-probs instead of the current student's (ALGORITHMS.md section 4)"),
    # ------------------------------------------------------------------------------- evaluation (issue 18)
    Mutant("eval-seeds-overlap-training", "vzero_fast/eval_bench.py",
           "return SEED_OFFSET + int(np.random.SeedSequence([EVAL_SALT, i])", "return int(np.random.SeedSequence([0, i])",
           ("tests/test_eval.py::test_eval_seeds_are_disjoint_from_training_seeds",),
           "the built-in benchmark draws training's own figures (seed 0's): a score that measures memory"),
    Mutant("eval-votes-not-grouped", "vzero_fast/evaluate.py",
           "    keys = [_vote_key(a, truth) for a in answers]\n", "    keys = list(answers)\n",
           ("tests/test_eval.py::test_maj_at_k_groups_equal_answers_and_ignores_no_answer",),
           "maj@k counts '3' and '3.0' (or 'B' and '(b)') as different answers"),
    Mutant("eval-every-step", "vzero_fast/evaluate.py",
           'if not every or trainer.state["global_step"] % every:', "if not every:",
           ("tests/test_eval.py::test_eval_every_writes_eval_rows_into_metrics",),
           "train.eval_every N evaluates after every step instead of every N-th"),
    # ---------------------------------------------------------------------------------- MM-Zero (issue 16)
    Mutant("mmzero-c-over-all-answers", "vzero_fast/recipes/mmzero_rules.py",
           "return float(s), max(len(k) for k in answer_clusters(valid)) / len(valid)",
           "return float(s), max(len(k) for k in answer_clusters(valid)) / len(hard_answers)",
           ("tests/test_mmzero_rules.py",),
           "hard consistency divided by all answers: invalid ones (None, n/a) lower c"),
    Mutant("mmzero-low-difficulty-mean-over-all", "vzero_fast/recipes/mmzero_rules.py",
           "if d and sum(d) / len(d) < EASY_HARD_THRESHOLD:",
           "if d and sum(d) / len(renders) < EASY_HARD_THRESHOLD:",
           ("tests/test_mmzero_rules.py",),
           "the -0.3 penalty averages d over failed renders too"),
    Mutant("mmzero-coder-floor-dropped", "vzero_fast/recipes/mmzero_rules.py",
           "    return max(-0.5, r)\n", "    return r\n",
           ("tests/test_mmzero_rules.py",),
           "a not-rendered, not-SVG program scores -0.6 instead of the floor -0.5"),
    Mutant("mmzero-easy-hard-swapped", "vzero_fast/recipes/mmzero.py",
           "p.easy = [solver_answer(s.text) for s in outs[2 * j].samples]",
           "p.easy = [solver_answer(s.text) for s in outs[2 * j + 1].samples]",
           ("tests/test_mmzero.py::test_answer_sets_s_and_c_from_the_easy_and_the_hard_question",),
           "solvability computed from the hard question's answers"),
    Mutant("render-aspect-limit", "vzero_fast/render_worker.py",
           "if max(width, height) / min(width, height) > MAX_ASPECT:",
           "if max(width, height) / min(width, height) > 10 * MAX_ASPECT:",
           ("tests/test_render.py::test_svg_size_rules_at_their_boundaries",),
           "a 101:1 canvas renders (the reference fails aspect > 100)"),
    # ------------------------------------------------------------------------------------ LoRA (issue 19)
    Mutant("lora-scaling-dropped", "vzero_fast/lora.py",
           "return (out + self.lora_B(self.lora_A(x)) * self.scaling).to(out.dtype)",
           "return (out + self.lora_B(self.lora_A(x))).to(out.dtype)",
           ("tests/test_lora.py::test_lora_linear_forward_and_gradients_equal_the_formula",
            "tests/test_lora.py::test_forward_equals_peft"),
           "the update without alpha / r: every adapter trained here means something else in PEFT or vLLM"),
    Mutant("lora-base-trainable", "vzero_fast/lora.py",
           "p.requires_grad_(trainable and _is_adapter(n))", "p.requires_grad_(trainable)",
           ("tests/test_lora.py::test_view_shares_every_base_tensor_and_trains_only_adapters",),
           "the shared base gets gradients and AdamW state: every role would move every other role's weights"),
    Mutant("lora-reference-is-the-role", "vzero_fast/grpo.py",
           "self.reference = lora.frozen_copy(self.policy.model)", "self.reference = self.policy.model",
           ("tests/test_lora.py::test_role_optimizer_and_reference_on_a_view",),
           "the KL reference moves with the role it regularises (KL always 0)"),
    Mutant("lora-merge-unscaled", "vzero_fast/lora.py",
           "w.copy_((w.float() + (b.to(w.device) @ a.to(w.device)) * scaling).to(w.dtype))",
           "w.copy_((w.float() + (b.to(w.device) @ a.to(w.device))).to(w.dtype))",
           ("tests/test_lora.py::test_export_merged_loads_in_transformers_with_equal_logprobs",),
           "an exported checkpoint that is not base + adapter"),
    Mutant("lora-fresh-adapter-not-saved", "vzero_fast/checkpoint.py",
           "if tag is None and role.step == 0 and role.name not in self._saved and not adapter:",
           "if tag is None and role.step == 0 and role.name not in self._saved:",
           ("tests/test_lora_train.py::test_vzero_lora_sigkill_then_resume",),
           "a role saved before its first step points at the base directory: its random A is lost on resume"),
    Mutant("lora-fsdp-shards-the-base", "vzero_fast/distributed.py",
           '        kwargs["ignored_params"] = ignored_params\n', "        pass\n",
           ("tests/test_lora_distributed.py::test_two_ranks_equal_one_process_with_adapters",),
           "FSDP2 shards the shared base into one view: a copy per view, and the other views lose it"),
]


# ------------------------------------------------------------------------------------------------ running

SKIP = {".git", "runs", "__pycache__", ".pytest_cache", ".ruff_cache", ".benchmarks", "build", "dist", ".venv",
        "venv"}


# The vLLM backend (vzero_fast/rollout_vllm.py): its tests skip where vllm does not import, so these run only with
# `--vllm` from the vLLM environment (README, "command-vllm").
VLLM_SYNC = ("tests/test_rollout_vllm.py::test_sync_weights_in_place",)
VLLM_MUTANTS = [
    Mutant("vllm-sync-skipped", "vzero_fast/rollout_vllm.py",
           "            self._pending = True\n        else:\n            self._load(policy)\n",
           "            self._pending = True\n",
           VLLM_SYNC, "sync_weights on an awake engine does nothing: rollouts sample stale weights"),
    Mutant("vllm-sync-partial", "vzero_fast/rollout_vllm.py",
           "            if id(t) not in seen:  # tied weights once",
           '            if id(t) not in seen and ".layers.2." not in name:  # tied weights once',
           VLLM_SYNC, "the stream leaves one decoder layer out"),
    Mutant("vllm-wake-reloads-from-disk", "vzero_fast/rollout_vllm.py",
           "            self._load(self.policy)  # level 2 discarded the weights; a sync while asleep lands now",
           "            self.runner.reload_weights(is_checkpoint_format=True)",
           VLLM_SYNC, "a sync that arrived asleep is replaced at wake by the directory's (old) weights"),
    Mutant("vllm-logprobs-raw", "vzero_fast/rollout_vllm.py",
           'current["t"] = None if t is None else torch.where(t < 1e-5, torch.ones_like(t), t)',
           'current["t"] = None',
           ("tests/test_rollout_vllm.py::test_logprobs_are_the_trainers",),
           "sampler log-probs at T = 1 (vLLM's raw default) instead of log_softmax(logits / T)"),
    Mutant("vllm-prompt-unchecked", "vzero_fast/rollout_vllm.py",
           "                if list(res.prompt_token_ids) != fields[\"prompt_ids\"].tolist():",
           "                if False:",
           ("tests/test_rollout_vllm.py::test_prompt_is_the_one_the_trainer_rescores",),
           "a prompt the trainer re-scores differently from vLLM's goes unnoticed"),
    Mutant("vllm-hybrid-dtype-kept", "vzero_fast/rollout_vllm.py",
           "            self.dtype = torch.bfloat16\n", "",
           ("tests/test_vllm_families.py::test_greedy_and_logprobs_match_the_trainer",),
           "a Qwen3.5 engine built in fp32 on the CPU, where vLLM's DeltaNet kernel takes bf16 only"),
    Mutant("vllm-lora-request-dropped", "vzero_fast/rollout_vllm.py",
           "results = self.llm.generate(prompts, params, use_tqdm=False, lora_request=self._lora_request)",
           "results = self.llm.generate(prompts, params, use_tqdm=False)",
           ("tests/test_lora_vllm.py",),
           "a LoRA role's rollouts sample the bare base: every sampled log-prob is another model's"),
]


def snapshot(dest: Path) -> None:
    """The working tree as git sees it (tracked and untracked, not ignored), without .git; outside a git
    checkout, every file but build outputs, caches and runs."""
    try:
        files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                               check=True, capture_output=True).stdout.decode().split("\0")
    except (OSError, subprocess.CalledProcessError):
        files = [str(p.relative_to(ROOT)) for p in ROOT.rglob("*")
                 if p.is_file() and not SKIP & set(p.relative_to(ROOT).parts) and ".egg-info" not in str(p)]
    for rel in filter(None, files):
        src = ROOT / rel
        if src.is_file():  # deleted but still in the index: skip
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)


def env_for(copy: Path) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(copy), "PYTHONDONTWRITEBYTECODE": "1"}
    env.setdefault("OMP_NUM_THREADS", "1")
    sandbox = ROOT / "vzero_fast" / "_bin" / "vzero-sandbox"  # built, so not in the copy (git ignores it)
    if sandbox.exists():
        env.setdefault("VZERO_SANDBOX", str(sandbox))
    return env


def check_imports(copy: Path) -> None:
    """The copy's package and kernels are what Python imports there (not the editable install's)."""
    modules = ("vzero_fast", "vzero_fast.grpo", "vzero_fast.kernels.grpo_loss", "vzero_fast.recipes.vzero")
    code = f"import importlib\nfor m in {modules!r}: print(importlib.import_module(m).__file__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=copy, env=env_for(copy), capture_output=True,
                         text=True, check=True).stdout.split()
    real = copy.resolve()
    bad = [p for p in out if not Path(p).resolve().is_relative_to(real)]
    if bad:
        raise SystemExit(f"mutants: the copy imports code from outside it: {bad}")


def pytest(copy: Path, args: tuple[str, ...], timeout: float) -> tuple[int, str, float]:
    start = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *args],
                              cwd=copy, env=env_for(copy), capture_output=True, text=True, timeout=timeout)
        rc, out = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired:
        rc, out = -1, f"timed out after {timeout:.0f} s"
    return rc, out, time.perf_counter() - start


def apply(copy: Path, m: Mutant) -> None:
    path = copy / m.file
    text = path.read_text()
    n = text.count(m.old)
    if n != 1:
        raise ValueError(f"stale mutant {m.name}: its snippet occurs {n} times in {m.file}")
    path.write_text(text.replace(m.old, m.new))


def first_failure(out: str) -> str:
    for line in out.splitlines():
        if line.startswith(("FAILED", "ERROR")):
            return line[:150]
    return out.strip().splitlines()[-1][:150] if out.strip() else ""


def run_mutant(base: Path, work: Path, m: Mutant, timeout: float) -> tuple[str, float, str]:
    copy = work / m.name
    shutil.copytree(base, copy)
    try:
        apply(copy, m)
    except ValueError as e:
        return "STALE", 0.0, str(e)
    rc, out, seconds = pytest(copy, m.tests, timeout)
    shutil.rmtree(copy, ignore_errors=True)
    if rc == 0:
        return "MISSED", seconds, "every selected test passed"
    if rc in (1, 2):  # test failures, or an error while collecting (the mutant broke an import: caught too)
        return "caught", seconds, first_failure(out)
    return "ERROR", seconds, f"pytest exit {rc}: {first_failure(out)}"  # 5 = nothing collected, -1 = timeout


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--list", action="store_true", help="list the mutants and exit")
    ap.add_argument("-k", dest="pattern", default="", help="only mutants whose name contains this")
    ap.add_argument("-j", dest="jobs", type=int, default=1, help="mutants run at the same time")
    ap.add_argument("--vllm", action="store_true",
                    help="the vLLM backend's mutants instead (run with the vLLM environment's python)")
    ap.add_argument("--no-baseline", action="store_true", help="skip the run on the unmodified copy")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per pytest run")
    args = ap.parse_args(argv)
    if args.vllm:
        probe = subprocess.run([sys.executable, "-c", "import vllm"], capture_output=True)
        if probe.returncode != 0:
            print("mutants --vllm: vllm does not import in this environment (scripts/vllm_cpu_env.sh builds one)",
                  file=sys.stderr)
            return 2
    chosen = [m for m in (VLLM_MUTANTS if args.vllm else MUTANTS) if args.pattern in m.name]
    if args.list:
        for m in chosen:
            print(f"{m.name:34s} {m.file:30s} {' '.join(m.tests)}\n{'':34s} {m.why}")
        return 0
    if not chosen:
        print(f"no mutant matches {args.pattern!r}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="vzero-mutants-") as tmp:
        work = Path(tmp)
        base = work / "base"
        snapshot(base)
        check_imports(base)
        stale = []
        for m in chosen:  # every snippet first: a stale mutant is an error before anything runs
            text = (base / m.file).read_text()
            if text.count(m.old) != 1:
                stale.append(f"{m.name}: its snippet occurs {text.count(m.old)} times in {m.file}")
        if stale:
            print("stale mutants (update them to the code):\n  " + "\n  ".join(stale), file=sys.stderr)
            return 2
        if not args.no_baseline:
            selection = list(dict.fromkeys(t for m in chosen for t in m.tests))
            rc, out, seconds = pytest(base, tuple(selection), args.timeout * 2)
            print(f"baseline: {len(selection)} selections on the unmodified copy, {seconds:.0f} s: "
                  f"{'pass' if rc == 0 else 'FAIL'}", flush=True)
            if rc != 0:
                print(out[-4000:], file=sys.stderr)
                print("the baseline fails: fix the tests first (a mutant 'caught' by them would prove nothing)",
                      file=sys.stderr)
                return 2
        results = {}
        with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            futures = {m.name: pool.submit(run_mutant, base, work, m, args.timeout) for m in chosen}
            for m in chosen:
                status, seconds, detail = futures[m.name].result()
                results[m.name] = status
                print(f"{status:7s} {m.name:34s} {seconds:6.1f} s  {detail}", flush=True)
    missed = [n for n, s in results.items() if s == "MISSED"]
    errors = [n for n, s in results.items() if s in ("ERROR", "STALE")]
    print(f"{len(results) - len(missed) - len(errors)}/{len(results)} mutants caught, {len(missed)} missed, "
          f"{len(errors)} errors in {time.perf_counter() - start:.0f} s")
    if missed:
        print("missed: " + ", ".join(missed), file=sys.stderr)
        return 1
    return 2 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
