"""Security defaults, each asserted (issue 10).

- Checkpoints are safetensors + JSON only: no pickle anywhere in a run folder, no torch.save.
- Every torch.load in the package passes weights_only=True.
- trust_remote_code is off unless the config sets it, and a model folder's own code never runs
  by default.
- Reward files load only from the path the user names (never by module name or sys.path).
- Nothing is downloaded at run time unless the user names a hub id: a tiny training run with a
  socket guard makes no connection; local-looking names and URLs are refused, not fetched.
- Config files are read with yaml.safe_load; prompt templates render in Jinja's sandbox; user
  reward files run in a sandboxed worker by default.
"""

from __future__ import annotations

import ast
import functools
import json
import socket
import struct
import sys
import urllib.request
from pathlib import Path

import jinja2
import pytest
import torch
from safetensors import safe_open

import vispo
from vispo.data import DataError, Sample, get_template, load_samples
from vispo.models import build_tiny_vlm
from vispo.rewards import RewardRunner, load_reward_fn
from vispo.train import setup as train_setup
from vispo.train.checkpoint import save_checkpoint
from vispo.train.config import ConfigError, ModelConfig, RewardConfig, load_config
from vispo.train.optim import build_optimizer
from vispo.train.trainer import Trainer
from vispo.vision import ImageLoadError, load_image

PACKAGE = Path(vispo.__file__).resolve().parent
SOURCES = sorted(PACKAGE.rglob("*.py"))
PICKLE_MAGIC = (b"\x80",)  # protocol 2+ pickles (and torch's legacy format) start with 0x80
ZIP_MAGIC = b"PK\x03\x04"  # torch.save's default format is a zip of pickles


@functools.cache
def _source(path: Path) -> tuple[str, ast.AST]:
    text = path.read_text()
    return text, ast.parse(text)


def _calls(tree: ast.AST, module: str, name: str) -> list[ast.Call]:
    """Calls of ``module.name(...)`` or of ``name`` imported ``from module import name``."""
    local = {
        alias.asname or alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module == module
        for alias in node.names
        if alias.name == name
    }
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        if (
            isinstance(f, ast.Attribute)
            and f.attr == name
            and isinstance(f.value, ast.Name)
            and f.value.id == module
        ) or (isinstance(f, ast.Name) and f.id in local):
            found.append(node)
    return found


def _imports(path: Path) -> set[str]:
    """Top-level names of the modules a file imports."""
    names = set()
    for node in ast.walk(_source(path)[1]):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module.split(".")[0])
    return names


def _unsafe_torch_loads(tree: ast.AST) -> list[int]:
    """Line numbers of torch.load calls without a literal weights_only=True."""
    bad = []
    for call in _calls(tree, "torch", "load"):
        safe = any(
            kw.arg == "weights_only"
            and isinstance(kw.value, ast.Constant)
            and kw.value.value is True
            for kw in call.keywords
        )
        if not safe:
            bad.append(call.lineno)
    return bad


# --- checkpoints: safetensors + JSON, never pickle -------------------------------------------


def test_a_checkpoint_is_safetensors_and_json_only(tmp_path):
    model, _ = build_tiny_vlm("qwen2_vl")
    opt = build_optimizer(model, lr=1e-3, weight_decay=0.01, betas=(0.9, 0.999))
    model.lm_head.weight.sum().backward()
    opt.step()  # so that the optimizer has state to save
    path = save_checkpoint(tmp_path, 3, model=model, optimizer=opt, state={}, keep_last=1)
    files = sorted(p for p in path.rglob("*") if p.is_file())
    assert {p.suffix for p in files} == {".safetensors", ".json"}
    for p in files:
        head = p.read_bytes()[:8]
        assert not head.startswith(PICKLE_MAGIC) and not head.startswith(ZIP_MAGIC), p
        if p.suffix == ".json":
            json.loads(p.read_text())
        else:
            # safetensors layout: u64 little-endian header size, then a JSON header.
            (size,) = struct.unpack("<Q", head)
            header = json.loads(p.read_bytes()[8 : 8 + size])
            assert all(v.get("dtype") for k, v in header.items() if k != "__metadata__")
            with safe_open(str(p), framework="pt") as f:
                assert list(f.keys())
    assert {p.name for p in files} >= {
        "weights.safetensors",
        "optimizer.safetensors",
        "optimizer.json",
        "rng-rank0.safetensors",
        "rng-rank0.json",
        "state.json",
    }


def test_the_package_never_pickles_to_disk():
    """No torch.save and no pickle.dump(s) to files; the only pickle use is the reward
    sandbox sending the reward function to its own worker processes over a socket (and the
    worker reading it back)."""
    users = {}
    for path in SOURCES:
        tree = _source(path)[1]
        if _calls(tree, "torch", "save"):
            users.setdefault("torch.save", []).append(path.name)
        if _calls(tree, "pickle", "dump") or _calls(tree, "pickle", "load"):
            users.setdefault("pickle file I/O", []).append(path.name)
    assert users == {}
    pickling = [p.relative_to(PACKAGE).as_posix() for p in SOURCES if "pickle" in _imports(p)]
    assert sorted(pickling) == ["rewards/_worker.py", "rewards/sandbox.py"]


