"""The markdown report of benchmarks/peer_trl.py (vispo GRPO vs TRL's GRPOTrainer)."""

from __future__ import annotations

import os
import platform
import statistics

import torch
from step_time import machine  # benchmarks/ is on sys.path (peer_trl.py puts it there)


def fmt(v, spec=".2e") -> str:
    return "-" if v is None else format(v, spec)


def phase_median(r: dict, phase: str) -> float:
    return statistics.median(p[phase] for p in r["phases"])


def rollout_lines(timing: dict, vision: bool) -> list[str]:
    """vispo's rollout phase against TRL's generation (target: no slower), and on the
    vision-heavy workload the step-time and memory targets."""
    lines = [
        "Rollout: vispo's rollout phase (generation of the step's completions) against TRL's "
        "`_generate_single_turn` (target: vispo no slower, ratio <= 1.00)"
        + (
            "; targets of this workload: vispo / TRL time <= 0.3 (aim 0.25), memory <= 0.5."
            if vision
            else "."
        ),
        "",
        "| activation checkpointing | beta | vispo rollout s | TRL generate s | vispo / TRL |",
        "|---|---|---|---|---|",
    ]
    for (role, beta, ckpt), v in timing.items():
        t = timing.get(("trl", beta, ckpt))
        if role != "vispo" or t is None:
            continue
        a, b = phase_median(v, "rollout"), phase_median(t, "generate")
        lines.append(
            f"| {'on' if ckpt else 'off'} | {beta:g} | {a:.2f} | {b:.2f} | **{a / b:.2f}** |"
        )
    return lines


