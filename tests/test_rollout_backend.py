"""The rollout backend interface: a backend with its own copy of the weights (as a vLLM
engine has) plugs in through ``rollout.backend`` and, synced after every update, trains
exactly like the default backend."""

import textwrap

import pytest
import torch
from test_train_e2e import _cfg, _trainer

from vispo.rollout import HFBackend, RolloutBackend, load_backend
from vispo.train.config import ConfigError, load_config

BACKEND_MODULE = textwrap.dedent(
    '''
    import copy

    from vispo.rollout import HFBackend

    SYNCS = []


    class OwnWeights:
        """Generates with a private copy of the policy, refreshed by sync_weights."""

        def __init__(self, model, processor, autocast=None):
            self.engine_model = copy.deepcopy(model).eval()
            self.inner = HFBackend(self.engine_model, processor, autocast=autocast)

        def generate(self, prompts, **kw):
            return self.inner.generate(prompts, **kw)

        def sync_weights(self, model):
            self.engine_model.load_state_dict(model.state_dict())
            SYNCS.append(1)


    class Stale(OwnWeights):
        def sync_weights(self, model):
            SYNCS.append(0)


    def not_a_backend(model, processor, autocast=None):
        return object()
    '''
)


@pytest.fixture
def backend_module(tmp_path, monkeypatch):
    (tmp_path / "my_engine.py").write_text(BACKEND_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    import my_engine

    my_engine.SYNCS.clear()
    yield my_engine


def test_a_backend_with_its_own_weights_trains_like_the_default(tmp_path, backend_module):
    extra = ("train.steps=3", "rollout.batch_invariant=true")
    default = _trainer(_cfg(tmp_path / "hf", "grpo", *extra))
    assert isinstance(default.rollout_backend, HFBackend)
    reference = default.train()

    trainer = _trainer(
        _cfg(tmp_path / "own", "grpo", *extra, "rollout.backend=my_engine:OwnWeights")
    )
    assert isinstance(trainer.rollout_backend, RolloutBackend)
    history = trainer.train()
    assert backend_module.SYNCS == [1, 1, 1]  # once per update
    for a, b in zip(reference, history):
        assert b["reward/mean"] == a["reward/mean"]
        assert b["loss/total"] == pytest.approx(a["loss/total"], abs=1e-6)
    engine = trainer.rollout_backend.engine_model.state_dict()
    for name, value in trainer.model.state_dict().items():
        assert torch.equal(engine[name], value), name


def test_without_the_sync_the_engine_samples_from_stale_weights(tmp_path, backend_module):
    """The control: the same engine never refreshed keeps the initial weights."""
    cfg = _cfg(tmp_path, "grpo", "train.steps=2", "rollout.backend=my_engine:Stale")
    trainer = _trainer(cfg)
    initial = {k: v.clone() for k, v in trainer.rollout_backend.engine_model.state_dict().items()}
    trainer.train()
    moved = [k for k, v in trainer.model.state_dict().items() if not torch.equal(v, initial[k])]
    assert moved and backend_module.SYNCS == [0, 0]
    for k, v in trainer.rollout_backend.engine_model.state_dict().items():
        assert torch.equal(v, initial[k])


def test_bad_backend_specs_fail_clearly(tmp_path, backend_module):
    with pytest.raises(ConfigError, match="rollout.backend"):
        load_config(None, ["rollout.backend=vllm"])
    model = torch.nn.Linear(1, 1)
    with pytest.raises(ValueError, match="cannot be loaded"):
        load_backend("my_engine:Missing", model, None)
    with pytest.raises(ValueError, match="cannot be loaded"):
        load_backend("no_such_module_xyz:Engine", model, None)
    with pytest.raises(TypeError, match="lacks generate"):
        load_backend("my_engine:not_a_backend", model, None)
