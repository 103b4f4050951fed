"""Ray's Jobs REST API over HTTP, served by the head's agent (aiohttp).

Paths, bodies and status codes are those of Ray 2.60's job server
(dashboard/modules/job/job_head.py), so ``ray job ...`` and JobSubmissionClient
work unchanged against this head.

Security: every request carries the cluster token the way Ray's token
authentication sends it (``Authorization: Bearer <token>``, or
``X-Ray-Authorization: Bearer <token>``). It is checked from the headers alone,
before routing, before ``Expect: 100-continue`` is answered and before any byte
of the body is read: a request without it gets 401, with a wrong one 403 (as
Ray answers), and the connection is closed with its body unread (no lingering
read), so an unauthenticated upload costs the server its headers. Browser
cookies are not accepted: there is no web UI, and cookie auth would need the
CSRF defences Ray adds for its UI.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import traceback
from typing import Any, Awaitable, Callable, Optional

from aiohttp import web

from agent.jobs.manager import JobManager, JobNotFound, LogsUnavailable
from agent.jobs.packages import PackageError, check_name
from agent.jobs.records import BadRequest

log = logging.getLogger("agent.jobs")

#: JSON request bodies (job submissions); packages are streamed with their own limit.
MAX_JSON_BYTES = 8 * 1024 * 1024
_MANAGER = web.AppKey("manager", JobManager)
_TOKEN = web.AppKey("token", bytes)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _refusal(status: int, text: str) -> web.Response:
    resp = web.Response(status=status, text=text)
    resp.force_close()  # the body, if any, is never read: the connection cannot be reused
    return resp


def auth_failure(request: web.Request) -> Optional[web.Response]:
    """401 without a token, 403 with a wrong one; None when the token matches."""
    header = (request.headers.get("Authorization")
              or request.headers.get("X-Ray-Authorization") or "")
    if not header:
        return _refusal(401, "Unauthorized: Missing authentication token")
    scheme, _, value = header.strip().partition(" ")
    given = value.strip().encode("utf-8", "replace")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given, request.app[_TOKEN]):
        return _refusal(403, "Forbidden: Invalid authentication token")
    return None


@web.middleware
async def _auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    refused = auth_failure(request)
    if refused is not None:
        return refused
    return await handler(request)


async def _expect_handler(request: web.Request) -> Optional[web.StreamResponse]:
    """Answer ``Expect: 100-continue`` only to an authenticated request: the others
    get their refusal instead, and their client never sends the body."""
    refused = auth_failure(request)
    if refused is not None:
        return refused
    if request.headers.get("Expect", "").lower() != "100-continue":
        return _refusal(417, f"Unknown Expect: {request.headers.get('Expect')}")
    await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    request.writer.output_size = 0
    return None


def _json(data) -> web.Response:
    return web.Response(text=json.dumps(data), content_type="application/json")


def _text(status: int, text: str) -> web.Response:
    return web.Response(status=status, text=text)


def _not_found(job_id: str) -> web.Response:
    return _text(404, f"Job {job_id} does not exist")


async def _version(request: web.Request) -> web.Response:
    return _json(request.app[_MANAGER].version())


async def _get_package(request: web.Request) -> web.Response:
    try:
        name = check_name(request.match_info["protocol"], request.match_info["name"])
    except PackageError as exc:
        return _text(exc.status, str(exc))
    if not request.app[_MANAGER].packages.exists(name):
        return _text(404, f"Package gcs://{name} does not exist")
    return web.Response()


async def _put_package(request: web.Request) -> web.Response:
    manager = request.app[_MANAGER]
    try:
        name = check_name(request.match_info["protocol"], request.match_info["name"])
        size = await manager.packages.store(name, request.content_length,
                                            request.content.iter_chunked(1 << 20))
    except PackageError as exc:
        resp = _refusal(exc.status, str(exc)) if exc.status == 413 else _text(exc.status,
                                                                              str(exc))
        return resp
    log.info("package gcs://%s uploaded (%d bytes)", name, size)
    return web.Response()


async def _submit(request: web.Request) -> web.Response:
    manager = request.app[_MANAGER]
    try:
        body = await request.json()
    except web.HTTPRequestEntityTooLarge:
        return _refusal(413, f"a job submission is limited to {MAX_JSON_BYTES} bytes")
    except ValueError:
        return _text(400, f"the request body is not valid JSON:\n{traceback.format_exc()}")
    try:
        sid = await manager.submit(body)
    except BadRequest as exc:
        return _text(400, str(exc))
    except Exception:
        log.exception("submitting a job failed")
        return _text(500, traceback.format_exc())
    return _json({"job_id": sid, "submission_id": sid})


async def _list(request: web.Request) -> web.Response:
    return _json(await request.app[_MANAGER].list())


async def _get(request: web.Request) -> web.Response:
    job_id = request.match_info["job_id"]
    try:
        _, details = await request.app[_MANAGER].find(job_id)
    except JobNotFound:
        return _not_found(job_id)
    return _json(details)


async def _job_action(request: web.Request, action: str) -> web.Response:
    """POST .../stop and DELETE ...: {"stopped": bool} or {"deleted": bool}, as Ray answers."""
    job_id = request.match_info["job_id"]
    manager = request.app[_MANAGER]
    try:
        done = await (manager.stop(job_id) if action == "stopped" else manager.delete(job_id))
    except JobNotFound:
        return _not_found(job_id)
    except BadRequest as exc:
        return _text(400, str(exc))
    except Exception:
        return _text(500, traceback.format_exc())
    return _json({action: done})


async def _stop(request: web.Request) -> web.Response:
    return await _job_action(request, "stopped")


async def _delete(request: web.Request) -> web.Response:
    return await _job_action(request, "deleted")


async def _submitted_job(request: web.Request) -> Any:
    """The submitted job the path names, or the error response Ray gives (404 unknown;
    400 for a driver started by hand, which has no job log)."""
    job_id = request.match_info["job_id"]
    try:
        job, _ = await request.app[_MANAGER].find(job_id)
    except JobNotFound:
        return _not_found(job_id)
    if job is None:
        return _text(400, "Can only get logs of submission type jobs")
    return job


async def _logs(request: web.Request) -> web.Response:
    job = await _submitted_job(request)
    if isinstance(job, web.StreamResponse):
        return job
    manager = request.app[_MANAGER]
    try:
        text = await manager.read_logs(job)
    except LogsUnavailable as exc:
        return _text(500, str(exc))  # Ray answers 500 when the driver's agent cannot be asked
    return _json({"logs": text})


async def _tail(request: web.Request) -> web.StreamResponse:
    job = await _submitted_job(request)
    if isinstance(job, web.StreamResponse):
        return job
    manager = request.app[_MANAGER]
    ws = web.WebSocketResponse(heartbeat=30)
    await ws.prepare(request)
    reader = asyncio.ensure_future(ws.receive())  # notices the client going away
    try:
        async for chunk in manager.tail_logs(job.submission_id):
            if reader.done():
                break
            await ws.send_str(chunk)
    except LogsUnavailable as exc:
        if not reader.done():
            await ws.send_str(f"[{exc}]\n")
    finally:
        if not reader.done():
            reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)
    if not ws.closed:
        await ws.close()
    return ws


async def _no_route(request: web.Request) -> web.Response:
    return _text(404, f"{request.method} {request.path}: no such endpoint of the jobs API "
                      f"(see docs/agent.md, \"Jobs\")")


def make_app(manager: JobManager, token: str) -> web.Application:
    app = web.Application(middlewares=[_auth_middleware], client_max_size=MAX_JSON_BYTES)
    app[_MANAGER] = manager
    app[_TOKEN] = token.encode()
    routes = [
        ("GET", "/api/version", _version),
        ("GET", "/api/packages/{protocol}/{name}", _get_package),
        ("PUT", "/api/packages/{protocol}/{name}", _put_package),
        ("POST", "/api/jobs/", _submit),
        ("POST", "/api/jobs", _submit),
        ("GET", "/api/jobs/", _list),
        ("GET", "/api/jobs", _list),
        ("GET", "/api/jobs/{job_id}", _get),
        ("DELETE", "/api/jobs/{job_id}", _delete),
        ("POST", "/api/jobs/{job_id}/stop", _stop),
        ("GET", "/api/jobs/{job_id}/logs", _logs),
        ("GET", "/api/jobs/{job_id}/logs/tail", _tail),
        ("*", "/{tail:.*}", _no_route),
    ]
    for method, path, handler in routes:
        app.router.add_route(method, path, handler, expect_handler=_expect_handler)
    return app


class JobServer:
    """The HTTP server and its job manager, started and stopped together."""

    def __init__(self, manager: JobManager, token: str) -> None:
        self.manager = manager
        self.token = token
        self._runner: Optional[web.AppRunner] = None

    async def start(self, host: str, port: int) -> int:
        await self.manager.start()
        # lingering_time=0: after answering, never read what is left of a body.
        self._runner = web.AppRunner(make_app(self.manager, self.token), access_log=None,
                                     lingering_time=0, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port, reuse_address=True)
        try:
            await site.start()
        except BaseException:
            await self.close()
            raise
        sockets = site._server.sockets if site._server is not None else []  # noqa: SLF001
        return sockets[0].getsockname()[1] if sockets else port

    async def close(self) -> None:
        await self.manager.close()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


__all__ = ["JobServer", "make_app", "auth_failure"]
