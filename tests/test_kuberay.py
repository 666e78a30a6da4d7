"""deploy/kuberay against what can be checked without a Kubernetes cluster: KubeRay's v1 field
names, Ray Serve's own config schema, the jobs' own argument parsers, and the repository's other
configs (serve/config.yaml, cluster.yaml, pyproject.toml). Starts no Ray, opens no connection.

The manifests were never applied to a live cluster here: a wrong *value* that only the KubeRay
operator or the kubelet would refuse can still pass these tests.
"""

from __future__ import annotations

import copy
import inspect
import re
import shlex
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
KUBERAY = ROOT / "deploy" / "kuberay"
RAYJOB = KUBERAY / "rayjob-embed-index.yaml"
RAYSERVICE = KUBERAY / "rayservice.yaml"
DOCKERFILE = KUBERAY / "Dockerfile"

# --- KubeRay ray.io/v1 field names ---------------------------------------------------------------
# The json tags of ray-project/kuberay ray-operator/apis/ray/v1/raycluster_types.go, rayjob_types.go
# and rayservice_types.go (the newest stored versions), cross-checked with the KubeRay API reference
# (docs/reference/api.md; docs.ray.io "KubeRay CRD API reference", v1.6.2 and v1.7.1). `allowed` is
# every field of the type; `required` the fields without omitempty that these manifests must carry,
# plus a few this project requires (noted). Pod templates are Kubernetes core/v1 (PodTemplateSpec,
# PodSpec, Container, ...), whose field names are those of the Kubernetes API reference.
Level = tuple[frozenset[str], frozenset[str]]


def _level(allowed: str, required: str = "") -> Level:
    return frozenset(allowed.split()), frozenset(required.split())


