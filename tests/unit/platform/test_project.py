"""Project-level invariants: the layout promises in DESIGN.md."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from tsdn.config_io import ConfigError
from tsdn_platform.cli import build_parser
from tsdn_platform.config import load_config, parse_overrides

ROOT = Path(__file__).resolve().parents[3]


def test_stdlib_platform_is_not_shadowed_from_the_repo_root():
    out = subprocess.run(
        [sys.executable, "-c", "import platform; print(platform.system())"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() in {"Linux", "Darwin", "Windows"}
    assert not (ROOT / "platform" / "__init__.py").exists()


# What the model package must never pull in: the platform's stack (Ray, the S3 SDKs, Arrow, the web server).
_PLATFORM_ONLY = ("ray", "boto3", "botocore", "pyarrow", "fastapi", "starlette", "uvicorn", "tsdn_platform")


def test_tsdn_stays_pure_pytorch():
    """Import every ``tsdn`` module in a fresh interpreter; none of the platform's packages may be loaded."""
    script = (
        "import importlib, pkgutil, sys, tsdn\n"
        "for info in pkgutil.walk_packages(tsdn.__path__, 'tsdn.'):\n"
        "    importlib.import_module(info.name)\n"
        f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({_PLATFORM_ONLY!r})))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_tsdn_has_no_deferred_platform_import():
    """The import-time check misses imports inside functions: read every module's syntax tree for any
    ``import``/``from`` statement or ``importlib.import_module``/``__import__`` call naming a platform package."""

    def named(node: ast.AST) -> list[str]:
        if isinstance(node, ast.Import):
            return [alias.name for alias in node.names]
        if isinstance(node, ast.ImportFrom):
            return [node.module or ""] if node.level == 0 else []
        if isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                return [node.args[0].value]
        return []

    offenders = [
        f"{path.relative_to(ROOT)}:{node.lineno} {module}"
        for path in sorted((ROOT / "tsdn").rglob("*.py"))
        for node in ast.walk(ast.parse(path.read_text()))
        for module in named(node)
        if module.split(".")[0] in _PLATFORM_ONLY
    ]
    assert offenders == []


def test_console_script_help():
    out = subprocess.run([sys.executable, "-m", "tsdn_platform.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "usage: tsdn" in out.stdout
    assert build_parser().prog == "tsdn"


def test_overrides_are_yaml_typed_and_dotted():
    assert parse_overrides(["model.image_size=64", "products=[a, b]", "name=x"]) == {
        "model": {"image_size": 64},
        "products": ["a", "b"],
        "name": "x",
    }
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["oops"])


def test_load_config_precedence_and_unknown_keys(tmp_path):
    from dataclasses import dataclass, field

    @dataclass
    class Inner:
        size: int = 1
        rate: float = 0.5

    @dataclass
    class Job:
        name: str = "default"
        inner: Inner = field(default_factory=Inner)

    path = tmp_path / "job.yaml"
    path.write_text("name: from-file\ninner:\n  size: 2\n  rate: 7e-5\n")
    cfg = load_config(Job, str(path), overrides=["inner.size=3"], explicit={"name": "from-flag"})
    assert cfg == Job(name="from-flag", inner=Inner(size=3, rate=7e-5))
    with pytest.raises(ConfigError, match=r"inner.*bogus"):
        load_config(Job, overrides=["inner.bogus=1"])
    with pytest.raises(ConfigError, match=r"inner\.size"):
        load_config(Job, overrides=["inner.size=big"])


def test_products_flag_parsing():
    from tsdn.config_io import ConfigError
    from tsdn_platform.names import parse_products

    assert parse_products(None) is None and parse_products("all") is None
    assert parse_products("brick, grass,") == ["brick", "grass"]
    # The one reader of every products setting: lists as YAML gives them, the same meaning of "all".
    assert parse_products(["all"]) is None and parse_products([" all "]) is None
    for empty in ("", ",", " , ", []):  # before, "every line": `--products ,` trained (and promoted) them all
        with pytest.raises(ConfigError, match="names no product line"):
            parse_products(empty)
    assert parse_products(["brick", " grass"]) == ["brick", "grass"]
    for bad in ("brick,../x", ["ok", "a b"], [3]):
        with pytest.raises(ConfigError, match="product"):
            parse_products(bad)


@pytest.mark.slow
def test_a_wheel_install_finds_the_presets(tmp_path):
    """Presets are package data of ``jobs``: a non-editable install (a wheel, a Docker layer) resolves them."""
    target = tmp_path / "site"
    build = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation"]
    subprocess.run([*build, "--target", str(target), str(ROOT)], check=True, capture_output=True, cwd=tmp_path)
    probe = "import tsdn_platform.config as c; print(c.__file__); print(c.preset_path('demo'))"
    out = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=tmp_path,
        env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=True,
    )
    module, preset = out.stdout.split()
    assert module.startswith(str(target)) and preset.startswith(str(target)), out.stdout
    assert Path(preset).name == "demo.yaml"


def test_the_registry_names_the_checkpoint_files_as_tsdn_writes_them():
    from tsdn.checkpoint import MODEL_JSON, MODEL_WEIGHTS
    from tsdn_platform import registry

    assert registry.MODEL_FILES == (MODEL_WEIGHTS, MODEL_JSON) and registry.MODEL_JSON == MODEL_JSON


def test_every_config_names_class_field_expectation_and_value():
    """``config_io.check`` is the one idiom: ``<Config>.<field>: expected <what>, got <value>``."""
    from tsdn.config import TSDNConfig
    from tsdn.config_io import ConfigError
    from tsdn.patchcore import PatchCoreConfig
    from tsdn_platform.ingest import IngestConfig
    from tsdn_platform.serve_config import ServeConfig
    from tsdn_platform.train_config import TrainConfig

    cases = (
        (lambda: TSDNConfig(ssim_window=8), "TSDNConfig.ssim_window: expected odd, >= 3, got 8"),
        (lambda: PatchCoreConfig(pool=2), "PatchCoreConfig.pool: expected odd, >= 1, got 2"),
        (lambda: TrainConfig(store="s", dataset="d", epochs=0), "TrainConfig.epochs: expected >= 1, got 0"),
        (lambda: ServeConfig(store="s", port=70000), "ServeConfig.port: expected <= 65535, got 70000"),
        (
            lambda: IngestConfig(source="a", store="b", dataset="c", image_size=8),
            "IngestConfig.image_size: expected S or [H, W], each >= 16, got 8",
        ),
    )
    for build, message in cases:
        with pytest.raises(ConfigError) as caught:
            build()
        assert str(caught.value) == message
