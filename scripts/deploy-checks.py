#!/usr/bin/env python3
"""Checks of deploy/ that no single tool makes, for scripts/validate-deploy.sh (which runs the real tools).

usage: deploy-checks.py DEPLOY_DIR COMMAND [ARGS]
  coverage                    every file under DEPLOY_DIR is one validate-deploy.sh checks
  kubernetes                  kustomization lists every manifest; selectors, ports and probes agree; the pod is
                              locked down; terminationGracePeriodSeconds > server.shutdown_grace
  configmap-toml OUT          writes the ConfigMap's exwatch.toml to OUT (for `exwatch check-config`)
  prometheusrule-spec OUT     writes the PrometheusRule's spec to OUT (for `promtool check rules`)
  prometheusrule-sync         the PrometheusRule's spec equals deploy/prometheus/rules/*.yml
  prometheusrule-write        regenerates deploy/kubernetes/prometheusrule.yaml from deploy/prometheus/rules/*.yml
  rule-tests                  every alert of deploy/prometheus/rules has a promtool test case
  dashboard-rules OUT         parses the Grafana dashboard, checks its panels, writes every query as a recording
                              rule to OUT (for `promtool check rules`: the queries must be valid PromQL)
  compose                     every file compose.yaml mounts exists; no secrets (the stack runs as shipped)
  apply-order                 namespace.yaml, the Secret and the kustomization agree on the namespace, and the
                              README documents applying them in that order
  compose-env SERVICE OUT     writes the EXWATCH__* environment of a compose service to OUT (defaults of ${VAR:-x}
                              substituted), for `exwatch check-config`
  alertmanager-compose-sync   alertmanager/compose.yml is alertmanager.yml with every receiver a webhook to the
                              compose stack's receiver
  alertmanager-compose-write  regenerates alertmanager/compose.yml from alertmanager.yml
  receiver                    runs receiver/receiver.py on a free loopback port, posts an Alertmanager payload to it
                              and checks that it prints the page and lists it on GET /
Exits 1 with one line per problem.
"""
import json
import pathlib
import re
import sys
import tomllib

import yaml

problems = []


def problem(message):
    problems.append(message)


def load_all(path):
    return [document for document in yaml.safe_load_all(path.read_text()) if document is not None]


# Each file under deploy/ and the check that covers it (validate-deploy.sh runs them).
COVERAGE = [
    (r"kubernetes/kustomization\.yaml", "kustomization: resources exist, every manifest listed"),
    (r"kubernetes/(servicemonitor|prometheusrule)\.yaml", "CRD: structure here, PrometheusRule spec by promtool"),
    (r"kubernetes/[a-z-.]+\.yaml", "kubernetes-validate --strict"),
    (r"prometheus/prometheus\.yml", "promtool check config"),
    (r"prometheus/rules/[a-z-]+\.yml", "promtool check rules, promtool test rules"),
    (r"prometheus/tests/[a-z-]+\.test\.yml", "promtool test rules"),
    (r"alertmanager/alertmanager\.yml", "amtool check-config, amtool config routes test"),
    (r"grafana/exwatch\.json", "JSON, panels, promtool check rules on every query"),
    (r"grafana/provisioning/(datasources|dashboards)/[a-z-]+\.yml", "YAML, paths"),
    (r"compose\.yaml", "check-jsonschema compose-spec, mounted files exist, check-config on exwatch's environment"),
    (r"alertmanager/compose\.yml", "amtool check-config, routes tests, generated from alertmanager.yml"),
    (r"receiver/receiver\.py", "runs it: a posted page is printed and listed"),
]


def coverage(deploy):
    for path in sorted(p for p in deploy.rglob("*") if p.is_file()):
        relative = path.relative_to(deploy).as_posix()
        if not any(re.fullmatch(pattern, relative) for pattern, _ in COVERAGE):
            problem(f"{relative}: no check in validate-deploy.sh covers this file; add one (scripts/deploy-checks.py COVERAGE)")
        if path.suffix in (".yml", ".yaml"):
            try:
                load_all(path)
            except yaml.YAMLError as error:
                problem(f"{relative}: not valid YAML: {error}")


