"""Deployment files: validated with Ray's own schemas and parsers, no cloud call."""

import argparse
import copy
import re
import shlex
import zipfile
from pathlib import Path

import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config
from ray.serve.schema import ServeDeploySchema

from tsdn.config_io import from_dict
from tsdn_platform.cli import build_parser
from tsdn_platform.config import preset_path
from tsdn_platform.serve import ServeConfig

ROOT = Path(__file__).resolve().parents[3]
INFRA = ROOT / "infra"


def _load(path: Path):
    return yaml.safe_load(path.read_text())


def _job_args(command: str) -> argparse.Namespace:
    """``[ray job submit ... --] python -m jobs.<name> ARGS`` -> ARGS parsed by the ``tsdn <name>`` parser."""
    words = shlex.split(re.sub(r"\$\{?\w+\}?", "x", command))
    words = words[words.index("--") + 1 :] if "--" in words else words
    assert words[:2] == ["python", "-m"] and words[2].startswith("jobs."), command
    return build_parser().parse_args([words[2].removeprefix("jobs."), *words[3:]])


@pytest.fixture(scope="module")
def cluster() -> dict:
    raw = _load(ROOT / "ray_cluster.yaml")
    prepared = prepare_config(copy.deepcopy(raw))  # merges Ray's AWS defaults, checks the docker section
    validate_config(prepared)  # Ray's JSON schema + head/min/max-worker consistency
    return prepared


