"""Values checked at the door: every number of `CalMRLConfig` and `CalMRLTrainingArguments` is converted to its
field's type (from a string too: YAML reads 7e-2 as one) and kept within its documented range, switches are
booleans, a config field set after construction is checked like one given to the constructor, and
`validate_setup` refuses empty datasets. Property-based (hypothesis) where a rule covers many values."""

from __future__ import annotations

import json
import math
import tempfile
from dataclasses import asdict

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import BertConfig

from calmrl_hf import CalMRLConfig
from calmrl_hf.training import CalMRLTrainingArguments
from calmrl_hf.training.arguments import DEFAULT_MAX_STEPS


FAST = settings(max_examples=50, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


def tiny_config(**overrides) -> CalMRLConfig:
    tower = BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                       vocab_size=50)
    kwargs = dict(modalities=["text", "subtitle"], encoder_configs={"text": tower})
    kwargs.update(overrides)
    return CalMRLConfig(**kwargs)


# The documented ranges, written out here independently of the library's tables: (type, accepts, optional).
CONFIG_RANGES = {
    "projection_dim": (int, lambda v: v >= 1, False),
    "imputer_latent_dim": (int, lambda v: v >= 1, False),
    "imputer_noise_var_floor": (float, lambda v: v > 0, False),
    "pmrl_tau1": (float, lambda v: v > 0, False),
    "pmrl_tau2": (float, lambda v: v > 0, False),
    "temperature": (float, lambda v: v > 0, False),
    "label_smoothing": (float, lambda v: 0 <= v < 1, False),
    "matching_weight": (float, lambda v: v >= 0, False),
    "matching_num_negatives": (int, lambda v: v >= 1, False),
    "fusion_num_layers": (int, lambda v: v >= 0, False),
    "fusion_num_attention_heads": (int, lambda v: v >= 1, True),
    "initializer_range": (float, lambda v: v > 0, False),
}
CONFIG_SWITCHES = ("renormalize_imputed", "impute_with_grad", "impute_from_anchor", "learnable_temperature",
                   "gather_across_processes")
TRAINING_RANGES = {
    "seed": (int, lambda v: 0 <= v < 2**32, False),
    "max_steps": (int, lambda v: v >= 1, False),
    "per_device_train_batch_size": (int, lambda v: v >= 1, False),
    "train_batch_size": (int, lambda v: v >= 1, True),
    "per_device_eval_batch_size": (int, lambda v: v >= 1, False),
    "gradient_accumulation_steps": (int, lambda v: v >= 1, True),
    "learning_rate": (float, lambda v: v >= 0, False),
    "weight_decay": (float, lambda v: v >= 0, False),
    # warmup_steps: a float in (0, 1) is a ratio of max_steps (transformers 5's Trainer), tested in test_training.py
    "matching_learning_rate": (float, lambda v: v > 0, True),
    "matching_warmup_steps": (int, lambda v: v >= 0, True),
    "max_grad_norm": (float, lambda v: v > 0, True),
    "logging_steps": (int, lambda v: v >= 1, False),
    "eval_steps": (int, lambda v: v >= 1, True),
    "save_steps": (int, lambda v: v >= 1, True),
    "save_total_limit": (int, lambda v: v >= 1, True),
    "imputer_ema_decay": (float, lambda v: 0 <= v < 1, False),
    "imputer_min_rows": (int, lambda v: v >= 1, True),
    "imputer_warm_start_max_iter": (int, lambda v: v >= 1, False),
    "teacher_ema_decay": (float, lambda v: 0 <= v < 1, False),
    "teacher_weight": (float, lambda v: v >= 0, False),
    "dataloader_num_workers": (int, lambda v: v >= 0, False),
    "dataloader_prefetch_factor": (int, lambda v: v >= 1, True),
    "hub_timeout": (float, lambda v: v > 0, False),
    "hub_retries": (int, lambda v: v >= 0, False),
}
TRAINING_SWITCHES = ("use_cpu", "imputer_warm_start", "dataloader_persistent_workers", "dataloader_pin_memory",
                     "hub_private_repo", "push_to_hub")