def resources(deploy):
    """Every manifest of the kustomization by (kind, name)."""
    found = {}
    for path in sorted((deploy / "kubernetes").glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for document in load_all(path):
            found[(document.get("kind"), document.get("metadata", {}).get("name"))] = (path.name, document)
    return found


def humantime_seconds(text):
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    total = 0.0
    for number, unit in re.findall(r"(\d+)(ms|s|m|h)", text):
        total += int(number) * units[unit]
    return total


def kubernetes(deploy):
    directory = deploy / "kubernetes"
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    listed = set(kustomization.get("resources", []))
    for name in listed:
        if not (directory / name).is_file():
            problem(f"kustomization.yaml lists {name}, which does not exist")
    for path in directory.glob("*.yaml"):
        if path.name in ("kustomization.yaml", "secret.example.yaml"):
            continue
        if path.name not in listed:
            problem(f"kubernetes/{path.name} is not listed in kustomization.yaml")
    if "secret.example.yaml" in listed:
        problem("kustomization.yaml must not apply secret.example.yaml (placeholders would overwrite the real Secret)")

    found = resources(deploy)
    deployment = found.get(("Deployment", "exwatch"), (None, None))[1]
    service = found.get(("Service", "exwatch"), (None, None))[1]
    configmap = found.get(("ConfigMap", "exwatch"), (None, None))[1]
    if not (deployment and service and configmap):
        problem("kubernetes/: expected a Deployment, Service and ConfigMap named exwatch")
        return
    pod = deployment["spec"]["template"]
    pod_labels = pod["metadata"]["labels"]
    spec = pod["spec"]
    container = next((c for c in spec["containers"] if c["name"] == "exwatch"), None)
    if container is None:
        problem("deployment.yaml: no container named exwatch")
        return

    def selects(selector, where):
        if not all(pod_labels.get(key) == value for key, value in selector.items()):
            problem(f"{where} selector {selector} does not match the pod's labels {pod_labels}")

    selects(deployment["spec"]["selector"]["matchLabels"], "deployment.yaml")
    selects(service["spec"]["selector"], "service.yaml")
    pdb = found.get(("PodDisruptionBudget", "exwatch"), (None, None))[1]
    if pdb is None:
        problem("kubernetes/: no PodDisruptionBudget named exwatch")
    else:
        selects(pdb["spec"]["selector"]["matchLabels"], "poddisruptionbudget.yaml")
        if pdb["spec"].get("minAvailable", 0) >= deployment["spec"]["replicas"]:
            problem("poddisruptionbudget.yaml: minAvailable must be below the replica count, or no node can drain")
    if deployment["spec"].get("replicas") != 2:
        problem("deployment.yaml: exwatch runs 2 replicas (each polls and alerts; Alertmanager deduplicates)")

    container_ports = {port.get("name"): port["containerPort"] for port in container.get("ports", [])}
    service_ports = {port.get("name"): port for port in service["spec"]["ports"]}
    for name, port in service_ports.items():
        if port.get("targetPort") not in container_ports and port.get("targetPort") not in container_ports.values():
            problem(f"service.yaml: port {name} targets {port.get('targetPort')}, which the container does not expose")
    monitor = found.get(("ServiceMonitor", "exwatch"), (None, None))[1]
    if monitor is None:
        problem("kubernetes/: no ServiceMonitor named exwatch")
    else:
        if monitor.get("apiVersion") != "monitoring.coreos.com/v1":
            problem("servicemonitor.yaml: apiVersion must be monitoring.coreos.com/v1")
        labels = service["metadata"].get("labels", {})
        for key, value in monitor["spec"]["selector"]["matchLabels"].items():
            if labels.get(key) != value:
                problem(f"servicemonitor.yaml: selector {key}={value} does not match the Service's labels {labels}")
        for endpoint in monitor["spec"]["endpoints"]:
            if endpoint.get("port") not in service_ports:
                problem(f"servicemonitor.yaml: endpoint port {endpoint.get('port')} is not a named Service port")
            if endpoint.get("path", "/metrics") != "/metrics":
                problem("servicemonitor.yaml: exwatch serves metrics on /metrics")
    rule = found.get(("PrometheusRule", "exwatch"), (None, None))[1]
    if rule is None or rule.get("apiVersion") != "monitoring.coreos.com/v1" or "groups" not in rule.get("spec", {}):
        problem("prometheusrule.yaml: expected a monitoring.coreos.com/v1 PrometheusRule named exwatch with spec.groups")

    probes = {kind: container.get(kind, {}).get("httpGet", {}).get("path") for kind in
              ("startupProbe", "livenessProbe", "readinessProbe")}
    expected = {"startupProbe": "/health", "livenessProbe": "/health", "readinessProbe": "/ready"}
    if probes != expected:
        problem(f"deployment.yaml: probes must be {expected}, found {probes}")

    security = container.get("securityContext", {})
    pod_security = spec.get("securityContext", {})
    required = {
        "readOnlyRootFilesystem": security.get("readOnlyRootFilesystem") is True,
        "allowPrivilegeEscalation false": security.get("allowPrivilegeEscalation") is False,
        "capabilities drop ALL": security.get("capabilities", {}).get("drop") == ["ALL"],
        "runAsNonRoot": security.get("runAsNonRoot") is True or pod_security.get("runAsNonRoot") is True,
        "non-zero runAsUser": (security.get("runAsUser") or pod_security.get("runAsUser") or 0) > 0,
    }
    for what, ok in required.items():
        if not ok:
            problem(f"deployment.yaml: the exwatch container needs {what}")
    resources_ = container.get("resources", {})
    if not (resources_.get("requests", {}).get("cpu") and resources_.get("requests", {}).get("memory")
            and resources_.get("limits", {}).get("memory")):
        problem("deployment.yaml: set cpu and memory requests and a memory limit")

    config = tomllib.loads(configmap["data"]["exwatch.toml"])
    grace = humantime_seconds(config.get("server", {}).get("shutdown_grace", "20s"))
    termination = spec.get("terminationGracePeriodSeconds", 30)
    if termination <= grace:
        problem(f"deployment.yaml: terminationGracePeriodSeconds {termination} must exceed server.shutdown_grace ({grace:g}s)")
    database = config.get("database", {})
    mounts = [mount["mountPath"] for mount in container.get("volumeMounts", []) if not mount.get("readOnly")]
    for key, default in (("sqlite_path", "exwatch.sqlite"), ("spool_dir", "exwatch-spool")):
        path = database.get(key, default)
        if not any(path.startswith(mount.rstrip("/") + "/") for mount in mounts):
            problem(f"configmap.yaml: database.{key} {path!r} is not on a writable volume (the root filesystem is read-only)")
    secret_keys = set()
    for document in load_all(directory / "secret.example.yaml"):
        secret_keys |= set(document.get("stringData", {})) | set(document.get("data", {}))
        for key, value in document.get("stringData", {}).items():
            if "REPLACE" not in str(value):
                problem(f"secret.example.yaml: {key} must be a REPLACE_... placeholder, never a real value")
    mounted = {mount["name"]: mount["mountPath"] for mount in container.get("volumeMounts", [])}
    secret_volumes = {volume["name"] for volume in spec.get("volumes", []) if "secret" in volume}
    for variable in container.get("env", []):
        reference = variable.get("valueFrom", {}).get("secretKeyRef")
        if reference and reference["key"] not in secret_keys:
            problem(f"deployment.yaml: {variable['name']} reads Secret key {reference['key']}, missing from secret.example.yaml")
        value = variable.get("value", "")
        for name in secret_volumes:
            prefix = mounted.get(name, "\0").rstrip("/") + "/"
            if value.startswith(prefix) and value[len(prefix):] not in secret_keys:
                problem(f"deployment.yaml: {variable['name']} points at {value}, a key missing from secret.example.yaml")


def rule_files(deploy):
    return sorted((deploy / "prometheus" / "rules").glob("*.yml"))


def rules_spec(deploy):
    groups = []
    for path in rule_files(deploy):
        groups.extend(yaml.safe_load(path.read_text())["groups"])
    return {"groups": groups}


def prometheusrule(deploy):
    return next(d for d in load_all(deploy / "kubernetes" / "prometheusrule.yaml") if d.get("kind") == "PrometheusRule")


class BlockDumper(yaml.SafeDumper):
    pass


BlockDumper.add_representer(
    str,
    lambda dumper, text: dumper.represent_scalar("tag:yaml.org,2002:str", text, style="|" if "\n" in text else None),
)


def prometheusrule_write(deploy):
    document = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": "exwatch", "labels": {"app.kubernetes.io/name": "exwatch"}},
        "spec": rules_spec(deploy),
    }
    header = (
        "# GENERATED from deploy/prometheus/rules/*.yml by `scripts/deploy-checks.py deploy prometheusrule-write`;\n"
        "# edit the rule files, not this one (validate-deploy.sh fails when the two differ). The comments explaining\n"
        "# each rule are in the rule files. Your Prometheus's ruleSelector may need a label here (e.g. release: ...).\n"
    )
    text = yaml.dump(document, Dumper=BlockDumper, sort_keys=False, width=120, allow_unicode=True)
    (deploy / "kubernetes" / "prometheusrule.yaml").write_text(header + text)


