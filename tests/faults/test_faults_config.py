"""Hypothesis-generated configs: only ever a ConfigError, and its message names the field.

Three generators: nested YAML-like trees for ``build_config`` (real and made-up sections and
fields, values of every YAML type, non-string keys, non-mapping sections); ``section.field=value``
override strings for ``load_config`` (real and made-up keys, YAML and non-YAML values, strings
without '=' or '.'); and one real field at a time set to a random value, where the message must
name exactly that field. Whatever they produce may be accepted (then it is a valid Config) or
rejected, but never with another exception type: for the CLI that is the difference between
"invalid config: <field>: <why>" and a traceback.
"""

from __future__ import annotations

import typing
from dataclasses import fields

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vispo.algos import ObjectiveConfig
from vispo.train.config import SECTIONS, Config, ConfigError, build_config, load_config

pytestmark = pytest.mark.faults

SCHEMA: dict[str, list[str]] = {
    name: [f.name for f in fields(typing.get_type_hints(Config)[name])] for name in SECTIONS
}
SCHEMA["objective"] = [f.name for f in fields(ObjectiveConfig)] + ["name"]
REAL_FIELDS = [(s, f) for s, names in SCHEMA.items() for f in names]
EXAMPLES = 400

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["nan", "inf", "-inf", "1e999", "none", "null", "true", "{", "[1", "0x10"]),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=6,
)
plausible = st.one_of(
    st.integers(min_value=-2, max_value=300),
    st.floats(min_value=-0.5, max_value=2.0),
    st.booleans(),
    st.sampled_from(["group", "token-mean", "k3", "sampled", "skip", "raise", "cpu", "warn"]),
)
identifiers = st.text(
    alphabet=st.characters(min_codepoint=32, max_codepoint=126), min_size=0, max_size=10
)
section_names = st.one_of(st.sampled_from(list(SCHEMA)), identifiers)
field_names = st.one_of(st.sampled_from(sorted({f for _, f in REAL_FIELDS})), identifiers)
keys = st.one_of(field_names, st.integers(), st.none(), st.booleans())
sections = st.one_of(st.dictionaries(keys, values, max_size=4), values)
trees = st.dictionaries(st.one_of(section_names, st.integers(), st.none()), sections, max_size=4)


def _text(value) -> str:
    """How a key or value may appear in a message."""
    return value if isinstance(value, str) else repr(value)


def _names_something(message: str, candidates: set[str]) -> bool:
    return any(c and c in message for c in candidates)


def _tree_candidates(tree: dict) -> set[str]:
    out = set()
    for sec, body in tree.items():
        out |= {_text(sec), repr(sec)}
        if isinstance(body, dict):
            for key in body:
                out |= {f"{_text(sec)}.{_text(key)}", f"{sec}.{key}"}
    return out


class Tally:
    """Counts examples and how many met the property (for the fault table)."""

    def __init__(self):
        self.tried = self.held = 0
        self.accepted = 0


def _check(call, candidates: set[str], tally: Tally, exact: tuple | None = None) -> None:
    tally.tried += 1
    try:
        cfg = call()
    except ConfigError as e:
        message = str(e)
        if exact is not None:  # "sec.name", or a joint message like "sec.low/name must ..."
            sec, name = exact
            assert f"{sec}.{name}" in message or (f"{sec}." in message and name in message), message
        else:
            assert _names_something(message, candidates), message
    else:
        assert isinstance(cfg, Config)
        tally.accepted += 1
    tally.held += 1


def _run(fault_table, what: str, inner, tally: Tally) -> None:
    try:
        inner()
    finally:
        fault_table(
            "config",
            what,
            tally.tried,
            tally.held,
            lost="-",
            detail=f"{tally.accepted} accepted as valid, the rest a ConfigError naming the field",
        )


_settings = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


def test_random_trees_through_build_config(fault_table):
    tally = Tally()

    @_settings
    @given(trees)
    def prop(tree):
        _check(lambda: build_config(tree), _tree_candidates(tree), tally)

    _run(fault_table, "random config trees -> build_config", prop, tally)


def test_random_overrides_through_load_config(fault_table):
    tally = Tally()
    real_keys = st.sampled_from([f"{s}.{f}" for s, f in REAL_FIELDS])
    made_up = st.builds(lambda s, f: f"{s}.{f}", section_names, field_names)
    raw_values = st.one_of(
        identifiers, values.map(lambda v: yaml.safe_dump(v, default_flow_style=True).strip())
    )
    overrides = st.lists(
        st.one_of(
            st.builds(lambda k, v: f"{k}={v}", st.one_of(real_keys, made_up), raw_values),
            identifiers,  # no '=' or no '.'
        ),
        max_size=4,
    )

    @_settings
    @given(overrides)
    def prop(items):
        candidates = set(items) | {repr(item) for item in items}
        for item in items:
            key = item.split("=", 1)[0]
            candidates |= {key.strip(), key.strip().split(".")[0]}
            candidates |= {repr(key.strip().split(".")[0])}
            candidates |= {".".join(key.strip().split(".")[:2])}
        _check(lambda: load_config(None, items), candidates, tally)

    _run(fault_table, "random section.field=value overrides -> load_config", prop, tally)


def test_one_real_field_at_a_time_names_exactly_that_field(fault_table):
    tally = Tally()

    @_settings
    @given(st.sampled_from(REAL_FIELDS), st.one_of(plausible, values))
    def prop(field, value):
        sec, name = field
        _check(
            lambda: build_config({sec: {name: value}}),
            set(),
            tally,
            exact=(sec, name),
        )

    _run(fault_table, "one real field, random value -> build_config", prop, tally)


@pytest.mark.parametrize(
    "override, field",
    [
        ("train.steps=.inf", "train.steps"),
        ("train.steps=.nan", "train.steps"),
        ("optim.lr=.nan", "optim.lr"),
        ("objective.beta=.nan", "objective.beta"),
        ("objective.name=[1]", "objective.name"),
        ("data.columns={a", "data.columns"),
        ("optim.beta2=1.5", "optim.beta2"),
        ("data.limit=-3", "data.limit"),
    ],
)
def test_known_bad_values_name_their_field(override, field):
    """Regression cases found by the properties above (each was a traceback or accepted)."""
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert str(info.value).startswith(field), str(info.value)


def test_a_jinja_template_override_is_kept_as_text():
    """A value that is not valid YAML is the literal string (here a Jinja template)."""
    cfg = load_config(None, ["data.template={{ question }} Answer briefly."])
    assert cfg.data.template == "{{ question }} Answer briefly."
    # Every float field must be finite (guard.enabled=false, not an infinite threshold, turns
    # the guard off).
    with pytest.raises(ConfigError, match=r"^guard\.z_threshold: must be a finite number"):
        load_config(None, ["guard.z_threshold=.inf"])