KUBERAY_FIELDS: dict[str, Level] = {
    "object": _level("apiVersion kind metadata spec", "apiVersion kind metadata spec"),
    "metadata": _level("name namespace labels annotations generateName", "name"),
    "RayJobSpec": _level(
        "activeDeadlineSeconds backoffLimit rayClusterSpec submitterPodTemplate metadata clusterSelector "
        "submitterConfig managedBy deletionStrategy submitterFinishedTimeoutSeconds runtimeEnvYAML jobId "
        "submissionMode entrypointResources entrypoint entrypointNumCpus entrypointNumGpus "
        "ttlSecondsAfterFinished shutdownAfterJobFinishes suspend",
        "entrypoint rayClusterSpec"),  # optional in the CRD; a RayJob of ours creates its cluster
    "RayServiceSpec": _level(
        "rayClusterDeletionDelaySeconds serviceUnhealthySecondThreshold deploymentUnhealthySecondThreshold "
        "serveService gateway httpRoute upgradeStrategy serveConfigV2 rayClusterConfig excludeHeadPodFromServeSvc",
        "rayClusterConfig serveConfigV2"),  # serveConfigV2: ours
    "RayServiceUpgradeStrategy": _level("type incrementalUpgradeOptions"),
    "RayClusterSpec": _level(
        "upgradeStrategy authOptions suspend managedBy autoscalerOptions headServiceAnnotations "
        "enableInTreeAutoscaling gcsFaultToleranceOptions historyServerOptions networkPolicy tlsOptions "
        "headGroupSpec rayVersion workerGroupSpecs",
        "headGroupSpec rayVersion authOptions"),  # rayVersion: authOptions token mode needs it; authOptions: ours
    "AuthOptions": _level("mode secretName enableK8sTokenAuth", "mode secretName"),  # both: ours
    "HeadGroupSpec": _level(
        "template headService enableIngress ingressOptions resources labels rayStartParams serviceType",
        "template rayStartParams"),
    "WorkerGroupSpec": _level(
        "suspend groupName replicas minReplicas maxReplicas idleTimeoutSeconds priority resources labels "
        "rayStartParams template scaleStrategy numOfHosts",
        "groupName replicas minReplicas maxReplicas rayStartParams template"),
    # Kubernetes core/v1.
    "PodTemplateSpec": _level("metadata spec", "spec"),
    "PodSpec": _level(
        "volumes initContainers containers ephemeralContainers restartPolicy terminationGracePeriodSeconds "
        "activeDeadlineSeconds dnsPolicy nodeSelector serviceAccountName serviceAccount "
        "automountServiceAccountToken nodeName hostNetwork hostPID hostIPC shareProcessNamespace "
        "securityContext imagePullSecrets hostname subdomain affinity schedulerName tolerations hostAliases "
        "priorityClassName priority dnsConfig readinessGates runtimeClassName enableServiceLinks "
        "preemptionPolicy overhead topologySpreadConstraints setHostnameAsFQDN os hostUsers schedulingGates "
        "resourceClaims resources",
        "containers"),
    "Container": _level(
        "name image command args workingDir ports envFrom env resources resizePolicy restartPolicy "
        "volumeMounts volumeDevices livenessProbe readinessProbe startupProbe lifecycle terminationMessagePath "
        "terminationMessagePolicy imagePullPolicy securityContext stdin stdinOnce tty",
        "name image"),
    "EnvVar": _level("name value valueFrom", "name"),
    "EnvVarSource": _level("secretKeyRef configMapKeyRef fieldRef resourceFieldRef fileKeyRef"),
    "SecretKeySelector": _level("name key optional", "name key"),
    "ResourceRequirements": _level("limits requests claims"),
    "ContainerPort": _level("containerPort name protocol hostPort hostIP", "containerPort"),
    "VolumeMount": _level("name mountPath readOnly recursiveReadOnly subPath subPathExpr mountPropagation",
                          "name mountPath"),
    "Volume": _level(
        "name emptyDir hostPath persistentVolumeClaim ephemeral secret configMap projected downwardAPI csi nfs image",
        "name"),
    "EmptyDirVolumeSource": _level("medium sizeLimit"),
    "Toleration": _level("key operator value effect tolerationSeconds"),
}
SUBMISSION_MODES = {"K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"}
UPGRADE_TYPES = {"NewCluster", "None"}  # the API reference: "Currently supports NewCluster and None"
GPU = "nvidia.com/gpu"
SECRET_NAME = re.compile(r"KEY|TOKEN|SECRET|PASSWORD|CREDENTIAL", re.IGNORECASE)
CREDENTIAL_LIKE = re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b|(?<![\w/.:-])[A-Za-z0-9+/_-]{32,}={0,2}(?![\w/.:-])")


def _fields(node: Any, level: str, where: str, problems: list[str]) -> dict:
    """Records unknown and missing fields of ``node`` against :data:`KUBERAY_FIELDS` [level]."""
    if not isinstance(node, dict):
        problems.append(f"{where}: expected a mapping ({level}), got {type(node).__name__}")
        return {}
    allowed, required = KUBERAY_FIELDS[level]
    problems += [f"{where}.{key}: unknown field of {level}" for key in node if key not in allowed]
    problems += [f"{where}.{key}: missing ({level})" for key in sorted(required) if key not in node]
    return node


def _check_env(env: Any, where: str, problems: list[str]) -> None:
    for i, var in enumerate(env or []):
        at = f"{where}.env[{i}]"
        _fields(var, "EnvVar", at, problems)
        source = var.get("valueFrom")
        if source is not None:
            _fields(source, "EnvVarSource", f"{at}.valueFrom", problems)
            if "secretKeyRef" in source:
                _fields(source["secretKeyRef"], "SecretKeySelector", f"{at}.valueFrom.secretKeyRef", problems)
        if SECRET_NAME.search(str(var.get("name", ""))) and "secretKeyRef" not in (source or {}):
            problems.append(f"{at}: {var.get('name')} must come from a Secret (valueFrom.secretKeyRef)")


