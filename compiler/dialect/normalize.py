"""Axolotl's dialect → tunefile's Spec keys: the stage between load and validate.

People arrive with the configs they have, written for Axolotl as it is documented today (the version in
``axolotl_keys.json``), deprecated spellings included. This stage reads them as Axolotl would and hands
validate a mapping in tunefile's own spelling, plus what it decided on the way:

1. Empty means default. Axolotl types nearly every key ``X | None``; ``lora_r:`` with no value means "the
   default". Empty values are dropped at every depth, so no rule ever sees them as set.
2. Preference/RL, multimodal and reward-model configs are refused with one line naming the feature.
3. Older and alternative spellings are rewritten: ``flash_attention: true`` → ``attn_implementation``,
   ``message_field_role`` → ``message_property_mappings``, ``fsdp_``-prefixed ``fsdp_config`` keys, the
   ``fsdp:`` list, ``batch_size``, ``evals_per_epoch: 0``, ….
4. Axolotl keys tunefile does not carry out are accepted when they hold Axolotl's default or a value that
   changes nothing; keys that only tune Hugging Face's Trainer are accepted with a note that they have no
   effect; everything else Axolotl knows is refused with a reason. Keys nobody knows are left for validate,
   which calls them unknown.

Pure: data in, data and Problems out. Notes (accepted, rewritten) are Problems that resolve turns into
``explain`` lines.
"""

from __future__ import annotations

import json
import typing
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from typing import Any

from pydantic import BaseModel

from ..errors import ConfigError, KeyPath, Problem
from ..spec import KNOWN_PLUGINS, DatasetSpec, FsdpConfig, Spec
from .table import (
    EFFECTIVE_DEFAULTS,
    FSDP_NO_EFFECT,
    IGNORED_BY_AXOLOTL,
    NEUTRAL_VALUES,
    NO_EFFECT,
    NO_EFFECT_PLUGINS,
    OUT_OF_SCOPE,
    OUT_OF_SCOPE_DATASET_TYPES,
    PLUGIN_FEATURES,
    REFUSED,
    TUNEFILE_BNB_SETTINGS,
)
from .values import field_problem, json_equal, short, whole_number

# Legacy boolean attention flags and the attn_implementation each one means (Axolotl's own mapping).
LEGACY_ATTENTION = {"flash_attention": "flash_attention_2", "sdp_attention": "sdpa", "xformers_attention": "xformers",
                    "flex_attention": "flex_attention", "eager_attention": "eager", "sage_attention": "sage"}
LEGACY_MESSAGE_FIELDS = {"message_field_role": "role", "message_field_content": "content"}


@dataclass(frozen=True)
class AxolotlCatalogue:
    version: str
    top_level: dict[str, Any]
    datasets: dict[str, Any]
    fsdp_config: dict[str, Any]


@cache
def axolotl_catalogue() -> AxolotlCatalogue:
    """Axolotl's keys and defaults, written by bench/axolotl_keys.py from its schema."""
    text = resources.files(__package__).joinpath("axolotl_keys.json").read_text(encoding="utf-8")
    data = json.loads(text)
    return AxolotlCatalogue(data["axolotl_version"], data["top_level"], data["datasets"], data["fsdp_config"])


@dataclass
class Reading:
    """The config in tunefile's spelling, with the notes and refusals gathered on the way."""

    data: Any
    notes: list[Problem] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    # Rewritten key → the key the user wrote, so that a problem with the new key points at the old line.
    moved: dict[KeyPath, KeyPath] = field(default_factory=dict)


