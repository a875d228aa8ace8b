"""Offline checks of cluster.yaml, the Ray cluster launcher config.

Two layers of validation, both without cloud credentials, network or boto3:

1. jsonschema against ``ray/autoscaler/ray-schema.json`` from the installed Ray:
   catches misspelt keys (``additionalProperties: false``) and wrong types.
2. Ray's own ``prepare_config`` + ``validate_config`` (private API in
   ``ray.autoscaler._private.util``; it may move in a future Ray):
   ``prepare_config`` merges the file with the provider's ``defaults.yaml``
   (for aws: a YAML file shipped in ``ray/autoscaler/aws/``), prepends
   ``setup_commands`` to the head/worker setup lists and fills per-type
   min/max workers. It neither imports boto3 nor calls AWS; the AWS-specific
   bootstrap (IAM role, key pair, subnets, AMI), which does, runs only inside
   ``ray up`` (``bootstrap_config``) and is not called here.
   ``validate_config`` re-runs the schema and adds the cross-field rules:
   ``head_node_type`` must be a node type, the sum of ``min_workers`` must
   not exceed ``max_workers``. The tests block the boto3 import so that a
   future Ray that needs boto3 here fails loudly instead of calling AWS.

Then the properties the rest of embcam relies on: the head does no work, each
GPU worker offers exactly one GPU, and every node installs torch and embcam.
"""

from __future__ import annotations

import copy
import json
import re
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

CLUSTER_YAML = Path(__file__).resolve().parents[1] / "cluster.yaml"

# vCPUs and GPUs of the instance types cluster.yaml suggests (AWS instance type
# specifications). `resources` must describe the machine: more would oversubscribe it,
# fewer would leave it idle. Add a row when you switch to another type.
INSTANCE_SHAPES = {
    "m5.xlarge": (4, 0),
    "m5.2xlarge": (8, 0),
    "m5.4xlarge": (16, 0),
    "g4dn.xlarge": (4, 1),
    "g4dn.2xlarge": (8, 1),
    "g4dn.4xlarge": (16, 1),
    "g5.xlarge": (4, 1),
    "g5.2xlarge": (8, 1),
    "g5.4xlarge": (16, 1),
    "g6.xlarge": (4, 1),
    "g6.2xlarge": (8, 1),
    "g6.4xlarge": (16, 1),
}


@pytest.fixture(scope="module")
def config() -> dict:
    with open(CLUSTER_YAML) as f:
        return yaml.safe_load(f)  # the same loader `ray up` uses


@pytest.fixture(scope="module")
def ray_schema() -> dict:
    import ray.autoscaler

    with open(Path(ray.autoscaler.__file__).parent / "ray-schema.json") as f:
        return json.load(f)


@pytest.fixture
def no_boto3(monkeypatch):
    """Make `import boto3` / `import botocore` fail, as on a machine without them."""
    monkeypatch.setitem(sys.modules, "boto3", None)
    monkeypatch.setitem(sys.modules, "botocore", None)