# anything a user or a YAML file may put in a numeric field
NUMBERS = st.one_of(st.integers(-3, 3), st.integers(-10**6, 10**6), st.floats(-2.0, 2.0),
                    st.floats(allow_nan=True, allow_infinity=True))
ANY_VALUE = st.one_of(
    NUMBERS,
    NUMBERS.map(str),  # "0.07", "64", "-1", "nan", "1e-05"
    st.sampled_from(["7e-2", " 64 ", "abc", "", "true", "1/2", "0x10", "1_000"]),
    st.none(), st.booleans(), st.just([1]),
)


# values meaning "not set" -> what is stored: max_steps None or Trainer's -1 with no num_train_epochs is 100 steps
NOT_SET = {"max_steps": ((None, -1, "-1"), DEFAULT_MAX_STEPS)}


def assert_accepted_or_named(field: str, value, build, ranges) -> None:
    """Construction either keeps the value within the documented range with the right type, or raises a
    ValueError / TypeError naming the field."""
    kind, accepts, optional = ranges[field]
    try:
        built = build(field, value)
    except (ValueError, TypeError) as error:
        assert field in str(error), (field, value, str(error))
        return
    stored = getattr(built, field)
    if field in NOT_SET and not isinstance(value, bool) and value in NOT_SET[field][0]:
        assert stored == NOT_SET[field][1], (field, value, stored)  # "not set": the documented default
        return
    if stored is None:
        assert optional and value is None, (field, value)
        return
    assert type(stored) is kind, (field, value, stored)
    assert math.isfinite(stored) and accepts(stored), (field, value, stored)
    assert not isinstance(value, bool), (field, value)  # a boolean is no number
    expected = float(str(value).strip()) if isinstance(value, str) else value
    assert stored == expected, (field, value, stored)


# ----------------------------------------------------------------------------------------------- CalMRLConfig
@FAST
@given(field=st.sampled_from(sorted(CONFIG_RANGES)), value=ANY_VALUE)
def test_config_numbers_are_converted_kept_in_range_or_refused_naming_the_field(field, value):
    assert_accepted_or_named(field, value, lambda f, v: tiny_config(**{f: v}), CONFIG_RANGES)


@FAST
@given(field=st.sampled_from(sorted(CONFIG_RANGES)), value=ANY_VALUE)
def test_config_numbers_set_after_construction_are_checked_the_same_and_refusal_keeps_the_old_value(field, value):
    config = tiny_config()
    before = config.to_dict()

    def assign(f, v):
        setattr(config, f, v)
        return config

    try:
        assert_accepted_or_named(field, value, assign, CONFIG_RANGES)
    finally:
        if getattr(config, field) == before[field]:
            assert config.to_dict() == before  # a refused value left everything as it was


def _valid_config_values():
    def numbers(draw_kind, strategy):
        return st.one_of(strategy, strategy.map(str), strategy.map(float) if draw_kind is int else strategy)

    return st.fixed_dictionaries({
        "imputer_latent_dim": numbers(int, st.integers(1, 16)),
        "projection_dim": numbers(int, st.integers(17, 4096)),
        "imputer_noise_var_floor": numbers(float, st.floats(1e-12, 1.0)),
        "pmrl_tau1": numbers(float, st.floats(1e-4, 10.0)),
        "pmrl_tau2": numbers(float, st.floats(1e-4, 10.0)),
        "temperature": numbers(float, st.floats(1e-4, 10.0)),
        "label_smoothing": numbers(float, st.floats(0.0, 1.0, exclude_max=True)),
        "matching_weight": numbers(float, st.floats(0.0, 10.0)),
        "matching_num_negatives": numbers(int, st.integers(1, 8)),
        "fusion_num_layers": numbers(int, st.integers(0, 4)),
        "fusion_num_attention_heads": st.one_of(st.none(), numbers(int, st.integers(1, 8))),
        "initializer_range": numbers(float, st.floats(1e-6, 1.0)),
        **{name: st.booleans() for name in CONFIG_SWITCHES},
    })


