"""Tiny end-to-end runs: every preset, resume exactness, NaN skipping, checkpoints, export."""

import json

import pytest
import torch

from vispo.algos import OBJECTIVE_TERMS, register_term
from vispo.rewards import RewardRunner
from vispo.train import checkpoint as ckpt_module
from vispo.train.checkpoint import CheckpointError, checkpoint_dirs, latest_checkpoint
from vispo.train.config import load_config
from vispo.train.logging import read_metrics
from vispo.train.trainer import Trainer, TrainingStopped

SECTION_11 = [
    "reward/mean",
    "reward/std",
    "frac_zero_std_groups",
    "response_length/mean",
    "response_length/max",
    "response_length/clip_ratio",
    "loss/total",
    "loss/policy",
    "clip/low",
    "clip/high",
    "clip/dual",
    "approx_kl",
    "grad_norm",
    "lr",
    "entropy/orig",
    "dynamic_sampling/rounds",
    "dynamic_sampling/kept_frac",
    "time/rollout",
    "time/reward",
    "time/score",
    "time/update",
    "time/step",
    "throughput/tokens_per_s",
    "skipped_steps",
]
PER_PRESET = {
    "grpo": ["loss/ref_kl"],
    "dapo": [],
    "dr_grpo": [],
    "papo_g": ["loss/ref_kl", "loss/perception_kl", "perception/kl_mean", "entropy/mask"],
    "papo_d": [
        "loss/perception_kl",
        "loss/entropy_orig",
        "loss/entropy_mask",
        "perception/kl_mean",
    ],
    "cppo": ["loss/ref_kl", "loss/cpl", "perception/selected_frac"],
}


def parity_reward(completions, answers, **columns):
    """Deterministic, mixed within groups: 1 for an even number of characters."""
    return [float(len(c) % 2 == 0) for c in completions]


def _cfg(tmp_path, preset, *extra):
    return load_config(
        None,
        [
            f"objective.name={preset}",
            "model.name_or_path=tiny:qwen2_vl",
            "data.limit=24",
            "data.eval_size=0",
            "train.steps=2",
            "train.prompts_per_step=2",
            "rollout.n=3",
            "rollout.max_new_tokens=5",
            f"train.out_dir={tmp_path / preset}",
            "logging.progress=false",
            "optim.lr=1e-3",
            "train.samples_every=0",
            "train.save_every=0",
            *extra,
        ],
    )


def _trainer(cfg, **kw):
    return Trainer(cfg, reward_fn=RewardRunner(parity_reward, num_workers=0), **kw)


def _weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("preset", list(PER_PRESET))
def test_every_preset_trains_and_logs_its_metrics(tmp_path, preset):
    trainer = _trainer(_cfg(tmp_path, preset))
    before = _weights(trainer.model)
    history = trainer.train()
    assert len(history) == 2
    for m in history:
        missing = [k for k in SECTION_11 + PER_PRESET[preset] if k not in m]
        assert not missing, missing
        parts = [v for k, v in m.items() if k.startswith("loss/") and k != "loss/total"]
        assert sum(parts) == pytest.approx(m["loss/total"], abs=1e-5)
        assert 0.0 <= m["reward/mean"] <= 1.0
    changed = [k for k, v in _weights(trainer.model).items() if not torch.equal(v, before[k])]
    assert changed, "no parameter moved"
    logged = read_metrics(tmp_path / preset)
    assert [r["step"] for r in logged] == [1, 2]
    assert latest_checkpoint(tmp_path / preset).name == "step-000002"


def test_step_metrics_match_the_rollouts(tmp_path):
    trainer = _trainer(_cfg(tmp_path, "grpo"))
    m = trainer.step()
    step = trainer._last_step
    texts = [t for g in step.groups for t in g.texts]
    expected = parity_reward(texts, [])
    assert m["reward/mean"] == pytest.approx(sum(expected) / len(expected))
    lengths = [float(r.numel()) for g in step.groups for r in g.response_ids]
    assert m["response_length/mean"] == pytest.approx(sum(lengths) / len(lengths))
    assert step.batch.response_mask.sum().item() == sum(lengths)
    # Group-relative advantages sum to zero within each prompt's group.
    assert step.advantages.view(len(step.groups), -1).sum(-1).abs().max() < 1e-5


