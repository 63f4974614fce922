"""Thin command-line clients of the HTTP API (``llm-pool models|status|load|unload|chat``)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

import httpx


def _client(args: argparse.Namespace) -> httpx.Client:
    headers = {}
    token = os.environ.get(args.token_env or "") if args.token_env else None
    if token:
        headers["Authorization"] = f"Bearer {token}"
    return httpx.Client(base_url=args.url, headers=headers, timeout=httpx.Timeout(10.0, read=None))


def _call(args: argparse.Namespace, method: str, path: str, **kwargs: Any) -> Any:
    try:
        with _client(args) as client:
            r = client.request(method, path, **kwargs)
    except httpx.ConnectError:
        raise SystemExit(f"llm-pool: no server answers at {args.url} (start one with `llm-pool serve`)") from None
    if r.status_code >= 400:
        try:
            message = r.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = r.text
        raise SystemExit(f"llm-pool: {r.status_code}: {message}")
    return r.json()


def _models(args: argparse.Namespace) -> int:
    for name in _call(args, "GET", "/v1/models")["models"]:
        print(name)
    return 0


def _status(args: argparse.Namespace) -> int:
    rows = _call(args, "GET", "/v1/admin/models")["models"]
    cols = ("name", "resolved_backend", "runtime_state", "loaded_replicas", "replica_max", "runtime_inflight", "queue_depth", "vram_estimate_mib", "idle_unload_in_s", "last_error")
    heads = ("MODEL", "BACKEND", "STATE", "REPLICAS", "MAX", "RUNNING", "QUEUED", "VRAM_MIB", "IDLE_UNLOAD_IN_S", "LAST_ERROR")
    table = [heads] + [tuple("" if r.get(c) is None else str(r[c]) for c in cols) for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(cols))]
    for row in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    return 0


def _load(args: argparse.Namespace) -> int:
    body: dict[str, Any] = {}
    if args.replicas is not None:
        body["replicas"] = args.replicas
    for item in args.set or []:
        key, _, value = item.partition("=")
        try:
            body[key] = json.loads(value)
        except ValueError:
            body[key] = value
    row = _call(args, "POST", f"/v1/admin/models/{args.name}/load", json=body)
    print(f"{row['name']}: {row['runtime_state']} ({row['loaded_replicas']} replica(s))")
    return 0


def _unload(args: argparse.Namespace) -> int:
    params = {"force": "true"} if args.force else {}
    row = _call(args, "POST", f"/v1/admin/models/{args.name}/unload", params=params)
    print(f"{row['name']}: {row['runtime_state']}")
    return 0


def _chat(args: argparse.Namespace) -> int:
    body = {"model": args.name, "input": args.prompt or sys.stdin.read(), "stream": True, "allow_remote": args.allow_remote}
    try:
        with _client(args) as client, client.stream("POST", "/v1/responses", json=body) as r:
            if r.status_code >= 400:
                r.read()
                raise SystemExit(f"llm-pool: {r.status_code}: {r.json()['error']['message']}")
            event = ""
            for line in r.iter_lines():
                if line.startswith("event: "):
                    event = line[7:]
                elif line.startswith("data: "):
                    data = json.loads(line[6:])
                    if event == "response.output_text.delta":
                        print(data["delta"], end="", flush=True)
                    elif event == "error":
                        raise SystemExit(f"\nllm-pool: {data['code']}: {data['message']}")
            print()
    except httpx.ConnectError:
        raise SystemExit(f"llm-pool: no server answers at {args.url} (start one with `llm-pool serve`)") from None
    return 0


def add_client_commands(sub: Any) -> None:
    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--url", default=os.environ.get("LLM_POOL_URL", "http://127.0.0.1:8000"), help="server URL (default: $LLM_POOL_URL or http://127.0.0.1:8000)")
        p.add_argument("--token-env", default="LLM_POOL_TOKEN", help="environment variable holding a bearer token")

    p = sub.add_parser("models", help="list loaded models")
    common(p)
    p.set_defaults(func=_models)
    p = sub.add_parser("status", help="table of models, states, replicas, queues, VRAM")
    common(p)
    p.set_defaults(func=_status)
    p = sub.add_parser("load", help="load a model")
    common(p)
    p.add_argument("name")
    p.add_argument("--replicas", type=int)
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="a load override, e.g. gguf_n_ctx=4096")
    p.set_defaults(func=_load)
    p = sub.add_parser("unload", help="unload a model (graceful)")
    common(p)
    p.add_argument("name")
    p.add_argument("--force", action="store_true", help="cancel running requests at once")
    p.set_defaults(func=_unload)
    p = sub.add_parser("chat", help="stream a reply in the terminal")
    common(p)
    p.add_argument("name")
    p.add_argument("prompt", nargs="?")
    p.add_argument("--allow-remote", action="store_true")
    p.set_defaults(func=_chat)
