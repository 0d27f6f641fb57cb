"""The deploy/ files, validated by what can run here: the GPU smoke script on its CPU path
(the GPU path is the same learner on ``cuda``; a session with a GPU runs it and reports the
figures), the cluster-launcher YAML against Ray's own schema, the KubeRay manifests through
Ray's own KubeRay reader and raylight's config check, the image's package list, and the
Grafana dashboard against the metrics a real run exports.

KubeRay's CRD schemas are not checked here: no PyPI package ships them and nothing may be
downloaded at test time; Ray's KubeRay autoscaler code reads the same fields the operator does.
"""

import json
import re
import shlex
import subprocess
import sys
import time
import tomllib
import urllib.request
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"


def test_gpu_smoke_script_trains_and_reports_throughput_without_ray_or_vllm(tmp_path):
    # the GPU machine has torch, transformers and peft only: ray and vllm must not be imported
    blocker = tmp_path / "sitecustomize.py"
    blocker.write_text("import sys\nsys.modules['ray'] = None\nsys.modules['vllm'] = None\n")
    command = [sys.executable, str(ROOT / "deploy" / "gpu_smoke.py"), "--model", "tiny", "--device", "cpu",
               "--steps", "2", "--batch", "4", "--prompt-len", "8", "--completion-len", "6", "--micro-batch", "2"]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["tokens_per_step"] == 4 * (8 + 6) and report["tokens_per_second"] > 0
    assert report["losses_finite"] and report["training"] == "lora-r16"
    # LoRA: forward + backward to the inputs, about 4 x parameters x tokens (plus attention)
    assert 3 * report["parameters"] * 56 < report["model_flops_per_step"] < 6 * report["parameters"] * 56
    assert report["mfu"] is None  # no peak known for a CPU



def test_cluster_launcher_yaml_passes_rays_own_schema():
    """What ``ray up`` does first: fill in the provider's defaults, validate against Ray's
    ray-schema.json (which rejects unknown keys)."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(yaml.safe_load((DEPLOY / "cluster.yaml").read_text()))
    validate_config(config)
    assert config["head_node_type"] == "head" and config["available_node_types"]["gpu_worker"]["max_workers"] == 4
    assert any("--metrics-export-port" in c for c in config["head_start_ray_commands"])


def pod_templates(cluster_spec: dict) -> list[dict]:
    return [cluster_spec["headGroupSpec"]["template"]] + [g["template"] for g in cluster_spec["workerGroupSpecs"]]


def check_cluster_spec(cluster_spec: dict, name: str) -> dict:
    """The cluster spec as Ray's KubeRay autoscaler reads it (its node types, validated
    against Ray's cluster schema), and pods whose mounts name volumes they have."""
    from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr
    from ray.autoscaler._private.util import validate_config

    config = _derive_autoscaling_config_from_ray_cr({"metadata": {"name": name, "namespace": "default"}, "spec": cluster_spec})
    validate_config(config)
    for template in pod_templates(cluster_spec):
        volumes = {v["name"] for v in template["spec"].get("volumes", [])}
        for container in template["spec"]["containers"]:
            assert container["image"] == "raylight:gpu"
            assert {m["name"] for m in container.get("volumeMounts", [])} <= volumes, container["name"]
    assert cluster_spec["rayVersion"] == __import__("ray").__version__
    return config["available_node_types"]


def test_kuberay_raycluster_reads_as_a_cpu_head_and_gpu_workers():
    manifest = yaml.safe_load((DEPLOY / "kuberay" / "raycluster.yaml").read_text())
    assert (manifest["apiVersion"], manifest["kind"]) == ("ray.io/v1", "RayCluster")
    nodes = check_cluster_spec(manifest["spec"], manifest["metadata"]["name"])
    assert nodes["headgroup"]["resources"]["GPU"] == 0
    assert nodes["gpu"]["resources"]["GPU"] == 8 and (nodes["gpu"]["min_workers"], nodes["gpu"]["max_workers"]) == (1, 4)