def _check_pod(template: Any, where: str, problems: list[str]) -> dict:
    template = _fields(template, "PodTemplateSpec", where, problems)
    spec = _fields(template.get("spec"), "PodSpec", f"{where}.spec", problems)
    volumes = set()
    for i, volume in enumerate(spec.get("volumes") or []):
        _fields(volume, "Volume", f"{where}.spec.volumes[{i}]", problems)
        if "emptyDir" in volume:
            _fields(volume["emptyDir"], "EmptyDirVolumeSource", f"{where}.spec.volumes[{i}].emptyDir", problems)
        volumes.add(volume.get("name"))
    for i, toleration in enumerate(spec.get("tolerations") or []):
        _fields(toleration, "Toleration", f"{where}.spec.tolerations[{i}]", problems)
    for i, container in enumerate(spec.get("containers") or []):
        at = f"{where}.spec.containers[{i}]"
        _fields(container, "Container", at, problems)
        _fields(container.get("resources", {}), "ResourceRequirements", f"{at}.resources", problems)
        for j, port in enumerate(container.get("ports") or []):
            _fields(port, "ContainerPort", f"{at}.ports[{j}]", problems)
        for j, mount in enumerate(container.get("volumeMounts") or []):
            _fields(mount, "VolumeMount", f"{at}.volumeMounts[{j}]", problems)
            if mount.get("name") not in volumes:
                problems.append(f"{at}.volumeMounts[{j}]: no volume named {mount.get('name')!r} in the pod")
        _check_env(container.get("env"), at, problems)
    return spec


def _check_cluster(cluster: Any, where: str, problems: list[str]) -> None:
    if cluster is None:
        return  # reported as missing by the level above
    cluster = _fields(cluster, "RayClusterSpec", where, problems)
    auth = _fields(cluster.get("authOptions", {}), "AuthOptions", f"{where}.authOptions", problems)
    if auth.get("mode") != "token":
        problems.append(f"{where}.authOptions.mode: must be token (Ray token authentication)")
    head = _fields(cluster.get("headGroupSpec"), "HeadGroupSpec", f"{where}.headGroupSpec", problems)
    groups = [(f"{where}.headGroupSpec", head)]
    for i, group in enumerate(cluster.get("workerGroupSpecs") or []):
        at = f"{where}.workerGroupSpecs[{i}]"
        _fields(group, "WorkerGroupSpec", at, problems)
        groups.append((at, group))
        counts = [group[k] for k in ("minReplicas", "replicas", "maxReplicas") if k in group]
        if len(counts) == 3 and not (all(isinstance(c, int) for c in counts) and counts[0] <= counts[1] <= counts[2]):
            problems.append(f"{at}: needs integers minReplicas <= replicas <= maxReplicas, got {counts}")
    for at, group in groups:
        params = group.get("rayStartParams")
        if not isinstance(params, dict) or not all(isinstance(v, str) for v in params.values()):
            problems.append(f"{at}.rayStartParams: must map to strings (KubeRay's map[string]string)")
        _check_pod(group.get("template"), f"{at}.template", problems)


def check_kuberay(manifest: Any) -> list[str]:
    """The ways ``manifest`` (a parsed RayJob or RayService) departs from KubeRay's v1 API and from
    the rules of this project (token auth from a Secret, no literal credentials); empty when none."""
    problems: list[str] = []
    manifest = _fields(manifest, "object", "", problems)
    if manifest.get("apiVersion") != "ray.io/v1":
        problems.append(f".apiVersion: must be ray.io/v1, got {manifest.get('apiVersion')!r}")
    _fields(manifest.get("metadata"), "metadata", ".metadata", problems)
    kind = manifest.get("kind")
    if kind == "RayJob":
        spec = _fields(manifest.get("spec"), "RayJobSpec", ".spec", problems)
        if spec.get("submissionMode", "K8sJobMode") not in SUBMISSION_MODES:
            problems.append(f".spec.submissionMode: one of {sorted(SUBMISSION_MODES)}")
        _check_cluster(spec.get("rayClusterSpec"), ".spec.rayClusterSpec", problems)
    elif kind == "RayService":
        spec = _fields(manifest.get("spec"), "RayServiceSpec", ".spec", problems)
        if "upgradeStrategy" in spec:
            strategy = _fields(spec["upgradeStrategy"], "RayServiceUpgradeStrategy", ".spec.upgradeStrategy", problems)
            if strategy.get("type") not in UPGRADE_TYPES:
                problems.append(f".spec.upgradeStrategy.type: one of {sorted(UPGRADE_TYPES)}")
        if not isinstance(spec.get("serveConfigV2"), str):
            problems.append(".spec.serveConfigV2: must be a YAML string")
        _check_cluster(spec.get("rayClusterConfig"), ".spec.rayClusterConfig", problems)
    else:
        problems.append(f".kind: must be RayJob or RayService, got {kind!r}")
    problems += [f"{where}: {text!r} looks like a credential; reference a Secret instead"
                 for where, text in _strings(manifest) if CREDENTIAL_LIKE.search(text)]
    return problems


