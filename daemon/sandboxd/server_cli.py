"""The daemon's command line: ``sandboxd serve [--listen HOST:PORT] [...]``.

(``sandboxd --listen ...``, with no verb, is the same; ``cli.py`` dispatches.)

``parse_args`` is pure: it turns argv and an environment into a ``Config``. Each field of
``Config`` is a flag (``--ring-bytes``) with an environment twin (``SANDBOXD_RING_BYTES``);
a flag beats its variable, and the variable beats the default.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time
import typing
from collections.abc import Mapping, Sequence
from functools import partial

import msgspec
import trio

from sandboxd import __version__
from sandboxd.core.config import Config
from sandboxd.endpoints.tunnel import PortPolicy
from sandboxd.runtime import reexec, verified
from sandboxd.runtime.logs import FlushBeforeWait, setup_logging
from sandboxd.runtime.memory import limit_malloc_arenas, settle_gc
from sandboxd.runtime.notify import Notifier, activated_socket
from sandboxd.runtime.process import become_subreaper
from sandboxd.runtime.resume import Resumed, resume, verify
from sandboxd.runtime.upgrade import UpgradeContext
from sandboxd.service import Running, make_listen_socket, serve

log = logging.getLogger("sandboxd")

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}

#: Signals that stop the daemon gracefully.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
#: Job-control signals that must never stop the daemon (they are caught, not ignored:
#: a caught signal is reset to its default in every command at exec, an ignored one
#: would be inherited).
JOB_CONTROL_SIGNALS = (signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU)


def _fields() -> list[tuple[str, type, str, object]]:
    """(name, type, help, default) of every Config field, in declaration order."""
    hints = typing.get_type_hints(Config, include_extras=True)
    defaults = Config()
    rows = []
    for name in Config.__struct_fields__:
        hint = hints[name]
        base = typing.get_args(hint)[0] if typing.get_origin(hint) is typing.Annotated else hint
        text = ""
        for meta in getattr(hint, "__metadata__", ()):
            if isinstance(meta, msgspec.Meta) and meta.description:
                text = meta.description
        rows.append((name, base, text, getattr(defaults, name)))
    return rows


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser, generated from ``Config``."""
    parser = argparse.ArgumentParser(
        prog="sandboxd serve",
        description="In-sandbox command daemon: run commands, stream and replay their "
        "output over WebSocket. Every option also reads SANDBOXD_<NAME> from the "
        "environment; logs are JSON lines on stderr.",
    )
    parser.add_argument("--version", action="version", version=f"sandboxd {__version__}")
    for name, kind, text, default in _fields():
        flag = "--" + name.replace("_", "-")
        env = "SANDBOXD_" + name.upper()
        help_text = f"{text} (default: {default}; env {env})"
        if kind is bool:
            parser.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=None, help=help_text
            )
        else:
            parser.add_argument(flag, type=str, default=None, metavar=name.upper(), help=help_text)
    return parser


def parse_args(argv: Sequence[str], environ: Mapping[str, str]) -> Config:
    """argv and environment -> a validated ``Config``; exits with a usage error if bad."""
    parser = build_parser()
    args = parser.parse_args(list(argv))
    values: dict[str, object] = {}
    for name, kind, _, _ in _fields():
        given = getattr(args, name)
        env_value = environ.get("SANDBOXD_" + name.upper())
        if given is None and env_value is not None:
            given = env_value
            if kind is bool:
                lowered = env_value.strip().lower()
                if lowered not in _TRUE | _FALSE:
                    parser.error(f"SANDBOXD_{name.upper()} must be a boolean, got {env_value!r}")
                given = lowered in _TRUE
        if given is None:
            continue
        values[name] = given
    try:
        config = msgspec.convert(values, Config, strict=False)
        config.listen_host_port()
        PortPolicy(config.tunnel_ports, 0)
    except (msgspec.ValidationError, ValueError) as exc:
        parser.error(str(exc))
    return config