def read_axolotl(data: Any) -> Reading:
    """The config in tunefile's spelling; ConfigError with one line for a config of a kind tunefile does not
    train (and nothing else about it, which would not help)."""
    if not isinstance(data, dict):
        return Reading(data)
    data = drop_empty(data, Spec)
    out_of_scope = _out_of_scope(data)
    if out_of_scope:
        raise ConfigError([out_of_scope])
    reading = Reading(dict(data))
    _rewrite_spellings(reading)
    _sort_keys(reading, reading.data, (), spec_keys(Spec), axolotl_catalogue().top_level)
    for list_key in ("datasets", "pretraining_dataset"):
        entries = reading.data.get(list_key)
        if isinstance(entries, list):
            for index, entry in enumerate(entries):
                if isinstance(entry, dict):
                    _sort_keys(reading, entry, (list_key, index), spec_keys(DatasetSpec),
                               axolotl_catalogue().datasets)
    fsdp_config = reading.data.get("fsdp_config")
    if isinstance(fsdp_config, dict):
        _sort_keys(reading, fsdp_config, ("fsdp_config",), spec_keys(FsdpConfig),
                   axolotl_catalogue().fsdp_config)
    qat = reading.data.get("qat")
    if isinstance(qat, dict):
        for key in ("weight_dtype", "activation_dtype"):
            if qat.get(key) in ("fp8", "float8"):  # Axolotl's other spellings of float8_e4m3fn
                qat[key] = "float8_e4m3fn"
    _check_plugins(reading)
    return reading


def spec_keys(model: type[BaseModel]) -> set[str]:
    """The keys a config writes for this model (a field's alias where it has one)."""
    return {info.alias or name for name, info in model.model_fields.items()}


@cache
def dialect_keys() -> dict[tuple[str, ...], frozenset[str]]:
    """The keys the dialect reads at each level of a config (by the field names that lead there) beyond the Spec
    model's own: Axolotl's keys and their older spellings. The published schema lists the same keys."""
    catalogue = axolotl_catalogue()
    dataset = {*catalogue.datasets, *LEGACY_MESSAGE_FIELDS}
    fsdp_plain = {*spec_keys(FsdpConfig), *FSDP_NO_EFFECT, "version"}
    return {
        (): frozenset({*catalogue.top_level, *NO_EFFECT, *IGNORED_BY_AXOLOTL, *REFUSED, *OUT_OF_SCOPE,
                       *LEGACY_ATTENTION, "fsdp", "batch_size", "sequence_parallel_degree"}),
        ("datasets",): frozenset(dataset),
        ("pretraining_dataset",): frozenset({*dataset, "type", "text_column"}),
        ("fsdp_config",): frozenset({*catalogue.fsdp_config, *fsdp_plain, *(f"fsdp_{key}" for key in fsdp_plain)}),
    }


def drop_empty(value: Any, model: type[BaseModel] | None = None, fields: tuple[str, ...] = ()) -> Any:
    """The value without mapping entries whose value is empty (None), at every depth; but where the mapping stands
    for MODEL (reached by the field names FIELDS), an empty key neither the model nor the dialect knows is kept, so
    that validate reports it as unknown, with its "did you mean", instead of a misspelt `lora_alpah:` vanishing."""
    if isinstance(value, list):
        return [drop_empty(item, model, fields) for item in value]
    if not isinstance(value, dict):
        return value
    if model is None:
        return {key: drop_empty(item) for key, item in value.items() if item is not None}
    known = spec_keys(model) | dialect_keys().get(fields, frozenset())
    annotations = {info.alias or name: info.annotation for name, info in model.model_fields.items()}
    kept = {}
    for key, item in value.items():
        if item is not None:
            inner = _model_in(annotations[key]) if key in annotations else None
            kept[key] = drop_empty(item, inner, (*fields, key) if inner else ())
        elif key not in known:
            kept[key] = item
    return kept


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The model a field holds, alone, optional or as the items of a list (a mapping of names to anything holds
    none)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) is dict:
        return None
    return next(filter(None, map(_model_in, typing.get_args(annotation))), None)


def _out_of_scope(data: dict[str, Any]) -> Problem | None:
    for key, feature in OUT_OF_SCOPE.items():
        if key in data and data[key] is not False:
            return Problem((key,), f"{feature} ({key}: {short(data[key])}) is not supported: tunefile trains "
                           "text models with supervised fine-tuning", at_key=True)
    for index, entry in enumerate(_entries(data, "datasets")):
        kind = str(entry.get("type", "")) if isinstance(entry, dict) else ""
        family = kind.split(".")[0].split(":")[0]
        if family in OUT_OF_SCOPE_DATASET_TYPES:
            return Problem(("datasets", index, "type"), f"{OUT_OF_SCOPE_DATASET_TYPES[family]} (dataset type "
                           f"{kind}) is not supported: tunefile trains text models with supervised fine-tuning")
    return None


