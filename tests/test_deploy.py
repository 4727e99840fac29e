"""The Kubernetes manifests in deploy/ pass the Kubernetes schemas, and their trainer and vLLM
containers agree with each other and with the flags of `experiments.rl`."""

import glob
import os

import kubernetes_validate
import pytest
import yaml
from absl import flags

from experiments import run_flags
from k15jax.rollout import servers

DEPLOY = os.path.join(os.path.dirname(__file__), os.pardir, "deploy")
KUBERNETES = "1.34.0"  # the first release with the ResourceClaim API (resource.k8s.io/v1) GA


def _docs(name):
    with open(os.path.join(DEPLOY, name)) as f:
        return [doc for doc in yaml.safe_load_all(f) if doc]


def _pod(docs, kind):
    (doc,) = [d for d in docs if d["kind"] == kind]
    return doc["spec"]["template"]["spec"]


def _container(pod, name):
    for c in pod.get("initContainers", []) + pod["containers"]:
        if c["name"] == name:
            return c
    raise KeyError(name)


def _arg(container, name):
    (value,) = [a.split("=", 1)[1] for a in container["args"] if a.startswith(f"--{name}=")]
    return value


def _mount(container, volume):
    (path,) = [m["mountPath"] for m in container["volumeMounts"] if m["name"] == volume]
    return path


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(DEPLOY, "*.yaml"))))
def test_manifests_pass_the_kubernetes_schemas(path):
    docs = _docs(os.path.basename(path))
    assert docs
    for doc in docs:
        kubernetes_validate.validate(doc, KUBERNETES, strict=True)


def test_the_schema_check_catches_a_mistake():
    (job,) = [d for d in _docs("colocated.yaml") if d["kind"] == "Job"]
    job["spec"]["template"]["spec"]["containers"][0]["volumeMount"] = []  # a typo'd field
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(job, KUBERNETES, strict=True)


def _trainer_config(trainer):
    f = flags.FLAGS
    f.unparse_flags()
    try:
        f(["rl", *trainer["args"]])
        return run_flags.make_config()
    finally:
        f.unparse_flags()


def _check_server(vllm, trainer, port):
    env = {e["name"]: e.get("value") for e in vllm["env"]}
    assert env["VLLM_SERVER_DEV_MODE"] == "1"  # weight reload and version endpoints
    assert "--enable-scale-out" in vllm["args"]  # the token-in, token-out generate endpoint
    assert _arg(vllm, "port") == str(port)
    assert vllm["startupProbe"]["httpGet"]["path"] == "/health"
    # The trainer publishes where the servers read.
    assert _mount(vllm, "weights") == _mount(trainer, "weights") == _arg(trainer, "publish_dir")


def test_colocated_pod_shares_the_gpu_and_a_memory_volume():
    docs = _docs("colocated.yaml")
    pod = _pod(docs, "Job")
    vllm, trainer = _container(pod, "vllm"), _container(pod, "trainer")
    assert vllm["restartPolicy"] == "Always"  # a native sidecar: stops when the trainer exits
    (weights,) = [v for v in pod["volumes"] if v["name"] == "weights"]
    assert weights["emptyDir"]["medium"] == "Memory"
    (claim,) = pod["resourceClaims"]
    assert (
        vllm["resources"]["claims"] == trainer["resources"]["claims"] == [{"name": claim["name"]}]
    )
    assert any(d["kind"] == "ResourceClaimTemplate" and d["metadata"]["name"]
               == claim["resourceClaimTemplateName"] for d in docs)  # fmt: skip
    cfg = _trainer_config(trainer)
    assert cfg.servers == servers.ServerPoolConfig(addresses=("127.0.0.1:8000",))
    _check_server(vllm, trainer, 8000)
    # The memory split adds up: vLLM's share plus JAX's cap stay below the whole device.
    env = {e["name"]: e["value"] for e in trainer["env"]}
    assert env["XLA_PYTHON_CLIENT_PREALLOCATE"] == "false"
    share = float(_arg(vllm, "gpu-memory-utilization"))
    assert share + float(env["XLA_PYTHON_CLIENT_MEM_FRACTION"]) < 1


def test_disaggregated_trainer_names_every_server():
    docs = _docs("disaggregated.yaml")
    (service,) = [d for d in docs if d["kind"] == "Service"]
    (stateful,) = [d for d in docs if d["kind"] == "StatefulSet"]
    assert service["spec"]["clusterIP"] == "None"  # stable per-pod names
    assert stateful["spec"]["serviceName"] == service["metadata"]["name"]
    labels = stateful["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    port = service["spec"]["ports"][0]["port"]
    name, n = stateful["metadata"]["name"], stateful["spec"]["replicas"]
    pod = _pod(docs, "Job")
    trainer = _container(pod, "trainer")
    cfg = _trainer_config(trainer)
    want = tuple(f"{name}-{i}.{service['metadata']['name']}:{port}" for i in range(n))
    assert cfg.servers.addresses == want
    _check_server(_container(stateful["spec"]["template"]["spec"], "vllm"), trainer, port)
    (pvc,) = [d for d in docs if d["kind"] == "PersistentVolumeClaim"]
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]  # one writer, every server reads


def test_server_flags_reach_the_config():
    cfg = _trainer_config(
        {
            "args": [
                "--launch_servers=2",
                "--rollout_servers=a:1,b:2",
                "--server_timeout_s=30",
                "--engine_sleep_level=1",
                "--publish_dir=/x",
            ]
        }
    )
    assert cfg.servers == servers.ServerPoolConfig(
        addresses=("a:1", "b:2"), launch=2, request_timeout_s=30, sleep_level=1
    )
    assert (cfg.vllm.publish_dir, cfg.vllm.sleep_level) == ("/x", 1)
    assert _trainer_config({"args": []}).servers is None  # the in-process engine by default
