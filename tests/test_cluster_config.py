"""cluster.yaml against Ray's own cluster-config schema, with the defaults `ray up` fills in (no cloud call)."""

from __future__ import annotations

import copy
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER_YAML = Path(__file__).resolve().parent.parent / "cluster.yaml"


@pytest.fixture(scope="module")
def raw() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def test_cluster_yaml_validates_as_ray_up_would(raw: dict) -> None:
    config = prepare_config(copy.deepcopy(raw))
    validate_config(config)
    types = config["available_node_types"]
    assert config["head_node_type"] == "head" and types["head"]["resources"] == {"CPU": 0}
    gpu_types = [name for name in types if name != "head"]
    assert gpu_types and all(types[t]["min_workers"] == 0 and types[t]["max_workers"] >= 1 for t in gpu_types)
    assert sum(types[t]["max_workers"] for t in gpu_types) <= config["max_workers"]


def test_cluster_yaml_installs_this_project(raw: dict) -> None:
    assert raw["file_mounts"]["~/lookalike"] == "."
    assert any("pip install" in c and "lookalike[gpu]" in c for c in raw["setup_commands"])
    assert all("RAY_AUTH_MODE=token" in " ".join(raw[k]) for k in ("head_start_ray_commands",
                                                                  "worker_start_ray_commands"))


def test_the_schema_check_catches_mistakes(raw: dict) -> None:
    broken = prepare_config(copy.deepcopy(raw))
    broken["available_node_types"]["gpu_1x"]["min_wokers"] = 1  # a typo Ray must refuse
    with pytest.raises(jsonschema.ValidationError):
        validate_config(broken)
    wrong_head = prepare_config(copy.deepcopy(raw))
    wrong_head["head_node_type"] = "gpu_9x"
    with pytest.raises(ValueError, match="head_node_type"):
        validate_config(wrong_head)


def test_serve_config_arguments_are_the_apps_typed_arguments() -> None:
    """Every argument serve/config.yaml documents is accepted by the app's AppConfig; a typo is refused."""
    from serve.app import AppConfig

    serve_yaml = yaml.safe_load((CLUSTER_YAML.parent / "serve" / "config.yaml").read_text())
    (app,) = serve_yaml["applications"]
    config = AppConfig(**app["args"])
    assert config.decode in ("cpu", "device") and config.crop in ("auto", "off")
    with pytest.raises(TypeError):
        AppConfig(**app["args"], decoder="device")
    with pytest.raises(ValueError, match="decode"):
        AppConfig(**(app["args"] | {"decode": "gpu"}))
