"""The deployment files hold what docs/deploy-kubernetes.md promises: the linters find nothing
(``scripts/lint-deploy.sh``: hadolint, checkov, compose-lint, the chart rendered by Helm's own
engine and validated against the Kubernetes and KEDA schemas), and the rendered manifests, the
compose file, the seccomp profile and the Dockerfile keep the hardening they are meant to keep.

No network, no container engine, no helm binary. The tools are dev dependencies (checkov in its
own venv, ``scripts/lint-deploy.sh --setup``); without them these tests skip, except in CI
(``CI=true``), where they fail.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import yaml

from bastion.constants import CONSUMER_GROUP, LANE_BATCH, LANE_SYNC, LANES, queue_key

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "deploy" / "helm" / "bastion"
COMPOSE = ROOT / "deploy" / "compose.yaml"
SECCOMP = ROOT / "deploy" / "seccomp" / "bastion.json"
LINT = ROOT / "scripts" / "lint-deploy.sh"
REQUIRED = os.environ.get("CI") == "true"
UID = 65532
BASTION_SERVICES = ("control", "gateway", "worker")
POOLS = [
    {"name": "tabular", "models": ["demo", "credit"], "replicas": 1, "minReplicas": 0, "maxReplicas": 4, "lagCount": 5},
    {"name": "llm", "models": ["chat"], "replicas": 1, "minReplicas": 0, "maxReplicas": 2, "lagCount": 1},
]


def _missing(message: str) -> None:
    if REQUIRED:
        pytest.fail(f"{message}: it is required in CI")
    pytest.skip(message)


def render(values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """The chart's manifests as Helm renders them (helm-python-sdk: Helm's Go engine, offline)."""
    try:
        import helm_python
    except ImportError:
        _missing("helm-python-sdk is not installed (scripts/lint-deploy.sh --setup)")
    rendered = helm_python.Chart.load(str(CHART)).render(values, name="bastion", namespace="bastion", is_install=True)
    return [
        doc
        for template, text in sorted(rendered.items())
        if template.endswith(".yaml")
        for doc in yaml.safe_load_all(text)
        if doc
    ]


@pytest.fixture(scope="module")
def manifests() -> list[dict[str, Any]]:
    return render({"workers": {"pools": POOLS}, "externalSecrets": {"enabled": True}, "namespace": {"create": True}})


def of_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def pod_specs(docs: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    for doc in docs:
        if doc["kind"] in {"Deployment", "Job", "StatefulSet", "DaemonSet"}:
            yield f"{doc['kind']}/{doc['metadata']['name']}", doc["spec"]["template"]["spec"]


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def secretish(name: str) -> bool:
    return any(word in name for word in ("ADMIN_KEY", "PASSWORD", "KEK", "SECRET"))


def test_the_deploy_linters_find_nothing() -> None:
    """hadolint, checkov (Dockerfile and rendered chart), compose-lint, helm lint and the schema
    validation all pass, every suppression carrying its reason where the finding is."""
    done = subprocess.run([str(LINT)], capture_output=True, text=True, timeout=120, check=False)
    if done.returncode == 3:
        _missing(done.stderr.strip())
    assert done.returncode == 0, (
        f"scripts/lint-deploy.sh found something:\n{done.stdout[-6000:]}\n{done.stderr[-3000:]}"
    )
    assert "lint-deploy: no findings" in done.stdout


def test_every_pod_meets_pod_security_restricted_with_a_read_only_root(manifests: list[dict[str, Any]]) -> None:
    specs = list(pod_specs(manifests))
    assert {name.split("/")[1] for name, _ in specs} >= {
        "bastion-gateway",
        "bastion-control",
        "bastion-worker-tabular",
        "bastion-worker-llm",
        "bastion-consumer-groups",
    }
    for name, spec in specs:
        assert spec["automountServiceAccountToken"] is False, f"{name} mounts a service-account token"
        pod = spec["securityContext"]
        assert pod["runAsNonRoot"] is True and pod["runAsUser"] == UID and pod["runAsGroup"] == UID, name
        assert pod["seccompProfile"] == {"type": "RuntimeDefault"}, name
        assert not spec.get("hostNetwork") and not spec.get("hostPID") and not spec.get("hostIPC"), name
        for container in spec["containers"] + spec.get("initContainers", []):
            sc = container["securityContext"]
            where = f"{name}: container {container['name']}"
            assert sc["readOnlyRootFilesystem"] is True, where
            assert sc["allowPrivilegeEscalation"] is False and sc.get("privileged") is False, where
            assert sc["capabilities"] == {"drop": ["ALL"]}, where
            assert sc["runAsNonRoot"] is True and sc["runAsUser"] == UID, where
            assert sc["seccompProfile"] == {"type": "RuntimeDefault"}, where
            assert "resources" in container and container["resources"]["limits"], where
    for account in of_kind(manifests, "ServiceAccount"):
        assert account["automountServiceAccountToken"] is False
    (namespace,) = of_kind(manifests, "Namespace")
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


def test_every_hop_is_tls_and_secrets_come_by_reference(manifests: list[dict[str, Any]]) -> None:
    for name, spec in pod_specs(manifests):
        for container in spec["containers"]:
            env = env_of(container)
            assert env["BASTION_REQUIRE_TLS"] == "true", name
            assert env["BASTION_REDIS_URL"].startswith("rediss://"), name
            for key in ("BASTION_TLS_CERT", "BASTION_TLS_KEY", "BASTION_TLS_CA"):
                assert env[key].startswith("/certs/"), f"{name}: {key}"
            for key, value in env.items():
                if secretish(key) and not key.endswith("_FILE"):
                    assert isinstance(value, dict) and "secretKeyRef" in value, f"{name}: {key} is inline"
    control = next(spec for name, spec in pod_specs(manifests) if name == "Deployment/bastion-control")
    url = urlsplit(env_of(control["containers"][0])["BASTION_DATABASE_URL"])
    assert url.scheme == "postgresql+psycopg" and url.password is None
    params = parse_qs(url.query)
    assert params["sslmode"] == ["verify-full"]
    assert {"sslrootcert", "sslcert", "sslkey"} <= params.keys()
    for doc in of_kind(manifests, "Secret"):
        pytest.fail(f"the chart renders a Secret with values: {doc['metadata']['name']}")
    assert {d["metadata"]["name"] for d in of_kind(manifests, "ExternalSecret")} == {
        "bastion-control",
        "bastion-gateway-tls",
        "bastion-control-tls",
        "bastion-worker-tls",
    }


def test_network_policies_deny_by_default_and_allow_only_the_designed_flows(
    manifests: list[dict[str, Any]],
) -> None:
    policies = {p["metadata"]["name"]: p["spec"] for p in of_kind(manifests, "NetworkPolicy")}
    deny = policies["bastion-default-deny"]
    assert deny["podSelector"] == {} and set(deny["policyTypes"]) == {"Ingress", "Egress"}
    assert "ingress" not in deny and "egress" not in deny
    worker = policies["bastion-worker"]
    assert "ingress" not in worker, "something may connect to a worker"
    assert [rule["ports"] for rule in worker["egress"]] == [[{"protocol": "TCP", "port": 6379}]]
    gateway = policies["bastion-gateway"]
    assert [rule["ports"] for rule in gateway["ingress"]] == [[{"protocol": "TCP", "port": 8000}]]
    assert [rule["ports"] for rule in gateway["egress"]] == [[{"protocol": "TCP", "port": 6379}]]
    control = policies["bastion-control"]
    assert sorted(rule["ports"][0]["port"] for rule in control["egress"]) == [5432, 6379]
    assert "ingress" not in control, "the admin API is reachable by default"
    dns = policies["bastion-dns"]
    assert dns["policyTypes"] == ["Egress"] and {p["port"] for p in dns["egress"][0]["ports"]} == {53}
    for name, spec in pod_specs(manifests):
        if "worker" in name:
            assert all("ports" not in c for c in spec["containers"]), f"{name} declares a port"


def test_each_pool_scales_from_zero_on_its_streams_lag_with_the_code_s_names(
    manifests: list[dict[str, Any]],
) -> None:
    """The ScaledObjects name the streams and the group the workers read (bastion.constants), and
    the consumer-groups Job creates those groups, so the scaler never meets NOGROUP."""
    deployments = {d["metadata"]["name"] for d in of_kind(manifests, "Deployment")}
    auths = {a["metadata"]["name"] for a in of_kind(manifests, "TriggerAuthentication")}
    scaled = {s["metadata"]["name"]: s["spec"] for s in of_kind(manifests, "ScaledObject")}
    assert set(scaled) == {f"bastion-worker-{pool['name']}" for pool in POOLS}
    for pool in POOLS:
        spec = scaled[f"bastion-worker-{pool['name']}"]
        assert spec["scaleTargetRef"]["name"] in deployments
        assert spec["minReplicaCount"] == 0 and spec["maxReplicaCount"] == pool["maxReplicas"]
        streams = set()
        for trigger in spec["triggers"]:
            assert trigger["type"] == "redis-streams"
            meta = trigger["metadata"]
            assert meta["consumerGroup"] == CONSUMER_GROUP
            assert meta["lagCount"] == str(pool["lagCount"]) and meta["enableTLS"] == "true"
            assert trigger["authenticationRef"]["name"] in auths
            streams.add(meta["stream"])
        assert streams == {queue_key(m, lane) for m in pool["models"] for lane in (LANE_SYNC, LANE_BATCH)}
        deployment = next(
            d for d in of_kind(manifests, "Deployment") if d["metadata"]["name"] == f"bastion-worker-{pool['name']}"
        )
        assert "replicas" not in deployment["spec"], "a fixed replica count would fight KEDA"
        env = env_of(deployment["spec"]["template"]["spec"]["containers"][0])
        assert env["BASTION_WORKER_MODELS"] == ",".join(pool["models"])
    (job,) = of_kind(manifests, "Job")
    assert job["metadata"]["annotations"]["helm.sh/hook"] == "post-install,post-upgrade"
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert set(env_of(container)["MODELS"].split(",")) == {m for pool in POOLS for m in pool["models"]}
    script = container["args"][0]
    assert "from bastion.constants import CONSUMER_GROUP, LANES, queue_key" in script
    assert "mkstream=True" in script and "BUSYGROUP" in script
    assert len(LANES) == 3  # the Job creates every lane's group, as Consumer.ensure_groups does


def test_gateway_autoscales_and_keeps_one_replica_through_disruptions(manifests: list[dict[str, Any]]) -> None:
    (hpa,) = of_kind(manifests, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "bastion-gateway"}
    pdbs = {p["metadata"]["name"]: p["spec"] for p in of_kind(manifests, "PodDisruptionBudget")}
    gateway = next(d for d in of_kind(manifests, "Deployment") if d["metadata"]["name"] == "bastion-gateway")
    labels = gateway["spec"]["template"]["metadata"]["labels"]
    assert pdbs["bastion-gateway"]["minAvailable"] == 1
    assert pdbs["bastion-gateway"]["selector"]["matchLabels"].items() <= labels.items()
    assert "replicas" not in gateway["spec"], "a fixed replica count would fight the HPA"


def test_without_keda_the_pools_have_fixed_replicas_and_no_scaler() -> None:
    docs = render({"keda": {"enabled": False}, "workers": {"pools": POOLS}})
    assert not of_kind(docs, "ScaledObject") and not of_kind(docs, "TriggerAuthentication")
    replicas = {d["metadata"]["name"]: d["spec"].get("replicas") for d in of_kind(docs, "Deployment")}
    assert replicas["bastion-worker-tabular"] == 1 and replicas["bastion-worker-llm"] == 1


def _compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return loaded


def test_compose_confines_every_bastion_container_and_hides_the_workers() -> None:
    compose = _compose()
    services = compose["services"]
    internal = {name for name, net in compose["networks"].items() if (net or {}).get("internal")}
    for name in BASTION_SERVICES:
        service = services[name]
        assert service["read_only"] is True and service["cap_drop"] == ["ALL"], name
        assert "no-new-privileges:true" in service["security_opt"], name
        (seccomp,) = [o.split("=", 1)[1] for o in service["security_opt"] if o.startswith("seccomp=")]
        assert (COMPOSE.parent / seccomp).resolve() == SECCOMP, f"{name}: {seccomp}"
        assert any(t.startswith("/tmp") for t in service["tmpfs"]), name
        assert service["user"] == f"{UID}:{UID}", name
        env = service["environment"]
        assert env["BASTION_REQUIRE_TLS"] == "true" and env["BASTION_REDIS_URL"].startswith("rediss://"), name
        for key, value in env.items():
            if secretish(key):
                assert key.endswith("_FILE") and str(value).startswith("/run/secrets/"), f"{name}: {key} inline"
    worker = services["worker"]
    assert "ports" not in worker and "expose" not in worker
    assert set(worker["networks"]) <= internal, "a worker is on a network with a route out"
    assert set(services["postgres"]["networks"]) <= internal
    assert {n for n, s in services.items() if "data" in s.get("networks", [])} == {"postgres", "control"}
    url = urlsplit(services["control"]["environment"]["BASTION_DATABASE_URL"])
    assert parse_qs(url.query)["sslmode"] == ["verify-full"] and url.password is None


def test_compose_runs_redis_and_postgres_on_tls_with_client_certificates_only() -> None:
    compose = _compose()
    redis_command = compose["services"]["redis"]["command"]
    for flag, value in (("--port", "0"), ("--tls-port", "6379"), ("--tls-auth-clients", "yes")):
        assert redis_command[redis_command.index(flag) + 1] == value
    pg_command = compose["services"]["postgres"]["command"]
    assert "ssl=on" in pg_command and "hba_file=/etc/postgresql/pg_hba.conf" in pg_command
    hba = [line.split() for line in compose["configs"]["pg_hba"]["content"].splitlines()]
    rules = [r for r in hba if r and not r[0].startswith("#")]
    network = [r for r in rules if r[0] != "local"]
    assert network and all(r[0] == "hostssl" and r[4] == "cert" and "clientcert=verify-full" in r for r in network)
    assert all("trust" not in r for r in rules)


def test_the_seccomp_profile_denies_by_default_and_never_allows_the_escape_hatches() -> None:
    profile = json.loads(SECCOMP.read_text())
    assert profile["defaultAction"] == "SCMP_ACT_ERRNO"
    allowed = {name for rule in profile["syscalls"] if rule["action"] == "SCMP_ACT_ALLOW" for name in rule["names"]}
    never = {
        "ptrace", "process_vm_readv", "process_vm_writev", "mount", "umount", "umount2", "unshare", "setns",
        "bpf", "perf_event_open", "keyctl", "add_key", "request_key", "kexec_load", "kexec_file_load",
        "init_module", "finit_module", "delete_module", "userfaultfd", "open_by_handle_at", "io_uring_setup",
        "fsopen", "fsmount", "move_mount", "open_tree", "pivot_root", "chroot", "reboot", "swapon",
    }  # fmt: skip
    assert not allowed & never, sorted(allowed & never)
    for needed in ("execve", "clone", "futex", "epoll_wait", "connect", "socket", "seccomp", "landlock_restrict_self"):
        assert needed in allowed, needed
    conditional = [r for r in profile["syscalls"] if "socket" in r["names"]]
    assert {r["args"][0]["value"] for r in conditional} == {1, 2, 10, 16}  # AF_UNIX, AF_INET, AF_INET6, AF_NETLINK
    for rule in profile["syscalls"]:
        assert "caps" not in rule.get("includes", {}), "a capability-gated rule: the containers drop them all"


def test_the_image_runs_as_65532_with_an_exec_form_entrypoint_and_no_compiler() -> None:
    lines = [line.strip() for line in (ROOT / "Dockerfile").read_text().splitlines()]
    instructions = [line for line in lines if line and not line.startswith("#")]
    final = instructions[max(i for i, line in enumerate(instructions) if line.startswith("FROM ")) :]
    assert "USER 65532:65532" in final
    assert 'ENTRYPOINT ["/opt/bastion/bin/bastion"]' in final
    assert any(line.startswith("CMD [") for line in final)
    assert not any(line.startswith("RUN ") for line in final), "the runtime stage runs a shell"
    text = "\n".join(instructions)
    for compiler in ("gcc", "build-essential", "g++", "clang"):
        assert compiler not in text
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ignored[0] == "*" or "*" in ignored, "the build context is not an allow-list"