def report(args, equiv: dict | None, timing: dict, *, workload: str, prompts: int, n: int) -> str:
    """The markdown report of one peer_trl.py run (`workload`: step_time.py's name; `prompts`
    x `n`: its prompts per step and completions per prompt)."""
    import transformers

    try:
        import trl

        trl_version = trl.__version__
    except ImportError:
        trl_version = "not installed"
    order = (
        ", then the same with activation checkpointing" if len({k[2] for k in timing}) > 1 else ""
    )
    vision = workload == "vision-heavy"
    label = (
        "QUICK smoke run (default tiny model, not the benchmark's model)"
        if args.quick
        else (
            "vision-heavy CPU workload (issue 18; 256 image tokens per prompt, each prompt "
            "computed once per group by vispo's shared prefix)"
            if vision
            else "standard CPU workload (issue 7)"
        )
    )
    threads = sorted({r["threads"] for r in timing.values()} | {args.threads})
    interleave = ", ".join(f"vispo b{b:g}, TRL b{b:g}" for b in args.betas)
    lines = [
        f"# vispo GRPO vs TRL GRPOTrainer{' (vision-heavy workload)' if vision else ''}",
        "",
        f"Machine: {machine()}.",
        "",
        f"{label}: {prompts} easy-vqa prompts x {n} completions of exactly 64 tokens per step, "
        "temperature 1.0, lr 1e-6, seeded Bernoulli(0.5) reward, float32, no vLLM.",
        f"torch {torch.__version__}, transformers {transformers.__version__}, trl {trl_version}; "
        f"{'/'.join(map(str, threads))} torch threads (as each process reported); "
        f"{platform.machine()} ({os.cpu_count()} cores visible), "
        f"{platform.platform()}. Each configuration ran in its own process, interleaved "
        f"({interleave}{order}); median of {args.steps} measured "
        f"step{'s' if args.steps > 1 else ''} after one warm-up step. Peak RSS = the process's ru_maxrss (model build, data and the steps). "
        "Activation checkpointing: vispo's default is off (`model.gradient_checkpointing`), "
        "TRL's GRPOConfig default is on; each regime is run with the same setting on both sides.",
        "",
    ]
    if args.note:
        lines += [f"**{args.note}**", ""]
    lines += [
        "Matched configuration:",
        "",
        "- vispo: `Trainer` with the `grpo` preset as in `step_time.py` (clip 0.2/0.3, dual clip "
        "3.0, k3 reference KL, token-mean, adv_eps 1e-6), AdamW lr 1e-6 constant, weight decay "
        "0.01, gradient clip 1.0.",
        '- TRL `GRPOConfig`: `loss_type="dapo"` (= vispo\'s token-mean), `scale_rewards="group"`, '
        "`epsilon=0.2`, `epsilon_high=0.3`, `beta`, `use_bias_correction_kl=False`, "
        "`temperature=1.0`, `top_p=1.0`, `top_k=0`, `generation_kwargs={min_new_tokens: 64, "
        "suppress_tokens: vispo's image-placeholder ids}`, `max_completion_length=64`, "
        f"`per_device_train_batch_size={prompts * n}`, `num_generations={n}`, no gradient "
        "accumulation, "
        "lr 1e-6 constant, weight decay 0.01, `max_grad_norm=1.0`, `bf16=False`, no vLLM; the "
        "dataset holds vispo's sampler order (`shuffle_dataset=False`), so each step sees the "
        f"same {prompts} prompts; the same seeded reward stream; the reference model is loaded from the "
        "policy's saved initial weights (TRL builds it from `config._name_or_path`).",
        "- Left as each library does it: TRL's fused LM head scores every position on a device "
        f"without Triton (all ~{346 if vision else 97} prompt + response positions per sequence "
        "here; vispo: the 65 that predict response tokens) "
        "and always computes entropies; TRL runs the processor again for the training forward. "
        "vispo's dual clip never binds on-policy (ratio 1), so the losses agree (part 1).",
        "",
    ]
    if args.trl_set:
        lines += [
            f"**TRL overrides (NOT the matched configuration): {args.trl_set}**",
            "",
        ]
    if timing:
        lines += [
            "## Step time and peak memory",
            "",
            "| activation checkpointing | beta | vispo s/step | TRL s/step | vispo / TRL time | "
            "vispo peak RSS MiB | TRL peak RSS MiB | vispo / TRL memory | "
            "mean completion tokens (vispo, TRL) |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for ckpt, beta in [(ck, b) for ck in (False, True) for b in (0.0, 0.01)]:
            v, t = timing.get(("vispo", beta, ckpt)), timing.get(("trl", beta, ckpt))
            if v is None or t is None:
                continue
            vs, ts = statistics.median(v["steps"]), statistics.median(t["steps"])
            lines.append(
                f"| {'on' if ckpt else 'off'} | {beta:g} | {vs:.2f} | {ts:.2f} | **{vs / ts:.2f}** | {v['peak_rss_mib']:.0f} | "
                f"{t['peak_rss_mib']:.0f} | **{v['peak_rss_mib'] / t['peak_rss_mib']:.2f}** | "
                f"{v['mean_length']:.1f}, {t['mean_length']:.1f} |"
            )
        lines += ["", *rollout_lines(timing, workload == "vision-heavy")]
        lines += ["", "Phase split (median seconds per step; each system's own phases):", ""]
        lines += ["| system | checkpointing | beta | phases |", "|---|---|---|---|"]
        for (role, beta, ckpt), r in timing.items():
            keys = r["phases"][0].keys()
            med = {k: statistics.median(p[k] for p in r["phases"]) for k in keys}
            total = statistics.median(r["steps"])
            parts = ", ".join(f"{k} {v:.2f} ({100 * v / total:.0f}%)" for k, v in med.items())
            lines.append(f"| {role} | {'on' if ckpt else 'off'} | {beta:g} | {parts} |")
        lines += [
            "",
            "Peak RSS (MiB) before the first step (imports, model, data, trainer set-up) and, for "
            "TRL, right after each phase of the warm-up step (ru_maxrss is monotone: the phase "
            "that raises it holds the peak):",
            "",
            "| system | checkpointing | beta | before step 1 | peak | TRL after generate / score / "
            "policy forward / step end |",
            "|---|---|---|---|---|---|",
        ]
        for (role, beta, ckpt), r in timing.items():
            after = r.get("rss_after", {})
            keys = [k for k in ("generate", "score", "policy_forward", "step_end") if k in after]
            parts = " / ".join(f"{after[k][0]:.0f}" for k in keys)
            lines.append(
                f"| {role} | {'on' if ckpt else 'off'} | {beta:g} | {r['setup_rss_mib']:.0f} | {r['peak_rss_mib']:.0f} | "
                f"{parts or '-'} |"
            )
        lines += [
            "",
            "TRL phases: generate = `_generate_single_turn` (HF generate); score = the rest of "
            "`_generate_and_score_completions` (prompt processing, reference forward, rewards, "
            "advantages); policy_forward = `compute_loss`; backward_optimizer_other = the rest of "
            "the step. vispo phases: its own `time/*` metrics (update = forward + backward + "
            "optimizer).",
            "",
        ]
    if equiv:
        lines += [
            "## Same loss on the same batch",
            "",
            "One batch: 16 prompts x 5 completions of 64 tokens (one vispo rollout), fixed "
            "Bernoulli rewards, a reference model that differs from the policy (weights + 50% "
            "noise) so the KL term is not zero. TRL: its own `_generate_and_score_completions` "
            "(generation replaced by the fixed completions) and `compute_loss`; vispo: "
            "`encode_prompts` -> `score` -> `group_advantages(eps=1e-4)` -> `compute_objective` "
            "(grpo preset, clip 0.2/0.3, k3). Gradients over all parameters, float32. Term "
            "scale: the aggregate of the per-token terms' magnitudes (|A| ratio + beta k3); the "
            "on-policy GRPO loss itself is a sum of +-|A| terms that cancels to ~0, so the loss "
            "difference is judged against the size of what was summed.",
            "",
            f"- TRL tokenised the same prompt tokens as vispo: {equiv['same_prompt_tokens']}",
            f"- advantages, max |TRL - vispo| (eps matched): {equiv['advantages_max_abs_diff']:.2e}",
            f"- reference log-probs, max |TRL - vispo|: {equiv['ref_logp_max_abs_diff']:.2e}",
            *(
                [
                    f"- off-policy check: {100 * equiv['off_policy_clipped_frac']:.1f}% of tokens clipped"
                ]
                if "off_policy_clipped_frac" in equiv
                else []
            ),
            f"- reference KL (k3) mean {equiv['k3_mean']:.4f}; tokens where vispo's k3 clamp "
            f"binds (TRL has none): {equiv['k3_clamped_tokens']}",
            "",
            "| check | TRL loss | vispo loss | loss diff | loss diff / term scale | max abs grad |"
            " max grad diff | grad diff / max grad | note |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in equiv["rows"]:
            lines.append(
                f"| {r['check']} | {r['trl_loss']:.8g} | {r['vispo_loss']:.8g} | "
                f"{fmt(r['loss_abs_diff'])} | {fmt(r['loss_rel_diff'])} | "
                f"{fmt(r['grad_max_abs'])} | {fmt(r['grad_max_abs_diff'])} | "
                f"{fmt(r['grad_rel_diff'])} | {r['note']} |"
            )
        lines += [
            "",
            "Loss-type mapping: vispo's grpo preset aggregates with `token-mean` over the whole "
            'mini-batch = TRL `loss_type="dapo"` (global token count) = `"bnpo"` (one '
            'process, no accumulation); TRL `"grpo"` (mean over sequences of the per-sequence '
            "token mean) = vispo `agg=seq-mean-token-mean`. With every completion exactly 64 "
            "tokens (this workload) the three give the same loss; the timed TRL runs use "
            "`dapo`.",
            "",
        ]
    return "\n".join(lines) + "\n"