@FAST
@given(values=_valid_config_values())
def test_valid_config_values_are_accepted_as_numbers_and_round_trip(values):
    config = tiny_config(**values)
    for name, value in values.items():
        stored = getattr(config, name)
        if value is None or isinstance(value, bool):
            assert stored is value
            continue
        kind = CONFIG_RANGES[name][0]
        assert type(stored) is kind and stored == kind(float(value)), (name, value, stored)
    again = CalMRLConfig.from_dict(config.to_dict())
    assert again.to_dict() == config.to_dict()
    with tempfile.TemporaryDirectory() as folder:
        config.save_pretrained(folder)
        loaded = CalMRLConfig.from_pretrained(folder)
    assert loaded.to_dict() == config.to_dict()
    assert "_calmrl_checked" not in config.to_dict() and "_calmrl_checked" not in config.to_json_string()


@FAST
@given(field=st.sampled_from(CONFIG_SWITCHES),
       value=st.one_of(st.booleans(), st.sampled_from(["true", "false", "yes", 0, 1, None, 1.0])))
def test_config_switches_are_booleans_only(field, value):
    if isinstance(value, bool):
        assert getattr(tiny_config(**{field: value}), field) is value
    else:
        with pytest.raises(TypeError, match=f"{field} must be True or False"):
            tiny_config(**{field: value})


@pytest.mark.parametrize("field, value, expected", [
    ("temperature", "0.07", 0.07), ("temperature", "7e-2", 0.07), ("projection_dim", "128", 128),
    ("projection_dim", 128.0, 128), ("temperature", 1, 1.0),
])
def test_config_numbers_given_as_strings_become_numbers(field, value, expected):
    """Reported: CalMRLConfig(temperature="0.07") / projection_dim="64" raised a bare TypeError."""
    stored = getattr(tiny_config(**{field: value}), field)
    assert stored == expected and type(stored) is type(expected)


@pytest.mark.parametrize("field, value, message", [
    ("temperature", 0, "temperature must be > 0"), ("temperature", -0.5, "temperature must be > 0"),
    ("temperature", float("inf"), r"temperature must be a number > 0 \(finite\)"),
    ("pmrl_tau1", 0.0, "pmrl_tau1 must be > 0"), ("pmrl_tau2", -1, "pmrl_tau2 must be > 0"),
    ("label_smoothing", 1.0, r"label_smoothing must be in \[0, 1\)"),
    ("label_smoothing", -0.1, r"label_smoothing must be in \[0, 1\)"),
    ("imputer_noise_var_floor", 0, "imputer_noise_var_floor must be > 0"),
    ("projection_dim", 0, "projection_dim must be >= 1"),
    ("projection_dim", "abc", "projection_dim must be an integer"),
    ("projection_dim", 64.5, "projection_dim must be an integer"),
    ("fusion_num_attention_heads", 0, "fusion_num_attention_heads must be >= 1 or None"),
    ("matching_weight", float("nan"), "matching_weight must be a number >= 0 .finite."),
    ("initializer_range", 0, "initializer_range must be > 0"),
])
def test_config_numbers_out_of_range_are_refused_naming_the_field(field, value, message):
    """Reported: temperature=0 passed construction and failed later with 'math domain error'."""
    with pytest.raises(ValueError, match=message):
        tiny_config(**{field: value})


