"""Rows with 2-3 images end to end: every image-perturbing objective perturbs each image (PAPO
masks, CPPO's views, VPPO's mask, NoisyRollout's noise), on Qwen2-VL, Qwen2.5-VL and Idefics3
tiny models; the samples page shows every image."""

import numpy as np
import pytest

from vispo.data.sample import Sample, SampleDataset
from vispo.rewards import RewardRunner
from vispo.train import batch as B
from vispo.train.trainer import Trainer


def parity_reward(completions, answers, **columns):
    return [float(len(c) % 2 == 0) for c in completions]


def _data(images):
    rows = [
        Sample(id="two-0", images=[images[0], images[1]], question="Same shape?", answer="no"),
        Sample(id="three-1", images=images[1:4], question="How many circles?", answer="1"),
        Sample(id="two-2", images=[images[3], images[2]], question="Same colour?", answer="no"),
        Sample(id="three-3", images=images[0:3], question="Which is red?", answer="1"),
    ]
    return SampleDataset(rows)


def _trainer(one_step_config, tmp_path, arch, preset, images, *extra):
    cfg = one_step_config(
        tmp_path, preset, "optim.lr=1e-3", "train.samples_every=1", *extra, arch=arch
    )
    return Trainer(
        cfg, train_data=_data(images), reward_fn=RewardRunner(parity_reward, num_workers=0)
    )


def _differs(a, b) -> bool:
    return a.size == b.size and not np.array_equal(np.asarray(a), np.asarray(b))


CASES = [
    ("papo_g", [], ["mask"]),
    ("cppo", [], ["pos", "neg"]),
    ("vppo", [], ["mask"]),
    ("grpo", ["objective.noisy_frac=0.5", "objective.noisy_anneal=none"], []),
]


@pytest.mark.parametrize("arch", ["qwen2_vl", "qwen2_5_vl", "idefics3"])
@pytest.mark.parametrize(
    "preset,extra,variants", CASES, ids=[c[0] if not c[1] else "noisy" for c in CASES]
)
def test_every_image_of_a_row_is_perturbed(
    tmp_path, sample_images, arch, preset, extra, variants, one_step_config
):
    trainer = _trainer(one_step_config, tmp_path, arch, preset, sample_images, *extra)
    noised = []
    original = B.noised_images

    def spy(images, *args, **kw):
        out = original(images, *args, **kw)
        noised.append((images, out))
        return out

    B.noised_images = spy
    try:
        history = trainer.train()
    finally:
        B.noised_images = original
    assert np.isfinite(history[0]["loss/total"])
    step = trainer._last_step
    counts = [len(g.images) for g in step.groups]
    assert sorted(counts) in ([2, 3], [2, 2], [3, 3])
    for name in variants:  # one perturbed copy of each image, same size, changed
        per_prompt = step.variant_images[name]
        assert [len(v) for v in per_prompt] == counts
        changed = [
            _differs(v, g_img)
            for g, v_list in zip(step.groups, per_prompt)
            for v, g_img in zip(v_list, g.images)
        ]
        assert sum(changed) >= len(changed) - 1, (name, changed)  # a view may be ~identity
        assert name != "mask" or all(changed)
    if extra:
        ((clean, noisy),) = noised
        assert [len(v) for v in noisy] == [len(v) for v in clean]
        assert all(_differs(n, c) for cs, ns in zip(clean, noisy) for c, n in zip(cs, ns))
    page = (tmp_path / "samples" / "step-000001.html").read_text()
    assert page.count("<img ") == sum(counts)


@pytest.mark.parametrize("arch", ["qwen2_5_vl", "idefics3"])
def test_report_sample_shows_every_image_and_its_variants(sample_images, tiny_vlm, arch):
    from vispo.data import get_template
    from vispo.eval.probe import ProbeSettings, analyse_batch
    from vispo.eval.report import sample_html

    model, processor = tiny_vlm(arch)
    data = _data(sample_images)
    samples = [data[0], data[1]]  # 2 and 3 images
    analyses, _ = analyse_batch(
        model,
        processor,
        samples,
        get_template("reasoning"),
        ProbeSettings(seed=0).validate(),
        max_new_tokens=3,
        budget=B.image_budget(processor),
        with_cppo=True,
    )
    for analysis, n in zip(analyses, (2, 3)):
        assert len(analysis.images) == len(analysis.masked) == len(analysis.negative) == n
        html = sample_html(analysis, 1.0, None)
        assert html.count("<img ") == 3 * n  # original, masked and I- of each image
        assert html.count("<figcaption>masked (PAPO)</figcaption>") == n
