"""The CLI's exit status and its one-line errors (issue 14): what a CI step sees when a job fails."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from ray.exceptions import RayTaskError

from tsdn_platform.cli import build_parser, exit_status
from tsdn_platform.cli import main as cli_main
from tsdn_platform.config import ConfigError
from tsdn_platform.registry import UnknownProductError
from tsdn_platform.score import ScoreFailed
from tsdn_platform.shards import IngestError
from tsdn_platform.store import StoreError

ROOT = Path(__file__).resolve().parents[3]


@pytest.mark.parametrize(
    ("exc", "status"),
    [
        (StoreError("s3://b/p", "the store is unreachable: x", "unreachable"), 3),
        (StoreError("s3://b/p", "throttled", "throttled"), 3),
        (StoreError("s3://b/p", "5xx", "unavailable"), 3),
        (StoreError("s3://b/p", "unclassified", "error"), 3),
        (StoreError("s3://b/p", "access denied", "access_denied"), 2),
        (StoreError("s3://b/p", "no bucket", "missing_bucket"), 2),
        (StoreError("/nowhere", "not found", "not_found"), 2),
        (StoreError("/a-file", "a file, not a folder", "wrong_type"), 2),
        (ConfigError("epoch: unknown key"), 2),
        (IngestError("/src", "no product folders found"), 2),
        (UnknownProductError("/store", "bolt"), 2),
        (ScoreFailed("/out", "3 of 3 rows are errors"), 1),
        (RuntimeError("boom"), 1),
    ],
)
def test_exit_status_says_what_failed(exc, status):
    assert exit_status(exc) == status


def test_a_store_error_raised_in_a_ray_task_keeps_its_status():
    cause = StoreError("s3://b/k", "the store is unreachable: x", "unreachable")
    wrapped = RayTaskError("MapBatches(f)", "Traceback ...\nmany lines", cause).as_instanceof_cause()
    assert exit_status(wrapped) == 3


def _tsdn(*argv: str) -> subprocess.CompletedProcess[str]:
    """Run the CLI in a fresh interpreter and report whether Ray was started in it."""
    code = (
        "import sys\nfrom tsdn_platform.cli import main\nrc = main(sys.argv[1:])\n"
        "ray = sys.modules.get('ray')\nprint('ray started' if ray and ray.is_initialized() else 'no ray')\n"
        "sys.exit(rc)"
    )
    return subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, cwd=ROOT, timeout=300)


@pytest.mark.parametrize("command", ["score", "models", "serve"])
def test_a_missing_store_is_one_line_exit_2_before_ray_starts(tmp_path, command):
    missing = str(tmp_path / "no-such-store")
    argv = {
        "score": ["score", "--store", missing, "--input", str(tmp_path), "--output", str(tmp_path / "out")],
        "models": ["models", "list", "--store", missing],
        "serve": ["serve", "--store", missing, "--port", "1"],
    }[command]
    result = _tsdn(*argv)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == [f"tsdn {command}: {missing}: not found: nothing is stored there (check the URI)"]
    assert result.stdout.strip() == "no ray"


@pytest.mark.parametrize("case", ["store", "input", "output", "under-a-file", "report", "models", "ingest"])
def test_a_file_where_a_folder_goes_is_one_line_exit_2_before_ray_starts(tmp_path, case):
    """Before, a file given as --store, --input, --output or --report gave exit 3 ("the store failed", run it again
    later), exit 1 with a Ray traceback after the scoring, or exit 0 with an empty model list."""
    a_file, folder = tmp_path / "a-file", tmp_path / "store"
    a_file.write_text("")
    folder.mkdir()
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "x.png").write_bytes(b"not read: the check comes first")
    (tmp_path / "src" / "brick" / "train" / "good").mkdir(parents=True)
    (tmp_path / "src" / "brick" / "train" / "good" / "000.png").write_bytes(b"not read either")
    score = ["score", "--product", "bolt", "--store", str(folder), "--input", str(tmp_path / "in")]
    argv, named = {
        "store": (["score", "--store", str(a_file), "--input", str(tmp_path / "in"), "--output", "o"], a_file),
        "input": ([*score[:-1], str(a_file), "--output", str(tmp_path / "out")], a_file),
        "output": ([*score, "--output", str(a_file)], a_file),
        "under-a-file": ([*score, "--output", str(a_file / "scores")], a_file / "scores"),
        "report": ([*score, "--output", str(tmp_path / "out"), "--report", str(a_file)], a_file),
        "models": (["models", "list", "--store", str(a_file)], a_file),
        "ingest": (["ingest", str(tmp_path / "src"), "--store", str(a_file), "--dataset", "d"], a_file / "datasets"),
    }[case]
    result = _tsdn(*argv)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and f": {named}" in lines[0] and "not a folder" in lines[0], lines
    assert result.stdout.strip() == "no ray"


def test_config_mistakes_are_one_line_and_debug_adds_the_traceback(tmp_path, capsys):
    argv = ["score", "--store", str(tmp_path), "--input", str(tmp_path), "--output", str(tmp_path / "o")]
    assert cli_main([*argv, "--set", "max_error_fraction=2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "max_error_fraction=2" in err and "Traceback" not in err
    assert cli_main([*argv, "--set", "max_error_fraction=2", "--debug"]) == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and err.rstrip().endswith("expected a fraction in [0, 1]")


def test_verbose_is_taken_before_or_after_the_subcommand():
    """``python -m jobs.train ... --verbose`` (a submitted job) passes every argument after the subcommand."""
    parser = build_parser()
    argv = ["train", "--store", "s", "--dataset", "d"]
    assert parser.parse_args(["--verbose", *argv]).verbose
    assert parser.parse_args([*argv, "--verbose"]).verbose
    assert parser.parse_args([*argv, "-v"]).verbose
    assert not parser.parse_args(argv).verbose


def test_a_preset_of_another_job_is_named_as_such(tmp_path, capsys):
    """``tsdn score --config tiny`` listed 13 unknown keys and nothing else."""
    argv = ["score", "--store", str(tmp_path), "--input", str(tmp_path), "--output", str(tmp_path / "o")]
    assert cli_main([*argv, "--config", "tiny"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tsdn score: --config tiny: unknown config key(s) for ScoreConfig in ")
    assert "tiny.yaml: checkpoint_every, " in err and "(a config for another job?)" in err and err.count("\n") == 1


def test_no_input_and_no_model_are_one_line_errors(tmp_path, capsys):
    (tmp_path / "store" / "registry").mkdir(parents=True)
    (tmp_path / "in").mkdir()
    argv = ["score", "--store", str(tmp_path / "store"), "--input", str(tmp_path / "in"), "--output", str(tmp_path)]
    assert cli_main([*argv, "--product", "bolt"]) == 2
    assert capsys.readouterr().err == f"tsdn score: {tmp_path / 'in'}: no input files\n"
    (tmp_path / "in" / "a.png").write_bytes(b"not read: nothing can score it")
    assert cli_main([*argv, "--product", "bolt"]) == 2
    err = capsys.readouterr().err
    assert err == f"tsdn score: {tmp_path / 'store'}: no registered model for any input product (products: bolt)\n"


@pytest.mark.parametrize(
    ("command", "keys"),
    [
        ("train", ("epochs", "model.score_source", "patchcore.coreset_fraction", "promote_metric")),
        ("score", ("output_map_size", "max_error_fraction", "store_retry_s")),
        ("serve", ("max_body_bytes", "pointer_ttl_s")),
        ("ingest", ("image_size",)),
        ("pipeline", ("train_config",)),
    ],
)
def test_job_help_lists_its_config_keys_with_types_and_defaults(command, keys, capsys):
    with pytest.raises(SystemExit) as exited:
        cli_main([command, "--help"])
    assert exited.value.code == 0
    text = capsys.readouterr().out
    section = text.split("config keys", 1)[1]
    for key in keys:
        (line,) = [row for row in section.splitlines() if row.split()[:1] == [key]]
        assert " = " in line  # a type and a default


def test_image_size_flag_takes_a_side_or_height_by_width():
    import argparse

    from tsdn_platform.cli import image_size_arg

    assert (
        image_size_arg("192") == 192 and image_size_arg("320x128") == (320, 128) and image_size_arg("96X64") == (96, 64)
    )
    for bad in ("", "x128", "320x", "320x128x3", "-5", "1.5"):
        with pytest.raises(argparse.ArgumentTypeError, match="expected S or HxW"):
            image_size_arg(bad)