def alert_names(deploy):
    return {rule["alert"] for group in rules_spec(deploy)["groups"] for rule in group["rules"] if "alert" in rule}


def rule_tests(deploy):
    tested = {}
    for path in sorted((deploy / "prometheus" / "tests").glob("*.test.yml")):
        document = yaml.safe_load(path.read_text())
        for test in document.get("tests", []):
            for case in test.get("alert_rule_test", []):
                fires = bool(case.get("exp_alerts"))
                tested.setdefault(case["alertname"], set()).add(fires)
    for name in sorted(alert_names(deploy)):
        if True not in tested.get(name, set()):
            problem(f"prometheus/tests: no promtool test shows {name} firing")
        if False not in tested.get(name, set()):
            problem(f"prometheus/tests: no promtool test shows {name} staying quiet")
    for name in sorted(set(tested) - alert_names(deploy)):
        problem(f"prometheus/tests: tests an alert {name} that no rule defines")


# Grafana variables replaced by something PromQL accepts, so promtool can parse each query.
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h", "$exchange": ".*",
                     "$instance": ".*", "${datasource}": "prometheus"}


def dashboard_rules(deploy, out):
    path = deploy / "grafana" / "exwatch.json"
    try:
        dashboard = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        problem(f"grafana/exwatch.json: not valid JSON: {error}")
        return
    for key in ("uid", "title", "panels", "templating", "schemaVersion"):
        if key not in dashboard:
            problem(f"grafana/exwatch.json: missing {key}")
    queries = []
    ids = set()
    for panel in dashboard.get("panels", []):
        where = f"grafana/exwatch.json panel {panel.get('id')} {panel.get('title')!r}"
        if panel.get("id") in ids:
            problem(f"{where}: duplicate panel id")
        ids.add(panel.get("id"))
        grid = panel.get("gridPos", {})
        if not all(isinstance(grid.get(key), int) for key in ("x", "y", "w", "h")) or grid["x"] + grid["w"] > 24:
            problem(f"{where}: gridPos must have whole x, y, w, h within 24 columns")
        if panel.get("type") == "row":
            continue
        targets = panel.get("targets", [])
        if not targets:
            problem(f"{where}: no query")
        for target in targets:
            if not target.get("expr"):
                problem(f"{where}: target {target.get('refId')} has no expr")
            else:
                queries.append((where, target["expr"]))
    for annotation in dashboard.get("annotations", {}).get("list", []):
        if annotation.get("expr"):
            queries.append((f"annotation {annotation.get('name')!r}", annotation["expr"]))
    for variable in dashboard.get("templating", {}).get("list", []):
        query = variable.get("query")
        text = query.get("query") if isinstance(query, dict) else None
        if variable.get("type") == "query" and text:
            match = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", text)
            if not match:
                problem(f"grafana/exwatch.json variable {variable['name']}: expected label_values(metric, label)")
            else:
                queries.append((f"variable {variable['name']}", match.group(1)))
    rules = []
    for index, (where, expr) in enumerate(queries):
        for variable, value in GRAFANA_VARIABLES.items():
            expr = expr.replace(variable, value)
        if "$" in expr:
            problem(f"{where}: unknown Grafana variable in {expr!r}")
        rules.append({"record": f"dashboard:query_{index}", "expr": expr})
    pathlib.Path(out).write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}, sort_keys=False))
    print(f"grafana/exwatch.json: {len(ids)} panels, {len(queries)} queries")


