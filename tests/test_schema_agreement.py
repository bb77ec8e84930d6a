"""The published JSON Schema and the validator agree (issue 14, point 6): an editor that checks a config against
schemas/tunefile.schema.json never promises what compile refuses, nor refuses what compile accepts.

Property tests over configs made from valid seeds (MINIMAL, examples/, tests/golden_configs/):

- acceptance: set a few keys to values drawn from the schema or from anything YAML can hold; whenever the
  validator accepts the config, jsonschema accepts it too;
- rejection: change one key (a wrong type, a number out of range, a value outside an enum, an unknown key, a
  required key removed); when the schema-level step of validate refuses it (Axolotl's dialect, then the pydantic
  models, then the "datasets or pretraining_dataset" check), jsonschema refuses it too, and when jsonschema
  refuses it, compile refuses it as well. The cross-field rules (compiler/rules.py) may refuse more than the
  schema: they are not schema-level.
"""

from __future__ import annotations

import copy
import json
import math
from typing import Any

import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from helpers import GOLDEN_CONFIGS, MINIMAL, REPO
from tunefile.compiler.dialect.normalize import dialect_keys, read_axolotl, spec_keys
from tunefile.compiler.errors import ConfigError
from tunefile.compiler.loader import Document, load_document
from tunefile.compiler.spec import DatasetSpec, FsdpConfig, Spec
from tunefile.compiler.validate import validate_document

SCHEMA = json.loads((REPO / "schemas" / "tunefile.schema.json").read_text(encoding="utf-8"))
VALIDATOR = jsonschema.Draft202012Validator(SCHEMA)
TOP = SCHEMA["properties"]
DEFINITIONS = SCHEMA["$defs"]
EXAMPLES = 1000  # per property; the file runs in about 30 s on two busy cores


def _parsed(text: str) -> dict[str, Any]:
    return load_document(text, "seed.yml").data  # tunefile's YAML reading: 2e-4 is a number there


def _accepted(data: dict[str, Any]) -> bool:
    try:
        validate_document(Document(name="c.yml", data=copy.deepcopy(data)))
    except ConfigError:
        return False
    return True


SEED_FILES = [*sorted(GOLDEN_CONFIGS.glob("*.yml")),
              *(REPO / "examples" / name for name in ("demo.yml", "llama3-lora.yml", "multi-gpu-fsdp2.yml"))]
SEEDS = [seed for seed in [_parsed(MINIMAL), *(_parsed(path.read_text(encoding="utf-8")) for path in SEED_FILES)]
         if _accepted(seed)]


def test_the_seeds_are_valid_configs_of_every_kind() -> None:
    assert len(SEEDS) == 1 + len(SEED_FILES), "MINIMAL and every golden config and example config should validate"
    assert all(VALIDATOR.is_valid(seed) for seed in SEEDS)


# --- values --------------------------------------------------------------------------------------------------

_NAMES = st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=12)
_SCALARS = st.one_of(
    st.none(), st.booleans(),
    st.integers(min_value=-3, max_value=70_000), st.sampled_from([2**32, 10**12, 10**400, -(10**9)]),
    # NaN aside: JSON has no NaN and JSON Schema cannot refuse it (every comparison with NaN is false); compile
    # refuses it (test_numbers_that_are_not_finite_are_refused).
    st.floats(allow_nan=False, allow_infinity=True), st.sampled_from([0.0, 1.0, 8.0, 0.5, 1e300]),
    _NAMES, st.sampled_from(["", "auto", "8B", "true", "1", "none", "lora", "alpaca"]),
)
# Anything a YAML file can hold (dates aside, which no key accepts and JSON cannot spell).
ANY_VALUE = st.recursive(_SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(_NAMES, inner, max_size=3)), max_leaves=6)


def _resolved(node: dict[str, Any]) -> dict[str, Any]:
    ref = node.get("$ref")
    return DEFINITIONS[ref.rsplit("/", 1)[-1]] if ref else node


