"""One source of truth for settings: the dataclasses define, check and expose every setting."""

from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from poetx.cli.flags import add_settings_flags, collect_settings
from poetx.cli.main import build_parser, main
from poetx.config import POETConfig
from poetx.settings import at_least, setting
from poetx.train.config import TrainConfig, build_config

REPO = Path(__file__).resolve().parents[1]

# A value of every field other than its default, written as a flag would be and as the
# dataclass holds it. A new field without an entry here fails test_every_field_has_a_flag.
TRAIN_VALUES = {
    "preset": ("llama-60m", "llama-60m"), "optimizer": ("adamw", "adamw"),
    "data": ("corpus.txt", "corpus.txt"), "tokenizer": ("tok.json", "tok.json"),
    "init_from": ("hf-model", "hf-model"),
    "vocab_size": ("1000", 1000), "cache_dir": ("cache", "cache"), "seq_len": ("33", 33),
    "batch_size": ("3", 3), "grad_accum": ("2", 2), "parallel": ("ddp", "ddp"),
    "metrics_every": ("3", 3), "dtype": ("bfloat16", "bfloat16"), "device": ("cpu", "cpu"),
    "steps": ("77", 77), "lr": ("0.5", 0.5), "poet_lr": ("0.25", 0.25),
    "weight_decay": ("0.1", 0.1), "warmup_steps": ("7", 7), "min_lr_ratio": ("0.5", 0.5),
    "max_grad_norm": ("2.5", 2.5), "clip_warmup_steps": ("9", 9),
    "clip_warmup_start": ("0.3", 0.3), "skip_nonfinite": (None, True),
    "cuda_graphs": (None, False),
    "compile_blocks": (None, False),
    "grad_checkpointing": (None, True), "dense_optimizer": ("adamw8bit", "adamw8bit"),
    "rotation_states": ("8bit", "8bit"), "step_in_backward": (None, True),
    "fit_check": (None, False), "gpu_mem": ("12.5", 12.5),
    "eval_every": ("11", 11), "eval_batches": ("5", 5),
    "eval_at_start": (None, False), "save_every": ("13", 13), "keep_last": ("4", 4),
    "out": ("runs/x", "runs/x"), "seed": ("5", 5), "progress": (None, False),
    "tensorboard": (None, False),
}
POET_VALUES = {
    "block_size": ("32", 32), "merge_every": ("17", 17), "neumann_terms": ("exact", None),
    "mode": ("mem", "mem"), "init": ("keep", "keep"), "exclude": (["*.q_proj", "lm*"],
                                                                    ("*.q_proj", "lm*")),
    "seed": ("21", 21), "w0_format": ("int8", "int8"), "quant_group_size": ("64", 64),
    "w0_residual": ("device", "device"), "max_q_norm": ("0.5", 0.5),
    "q_norm_check_every": ("5", 5), "adam_restart": ("reset", "reset"),
    "batch_rotations": ("off", "off"), "shared_inputs": ("on", "on"),
    "permuted_saves": ("off", "off"), "mlp_permutations": ("shared", "shared"),
    "mlp_frames": ("fused", "fused"),
}


def _flag_args(flags: list, values: dict, nested: str | None) -> list[str]:
    argv = []
    for flag in flags:
        if flag.nested != nested:
            continue
        text, value = values[flag.field]
        if text is None:  # a boolean: --x or --no-x
            argv.append(flag.option if value else "--no-" + flag.option[2:])
        elif isinstance(text, list):
            argv += [flag.option, *text]
        else:
            argv += [flag.option, text]
    return argv


def test_every_field_has_a_flag_and_reaches_the_config():
    parser = argparse.ArgumentParser()
    flags = add_settings_flags(parser, TrainConfig, nested={"poet": POETConfig})
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)} - {"poet"}
    poet_fields = {f.name for f in dataclasses.fields(POETConfig)}
    assert {f.field for f in flags if f.nested is None} == train_fields
    assert {f.field for f in flags if f.nested == "poet"} == poet_fields
    assert set(TRAIN_VALUES) == train_fields and set(POET_VALUES) == poet_fields
    options = {f.option for f in flags}
    for old in ("--steps", "--lr", "--poet-lr", "--block-size", "--merge-every", "--mode",
                "--w0-format", "--neumann-terms", "--no-progress", "--tensorboard"):
        assert old.replace("--no-", "--") in options, old  # the flags that existed before
    for new in ("--clip-warmup-start", "--eval-at-start", "--init", "--exclude",
                "--quant-group-size", "--poet-seed"):
        assert new in options, new

    argv = _flag_args(flags, TRAIN_VALUES, None) + _flag_args(flags, POET_VALUES, "poet")
    cfg = build_config(None, collect_settings(parser.parse_args(argv), flags))
    for name, (_, value) in TRAIN_VALUES.items():
        assert getattr(cfg, name) == value, name
    for name, (_, value) in POET_VALUES.items():
        assert getattr(cfg.poet, name) == value, name


