"""``vispo probe``: how much does the model look at the image?

For each question the model answers (greedily by default) with the original image; that
response is then scored teacher-forced, in one batched forward, under three images of the
same size (so the token ids and positions are shared and only the pixels differ):

* the original image;
* PAPO's masked image (:func:`vispo.vision.random_patch_mask`, ratio 0.6, 14-px patches,
  black fill, seeded per question);
* "no image": a uniform mid-gray image (RGB 128, 128, 128) of the original size. Removing
  the image tokens instead would change the prompt's length and positions as well as its
  content; a blank image of the same size removes only the information.

Per token, the perception KL is PAPO's ``perception_kl(logp_orig, logp_variant)`` (the k3
estimate of ``KL(pi(.|I) || pi(.|I'))`` on the response's own tokens, the same function the
training objective maximises); per question it is averaged over the response tokens. The
probe also answers the question again (greedily) with the masked and the blank image and
reports how often the final answer changes, and the accuracy under each image when a reward
is given. A model that ignores pixels has zero KL and never changes its answer.

:func:`analyse_batch` is the token-level core shared with the HTML report, which shades each
response token by its KL and highlights the tokens CPPO would select.
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vispo.algos import cppo_perception_mask, perception_kl
from vispo.eval.accuracy import correctness, prepared_images, reward_inputs
from vispo.models.scoring import build_scoring_batch, encode_prompts, pixel_inputs, score
from vispo.rollout.hf import generate
from vispo.vision import info_removing, random_patch_mask

#: The "no image" stand-in: a uniform image of this gray level, same size as the original.
BLANK_FILL = 128


@dataclasses.dataclass
class ProbeSettings:
    """How to probe.

    Attributes:
        mask_ratio: PAPO mask: probability that a patch is blacked out.
        patch_size: PAPO mask: patch side in pixels.
        blank_fill: gray level of the "no image" stand-in.
        seed: seeds the masks (per question, from its id) and sampled responses.
        sample: score a sampled response instead of the greedy one.
        temperature, top_p: sampling parameters (``sample=True``); the scoring temperature.
        max_new_tokens: response length cap (None: the benchmark's default).
        batch_size: questions per batch.
        limit: first ``limit`` questions of each benchmark.
        template, reward: override the benchmark's (or the run's) template and reward.
    """

    mask_ratio: float = 0.6
    patch_size: int = 14
    blank_fill: int = BLANK_FILL
    seed: int = 0
    sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int | None = None
    batch_size: int = 8
    limit: int | None = None
    template: str | None = None
    reward: str | None = None

    def validate(self) -> ProbeSettings:
        if not 0 < self.mask_ratio <= 1:
            raise ValueError(f"mask_ratio must be in (0, 1], got {self.mask_ratio}")
        if self.patch_size < 1:
            raise ValueError(f"patch_size must be >= 1, got {self.patch_size}")
        if not 0 <= self.blank_fill <= 255:
            raise ValueError(f"blank_fill must be in [0, 255], got {self.blank_fill}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be >= 1, got {self.limit}")
        return self


@dataclasses.dataclass
class TokenAnalysis:
    """One question's response and its per-token scores.

    Attributes:
        sample: the question.
        images, masked, blank: the prepared original images and their two variants.
        response: the decoded response.
        token_ids: its tokens (EOS included when it stopped).
        tokens: each token decoded on its own (for display).
        kl_mask, kl_blank: per-token ``perception_kl`` against the masked / blank image.
        entropy, entropy_neg: full-vocabulary entropies with the original image and with
            CPPO's information-removing view (``with_cppo=True``).
        cppo_selected: the tokens CPPO's selection rule picks (``with_cppo=True``; no
            advantage gating: one response has no group advantage).
        negative: the information-removing view used (``with_cppo=True``).
    """

    sample: object
    images: list[Image.Image]
    masked: list[Image.Image]
    blank: list[Image.Image]
    response: str
    token_ids: list[int]
    tokens: list[str]
    kl_mask: np.ndarray
    kl_blank: np.ndarray
    entropy: np.ndarray | None = None
    entropy_neg: np.ndarray | None = None
    cppo_selected: np.ndarray | None = None
    negative: list[Image.Image] | None = None

    @property
    def mean_kl_mask(self) -> float:
        return float(self.kl_mask.mean()) if self.kl_mask.size else 0.0

    @property
    def mean_kl_blank(self) -> float:
        return float(self.kl_blank.mean()) if self.kl_blank.size else 0.0


def question_rng(seed: int, sample_id: str, stream: int = 0) -> np.random.Generator:
    """The generator of one question's perturbations: independent of batching and order."""
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, zlib.crc32(sample_id.encode()), stream])