def _entries(data: dict[str, Any], list_key: str) -> list[Any]:
    """The entries of a list key such as ``datasets``; [] when it holds something else, which validate reports."""
    entries = data.get(list_key)
    return entries if isinstance(entries, list) else []


def _note(reading: Reading, path: KeyPath, verdict: str, reason: str) -> None:
    """A note for ``explain``: what tunefile made of the key (verdict) and why."""
    reading.notes.append(Problem(path, verdict, hint=reason, at_key=True))


# Whole-number keys whose examples write `false` for "none": Axolotl's pydantic reads a boolean as 0 there.
FALSE_AS_ZERO = ("jagged_restart_warmup_steps", "jagged_restart_anneal_steps")
# Cadence keys dropped when they hold 0 (false too, which Axolotl's pydantic reads as 0): Axolotl's "none".
ZERO_MEANS_NONE = ("evals_per_epoch", "saves_per_epoch", "eval_steps", "save_steps")
# Axolotl's switches that turn a cadence off ("no"), and the cadence keys each one makes moot.
CADENCE_SWITCHES = ((("eval_strategy", "evaluation_strategy"), ("evals_per_epoch", "eval_steps")),
                    (("save_strategy",), ("saves_per_epoch", "save_steps")))
# batch_size is read as gradient_accumulation_steps = batch_size ÷ micro_batch_size (at least 1): past this, no
# micro_batch_size gives an accumulation tunefile accepts.
BATCH_SIZE_LIMIT = next(rule.le for rule in Spec.model_fields["gradient_accumulation_steps"].metadata
                        if hasattr(rule, "le"))