def test_config_fields_set_after_construction_are_checked():
    """Reported: `config.alignment_objective = "nope"` was accepted and failed with KeyError at the first forward
    (the recipe sets each stage's objective that way)."""
    config = tiny_config()
    with pytest.raises(ValueError, match=r"alignment_objective = 'nope'; expected one of \('pmrl'"):
        config.alignment_objective = "nope"
    assert config.alignment_objective == "pmrl"  # refused: the old value stays
    config.alignment_objective = "pairwise_infonce"
    assert config.alignment_objective == "pairwise_infonce"
    with pytest.raises(ValueError, match="temperature must be > 0"):
        config.temperature = 0
    config.temperature = "0.5"
    assert config.temperature == 0.5
    with pytest.raises(ValueError, match="imputer_method"):
        config.imputer_method = "median"
    with pytest.raises(ValueError, match="anchor_modality"):
        config.anchor_modality = "vision"
    with pytest.raises(ValueError, match="imputer_latent_dim .64. must be smaller than projection_dim .8."):
        config.projection_dim = 8
    assert config.projection_dim == 512
    config.update({"projection_dim": 8, "imputer_latent_dim": 4})  # settings that depend on each other, together
    assert (config.projection_dim, config.imputer_latent_dim) == (8, 4)
    with pytest.raises(ValueError, match="temperature"):
        config.update({"pmrl_tau1": 0.3, "temperature": -1})
    assert (config.pmrl_tau1, config.temperature) == (0.5, 0.5)  # nothing changed
    config.dtype = "float32"  # transformers' own attributes are not CalMRL's to check
    with tempfile.TemporaryDirectory() as folder:
        config.save_pretrained(folder)
        assert CalMRLConfig.from_pretrained(folder).to_dict() == config.to_dict()
        with pytest.raises(ValueError, match="alignment_objective = 'nope'"):
            CalMRLConfig.from_pretrained(folder, alignment_objective="nope")


def test_the_recipe_stage_objective_is_checked_where_the_recipe_sets_it():
    """The recipe sets `model.config.alignment_objective = objective` per stage (recipe/run.py)."""
    from calmrl_hf import CalMRLModel

    model = CalMRLModel(tiny_config(projection_dim=8, imputer_latent_dim=2))
    with pytest.raises(ValueError, match="alignment_objective = 'infonce'; expected one of"):
        model.config.alignment_objective = "infonce"


# -------------------------------------------------------------------------------------- CalMRLTrainingArguments
# the two doors of training numbers: the constructor, and a recipe section (`from_dict`), checked the same
TRAINING_BUILDS = {"constructor": lambda f, v: CalMRLTrainingArguments(**{f: v}),
                   "recipe section": lambda f, v: CalMRLTrainingArguments.from_dict({f: v})}


@FAST
@pytest.mark.parametrize("door", list(TRAINING_BUILDS))
@given(field=st.sampled_from(sorted(TRAINING_RANGES)), value=ANY_VALUE)
def test_training_numbers_are_converted_kept_in_range_or_refused_naming_the_field(door, field, value):
    assert_accepted_or_named(field, value, TRAINING_BUILDS[door], TRAINING_RANGES)


def _valid_training_values():
    def numbers(kind, strategy, optional=False):
        given_as = st.one_of(strategy, strategy.map(str), strategy.map(float) if kind is int else strategy)
        return st.one_of(st.none(), given_as) if optional else given_as

    positive = st.floats(1e-8, 1e3)
    return st.fixed_dictionaries({
        "seed": numbers(int, st.integers(0, 2**32 - 1)),
        "max_steps": numbers(int, st.integers(1, 10**6)),
        "per_device_train_batch_size": numbers(int, st.integers(1, 512)),
        "train_batch_size": numbers(int, st.integers(1, 4096), optional=True),
        "gradient_accumulation_steps": numbers(int, st.integers(1, 64), optional=True),
        "learning_rate": numbers(float, st.floats(0.0, 1.0)),
        "weight_decay": numbers(float, st.floats(0.0, 1.0)),
        "warmup_steps": numbers(int, st.integers(0, 10**4)),
        "matching_learning_rate": numbers(float, positive, optional=True),
        "max_grad_norm": numbers(float, positive, optional=True),
        "eval_steps": numbers(int, st.integers(1, 10**4), optional=True),
        "save_steps": numbers(int, st.integers(1, 10**4), optional=True),
        "save_total_limit": numbers(int, st.integers(1, 100), optional=True),
        "imputer_ema_decay": numbers(float, st.floats(0.0, 1.0, exclude_max=True)),
        "imputer_min_rows": numbers(int, st.integers(1, 1000), optional=True),
        "teacher_weight": numbers(float, st.floats(0.0, 10.0)),
        "dataloader_num_workers": numbers(int, st.integers(0, 16)),
        "hub_timeout": numbers(float, positive),
        "hub_retries": numbers(int, st.integers(0, 10)),
        **{name: st.booleans() for name in TRAINING_SWITCHES if name != "push_to_hub"},
    })