def blank_like(image: Image.Image, fill: int = BLANK_FILL) -> Image.Image:
    """A uniform gray RGB image with the size of ``image``."""
    return Image.new("RGB", image.size, (fill, fill, fill))


def analyse_batch(
    model,
    processor,
    samples: Sequence,
    template,
    settings: ProbeSettings,
    *,
    max_new_tokens: int,
    budget=None,
    batch_seed: int = 0,
    with_cppo: bool = False,
    cppo_top_frac: float = 0.5,
) -> tuple[list[TokenAnalysis], object]:
    """Generate a response per question and score it under the original, masked and blank
    images (and CPPO's information-removing view with ``with_cppo``).

    Returns ``(analyses, prompts)``; ``prompts`` is the encoded batch, reused by
    :func:`probe_batch` to answer again with the other images.
    """
    for sample in samples:
        if not sample.images:
            raise ValueError(
                f"sample {sample.id!r} has no image: the probe compares image variants, so it "
                "needs questions with at least one image"
            )
    images = prepared_images(samples, budget)
    masked, blank, negative = [], [], []
    for sample, imgs in zip(samples, images):
        rng = question_rng(settings.seed, sample.id)
        masked.append(
            [
                random_patch_mask(
                    im, patch_size=settings.patch_size, ratio=settings.mask_ratio, rng=rng
                )
                for im in imgs
            ]
        )
        blank.append([blank_like(im, settings.blank_fill) for im in imgs])
        if with_cppo:
            neg_rng = question_rng(settings.seed, sample.id, stream=1)
            negative.append([info_removing(im, neg_rng)[0] for im in imgs])
    prompts = encode_prompts(processor, [template.render(s) for s in samples], images)
    was_training = model.training
    model.eval()
    try:
        rollout = generate(
            model,
            processor,
            prompts,
            n=1,
            max_new_tokens=max_new_tokens,
            temperature=settings.temperature,
            top_p=settings.top_p,
            do_sample=settings.sample,
            seed=batch_seed,
        )
        batch = build_scoring_batch(
            prompts, rollout.response_ids, repeats=1, response_mask=rollout.response_mask
        )
        variants = [
            None,
            pixel_inputs(processor, masked, reference=prompts),
            pixel_inputs(processor, blank, reference=prompts),
        ]
        entropy_flags = [with_cppo, False, False]
        if with_cppo:
            variants.append(pixel_inputs(processor, negative, reference=prompts))
            entropy_flags.append(True)
        scores = score(
            model,
            batch,
            variants,
            temperature=settings.temperature if settings.sample else 1.0,
            entropy=entropy_flags,
        )
    finally:
        model.train(was_training)
    mask = batch.response_mask
    kl_mask = perception_kl(scores[0].logp, scores[1].logp) * mask
    kl_blank = perception_kl(scores[0].logp, scores[2].logp) * mask
    selected = None
    if with_cppo:
        ones = torch.ones(len(batch))
        selected = cppo_perception_mask(
            scores[0].entropy, scores[3].entropy, ones, mask, top_frac=cppo_top_frac, gate=False
        )
    tokenizer = processor.tokenizer
    out = []
    for i, sample in enumerate(samples):
        n = int(mask[i].sum())
        ids = rollout.response_ids[i, :n].tolist()
        out.append(
            TokenAnalysis(
                sample=sample,
                images=images[i],
                masked=masked[i],
                blank=blank[i],
                response=rollout.texts[i],
                token_ids=ids,
                tokens=[tokenizer.decode([t], skip_special_tokens=False) for t in ids],
                kl_mask=kl_mask[i, :n].double().numpy(),
                kl_blank=kl_blank[i, :n].double().numpy(),
                entropy=None if not with_cppo else scores[0].entropy[i, :n].double().numpy(),
                entropy_neg=None if not with_cppo else scores[3].entropy[i, :n].double().numpy(),
                cppo_selected=None if selected is None else selected[i, :n].numpy(),
                negative=negative[i] if with_cppo else None,
            )
        )
    return out, (prompts, variants)


def final_answer(text: str) -> str:
    """The normalised final answer of a response (the whole text when none is marked)."""
    from vispo.rewards import extract_answer, normalize_answer

    found = extract_answer(text)
    return normalize_answer(found if found is not None else text)


