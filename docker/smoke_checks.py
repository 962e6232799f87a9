"""Small checks of the docker smoke test (docker/smoke.sh), standard library only.

``act URL --api-key KEY``
    One session of the first model of ``GET /v1/models``: ``POST /v1/sessions``, one ``POST /v1/act``
    (an observation of zeros), checks the action's length and finite values, deletes the session.

``prometheus URL --instance ADDR:PORT[=STEPS] ... --timeout S``
    Waits (at most S seconds) until Prometheus, queried through its HTTP API, holds every replica's series:
    ``up{job="trmrl"}`` is 1 for exactly the given instances, ``trmrl_steps_total`` summed per instance is
    above 0 for each (and equal to STEPS where given: the replica's own /metrics, read while no traffic
    runs, so Prometheus must have scraped it after the last step), ``trmrl_request_duration_seconds_count``
    has series for each, and the rule groups (settings and alerts) are loaded with no alert firing. Prints
    the query results.

``alert URL NAME --timeout S``
    Waits until the alert NAME is pending or firing (``/api/v1/alerts``) and prints it.

Every wait has a deadline; on failure the last answer is printed and the exit status is 1.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any


def _http(method: str, url: str, body: Any = None, key: str | None = None, timeout: float = 10.0) -> Any:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        request.add_header("Content-Type", "application/json")
    if key:
        request.add_header("Authorization", f"Bearer {key}")
    with urllib.request.urlopen(request, timeout=timeout) as reply:
        raw = reply.read()
    return json.loads(raw) if raw else None


def act(url: str, key: str | None) -> int:
    models = _http("GET", f"{url}/v1/models", key=key)
    model = next((m for m in models["models"] if m.get("default")), models["models"][0])
    name, obs_dim, act_dim = model["name"], int(model["obs_dim"]), int(model["act_dim"])
    session = _http("POST", f"{url}/v1/sessions", {"model": name}, key=key)
    sid = session["session_id"]
    started = time.perf_counter()
    reply = _http(
        "POST",
        f"{url}/v1/act",
        {"session_id": sid, "observation": [0.0] * obs_dim, "reward": 0.0, "episode_start": True},
        key=key,
    )
    took_ms = (time.perf_counter() - started) * 1000
    action = reply["action"]
    _http("DELETE", f"{url}/v1/sessions/{sid}", key=key)
    if len(action) != act_dim or not all(math.isfinite(a) for a in action):
        print(f"act: bad action {action} (act_dim {act_dim})")
        return 1
    version = model.get("version", "?")
    print(f"act: {name} ({version}): POST /v1/act answered {act_dim} finite actions in {took_ms:.1f} ms")
    return 0


def _query(url: str, promql: str) -> list[dict[str, Any]]:
    answer = _http("GET", f"{url}/api/v1/query?" + urllib.parse.urlencode({"query": promql}))
    if answer.get("status") != "success":
        raise RuntimeError(f"query {promql!r}: {answer}")
    return answer["data"]["result"]


def _alerts(url: str) -> list[dict[str, Any]]:
    return _http("GET", f"{url}/api/v1/alerts")["data"]["alerts"]


def _by_instance(result: list[dict[str, Any]]) -> dict[str, float]:
    return {r["metric"].get("instance", ""): float(r["value"][1]) for r in result}


def prometheus(url: str, instances: list[str], timeout: float) -> int:
    expected_steps = {i.split("=")[0]: float(i.split("=")[1]) for i in instances if "=" in i}
    want = {i.split("=")[0] for i in instances}
    queries = {
        "up": 'up{job="trmrl"}',
        "steps": 'sum by (instance) (trmrl_steps_total{job="trmrl"})',
        "requests": 'sum by (instance) (trmrl_request_duration_seconds_count{job="trmrl"})',
    }
    deadline = time.monotonic() + timeout
    started = time.monotonic()
    last: dict[str, Any] = {}
    problem = "no answer yet"
    while True:
        try:
            last = {k: _by_instance(_query(url, q)) for k, q in queries.items()}
            rules = _http("GET", f"{url}/api/v1/rules")["data"]["groups"]
            groups = {g["name"]: g for g in rules}
            firing = [a for a in _alerts(url) if a["state"] == "firing"]
            if set(last["up"]) != want:
                problem = f"up{{job=trmrl}} instances {sorted(last['up'])}, expected {sorted(want)}"
            elif any(v != 1 for v in last["up"].values()):
                problem = f"up{{job=trmrl}} not 1 everywhere: {last['up']}"
            elif set(last["steps"]) != want or any(v <= 0 for v in last["steps"].values()):
                problem = f"trmrl_steps_total per instance {last['steps']}: not > 0 for each replica"
            elif any(last["steps"][i] != n for i, n in expected_steps.items()):
                problem = f"trmrl_steps_total per instance {last['steps']}, replicas: {expected_steps}"
            elif set(last["requests"]) != want:
                problem = f"trmrl_request_duration_seconds_count per instance {last['requests']}"
            elif not {"trmrl-settings", "trmrl-alerts", "trmrl-recording"} <= set(groups):
                problem = f"rule groups loaded: {sorted(groups)}"
            elif firing:
                problem = f"alerts firing: {[a['labels']['alertname'] for a in firing]}"
            else:
                break
        except (OSError, urllib.error.URLError, RuntimeError, KeyError, ValueError) as exc:
            problem = f"{type(exc).__name__}: {exc}"
        if time.monotonic() > deadline:
            print(f"prometheus: after {timeout:.0f} s: {problem}; last answers {json.dumps(last)}")
            return 1
        time.sleep(2)
    alerts = [r["name"] for r in groups["trmrl-alerts"]["rules"]]
    settings = {r["name"]: r["query"] for r in groups["trmrl-settings"]["rules"]}
    print(f"prometheus: every replica's series within {time.monotonic() - started:.1f} s")
    for name, values in last.items():
        shown = ", ".join(f"{i} {v:g}" for i, v in sorted(values.items()))
        print(f"prometheus: {queries[name]} -> {shown}")
    print(f"prometheus: alerting rules {', '.join(alerts)} (none firing); settings {settings}")
    return 0


def alert(url: str, name: str, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    started = time.monotonic()
    last: Any = None
    while True:
        try:
            last = [a for a in _alerts(url) if a["labels"]["alertname"] == name]
            if last:
                a = last[0]
                print(
                    f"prometheus: alert {name} {a['state']} after {time.monotonic() - started:.1f} s "
                    f"(value {float(a['value']):g}): {a['annotations'].get('summary', '')}"
                )
                return 0
        except (OSError, urllib.error.URLError, KeyError, ValueError) as exc:
            last = f"{type(exc).__name__}: {exc}"
        if time.monotonic() > deadline:
            print(f"prometheus: alert {name} not pending or firing after {timeout:.0f} s; last answer {last}")
            return 1
        time.sleep(2)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p_act = sub.add_parser("act")
    p_act.add_argument("url")
    p_act.add_argument("--api-key")
    p_prom = sub.add_parser("prometheus")
    p_prom.add_argument("url")
    p_prom.add_argument("--instance", action="append", required=True)
    p_prom.add_argument("--timeout", type=float, default=90.0)
    p_alert = sub.add_parser("alert")
    p_alert.add_argument("url")
    p_alert.add_argument("name")
    p_alert.add_argument("--timeout", type=float, default=90.0)
    args = parser.parse_args()
    if args.command == "act":
        return act(args.url.rstrip("/"), args.api_key)
    if args.command == "prometheus":
        return prometheus(args.url.rstrip("/"), args.instance, args.timeout)
    return alert(args.url.rstrip("/"), args.name, args.timeout)


if __name__ == "__main__":
    sys.exit(main())