APPLY_ORDER = (
    "kubectl apply -f deploy/kubernetes/namespace.yaml",
    "kubectl apply -f ",  # the filled-in copy of secret.example.yaml
    "kubectl apply -k deploy/kubernetes",
)


def apply_order(deploy):
    """The Secret lives in the namespace the kustomization creates, so namespace.yaml is applied on its own first, then
    the Secret, then the kustomization; the README says exactly that, in that order."""
    directory = deploy / "kubernetes"
    namespace = yaml.safe_load((directory / "kustomization.yaml").read_text()).get("namespace")
    names = [d.get("metadata", {}).get("name") for d in load_all(directory / "namespace.yaml") if d.get("kind") == "Namespace"]
    if names != [namespace]:
        problem(f"namespace.yaml must hold exactly the Namespace {namespace!r} of kustomization.yaml, found {names}")
    for document in load_all(directory / "secret.example.yaml"):
        if document.get("metadata", {}).get("namespace") != namespace:
            problem(f"secret.example.yaml must be in namespace {namespace!r}, the one namespace.yaml creates")
    readme = (pathlib.Path(__file__).resolve().parent.parent / "README.md").read_text()
    position = 0
    for command in APPLY_ORDER:
        found = readme.find(command, position)
        if found < 0:
            problem(f"README.md must document `{command}...` after the previous step (order: {' / '.join(APPLY_ORDER)})")
            return
        position = found + len(command)


