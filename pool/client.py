"""Thin command-line clients of the HTTP API (``llm-pool models|status|load|unload|reload|gpu|chat``).

Each command is one or two HTTP calls and a few printed lines; the server decides everything.
``status --watch`` redraws the table until Ctrl-C; ``chat`` without a prompt, on a terminal, is
a conversation (each turn sent with the ones before it, line editing and recall by ``readline``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
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


def _status_table(rows: list[dict[str, Any]]) -> list[str]:
    cols = ("name", "resolved_backend", "runtime_state", "loaded_replicas", "replica_max", "runtime_inflight", "queue_depth", "vram_estimate_mib", "idle_unload_in_s", "last_error")
    heads = ("MODEL", "BACKEND", "STATE", "REPLICAS", "MAX", "RUNNING", "QUEUED", "VRAM_MIB", "IDLE_UNLOAD_IN_S", "LAST_ERROR")
    return _table(heads, [tuple("" if r.get(c) is None else str(r[c]) for c in cols) for r in rows])


def _table(heads: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    table = [heads, *rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(heads))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in table]


#: Home the cursor and clear the screen (ANSI), before each redraw of ``status --watch``.
CLEAR = "\x1b[H\x1b[2J"


def _status(args: argparse.Namespace) -> int:
    if args.watch is None:
        print("\n".join(_status_table(_call(args, "GET", "/v1/admin/models")["models"])))
        return 0
    clear = CLEAR if sys.stdout.isatty() else ""
    try:
        while True:
            lines = _status_table(_call(args, "GET", "/v1/admin/models")["models"])
            stamp = time.strftime("%H:%M:%S")
            print(f"{clear}{args.url}  every {args.watch:g}s  {stamp}  (Ctrl-C to stop)", *lines, sep="\n", flush=True)
            time.sleep(args.watch)
    except KeyboardInterrupt:
        return 0


def _interval(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if not value >= 0.1:
        raise argparse.ArgumentTypeError(f"expected at least 0.1 seconds, got {text!r}")
    return value


def _key_value(text: str) -> tuple[str, str]:
    key, eq, value = text.partition("=")
    if not eq or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (e.g. gguf_n_ctx=4096), got {text!r}")
    return key, value


def _reload(args: argparse.Namespace) -> int:
    result = _call(args, "POST", "/v1/admin/settings/reload")
    for key in ("added_models", "removed_models", "updated_models", "unchanged_models"):
        names = result[key]
        print(f"{key.removesuffix('_models')}: {', '.join(names) if names else '-'}")
    if result["service_restart_required"]:
        print("[service] changed: restart the server to apply it")
    return 0


def _gpu(args: argparse.Namespace) -> int:
    report = _call(args, "GET", "/v1/admin/gpu-memory")
    if report["error"]:
        print(f"no GPU: {report['error']}")
    else:
        rows = [(str(g["index"]), g["name"], str(g["used_mib"]), str(g["total_mib"]), g["used_over_total"]) for g in report["gpus"]]
        print("\n".join(_table(("GPU", "NAME", "USED_MIB", "TOTAL_MIB", "USED"), rows)))
    models = [
        (m["name"], m["runtime_state"], "" if m["vram_estimate_mib"] is None else f"{m['vram_estimate_mib']:g}", m["vram_estimate_source"])
        for m in report["models"]
    ]
    print()
    print("\n".join(_table(("MODEL", "STATE", "VRAM_MIB", "SOURCE"), models)))
    return 0


def _load(args: argparse.Namespace) -> int:
    body: dict[str, Any] = {}
    if args.replicas is not None:
        body["replicas"] = args.replicas
    for key, value in args.set or []:
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
    if args.prompt is None and sys.stdin.isatty():
        return _chat_interactive(args)
    body = {"model": args.name, "input": args.prompt or sys.stdin.read(), "stream": True, "allow_remote": args.allow_remote}
    _stream(args, "/v1/responses", body, _responses_delta)
    print()
    return 0


def _responses_delta(event: str, data: Any) -> str | None:
    if event == "response.output_text.delta":
        return str(data["delta"])
    if event == "error":
        raise SystemExit(f"\nllm-pool: {data['code']}: {data['message']}")
    return None


def _chat_delta(event: str, data: Any) -> str | None:
    if "error" in data:
        raise SystemExit(f"\nllm-pool: {data['error']['code']}: {data['error']['message']}")
    choices = data.get("choices") or [{}]
    return choices[0].get("delta", {}).get("content") or None


def _stream(args: argparse.Namespace, path: str, body: dict[str, Any], delta: Callable[[str, Any], str | None]) -> str:
    """POST ``body`` with ``stream: true`` and print each text delta as it comes; the whole text."""
    out: list[str] = []
    try:
        with _client(args) as client, client.stream("POST", path, json=body) as r:
            if r.status_code >= 400:
                r.read()
                raise SystemExit(f"llm-pool: {r.status_code}: {r.json()['error']['message']}")
            event = ""
            for line in r.iter_lines():
                if line.startswith("event: "):
                    event = line[7:]
                elif line.startswith("data: ") and line != "data: [DONE]":
                    text = delta(event, json.loads(line[6:]))
                    if text:
                        out.append(text)
                        print(text, end="", flush=True)
    except httpx.ConnectError:
        raise SystemExit(f"llm-pool: no server answers at {args.url} (start one with `llm-pool serve`)") from None
    return "".join(out)


#: What the interactive chat says first.
CHAT_HELP = "chatting with {model}: Enter sends, /reset forgets the conversation, Ctrl-D or /exit ends"


def _chat_interactive(args: argparse.Namespace) -> int:
    """A conversation: each line is a user turn sent with every turn before it to
    ``/v1/chat/completions``; ``/reset`` starts over; Ctrl-C stops a reply (and forgets that
    turn); Ctrl-D or ``/exit`` ends.  ``readline`` (where Python has it) gives line editing and
    recall of earlier lines."""
    try:
        import readline  # noqa: F401 - its import alone makes input() edit lines and keep history
    except ImportError:  # Windows
        pass
    print(CHAT_HELP.format(model=args.name))
    history: list[dict[str, str]] = []
    while True:
        try:
            line = input("> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        text = line.strip()
        if not text:
            continue
        if text == "/exit":
            return 0
        if text == "/reset":
            history.clear()
            print("(conversation forgotten)")
            continue
        turn = {"role": "user", "content": line}
        body = {"model": args.name, "messages": [*history, turn], "stream": True, "allow_remote": args.allow_remote}
        try:
            reply = _stream(args, "/v1/chat/completions", body, _chat_delta)
        except KeyboardInterrupt:
            print("\n(stopped; this turn is forgotten)")
            continue
        except SystemExit as e:  # a refusal or a failed reply: say it, keep the conversation
            print(e.code if isinstance(e.code, str) else "", file=sys.stderr)
            continue
        print()
        history += [turn, {"role": "assistant", "content": reply}]


def add_client_commands(sub: Any) -> None:
    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--url", default=os.environ.get("LLM_POOL_URL", "http://127.0.0.1:8000"), help="server URL (default: $LLM_POOL_URL or http://127.0.0.1:8000)")
        p.add_argument("--token-env", default="LLM_POOL_TOKEN", help="environment variable holding a bearer token")

    p = sub.add_parser("models", help="list loaded models")
    common(p)
    p.set_defaults(func=_models)
    p = sub.add_parser("status", help="table of models, states, replicas, queues, VRAM")
    common(p)
    p.add_argument("--watch", nargs="?", const=2.0, type=_interval, metavar="SECONDS",
                   help="redraw every SECONDS (default 2) until Ctrl-C")
    p.set_defaults(func=_status)
    p = sub.add_parser("load", help="load a model")
    common(p)
    p.add_argument("name")
    p.add_argument("--replicas", type=int)
    p.add_argument("--set", action="append", type=_key_value, metavar="KEY=VALUE", help="a load override, e.g. gguf_n_ctx=4096")
    p.set_defaults(func=_load)
    p = sub.add_parser("unload", help="unload a model (graceful)")
    common(p)
    p.add_argument("name")
    p.add_argument("--force", action="store_true", help="cancel running requests at once")
    p.set_defaults(func=_unload)
    p = sub.add_parser("reload", help="re-read the settings files (never loads or unloads)")
    common(p)
    p.set_defaults(func=_reload)
    p = sub.add_parser("gpu", help="GPU memory and each model's VRAM estimate")
    common(p)
    p.set_defaults(func=_gpu)
    p = sub.add_parser("chat", help="stream a reply; without a prompt on a terminal, a conversation")
    common(p)
    p.add_argument("name")
    p.add_argument("prompt", nargs="?", help="the prompt (default: read stdin; a conversation on a terminal)")
    p.add_argument("--allow-remote", action="store_true")
    p.set_defaults(func=_chat)
