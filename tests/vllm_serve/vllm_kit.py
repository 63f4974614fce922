"""Helpers for the vllm_serve tests: a tiny Hugging Face model folder, the stand-in ``vllm``
executable (:mod:`fake_vllm`), and what the stand-in reports."""

from __future__ import annotations

import errno
import json
import os
import sys
from pathlib import Path
from typing import Any

import trio
from models.tiny_ct2 import _write_tokenizer, vocabulary

from llm_pool.backends.vllm_serve import VllmServeBackend

FAKE = Path(__file__).with_name("fake_vllm.py")


def write_tiny_hf(folder: Path, *, max_position_embeddings: int = 2048) -> Path:
    """A Hugging Face model folder as far as the pool reads one (tokenizer.json,
    tokenizer_config.json with the ChatML template, config.json); no weights: the stand-in
    needs none."""
    folder.mkdir(parents=True, exist_ok=True)
    _write_tokenizer(folder, vocabulary())
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": len(vocabulary()),
              "max_position_embeddings": max_position_embeddings, "bos_token_id": 0, "eos_token_id": 1}
    (folder / "config.json").write_text(json.dumps(config), encoding="utf-8")
    return folder


def write_fake_binary(folder: Path) -> Path:
    """A ``vllm`` executable that runs the stand-in with this Python (``exec``: the engine pid
    is the stand-in's)."""
    binary = folder / "vllm"
    binary.write_text(f'#!/bin/sh\nexec {sys.executable} {FAKE} "$@"\n', encoding="utf-8")
    binary.chmod(0o755)
    return binary


async def fake_stats(b: VllmServeBackend) -> dict[str, Any]:
    """The stand-in's counters (running, waiting, aborted, finished, last_body, argv)."""
    assert b._client is not None
    r = await b._client.get(f"{b.base_url}/fake/stats")
    return dict(r.json())


def gone(pid: int) -> bool:
    """True when no process ``pid`` exists (a zombie still counts as existing)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


async def wait_gone(pid: int) -> None:
    """Wait until process ``pid`` (not necessarily our child) has exited: a pidfd is readable
    from that moment (as in tests/llama_server/llama_server_kit.py)."""
    try:
        fd = os.pidfd_open(pid)
    except OSError as e:
        if e.errno == errno.ESRCH:
            return
        raise
    try:
        await trio.lowlevel.wait_readable(fd)
    finally:
        os.close(fd)