def _strings(node: Any, where: str = "") -> list[tuple[str, str]]:
    """Every string in ``node`` (keys and values; serveConfigV2 and the entrypoint included)."""
    if isinstance(node, dict):
        return [pair for key, value in node.items()
                for pair in [(f"{where}.{key}", str(key))] + _strings(value, f"{where}.{key}")]
    if isinstance(node, list):
        return [pair for i, value in enumerate(node) for pair in _strings(value, f"{where}[{i}]")]
    return [(where, node)] if isinstance(node, str) else []


def _ray_pods(manifest: dict) -> list[tuple[str, dict]]:
    """(group name, pod spec) of the head ("head") and of each worker group."""
    spec = manifest["spec"]
    cluster = spec.get("rayClusterSpec") or spec.get("rayClusterConfig")
    return [("head", cluster["headGroupSpec"]["template"]["spec"])] + [
        (group["groupName"], group["template"]["spec"]) for group in cluster.get("workerGroupSpecs", [])]


def _env(container: dict) -> dict[str, dict]:
    return {var["name"]: var for var in container.get("env", [])}


def _load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


@pytest.fixture(scope="module", params=[RAYJOB, RAYSERVICE], ids=["rayjob", "rayservice"])
def manifest(request) -> dict:
    return _load(request.param)


# --- 3. KubeRay structure, GPUs, Secrets, image -------------------------------------------------

def test_manifests_use_only_kuberay_v1_fields_and_reference_secrets(manifest: dict) -> None:
    assert manifest["kind"] in ("RayJob", "RayService")
    assert check_kuberay(manifest) == []


def test_gpu_workers_request_gpus_and_every_pod_gets_s3_keys_from_a_secret(manifest: dict) -> None:
    pods = _ray_pods(manifest)
    gpu_groups = []
    for group, pod in pods:
        (container,) = pod["containers"]  # one Ray container a pod
        resources = container["resources"]
        if GPU in resources.get("limits", {}):
            gpu_groups.append(group)
            assert int(resources["limits"][GPU]) >= 1
            assert resources["requests"][GPU] == resources["limits"][GPU]  # extended resources: equal
        env = _env(container)
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            assert env[name]["valueFrom"]["secretKeyRef"]["name"] == "lookalike-s3", (group, name)
            assert "value" not in env[name]
        assert "RAY_AUTH_TOKEN" not in env  # the operator injects it from authOptions.secretName
    assert "head" not in gpu_groups and gpu_groups, "a CPU head (as cluster.yaml) and a GPU worker group"
    cluster = manifest["spec"].get("rayClusterSpec") or manifest["spec"]["rayClusterConfig"]
    assert cluster["authOptions"] == {"mode": "token", "secretName": "lookalike-ray-auth"}
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"


def test_every_service_pod_reads_the_api_keys_from_an_optional_secret() -> None:
    """Any pod may host an ingress replica: each gets LOOKALIKE_API_KEYS (serve/access.py) from the
    Secret lookalike-api-keys, optional (no Secret: a service without keys)."""
    from serve.access import KEYS_ENV

    for group, pod in _ray_pods(_load(RAYSERVICE)):
        ref = _env(pod["containers"][0])[KEYS_ENV]["valueFrom"]["secretKeyRef"]
        assert ref == {"name": "lookalike-api-keys", "key": "keys", "optional": True}, group