def compose(deploy):
    document = yaml.safe_load((deploy / "compose.yaml").read_text())
    if "secrets" in document or any("secrets" in service for service in document.get("services", {}).values()):
        problem("compose.yaml: the local stack must run as shipped, without secret files")
    for name, service in document.get("services", {}).items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                if not (deploy / source).exists():
                    problem(f"compose.yaml: service {name} mounts {source}, which does not exist")
        build = service.get("build")
        if build:
            context = deploy / build.get("context", ".")
            if not (context / build.get("dockerfile", "Dockerfile")).is_file():
                problem(f"compose.yaml: service {name} builds from a Dockerfile that does not exist")
    for path in (deploy / "grafana" / "provisioning").rglob("*.yml"):
        yaml.safe_load(path.read_text())


# The compose stack's webhook receiver (receiver/receiver.py), as Alertmanager reaches it on the compose network.
COMPOSE_RECEIVER = "http://receiver:8080"


def alertmanager_compose(deploy):
    """alertmanager.yml with each receiver replaced by a webhook to the compose stack's receiver (path: its name)."""
    config = yaml.safe_load((deploy / "alertmanager" / "alertmanager.yml").read_text())
    config["receivers"] = [
        {"name": receiver["name"],
         "webhook_configs": [{"url": f"{COMPOSE_RECEIVER}/{receiver['name']}", "send_resolved": True}]}
        for receiver in config["receivers"]
    ]
    return config


def alertmanager_compose_write(deploy):
    header = (
        "# GENERATED from alertmanager.yml by `scripts/deploy-checks.py deploy alertmanager-compose-write`: the same\n"
        "# routes, timings and inhibitions, with every receiver a webhook to the compose stack's receiver service\n"
        "# (deploy/receiver/receiver.py), so `docker compose up` needs no secret files. Edit alertmanager.yml, not this.\n"
    )
    text = yaml.dump(alertmanager_compose(deploy), Dumper=BlockDumper, sort_keys=False, width=120, allow_unicode=True)
    (deploy / "alertmanager" / "compose.yml").write_text(header + text)


def alertmanager_compose_sync(deploy):
    path = deploy / "alertmanager" / "compose.yml"
    if not path.is_file() or yaml.safe_load(path.read_text()) != alertmanager_compose(deploy):
        problem("alertmanager/compose.yml differs from alertmanager.yml; regenerate it with "
                "`scripts/deploy-checks.py deploy alertmanager-compose-write`")
    document = yaml.safe_load((deploy / "compose.yaml").read_text())
    mounts = document["services"]["alertmanager"].get("volumes", [])
    if "./alertmanager/compose.yml:/etc/alertmanager/alertmanager.yml:ro" not in mounts:
        problem("compose.yaml: the alertmanager service must mount ./alertmanager/compose.yml as its configuration")


def compose_env(deploy, service, out):
    """The service's EXWATCH__* variables as compose sets them when the shell sets none: `${VAR:-default}` is the
    default, `${VAR}` empty."""
    document = yaml.safe_load((deploy / "compose.yaml").read_text())
    environment = document["services"][service].get("environment", {})
    lines = []
    for key, value in environment.items():
        value = re.sub(r"\$\{[A-Z0-9_]+(?::?-([^}]*))?\}", lambda match: match.group(1) or "", str(value))
        if key.startswith("EXWATCH__"):
            lines.append(f"{key}={value}")
    pathlib.Path(out).write_text("".join(line + "\n" for line in lines))


