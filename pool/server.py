"""Run the whole pool: hypercorn, the pool manager and the signal watcher in one nursery.

::

    main nursery
    ├── pool manager            (models' nurseries under it)
    ├── signal watcher          SIGINT/SIGTERM → graceful stop; SIGHUP → reload the settings
    └── hypercorn.trio.serve    shutdown_trigger = our stop event

Graceful stop: readiness goes false and new requests get 503 ``shutting_down``; running requests
get ``service.shutdown_drain_s`` to finish (their streams keep flowing); then hypercorn stops and
the nursery is cancelled.  Models load in the background after the server is up, never in
``before_serving``.

SIGHUP re-reads the settings files exactly as ``POST /v1/admin/settings/reload`` does (never
loading or unloading anything) and logs the outcome; without a handler its default action would
kill the server at once (exit 129, streams cut).

Under systemd (``Type=notify``, see deploy/systemd/) the ``notifier`` tells the supervisor what
happens: ``READY=1`` once the enabled models have settled, ``RELOADING=1``/``READY=1`` around a
SIGHUP reload, ``STOPPING=1`` when the drain begins, and ``WATCHDOG=1`` from a task of the main
nursery, so a blocked event loop gets the service restarted (:mod:`llm_pool.pool.sd_notify`).
"""

from __future__ import annotations

import ipaddress
import logging
import signal
from typing import Any

import msgspec
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve as hypercorn_serve

from llm_pool.admin.gpu import read_gpus, used_mib
from llm_pool.backends import kind_of
from llm_pool.config import Settings
from llm_pool.pool.errors import PoolError
from llm_pool.pool.http import create_app
from llm_pool.pool.manager import BackendFactory, ModelEntry, PoolManager
from llm_pool.pool.sd_notify import Notifier

log = logging.getLogger("llm_pool.server")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_security(settings: Settings) -> None:
    """Refuse to expose the admin API without a token (raises ``SystemExit`` with why)."""
    s = settings.service
    if not is_loopback(s.host) and not s.admin_token_env:
        raise SystemExit(
            f"refusing to bind {s.host}: the admin API would be reachable without a token; "
            "set service.admin_token_env to the name of an environment variable holding one "
            "(or bind 127.0.0.1)"
        )


def hypercorn_config(settings: Settings) -> HypercornConfig:
    config = HypercornConfig()
    host = settings.service.host
    config.bind = [f"[{host}]:{settings.service.port}" if ":" in host else f"{host}:{settings.service.port}"]
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")  # our JSON handler, not a second format
    config.graceful_timeout = 5.0
    config.keep_alive_timeout = 75.0
    # hypercorn's default backlog (100) resets connections when a burst of clients connects at once
    config.backlog = 2048
    return config


