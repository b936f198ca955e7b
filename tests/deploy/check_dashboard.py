#!/usr/bin/env python3
"""Checks deploy/grafana/moelora-dashboard.json (and docs/metrics.md) against server/metrics.cc.

  check_dashboard.py SOURCE_DIR [--promtool=PATH]

- the dashboard is valid JSON, a Grafana dashboard (schemaVersion >= 36, a uid, a title), with
  unique panel ids, a gridPos on every panel and ROUTING and SERVING rows;
- every panel and target uses the Prometheus data source variable ${DS_PROMETHEUS} (or the
  provisioned uid "prometheus");
- every moelora_* name in a query is a metric that server/metrics.cc registers (histograms with
  their _bucket/_sum/_count series), and every registered metric is used somewhere;
- docs/metrics.md documents every registered metric;
- with --promtool, every query parses as PromQL (promtool check rules on a generated rule file,
  Grafana's $variables replaced).
Python 3 standard library only.
"""
import json
import os
import re
import subprocess
import sys
import tempfile

DATASOURCE_UIDS = {"${DS_PROMETHEUS}", "$DS_PROMETHEUS", "prometheus"}


def registered_metrics(metrics_cc):
    """{name: type} from the Counters/Gauges/Histograms(*registry_, "name", ...) calls."""
    text = open(metrics_cc, encoding="utf-8").read()
    found = re.findall(r'(Counters|Gauges|Histograms)\(\s*\*registry_,\s*"(moelora_[a-z0-9_]+)"',
                       text)
    kinds = {"Counters": "counter", "Gauges": "gauge", "Histograms": "histogram"}
    return {name: kinds[kind] for kind, name in found}


def series_names(metrics):
    names = {}
    for name, kind in metrics.items():
        names[name] = name
        if kind == "histogram":
            for suffix in ("_bucket", "_sum", "_count"):
                names[name + suffix] = name
    return names


def all_panels(panels):
    for panel in panels:
        yield panel
        yield from all_panels(panel.get("panels", []))


def main():
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    promtool = next((a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("--promtool=")),
                    "")
    if len(args) != 1:
        print(__doc__)
        return 2
    root = args[0]
    errors = []
    metrics = registered_metrics(os.path.join(root, "server/metrics.cc"))
    if len(metrics) < 20:
        errors.append(f"server/metrics.cc: found only {len(metrics)} metrics; did its form change?")
    series = series_names(metrics)

    path = os.path.join(root, "deploy/grafana/moelora-dashboard.json")
    try:
        dashboard = json.load(open(path, encoding="utf-8"))
    except (OSError, ValueError) as e:
        print(f"{path}: {e}")
        return 1
    for key in ("title", "uid", "panels", "schemaVersion", "templating"):
        if key not in dashboard:
            errors.append(f"dashboard: no '{key}'")
    if dashboard.get("schemaVersion", 0) < 36:
        errors.append(f"dashboard: schemaVersion {dashboard.get('schemaVersion')} < 36")
    variables = {v.get("name"): v for v in dashboard.get("templating", {}).get("list", [])}
    ds_var = variables.get("DS_PROMETHEUS")
    if not ds_var or ds_var.get("type") != "datasource" or ds_var.get("query") != "prometheus":
        errors.append("dashboard: no DS_PROMETHEUS data source variable of type prometheus")

    panels = list(all_panels(dashboard.get("panels", [])))
    ids = [p.get("id") for p in panels]
    if len(ids) != len(set(ids)) or None in ids:
        errors.append(f"dashboard: panel ids missing or repeated: {ids}")
    rows = {p.get("title") for p in panels if p.get("type") == "row"}
    for needed in ("ROUTING", "SERVING"):
        if needed not in rows:
            errors.append(f"dashboard: no {needed} row (rows: {sorted(rows)})")

    used = set()
    exprs = []
    for panel in panels:
        title = panel.get("title", f"panel {panel.get('id')}")
        grid = panel.get("gridPos", {})
        if not all(k in grid for k in ("h", "w", "x", "y")):
            errors.append(f"{title}: gridPos incomplete: {grid}")
        elif grid["x"] + grid["w"] > 24:
            errors.append(f"{title}: wider than the 24-column grid: {grid}")
        if panel.get("type") == "row":
            continue
        if panel.get("datasource", {}).get("uid") not in DATASOURCE_UIDS:
            errors.append(f"{title}: data source {panel.get('datasource')} is not ${{DS_PROMETHEUS}}")
        targets = panel.get("targets", [])
        if not targets:
            errors.append(f"{title}: no queries")
        for target in targets:
            if target.get("datasource", {}).get("uid") not in DATASOURCE_UIDS:
                errors.append(f"{title}: query {target.get('refId')} has data source "
                              f"{target.get('datasource')}")
            expr = target.get("expr", "")
            exprs.append((title, expr))
            for name in re.findall(r"\bmoelora_[a-z0-9_]+", expr):
                if name not in series:
                    errors.append(f"{title}: '{name}' is not a metric of server/metrics.cc")
                else:
                    used.add(series[name])
    for variable in variables.values():
        for name in re.findall(r"\bmoelora_[a-z0-9_]+", json.dumps(variable.get("query", ""))):
            if name not in series:
                errors.append(f"variable {variable['name']}: '{name}' is not a metric")
    for name in sorted(set(metrics) - used):
        errors.append(f"dashboard: metric {name} is not shown on any panel")

    docs = os.path.join(root, "docs/metrics.md")
    try:
        doc_text = open(docs, encoding="utf-8").read()
        for name in sorted(metrics):
            if f"`{name}`" not in doc_text:
                errors.append(f"docs/metrics.md: `{name}` is not documented")
    except OSError as e:
        errors.append(f"docs/metrics.md: {e}")

    if promtool:
        errors.extend(check_promql(promtool, exprs))

    for error in errors:
        print(error)
    if errors:
        return 1
    print(f"dashboard OK: {len(panels)} panels, {len(exprs)} queries, "
          f"{len(used)}/{len(metrics)} metrics used")
    return 0


def check_promql(promtool, exprs):
    """Parses every query with promtool (as recording rules), Grafana variables substituted."""
    def substitute(expr):
        expr = expr.replace("$__rate_interval", "1m").replace("$__interval", "1m")
        expr = expr.replace("$__range", "1h")
        return re.sub(r"\$\{?[A-Za-z_][A-Za-z0-9_]*\}?", ".*", expr)

    lines = ["groups:", "  - name: dashboard", "    rules:"]
    for i, (_, expr) in enumerate(exprs):
        lines.append(f"      - record: dashboard:query_{i}")
        lines.append(f"        expr: {json.dumps(substitute(expr))}")
    with tempfile.NamedTemporaryFile("w", suffix=".yml", delete=False) as f:
        f.write("\n".join(lines) + "\n")
        rules = f.name
    try:
        result = subprocess.run([promtool, "check", "rules", rules], capture_output=True,
                                text=True, check=False)
    finally:
        os.unlink(rules)
    if result.returncode != 0:
        return [f"promtool: {line}" for line in (result.stdout + result.stderr).splitlines()
                if line.strip()]
    return []


if __name__ == "__main__":
    sys.exit(main())