def receiver(deploy):
    """Runs the receiver and posts one firing page to it, as Alertmanager would."""
    import http.client
    import subprocess
    import urllib.request

    process = subprocess.Popen([sys.executable, "-u", str(deploy / "receiver" / "receiver.py"), "--listen", "127.0.0.1:0"],
                               stdout=subprocess.PIPE, text=True)
    try:
        address = process.stdout.readline().strip().rpartition(" ")[2]
        payload = {"version": "4", "receiver": "pager", "status": "firing", "alerts": [{
            "status": "firing",
            "labels": {"alertname": "exchange_api_down", "exchange": "kraken", "severity": "critical", "service": "exwatch"},
            "annotations": {"summary": "Exchange API down: kraken", "scenario": "maintenance"}}]}
        request = urllib.request.Request(f"http://{address}/pager", data=json.dumps(payload).encode(),
                                         headers={"content-type": "application/json"})
        with urllib.request.urlopen(request, timeout=5) as answer:
            if answer.status != 200:
                problem(f"receiver/receiver.py: answered {answer.status} to a page")
        line = process.stdout.readline().strip()
        expected = ("PAGE pager: FIRING exchange_api_down exchange=kraken severity=critical: Exchange API down: kraken "
                    "(scenario maintenance)")
        if line != expected:
            problem(f"receiver/receiver.py: printed {line!r}, expected {expected!r}")
        with urllib.request.urlopen(f"http://{address}/", timeout=5) as answer:
            listed = json.loads(answer.read())
        if len(listed) != 1 or listed[0]["receiver"] != "pager" or listed[0]["alerts"] != payload["alerts"]:
            problem(f"receiver/receiver.py: GET / lists {listed!r}")
        # A body announced over 1 MiB is refused before it is read.
        host, _, port = address.rpartition(":")
        connection = http.client.HTTPConnection(host, int(port), timeout=5)
        connection.putrequest("POST", "/pager")
        connection.putheader("content-length", str((1 << 20) + 1))
        connection.endheaders()
        status = connection.getresponse().status
        connection.close()
        if status != 413:
            problem(f"receiver/receiver.py: answered {status} to a body over 1 MiB, expected 413")
        print(f"receiver/receiver.py: printed {line!r}")
    finally:
        process.terminate()
        process.wait(timeout=5)


def main():
    if len(sys.argv) < 3:
        print(__doc__, file=sys.stderr)
        return 2
    deploy, command, arguments = pathlib.Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
    if command == "coverage":
        coverage(deploy)
    elif command == "kubernetes":
        kubernetes(deploy)
    elif command == "configmap-toml":
        configmap = resources(deploy)[("ConfigMap", "exwatch")][1]
        pathlib.Path(arguments[0]).write_text(configmap["data"]["exwatch.toml"])
    elif command == "prometheusrule-spec":
        pathlib.Path(arguments[0]).write_text(yaml.safe_dump(prometheusrule(deploy)["spec"], sort_keys=False))
    elif command == "prometheusrule-sync":
        if prometheusrule(deploy)["spec"] != rules_spec(deploy):
            problem("kubernetes/prometheusrule.yaml differs from prometheus/rules/*.yml; regenerate it with "
                    "`scripts/deploy-checks.py deploy prometheusrule-write`")
    elif command == "prometheusrule-write":
        prometheusrule_write(deploy)
    elif command == "rule-tests":
        rule_tests(deploy)
    elif command == "dashboard-rules":
        dashboard_rules(deploy, arguments[0])
    elif command == "compose":
        compose(deploy)
    elif command == "apply-order":
        apply_order(deploy)
    elif command == "compose-env":
        compose_env(deploy, arguments[0], arguments[1])
    elif command == "alertmanager-compose-sync":
        alertmanager_compose_sync(deploy)
    elif command == "alertmanager-compose-write":
        alertmanager_compose_write(deploy)
    elif command == "receiver":
        receiver(deploy)
    else:
        print(__doc__, file=sys.stderr)
        return 2
    for message in problems:
        print(f"FAILED: {message}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