@pytest.mark.parametrize("preset", list(PER_PRESET))
def test_resume_continues_exactly(tmp_path, preset):
    """``--resume`` after step 1 of 3 gives the uninterrupted run's metrics at steps 2 and 3
    and its final weights, bit for bit: the weights, the optimizer state, the sampler (DAPO's
    extra rounds included), the RNG streams and the update counters all come back."""
    # A warm-up and a cosine schedule make the learning rate depend on the restored counters.
    extra = ["train.steps=3", "train.save_every=1", "rollout.max_new_tokens=4"]
    extra += ["optim.warmup_steps=2", "optim.schedule=cosine"]
    uninterrupted = _trainer(_cfg(tmp_path / "a", preset, *extra))
    full = uninterrupted.train()

    cfg = _cfg(tmp_path / "b", preset, *extra)
    first = _trainer(cfg)
    metrics = first.step()  # run one step and "crash" after its checkpoint
    first.step_count += 1
    first._after_step(metrics)
    del first
    assert latest_checkpoint(cfg.train.out_dir).name == "step-000001"
    resumed = _trainer(cfg, resume=True)
    assert resumed.step_count == 1
    rest = resumed.train()
    assert [m["step"] for m in rest] == [2, 3]
    for a, b in zip(full[1:], rest):
        assert set(a) == set(b)
        for key, value in a.items():
            if not key.startswith(("time/", "throughput/")):
                assert b[key] == value, key
    want, got = _weights(uninterrupted.model), _weights(resumed.model)
    assert set(want) == set(got)
    for name, w in want.items():
        assert torch.equal(got[name], w), name
    assert [r["step"] for r in read_metrics(cfg.train.out_dir)] == [1, 2, 3]


def test_non_finite_steps_are_skipped_then_the_run_stops_with_a_checkpoint(tmp_path):
    @register_term("test_nan")
    def nan_term(x):
        return x.logp.sum() * float("nan"), {}

    try:
        cfg = _cfg(tmp_path, "grpo", "train.steps=5", "train.max_skipped_in_row=2")
        cfg.objective.extra_terms = {"test_nan": {"weight": 1.0}}
        trainer = _trainer(cfg)
        before = _weights(trainer.model)
        with pytest.raises(TrainingStopped, match="2 consecutive updates"):
            trainer.train()
        after = _weights(trainer.model)
        assert all(torch.equal(before[k], after[k]) for k in before), "a skipped step moved weights"
        assert trainer.updates.skipped == 2 and trainer.updates.updates == 0
        assert read_metrics(tmp_path / "grpo")[-1]["skipped_steps"] == 2
        assert latest_checkpoint(tmp_path / "grpo").name == "step-000002"
    finally:
        OBJECTIVE_TERMS.pop("test_nan")


def test_checkpoint_write_failure_keeps_the_previous_one(tmp_path, monkeypatch):
    trainer = _trainer(_cfg(tmp_path, "grpo", "train.keep_last=2"))
    trainer.step_count = 1
    first = trainer.save()
    good = (first / "weights.safetensors").read_bytes()

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt_module, "save_file", full_disk)
    trainer.step_count = 2
    with pytest.raises(CheckpointError, match="No space left on device.*step-000001"):
        trainer.save()
    assert [p.name for p in checkpoint_dirs(trainer.out)] == ["step-000001"]
    assert (first / "weights.safetensors").read_bytes() == good
    assert not list((trainer.out / "checkpoints").glob("*.tmp"))
    monkeypatch.undo()
    for step in (2, 3, 4):  # rotation keeps the newest two
        trainer.step_count = step
        trainer.save()
    assert [p.name for p in checkpoint_dirs(trainer.out)] == ["step-000003", "step-000004"]
    state = json.loads((trainer.out / "checkpoints" / "step-000004" / "state.json").read_text())
    assert state["step"] == 4 and "sampler" in state and state["world_size"] == 1


def test_export_loads_with_from_pretrained_and_matches(tmp_path):
    from transformers import AutoModelForImageTextToText

    from vispo.models.loading import load_policy
    from vispo.train.export import export_run

    cfg = _cfg(tmp_path, "grpo", "train.steps=1")
    trainer = _trainer(cfg)
    trainer.train()
    out = export_run(cfg.train.out_dir, tmp_path / "export").path
    hf = AutoModelForImageTextToText.from_pretrained(out).eval()
    policy, _ = load_policy(str(out))
    batch = trainer._last_step.batch
    inputs = batch.model_inputs()
    with torch.no_grad():
        ref = trainer.model.eval()(**inputs).logits
        torch.testing.assert_close(hf(**inputs).logits, ref)
        torch.testing.assert_close(policy.eval()(**inputs).logits, ref)


def test_tied_weights_round_trip_through_a_checkpoint(tmp_path):
    from vispo.models import build_tiny_vlm
    from vispo.train.checkpoint import load_checkpoint, save_checkpoint

    source, _ = build_tiny_vlm("qwen2_vl", tie_word_embeddings=True)
    with torch.no_grad():
        source.lm_head.weight.add_(1.0)  # also moves the tied input embedding
    opt = torch.optim.AdamW(source.parameters())
    path = save_checkpoint(tmp_path, 1, model=source, optimizer=opt, state={}, keep_last=1)
    target, _ = build_tiny_vlm("qwen2_vl", tie_word_embeddings=True)
    load_checkpoint(path, model=target, optimizer=torch.optim.AdamW(target.parameters()))
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value), key
    assert target.lm_head.weight.data_ptr() == target.get_input_embeddings().weight.data_ptr()
    other, _ = build_tiny_vlm("qwen2_vl", hidden_size=32, intermediate_size=64)
    with pytest.raises(CheckpointError, match="do not match"):
        load_checkpoint(path, model=other, optimizer=torch.optim.AdamW(other.parameters()))