def test_every_pod_runs_cluster_yamls_image_with_the_project_installed(manifest: dict) -> None:
    """One image everywhere, built from deploy/kuberay/Dockerfile: cluster.yaml's image with the
    project installed as cluster.yaml installs it."""
    cluster_yaml = _load(ROOT / "cluster.yaml")
    base = cluster_yaml["docker"]["image"]  # rayproject/ray:2.60.0-py311-gpu
    images = {c["image"] for _, pod in _ray_pods(manifest) for c in pod["containers"]}
    (image,) = images
    tag = base.split(":", 1)[1]
    assert image.endswith(f":ray{tag}")
    cluster = manifest["spec"].get("rayClusterSpec") or manifest["spec"]["rayClusterConfig"]
    assert cluster["rayVersion"] == tag.split("-")[0]

    dockerfile = DOCKERFILE.read_text()
    assert re.search(rf"^FROM {re.escape(base)}$", dockerfile, re.MULTILINE)
    assert image in dockerfile  # the build command in its header names the manifests' image
    (install,) = [c for c in cluster_yaml["setup_commands"] if "pip install" in c]
    assert "-e" in install.split() and "[gpu]" in install
    assert re.search(r'^RUN pip install .*-e "\.\[gpu\]"$', dockerfile, re.MULTILINE)
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = {name.split(".")[0] for name in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]}
    copied = set(re.findall(r"^COPY \S+ (\w+) \./\1$", dockerfile, re.MULTILINE))
    assert packages == copied == {"pipeline", "jobs", "serve"}
    assert pyproject["project"]["readme"] in dockerfile  # setuptools reads it at install time


# --- 1. The RayService's Serve config -----------------------------------------------------------

def check_serve_config(manifest: dict) -> list[str]:
    """The RayService's serveConfigV2 against Ray Serve's own schema and against serve/config.yaml."""
    from ray.serve.schema import DeploymentSchema, HTTPOptionsSchema, ServeApplicationSchema, ServeDeploySchema

    config = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    problems: list[str] = []
    try:
        ServeDeploySchema.model_validate(config)
    except ValueError as exc:  # pydantic.ValidationError is a ValueError
        return [f"ServeDeploySchema: {exc}"]
    # These schemas accept (and ignore) unknown keys for forward compatibility: a misspelled
    # option would be dropped silently, so unknown keys are refused here.
    levels = [(config, ServeDeploySchema, "serveConfigV2"),
              (config.get("http_options", {}), HTTPOptionsSchema, "http_options")]
    for app in config["applications"]:
        levels.append((app, ServeApplicationSchema, f"applications[{app['name']}]"))
        levels += [(d, DeploymentSchema, f"applications[{app['name']}].deployments[{d['name']}]")
                   for d in app.get("deployments", [])]
    problems += [f"{where}.{key}: not a field of {schema.__name__}"
                 for node, schema, where in levels for key in node if key not in schema.model_fields]

    # The same applications and deployments as serve/config.yaml (read now: it may change). The
    # deployment names must be equal sets. The args must be a subset of its keys, not an equal set:
    # serve/config.yaml documents every argument (new ones may land there first, e.g. API keys),
    # and a key it lacks is a misspelling or an argument the app does not have.
    local = _load(ROOT / "serve" / "config.yaml")
    ours = {app["name"]: app for app in config["applications"]}
    theirs = {app["name"]: app for app in local["applications"]}
    if set(ours) != set(theirs):
        return problems + [f"applications {sorted(ours)} != serve/config.yaml's {sorted(theirs)}"]
    for name, app in ours.items():
        local_app = theirs[name]
        for key in ("import_path", "route_prefix"):
            if app.get(key) != local_app.get(key):
                problems.append(f"{name}.{key}: {app.get(key)!r} != serve/config.yaml's {local_app.get(key)!r}")
        extra = set(app["args"]) - set(local_app["args"])
        if extra:
            problems.append(f"{name}.args: {sorted(extra)} are not arguments in serve/config.yaml")
        if not str(app["args"].get("index", "")).startswith("s3://"):
            problems.append(f"{name}.args.index: must be an s3:// URI, got {app['args'].get('index')!r}")
        deployments = {d["name"]: d for d in app["deployments"]}
        local_deployments = {d["name"]: d for d in local_app["deployments"]}
        if set(deployments) != set(local_deployments):
            problems.append(f"{name}: deployments {sorted(deployments)} != serve/config.yaml's "
                            f"{sorted(local_deployments)}")
        for dname, deployment in deployments.items():
            if "autoscaling_config" in local_deployments.get(dname, {}) and "autoscaling_config" not in deployment:
                problems.append(f"{name}.{dname}: autoscales in serve/config.yaml, not here")
        for dname in ("Classifier", "Embedder"):
            gpus = deployments.get(dname, {}).get("ray_actor_options", {}).get("num_gpus", 0)
            if not 0 < gpus <= 1:
                problems.append(f"{name}.{dname}: needs a GPU fraction (num_gpus in (0, 1]), got {gpus}")
    if config.get("http_options", {}).get("host") != "0.0.0.0":
        problems.append("http_options.host: must be 0.0.0.0 (the proxies listen on the pod's address)")
    return problems


