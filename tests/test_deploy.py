"""deploy/, offline: the KubeRay manifests against a schema of the fields they use, and the
container file against the Makefile's install.

The schema (tests/data/kuberay-v1-subset.schema.json) is a hand-written subset of the KubeRay
v1 CRDs (RayCluster, RayJob) and of the core ConfigMap/PodTemplateSpec: the names, types,
enums and required lists of those OpenAPI schemas for the fields deploy/kuberay/ uses, and
stricter than the API server in one way: an unknown field is refused (the server would drop
it without a word). No cluster, no network.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
import tomllib
from pathlib import Path

import jsonschema
import pytest
import yaml

from flows.config import parse_job
from storage.location import is_url

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
SCHEMA = json.loads((Path(__file__).parent / "data" / "kuberay-v1-subset.schema.json").read_text())
MANIFESTS = ["kuberay/raycluster.yaml", "kuberay/rayjob.yaml"]


def _docs(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((DEPLOY / name).read_text()) if d is not None]


def _errors(doc: dict) -> list[str]:
    v = jsonschema.Draft202012Validator(SCHEMA)
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in v.iter_errors(doc)]


def _by_kind(kind: str) -> dict:
    (doc,) = [d for name in MANIFESTS for d in _docs(name) if d["kind"] == kind]
    return doc


def test_schema_is_a_valid_json_schema() -> None:
    jsonschema.Draft202012Validator.check_schema(SCHEMA)


@pytest.mark.parametrize("name", MANIFESTS)
def test_manifests_validate_against_the_schema(name: str) -> None:
    docs = _docs(name)
    assert docs
    for doc in docs:
        assert _errors(doc) == [], doc.get("kind")


def test_the_schema_refuses_what_the_cluster_would_not_take() -> None:
    """Not vacuous: a misspelt field, a worker group without its name, a bad quantity, an
    unknown auth mode and a wrong API version are each refused."""
    rc = _by_kind("RayCluster")
    bad = []
    d = copy.deepcopy(rc)
    d["spec"]["workerGroupSpecs"][0]["maxReplica"] = 2
    bad.append(d)
    d = copy.deepcopy(rc)
    del d["spec"]["workerGroupSpecs"][0]["groupName"]
    bad.append(d)
    d = copy.deepcopy(rc)
    head = d["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    head["resources"]["limits"]["memory"] = "8 GB"
    bad.append(d)
    d = copy.deepcopy(rc)
    d["spec"]["authOptions"]["mode"] = "tokens"
    bad.append(d)
    d = copy.deepcopy(rc)
    d["apiVersion"] = "ray.io/v1alpha2"
    bad.append(d)
    for d in bad:
        assert _errors(d), d


def test_rayjob_runs_the_job_of_its_configmap_on_the_raycluster_spec() -> None:
    rc, rj, cm = _by_kind("RayCluster"), _by_kind("RayJob"), _by_kind("ConfigMap")
    spec = rj["spec"]
    assert spec["rayClusterSpec"] == rc["spec"]  # one cluster definition, two ways to use it
    head = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    cm_name = cm["metadata"]["name"]
    (vol,) = [v for v in head["volumes"] if v.get("configMap", {}).get("name") == cm_name]
    (mount,) = [m for m in head["containers"][0]["volumeMounts"] if m["name"] == vol["name"]]
    argv = shlex.split(spec["entrypoint"])
    assert argv[:2] == ["neuronmap", "run"]
    job_path = Path(argv[2])
    assert job_path.parent == Path(mount["mountPath"]) and job_path.name in cm["data"]
    job = parse_job(yaml.safe_load(cm["data"][job_path.name]))
    assert is_url(job.atlas)  # every pod reaches it
    gpus = [g for g in rc["spec"]["workerGroupSpecs"]
            if g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu")]  # fmt: skip
    assert job.resources.workers == sum(g["replicas"] for g in gpus)


def test_raycluster_one_gpu_per_worker_the_project_image_and_ray_version() -> None:
    rc = _by_kind("RayCluster")
    spec = rc["spec"]
    pins = dict(line.split("==") for line in (ROOT / "constraints.txt").read_text().splitlines()
                if "==" in line and not line.startswith("#"))  # fmt: skip
    assert spec["rayVersion"] == pins["ray"]
    assert spec["authOptions"]["mode"] == "token"
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    images = {c["image"] for g in groups for c in g["template"]["spec"]["containers"]}
    assert len(images) == 1 and images.pop().split(":")[-1] == _project_version()
    for g in spec["workerGroupSpecs"]:
        (c,) = g["template"]["spec"]["containers"]
        assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"
        assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
    ports = {p["name"]: p["containerPort"]
             for p in spec["headGroupSpec"]["template"]["spec"]["containers"][0]["ports"]}  # fmt: skip
    assert ports == {"gcs-server": 6379, "dashboard": 8265, "client": 10001}


# ------------------------------------------------------------------ the container file


def _project_version() -> str:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


def _dockerfile() -> list[tuple[str, str]]:
    """(instruction, arguments), continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", (DEPLOY / "Dockerfile").read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


