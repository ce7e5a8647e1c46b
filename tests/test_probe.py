"""``vispo probe``: zero KL for a model blind to pixels, positive otherwise, values checked
against an independent full forward, answer changes, summaries and histograms."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from vispo import cli
from vispo.data import get_template, synthetic_vqa
from vispo.eval.benchmarks import GENERAL, Benchmark
from vispo.eval.loading import LoadedModel
from vispo.eval.probe import (
    ProbeSettings,
    analyse_batch,
    blank_like,
    final_answer,
    probe_model,
    question_rng,
    summarize_probe,
)
from vispo.models import build_scoring_batch, encode_prompts
from vispo.vision import random_patch_mask

TEMPLATE = get_template("short")


@pytest.fixture(scope="module")
def samples():
    return list(synthetic_vqa(3, seed=5, image_size=64, split="test"))


def _blind(model, arch):
    """A copy whose vision features are exactly zero (the projector's last layer zeroed)."""
    blind = copy.deepcopy(model)
    if arch == "idefics3":
        layer = blind.model.connector.modality_projection.proj
    else:
        layer = blind.model.visual.merger.mlp[-1]
    with torch.no_grad():
        for p in layer.parameters():
            p.zero_()
    return blind


def _naive_kl(model, processor, analysis, variant_images):
    """Per-token k3 KL(orig || variant) from full forwards and a plain log_softmax."""
    messages = [TEMPLATE.render(analysis.sample)]
    out = []
    for images in (analysis.images, variant_images):
        prompts = encode_prompts(processor, messages, [images])
        ids = torch.tensor([analysis.token_ids])
        batch = build_scoring_batch(prompts, ids, repeats=1, response_mask=torch.ones_like(ids))
        with torch.no_grad():
            logits = model(**batch.model_inputs()).logits.double()
        Lp = batch.prompt_length
        logp = torch.log_softmax(logits[0, Lp - 1 : -1], -1).gather(-1, ids[0, :, None])[:, 0]
        out.append(logp)
    x = (out[1] - out[0]).clamp(-20, 20)
    return (x.exp() - x - 1).clamp(-10, 10).numpy()


@pytest.mark.parametrize("arch", ["qwen2_vl", "idefics3"])
def test_zero_kl_for_a_model_that_ignores_pixels(tiny_vlm, samples, arch):
    model, processor = tiny_vlm(arch)
    blind = _blind(model, arch)
    settings = ProbeSettings(seed=3)
    analyses, _ = analyse_batch(blind, processor, samples, TEMPLATE, settings, max_new_tokens=6)
    for a in analyses:
        assert len(a.token_ids) > 0
        np.testing.assert_allclose(a.kl_mask, 0.0, atol=1e-6)
        np.testing.assert_allclose(a.kl_blank, 0.0, atol=1e-6)
    # The same model with its vision intact does react to the images.
    analyses, _ = analyse_batch(model, processor, samples, TEMPLATE, settings, max_new_tokens=6)
    assert all(a.mean_kl_mask > 1e-6 and a.mean_kl_blank > 1e-6 for a in analyses)


def test_token_kl_matches_an_independent_full_forward(tiny_vlm, samples):
    model, processor = tiny_vlm("qwen2_vl")
    settings = ProbeSettings(seed=9, mask_ratio=0.5)
    analyses, _ = analyse_batch(model, processor, samples, TEMPLATE, settings, max_new_tokens=6)
    for a in analyses:
        # The variants: the seeded PAPO mask of this question, and a gray image of the same size.
        expected_mask = random_patch_mask(
            a.images[0], patch_size=14, ratio=0.5, rng=question_rng(9, a.sample.id)
        )
        assert np.array_equal(np.asarray(a.masked[0]), np.asarray(expected_mask))
        assert a.blank[0].size == a.images[0].size
        assert set(np.asarray(a.blank[0]).reshape(-1).tolist()) == {128}
        for variant, got in ((a.masked, a.kl_mask), (a.blank, a.kl_blank)):
            np.testing.assert_allclose(
                got, _naive_kl(model, processor, a, variant), atol=2e-5, rtol=1e-4
            )


def test_cppo_selection_follows_the_entropy_rule(tiny_vlm, samples):
    model, processor = tiny_vlm("qwen2_vl")
    analyses, _ = analyse_batch(
        model,
        processor,
        samples,
        TEMPLATE,
        ProbeSettings(seed=1),
        max_new_tokens=8,
        with_cppo=True,
        cppo_top_frac=0.5,
    )
    n_selected = 0
    for a in analyses:
        dH = a.entropy_neg - a.entropy
        score = np.where(dH > 0, dH / (a.entropy_neg + 1e-6), -np.inf)
        eligible = int((dH > 0).sum())
        if eligible == 0:
            assert not a.cppo_selected.any()
            continue
        k = max(1, math.floor(0.5 * eligible))
        kth = np.sort(score)[::-1][k - 1]
        expected = (dH > 0) & (score >= kth)
        assert a.cppo_selected.tolist() == expected.tolist()
        n_selected += int(expected.sum())
        assert a.negative[0].size == a.images[0].size
    assert n_selected > 0


def test_probe_model_writes_json_markdown_histograms(tiny_vlm, tmp_path):
    model, processor = tiny_vlm("qwen2_vl")
    bench = Benchmark(
        "toy",
        GENERAL,
        lambda root, limit: synthetic_vqa(5, seed=2, image_size=64)[:limit],
        template="short",
    )
    settings = ProbeSettings(batch_size=2, max_new_tokens=5, seed=4)
    blind = LoadedModel(_blind(model, "qwen2_vl"), processor, "blind", "blind")
    result = probe_model(blind, [bench], tmp_path / "blind", settings, progress=False, log=print)
    summary = result["benchmarks"]["toy"]["summary"]
    assert summary["n"] == 5
    assert summary["kl_mask_mean"] == pytest.approx(0.0, abs=1e-6)
    assert summary["frac_changed_mask"] == 0.0 and summary["frac_changed_blank"] == 0.0
    # A blind model answers identically under the three images, so its accuracies agree.
    assert summary["accuracy_orig"] == summary["accuracy_mask"] == summary["accuracy_blank"]

    seeing = LoadedModel(model, processor, "tiny", "tiny")
    result = probe_model(seeing, [bench], tmp_path / "tiny", settings, progress=False)
    records = result["benchmarks"]["toy"]["samples"]
    assert all(r["kl_mask"] > 0 for r in records)
    for r in records:
        assert r["changed_mask"] == (
            final_answer(r["answer_orig"]) != final_answer(r["answer_mask"])
        )
    on_disk = json.loads((tmp_path / "tiny" / "probe.json").read_text())
    assert on_disk["benchmarks"]["toy"]["summary"] == result["benchmarks"]["toy"]["summary"]
    assert "| toy | 5 |" in (tmp_path / "tiny" / "probe.md").read_text()
    png = Image.open(tmp_path / "tiny" / "probe_toy.png").convert("L")
    assert png.size[0] > 300 and np.asarray(png).std() > 5  # a drawn figure, not blank


def test_summary_by_hand():
    records = [
        {
            "kl_mask": 0.1,
            "kl_blank": 0.4,
            "changed_mask": True,
            "changed_blank": True,
            "n_tokens": 3,
        },
        {
            "kl_mask": 0.3,
            "kl_blank": 0.0,
            "changed_mask": False,
            "changed_blank": True,
            "n_tokens": 5,
        },
        {
            "kl_mask": 0.2,
            "kl_blank": 0.2,
            "changed_mask": False,
            "changed_blank": False,
            "n_tokens": 4,
        },
    ]
    s = summarize_probe(records)
    assert s["kl_mask_mean"] == pytest.approx(0.2) and s["kl_mask_median"] == pytest.approx(0.2)
    assert s["kl_blank_mean"] == pytest.approx(0.2) and s["kl_blank_median"] == pytest.approx(0.2)
    assert s["frac_changed_mask"] == pytest.approx(1 / 3)
    assert s["frac_changed_blank"] == pytest.approx(2 / 3)
    assert s["response_tokens_mean"] == pytest.approx(4.0)
    assert "accuracy_orig" not in s
    with pytest.raises(ValueError, match="no probe records"):
        summarize_probe([])


def test_final_answer_and_blank_and_settings():
    assert final_answer("<think>it is red</think> \\boxed{Circle}") == "circle"
    assert final_answer("Circle.") == final_answer("circle")
    img = Image.new("RGB", (30, 20), (1, 2, 3))
    assert blank_like(img, 7).size == (30, 20) and blank_like(img, 7).getpixel((5, 5)) == (7, 7, 7)
    assert question_rng(0, "a").random() == question_rng(0, "a").random()
    assert question_rng(0, "a").random() != question_rng(0, "b").random()
    with pytest.raises(ValueError, match="mask_ratio"):
        ProbeSettings(mask_ratio=0).validate()
    with pytest.raises(ValueError, match="blank_fill"):
        ProbeSettings(blank_fill=300).validate()


def test_text_only_questions_are_refused_by_name(tiny_vlm):
    from vispo.data import Sample

    model, processor = tiny_vlm("qwen2_vl")
    text_only = Sample(id="champ/7", images=[], question="1 + 1?", answer="2")
    with pytest.raises(ValueError, match="'champ/7' has no image"):
        analyse_batch(model, processor, [text_only], TEMPLATE, ProbeSettings(), max_new_tokens=2)


def test_cli_probe(tmp_path, capsys):
    code = cli.main(
        [
            "probe",
            "tiny:qwen2_vl",
            "--benchmarks",
            "easy-vqa-vd",
            "--limit",
            "2",
            "--max-new-tokens",
            "3",
            "--out",
            str(tmp_path),
            "--no-progress",
        ]
    )
    assert code == 0
    assert "| easy-vqa-vd | 2 |" in capsys.readouterr().out
    assert (tmp_path / "probe_easy-vqa-vd.png").is_file()
    assert cli.main(["probe", "tiny:qwen2_vl", "--mask-ratio", "2"]) == 2
    assert "mask_ratio" in capsys.readouterr().err


def test_cli_probe_of_a_run_folder_uses_the_runs_mask(tmp_path):
    """Without --mask-ratio/--patch-size the probe masks like the run trained (its
    objective.mask_ratio and mask_patch_size); explicit flags win."""
    from safetensors.torch import save_model

    from vispo.models import build_tiny_vlm
    from vispo.train.config import config_to_dict, load_config

    run = tmp_path / "run"
    cfg = load_config(
        None,
        [
            "model.name_or_path=tiny:qwen2_vl",
            "objective.name=papo_g",
            "objective.mask_ratio=0.4",
            "objective.mask_patch_size=16",
        ],
    )
    ckpt = run / "checkpoints" / "step-000001"
    ckpt.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps(config_to_dict(cfg)))
    model, _ = build_tiny_vlm("qwen2_vl")
    save_model(model, str(ckpt / "weights.safetensors"))
    (ckpt / "state.json").write_text('{"step": 1}')
    common = ["--benchmarks", "easy-vqa-vd", "--limit", "1", "--max-new-tokens", "2"]
    for extra, expected in (([], (0.4, 16)), (["--patch-size", "8"], (0.4, 8))):
        out = tmp_path / f"probe{len(extra)}"
        argv = ["probe", str(run), *common, "--out", str(out), "--no-progress", *extra]
        assert cli.main(argv) == 0
        settings = json.loads((out / "probe.json").read_text())["settings"]
        assert (settings["mask_ratio"], settings["patch_size"]) == expected
