"""``vispo export``: the folder works with plain transformers (fresh process, no vispo, no
torchvision) and answers as vispo's greedy evaluation does; model card, generation config,
checkpoint selection and its errors, PEFT adapters, and the hub upload up to the call."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from vispo.cli import main
from vispo.rewards import RewardRunner
from vispo.train.config import load_config
from vispo.train.trainer import Trainer

MAX_NEW = 8


def _train(root, name: str, *extra: str):
    cfg = load_config(
        None,
        [
            f"model.name_or_path={name}",
            "data.limit=8",
            "data.eval_size=3",
            "train.steps=2",
            "train.prompts_per_step=2",
            "rollout.n=2",
            f"rollout.max_new_tokens={MAX_NEW}",
            f"train.out_dir={root / name.replace(':', '-')}",
            "logging.progress=false",
            "train.samples_every=0",
            "optim.lr=1e-3",
            *extra,
        ],
    )
    Trainer(cfg, reward_fn=RewardRunner(_parity, num_workers=0)).train()
    return cfg


def _parity(completions, answers, **columns):
    """Mixed rewards within groups (1 for an even length), so every step has a gradient."""
    return [float(len(c) % 2 == 0) for c in completions]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One trained 2-step run per model (vispo-tiny, two tiny architectures) and its export."""
    from vispo.train.export import export_run

    root = tmp_path_factory.mktemp("runs")
    out = {}
    for name in ("builtin:vispo-tiny", "tiny:qwen2_5_vl", "tiny:idefics3"):
        cfg = _train(root, name)
        result = export_run(cfg.train.out_dir, root / ("export-" + name.replace(":", "-")))
        out[name] = (cfg, result)
    return out


FRESH = textwrap.dedent(
    """
    import importlib.util, json, sys

    # The folder must load where torchvision is absent, even on a machine that has it: a None
    # entry makes `import torchvision` fail and find_spec report it missing.
    sys.modules["torchvision"] = None
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    job = json.loads(sys.argv[1])
    answers = {}
    for folder in job["folders"]:
        proc = AutoProcessor.from_pretrained(folder)
        model = AutoModelForImageTextToText.from_pretrained(folder)
        texts = []
        for image_path, question in job["questions"]:
            image = Image.open(image_path).convert("RGB")
            messages = [{"role": "user", "content": [
                {"type": "image", "image": image}, {"type": "text", "text": question}]}]
            inputs = proc.apply_chat_template(messages, add_generation_prompt=True,
                tokenize=True, return_dict=True, return_tensors="pt")
            out = model.generate(**inputs)
            texts.append(proc.decode(out[0, inputs["input_ids"].shape[1]:],
                                     skip_special_tokens=True))
        answers[folder] = {"processor": type(proc).__name__, "texts": texts}
    assert not [m for m in sys.modules if m == "vispo" or m.startswith("vispo.")]
    assert sys.modules["torchvision"] is None and importlib.util.find_spec("torchvision") is None
    print(json.dumps(answers))
    """
)