def _pip_installs(lines: list[str], pip: str) -> list[list[str]]:
    """The arguments of each ``pip install`` (``-q`` dropped)."""
    out = []
    for line in lines:
        for cmd in line.split("&&"):
            argv = shlex.split(cmd)
            if argv[:2] == [pip, "install"]:
                out.append([a for a in argv[2:] if a != "-q"])
    return out


def test_dockerfile_copies_what_exists_and_ignores_nothing_it_copies() -> None:
    ignored = [p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines()
               if p.strip() and not p.startswith("#")]  # fmt: skip
    copies = [args.split() for op, args in _dockerfile() if op == "COPY"]
    assert copies
    sources = [s for args in copies for s in args[:-1]]
    for src in sources:
        assert not src.startswith("--"), "no COPY --from/--chown needed"
        assert (ROOT / src).exists(), src
        assert src not in ignored and src.split("/")[0] not in ignored, src
    # what `pip install .` needs: the packages pyproject finds and the readme it names
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    needed = {"pyproject.toml", "constraints.txt", meta["project"]["readme"]}
    needed |= {p.rstrip("*") for p in meta["tool"]["setuptools"]["packages"]["find"]["include"]}
    assert needed <= {Path(s).name for s in sources}, needed - {Path(s).name for s in sources}


def test_dockerfile_installs_as_the_makefile_does() -> None:
    """torch first and exactly, the project under constraints.txt with the same extra
    packages (non-editable, the s3 extra instead of dev), the data-only wheels without
    dependencies; the Python of ENV.md."""
    ops = _dockerfile()
    (base,) = [a for op, a in ops if op == "FROM"]
    assert base.startswith("python:3.11")
    docker = _pip_installs([a for op, a in ops if op == "RUN"], "pip")
    make = _pip_installs([ln.strip() for ln in (ROOT / "Makefile").read_text().splitlines()
                          if ln.startswith("\t$(PIP)")], "$(PIP)")  # fmt: skip
    assert len(docker) == len(make) == 3
    assert docker[0] == make[0] == ["torch==2.13.0"]
    assert make[1][:3] == ["-c", "constraints.txt", "-e"] and make[1][3] == ".[dev]"
    assert docker[1][:3] == ["-c", "constraints.txt", ".[s3]"]
    assert docker[1][3:] == make[1][4:]  # the same extra packages (the bundled corpus)
    assert docker[2] == make[2] and docker[2][0] == "--no-deps"
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert "s3" in meta["optional-dependencies"]


def test_readme_and_deploy_name_no_removed_file() -> None:
    for p in [ROOT / "README.md", *DEPLOY.rglob("*.yaml")]:
        assert "ray-cluster.yaml" not in p.read_text(), p