def test_serve_config_is_valid_for_ray_serve_and_matches_serve_config_yaml() -> None:
    service = _load(RAYSERVICE)
    assert check_serve_config(service) == []
    config = yaml.safe_load(service["spec"]["serveConfigV2"])
    (app,) = config["applications"]
    assert app["import_path"] == "serve.app:build_app"
    assert app["args"]["index_poll_s"] > 0  # the service follows new index versions


def test_replicas_cache_the_index_on_a_volume() -> None:
    """LOOKALIKE_CACHE (the variable the index reader reads) points into a mounted volume in every
    pod that can run replicas."""
    from pipeline.index import reader

    assert 'os.environ.get("LOOKALIKE_CACHE")' in inspect.getsource(reader.cached_copy)
    for group, pod in _ray_pods(_load(RAYSERVICE)):
        (container,) = pod["containers"]
        cache = _env(container)["LOOKALIKE_CACHE"]["value"]
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        (mount,) = [path for path in mounts if cache.startswith(path.rstrip("/") + "/")]
        assert mounts[mount] in {v["name"] for v in pod["volumes"]}, group


# --- 2. The RayJob's entrypoint -----------------------------------------------------------------

def _commands(entrypoint: str) -> list[list[str]]:
    """The commands of an entrypoint ``bash -c 'A && B && ...'`` (shlex tokens of each).

    Raises:
        ValueError: anything but one ``bash -c SCRIPT``. KubeRay's submitter runs ``ray job submit
            ... -- ENTRYPOINT`` in a shell, so in a bare ``A && B`` only A runs on the Ray cluster and
            B in the submitter pod (ray-project/kuberay#3802, #3929).
    """
    match shlex.split(entrypoint):
        case ["bash", "-c", script]:
            pass
        case _:
            raise ValueError(f"the entrypoint must be one bash -c '...', got {entrypoint!r}")
    commands, current = [], []
    for token in shlex.split(script):
        if token == "&&":
            commands.append(current)
            current = []
        else:
            current.append(token)
    return commands + [current]


def parse_entrypoint(entrypoint: str) -> dict[str, Any]:
    """Each ``python -m jobs.X ARGS`` parsed by that job's own parser, as it would be under
    ``ray job submit`` (where a relative output is refused): {module: parsed settings}.

    Raises:
        SystemExit: a job's parser refused its arguments (argparse's exit).
        ValueError: not one ``bash -c`` script, or a command in it that is not ``python -m
            jobs.embed|jobs.build_index``.
    """
    from jobs import build_index, embed
    from pipeline.files import check_output_folder

    parsed = {}
    for command in _commands(entrypoint):
        match command:
            case ["python", "-m", "jobs.embed", *args]:
                parsed["jobs.embed"] = embed.parse_args(args)
            case ["python", "-m", "jobs.build_index", *args]:
                parser = build_index.build_parser()
                namespace = parser.parse_args(args)
                if problem := check_output_folder(namespace.output):
                    parser.error(problem)
                parsed["jobs.build_index"] = namespace
            case _:
                raise ValueError(f"not a job command: {shlex.join(command)}")
    return parsed