def _greedy_texts(model, processor, prompts, *, max_new_tokens: int) -> list[str]:
    return generate(
        model, processor, prompts, n=1, max_new_tokens=max_new_tokens, do_sample=False
    ).texts


def probe_batch(
    model,
    processor,
    samples: Sequence,
    template,
    settings: ProbeSettings,
    *,
    max_new_tokens: int,
    budget=None,
    batch_seed: int = 0,
    reward=None,
) -> list[dict]:
    """Per-question probe records of one batch (see the module docstring)."""
    analyses, (prompts, variants) = analyse_batch(
        model,
        processor,
        samples,
        template,
        settings,
        max_new_tokens=max_new_tokens,
        budget=budget,
        batch_seed=batch_seed,
    )
    was_training = model.training
    model.eval()
    try:
        # Answer-change comparisons are always between greedy answers, so that sampling noise
        # does not count as a change.
        if settings.sample:
            orig = _greedy_texts(model, processor, prompts, max_new_tokens=max_new_tokens)
        else:
            orig = [a.response for a in analyses]
        masked = _greedy_texts(
            model,
            processor,
            dataclasses.replace(prompts, pixels=variants[1]),
            max_new_tokens=max_new_tokens,
        )
        blank = _greedy_texts(
            model,
            processor,
            dataclasses.replace(prompts, pixels=variants[2]),
            max_new_tokens=max_new_tokens,
        )
    finally:
        model.train(was_training)
    correct = None
    if reward is not None:
        answers = [s.answer for s in samples]
        correct = [
            correctness(reward, texts, answers, **reward_inputs(samples, texts, processor))
            for texts in (orig, masked, blank)
        ]
    records = []
    for i, a in enumerate(analyses):
        rec = {
            "id": a.sample.id,
            "answer": a.sample.answer,
            "response": a.response,
            "n_tokens": len(a.token_ids),
            "kl_mask": a.mean_kl_mask,
            "kl_blank": a.mean_kl_blank,
            "kl_mask_max": float(a.kl_mask.max()) if a.kl_mask.size else 0.0,
            "kl_blank_max": float(a.kl_blank.max()) if a.kl_blank.size else 0.0,
            "answer_orig": orig[i],
            "answer_mask": masked[i],
            "answer_blank": blank[i],
            "changed_mask": final_answer(orig[i]) != final_answer(masked[i]),
            "changed_blank": final_answer(orig[i]) != final_answer(blank[i]),
        }
        if correct is not None:
            rec["correct_orig"], rec["correct_mask"], rec["correct_blank"] = (
                correct[0][i],
                correct[1][i],
                correct[2][i],
            )
        records.append(rec)
    return records


def summarize_probe(records: Sequence[dict]) -> dict:
    """Means, medians and fractions over a benchmark's probe records."""
    if not records:
        raise ValueError("no probe records to summarise")
    n = len(records)

    def mean(key: str) -> float:
        return sum(float(r[key]) for r in records) / n

    out = {
        "n": n,
        "kl_mask_mean": mean("kl_mask"),
        "kl_mask_median": statistics.median(r["kl_mask"] for r in records),
        "kl_blank_mean": mean("kl_blank"),
        "kl_blank_median": statistics.median(r["kl_blank"] for r in records),
        "frac_changed_mask": mean("changed_mask"),
        "frac_changed_blank": mean("changed_blank"),
        "response_tokens_mean": mean("n_tokens"),
    }
    if all("correct_orig" in r for r in records):
        for variant in ("orig", "mask", "blank"):
            out[f"accuracy_{variant}"] = mean(f"correct_{variant}")
    return out


