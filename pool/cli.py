"""``llm-pool``: the command line.  ``serve`` runs the server; the rest are thin HTTP clients."""

from __future__ import annotations

import argparse
import functools
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from importlib import metadata
from typing import TextIO, TypeVar

import trio

T = TypeVar("T")


def _serve(args: argparse.Namespace) -> int:
    from llm_pool.config import SettingsError, load_settings
    from llm_pool.pool.logs import configure_logging
    from llm_pool.pool.sd_notify import Notifier
    from llm_pool.pool.server import serve

    try:
        settings = load_settings(args.config)
    except SettingsError as e:
        print(f"llm-pool: {e}", file=sys.stderr)
        return 2
    if args.host or args.port is not None:
        import msgspec

        service = msgspec.structs.replace(
            settings.service,
            **{k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None},
        )
        settings = msgspec.structs.replace(settings, service=service)
    configure_logging(settings.service.log_level)
    notifier = Notifier.from_environ()  # systemd's Type=notify (deploy/systemd/); a no-op elsewhere

    async def run() -> None:
        async with notifier:
            await serve(settings, config_path=args.config, notifier=notifier)

    try:
        trio.run(run)
    except RuntimeError as e:  # e.g. a token variable named in the settings is unset
        print(f"llm-pool: {e}", file=sys.stderr)
        return 2
    return 0


