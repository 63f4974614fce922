"""``llm-pool``: the command line.  ``serve`` runs the server; the rest are thin HTTP clients."""

from __future__ import annotations

import argparse
import sys

import trio


def _serve(args: argparse.Namespace) -> int:
    from llm_pool.config import SettingsError, load_settings
    from llm_pool.pool.logs import configure_logging
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
    try:
        trio.run(lambda: serve(settings, config_path=args.config))
    except RuntimeError as e:  # e.g. a token variable named in the settings is unset
        print(f"llm-pool: {e}", file=sys.stderr)
        return 2
    return 0


def _convert(args: argparse.Namespace) -> int:
    from pathlib import Path

    from llm_pool.backends.ct2_convert import GGUFConversionError, convert_gguf_to_ct2

    try:
        out = convert_gguf_to_ct2(Path(args.src), Path(args.dst), quantization=args.quantization)
    except (GGUFConversionError, FileNotFoundError, FileExistsError) as e:
        print(f"llm-pool: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}; serve it with backend = \"ct2\", model_path = \"{out}\"")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="llm-pool", description="Many language models behind one HTTP API.")
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
    p.set_defaults(func=_convert)
    from llm_pool.pool.client import add_client_commands

    add_client_commands(sub)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