def _rewrite_spellings(reading: Reading) -> None:
    data = reading.data
    # Axolotl's older name for context parallelism; it is used only when the new one is not set.
    if "sequence_parallel_degree" in data:
        degree = data.pop("sequence_parallel_degree")
        if "context_parallel_size" not in data:
            data["context_parallel_size"] = degree
            reading.moved[("context_parallel_size",)] = ("sequence_parallel_degree",)
            _note(reading, ("sequence_parallel_degree",), "read as context_parallel_size", "Axolotl's older name")
        else:  # unused, but a value context_parallel_size would refuse is refused here too, as the schema does
            problem = field_problem(Spec, "context_parallel_size", degree, ("sequence_parallel_degree",))
            if problem:
                reading.problems.append(problem)
            else:
                _note(reading, ("sequence_parallel_degree",), "no effect",
                      "context_parallel_size is set, and is the one read")
    for key in FALSE_AS_ZERO:
        if data.get(key) is False:
            data[key] = 0
            _note(reading, (key,), "read as 0", "Axolotl reads false as 0 in a whole-number key")
    # Attention: the legacy booleans become attn_implementation, as Axolotl's own validator does.
    for key, implementation in LEGACY_ATTENTION.items():
        if key not in data:
            continue
        on = data.pop(key)
        if on is not True:
            if on is not False:
                reading.problems.append(Problem((key,), f"expected true or false (got {short(on)})",
                                                hint=f"or attn_implementation: {implementation}"))
            continue
        chosen = data.get("attn_implementation")
        if chosen is None:
            data["attn_implementation"] = implementation
            reading.moved[("attn_implementation",)] = (key,)
            _note(reading, (key,), f"read as attn_implementation: {implementation}", "Axolotl's current spelling")
        elif chosen != implementation:
            reading.problems.append(Problem((key,), f"{key}: true contradicts attn_implementation: {chosen}",
                                            hint="keep attn_implementation only", at_key=True))
    # fsdp: [full_shard, auto_wrap, offload] is Axolotl's older switch for FSDP1; fsdp_config holds the rest.
    if "fsdp" in data:
        words = data.pop("fsdp")
        words = words.split() if isinstance(words, str) else words
        if not isinstance(words, list) and words is not False:  # `fsdp: false` is off, as is an empty list
            reading.problems.append(Problem(("fsdp",), f"expected a list of words such as [full_shard, auto_wrap] "
                                            f"(got {short(words)})", hint="or false for no FSDP"))
        elif words and isinstance(data.get("fsdp_config", {}), dict):  # validate reports one that is not
            settings = dict(data.get("fsdp_config") or {})
            if "offload" in words:
                settings.setdefault("offload_params", True)
            if "shard_grad_op" in words:
                settings.setdefault("sharding_strategy", "SHARD_GRAD_OP")
            data["fsdp_config"] = settings
            reading.moved.setdefault(("fsdp_config",), ("fsdp",))
            _note(reading, ("fsdp",), "read as fsdp_config", "Axolotl's older way to turn FSDP on")
    settings = data.get("fsdp_config")
    if isinstance(settings, dict):
        settings = dict(settings)
        for key in list(settings):
            if key.startswith("fsdp_"):
                plain = key.removeprefix("fsdp_")
                if plain in settings and settings[plain] != settings[key]:
                    reading.problems.append(Problem(("fsdp_config", key), f"{key} and {plain} disagree",
                                                    hint="keep one of the two spellings", at_key=True))
                settings[plain] = settings.pop(key)
                reading.moved[("fsdp_config", plain)] = ("fsdp_config", key)
        if "version" in settings:
            version = settings.pop("version")
            if data.get("fsdp_version", version) != version:
                reading.problems.append(Problem(("fsdp_config", "fsdp_version"),
                                                "fsdp_config.fsdp_version and fsdp_version disagree", at_key=True))
            data["fsdp_version"] = version
            reading.moved.setdefault(("fsdp_version",), ("fsdp_config", "fsdp_version"))
        data["fsdp_config"] = settings
    # batch_size is Axolotl's older way to say micro_batch_size × gradient_accumulation_steps.
    if "batch_size" in data:
        _read_batch_size(reading, data.pop("batch_size"))
    # Zero evaluations per epoch is Axolotl's way to say "no evaluation".
    for key in ZERO_MEANS_NONE:
        if data.get(key) == 0:
            del data[key]
            _note(reading, (key,), "none", "0 means none, as in Axolotl")
    for switches, cadence_keys in CADENCE_SWITCHES:
        switch = next((name for name in switches if name in data), None)
        # `eval_strategy: no` unquoted is YAML's false: the same wish, not a value to ignore.
        if switch is None or not (data[switch] == "no" or data[switch] is False):
            continue
        for key in cadence_keys:
            # Moot, but only a value the key takes is dropped unseen: validate refuses any other where it stands.
            if key in data and field_problem(Spec, key, data[key], (key,)) is None:
                del data[key]
                _note(reading, (key,), "no effect", f"{switch}: no")
    # Datasets: the older message keys become message_property_mappings.
    for list_key in ("datasets", "pretraining_dataset"):
        for index, entry in enumerate(_entries(data, list_key)):
            if not isinstance(entry, dict):
                continue
            legacy = {}
            for old, new in LEGACY_MESSAGE_FIELDS.items():
                if old not in entry:
                    continue
                value = entry.pop(old)
                if isinstance(value, str):
                    legacy[new] = value
                else:  # refused even where message_property_mappings already names it and it would go unused
                    reading.problems.append(Problem((list_key, index, old), f"expected a string (got {short(value)})"))
            mappings = entry.get("message_property_mappings", {})
            if legacy and isinstance(mappings, dict):  # validate refuses mappings that are not a mapping
                mappings = dict(mappings)
                for name, value in legacy.items():
                    mappings.setdefault(name, value)
                entry["message_property_mappings"] = mappings
                old = next(name for name in LEGACY_MESSAGE_FIELDS if LEGACY_MESSAGE_FIELDS[name] in legacy)
                reading.moved[(list_key, index, "message_property_mappings")] = (list_key, index, old)
                _note(reading, (list_key, index), "read message_field_role/content as message_property_mappings",
                      "Axolotl's current spelling")
            if list_key == "pretraining_dataset":
                entry.pop("type", None)  # Axolotl's pretrain type: tunefile reads these as completion text
                if "text_column" in entry and "field" not in entry:
                    entry["field"] = entry.pop("text_column")
                    reading.moved[(list_key, index, "field")] = (list_key, index, "text_column")
                elif "text_column" in entry:  # unused beside field, but checked as field would be
                    where = (list_key, index, "text_column")
                    problem = field_problem(DatasetSpec, "field", entry.pop("text_column"), where)
                    if problem:
                        reading.problems.append(problem)
                    else:
                        _note(reading, where, "no effect", "field is set, and is the one read")