def schema_values(node: dict[str, Any]) -> st.SearchStrategy[Any]:
    """Values the schema allows at NODE, edges of its ranges included (then the validator decides)."""
    node = _resolved(node)
    if "anyOf" in node:
        return st.one_of([schema_values(option) for option in node["anyOf"]])
    if "enum" in node:
        return st.sampled_from(node["enum"])
    if "const" in node:
        return st.just(node["const"])
    kind = node.get("type")
    if isinstance(kind, list):
        return st.one_of([schema_values({**node, "type": one}) for one in kind])
    if kind == "integer":
        low, high = node.get("minimum", -5), node.get("maximum", 10**6)
        return st.one_of(st.sampled_from([low, high]), st.integers(low, high))
    if kind == "number":
        low = node.get("minimum", node.get("exclusiveMinimum", -1e6))
        high = node.get("maximum", node.get("exclusiveMaximum", 1e6))
        return st.floats(low, high, exclude_min="exclusiveMinimum" in node, exclude_max="exclusiveMaximum" in node,
                         allow_nan=False)
    if kind == "boolean":
        return st.booleans()
    if kind == "string":
        return st.text(alphabet="abcdefghij-_./:0123456789", min_size=node.get("minLength", 0), max_size=10)
    if kind == "null":
        return st.none()
    if kind == "array":
        return st.lists(schema_values(node.get("items", {})), min_size=node.get("minItems", 0), max_size=2)
    if kind == "object" and "properties" in node:
        return st.fixed_dictionaries({}, optional={name: schema_values(prop)
                                                   for name, prop in list(node["properties"].items())[:12]})
    return ANY_VALUE


def values_for(key: str, node: dict[str, Any]) -> st.SearchStrategy[Any]:
    """Mostly what the schema allows (so that many configs pass and the acceptance direction is tested often), and
    now and then anything at all."""
    return st.integers(0, 3).flatmap(lambda pick: ANY_VALUE if pick == 0 else schema_values(node))


# --- configs -------------------------------------------------------------------------------------------------

# Where a change may land: the top level, the first entry of datasets or pretraining_dataset, two mappings.
PLACES = {(): TOP, ("datasets", 0): DEFINITIONS["DatasetSpec"]["properties"],
          ("pretraining_dataset", 0): DEFINITIONS["PretrainingDatasetSpec"]["properties"],
          ("fsdp_config",): DEFINITIONS["FsdpConfig"]["properties"], ("qat",): DEFINITIONS["QatConfig"]["properties"]}


@st.composite
def changes(draw: st.DrawFn) -> tuple[tuple[Any, ...], str, Any]:
    """(where, key, value): a key of the schema, or now and then a key nobody knows, with a value."""
    where = draw(st.sampled_from(sorted(PLACES)))
    properties = PLACES[where]
    unknown = draw(st.integers(0, 7)) == 0
    key = draw(_NAMES.map(lambda name: name + "_x") if unknown else st.sampled_from(sorted(properties)))
    value = draw(values_for(key, properties[key]) if key in properties else ANY_VALUE)
    return where, key, value


def _container(config: dict[str, Any], where: tuple[Any, ...]) -> dict[str, Any] | None:
    node: Any = config
    for part in where:
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int) and part < len(node):
            node = node[part]
        elif isinstance(node, dict) and isinstance(part, str):
            node = node.setdefault(part, {})
        else:
            return None
    return node if isinstance(node, dict) else None


def changed(seed: dict[str, Any], edits: list[tuple[tuple[Any, ...], str, Any]]) -> dict[str, Any]:
    config = copy.deepcopy(seed)
    for where, key, value in edits:
        container = _container(config, where)
        if container is not None:
            container[key] = value
    return config


# --- verdicts ------------------------------------------------------------------------------------------------

# Dialect problems about two keys together: no schema of one key can state them.
_CROSS_FIELD = ("contradicts", "disagree")


def refused_at_schema_level(config: dict[str, Any]) -> list[str]:
    """Why the schema-level step of validate refuses CONFIG (dialect, pydantic, required data); [] if it does not."""
    try:
        reading = read_axolotl(copy.deepcopy(config))
    except ConfigError as exc:  # a kind of training tunefile does not do
        return [problem.message for problem in exc.problems]
    reasons = [problem.message for problem in reading.problems
               if not any(word in problem.message for word in _CROSS_FIELD)]
    if not reading.data.get("datasets") and not reading.data.get("pretraining_dataset"):
        reasons.append("required key `datasets` is missing")
    try:
        Spec.model_validate(reading.data)
    except ValidationError as exc:
        reasons += [f"{'.'.join(map(str, error['loc']))}: {error['msg']}" for error in exc.errors()]
    return reasons


def schema_errors(config: dict[str, Any]) -> list[str]:
    return [f"{'.'.join(map(str, error.absolute_path))}: {error.message[:200]}"
            for error in VALIDATOR.iter_errors(config)]