def _convert(args: argparse.Namespace) -> int:
    from pathlib import Path

    src, dst = Path(args.src), Path(args.dst)
    # checked here, before the converter's imports (seconds): one line that says what is wrong
    if not src.exists():
        print(f"llm-pool: no such GGUF file: {src}", file=sys.stderr)
        return 2
    if not src.is_file():
        print(f"llm-pool: not a GGUF file (a directory?): {src}", file=sys.stderr)
        return 2
    if dst.exists() and not args.force:
        print(f"llm-pool: {dst} exists; pass --force to replace it", file=sys.stderr)
        return 2

    from llm_pool.backends.ct2_convert import GGUFConversionError, convert_gguf_to_ct2

    t0 = time.perf_counter()
    try:
        out = convert_gguf_to_ct2(src, dst, quantization=args.quantization, progress=ConvertProgress(sys.stderr, t0))
    except GGUFConversionError as e:
        print(f"\nllm-pool: cannot convert {src}: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # unreadable source, unwritable destination, disk full
        where = f": {e.filename}" if e.filename else ""
        print(f"\nllm-pool: {e.strerror or e}{where}", file=sys.stderr)
        return 2
    print(f"wrote {out} in {time.perf_counter() - t0:.1f} s; serve it with backend = \"ct2\", model_path = \"{out}\"")
    return 0


class ConvertProgress:
    """``convert-gguf``'s progress on stderr: one line per stage; on a terminal the layer count
    is redrawn in place (``\\r``), elsewhere (a log, CI) it is printed at every 25%."""

    WORDS = {"read": "reading the GGUF file", "layers": "dequantizing layers", "write": "quantizing and writing"}

    def __init__(self, stream: TextIO, t0: float) -> None:
        self.stream = stream
        self.t0 = t0
        self.tty = stream.isatty()

    def __call__(self, stage: str, done: int, total: int) -> None:
        took = f"{time.perf_counter() - self.t0:.1f} s"
        if stage == "layers":
            if self.tty:
                end = "\n" if done == total else ""
                print(f"\r{self.WORDS[stage]} {done}/{total} ({took})", end=end, file=self.stream, flush=True)
            elif done == total or done * 4 // total != (done - 1) * 4 // total:
                print(f"{self.WORDS[stage]} {done}/{total} ({took})", file=self.stream, flush=True)
        elif done == 0:
            print(f"{self.WORDS[stage]}... ({took})", file=self.stream, flush=True)


def _tune(args: argparse.Namespace) -> int:
    """``llm-pool tune MODEL``: sweep the model's layouts here (see :mod:`llm_pool.pool.tuning`);
    progress on stderr, the table and the lines to paste on stdout.  Ctrl-C stops it: the
    layout being measured is unloaded and nothing is recorded."""
    import logging

    from llm_pool.config import SettingsError, load_settings
    from llm_pool.pool import tuning

    try:
        settings = load_settings(args.config)
        concurrencies = tuple(int(c) for c in args.concurrency.split(","))
        if not concurrencies or min(concurrencies) < 1:
            raise ValueError
    except SettingsError as e:
        print(f"llm-pool: {e}", file=sys.stderr)
        return 2
    except ValueError:
        print(f"llm-pool: --concurrency must be a comma list of integers >= 1, not {args.concurrency!r}", file=sys.stderr)
        return 2
    engines = tuple(e.strip() for e in args.engines.split(",") if e.strip())
    if not engines or any(e not in tuning.ENGINES for e in engines):
        print(f"llm-pool: --engines must be a comma list of {', '.join(tuning.ENGINES)}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.ERROR)  # the engines' own chatter would drown the progress

    def progress(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    sweep = functools.partial(
        tuning.sweep, settings, args.model, cores=args.cores, concurrencies=concurrencies,
        engines=engines, tokens=args.tokens, max_s=args.max_s, progress=progress, record=not args.no_record,
    )  # fmt: skip
    try:
        result = trio.run(_until_ctrl_c, sweep)
    except tuning.TuneError as e:
        print(f"llm-pool: {e}", file=sys.stderr)
        return 2
    if result is None:
        print("llm-pool: tune stopped; nothing recorded", file=sys.stderr)
        return 130
    print("\n".join(tuning.format_table(result)))
    return 0


async def _until_ctrl_c(work: Callable[[], Awaitable[T]]) -> T | None:
    """``work()``'s result, or None once Ctrl-C (SIGINT) cancelled it.  The signal is received
    as a message, so the cancellation unwinds ``work`` through its own cleanup (a layout being
    measured is unloaded); a KeyboardInterrupt raised at an arbitrary point could leave a
    coroutine half made."""
    result: list[T] = []
    failed: list[Exception] = []
    with trio.open_signal_receiver(signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:

            async def run() -> None:
                try:
                    result.append(await work())
                except Exception as e:  # raised below as itself, not in the nursery's group
                    failed.append(e)
                nursery.cancel_scope.cancel()

            nursery.start_soon(run)
            async for _ in signals:
                nursery.cancel_scope.cancel()
                break
    if failed:
        raise failed[0]
    return result[0] if result else None


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, not {text!r}")
    return value


def version() -> str:
    try:
        return metadata.version("llm-pool")
    except metadata.PackageNotFoundError:  # a source tree that was never installed
        return "0.0.0"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="llm-pool", description="Many language models behind one HTTP API.")
    parser.add_argument("--version", action="version", version=f"llm-pool {version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("serve", help="serve the models in pool.toml")
    p.add_argument("--config", help="settings file (default: $LLM_POOL_SETTINGS_PATH or ./pool.toml)")
    p.add_argument("--host", help="override service.host")
    p.add_argument("--port", type=int, help="override service.port")
    p.set_defaults(func=_serve)
    p = sub.add_parser("convert-gguf", help="convert a llama-family GGUF to a CTranslate2 model folder")
    p.add_argument("src", help="the .gguf file")
    p.add_argument("dst", help="the CTranslate2 folder to write")
    p.add_argument("--quantization", default="int8", help="CT2 weight type (default int8)")
    p.add_argument("--force", action="store_true", help="replace the folder if it exists")
    p.set_defaults(func=_convert)
    p = sub.add_parser("tune", help="measure a GGUF model's replica layouts on this machine and record the best")
    p.add_argument("model", help="the model's name in pool.toml")
    p.add_argument("--config", help="settings file (default: $LLM_POOL_SETTINGS_PATH or ./pool.toml)")
    p.add_argument("--cores", type=_positive, help="cores to cut into layouts (default: engine.cpu_cores, else all)")
    p.add_argument("--concurrency", default="1,4,8", help="comma list of concurrencies (default 1,4,8)")
    p.add_argument("--engines", default="gguf,gguf_batched,llama_server", help="comma list of engines to try")
    p.add_argument("--tokens", type=_positive, default=64, help="tokens per request (default 64)")
    p.add_argument("--max-s", type=float, default=600.0, help="the whole sweep's time bound in seconds (default 600)")
    p.add_argument("--no-record", action="store_true", help="print only; leave the tuning cache as it is")
    p.set_defaults(func=_tune)
    from llm_pool.pool.client import add_client_commands

    add_client_commands(sub)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