@FAST
@given(values=_valid_training_values())
def test_valid_training_values_are_accepted_as_numbers_and_round_trip(values):
    args = CalMRLTrainingArguments(**values)
    for name, value in values.items():
        stored = getattr(args, name)
        if value is None or isinstance(value, bool):
            assert stored is value
            continue
        kind = TRAINING_RANGES[name][0] if name in TRAINING_RANGES else int  # warmup_steps: whole steps here
        assert type(stored) is kind and stored == kind(float(value)), (name, value, stored)
    assert CalMRLTrainingArguments.from_dict(asdict(args)) == args
    assert CalMRLTrainingArguments.from_dict(json.loads(json.dumps(asdict(args)))) == args  # training_args.json


@FAST
@given(field=st.sampled_from(TRAINING_SWITCHES),
       value=st.one_of(st.booleans(), st.sampled_from(["true", "false", "no", 0, 1, None])))
def test_training_switches_are_booleans_only(field, value):
    if isinstance(value, bool):
        assert getattr(CalMRLTrainingArguments(**{field: value}, hub_model_id="team/run"), field) is value
    else:
        with pytest.raises((TypeError, ValueError), match=f"{field} must be True or False"):
            CalMRLTrainingArguments(**{field: value})


@pytest.mark.parametrize("field, value, message", [
    ("save_steps", 0, r"save_steps must be >= 1 or None \(never\), got 0"),
    ("save_steps", -1, r"save_steps must be >= 1 or None \(never\), got -1"),
    ("eval_steps", 0, r"eval_steps must be >= 1 or None \(never\)"),
    ("warmup_steps", -5, "warmup_steps must be >= 0 .*got -5"),
    ("max_grad_norm", -1.0, r"max_grad_norm must be > 0 or None \(no clipping\), got -1.0"),
    ("max_grad_norm", 0, r"max_grad_norm must be > 0 or None"),
    ("learning_rate", -1e-4, "learning_rate must be >= 0"),
    ("learning_rate", float("nan"), r"learning_rate must be a number >= 0 \(finite\)"),
    ("weight_decay", -0.01, "weight_decay must be >= 0"),
    ("save_total_limit", 0, r"save_total_limit must be >= 1 or None \(keep all\)"),
    ("dataloader_num_workers", -1, "dataloader_num_workers must be >= 0"),
    ("imputer_min_rows", 0, "imputer_min_rows must be >= 1 or None"),
    ("imputer_warm_start_max_iter", 0, "imputer_warm_start_max_iter must be >= 1"),
    ("per_device_eval_batch_size", 0, "per_device_eval_batch_size must be >= 1"),
    ("seed", -1, r"seed must be in \[0, 2\*\*32 - 1\]"),
    ("max_steps", "ten", r"max_steps must be an integer >= 1, or None \(from num_train_epochs\), got the string 'ten'"),
    ("max_steps", 2.5, r"max_steps must be an integer >= 1, or None \(from num_train_epochs\), got 2.5"),
    ("learning_rate", [1e-4], "learning_rate must be a number >= 0, got list"),
])
def test_training_numbers_out_of_range_are_refused_naming_the_field(field, value, message):
    """Reported: save_steps=0 wrote nothing, save_steps=-1 checkpointed every step, warmup_steps=-5 was accepted,
    max_grad_norm=-1.0 reversed the update."""
    with pytest.raises((ValueError, TypeError), match=message):
        CalMRLTrainingArguments(**{field: value})


