#!/usr/bin/env python3
"""Consistency checks of deploy/kubernetes and deploy/compose that YAML syntax checks miss.

  check_manifests.py SOURCE_DIR

Kubernetes: every kustomization resource exists and parses; the Deployment asks for a GPU, runs
as non-root, has gRPC startup/readiness/liveness probes on the --listen port, gives
terminationGracePeriodSeconds more than --drain_timeout plus a margin, mounts the admin token
Secret and the manifest ConfigMap where --admin_token_file and --manifest point, and names the
container ports the Services and the ServiceMonitor use; the manifest JSON parses.
Compose: stop_grace_period exceeds MOELORA_DRAIN_TIMEOUT, Prometheus scrapes the metrics port,
Grafana's dashboard provider path holds the mounted dashboard.
Needs PyYAML (python3-yaml, which yamllint depends on).
"""
import json
import os
import re
import sys

import yaml

MARGIN_SECONDS = 5


def seconds(text):
    """'30s', '1m30s', '45' (seconds) -> float."""
    text = str(text).strip()
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return float(text)
    total, rest = 0.0, text
    for value, unit in re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", text):
        total += float(value) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[unit]
        rest = rest.replace(value + unit, "", 1)
    if rest:
        raise ValueError(f"not a duration: {text}")
    return total


def flag_values(args):
    values = {}
    for arg in args:
        if arg.startswith("--") and "=" in arg:
            name, value = arg[2:].split("=", 1)
            values[name] = value
    return values


def check_kubernetes(root, errors):
    base = os.path.join(root, "deploy/kubernetes")
    kustomization = yaml.safe_load(open(os.path.join(base, "kustomization.yaml")))
    objects = []
    for resource in kustomization.get("resources", []):
        path = os.path.join(base, resource)
        if not os.path.exists(path):
            errors.append(f"kustomization: resource {resource} does not exist")
            continue
        for doc in yaml.safe_load_all(open(path)):
            if doc:
                doc["__file"] = resource
                objects.append(doc)
    by_kind = {}
    for obj in objects:
        for key in ("apiVersion", "kind", "metadata"):
            if key not in obj:
                errors.append(f"{obj['__file']}: an object has no {key}")
        by_kind.setdefault(obj.get("kind"), []).append(obj)

    deployments = by_kind.get("Deployment", [])
    if len(deployments) != 1:
        errors.append(f"expected one Deployment, found {len(deployments)}")
        return
    deployment = deployments[0]
    pod = deployment["spec"]["template"]["spec"]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    container = pod["containers"][0]
    flags = flag_values(container.get("args", []))
    where = f"deployment.yaml ({container['name']})"

    for name in ("model_dir", "listen", "admin_listen", "metrics_listen", "drain_timeout",
                 "admin_token_file", "manifest"):
        if name not in flags:
            errors.append(f"{where}: no --{name}")
    drain = seconds(flags.get("drain_timeout", "30s"))
    grace = pod.get("terminationGracePeriodSeconds", 30)
    if grace < drain + MARGIN_SECONDS:
        errors.append(f"{where}: terminationGracePeriodSeconds {grace} < --drain_timeout "
                      f"{drain:g}s + {MARGIN_SECONDS}s")

    limits = container.get("resources", {}).get("limits", {})
    if str(limits.get("nvidia.com/gpu")) != "1":
        errors.append(f"{where}: resources.limits nvidia.com/gpu is not 1")
    if "memory" not in limits or "requests" not in container.get("resources", {}):
        errors.append(f"{where}: no memory limit or no requests")
    security = pod.get("securityContext", {})
    if not security.get("runAsNonRoot") or security.get("runAsUser", 0) == 0:
        errors.append(f"{where}: not runAsNonRoot with a non-zero runAsUser")

    ports = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
    for port_name, flag in (("grpc", "listen"), ("admin", "admin_listen"),
                            ("metrics", "metrics_listen")):
        if port_name not in ports:
            errors.append(f"{where}: no container port named {port_name}")
        elif flag in flags and not flags[flag].endswith(f":{ports[port_name]}"):
            errors.append(f"{where}: port {port_name}={ports[port_name]} but --{flag}="
                          f"{flags[flag]}")
    if "admin_listen" in flags and not flags["admin_listen"].startswith(("0.0.0.0:", "[::]:")):
        errors.append(f"{where}: --admin_listen={flags['admin_listen']} is not reachable by "
                      "the admin Service")
    data_port = ports.get("grpc")
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        spec = container.get(probe)
        if not spec:
            errors.append(f"{where}: no {probe}")
        elif spec.get("grpc", {}).get("port") != data_port:
            errors.append(f"{where}: {probe} is not a gRPC probe on port {data_port}")

    mounts = {m["name"]: m["mountPath"] for m in container.get("volumeMounts", [])}
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    for name in mounts:
        if name not in volumes:
            errors.append(f"{where}: volumeMount {name} has no volume")

    def mounted_file(flag, source_kind, source_key, name_key):
        path = flags.get(flag, "")
        for vname, mount in mounts.items():
            volume = volumes.get(vname, {})
            if source_kind in volume and path.startswith(mount.rstrip("/") + "/"):
                item = path[len(mount.rstrip("/")) + 1:]
                items = volume[source_kind].get("items")
                keys = [i["path"] for i in items] if items else None
                if keys is not None and item not in keys:
                    errors.append(f"{where}: --{flag}={path}: {item} is not among {keys}")
                return volume[source_kind][name_key], item
        errors.append(f"{where}: --{flag}={path} is not inside a {source_kind} volume")
        return None, None

    secret_name, _ = mounted_file("admin_token_file", "secret", "token", "secretName")
    secrets = {s["metadata"]["name"]: s for s in by_kind.get("Secret", [])}
    if secret_name and secret_name not in secrets:
        errors.append(f"{where}: Secret {secret_name} is not in the kustomization")
    elif secret_name and "token" not in secrets[secret_name].get("stringData", {}) and \
            "token" not in secrets[secret_name].get("data", {}):
        errors.append(f"Secret {secret_name}: no 'token' key")
    config_name, item = mounted_file("manifest", "configMap", None, "name")
    configs = {c["metadata"]["name"]: c for c in by_kind.get("ConfigMap", [])}
    if config_name and config_name not in configs:
        errors.append(f"{where}: ConfigMap {config_name} is not in the kustomization")
    elif config_name:
        text = configs[config_name].get("data", {}).get(item)
        try:
            manifest = json.loads(text or "")
            for expert in manifest.get("experts", []):
                if not expert.get("name") or not expert.get("path"):
                    errors.append(f"ConfigMap {config_name}: expert without name or path")
            for router in manifest.get("routers", []):
                if not router.get("path"):
                    errors.append(f"ConfigMap {config_name}: router without path")
        except ValueError as e:
            errors.append(f"ConfigMap {config_name}: {item} is not JSON: {e}")

    services = by_kind.get("Service", [])
    for service in services:
        selector = service["spec"].get("selector", {})
        if any(pod_labels.get(k) != v for k, v in selector.items()):
            errors.append(f"Service {service['metadata']['name']}: selector {selector} does not "
                          "match the pod labels")
        for port in service["spec"].get("ports", []):
            target = port.get("targetPort", port["port"])
            if isinstance(target, str) and target not in ports:
                errors.append(f"Service {service['metadata']['name']}: targetPort {target} is "
                              "not a container port name")
    admin_services = [s for s in services
                      if any(p.get("targetPort") == "admin" for p in s["spec"]["ports"])]
    for service in admin_services:
        if any(p.get("targetPort") != "admin" for p in service["spec"]["ports"]):
            errors.append(f"Service {service['metadata']['name']}: admin shares a Service with "
                          "other ports")
    if not admin_services:
        errors.append("no Service exposes the admin port")
    for monitor in by_kind.get("ServiceMonitor", []):
        labels = monitor["spec"]["selector"].get("matchLabels", {})
        matched = [s for s in services
                   if all(s["metadata"].get("labels", {}).get(k) == v for k, v in labels.items())]
        if not matched:
            errors.append(f"ServiceMonitor {monitor['metadata']['name']}: selects no Service")
        for endpoint in monitor["spec"].get("endpoints", []):
            if not any(endpoint.get("port") == p.get("name")
                       for s in matched for p in s["spec"]["ports"]):
                errors.append(f"ServiceMonitor: port {endpoint.get('port')} is not a port of "
                              "the selected Services")


