"""`--config PATH --config.field=value`: typed overrides, unknown fields, validation, CLI exit
codes.

The expected values are written out literally (what a user types -> what the field must hold); the
validation messages are checked for the field name and for the allowed values a user needs to fix
it.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest

from bitsmoe_jax import quantize
from bitsmoe_jax.config_cli import apply_overrides, parse_config_args
from bitsmoe_jax.run.config_schema import default_config, validate

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.py")


def parsed(*overrides: str):
    cfg, rest = parse_config_args(["--config", TINY, *overrides])
    assert rest == []
    return cfg


def valid_config(**fields):
    """A config that passes `validate`, with `fields` set through the override parser."""
    cfg = default_config()
    apply_overrides(cfg, ["model_path=/some/model", "output_dir=/some/out"])
    apply_overrides(cfg, [f"{k}={v}" for k, v in fields.items()])
    return cfg


# --------------------------------------------------------------------------------------- typing
@pytest.mark.parametrize(
    "override, field, expected",
    [
        ("budget_bits=2.5", "budget_bits", (2.5,)),
        ("budget_bits=3", "budget_bits", (3,)),
        ("budget_bits=(2.0,2.5)", "budget_bits", (2.0, 2.5)),
        ("budget_bits=[2.0, 3.0]", "budget_bits", (2.0, 3.0)),
        ("candidate_bits=(0,2,4)", "candidate_bits", (0, 2, 4)),
        ("overwrite=True", "overwrite", True),
        ("overwrite=true", "overwrite", True),
        ("sequential=False", "sequential", False),
        ("sequential=false", "sequential", False),
        ("group_size=64", "group_size", 64),
        ("rank=32", "rank", 32),
        ("rank=None", "rank", None),
        ("eval_max_tokens=1024", "eval_max_tokens", 1024),
        ("calib_text=/tmp/some text.txt", "calib_text", "/tmp/some text.txt"),
        (
            "model_path=123",
            "model_path",
            "123",
        ),  # a string field stays a string even when it looks numeric
        ("super_experts=(1,5)", "super_experts", (1, 5)),
        ("super_experts=auto", "super_experts", "auto"),
        ("coefficient_mode=sampled", "coefficient_mode", "sampled"),
    ],
)
def test_override_is_typed_by_the_field(override, field, expected):
    cfg = parsed(f"--config.{override}")
    value = cfg[field]
    assert value == expected
    assert type(value) is type(expected)


@pytest.mark.parametrize(
    "override, field",
    [("expert_mass_floor=1", "expert_mass_floor"), ("milp_time_limit=30", "milp_time_limit")],
)
def test_int_given_to_a_float_field_becomes_float(override, field):
    value = parsed(f"--config.{override}")[field]
    assert type(value) is float and value == float(override.split("=")[1])


def test_config_equals_form_and_later_override_wins():
    cfg, rest = parse_config_args(
        [f"--config={TINY}", "--config.group_size=32", "--config.group_size=16"]
    )
    assert rest == [] and cfg.group_size == 16
    # the config file's own settings are the starting point
    assert cfg.budget_bits == (2.0, 2.5, 3.0)


def test_bool_field_rejects_non_bool():
    with pytest.raises(ValueError, match="overwrite"):
        parsed("--config.overwrite=yes")


@pytest.mark.parametrize(
    "override", ["group_size=abc", "group_size=2.5", "eval_max_tokens=many", "budget_bits=two"]
)
def test_wrongly_typed_value_is_a_value_error_naming_the_field(override):
    with pytest.raises(ValueError, match=override.split("=")[0]):
        parsed(f"--config.{override}")


def test_unknown_field_lists_known_fields():
    with pytest.raises(ValueError) as exc:
        parsed("--config.budget=2.0")
    msg = str(exc.value)
    assert "'budget'" in msg
    for known in (
        "budget_bits",
        "group_size",
        "candidate_bits",
        "allocator",
        "budget_scope",
        "model_path",
    ):
        assert known in msg


def test_missing_config_path_and_missing_file():
    with pytest.raises(ValueError, match="--config"):
        parse_config_args(["--config.group_size=3"])
    with pytest.raises(FileNotFoundError):
        parse_config_args(["--config", str(ROOT / "configs" / "no_such_config.py")])


def test_override_without_value():
    with pytest.raises(ValueError, match="field=value"):
        parsed("--config.group_size")


# ------------------------------------------------------------------------------------- validation
def test_valid_config_passes():
    validate(valid_config())
    validate(
        valid_config(
            budget_bits="(2.0,2.5)",
            budget_scope="layer",
            allocator="greedy",
            basis_bits=16,
            candidate_bits="(0,1,2,16)",
            super_experts="auto",
            coefficient_mode="sampled",
        )
    )


@pytest.mark.parametrize(
    "field, value, allowed",
    [
        ("method", "awq", ["bitsmoe", "rtn", "rtn_asym", "gptq", "gptq_asym", "expertwise"]),
        ("basis", "pca", ["svd", "whitened", "none"]),
        ("loss_weighting", "mean", ["token_sum", "expert_mean"]),
        ("allocator", "cplex", ["auto", "milp", "greedy"]),
        ("budget_scope", "expert", ["layer", "model"]),
        ("coefficient_mode", "fast", ["exact", "sampled"]),
        ("rounding", "stochastic", ["gptq", "nearest"]),
        ("candidate_bits", "(1,2,3)", ["includes 0"]),
        ("candidate_bits", "(0,2,9)", ["includes 0", "16"]),
        ("basis_bits", "5", ["4, 6, 8 or 16"]),
        ("dense_dtype", "int8", ["bfloat16", "float32"]),
        ("budget_bits", "(2.0,-1.0)", ["positive"]),
        ("budget_bits", "0", ["positive"]),
        ("budget_bits", "(2.0,3.0,2.0)", ["distinct"]),
        ("budget_bits", "(2.001,2.004)", ["distinct", "2 decimals"]),  # both would write bpw_2.00
        ("super_expert_bits", "4", ["8 or 16"]),
        ("super_experts", "some", ["auto"]),
        ("group_size", "0", ["positive"]),
        ("rank", "0", ["positive"]),
        ("num_calib_tokens", "10", [">= seq_len"]),
    ],
)
def test_invalid_value_names_field_and_allowed_values(field, value, allowed):
    cfg = valid_config(**{field: value})
    with pytest.raises(ValueError) as exc:
        validate(cfg)
    msg = str(exc.value)
    assert f"config.{field}=" in msg
    for a in allowed:
        assert a in msg, (a, msg)


def test_missing_paths_are_invalid():
    cfg = default_config()
    with pytest.raises(ValueError, match="model_path"):
        validate(cfg)
    apply_overrides(cfg, ["model_path=/m"])
    with pytest.raises(ValueError, match="output_dir"):
        validate(cfg)


# ----------------------------------------------------------------------------------- CLI exit code
@pytest.mark.parametrize(
    "args, needle",
    [
        (["--config.allocator=cplex"], "allocator"),
        (["--config.method=awq"], "method"),
        (["--config.budget_scope=expert"], "budget_scope"),
        (["--config.candidate_bits=(1,2)"], "candidate_bits"),
        (["--config.basis_bits=3"], "basis_bits"),
        (["--config.no_such_field=1"], "no_such_field"),
        (["--config.group_size=abc"], "group_size"),
        (["stray_argument"], "stray_argument"),
    ],
)
def test_quantize_main_exits_2_on_bad_config(args, needle, capsys, tmp_path):
    out = tmp_path / "out"
    code = quantize.main(["--config", TINY, f"--config.output_dir={out}", *args])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and needle in err
    assert not out.exists()


def test_quantize_main_missing_config_file_exits_2(capsys, tmp_path):
    assert quantize.main(["--config", str(tmp_path / "nope.py")]) == 2
    assert "nope.py" in capsys.readouterr().err


def test_quantize_main_missing_model_exits_2(capsys, tmp_path):
    code = quantize.main(
        [
            "--config",
            TINY,
            f"--config.model_path={tmp_path / 'no_model'}",
            f"--config.output_dir={tmp_path / 'o'}",
        ]
    )
    assert code == 2
    assert "no_model" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_quantize_main_help(capsys):
    assert quantize.main(["--help"]) == 0
    assert "--config" in capsys.readouterr().out


def _leaves(d: dict, prefix: str = "") -> dict[str, object]:
    """Dotted leaf fields of a plain nested dict (the reference for --help's field list)."""
    out: dict[str, object] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out |= _leaves(v, f"{prefix}{k}.")
        else:
            out[prefix + k] = v
    return out


def _help_lines(capsys, *argv: str) -> dict[str, str]:
    assert quantize.main([*argv, "--help"]) == 0
    text = capsys.readouterr().out
    lines: dict[str, str] = {}
    rows = text.splitlines()
    for i, row in enumerate(rows):
        if row.startswith("  --config."):
            flag, _, help_text = row.strip().partition("  ")
            if not help_text.strip() and i + 1 < len(rows):  # a long flag: help on the next line
                help_text = rows[i + 1]
            lines[flag] = help_text.strip()
    return lines


def test_help_lists_every_field_with_its_default_and_a_line_of_help(capsys):
    fields = _leaves(default_config().to_dict())
    lines = _help_lines(capsys)
    assert len(lines) == len(fields)
    for name, value in fields.items():
        shown = (value or "''") if isinstance(value, str) else repr(value)
        flag = f"--config.{name}={shown}"
        assert flag in lines, f"{flag} missing from --help"
        assert len(lines[flag]) > 10, f"{name}: no help line"


def test_help_with_a_config_file_shows_its_values(capsys):
    lines = _help_lines(capsys, "--config", TINY)
    assert "--config.budget_bits=(2.0, 2.5, 3.0)" in lines
    assert quantize.main(["--config", "no_such_config.py", "--help"]) == 2
    assert "no_such_config.py" in capsys.readouterr().err


def test_non_utf8_calibration_text_is_named_and_leaves_nothing(tmp_path, capsys):
    """A Latin-1 text: one message naming the file and the byte, exit 2, no output or work dir."""
    calib = tmp_path / "latin1.txt"
    calib.write_bytes("Caf\u00e9 au lait, na\u00efve r\u00e9sum\u00e9. ".encode("latin-1") * 50)
    out = tmp_path / "out"
    rc = quantize.main(
        [
            "--config",
            TINY,
            f"--config.calib_text={calib}",
            f"--config.output_dir={out}",
            "--config.eval_text=",
            "--config.budget_bits=2.0",
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2
    assert str(calib) in err and "not UTF-8" in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latin1.txt"]


def test_calibration_text_reuse_warns_with_the_counts(tmp_path):
    from bitsmoe_jax.io.data import load_tokenizer, tokenize_text
    from bitsmoe_jax.run.inputs import CalibrationReuseWarning, calibration_tokens

    model_path = parsed().model_path  # the shipped model
    text = tmp_path / "short.txt"
    text.write_text("To be, or not to be, that is the question. " * 40)
    n_ids = len(tokenize_text(load_tokenizer(model_path), text.read_text()))
    with pytest.warns(CalibrationReuseWarning, match=f"has {n_ids} tokens but 2048 were asked"):
        calibration_tokens(model_path, str(text), 2048, 64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a long enough text: no warning
        calibration_tokens(model_path, str(text), 64, 64)


def test_docs_table_lists_every_field_with_its_default():
    import re

    table = (ROOT / "docs" / "quantizing.md").read_text().split("## Every config field", 1)[1]
    rows = dict(re.findall(r"^\| `([^`]+)` \| `([^`]*)` \|", table, flags=re.M))
    fields = _leaves(default_config().to_dict())
    assert set(rows) == set(fields)
    for name, value in fields.items():
        shown = f'"{value}"' if isinstance(value, str) else repr(value)
        assert rows[name] == shown, name