def test_fresh_process_plain_transformers_answers_as_vispo_greedy_eval(runs, tmp_path):
    from vispo.data import get_template, load_builtin
    from vispo.eval import EvalSettings, evaluate_model, get_benchmark, load_model_spec

    samples = load_builtin("easy-vqa", split="test", limit=6)
    bench = get_benchmark("easy-vqa")
    questions, expected = [], {}
    for i, sample in enumerate(samples):
        path = tmp_path / f"q{i}.png"
        sample.load_images()[0].save(path)
    for name, (cfg, result) in runs.items():
        template = get_template(cfg.data.template)
        questions = [
            [str(tmp_path / f"q{i}.png"), template.render_text(s)] for i, s in enumerate(samples)
        ]
        # vispo's own evaluation (greedy, the run's template and length cap) of the same step.
        loaded = load_model_spec(cfg.train.out_dir)
        assert loaded.step == result.step == 2
        evaluate_model(
            loaded,
            [bench],
            tmp_path / ("eval-" + name.replace(":", "-")),
            EvalSettings(k=0, limit=6, batch_size=6),
            progress=False,
        )
        records = [
            json.loads(line)
            for line in (tmp_path / ("eval-" + name.replace(":", "-")) / "results.jsonl")
            .read_text()
            .splitlines()
        ]
        assert [r["id"] for r in records] == [s.id for s in samples]
        expected[str(result.path)] = [r["responses"][0] for r in records]
    job = {"folders": list(expected), "questions": questions}
    proc = subprocess.run(
        [sys.executable, "-c", FRESH, json.dumps(job)],
        capture_output=True,
        text=True,
        timeout=300,
        env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    for folder, want in expected.items():
        assert got[folder]["texts"] == want, folder
        assert all(t.strip() for t in want)
    by_name = {name: got[str(result.path)]["processor"] for name, (_, result) in runs.items()}
    assert by_name == {
        "builtin:vispo-tiny": "PaddleOCRVLProcessor",
        "tiny:qwen2_5_vl": "PaddleOCRVLProcessor",
        "tiny:idefics3": "Idefics3Processor",
    }
    # The built-in model answers in words from its training vocabulary, not noise.
    assert set(expected[str(runs["builtin:vispo-tiny"][1].path)]) <= {
        "yes", "no", "circle", "rectangle", "triangle",
        "red", "green", "blue", "yellow", "gray", "black", "brown", "teal",
    }  # fmt: skip


@pytest.mark.parametrize("arch", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_portable_processor_gives_the_twins_tensors(arch, tmp_path, sample_images):
    """The saved PaddleOCRVLProcessor encodes one and two images exactly as vispo's image-only
    Qwen-VL processor does (ids, masks, modality ids, pixels, grids)."""
    from transformers import AutoProcessor

    from vispo.models.processors import load_processor, save_portable_processor
    from vispo.models.tiny import build_tiny_processor

    twin = build_tiny_processor(arch)
    assert save_portable_processor(twin, tmp_path) == "PaddleOCRVLProcessor"
    stock = AutoProcessor.from_pretrained(tmp_path)
    assert type(stock).__name__ == "PaddleOCRVLProcessor"
    # vispo itself still loads its twin (chosen by the model type of the folder's config.json)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": arch}))
    assert type(load_processor(tmp_path)) is type(twin)
    for images in (sample_images[:1], sample_images[1:3]):
        messages = [
            {
                "role": "user",
                "content": [{"type": "image", "image": im} for im in images]
                + [{"type": "text", "text": "Which colour?"}],
            }
        ]
        kw = dict(add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt")
        a, b = twin.apply_chat_template(messages, **kw), stock.apply_chat_template(messages, **kw)
        assert sorted(a) == sorted(b)
        for key in a:
            assert torch.equal(a[key], b[key]), key
        n_image_tokens = int((a["input_ids"] == twin.image_token_id).sum())
        grid = a["image_grid_thw"]
        assert n_image_tokens == int(grid.prod(-1).sum()) // 4  # merge 2 x 2


def test_model_card_and_generation_config(runs):
    cfg, result = runs["builtin:vispo-tiny"]
    folder = result.path
    gen = json.loads((folder / "generation_config.json").read_text())
    assert gen["do_sample"] is False and gen["max_new_tokens"] == MAX_NEW
    assert gen["eos_token_id"] == 2 and gen["pad_token_id"] == 0
    assert sorted(gen["suppress_tokens"]) == [5, 6]  # <|image_pad|>, <|video_pad|>
    assert (folder / "chat_template.jinja").read_text().startswith("{% for message in messages")
    card = (folder / "README.md").read_text()
    state = json.loads((result.checkpoint / "state.json").read_text())
    before, after = state["eval"]["accuracy_before"], state["eval"]["accuracy_after"]
    for text in (
        "base model | `builtin:vispo-tiny`",
        "| objective | `grpo` |",
        "| `beta` | `0.01` |",
        "| steps | 2 of 2 |",
        "`easy-vqa` (split `train`, first 8)",
        f"held-out accuracy before RL (greedy) | {before:.3f}",
        f"held-out accuracy after RL, step 2 (greedy) | {after:.3f}",
        "{{ question }} Answer in one word.",
        "AutoProcessor.from_pretrained(folder)",
    ):
        assert text in card, text


def _run_with_two_checkpoints(tmp_path, *extra):
    return _train(tmp_path, "tiny:qwen2_vl", "train.save_every=1", "data.eval_size=0", *extra)


def test_export_step_selection_and_errors(tmp_path, capsys):
    cfg = _run_with_two_checkpoints(tmp_path)
    run = cfg.train.out_dir
    assert main(["export", run, str(tmp_path / "e1"), "--step", "1"]) == 0
    out = capsys.readouterr().out
    assert "exported the model of step 1 (" in out and "step-000001" in out
    assert main(["export", run, str(tmp_path / "e2")]) == 0
    assert "of step 2 (" in capsys.readouterr().out
    # The exports hold different weights: steps 1 and 2 were both trained with lr 1e-3.
    w1 = load_file(str(tmp_path / "e1" / "model.safetensors"))
    w2 = load_file(str(tmp_path / "e2" / "model.safetensors"))
    assert any(not torch.equal(w1[k], w2[k]) for k in w1)

    assert main(["export", run, str(tmp_path / "e3"), "--step", "7"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "no checkpoint at step 7; steps with one: 1, 2" in err
    assert "Traceback" not in err and not (tmp_path / "e3").exists()


def test_export_without_checkpoint_or_with_a_corrupt_one(tmp_path, capsys):
    cfg = _run_with_two_checkpoints(tmp_path)
    run = tmp_path / "tiny-qwen2_vl"
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text((run / "config.json").read_text())
    assert main(["export", str(empty), str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "no complete checkpoint" in err
    assert "Traceback" not in err

    weights = run / "checkpoints" / "step-000002" / "weights.safetensors"
    weights.write_bytes(b"\xff" * 16 + weights.read_bytes()[16:])  # a broken header
    assert main(["export", str(run), str(tmp_path / "y")]) == 2
    err = capsys.readouterr().err
    # The checkpoint's recorded sha256 no longer matches: refused before reading the tensors.
    assert err.startswith("error: checkpoint ") and "step-000002 is corrupt" in err
    assert "weights.safetensors does not match its recorded sha256" in err
    assert "Traceback" not in err
    assert main(["export", str(tmp_path / "nowhere"), str(tmp_path / "z")]) == 2
    assert "not a vispo run folder" in capsys.readouterr().err
    assert cfg.train.steps == 2


def test_lora_adapter_only_loads_with_peft_on_the_base_model(tmp_path, capsys):
    from peft import PeftModel

    from vispo.models import build_tiny_vlm
    from vispo.train.export import export_run

    cfg = _train(tmp_path, "tiny:qwen2_vl", "model.lora=true", "model.lora_r=4")
    assert main(["export", cfg.train.out_dir, str(tmp_path / "adapter"), "--adapter-only"]) == 0
    assert "exported the adapter (PEFT) of step 2" in capsys.readouterr().out
    files = sorted(p.name for p in (tmp_path / "adapter").iterdir())
    assert files == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    adapter_cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert adapter_cfg["r"] == 4 and adapter_cfg["peft_type"] == "LORA"
    merged = export_run(cfg.train.out_dir, tmp_path / "merged")

    base, processor = build_tiny_vlm("qwen2_vl", seed=cfg.model.seed)
    base_ref, _ = build_tiny_vlm("qwen2_vl", seed=cfg.model.seed)
    peft_model = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    from transformers import AutoModelForImageTextToText

    full = AutoModelForImageTextToText.from_pretrained(merged.path).eval()
    ids = torch.tensor([[1, 20, 30, 40, 50, 60, 2]])
    with torch.no_grad():
        a = peft_model(input_ids=ids).logits
        b = full(input_ids=ids).logits
        c = base_ref.eval()(input_ids=ids).logits
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert (a - c).abs().max() > 1e-4  # the adapter changes the model
    del processor

    # The LoRA run's checkpoint stores only the trainable (adapter) weights; the frozen base
    # weights of the merged export above came from the rebuilt base model.
    stored = load_file(str(merged.checkpoint / "weights.safetensors"))
    assert stored and all("lora_" in k for k in stored)
    # A full-weights run whose checkpoint file was changed is refused, not silently loaded.
    full_run = _train(tmp_path / "full", "tiny:qwen2_vl")
    weights = (
        tmp_path / "full" / "tiny-qwen2_vl" / "checkpoints" / "step-000002" / "weights.safetensors"
    )
    original = weights.read_bytes()
    partial = load_file(str(weights))
    from safetensors.torch import save_file

    save_file(dict(list(partial.items())[1:]), str(weights))
    assert main(["export", full_run.train.out_dir, str(tmp_path / "p")]) == 2
    assert "does not match its recorded sha256" in capsys.readouterr().err
    weights.write_bytes(original)
    assert main(["export", full_run.train.out_dir, str(tmp_path / "a2"), "--adapter-only"]) == 2
    assert "needs a LoRA run (model.lora=true)" in capsys.readouterr().err


class FakeApi:
    """Stands in for huggingface_hub.HfApi: records the calls instead of uploading."""

    calls: list = []

    def __init__(self, token=None):
        self.token = token

    def create_repo(self, **kw):
        FakeApi.calls.append(("create_repo", kw))

    def upload_folder(self, **kw):
        from pathlib import Path

        files = sorted(p.name for p in Path(kw["folder_path"]).iterdir())
        FakeApi.calls.append(("upload_folder", {**kw, "files": files}))


def test_push_to_hub_up_to_the_upload_call(runs, tmp_path, monkeypatch, capsys):
    """Everything but the network: the CLI exports, then hands the folder to HfApi (replaced
    here). The real upload is not exercised by the tests."""
    import huggingface_hub

    from vispo.train.export import ExportError, push_to_hub

    cfg, _ = runs["tiny:qwen2_5_vl"]
    FakeApi.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    code = main(
        [
            "export",
            cfg.train.out_dir,
            str(tmp_path / "hub"),
            "--push-to-hub",
            "me/tiny",
            "--private",
        ]
    )
    assert code == 0
    assert "uploaded to https://huggingface.co/me/tiny" in capsys.readouterr().out
    (name1, create), (name2, upload) = FakeApi.calls
    assert name1 == "create_repo" and name2 == "upload_folder"
    assert create == {"repo_id": "me/tiny", "repo_type": "model", "private": True, "exist_ok": True}
    assert upload["folder_path"] == str(tmp_path / "hub") and upload["repo_id"] == "me/tiny"
    assert {"README.md", "config.json", "model.safetensors", "processor_config.json"} <= set(
        upload["files"]
    )
    with pytest.raises(ExportError, match="owner/name"):
        push_to_hub(tmp_path / "hub", "not a repo", api=FakeApi())
    FakeApi.calls = []
    assert main(["export", cfg.train.out_dir, str(tmp_path / "h2"), "--push-to-hub", "bad"]) == 2
    assert "error: --push-to-hub: 'bad' is not a repository id" in capsys.readouterr().err
    assert FakeApi.calls == []


def test_model_card_reads_the_final_evaluation_from_the_metrics(tmp_path):
    """With save_every=1 the last checkpoint is written before the final held-out evaluation:
    the card takes that value from metrics.jsonl; an earlier step's card has no 'after'."""
    from vispo.train.export import export_run

    cfg = _train(tmp_path, "tiny:qwen2_vl", "train.save_every=1")
    logged = [
        json.loads(x)
        for x in (tmp_path / "tiny-qwen2_vl" / "metrics.jsonl").read_text().splitlines()
    ]
    final = [r for r in logged if "eval/accuracy_after" in r]
    assert len(final) == 1 and final[0]["step"] == 2
    last = export_run(cfg.train.out_dir, tmp_path / "e2")
    state = json.loads((last.checkpoint / "state.json").read_text())
    assert "accuracy_after" not in state["eval"]
    card = (last.path / "README.md").read_text()
    assert f"after RL, step 2 (greedy) | {final[0]['eval/accuracy_after']:.3f}" in card
    assert "Held-out set: at most 3 questions of `easy-vqa` split `test`" in card
    first = (export_run(cfg.train.out_dir, tmp_path / "e1", step=1).path / "README.md").read_text()
    assert "held-out accuracy before RL (greedy)" in first and "after RL" not in first
