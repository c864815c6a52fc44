"""Run configuration: schema defaults, overrides, YAML round trip and error messages naming fields."""

from __future__ import annotations

import pytest
import yaml

from qsparse_dist.config import (
    PROJECTIONS,
    ConfigError,
    RunConfig,
    config_from_dict,
    dump_config,
    load_config,
    parse_overrides,
)
from qsparse_dist.ops import LinearRecipe


def test_defaults_and_derived_shapes():
    cfg = load_config(None)
    assert isinstance(cfg, RunConfig)
    m = cfg.model
    assert m.ffn_size == 704  # 8/3·256 = 682.7 -> rounded to a multiple of 64
    assert m.query_groups == m.num_attention_heads and m.head_dim == 64
    assert config_from_dict({"model": {"hidden_size": 96, "num_attention_heads": 4}}).model.ffn_size == 256
    assert config_from_dict({"model": {"hidden_size": 8, "num_attention_heads": 2}}).model.ffn_size == 64
    assert issubclass(ConfigError, ValueError)


def test_overrides_are_yaml_scalars():
    assert parse_overrides(["parallel.tp=2", "sparsity.linear=bitnet", "model.moe=null", "a.b.c=0.5", "x="]) == {
        "parallel": {"tp": 2}, "sparsity": {"linear": "bitnet"}, "model": {"moe": None}, "a": {"b": {"c": 0.5}},
        "x": "",
    }
    cfg = config_from_dict({"model": {"num_layers": 2}},
                           ["model.num_layers=6", "model.moe={num_experts: 4}", "sparsity.up=0.25"])
    assert cfg.model.num_layers == 6 and cfg.model.moe.num_experts == 4 and cfg.model.moe.router_topk == 2
    assert cfg.sparsity.up == 0.25 and cfg.sparsity.qkv == 0.5  # untouched fields keep their values


def test_yaml_file_and_round_trip(tmp_path):
    p = tmp_path / "run.yaml"
    p.write_text("model:\n  hidden_size: 64\n  num_attention_heads: 4\nsparsity:\n  linear: bitnet_qsparse\n")
    cfg = load_config(p, ["train.steps=7"])
    assert cfg.model.hidden_size == 64 and cfg.sparsity.linear == "bitnet_qsparse" and cfg.train.steps == 7
    again = config_from_dict(yaml.safe_load(dump_config(cfg)))
    assert again == cfg


def test_recipe_per_projection():
    s = config_from_dict({"sparsity": {"linear": "bitnet_qsparse", "qkv": 0.1, "out": 0.2, "up": 0.3,
                                       "down": 0.4, "block_size": 8, "ste": False}}).sparsity
    for proj, sp in zip(PROJECTIONS, (0.1, 0.2, 0.3, 0.4)):
        assert s.recipe(proj) == LinearRecipe("bitnet_qsparse", sp, 8, ste=False, rescale=False)
    with pytest.raises(ValueError, match="projection must be one of"):
        s.recipe("gate")


@pytest.mark.parametrize(
    "overrides, pattern",
    [
        (["model.hiden_size=3"], r"model\.hiden_size: unknown field"),
        (["trian.steps=3"], r"trian: unknown field"),
        (["sparsity.linear=foo"], r"sparsity\.linear: Input should be 'dense', 'qsparse'.*got 'foo'"),
        (["model.ffn_activation=gelu"], r"model\.ffn_activation: Input should be"),
        (["parallel.zero_stage=4"], r"parallel\.zero_stage: Input should be 0, 1, 2 or 3"),
        (["model.hidden_size=abc"], r"model\.hidden_size: Input should be a valid integer"),
        (["sparsity.qkv=1.0"], r"sparsity\.qkv: Input should be less than 1"),
        (["sparsity.down=-0.1"], r"sparsity\.down: Input should be greater than or equal to 0"),
        (["train.steps=0"], r"train\.steps: Input should be greater than or equal to 1"),
        (["parallel.tp=3"], r"parallel\.tp=3 does not divide num_attention_heads=4"),
        (["model.num_query_groups=2", "parallel.tp=4"], r"parallel\.tp=4 does not divide num_query_groups=2"),
        (["model.ffn_hidden_size=100", "parallel.tp=8", "model.num_attention_heads=8"],
         r"parallel\.tp=8 does not divide ffn_hidden_size=100"),
        (["parallel.pp=3"], r"parallel\.pp=3 does not divide num_layers=4"),
        (["model.num_query_groups=3"], r"model: num_attention_heads=4 is not divisible by num_query_groups=3"),
        (["model.hidden_size=250"], r"model: hidden_size=250 is not divisible by num_attention_heads=4"),
        (["parallel.sp=true"], r"parallel: sp=true needs tp > 1"),
        (["sparsity.linear=block_qsparse"], r"sparsity: block_size is required"),
        (["sparsity.block_size=8"], r"sparsity: block_size is only valid"),
        (["sparsity.linear=block_qsparse", "sparsity.block_size=48"],
         r"sparsity\.block_size=48 does not divide hidden_size=256"),
        (["sparsity.linear=block_qsparse", "sparsity.block_size=32", "model.ffn_hidden_size=96", "parallel.tp=2"],
         r"sparsity\.block_size=32 does not divide ffn_hidden_size / tp=48"),
        (["model.moe={num_experts: 2, router_topk: 3}"], r"model\.moe: router_topk=3 exceeds num_experts=2"),
        (["model.moe={num_experts: 1}"], r"model\.moe\.num_experts: Input should be greater than or equal to 2"),
        (["parallel.ep=2"], r"parallel\.ep > 1 needs model\.moe"),
        (["model.moe={num_experts: 3}", "parallel.ep=2"], r"parallel\.ep=2 does not divide model\.moe\.num_experts=3"),
        (["parallel.tp=2", "parallel.sp=true", "model.seq_length=255"], r"parallel\.sp needs model\.seq_length=255"),
    ],
)
def test_errors_name_the_field(overrides, pattern):
    with pytest.raises(ConfigError, match=pattern):
        config_from_dict({}, overrides)


def test_several_errors_are_all_listed():
    with pytest.raises(ConfigError) as e:
        config_from_dict({"model": {"hidden_size": 3, "num_layers": 0}, "optimizer": {"lr": -1}})
    msg = str(e.value)
    for field in ("model.hidden_size", "model.num_layers", "optimizer.lr"):
        assert field in msg


def test_override_and_file_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"override 'foo' must look like key.path=value"):
        config_from_dict({}, ["foo"])
    with pytest.raises(ConfigError, match="empty key"):
        config_from_dict({}, ["model..hidden_size=3"])
    with pytest.raises(ConfigError, match="set both as a value and a section"):
        parse_overrides(["a=2", "a.b=1"])
    with pytest.raises(ConfigError, match="not valid YAML"):
        parse_overrides(["model.moe={num_experts: [}"])
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_config(bad)
    top = tmp_path / "list.yaml"
    top.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(top)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    with pytest.raises(ConfigError, match="empty.yaml is empty"):  # was: silently all defaults (issue 14, 4g)
        load_config(empty)


def test_assignment_is_validated():
    cfg = RunConfig()
    with pytest.raises(ValueError, match="linear"):
        cfg.sparsity.linear = "foo"


@pytest.mark.parametrize("text", ["", "\n\n", "# nothing here yet\n# model: {num_layers: 2}\n"])
def test_empty_or_comment_only_config_file_is_an_error_naming_it(tmp_path, text):
    f = tmp_path / "run.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=rf"config file {f} is empty"):
        load_config(f)
    assert load_config(None) == RunConfig()  # no file at all still means the defaults