@pytest.mark.parametrize("preset", ["papo_d", "grpo"])
def test_micro_batching_accumulates_the_same_gradient(tmp_path, preset):
    """Gradient accumulation over micro-batches of 2 equals one micro-batch of 6 (the
    global token-mean); compared on the accumulated gradients, which stay on the parameters
    after the step (Adam's first step, ~lr * sign(g), would amplify float noise in near-zero
    gradients)."""
    grads = []
    for micro in ("6", "2"):
        cfg = _cfg(
            tmp_path / micro,
            preset,
            "train.steps=1",
            f"train.micro_batch_size={micro}",
            "rollout.batch_invariant=true",
            "optim.grad_clip=0",
        )
        trainer = _trainer(cfg)
        metrics = trainer.step()
        assert metrics["skipped_steps"] == 0
        grads.append(
            {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
        )
    assert set(grads[0]) == set(grads[1]) and grads[0]
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, atol=1e-6, rtol=1e-4)


def test_several_epochs_and_mini_batches_run_off_policy(tmp_path):
    cfg = _cfg(
        tmp_path,
        "grpo",
        "train.steps=1",
        "train.ppo_epochs=2",
        "train.mini_batch_size=3",
        "train.micro_batch_size=3",
        "optim.lr=5e-3",
    )
    trainer = _trainer(cfg)
    metrics = trainer.step()
    # 2 epochs x 2 mini-batches: 4 optimizer steps; after the first, the policy is off the
    # rollout policy, so the ratio moves away from 1.
    assert trainer.updates.updates == 4
    assert metrics["approx_kl"] != 0.0
    assert metrics["lr"] == pytest.approx(5e-3)


def test_cppo_scores_its_views_only_for_positive_advantage_rows(tmp_path, monkeypatch):
    """The gate: with ``cpl_gate`` only positive-advantage sequences carry the contrastive
    loss, so the trainer scores I+ and I- for those rows only. Forcing it to score every row
    (as the reference recipe does) gives the same loss and the same gradients."""
    import dataclasses

    import vispo.train.update as update_module

    runs = {}
    for label in ("gated", "all_rows"):
        cfg = _cfg(tmp_path / label, "cppo", "train.steps=1", "optim.grad_clip=0")
        trainer = _trainer(cfg)
        if label == "all_rows":
            trainer.req = dataclasses.replace(trainer.req, cppo_positive_only=False)
        rows_scored = []
        real_score = update_module.score

        def counting_score(model, batch, *args, _real=real_score, _rows=rows_scored, **kw):
            _rows.append(batch.input_ids.shape[0])
            return _real(model, batch, *args, **kw)

        monkeypatch.setattr(update_module, "score", counting_score)
        metrics = trainer.step()
        monkeypatch.setattr(update_module, "score", real_score)
        positive = int((trainer._last_step.advantages > 0).sum())
        grads = {
            n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None
        }
        runs[label] = (metrics, grads, rows_scored, positive)

    (m_g, g_g, rows_g, pos), (m_a, g_a, rows_a, pos_a) = runs["gated"], runs["all_rows"]
    total = 2 * 3  # prompts_per_step x rollout.n
    assert pos == pos_a and 0 < pos < total, "the test needs a mixed batch"
    # Update passes: [original, then I+/I- views]; the gated run scores the views on `pos` rows.
    assert rows_g[-1] == pos and rows_a[-1] == total
    assert m_g["loss/cpl"] == pytest.approx(m_a["loss/cpl"], rel=1e-5, abs=1e-7)
    assert m_g["loss/total"] == pytest.approx(m_a["loss/total"], rel=1e-5, abs=1e-7)
    assert set(g_g) == set(g_a) and g_g
    for name, g in g_a.items():
        torch.testing.assert_close(g_g[name], g, atol=1e-6, rtol=1e-4)


def test_bf16_autocast_step_trains_float32_weights(tmp_path):
    """``train.autocast=bf16``: generation, scoring and the update forward run in bfloat16
    (seen at the output layer), the weights stay float32 and move, the step is finite."""
    trainer = _trainer(_cfg(tmp_path, "papo_g", "train.steps=1", "train.autocast=bf16"))
    dtypes = []
    hook = trainer.model.lm_head.register_forward_hook(
        lambda mod, args, out: dtypes.append(out.dtype)
    )
    before = _weights(trainer.model)
    metrics = trainer.step()
    hook.remove()
    assert dtypes and set(dtypes) == {torch.bfloat16}
    assert metrics["skipped_steps"] == 0 and torch.isfinite(torch.tensor(metrics["loss/total"]))
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())
    assert any(not torch.equal(v, before[k]) for k, v in _weights(trainer.model).items())


def test_a_periodic_evaluation_at_the_last_step_is_the_final_one(tmp_path):
    trainer = _trainer(_cfg(tmp_path, "grpo", "data.eval_size=4", "train.eval_every=2"))
    calls = []
    real = trainer.evaluate

    def counting():
        calls.append(trainer.step_count)
        return real()

    trainer.evaluate = counting
    history = trainer.train()
    assert calls == [0, 2]  # before RL, and step 2 (= the end): not a third time
    assert trainer.eval_results["accuracy_after"] == history[-1]["eval/accuracy"]
