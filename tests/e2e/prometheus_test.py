#!/usr/bin/env python3
"""A real Prometheus scrapes a real moelora-server; the routing series carry the expected values.

Starts moelora-server on the demo assets with its metrics endpoint on loopback, starts Debian's
prometheus with a 1 s scrape of it, drives requests with moelora-cli, and queries Prometheus's
HTTP API:
  * a request pinned to one expert adds exactly its routed tokens (prompt + generated - 1: the
    last token is never fed back) to that expert's weight mass and top-1 count;
  * routed-token, router-request and request counters match what was sent;
  * `promtool check metrics` accepts the exposition without a warning;
  * the server drains and exits 0 on SIGTERM.

Usage: prometheus_test.py <build dir>   (stdlib only; registered with CTest)
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request


def free_ports(count):
    socks = [socket.socket() for _ in range(count)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def fetch(url):
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.read().decode()


def query(prom_port, expr):
    url = f"http://127.0.0.1:{prom_port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    body = json.loads(fetch(url))
    if body["status"] != "success":
        raise RuntimeError(f"query {expr}: {body}")
    return {tuple(sorted(r["metric"].items())): float(r["value"][1]) for r in body["data"]["result"]}


def wait_for(what, predicate, timeout=60):
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        try:
            last = predicate()
            if last is True:
                return
        except Exception as error:  # the target may not be up yet
            last = error
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what} (last: {last})")


def main():
    build = os.path.abspath(sys.argv[1])
    server_bin = os.path.join(build, "server", "moelora-server")
    cli_bin = os.path.join(build, "client", "moelora-cli")
    assets_bin = os.path.join(build, "tools", "moelora-demo-assets")
    work = tempfile.mkdtemp(prefix="moelora_prometheus_test_")
    processes = []
    try:
        subprocess.run([assets_bin, f"--dir={work}/assets"], check=True, stdout=subprocess.DEVNULL)
        port, admin_port, metrics_port, prom_port = free_ports(4)
        server_log = open(os.path.join(work, "server.log"), "w")
        server = subprocess.Popen(
            [server_bin, f"--model_dir={work}/assets/model",
             f"--manifest={work}/assets/manifest.json", f"--listen=127.0.0.1:{port}",
             f"--admin_listen=127.0.0.1:{admin_port}", f"--metrics_listen=127.0.0.1:{metrics_port}",
             "--device=cpu", "--drain_timeout=10s"],
            stderr=server_log)
        processes.append(server)

        def cli(*args):
            return subprocess.run([cli_bin, f"--address=127.0.0.1:{port}",
                                   f"--admin_address=127.0.0.1:{admin_port}", *args],
                                  check=True, capture_output=True, text=True).stdout

        wait_for("server health", lambda: cli("health", "--timeout=1s") is not None)

        with open(os.path.join(work, "prometheus.yml"), "w") as config:
            config.write(f"""global:
  scrape_interval: 1s
  evaluation_interval: 1s
scrape_configs:
  - job_name: moelora
    static_configs:
      - targets: ["127.0.0.1:{metrics_port}"]
""")
        prometheus = subprocess.Popen(
            ["prometheus", f"--config.file={work}/prometheus.yml",
             f"--storage.tsdb.path={work}/tsdb", f"--web.listen-address=127.0.0.1:{prom_port}"],
            stdout=subprocess.DEVNULL, stderr=open(os.path.join(work, "prometheus.log"), "w"))
        processes.append(prometheus)
        wait_for("prometheus to scrape the server",
                 lambda: query(prom_port, 'up{job="moelora"}') and
                 list(query(prom_port, 'up{job="moelora"}').values()) == [1.0])

        # Pinned: weight 1 on "code" for every routed token.
        prompt, generated = [1, 17, 42, 99, 7], 6
        routed = len(prompt) + generated - 1
        for _ in range(2):
            cli("generate", "--pin=code", "--prompt_ids=" + ",".join(map(str, prompt)),
                f"--max_new_tokens={generated}")
        # Routed by the default router: every token's weights sum to 1.
        cli("generate", "--prompt_ids=3,8,64", "--max_new_tokens=4")

        def series_ready():
            requests = query(prom_port, 'moelora_requests_total{rpc="Generate",code="OK"}')
            return list(requests.values()) == [3.0]

        wait_for("the Generate requests to be scraped", series_ready)
        mass = query(prom_port, "moelora_expert_routing_weight_total")
        top1 = query(prom_port, "moelora_expert_top1_selections_total")
        tokens = query(prom_port, "moelora_routed_tokens_total")
        routers = query(prom_port, "moelora_router_requests_total")

        def value(series, **labels):
            for key, v in series.items():
                if all((name, want) in key for name, want in labels.items()):
                    return v
            return 0.0

        default_tokens = 3 + 4 - 1
        assert value(tokens, router="none") == 2 * routed, tokens
        assert value(tokens, router="demo-router") == default_tokens, tokens
        assert value(routers, router="none") == 2, routers
        assert value(routers, router="demo-router") == 1, routers
        total_mass = sum(mass.values())
        assert abs(total_mass - (2 * routed + default_tokens)) < 1e-3, mass
        # "code" got exactly the pinned tokens plus its share of the routed request's.
        code_mass = value(mass, expert="code")
        assert 2 * routed <= code_mass <= 2 * routed + default_tokens + 1e-3, mass
        assert sum(top1.values()) == 2 * routed + default_tokens, top1
        assert value(top1, expert="code") >= 2 * routed, top1
        imbalance = query(prom_port, 'moelora_routing_load_imbalance{router="none"}')
        assert list(imbalance.values()) == [4.0], imbalance  # all on one of 4 experts

        exposition = fetch(f"http://127.0.0.1:{metrics_port}/metrics")
        check = subprocess.run(["promtool", "check", "metrics"], input=exposition,
                               capture_output=True, text=True)
        assert check.returncode == 0 and not check.stdout.strip() and not check.stderr.strip(), (
            f"promtool: {check.stdout} {check.stderr}")

        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=30) == 0, "server exit status"
        print(f"ok: routed {2 * routed} pinned + {default_tokens} default tokens, "
              f"code mass {code_mass:.3f}, promtool clean")
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
        if os.environ.get("MOELORA_KEEP_TEST_DIR"):
            print("kept", work)
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