def test_rayjob_entrypoint_parses_with_the_jobs_own_parsers(monkeypatch) -> None:
    from pipeline.files import RAY_JOB_ENV
    from pipeline.models.catalog import require_known

    monkeypatch.setenv(RAY_JOB_ENV, "{}")  # as under ray job submit: relative outputs are refused
    job = _load(RAYJOB)
    parsed = parse_entrypoint(job["spec"]["entrypoint"])
    assert list(parsed) == ["jobs.embed", "jobs.build_index"]
    embed, index = parsed["jobs.embed"], parsed["jobs.build_index"]
    paths = [*embed.inputs, embed.output, index.embeddings, index.output]
    assert all(p.startswith("s3://") for p in paths), paths
    assert index.embeddings == embed.output  # the index is built from what the embed step wrote
    assert not (index.append or index.update or index.delete) and index.ray
    for spec in (embed.classifier, embed.embedder):
        require_known(spec)  # names the library knows (no download)

    # The actors the job asks for fit the GPU workers it brings.
    cluster = job["spec"]["rayClusterSpec"]
    gpus = sum(group["replicas"] * int(group["template"]["spec"]["containers"][0]["resources"]["limits"].get(GPU, 0))
               for group in cluster["workerGroupSpecs"])
    assert embed.num_actors * embed.num_gpus <= gpus

    # The service serves the index this job builds.
    service_config = yaml.safe_load(_load(RAYSERVICE)["spec"]["serveConfigV2"])
    assert service_config["applications"][0]["args"]["index"] == index.output


def test_entrypoint_check_refuses_relative_outputs_unknown_flags_and_bare_chains(monkeypatch) -> None:
    from pipeline.files import RAY_JOB_ENV

    monkeypatch.setenv(RAY_JOB_ENV, "{}")
    with pytest.raises(SystemExit):
        parse_entrypoint("bash -c 'python -m jobs.embed --input s3://b/in --output out/emb'")
    with pytest.raises(SystemExit):
        parse_entrypoint("bash -c 'python -m jobs.embed --input s3://b/in --output s3://b/emb "
                         "&& python -m jobs.build_index --embeddings s3://b/emb --output s3://b/i --shards 4'")
    with pytest.raises(ValueError, match="not a job command"):
        parse_entrypoint("bash -c 'python -m jobs.embed --input s3://b/in --output s3://b/emb && sleep 1'")
    with pytest.raises(ValueError, match="one bash -c"):  # B would run in the submitter pod
        parse_entrypoint("python -m jobs.embed --input s3://b/in --output s3://b/emb "
                         "&& python -m jobs.build_index --embeddings s3://b/emb --output s3://b/i")


# --- 4. The checks can fail ---------------------------------------------------------------------

def _edit(path: Path, change) -> dict:
    manifest = copy.deepcopy(_load(path))
    change(manifest)
    return manifest


def _rename(node: dict, old: str, new: str) -> None:
    node[new] = node.pop(old)


def _head_container(m: dict) -> dict:
    return _ray_pods(m)[0][1]["containers"][0]