def _ensure_standard_fds() -> None:
    """Make sure fds 0-2 are open, so no pipe or socket the daemon makes can take them."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            os.open(os.devnull, os.O_RDWR)


#: After the stop grace, how long a graceful stop may still take before the process
#: exits anyway (a client that stopped reading can pin a socket write forever).
STOP_OVERRUN_SECONDS = 10.0


async def _main(
    config: Config, upgrade: UpgradeContext | None = None, resumed: Resumed | None = None
) -> None:
    if resumed is not None:
        resumed.marks["trio"] = time.monotonic_ns()
    sock = resumed.sock if resumed is not None and resumed.sock is not None else None
    sock = sock or activated_socket(os.environ) or make_listen_socket(config)
    notifier = Notifier(os.environ)
    with trio.open_signal_receiver(*STOP_SIGNALS, signal.SIGUSR2) as signals:
        async with trio.open_nursery() as nursery:
            running: Running = await nursery.start(
                partial(serve, config, sock, notifier=notifier, upgrade=upgrade, resumed=resumed)
            )
            # Every handler is in place (the reaper's too): signals kept pending across a
            # live upgrade's exec are delivered now, a SIGTERM then stops gracefully.
            signal.pthread_sigmask(signal.SIG_UNBLOCK, reexec.SWAP_SIGNALS)
            async for signo in signals:
                log.info("signal received", extra={"signal": signal.Signals(signo).name})
                if signo == signal.SIGUSR2:
                    if not config.upgrade:
                        log.info("SIGUSR2 ignored: live upgrades are disabled (--no-upgrade)")
                    elif running.upgrader is not None:
                        nursery.start_soon(running.upgrader.run)
                    continue
                running.stop.set()
                break
            with trio.move_on_after(config.stop_grace + STOP_OVERRUN_SECONDS):
                await running.done.wait()
            if not running.done.is_set():
                log.warning("graceful stop overran; exiting now")
                logging.shutdown()
                os._exit(0)


def _ignore_job_control(signo: int, frame: object) -> None:
    log.info("job-control signal ignored", extra={"signal": signal.Signals(signo).name})


def _token_out_of_argv(argv: list[str]) -> tuple[list[str], str | None]:
    """argv without ``--token``, and the token it carried (None: there was none)."""
    rest: list[str] = []
    token = None
    items = iter(argv)
    for arg in items:
        if arg == "--token":
            token = next(items, "")
        elif arg.startswith("--token="):
            token = arg.removeprefix("--token=")
        else:
            rest.append(arg)
    return rest, token


def main(argv: Sequence[str] | None = None, *, may_reexec: bool | None = None) -> None:
    """Run the daemon with ``argv`` (default: this process's own arguments).

    ``--token`` on the command line makes the process exec itself again without it when
    ``may_reexec`` (default: when ``argv`` is this process's own).
    """
    entered_ns = time.monotonic_ns()
    args = list(sys.argv[1:] if argv is None else argv)
    args, internal = reexec.strip_internal(args)
    if "--verify-state-fd" in internal:  # a candidate's pre-flight check
        parse_args(_token_out_of_argv(args)[0], os.environ)  # (exits 2 on what it refuses)
        code = verify(int(internal["--verify-state-fd"]))
        sys.stderr.flush()
        # No interpreter teardown (some 60 ms of unloading modules): the daemon waits for
        # this process, on the path from the trigger to the swap.
        os._exit(code)
    rest, token = _token_out_of_argv(args)
    if may_reexec is None:
        may_reexec = argv is None
    if token is not None and may_reexec:
        # Anyone on the machine can read /proc/<pid>/cmdline: move the token into this
        # process's environment and exec again, the same pid, without it on the line.
        os.environ["SANDBOXD_TOKEN"] = token
        frozen = getattr(sys, "frozen", False)  # the single-file build is its own program
        os.execv(sys.executable, [sys.executable, *([] if frozen else ["-m", "sandboxd"]), *rest])
    config = parse_args(args, os.environ)
    log_handler = setup_logging(config.log_level)
    resumed = None
    identity = verified.take_from_environment()
    if "--resume-fd" in internal:  # a live upgrade's new image (or its rollback)
        fd = internal["--resume-fd"]
        resumed = resume(int(fd) if fd.isdigit() else -1, internal.get("--rollback-of"))
        from sandboxd.cli import STARTED_NS

        resumed.marks.update(started=STARTED_NS, imported=entered_ns, resumed=time.monotonic_ns())
    if resumed is None or resumed.last is None or resumed.last.result != "ok":
        identity = None  # (only an image that adopted the state is the verified candidate)
    upgrade = UpgradeContext(daemon_args=rest, verified=identity) if may_reexec else None
    _ensure_standard_fds()
    os.chdir("/")  # commands get their own work dir; the daemon holds no directory
    for signo in JOB_CONTROL_SIGNALS:
        signal.signal(signo, _ignore_job_control)
    host, _ = config.listen_host_port()
    if not config.token and host not in ("127.0.0.1", "localhost", "::1"):
        log.warning(
            "no --token on a non-loopback address: anyone who can reach the port can run "
            "commands as this user",
            extra={"listen": config.listen},
        )
    limit_malloc_arenas()
    settle_gc()
    if os.getpid() != 1 and not become_subreaper():
        log.warning("cannot become a child subreaper; orphans go to the container's init")
    try:
        trio.run(_main, config, upgrade, resumed, instruments=[FlushBeforeWait(log_handler)])
    except OSError as exc:
        log.error("cannot start", extra={"error": str(exc), "listen": config.listen})
        sys.exit(1)