# --- torch.load --------------------------------------------------------------------------------


def test_every_torch_load_in_the_package_uses_weights_only():
    offenders = {
        p.relative_to(PACKAGE).as_posix(): lines
        for p in SOURCES
        if (lines := _unsafe_torch_loads(_source(p)[1]))
    }
    assert offenders == {}


def test_the_torch_load_check_catches_unsafe_calls():
    """The scanner above is not vacuous: it flags each unsafe form and passes the safe one."""
    source = "\n".join(
        [
            "import torch",
            "from torch import load as tl",
            "torch.load('a.pt')",  # line 3: default
            "torch.load('a.pt', weights_only=False)",  # line 4
            "tl('a.pt')",  # line 5: imported under another name
            "torch.load('a.pt', weights_only=True)",  # line 6: safe
            "flag = True",
            "torch.load('a.pt', weights_only=flag)",  # line 8: not a literal True
        ]
    )
    assert _unsafe_torch_loads(ast.parse(source)) == [3, 4, 5, 8]


# --- trust_remote_code -------------------------------------------------------------------------


def test_trust_remote_code_is_off_by_default_and_passed_through(tmp_path, monkeypatch):
    from transformers import AutoModelForImageTextToText

    assert load_config(None, []).model.trust_remote_code is False
    model, processor = build_tiny_vlm("qwen2_vl")
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    seen = []
    original = AutoModelForImageTextToText.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        seen.append(kwargs.get("trust_remote_code", "absent"))
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(AutoModelForImageTextToText, "from_pretrained", classmethod(spy))
    train_setup.load_model(ModelConfig(name_or_path=str(folder)))
    cfg = load_config(None, [f"model.name_or_path={folder}", "model.trust_remote_code=true"])
    train_setup.load_model(cfg.model)
    assert seen == [False, True]


def test_a_model_folders_own_code_does_not_run_by_default(tmp_path):
    """A folder whose config.json points (auto_map) at its own Python file: loading it with
    the default config must not execute that file."""
    model, processor = build_tiny_vlm("qwen2_vl")
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    marker = tmp_path / "remote-code-ran"
    (folder / "evil.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\n"
        "from transformers import Qwen2VLForConditionalGeneration as EvilModel\n"
    )
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModelForImageTextToText": "evil.EvilModel"}
    (folder / "config.json").write_text(json.dumps(config))
    try:
        loaded, _ = train_setup.load_model(ModelConfig(name_or_path=str(folder)))
    except (ValueError, OSError):
        loaded = None  # refusing the folder is also safe
    assert not marker.exists()
    if loaded is not None:
        assert type(loaded).__module__.startswith("transformers.")


# --- reward files ------------------------------------------------------------------------------


def test_reward_files_load_only_from_the_named_path(tmp_path, monkeypatch):
    decoys = tmp_path / "on_sys_path"
    decoys.mkdir()
    (decoys / "fault_decoy_reward.py").write_text(
        "def score(completions, answers, **kw):\n    return [0.25] * len(completions)\n"
    )
    monkeypatch.syspath_prepend(str(decoys))
    real = tmp_path / "real"
    real.mkdir()
    (real / "fault_decoy_reward.py").write_text(
        "def score(completions, answers, **kw):\n    return [0.75] * len(completions)\n"
    )
    fn = load_reward_fn(f"{real / 'fault_decoy_reward.py'}:score")
    assert fn(["a", "b"], ["x", "y"]) == [0.75, 0.75]
    # A relative path is relative to the working directory, not to sys.path.
    monkeypatch.chdir(tmp_path)
    assert load_reward_fn("real/fault_decoy_reward.py:score")(["a"], ["x"]) == [0.75]
    # A name that only exists as an importable module is not imported.
    with pytest.raises(FileNotFoundError):
        load_reward_fn("elsewhere/fault_decoy_reward.py:score")
    for spec in ("fault_decoy_reward:score", "os.path:join", "json.py:loads"):
        with pytest.raises((ValueError, FileNotFoundError)):
            load_reward_fn(spec)
    assert "fault_decoy_reward" not in sys.modules


def test_user_reward_files_run_sandboxed_by_default(tmp_path, monkeypatch):
    spec = f"{tmp_path / 'r.py'}:score"
    (tmp_path / "r.py").write_text("def score(c, a, **k):\n    return [1.0] * len(c)\n")
    made = []

    class Recorder:
        def __init__(self, name, **kwargs):
            made.append((name, kwargs["num_workers"]))

    monkeypatch.setattr(train_setup, "RewardRunner", Recorder)
    train_setup.load_reward(RewardConfig(name=spec))  # default: a worker, with a timeout
    train_setup.load_reward(RewardConfig(name="reference"))  # built-in: in-process
    train_setup.load_reward(RewardConfig(name=spec, num_workers=0))  # explicit opt-out
    assert made == [(spec, 1), ("reference", 0), (spec, 0)]


LEAK_PROBE = """
import os, socket


def leak(completions, answers, **columns):
    port = int(completions[0])
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
        connected = 1.0
    except OSError:
        connected = 0.0
    return [float("VISPO_SECURITY_SECRET" in os.environ), connected]
"""