def _shown(config: dict[str, Any], base: dict[str, Any]) -> str:
    differing = {key: value for key, value in config.items() if base.get(key, object()) != value}
    return json.dumps(differing, default=repr)[:400]


PROPERTY_SETTINGS = settings(database=None, derandomize=True, max_examples=EXAMPLES, deadline=None,
                             suppress_health_check=[HealthCheck.too_slow])


@PROPERTY_SETTINGS
@given(seed=st.sampled_from(SEEDS), edits=st.lists(changes(), min_size=1, max_size=4))
def test_the_schema_accepts_every_config_the_validator_accepts(seed: dict[str, Any],
                                                               edits: list[tuple[tuple[Any, ...], str, Any]]) -> None:
    config = changed(seed, edits)
    if _accepted(config):
        assert VALIDATOR.is_valid(config), (f"compile accepts {_shown(config, seed)}, the schema refuses it: "
                                            f"{schema_errors(config)}")


@st.composite
def mutations(draw: st.DrawFn) -> tuple[dict[str, Any], dict[str, Any], str]:
    """(seed, mutated config, what was done): one schema-level change of a valid seed."""
    seed = draw(st.sampled_from(SEEDS))
    kind = draw(st.sampled_from(["value", "value", "value", "unknown key", "missing key"]))
    if kind == "missing key":
        config = copy.deepcopy(seed)
        place = draw(st.sampled_from(["base_model", "datasets", "path"]))
        if place == "path":
            entries = config.get("datasets") or config.get("pretraining_dataset") or [{}]
            entries[0].pop("path", None)
        else:
            config.pop(place, None)
        return seed, config, f"without {place}"
    where, key, value = draw(changes())
    if kind == "unknown key":
        key, value = draw(_NAMES) + "_unknown", draw(ANY_VALUE)
    return seed, changed(seed, [(where, key, value)]), f"{'.'.join(map(str, (*where, key)))} = {value!r}"


@PROPERTY_SETTINGS
@given(mutation=mutations())
def test_the_schema_refuses_what_the_validator_refuses_at_schema_level(
        mutation: tuple[dict[str, Any], dict[str, Any], str]) -> None:
    seed, config, done = mutation
    refusals = refused_at_schema_level(config)
    valid = VALIDATOR.is_valid(config)
    if refusals:
        assert not valid, f"{done}: compile refuses ({refusals[:3]}), the schema accepts it"
    if not valid:
        assert not _accepted(config), f"{done}: the schema refuses ({schema_errors(config)[:3]}), compile accepts it"


# --- each disagreement found, pinned ------------------------------------------------------------------------

BASE = _parsed(MINIMAL)


def _with(**keys: Any) -> dict[str, Any]:
    return {**copy.deepcopy(BASE), **keys}