def plot_probe_histogram(records: Sequence[dict], path: str | Path, title: str) -> Path:
    """Histograms of the per-question KL against the masked and the blank image (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(8.0, 3.0), sharey=True)
    for ax, key, label, colour in (
        (axes[0], "kl_mask", "KL(original || masked)", "#3b6fb6"),
        (axes[1], "kl_blank", "KL(original || no image)", "#c2572b"),
    ):
        values = np.array([float(r[key]) for r in records])
        top = float(values.max()) if values.size else 0.0
        bins = np.linspace(0.0, top if top > 0 else 1e-6, 26)
        ax.hist(values, bins=bins, color=colour, alpha=0.85)
        mean = float(values.mean()) if values.size else 0.0
        ax.axvline(mean, color="black", lw=1, ls="--")
        changed = "changed_mask" if key == "kl_mask" else "changed_blank"
        frac = sum(bool(r[changed]) for r in records) / max(len(records), 1)
        ax.set_title(f"{label}\nmean {mean:.3g}, answers changed {100 * frac:.0f}%", fontsize=9)
        ax.set_xlabel("per-question mean token KL", fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0].set_ylabel("questions", fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def probe_model(
    loaded,
    benchmarks: Sequence,
    out_dir: str | Path,
    settings: ProbeSettings | None = None,
    *,
    data_root: str | Path | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict:
    """Probe one model on ``benchmarks``; writes ``probe.json``, ``probe.md`` and one
    ``probe_<benchmark>.png`` histogram per benchmark into ``out_dir``; returns the JSON."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from vispo.data import get_template
    from vispo.eval.runner import batch_seed, open_reward, resolve_benchmark_settings
    from vispo.train.batch import image_budget

    settings = (settings or ProbeSettings()).validate()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    budget = image_budget(loaded.processor)
    plan = [(b, b.load(data_root, settings.limit)) for b in benchmarks]
    result = {
        "label": loaded.label,
        "model": {**loaded.identity, "step": loaded.step},
        "settings": dataclasses.asdict(settings),
        "no_image": f"uniform gray image ({settings.blank_fill}) of the original size",
        "benchmarks": {},
    }
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn())
    with Progress(*columns, disable=not progress) as bar:
        for bench, samples in plan:
            resolved = resolve_benchmark_settings(bench, settings, loaded.config)
            template = get_template(resolved["template"])
            max_new = resolved["max_new_tokens"]
            task = bar.add_task(f"probe {bench.name}", total=len(samples))
            records: list[dict] = []
            with open_reward(resolved["reward"], loaded.config) as reward:
                for start in range(0, len(samples), settings.batch_size):
                    chunk = [
                        samples[i]
                        for i in range(start, min(start + settings.batch_size, len(samples)))
                    ]
                    records += probe_batch(
                        loaded.model,
                        loaded.processor,
                        chunk,
                        template,
                        settings,
                        max_new_tokens=max_new,
                        budget=budget,
                        batch_seed=batch_seed(settings.seed, bench.name, "probe", start),
                        reward=reward,
                    )
                    bar.advance(task, len(chunk))
            png = plot_probe_histogram(
                records, out / f"probe_{bench.name}.png", f"{loaded.label} on {bench.name}"
            )
            result["benchmarks"][bench.name] = {
                "group": bench.group,
                **resolved,
                "summary": summarize_probe(records),
                "histogram": png.name,
                "samples": records,
            }
    (out / "probe.json").write_text(json.dumps(result, indent=2, default=_json_default))
    (out / "probe.md").write_text(probe_table(result))
    log(f"vispo probe: wrote {out / 'probe.json'}, {out / 'probe.md'} and histograms")
    return result


def _json_default(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, np.bool_):
        return bool(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def probe_table(result: dict) -> str:
    """Markdown summary of a probe: one row per benchmark."""
    has_acc = all("accuracy_orig" in b["summary"] for b in result["benchmarks"].values())
    header = [
        "benchmark",
        "n",
        "KL masked (mean)",
        "KL masked (median)",
        "KL no image (mean)",
        "changed, masked",
        "changed, no image",
    ]
    if has_acc:
        header += ["acc. original", "acc. masked", "acc. no image"]
    lines = [
        f"## vispo probe: {result['label']}",
        "",
        "Per-question mean token KL(original || variant) of the model's own response "
        f"(perception_kl, k3); no image = {result['no_image']}; mask ratio "
        f"{result['settings']['mask_ratio']:g}, patch {result['settings']['patch_size']} px. "
        "'changed' = the greedy final answer differs from the one with the original image.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|",
    ]
    for name, info in result["benchmarks"].items():
        s = info["summary"]
        cells = [
            name,
            str(s["n"]),
            _fmt(s["kl_mask_mean"]),
            _fmt(s["kl_mask_median"]),
            _fmt(s["kl_blank_mean"]),
            f"{100 * s['frac_changed_mask']:.1f}%",
            f"{100 * s['frac_changed_blank']:.1f}%",
        ]
        if has_acc:
            cells += [f"{100 * s[f'accuracy_{v}']:.1f}%" for v in ("orig", "mask", "blank")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _fmt(x: float) -> str:
    if x == 0:
        return "0"
    return f"{x:.3g}" if abs(x) >= 1e-3 and math.isfinite(x) else f"{x:.2e}"