def _read_batch_size(reading: Reading, written: Any) -> None:
    data = reading.data
    batch_size = whole_number(written)
    if batch_size is None:
        reading.problems.append(Problem(("batch_size",), f"expected a whole number (got {short(written)})"))
    elif batch_size > BATCH_SIZE_LIMIT:
        reading.problems.append(Problem(
            ("batch_size",), f"must be at most {BATCH_SIZE_LIMIT:,} (got {batch_size})",
            hint="it is read as gradient_accumulation_steps = batch_size ÷ micro_batch_size"))
    elif "gradient_accumulation_steps" in data:
        _note(reading, ("batch_size",), "no effect", "gradient_accumulation_steps is set, as in Axolotl")
    else:
        micro = whole_number(data.get("micro_batch_size", 1))
        if micro is None or micro < 1:
            return  # validate refuses micro_batch_size, which says what is wrong
        steps = max(1, batch_size // micro)
        data["gradient_accumulation_steps"] = steps
        reading.moved[("gradient_accumulation_steps",)] = ("batch_size",)
        _note(reading, ("batch_size",), f"read as gradient_accumulation_steps: {steps}",
              "batch_size ÷ micro_batch_size, as Axolotl does")


def _is_default(key: str, value: Any, axolotl_default: Any) -> bool:
    if json_equal(value, axolotl_default):
        return True
    if any(json_equal(value, neutral) for neutral in NEUTRAL_VALUES.get(key, ())):
        return True
    if key in EFFECTIVE_DEFAULTS and json_equal(value, EFFECTIVE_DEFAULTS[key]):
        return True
    if key == "bnb_config_kwargs" and isinstance(value, dict):
        return all(name in TUNEFILE_BNB_SETTINGS and json_equal(TUNEFILE_BNB_SETTINGS[name], setting)
                   for name, setting in value.items())
    # A flag left off is Axolotl's default whether the schema spells that default None or false.
    return value is False and axolotl_default is None


def _sort_keys(reading: Reading, mapping: dict[str, Any], path: KeyPath, ours: set[str],
               axolotl: dict[str, Any]) -> None:
    """Keep tunefile's keys; accept, note or refuse Axolotl's others; leave unknown keys for validate."""
    for key in [key for key in mapping if isinstance(key, str) and key not in ours]:
        where = (*path, key)
        value = mapping[key]
        top = not path
        no_effect = NO_EFFECT if top else FSDP_NO_EFFECT if path == ("fsdp_config",) else {}
        if key in no_effect:
            del mapping[key]
            _note(reading, where, "no effect", no_effect[key])
        elif top and key in IGNORED_BY_AXOLOTL:
            del mapping[key]
            _note(reading, where, "no effect", f"not a key of Axolotl {axolotl_catalogue().version}'s schema: "
                  "Axolotl ignores it as well")
        elif key in axolotl or (top and key in REFUSED):
            del mapping[key]
            if _is_default(key, value, axolotl.get(key)):
                _note(reading, where, "accepted", f"{short(value)} is Axolotl's default, which is what tunefile "
                      "runs")
                continue
            reason = REFUSED.get(key, "") if top else ""
            reading.problems.append(Problem(
                where, f"Axolotl's {key} is not supported by tunefile" + (f": {reason}" if reason else ""),
                hint=None if reason else "remove the line; tunefile trains without it", at_key=True))


def _check_plugins(reading: Reading) -> None:
    plugins = reading.data.get("plugins")
    if not isinstance(plugins, list):
        return
    for index, plugin in enumerate(plugins):
        if not isinstance(plugin, str):
            reading.problems.append(Problem(("plugins", index), f"expected a plugin's name (got {short(plugin)})"))
            continue
        if plugin in KNOWN_PLUGINS:
            continue
        if plugin in NO_EFFECT_PLUGINS:
            _note(reading, ("plugins", index), "no effect", NO_EFFECT_PLUGINS[plugin])
            continue
        name = str(plugin).removeprefix("axolotl.integrations.").split(".")[0]
        feature = PLUGIN_FEATURES.get(name, f"the plugin {plugin}")
        reading.problems.append(Problem(("plugins", index), f"{feature} ({plugin}) is not supported by tunefile",
                                        hint="tunefile carries out the Liger and cut-cross-entropy plugins"))
    reading.data["plugins"] = [plugin for plugin in plugins if isinstance(plugin, str) and plugin in KNOWN_PLUGINS]