AGREED = {
    # JSON Schema counts 8.0 as an integer: compile reads it as 8 (it refused it before).
    "8.0 in a whole-number key": (_with(lora_r=8.0, qat={"group_size": 32.0}), True),
    "8.5 in a whole-number key": (_with(lora_r=8.5), False),
    # A strict Literal[1, 2] took true as 1; the schema's enum does not.
    "true as fsdp_version": (_with(fsdp_version=True), False),
    "true as loftq_bits": (_with(adapter="lora", peft={"loftq_config": {"loftq_bits": True}}), False),
    # The dialect reads false as 0 in these keys; the schema refused it.
    "false in jagged_restart_warmup_steps": (_with(jagged_restart_warmup_steps=False), True),
    # 0 (or false) means none for the cadence keys; the schema refused both.
    "save_steps: 0": (_with(save_steps=0), True),
    "evals_per_epoch: false": (_with(evals_per_epoch=False), True),
    # validate requires datasets or pretraining_dataset, non-empty; the schema required neither.
    "datasets: []": (_with(datasets=[]), False),
    "datasets left empty": (_with(datasets=None), False),
    "no datasets, but pretraining_dataset": ({"base_model": "m", "max_steps": 3,
                                              "pretraining_dataset": [{"path": "p", "type": "pretrain",
                                                                       "text_column": "body"}]}, True),
    # Plugins tunefile does not carry out are refused; the schema allowed any string.
    "an unknown plugin": (_with(plugins=["my.Plugin"]), False),
    "a no-effect plugin": (_with(plugins=["axolotl.integrations.kernels.KernelsPlugin"]), True),
    # Axolotl's older name of context_parallel_size; the schema allowed only null and false.
    "sequence_parallel_degree: 2": (_with(sequence_parallel_degree=2), True),
    "sequence_parallel_degree: false": (_with(sequence_parallel_degree=False), False),
    # fsdp: false is off, as the dialect reader reads it.
    "fsdp: false": (_with(fsdp=False), True),
    # fsdp_config.version is read like fsdp_config.fsdp_version; the schema called it unknown.
    "fsdp_config.version: 2": (_with(fsdp_config={"version": 2}), True),
    # The dialect reader took these, which Axolotl's type (and so the schema) refuses...
    "fsdp: {}": (_with(fsdp={}), False),
    "fsdp: 0": (_with(fsdp=0), False),
    "fsdp: []": (_with(fsdp=[]), True),
    "batch_size: a string": (_with(batch_size="eight"), False),
    "batch_size: true": (_with(batch_size=True), False),
    "batch_size: 8.0": (_with(batch_size=8.0), True),
    # The schema took any whole batch_size; compile refused one read as gradient_accumulation_steps past its bound.
    "batch_size: 100,000": (_with(batch_size=100_000), False),
    "flash_attention: yes (a string)": (_with(flash_attention="yes"), False),
    "flash_attention: 1": (_with(flash_attention=1), False),
    "eval_strategy: no with eval_steps: a string": (_with(eval_strategy="no", eval_steps="often"), False),
    "save_strategy: no with save_steps: 10": (_with(save_strategy="no", save_steps=10), True),
    "expert_parallel_size: true (True == 1 in Python)": (_with(expert_parallel_size=True), False),
    "tokenizer_use_fast: 1": (_with(tokenizer_use_fast=1), False),
    "tokenizer_legacy: 1.0": (_with(tokenizer_legacy=1.0), False),
    "an unknown key left empty": (_with(lora_alpah=None), False),
    "an unknown dataset key left empty": (_with(datasets=[{"path": "p", "type": "alpaca", "feild": None}]), False),
    "sequence_parallel_degree: a string beside context_parallel_size": (
        _with(sequence_parallel_degree="two", context_parallel_size=2), False),
    # ... and refused this one, though 0 is Axolotl's default 0.0 as JSON (and so the schema) sees numbers.
    "generation_temperature: 0 (the default is 0.0)": (_with(generation_temperature=0), True),
}


@pytest.mark.parametrize("config, accepted", AGREED.values(), ids=list(AGREED))
def test_compile_and_schema_agree_on(config: dict[str, Any], accepted: bool) -> None:
    assert _accepted(config) is accepted
    assert VALIDATOR.is_valid(config) is accepted, schema_errors(config)


def _schema_keys(definition: str | None) -> set[str]:
    return set((DEFINITIONS[definition] if definition else SCHEMA)["properties"])


@pytest.mark.parametrize("fields, model, definition", [
    ((), Spec, None), (("datasets",), DatasetSpec, "DatasetSpec"),
    (("pretraining_dataset",), DatasetSpec, "PretrainingDatasetSpec"), (("fsdp_config",), FsdpConfig, "FsdpConfig")])
def test_the_reader_knows_the_keys_the_schema_lists(fields: tuple[str, ...], model: type, definition: str | None,
                                                    ) -> None:
    """An empty key the reader does not know is kept for validate to call unknown; one it knows means the
    default. Either way the schema must say the same, so both must know the same keys."""
    assert spec_keys(model) | dialect_keys()[fields] == _schema_keys(definition)


# compiler/dialect/normalize.py iterated these (TypeError, exit 3).
CRASHES = {"fsdp: 5": _with(fsdp=5), "datasets: 5": _with(datasets=5),
           "pretraining_dataset: true": _with(pretraining_dataset=True)}


@pytest.mark.parametrize("config", CRASHES.values(), ids=list(CRASHES))
def test_a_value_that_should_be_a_list_is_refused_not_a_crash(config: dict[str, Any]) -> None:
    assert not VALIDATOR.is_valid(config)
    assert not _accepted(config)


def test_numbers_that_are_not_finite_are_refused() -> None:
    for value in (math.inf, -math.inf):
        config = _with(learning_rate=value, max_grad_norm=value)
        assert not _accepted(config) and not VALIDATOR.is_valid(config), value
    assert not _accepted(_with(learning_rate=math.nan))  # the schema cannot say so: see ANY_VALUE