def test_kuberay_rayjob_runs_a_raylight_config_that_loads():
    """The job's entrypoint is a ``raylight train`` command line whose config and overrides
    pass raylight's own config check (a renamed key fails here, not on the cluster)."""
    from cluster.commands.cli import parse_args
    from cluster.config import load_config

    manifest = yaml.safe_load((DEPLOY / "kuberay" / "rayjob.yaml").read_text())
    assert (manifest["apiVersion"], manifest["kind"]) == ("ray.io/v1", "RayJob")
    spec = manifest["spec"]
    assert spec["shutdownAfterJobFinishes"] is True and spec["submissionMode"] in ("K8sJobMode", "HTTPMode", "SidecarMode")
    check_cluster_spec(spec["rayClusterSpec"], manifest["metadata"]["name"])
    words = shlex.split(spec["entrypoint"])
    assert words[0] == "raylight"
    args = parse_args(words[1:])
    config = load_config(ROOT / args.config, [*args.overrides, f"run.run_dir={args.run_dir}"])
    assert config.learner.num_gpus == 1 and config.generator.num_gpus == 1 and config.rollout.mode == "async"
    # retried attempts continue the run instead of starting it over
    assert args.resume_if_exists and spec["backoffLimit"] >= 1


def test_gpu_image_copies_every_package_and_installs_the_gpu_extra():
    dockerfile = (DEPLOY / "Dockerfile.gpu").read_text()
    packages = {p.split(".")[0] for p in tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]}
    copied = set(re.findall(r"^COPY .* (\S+) \1$", dockerfile, flags=re.M))
    assert packages <= copied, f"packages the image does not copy: {sorted(packages - copied)}"
    assert 'pip install --no-cache-dir ".[gpu]"' in dockerfile
    assert "vllm==" in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["gpu"][0]


def dashboard_selectors() -> tuple[set[str], set[str]]:
    """The metric names, and the name regexes, the Grafana dashboard's queries select."""
    dashboard = json.loads((DEPLOY / "grafana" / "raylight-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    names = {m for e in exprs for m in re.findall(r"\b(ray_raylight_\w+)\{", e)}
    patterns = {m for e in exprs for m in re.findall(r'__name__=~"([^"]+)"', e)}
    return names, patterns


@pytest.mark.slow
def test_grafana_dashboard_queries_only_metrics_the_exporter_emits(ray_cluster, ray_metrics_port, tiny_model_path, tmp_path):
    """A short real run exports its metrics through Ray to the Prometheus endpoint; every
    metric the dashboard names must be there (a metric renamed in code fails this test)."""
    from cluster.config import load_config
    from cluster.loop.driver import Trainer
    from cluster.keeping.rundir import RunDir
    from helpers import spread_reward

    names, patterns = dashboard_selectors()
    assert len(names) >= 25 and patterns
    config = load_config("configs/tiny.yaml", [f"model.path={tiny_model_path}", "generator.engine=hf", "eval.n=4", "run.steps=2", "run.save_rollouts=false"])
    run_dir = tmp_path / "grafana-run"
    trainer = Trainer(config, RunDir(run_dir), scorer=spread_reward)
    try:
        trainer.train(2)
        deadline, emitted = time.monotonic() + 60, set()
        while time.monotonic() < deadline:
            body = urllib.request.urlopen(f"http://127.0.0.1:{ray_metrics_port}/metrics", timeout=5).read().decode()
            emitted = {line.split("{", 1)[0] for line in body.splitlines() if line.startswith("ray_raylight_") and f'run="{run_dir.name}"' in line}
            if names <= emitted:
                break
            time.sleep(2)
    finally:
        trainer.shutdown()
    assert names <= emitted, f"the dashboard queries metrics nothing emits: {sorted(names - emitted)}"
    for pattern in patterns:
        assert any(re.fullmatch(pattern, name) for name in emitted), pattern