def check_compose(root, errors):
    base = os.path.join(root, "deploy/compose")
    compose = yaml.safe_load(open(os.path.join(base, "docker-compose.yml")))
    server = compose["services"]["moelora"]
    env = server.get("environment", {})
    drain = seconds(env.get("MOELORA_DRAIN_TIMEOUT", "30s"))
    grace = seconds(server.get("stop_grace_period", "10s"))
    if grace < drain + MARGIN_SECONDS:
        errors.append(f"compose: stop_grace_period {grace:g}s < drain {drain:g}s + margin")
    metrics_port = env.get("MOELORA_METRICS_LISTEN", "").rsplit(":", 1)[-1]
    prometheus = yaml.safe_load(open(os.path.join(base, "prometheus.yml")))
    targets = [t for job in prometheus["scrape_configs"] if job["job_name"] == "moelora"
               for sc in job.get("static_configs", []) for t in sc["targets"]]
    if f"moelora:{metrics_port}" not in targets:
        errors.append(f"compose: Prometheus does not scrape moelora:{metrics_port} ({targets})")
    for secret in compose.get("secrets", {}).values():
        if "file" in secret and not os.path.exists(os.path.join(base, secret["file"])):
            errors.append(f"compose: secret file {secret['file']} does not exist")
    grafana = compose["services"]["grafana"]
    provider = yaml.safe_load(open(os.path.join(
        base, "grafana/provisioning/dashboards/moelora.yml")))["providers"][0]["options"]["path"]
    dashboard_mounts = [v for v in grafana.get("volumes", []) if v.endswith(".json:ro")]
    for mount in dashboard_mounts:
        source, target = mount.split(":")[:2]
        if not os.path.exists(os.path.normpath(os.path.join(base, source))):
            errors.append(f"compose: grafana mounts {source}, which does not exist")
        if not target.startswith(provider.rstrip("/") + "/"):
            errors.append(f"compose: dashboard mounted at {target}, outside the provider path "
                          f"{provider}")
    if not dashboard_mounts:
        errors.append("compose: grafana mounts no dashboard JSON")
    datasource = yaml.safe_load(open(os.path.join(
        base, "grafana/provisioning/datasources/prometheus.yml")))["datasources"][0]
    if datasource.get("uid") != "prometheus" or datasource.get("type") != "prometheus":
        errors.append("compose: the provisioned data source is not uid/type prometheus")


def main():
    if len(sys.argv) != 2:
        print(__doc__)
        return 2
    errors = []
    check_kubernetes(sys.argv[1], errors)
    check_compose(sys.argv[1], errors)
    for error in errors:
        print(error)
    print("manifests", "FAILED" if errors else "OK")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
