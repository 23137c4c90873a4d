"""The command line: help lists the options, --print_config resolves the tiny GRPO config, typos fail by name.

`--help` and the end-to-end `fit` go through `python -m app` in a subprocess; parse-only checks call the same
`cli_main` in-process (what `app/__main__.py` runs), which saves an interpreter start per test.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from app.cli import cli_main

ROOT = Path(__file__).resolve().parents[2]
GRPO_YAML = "configs/tiny/grpo.yaml"


def run_app(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, "-m", "app", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> dict[str, str]:
    from app.make_data import write_dataset

    out = tmp_path_factory.mktemp("data")
    write_dataset(out, n_train=20, n_val=8, quiet=True)
    return {"train": str(next(out.glob("train-*.parquet"))), "val": str(next(out.glob("validation-*.parquet")))}


def tiny_args(tiny_model_dir, tiny_data) -> list[str]:
    return ["--config", GRPO_YAML, "--model.init_args.model_path", str(tiny_model_dir("internvl")),
            "--data.train_files", tiny_data["train"], "--data.val_files", tiny_data["val"]]


@pytest.fixture
def parse_only(capsys, monkeypatch):
    """`(args) -> (exit code, stdout, stderr)` of `cli_main(args)` run in-process up to where it exits
    (print_config, help, parse error); sys.argv looks like a bare `python -m app`, as LightningCLI expects."""
    monkeypatch.setattr(sys, "argv", [sys.argv[0]])

    def run(args: list[str]) -> tuple[int, str, str]:
        with pytest.raises(SystemExit) as exit_:
            cli_main(args)
        out = capsys.readouterr()
        return exit_.value.code or 0, out.out, out.err

    return run


def test_fit_help_lists_model_and_data_options():
    res = run_app("fit", "--help")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "--model.help" in res.stdout and "--model CONFIG | CLASS_PATH_OR_NAME" in res.stdout
    for option in ("--data.train_files", "--data.batch_size", "--data.max_prompt_length", "--trainer.max_steps",
                   "--print_config"):
        assert option in res.stdout, option


def test_model_help_documents_grpo_module_args(parse_only):
    code, out, _ = parse_only(["fit", "--model.help", "modules.grpo_module.GRPOModule"])
    assert code == 0
    for option in ("--model.model_path", "--model.group_size", "--model.trainable_parts", "--model.share_prompt"):
        assert option in out, option
    assert "rollouts per prompt G" in out  # the Args: docstring is the help text


def test_print_config_resolves_the_tiny_grpo_config(tiny_model_dir, tiny_data, parse_only):
    code, out, err = parse_only(["fit", *tiny_args(tiny_model_dir, tiny_data), "--model.init_args.group_size", "4",
                                 "--print_config"])
    assert code == 0, err[-2000:]
    config = yaml.safe_load(out)
    init = config["model"]["init_args"]
    assert config["model"]["class_path"] == "modules.grpo_module.GRPOModule"
    assert init["group_size"] == 4  # the command line overrides the YAML's 8
    assert init["model_path"] == str(tiny_model_dir("internvl"))
    assert config["data"]["train_files"] == tiny_data["train"]
    shipped = yaml.safe_load((ROOT / "configs/tiny/grpo.yaml").read_text())
    assert config["trainer"]["max_steps"] == shipped["trainer"]["max_steps"]  # YAML values kept when not overridden


def test_misspelt_key_fails_naming_it(tiny_model_dir, tiny_data, parse_only):
    code, out, err = parse_only(["fit", *tiny_args(tiny_model_dir, tiny_data), "--model.init_args.group_sise", "3",
                                 "--print_config"])
    assert code != 0
    assert "group_sise" in err and "has no option" in err and "did you mean `group_size`" in err
    assert "group_size" not in out  # nothing was printed as if it had worked


@pytest.mark.slow
def test_fit_twice_into_the_same_folder(tiny_model_dir, tiny_data, tmp_path):
    """The second run finds config.yaml from the first in the same log dir and overwrites it."""
    args = ["fit", *tiny_args(tiny_model_dir, tiny_data), "--trainer.max_steps", "1",
            "--trainer.default_root_dir", str(tmp_path), "--trainer.logger.init_args.save_dir", str(tmp_path),
            "--trainer.logger.init_args.version", "fixed", "--trainer.enable_progress_bar", "false",
            "--model.init_args.group_size", "2", "--data.batch_size", "2",
            "--model.init_args.rollout.init_args.max_new_tokens", "4"]
    log_dir = tmp_path / "fixed"
    for attempt in (1, 2):
        res = run_app(*args)
        assert res.returncode == 0, f"run {attempt}:\n{res.stderr[-3000:]}"
        saved = yaml.safe_load((log_dir / "config.yaml").read_text())
        assert saved["model"]["init_args"]["group_size"] == 2
        assert (log_dir / "checkpoints" / "last.ckpt").exists()


def test_seed_everything_reaches_the_served_order_and_the_rollout_sampler(tiny_model_dir, tiny_data, monkeypatch):
    """`--seed_everything N` changes what is served and sampled (components with seed None follow it); an explicit
    `data.seed` / `model.init_args.seed` still wins."""
    from datamodules.ordering import run_seed

    monkeypatch.setattr(sys, "argv", [sys.argv[0]])

    def first_batch_and_seed(*extra: str) -> tuple[list[str], int]:
        cli = cli_main([*tiny_args(tiny_model_dir, tiny_data), "--trainer.logger", "false", *extra], run=False)
        cli.datamodule.setup("fit")
        ids = [r["id"] for r in next(iter(cli.datamodule.train_dataloader())).records]
        return ids, run_seed(cli.model.hparams.seed)  # what the rollout sampler is seeded with (+ rank)

    ids0, s0 = first_batch_and_seed("--seed_everything", "0")
    ids7, s7 = first_batch_and_seed("--seed_everything", "7")
    assert (s0, s7) == (0, 7)
    assert ids0 != ids7
    pinned, s_pinned = first_batch_and_seed("--seed_everything", "7", "--data.seed", "0", "--model.init_args.seed", "0")
    assert pinned == ids0 and s_pinned == 0