def test_a_reward_worker_gets_no_secret_and_no_network_by_default(tmp_path, monkeypatch):
    """The defaults of the sandbox: the trainer's environment variables stay out of the worker
    and a server the trainer reaches on 127.0.0.1 is unreachable from it (docs/reliability.md,
    "Reward isolation"; tests/faults/test_faults_rewards.py probes the rest)."""
    (tmp_path / "leak.py").write_text(LEAK_PROBE)
    monkeypatch.setenv("VISPO_SECURITY_SECRET", "hunter2")
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    socket.create_connection(("127.0.0.1", port), timeout=2).close()  # reachable from here
    try:
        with RewardRunner(f"{tmp_path / 'leak.py'}:leak", num_workers=1) as runner:
            secret, connected = runner([str(port), ""], ["", ""]).total
            notes = runner.isolation_notes
    finally:
        server.close()
    assert secret == 0.0
    assert connected == 0.0 or any("network not isolated" in n for n in notes), notes


# --- no downloads ------------------------------------------------------------------------------


class SocketGuard:
    """Records every attempt to open a network connection or resolve a host, and refuses it."""

    def __init__(self, monkeypatch):
        self.attempts: list[str] = []
        guard = self

        def refuse(what):
            def blocked(*args, **kwargs):
                guard.attempts.append(f"{what}{args[1:] if what.startswith('socket.') else args}")
                raise OSError(f"network access blocked by the test ({what})")

            return blocked

        monkeypatch.setattr(socket.socket, "connect", refuse("socket.connect"))
        monkeypatch.setattr(socket.socket, "connect_ex", refuse("socket.connect_ex"))
        monkeypatch.setattr(socket, "create_connection", refuse("create_connection"))
        monkeypatch.setattr(socket, "getaddrinfo", refuse("getaddrinfo"))


def test_the_socket_guard_sees_a_connection_attempt(monkeypatch):
    guard = SocketGuard(monkeypatch)
    with pytest.raises(OSError):
        urllib.request.urlopen("http://example.com/", timeout=1)
    assert guard.attempts


def parity(completions, answers, **columns):
    return [float(len(c) % 2 == 0) for c in completions]


def test_a_tiny_training_run_opens_no_connection(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # would hide attempts; the guard sees all
    guard = SocketGuard(monkeypatch)
    cfg = load_config(
        None,
        [
            "objective.name=papo_g",
            "model.name_or_path=tiny:qwen2_vl",
            "data.limit=8",
            "data.eval_size=2",
            "train.steps=1",
            "train.prompts_per_step=2",
            "rollout.n=2",
            "rollout.max_new_tokens=4",
            "logging.progress=false",
            "train.samples_every=1",
            f"train.out_dir={tmp_path / 'run'}",
        ],
    )
    trainer = Trainer(cfg)  # default reward ("reference": math-verify), built-in easy-vqa
    history = trainer.train()
    assert len(history) == 1 and "accuracy_after" in trainer.eval_results
    assert guard.attempts == []
    for p in (tmp_path / "run").rglob("*"):  # and the run folder holds no pickle either
        if p.is_file():
            head = p.read_bytes()[:4]
            assert not head.startswith(PICKLE_MAGIC) and head != ZIP_MAGIC, p


def test_names_that_are_not_hub_ids_are_never_fetched(tmp_path, monkeypatch):
    guard = SocketGuard(monkeypatch)
    with pytest.raises(DataError, match="hub:org/name"):
        load_samples("someorg/somedata")  # looks like a hub id, but no "hub:" prefix
    with pytest.raises(ImageLoadError, match="never downloads"):
        load_image("https://example.com/cat.png")
    assert guard.attempts == []


# --- configs and templates ---------------------------------------------------------------------


def test_config_files_never_run_code(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.yaml"
    path.write_text(
        "train:\n  steps: !!python/object/apply:os.system ['touch " + str(marker) + "']\n"
    )
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)
    assert not marker.exists()
    unsafe = [
        p.name
        for p in SOURCES
        for call in ("yaml.load(", "yaml.unsafe_load(", "yaml.full_load(", "yaml.Loader")
        if call in _source(p)[0]
    ]
    assert unsafe == []


def test_prompt_templates_render_in_a_sandbox():
    template = get_template("{{ question.__class__.__mro__[1].__subclasses__() }}")
    sample = Sample(id="s", images=[], question="q", answer="a")
    with pytest.raises(jinja2.exceptions.SecurityError):
        template.render(sample)


def test_torch_load_of_a_pickle_payload_is_refused_with_weights_only(tmp_path):
    """What weights_only=True buys: a checkpoint carrying code is refused, not executed."""
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"x": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(Exception, match="[Ww]eights only load failed|Unsupported global"):
        torch.load(tmp_path / "evil.pt", weights_only=True)
    assert not marker.exists()


def test_reward_runner_refuses_fork(tmp_path):
    with pytest.raises(ValueError, match="fork"):
        RewardRunner(parity, num_workers=1, mp_context="fork")