def test_training_numbers_given_as_strings_are_converted_by_the_constructor_too():
    args = CalMRLTrainingArguments(learning_rate="7e-2", max_steps="64", save_steps="10", max_grad_norm="0.5")
    assert (args.learning_rate, args.max_steps, args.save_steps, args.max_grad_norm) == (0.07, 64, 10, 0.5)
    assert type(args.max_steps) is int and type(args.learning_rate) is float


def test_a_string_is_one_modality_not_its_letters():
    """Reported: freeze_modalities="text" named unknown modalities ['t', 'e', 'x', 't']."""
    args = CalMRLTrainingArguments(freeze_modalities="text", freeze_projections="vision",
                                   allow_resume_changes="learning_rate")
    assert (args.freeze_modalities, args.freeze_projections, args.allow_resume_changes) == \
        (["text"], ["vision"], ["learning_rate"])
    assert CalMRLTrainingArguments(freeze_modalities=("text", "audio")).freeze_modalities == ["text", "audio"]
    with pytest.raises(TypeError, match="freeze_modalities must be a name or a list of names"):
        CalMRLTrainingArguments(freeze_modalities=["text", 3])
    assert CalMRLTrainingArguments(eval_pairs=[("text", "vision")]).eval_pairs == [["text", "vision"]]
    for pairs in ("text", ["text", "vision"], [["text"]], [["text", "vision", "audio"]]):
        with pytest.raises((TypeError, ValueError), match=r"eval_pairs must be a list of \[query, gallery\] pairs"):
            CalMRLTrainingArguments(eval_pairs=pairs)


# ------------------------------------------------------------------------------------------------ validate_setup
def _setup_model():
    from training_fixtures import training_config

    from calmrl_hf import CalMRLModel

    return CalMRLModel(training_config())


@pytest.mark.parametrize("role", ["train", "eval", "warm start"])
def test_an_empty_dataset_is_refused_naming_its_role(role):
    """Reported: an empty evaluation or warm-start dataset failed with KeyError 'embeddings'."""
    from training_fixtures import make_dataset

    from calmrl_hf.training import validate_setup

    model = _setup_model()
    full = make_dataset(8, [(True, True, True, True)])
    empty = full.select([])
    datasets = {"train": full, "eval": None, "warm start": None, role: empty}
    args = CalMRLTrainingArguments(per_device_train_batch_size=4, imputer_warm_start=True)
    with pytest.raises(ValueError, match=rf"The {role} dataset is empty \(0 rows\)"):
        validate_setup(model, datasets, args, num_processes=1)
    datasets[role] = full
    assert validate_setup(model, datasets, args, num_processes=1) == 4


def test_validate_setup_names_unknown_modalities_of_lists():
    from training_fixtures import make_dataset

    from calmrl_hf.training import validate_setup

    model = _setup_model()
    data = {"train": make_dataset(8, [(True, True, True, True)])}
    with pytest.raises(ValueError, match=r"unknown modalities \['txt'\]"):
        validate_setup(model, data, CalMRLTrainingArguments(freeze_modalities="txt", per_device_train_batch_size=4), 1)
    with pytest.raises(ValueError, match=r"eval_pairs name unknown modalities \['image'\]"):
        validate_setup(model, data, CalMRLTrainingArguments(eval_pairs=[["text", "image"]],
                                                            per_device_train_batch_size=4), 1)
    args = CalMRLTrainingArguments(freeze_modalities="text", eval_pairs=[["text", "vision"]],
                                   per_device_train_batch_size=4)
    assert validate_setup(model, data, args, 1) == 4