def test_flags_not_given_do_not_override_the_toml(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('steps = 50\neval_at_start = false\n[poet]\nexclude = ["*.v_proj"]\n'
                    "quant_group_size = 128\n")
    parser = argparse.ArgumentParser()
    flags = add_settings_flags(parser, TrainConfig, nested={"poet": POETConfig})
    cfg = build_config(toml, collect_settings(parser.parse_args(["--lr", "0.5"]), flags))
    assert (cfg.steps, cfg.lr, cfg.eval_at_start) == (50, 0.5, False)
    assert cfg.poet.exclude == ("*.v_proj",) and cfg.poet.quant_group_size == 128


@pytest.mark.parametrize("flag,value,field", [
    ("--steps", "0", "steps"), ("--clip-warmup-start", "1.5", "clip_warmup_start"),
    ("--block-size", "1", "block_size"), ("--quant-group-size", "8", "quant_group_size"),
    ("--min-lr-ratio", "2.5", "min_lr_ratio"), ("--vocab-size", "1", "vocab_size"),
    ("--device", "tpu", "device"), ("--neumann-terms", "0", "neumann_terms"),
])
def test_flag_and_dataclass_give_the_same_message(flag, value, field, capsys, tmp_path):
    """One set of validators: a flag's refusal is the dataclass's own message, on one line."""
    assert main(["train", "--out", str(tmp_path / "r"), flag, value]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    parsed = float(value) if "." in value else int(value) if value.isdigit() else value
    kwargs = {field: parsed}
    with pytest.raises(ValueError) as e:
        if field in POET_VALUES:
            POETConfig(**kwargs)
        else:
            TrainConfig(**kwargs)
    problem = str(e.value).split(": ", 1)[1]
    assert err == f"poetx train: error: argument {flag}: {problem}"
    assert problem.count("at least") <= 1  # no "must be at least 2 (at least 2)"


def test_configs_are_frozen():
    cfg = TrainConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.steps = 3
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.poet.mode = "mem"
    assert dataclasses.replace(cfg.poet, mode="mem").mode == "mem"


def test_a_new_field_is_all_it_takes_to_get_a_flag():
    @dataclasses.dataclass(frozen=True)
    class Extended(TrainConfig):
        grad_accum: int = setting(1, "micro-batches per step", check=at_least(1),
                                  group="optimization")
        metrics_every: int = 10  # a plain field: type-checked and a flag, without help text

    parser = argparse.ArgumentParser(exit_on_error=False)
    flags = add_settings_flags(parser, Extended, nested={"poet": POETConfig})
    args = parser.parse_args(["--grad-accum", "4", "--metrics-every", "3"])
    assert collect_settings(args, flags) == {"grad_accum": 4, "metrics_every": 3}
    with pytest.raises(ValueError, match="metrics_every: must be an integer"):
        Extended(metrics_every="often")
    assert "micro-batches per step" in parser.format_help()
    with pytest.raises(ValueError, match="grad_accum: must be at least 1, got 0"):
        Extended(grad_accum=0)


def test_help_and_flag_errors_do_not_import_torch():
    """``poetx --help`` and a refused flag answer without importing torch or transformers."""
    script = (
        "import sys\n"
        "from poetx.cli.main import main\n"
        "assert main(['--help']) == 0\n"
        "assert main(['train', '--help']) == 0\n"
        "assert main(['train', '--steps', '0']) == 2\n"
        "heavy = [m for m in ('torch', 'transformers', 'numpy') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "--clip-warmup-start" in proc.stdout and "must be at least 1" in proc.stderr


def test_parser_lists_every_command():
    text = build_parser().format_help()
    for command in ("train", "eval", "export", "plot", "data"):
        assert command in text
