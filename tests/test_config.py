"""Recipes and overrides: inheritance, parsing, and errors that say how to fix them."""
from __future__ import annotations

import dataclasses
import subprocess
import textwrap
from pathlib import Path

import pytest

from conftest import BASE, QUICKSTART, RECIPES, REPO, pretrain_command, quick_config, run_train, subprocess_env
from mpp.config import EvalConfig, FinetuneRunConfig, PretrainConfig
from mpp.recipe import ConfigError, load_config, save_config, to_dict


def write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text))
    return path


# ---- unknown keys ----

@pytest.mark.parametrize("override,named,suggested", [
    ("optim.base_rl=1e-4", "optim.base_rl", "optim.base_lr"),
    ("train.micro_batch=8", "train.micro_batch", "train.micro_batch_size"),
    ("model.mask.ration=0.6", "model.mask.ration", "model.mask.ratio"),
    ("seeed=1", "seeed", "seed"),
])
def test_unknown_key_names_it_and_the_closest_valid_key(override, named, suggested):
    with pytest.raises(ConfigError) as err:
        load_config(PretrainConfig, QUICKSTART, [override])
    message = str(err.value)
    assert repr(named) in message
    assert repr(suggested) in message


def test_unknown_key_in_a_recipe_file_is_caught_too(tmp_path):
    recipe = write(tmp_path / "r.yaml", f"""
        _base_: {QUICKSTART}
        data:
          shufle_buffer: 10
    """)
    with pytest.raises(ConfigError, match=r"'data\.shufle_buffer'.*'data\.shuffle_buffer'"):
        load_config(PretrainConfig, recipe)


def test_unknown_section_is_caught(tmp_path):
    with pytest.raises(ConfigError, match=r"'optimizer'.*'optim'"):
        load_config(PretrainConfig, QUICKSTART, ["optimizer.base_lr=1e-3"])


# ---- wrong types ----

@pytest.mark.parametrize("override,key,expected_type", [
    ("train.steps=abc", "train.steps", "int"),
    ("train.batch_size=1.5", "train.batch_size", "int"),
    ("train.batch_size=true", "train.batch_size", "int"),  # a bool is not an int here
    ("optim.base_lr=fast", "optim.base_lr", "float"),
    ("train.grad_checkpointing=maybe", "train.grad_checkpointing", "bool"),
    ("log.trackers=tensorboard", "log.trackers", "list of str"),
    ("data.crop_scale=0.5", "data.crop_scale", "list of float"),
    ("model=tiny", "model", "mapping"),
])
def test_wrong_type_names_the_key_and_the_type(override, key, expected_type):
    with pytest.raises(ConfigError) as err:
        load_config(PretrainConfig, QUICKSTART, [override])
    message = str(err.value)
    assert repr(key) in message
    assert expected_type in message


def test_override_without_equals_sign_is_refused():
    with pytest.raises(ConfigError, match="key=value"):
        load_config(PretrainConfig, QUICKSTART, ["train.steps"])


# ---- values ----

def test_quickstart_inherits_base_values():
    cfg = load_config(PretrainConfig, QUICKSTART)
    # From quickstart.yaml itself...
    assert cfg.model.encoder == "tiny" and cfg.model.img_size == 32 and cfg.model.patch_size == 4
    assert cfg.data.train == "mpp/sample_data/cifar10"
    assert cfg.optim.base_lr == 1e-3
    # ...and from base.yaml beneath it, including siblings of overridden keys in the same section.
    assert cfg.optim.weight_decay == 0.05
    assert cfg.optim.betas == [0.9, 0.95]
    assert cfg.model.mask.ratio == 0.75 and cfg.model.target.norm_pix is True
    assert cfg.model.decoder.dim == 128 and cfg.model.decoder.heads == 4 and cfg.model.decoder.depth == 2
    assert cfg.train.mixed_precision == "auto" and cfg.train.compile == "auto"
    assert cfg.resume == "auto"
    assert cfg.output_dir == str(Path("runs") / "quickstart")  # default runs/<recipe name>


def test_base_chain_resolves_relative_to_each_recipe(tmp_path):
    (tmp_path / "sub").mkdir()
    write(tmp_path / "root.yaml", """
        seed: 1
        train: {steps: 5, batch_size: 64}
    """)
    write(tmp_path / "sub" / "middle.yaml", """
        _base_: ../root.yaml
        train: {steps: 7}
    """)
    leaf = write(tmp_path / "sub" / "leaf.yaml", """
        _base_: [middle.yaml]
        optim: {base_lr: 2.0e-4}
    """)
    cfg = load_config(PretrainConfig, leaf, ["train.micro_batch_size=16"])
    assert (cfg.seed, cfg.train.steps, cfg.train.batch_size, cfg.train.micro_batch_size) == (1, 7, 64, 16)
    assert cfg.optim.base_lr == 2e-4
    assert cfg.optim.weight_decay == PretrainConfig().optim.weight_decay  # schema default where no recipe says