def ray_prepare_and_validate(config: dict) -> dict:
    """Run Ray's own preparation and validation on a copy; return the prepared config."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def head_type(config: dict) -> dict:
    return config["available_node_types"][config["head_node_type"]]


def gpu_worker_types(config: dict) -> dict[str, dict]:
    return {
        name: node
        for name, node in config["available_node_types"].items()
        if node["resources"].get("GPU", 0) > 0
    }


# -- validation ------------------------------------------------------------


def test_matches_rays_schema(config, ray_schema):
    jsonschema.validate(config, ray_schema)


def test_passes_rays_prepare_and_validate_offline(config, no_boto3):
    before = copy.deepcopy(config)
    prepared = ray_prepare_and_validate(config)
    assert config == before, "validation must not modify the loaded config"
    # Ray's defaults were merged in (this is what validate_config requires).
    assert prepared["cluster_synced_files"] == []
    assert prepared["available_node_types"][config["head_node_type"]]["max_workers"] == 0


def _misspelt_node_key(cfg):
    node = head_type(cfg)
    node["resourcez"] = node.pop("resources")


def _misspelt_top_key(cfg):
    cfg["setup_comands"] = cfg.pop("setup_commands")


def _fractional_gpu(cfg):
    next(iter(gpu_worker_types(cfg).values()))["resources"]["GPU"] = 0.5


def _unknown_head_type(cfg):
    cfg["head_node_type"] = "ray.head.typo"


def _min_workers_above_max(cfg):
    next(iter(gpu_worker_types(cfg).values()))["min_workers"] = cfg["max_workers"] + 1


@pytest.mark.parametrize(
    "break_config, error, message",
    [
        (_misspelt_node_key, jsonschema.ValidationError, "resourcez"),
        (_misspelt_top_key, jsonschema.ValidationError, "setup_comands"),
        (_fractional_gpu, jsonschema.ValidationError, "0.5 is not of type 'integer'"),
        (_unknown_head_type, ValueError, "`head_node_type` must be one of"),
        (_min_workers_above_max, ValueError, "smaller than the sum of `min_workers`"),
    ],
    ids=["misspelt-node-key", "misspelt-top-key", "fractional-gpu",
         "unknown-head-type", "min-above-max"],
)
def test_broken_copies_are_rejected(config, no_boto3, break_config, error, message):
    broken = copy.deepcopy(config)
    break_config(broken)
    with pytest.raises(error, match=re.escape(message)):
        ray_prepare_and_validate(broken)


def test_schema_alone_misses_a_bad_head_type(config, ray_schema):
    # Why the Ray validator runs too: the schema has no cross-field rules.
    broken = copy.deepcopy(config)
    _unknown_head_type(broken)
    jsonschema.validate(broken, ray_schema)


# -- what embcam relies on -------------------------------------------------


def test_provider_and_docker(config):
    import ray

    assert config["cluster_name"] == "embcam"
    assert config["provider"] == {
        "type": "aws", "region": "us-west-2", "cache_stopped_nodes": False
    }
    docker = config["docker"]
    assert docker["container_name"] == "embcam"
    assert "--ulimit nofile=65536:65536" in docker["run_options"]
    # The launcher (`ray up`, `ray job submit`) and the cluster must run the same Ray.
    image_version = re.fullmatch(
        r"rayproject/ray:(\d+\.\d+\.\d+)-py\d+-gpu", docker["image"]
    )
    assert image_version, docker["image"]
    assert image_version.group(1) == ray.__version__


def test_head_does_no_work(config):
    head = head_type(config)
    assert head["resources"] == {"CPU": 0}
    assert head.get("max_workers", 0) == 0
    assert INSTANCE_SHAPES[head["node_config"]["InstanceType"]][1] == 0


def test_one_gpu_per_worker_node(config):
    gpu_types = gpu_worker_types(config)
    assert list(gpu_types) == ["ray.worker.gpu"]
    (worker,) = gpu_types.values()
    assert worker["resources"] == {"CPU": 8, "GPU": 1}
    assert (worker["min_workers"], worker["max_workers"]) == (0, 16)
    assert config["max_workers"] >= worker["max_workers"]
    instance = worker["node_config"]["InstanceType"]
    assert instance in INSTANCE_SHAPES, f"add {instance} to INSTANCE_SHAPES"
    assert INSTANCE_SHAPES[instance] == (worker["resources"]["CPU"], worker["resources"]["GPU"])
    # The GPU reaches the container even without a registered nvidia runtime.
    assert "--gpus all" in worker["docker"]["worker_run_options"]


def test_worker_nodes_can_reach_s3(config):
    # Ray attaches an IAM role to the head only; workers read and write S3.
    for worker in gpu_worker_types(config).values():
        assert worker["node_config"]["IamInstanceProfile"] == {"Name": "embcam-worker"}


def test_every_node_pins_a_recent_gpu_ami(config):
    # Without ImageId Ray falls back to an Ubuntu 18.04 / CUDA 11 image, whose driver
    # is too old for the CUDA 13 torch wheels.
    for name, node in config["available_node_types"].items():
        image = node["node_config"].get("ImageId", "")
        assert image not in ("", "latest_dlami"), name
        assert image.startswith("ami-") or image.startswith(
            "resolve:ssm:/aws/service/deeplearning/ami/x86_64/"
        ), (name, image)


def test_every_node_installs_torch_then_embcam(config, no_boto3):
    assert config["file_mounts"]["/home/ray/embcam"] == "."
    prepared = ray_prepare_and_validate(config)
    # prepare_config prepends setup_commands to each node kind's own list.
    for role in ("head_setup_commands", "worker_setup_commands"):
        commands = prepared[role]
        torch = [i for i, c in enumerate(commands)
                 if re.fullmatch(r'pip install "torch==[\d.]+" "torchvision==[\d.]+"', c)]
        embcam = [i for i, c in enumerate(commands)
                  if c == "pip install -e /home/ray/embcam"]
        assert torch and embcam, (role, commands)
        assert torch[0] < embcam[0], (role, commands)


def test_torch_pins_match_the_makefile(config):
    makefile = (CLUSTER_YAML.parent / "Makefile").read_text()
    pins = re.search(r"^TORCH\s*\?=\s*(.+)$", makefile, re.MULTILINE).group(1).split()
    installed = re.findall(r'"([^"]+)"', config["setup_commands"][0])
    assert installed == pins