@pytest.mark.parametrize("path, change, expected", [
    (RAYJOB, lambda m: _rename(m["spec"]["rayClusterSpec"]["workerGroupSpecs"][0], "minReplicas", "minReplica"),
     [".spec.rayClusterSpec.workerGroupSpecs[0].minReplica: unknown field of WorkerGroupSpec",
      ".spec.rayClusterSpec.workerGroupSpecs[0].minReplicas: missing (WorkerGroupSpec)"]),
    (RAYSERVICE, lambda m: _rename(m["spec"], "rayClusterConfig", "rayClusterConfg"),
     [".spec.rayClusterConfg: unknown field of RayServiceSpec", ".spec.rayClusterConfig: missing (RayServiceSpec)"]),
    (RAYJOB, lambda m: _rename(m["spec"], "entrypoint", "entryPoint"),
     [".spec.entryPoint: unknown field of RayJobSpec", ".spec.entrypoint: missing (RayJobSpec)"]),
    (RAYSERVICE, lambda m: _rename(_head_container(m), "volumeMounts", "volumeMount"),
     [".spec.rayClusterConfig.headGroupSpec.template.spec.containers[0].volumeMount: unknown field of Container"]),
    (RAYJOB, lambda m: m["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"].update({"num-cpus": 0}),
     [".spec.rayClusterSpec.headGroupSpec.rayStartParams: must map to strings (KubeRay's map[string]string)"]),
    (RAYSERVICE, lambda m: _head_container(m)["env"].append({"name": "RAY_AUTH_TOKEN", "value": "not-a-secret"}),
     [f".spec.rayClusterConfig.headGroupSpec.template.spec.containers[0].env[{len(_head_container(_load(RAYSERVICE))['env'])}]: "
      "RAY_AUTH_TOKEN must come from a Secret (valueFrom.secretKeyRef)"]),  # the appended, last entry
    (RAYJOB, lambda m: m["spec"]["rayClusterSpec"].pop("authOptions"),
     [".spec.rayClusterSpec.authOptions: missing (RayClusterSpec)", ".spec.rayClusterSpec.authOptions.mode: "
      "missing (AuthOptions)", ".spec.rayClusterSpec.authOptions.secretName: missing (AuthOptions)",
      ".spec.rayClusterSpec.authOptions.mode: must be token (Ray token authentication)"]),
], ids=["worker-minReplica", "rayClusterConfg", "entryPoint", "volumeMount", "int-rayStartParams",
        "literal-token", "no-authOptions"])
def test_the_kuberay_check_fails_on_a_misspelled_or_insecure_manifest(path: Path, change, expected: list[str]) -> None:
    assert sorted(check_kuberay(_edit(path, change))) == sorted(expected)


def test_the_credential_scan_finds_keys_pasted_anywhere() -> None:
    fake_key = "AKIA" + "ABCDEFGHIJKLMNOP"  # the shape of an AWS access key id, split so this file has none
    fake_secret = "Zm9vYmFy" * 5  # 40 characters of base64
    env_var = _edit(RAYJOB, lambda m: _head_container(m)["env"].append({"name": "S3_ID", "value": fake_key}))
    in_entrypoint = _edit(RAYJOB, lambda m: m["spec"].update(entrypoint=m["spec"]["entrypoint"] + f" {fake_secret}"))
    assert any("looks like a credential" in p and "env[5].value" in p for p in check_kuberay(env_var))
    assert any("looks like a credential" in p and ".spec.entrypoint" in p for p in check_kuberay(in_entrypoint))


def test_the_serve_config_check_fails_on_a_misspelled_option_or_a_missing_deployment() -> None:
    def edit(change) -> dict:
        service = copy.deepcopy(_load(RAYSERVICE))
        config = yaml.safe_load(service["spec"]["serveConfigV2"])
        change(config["applications"][0])
        service["spec"]["serveConfigV2"] = yaml.safe_dump(config)
        return service

    def misspell(app: dict) -> None:
        _rename(app["deployments"][0], "max_ongoing_requests", "max_ongoing_request")

    assert check_serve_config(edit(misspell)) == [
        "applications[lookalike].deployments[Ingress].max_ongoing_request: not a field of DeploymentSchema"]
    assert check_serve_config(edit(lambda app: app["deployments"].pop())) == [
        "lookalike: deployments ['Classifier', 'Embedder', 'Ingress'] != serve/config.yaml's "
        "['Classifier', 'Embedder', 'Ingress', 'Retriever0']"]
    assert check_serve_config(edit(lambda app: app["args"].update(index="/data/index", decoder="device"))) == [
        "lookalike.args: ['decoder'] are not arguments in serve/config.yaml",
        "lookalike.args.index: must be an s3:// URI, got '/data/index'"]
    schema_error = check_serve_config(edit(lambda app: app["deployments"][1]["ray_actor_options"].update(num_gpus=-1)))
    assert len(schema_error) == 1 and schema_error[0].startswith("ServeDeploySchema:")