def keep_alive_safe(app: Any) -> Any:
    """``app`` as an ASGI callable whose last response message is sent shielded from cancellation.

    Sending a response's last body message makes hypercorn recycle the keep-alive connection and
    start its idle watcher (which closes the connection after ``keep_alive_timeout``, or at once
    on shutdown) from inside that ``send``.  quart-trio cancels the request's task as soon as the
    disconnect message arrives, which lands in that very ``send``: the watcher's start is cancelled
    and the idle connection then never times out, and holds every graceful stop for hypercorn's
    whole ``graceful_timeout`` (5 s, measured).  Socket writes are shielded by hypercorn already;
    this shield adds only the bookkeeping that follows the last one.
    """

    async def asgi(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return

        async def send_last_shielded(message: Any) -> None:
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                with trio.CancelScope(shield=True):
                    await send(message)
            else:
                await send(message)

        await app(scope, receive, send_last_shielded)

    return asgi


def ambiguous_framing() -> PoolError:
    return PoolError(
        400,
        "invalid_request",
        "the request carries both Content-Length and Transfer-Encoding; send one of them (RFC 9112 §6.1)",
        param="Transfer-Encoding",
    )


def reject_ambiguous_framing(app: Any) -> Any:
    """``app`` as an ASGI callable that answers a request carrying both ``Content-Length`` and
    ``Transfer-Encoding`` with 400 ``invalid_request`` and ``Connection: close``, unread.

    h11 frames such a body by ``Transfer-Encoding`` alone and lets the request through, while a
    proxy in front may have framed it by ``Content-Length``: the two then disagree about where
    the next request starts (request smuggling), and a client that sent it waited > 15 s for an
    answer.  RFC 9112 §6.1 lets a server reject it and says it must close the connection
    afterwards; the route never sees it.
    """

    async def asgi(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            names = {name.lower() for name, _ in scope["headers"]}
            if b"content-length" in names and b"transfer-encoding" in names:
                error = ambiguous_framing()
                body = msgspec.json.encode(error.body())
                log.warning(
                    "request refused: Content-Length with Transfer-Encoding",
                    extra={"fields": {"method": scope["method"], "path": scope["path"], "status": 400}},
                )
                headers = [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"),
                ]
                await send({"type": "http.response.start", "status": 400, "headers": headers})
                with trio.CancelScope(shield=True):  # see keep_alive_safe
                    await send({"type": "http.response.body", "body": body})
                return
        await app(scope, receive, send)

    return asgi


async def serve(
    settings: Settings,
    *,
    config_path: str | None = None,
    backend_factory: BackendFactory | None = None,
    handle_signals: bool = True,
    notifier: Notifier | None = None,
    task_status: Any = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until SIGINT/SIGTERM (or cancellation), reloading the settings on SIGHUP;
    ``task_status.started(base_url)``.  ``notifier`` (the caller's, still open when this
    returns): where systemd hears about readiness, reloads, the stop and the watchdog."""
    check_security(settings)
    kwargs: dict[str, Any] = {"config_path": config_path}
    if backend_factory is not None:
        kwargs["backend_factory"] = backend_factory
    manager = PoolManager(settings, **kwargs)
    if any(kind_of(m).uses_gpu(m) for m in settings.engine.models.values()):
        manager.gpu_used_mib = used_mib
    app = create_app(manager, settings)
    app.extensions["llm_pool_ready"] = manager.ready
    stop = trio.Event()
    notifier = notifier if notifier is not None else Notifier(None)
    announced = False  # READY=1 sent: a reload may then say RELOADING=1 and READY=1 again

    async def announce_ready() -> None:
        """``READY=1`` once no enabled model is still loading.

        Settled, not all loaded: a model that failed to load leaves the server up (its admin API,
        and ``/health/ready`` answering 503 with the reason), and ``STATUS=`` names it in
        ``systemctl status``.  Waiting for "all loaded" instead would have systemd kill the
        service at ``TimeoutStartSec`` and, with ``Restart=``, reload every model in a loop.
        """
        nonlocal announced
        changed = trio.Event()

        def on_state(entry: ModelEntry, before: str, after: str) -> None:
            changed.set()

        def unsettled() -> list[str]:
            return [e.name for e in manager.entries.values() if e.wanted and e.state not in ("loaded", "failed")]

        manager.state_hooks.append(on_state)
        try:
            if waiting := unsettled():
                await notifier.notify(f"STATUS=loading {len(waiting)} model(s): {', '.join(waiting)}")
            while unsettled() and not manager.shutting_down:
                await changed.wait()
                changed = trio.Event()
        finally:
            manager.state_hooks.remove(on_state)
        if manager.shutting_down:  # STOPPING=1 was sent; READY=1 now would contradict it
            return
        announced = True
        await notifier.ready(ready_status())

    def ready_status() -> str:
        loaded = [e.name for e in manager.entries.values() if e.state == "loaded"]
        failed = [e.name for e in manager.entries.values() if e.wanted and e.state == "failed"]
        status = f"serving {len(loaded)} model(s)"
        if failed:
            status += f"; {len(failed)} failed to load: {', '.join(failed)} (see /health/ready)"
        return status

    async def graceful_stop() -> None:
        log.info("stopping: draining running requests", extra={"fields": {"drain_s": settings.service.shutdown_drain_s}})
        await notifier.stopping(f"draining running requests (up to {settings.service.shutdown_drain_s:g} s)")
        await manager.shutdown(settings.service.shutdown_drain_s)
        stop.set()

    async def reload_settings() -> None:
        reloading = announced  # before READY=1, systemd is still waiting for the start to end
        if reloading:
            await notifier.reloading()
        try:
            result = await manager.reload_from_files()
        except PoolError as e:  # the files do not decode, or a loaded model would change
            log.error("SIGHUP: settings not reloaded", extra={"fields": {"action": "reload", "code": e.code, "message": e.message}})
            return
        else:
            log.info("SIGHUP: settings reloaded", extra={"fields": {"action": "reload", **result}})
        finally:
            if reloading and not manager.shutting_down:
                await notifier.ready(ready_status())

    async def watch_signals(nursery: trio.Nursery) -> None:
        stopping = False
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
            async for signum in signals:
                if signum == signal.SIGHUP:  # reload, as POST /v1/admin/settings/reload does
                    nursery.start_soon(reload_settings)
                elif not stopping:
                    stopping = True
                    nursery.start_soon(graceful_stop)
                else:  # a second SIGINT/SIGTERM: stop now
                    stop.set()
                    nursery.cancel_scope.cancel()

    async def run_http(nursery: trio.Nursery, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        await hypercorn_serve(
            reject_ambiguous_framing(keep_alive_safe(app)),
            hypercorn_config(settings),
            shutdown_trigger=stop.wait,
            task_status=task_status,
        )
        nursery.cancel_scope.cancel()  # hypercorn finished its graceful shutdown

    async with trio.open_nursery() as nursery:
        nursery.start_soon(notifier.keep_watchdog_alive)
        await nursery.start(manager.run)
        # the status page's charts: one sample every few seconds (admin.routes' Timeline)
        nursery.start_soon(app.extensions["llm_pool_timeline"].run, read_gpus)
        if handle_signals:
            nursery.start_soon(watch_signals, nursery)
        binds = await nursery.start(run_http, nursery)
        log.info("serving", extra={"fields": {"urls": binds}})
        nursery.start_soon(announce_ready)
        task_status.started(binds[0])