def test_recipe_that_inherits_from_itself_is_refused(tmp_path):
    write(tmp_path / "a.yaml", "_base_: b.yaml\n")
    write(tmp_path / "b.yaml", "_base_: a.yaml\n")
    with pytest.raises(ConfigError, match="inherits from itself"):
        load_config(PretrainConfig, tmp_path / "a.yaml")


def test_missing_recipe_names_the_path(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_config(PretrainConfig, missing)


def test_overrides_parse_as_yaml():
    cfg = load_config(PretrainConfig, QUICKSTART, [
        "optim.base_lr=1e-4", "optim.min_lr=0", "train.grad_clip=1", "train.steps=12", "train.steps=13",
        "log.trackers=[]", "data.crop_scale=[0.5, 1]", "resume=null", "train.fused_attn=true",
    ])
    assert cfg.optim.base_lr == 1e-4 and type(cfg.optim.base_lr) is float
    assert type(cfg.optim.min_lr) is float and type(cfg.train.grad_clip) is float
    assert cfg.train.steps == 13  # the last override wins
    assert cfg.log.trackers == [] and cfg.train.fused_attn is True
    assert cfg.data.crop_scale == [0.5, 1.0] and all(type(v) is float for v in cfg.data.crop_scale)
    assert cfg.resume is None


def test_exponent_without_dot_in_a_recipe_is_a_float(tmp_path):
    # PyYAML reads `1e-4` (no dot) as a string; the float field must still take it.
    recipe = write(tmp_path / "r.yaml", f"""
        _base_: {QUICKSTART}
        optim: {{base_lr: 1e-4, min_lr: 1e-6}}
    """)
    cfg = load_config(PretrainConfig, recipe)
    assert (cfg.optim.base_lr, cfg.optim.min_lr) == (1e-4, 1e-6)
    assert type(cfg.optim.base_lr) is float


def test_saved_config_loads_back_equal(tmp_path):
    cfg = load_config(PretrainConfig, QUICKSTART, ["optim.base_lr=3e-4", "train.steps=9", f"output_dir={tmp_path}"])
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(PretrainConfig, tmp_path / "config.yaml")
    assert again == cfg
    assert to_dict(again) == dataclasses.asdict(cfg)


def test_base_recipe_sets_every_field_of_the_schema():
    import typing

    import yaml
    recipe = yaml.safe_load(BASE.read_text())

    def check(schema, data, prefix=""):
        hints = typing.get_type_hints(schema)
        assert set(data) == {f.name for f in dataclasses.fields(schema)}, prefix or "top level"
        for field in dataclasses.fields(schema):
            if dataclasses.is_dataclass(hints[field.name]):
                check(hints[field.name], data[field.name], prefix + field.name + ".")
    check(PretrainConfig, recipe)


# ---- errors at the start of a run ----

def test_base_recipe_without_data_fails_at_once_saying_how_to_shard(tmp_path):
    result = subprocess.run(pretrain_command(BASE), cwd=tmp_path, env=subprocess_env(),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "data.train" in result.stderr
    assert "data_tools.shard" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert not (tmp_path / "runs").exists()  # it stopped before making the output folder


def test_missing_shards_fail_naming_the_path(tmp_path):
    missing = tmp_path / "no_such_shards"
    cfg = quick_config(tmp_path / "run", f"data.train={missing}")
    with pytest.raises(FileNotFoundError) as err:
        run_train(cfg)
    assert str(missing) in str(err.value)
    assert "data_tools.shard" in str(err.value)
    assert not (tmp_path / "run").exists()


def test_missing_split_names_the_manifest_and_its_splits(tmp_path):
    cfg = quick_config(tmp_path / "run", "data.split=test")
    with pytest.raises(FileNotFoundError) as err:
        run_train(cfg)
    message = str(err.value)
    assert "manifest.json" in message and "'test'" in message and "'train'" in message and "'val'" in message


def test_cli_reports_config_errors_without_traceback(tmp_path):
    result = subprocess.run(pretrain_command(QUICKSTART, "optim.base_rl=1e-4"), cwd=REPO, env=subprocess_env(),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "'optim.base_lr'" in result.stderr
    assert "Traceback" not in result.stderr


def test_mixed_precision_no_survives_yaml_booleans():
    # YAML 1.1 reads a bare `no` as false; the choice must still come out as accelerate's "no".
    cfg = load_config(PretrainConfig, QUICKSTART, ["train.mixed_precision=no"])
    assert cfg.train.mixed_precision == "no"
    with pytest.raises(ConfigError, match=r"train\.mixed_precision.*auto, bf16, fp16, no"):
        load_config(PretrainConfig, QUICKSTART, ["train.mixed_precision=fp8"])


@pytest.mark.parametrize("value, expected", [("auto", "auto"), ("true", True), ("false", False)])
def test_compile_takes_auto_or_a_boolean(value, expected):
    assert load_config(PretrainConfig, QUICKSTART, [f"train.compile={value}"]).train.compile == expected
    with pytest.raises(ConfigError, match=r"'train\.compile' expects bool or auto"):
        load_config(PretrainConfig, QUICKSTART, ["train.compile=sometimes"])


@pytest.mark.parametrize("schema, recipes", [
    (PretrainConfig, ["base", "quickstart", "cifar10"]), (FinetuneRunConfig, ["finetune", "finetune_quickstart"]),
    (EvalConfig, ["linprobe", "linprobe_quickstart", "linprobe_cifar10"])])
def test_every_stage_and_recipe_defaults_to_auto(schema, recipes):
    for cfg in [schema()] + [load_config(schema, RECIPES / f"{name}.yaml") for name in recipes]:
        section = cfg.train if hasattr(cfg, "train") else cfg
        assert section.mixed_precision == "auto"
        if hasattr(cfg, "train"):
            assert cfg.train.compile == "auto"


# ---- errors of the command line: one line, a non-zero exit ----

def cli_error(capsys, argv) -> tuple[int, list[str], str]:
    """mpp/pretrain.py's main in this process: (exit status, its error lines, stderr)."""
    from mpp.pretrain import main
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    return code, [line for line in err.splitlines() if line.startswith("error:")], err


@pytest.mark.parametrize("text,line,column,what", [
    ("model:\n  encoder: tiny\n  img_size: [32, 48\n", 4, 1, "expected ',' or ']'"),
    ("model:\n  encoder: tiny\n img_size: 32\n", 3, 2, "expected <block end>"),
    ('model:\n  encoder: "tiny\n', 3, 1, "found unexpected end of stream"),
])
def test_malformed_yaml_names_file_line_and_column(tmp_path, capsys, text, line, column, what):
    recipe = tmp_path / "broken.yaml"
    recipe.write_text(f"_base_: {QUICKSTART}\n" + text)
    code, errors, err = cli_error(capsys, [recipe])
    assert code == 2 and len(errors) == 1 and "Traceback" not in err, err
    assert f"{str(recipe)!r}, line {line + 1}, column {column}" in errors[0] and what in errors[0], errors[0]


def test_malformed_yaml_in_an_override_is_named(capsys):
    code, errors, _ = cli_error(capsys, [QUICKSTART, "model.fuse_blocks=[1, 2"])
    assert code == 2 and len(errors) == 1
    assert "'model.fuse_blocks=[1, 2'" in errors[0] and "column" in errors[0]


@pytest.mark.parametrize("override,key,least", [
    ("train.steps=-5", "train.steps", 1),
    ("train.steps=0", "train.steps", 1),
    ("train.batch_size=0", "train.batch_size", 1),
    ("data.num_workers=-1", "data.num_workers", 0),
    ("knn.data.num_workers=-1", "knn.data.num_workers", 0),
    ("log.every=0", "log.every", 1),
    ("checkpoint.every=-1", "checkpoint.every", 1),
])
def test_out_of_range_counts_name_the_key_and_exit_non_zero(tmp_path, capsys, override, key, least):
    code, errors, err = cli_error(capsys, [QUICKSTART, f"output_dir={tmp_path}", override])
    assert code == 2 and len(errors) == 1 and "Traceback" not in err, err
    assert f"{key!r} must be at least {least}" in errors[0], errors[0]
    assert not list(tmp_path.iterdir())  # refused before anything was written


def test_zero_epochs_without_steps_is_refused(tmp_path, capsys):
    code, errors, _ = cli_error(capsys, [QUICKSTART, f"output_dir={tmp_path}", "train.epochs=0",
                                         "data.num_workers=0"])
    assert code == 2 and len(errors) == 1 and "train.epochs=0" in errors[0] and "train.steps" in errors[0]