def test_cluster_head_is_cpu_only_and_gpu_workers_exist(cluster):
    types = cluster["available_node_types"]
    head = types[cluster["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    assert not head["node_config"]["InstanceType"].startswith(("g", "p"))
    gpu_types = {name: t for name, t in types.items() if t["resources"].get("GPU", 0) > 0}
    assert {t["resources"]["GPU"] for t in gpu_types.values()} >= {1, 4}  # per-product nodes and large DDP runs
    for t in gpu_types.values():
        assert 0 <= t["min_workers"] <= t["max_workers"]
        assert t["node_config"]["InstanceType"].startswith(("g", "p"))
    assert sum(t["max_workers"] for t in gpu_types.values()) >= cluster["max_workers"]


def test_cluster_every_node_type_reaches_the_bucket(cluster):
    # The launcher gives only the head its default profile; a worker without one cannot reach S3.
    profiles = {
        name: t["node_config"].get("IamInstanceProfile", {}).get("Arn", "")
        for name, t in cluster["available_node_types"].items()
    }
    assert all(re.fullmatch(r"arn:aws:iam::\d{12}:instance-profile/[\w+=,.@-]+", arn) for arn in profiles.values())
    head_profile = profiles.pop(cluster["head_node_type"])
    assert set(profiles.values()) == {"arn:aws:iam::123456789012:instance-profile/tsdn-ray-node"}
    assert head_profile.endswith("/tsdn-ray-head")


def test_cluster_image_setup_and_token_auth(cluster):
    assert cluster["docker"]["image"].endswith("-gpu")
    assert "--env RAY_AUTH_MODE=token" in cluster["docker"]["run_options"]
    assert cluster["file_mounts"]["/home/ray/tsdn-platform"] == "."
    assert "/home/ray/.ray/auth_token" in cluster["file_mounts"]
    # prepare_config merges the common setup commands into the head's and the workers' lists.
    for commands in (cluster["head_setup_commands"], cluster["worker_setup_commands"]):
        assert "pip install --no-deps -e /home/ray/tsdn-platform" in commands
    head_start = " ".join(cluster["head_start_ray_commands"])
    assert "--num-cpus=0" in head_start
    assert "$RAY_HEAD_IP" in " ".join(cluster["worker_start_ray_commands"])


def test_cluster_image_is_built_from_the_dockerfile():
    dockerfile = (INFRA / "Dockerfile").read_text()
    base = re.search(r"^FROM rayproject/ray:\$\{RAY_VERSION\}-\$\{PYTHON_TAG\}-gpu$", dockerfile, re.M)
    assert base, "the cluster image must build on Ray's GPU image"
    assert re.search(r"^ARG RAY_VERSION=2\.60\.0$", dockerfile, re.M)
    assert re.search(r"^ARG TORCH_VERSION=2\.14\.1$", dockerfile, re.M)
    assert "pip install --no-deps -e ." in dockerfile
    # The image path is the one ray_cluster.yaml mounts the checkout over.
    assert "WORKDIR /home/ray/tsdn-platform" in dockerfile


def _serve_checks(config: dict) -> ServeDeploySchema:
    schema = ServeDeploySchema.model_validate(config)
    # 0.0.0.0 is the documented cluster choice (infra/serve.yaml, infra/README.md): every node's proxy must be
    # reachable from the load balancer; anything else must be loopback.
    assert schema.http_options.host in {"127.0.0.1", "0.0.0.0"}
    (app,) = schema.applications
    assert app.import_path == "tsdn_platform.serve:app_builder"
    cfg = from_dict(ServeConfig, app.args)  # the args are exactly what app_builder accepts
    assert cfg.store.startswith("s3://")
    assert cfg.auth_required is True
    assert cfg.max_ongoing_requests >= cfg.max_batch_size
    return schema


def test_serve_config_validates_with_serve_schema():
    config = _load(INFRA / "serve.yaml")
    schema = _serve_checks(config)
    if schema.http_options.host == "0.0.0.0":
        assert "0.0.0.0" in (INFRA / "README.md").read_text()


def test_kuberay_manifests_parse_with_expected_kinds():
    docs = {
        path.name: list(yaml.safe_load_all(path.read_text())) for path in sorted((INFRA / "kuberay").glob("*.yaml"))
    }
    kinds = {name: [d["kind"] for d in parsed] for name, parsed in docs.items()}
    assert kinds == {
        "rayjob-train.yaml": ["RayJob"],
        "rayservice.yaml": ["RayService"],
        "serviceaccount.yaml": ["ServiceAccount"],
    }
    (job,) = docs["rayjob-train.yaml"]
    (service,) = docs["rayservice.yaml"]
    (account,) = docs["serviceaccount.yaml"]
    assert job["apiVersion"] == service["apiVersion"] == "ray.io/v1"
    train = _job_args(job["spec"]["entrypoint"])
    assert train.command == "train"
    assert preset_path(train.config).is_file()
    for cluster_spec in (job["spec"]["rayClusterSpec"], service["spec"]["rayClusterConfig"]):
        assert cluster_spec["rayVersion"] == "2.60.0"
        assert cluster_spec["authOptions"] == {"mode": "token"}
        assert cluster_spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
        pods = [cluster_spec["headGroupSpec"]["template"]["spec"]]
        pods += [group["template"]["spec"] for group in cluster_spec["workerGroupSpecs"]]
        assert {pod["serviceAccountName"] for pod in pods} == {account["metadata"]["name"]}
        workers = [c for group in cluster_spec["workerGroupSpecs"] for c in group["template"]["spec"]["containers"]]
        assert all(int(c["resources"]["limits"]["nvidia.com/gpu"]) >= 1 for c in workers)
    # The RayService embeds infra/serve.yaml; the two must not drift apart.
    embedded = yaml.safe_load(service["spec"]["serveConfigV2"])
    _serve_checks(embedded)
    assert embedded == _load(INFRA / "serve.yaml")


def test_runtime_env_puts_the_platform_folder_on_the_path():
    runtime_env = _load(INFRA / "runtime_env.yaml")
    assert runtime_env["working_dir"] == "."
    assert runtime_env["env_vars"]["PYTHONPATH"] == "platform"
    assert not (ROOT / "platform" / "__init__.py").exists()


def test_ci_workflow_submits_train_then_score_and_fails_with_the_job():
    workflow = _load(INFRA / "ci" / "train-and-score.yml")
    steps = workflow["jobs"]["submit"]["steps"]
    submits = [s["run"] for s in steps if "ray job submit" in s.get("run", "")]
    assert len(submits) == 2
    train, score = submits
    for command in submits:
        assert "--working-dir . --runtime-env infra/runtime_env.yaml" in command
        assert '--address "$RAY_ADDRESS"' in command
        assert "--no-wait" not in command  # waiting is what makes a failed job fail the step
    # The job commands parse with the real CLI (shell variables replaced by a placeholder value).
    assert _job_args(train).command == "train"
    assert _job_args(score).command == "score"
    assert workflow["jobs"]["submit"]["env"]["RAY_AUTH_MODE"] == "token"
    # The Jobs API is reachable only inside the VPC (infra/README.md): a hosted runner could not submit.
    assert "self-hosted" in workflow["jobs"]["submit"]["runs-on"]
    # YAML 1.1 (PyYAML) reads the workflow's `on:` key as the boolean True.
    assert preset_path(workflow[True]["workflow_dispatch"]["inputs"]["config"]["default"]).is_file()


def test_terraform_declares_bucket_controls_and_least_privilege_roles():
    tf = "\n".join(p.read_text() for p in sorted((INFRA / "terraform").glob("*.tf")))
    for resource in (
        "aws_s3_bucket_versioning",
        "aws_s3_bucket_server_side_encryption_configuration",
        "aws_s3_bucket_public_access_block",
        "aws_s3_bucket_lifecycle_configuration",
        "aws_iam_instance_profile",
    ):
        assert f'resource "{resource}"' in tf
    assert 'prefix = "${var.store_prefix}runs/"' in tf
    assert '"s3:*"' not in tf.replace('actions = ["s3:*"]', "", 1)  # only the deny-insecure-transport statement
    assert 'iam:PassRole"]\n    resources = [aws_iam_role.node.arn]' in tf
    assert tf.count("{") == tf.count("}")


def test_readme_documents_every_infra_file():
    readme = (INFRA / "README.md").read_text()
    files = [p for p in INFRA.rglob("*") if p.is_file() and p.name != "README.md"]
    missing = [str(p.relative_to(INFRA)) for p in files if str(p.relative_to(INFRA)) not in readme]
    assert missing == []
    for top_level in ("ray_cluster.yaml", ".rayignore"):
        assert top_level in readme


def test_rayignore_keeps_the_working_dir_upload_to_the_code(tmp_path):
    # Ray's own packaging, as `ray job submit --working-dir .` runs it (it honours .gitignore and .rayignore).
    from ray._private.runtime_env.packaging import create_package

    package = tmp_path / "working_dir.zip"
    create_package(str(ROOT), package, include_gitignore=True)
    names = zipfile.ZipFile(package).namelist()
    for needed in ("platform/tsdn_platform/__init__.py", "tsdn/__init__.py", "jobs/train.py", "infra/runtime_env.yaml"):
        assert needed in names
    assert any(name.startswith("jobs/configs/") and name.endswith(".yaml") for name in names)
    unwanted = (".venv/", ".git/", "tests/", ".tsdn/", "demo_store/")
    assert [n for n in names if n.startswith(unwanted) or "__pycache__" in n or n.endswith(".parquet")] == []
    assert "platform/__init__.py" not in names
    assert package.stat().st_size < 5 * 2**20  # Ray caps uploads at 100 MiB; the code is well under 1 MiB
