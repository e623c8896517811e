"""``sandboxd VERB``: the client's argument parsing and dispatch.

Exit statuses: the command's own (128+N for a death by signal N), 125 for a CLI,
transport or daemon error (one line on stderr), 124 when the command hit its
``--timeout``, 0 after a detach, 130 when the user interrupted and the command was killed.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import typing
import uuid
from collections.abc import Sequence
from typing import Any

from sandboxd.client.connection import CliError, CommandStream, Endpoint, Offsets
from sandboxd.client.terminal import DEFAULT_DETACH_KEYS, parse_detach_keys, say

DEFAULT_URL = "http://127.0.0.1:8080"
#: A foreground command nobody is attached to is killed after this long (a dead CLI
#: cannot leave it running forever); ``-d`` commands have no idle limit.
FOREGROUND_IDLE_SECONDS = 300
SHELL_COMMAND = "if command -v bash >/dev/null 2>&1; then exec bash -l; else exec sh -l; fi"


class _Parser(argparse.ArgumentParser):
    """Usage errors exit 125, like every other CLI error."""

    def error(self, message: str) -> typing.NoReturn:
        self.print_usage(sys.stderr)
        self.exit(125, f"sandboxd: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    """The client's parser: global options, then one sub-command per verb."""
    common = _Parser(add_help=False)
    common.add_argument("--url", default=argparse.SUPPRESS, help="daemon URL (env SANDBOXD_URL)")
    common.add_argument("--token", default=argparse.SUPPRESS, help="token (env SANDBOXD_TOKEN)")
    parser = _Parser(
        prog="sandboxd",
        parents=[common],
        description="Client of a sandboxd daemon (or a dataplane URL). "
        f"--url defaults to $SANDBOXD_URL or {DEFAULT_URL}; the token (X-Api-Key) to "
        "$SANDBOXD_TOKEN. `sandboxd serve --help` for the daemon.",
    )
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    def verb(name: str, text: str) -> argparse.ArgumentParser:
        return verbs.add_parser(name, parents=[common], help=text, description=text)

    def run_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("-e", "--env", action="append", default=[], metavar="K=V")
        p.add_argument("-w", "--workdir", metavar="DIR", help="absolute work directory")
        p.add_argument("-u", "--user", help="name, uid, name:group or uid:gid")
        p.add_argument("--id", help="command id (an existing id attaches: get-or-create)")
        p.add_argument("--timeout", type=int, default=0, help="seconds; 0 = none (default)")
        p.add_argument("--idle-timeout", type=int, default=None, metavar="S")
        p.add_argument("--ttl", type=int, default=600, metavar="S")
        p.add_argument("--detach-keys", default=None, metavar="KEYS")

    e = verb("exec", "run a command and follow it")
    e.add_argument("-i", "--interactive", action="store_true", help="stream stdin to it")
    e.add_argument("-t", "--tty", action="store_true", help="run it under a terminal")
    e.add_argument("-d", "--detach", action="store_true", help="start it, print its id, exit")
    run_options(e)
    e.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- CMD [ARG...]")
    s = verb("shell", "an interactive login shell (exec -it bash -l, or sh -l)")
    run_options(s)
    a = verb("attach", "follow a running (or finished) command")
    a.add_argument("--read-only", action="store_true", help="watch: no input, Ctrl-C detaches")
    a.add_argument("--offsets", default="0:0", metavar="OUT:ERR", help="resume from these")
    a.add_argument("--detach-keys", default=None, metavar="KEYS")
    a.add_argument("id")
    p = verb("ps", "list commands")
    p.add_argument("-a", "--all", action="store_true", help="finished ones too")
    p.add_argument("-q", "--quiet", action="store_true", help="ids only")
    p.add_argument("--json", action="store_true", help="the /sessions objects")
    lg = verb("logs", "print a command's output")
    lg.add_argument("-f", "--follow", action="store_true")
    lg.add_argument("-n", "--tail", type=int, default=None, metavar="N", help="last N lines")
    only = lg.add_mutually_exclusive_group()
    only.add_argument("--stdout", action="store_true", help="stdout only")
    only.add_argument("--stderr", action="store_true", help="stderr only")
    lg.add_argument("id")
    k = verb("kill", "kill commands (whole process tree), or send a signal")
    k.add_argument("-s", "--signal", default=None, metavar="SIG")
    k.add_argument("ids", nargs="+", metavar="ID")
    c = verb("cp", "copy files: remote paths are :/path, - is stdin/stdout")
    c.add_argument("-r", "--recursive", action="store_true")
    c.add_argument("src")
    c.add_argument("dst")
    f = verb("port-forward", "forward local ports to ports in the sandbox (over /tunnel)")
    f.add_argument("--address", default="127.0.0.1")
    f.add_argument("ports", nargs="+", metavar="[LOCAL:]REMOTE")
    verb("web", "print the browser terminal's URL")
    up = verb("upgrade", "live-upgrade the daemon; returns once the new image serves")
    up.add_argument("--artifact", metavar="FILE", help="the new executable to run")
    verbs.add_parser("help", help="this help")
    return parser


def _endpoint(args: argparse.Namespace) -> Endpoint:
    url = getattr(args, "url", None) or os.environ.get("SANDBOXD_URL") or DEFAULT_URL
    token = getattr(args, "token", None)
    if token is None:
        token = os.environ.get("SANDBOXD_TOKEN", "")
    return Endpoint(url, token)


def _run_config(args: argparse.Namespace, extra_env: dict[str, str]) -> dict[str, Any]:
    env: dict[str, str] = {}
    for item in args.env:
        name, sep, value = item.partition("=")
        if not name:
            raise CliError(f"bad -e {item!r}: expected NAME=VALUE")
        if not sep:
            if name not in os.environ:
                continue  # docker: an unset NAME is left out
            value = os.environ[name]
        env[name] = value
    env.update(extra_env)
    config: dict[str, Any] = {}
    if args.user:
        config["user"] = args.user
    if args.workdir:
        config["work_dir"] = args.workdir
    if env:
        config["env_vars"] = env
    return config


def _detach_keys(args: argparse.Namespace) -> bytes:
    spec = args.detach_keys
    if spec is None:
        spec = os.environ.get("SANDBOXD_DETACH_KEYS", DEFAULT_DETACH_KEYS)
    try:
        return parse_detach_keys(spec)
    except ValueError as exc:
        raise CliError(str(exc)) from None


def _exec(
    endpoint: Endpoint,
    args: argparse.Namespace,
    command: str,
    interactive: bool,
    tty: bool,
    detach: bool,
) -> int:
    from sandboxd.client.interactive import Mode, follow
    from sandboxd.client.terminal import window_size

    if tty and not detach and not os.isatty(0):
        say("sandboxd: the input device is not a TTY; running without -t")
        tty = False
    command_id = args.id or uuid.uuid4().hex
    idle = args.idle_timeout
    if idle is None:
        idle = -1 if detach else FOREGROUND_IDLE_SECONDS
    frame: dict[str, Any] = {
        "type": "execute",
        "command": command,
        "command_id": command_id,
        "shell": "/bin/sh",
        "timeout_seconds": args.timeout,
        "idle_timeout_seconds": idle,
        "ttl_seconds": args.ttl,
        "kill_on_disconnect": False,
    }
    extra_env: dict[str, str] = {}
    if tty:
        frame["pty"] = True
        size = window_size(0)
        if size is not None:
            frame["cols"], frame["rows"] = size
        if os.environ.get("TERM"):
            extra_env["TERM"] = os.environ["TERM"]
    elif not interactive:
        frame["close_stdin"] = True
    run_config = _run_config(args, extra_env)
    if run_config:
        frame["run_config"] = run_config
    stream = CommandStream(endpoint, command_id, execute=frame)
    if detach:
        for message in stream.iterate():
            if message.get("type") == "started":
                break
        if stream.ws is not None:
            stream.ws.close()
        print(command_id)
        return 0
    mode = Mode(stdin=interactive, tty=tty, detach_keys=_detach_keys(args))
    return follow(stream, mode)


def _attach(endpoint: Endpoint, args: argparse.Namespace) -> int:
    from sandboxd.client import http
    from sandboxd.client.interactive import Mode, follow
    from sandboxd.client.watching import _row

    try:
        out, _, err = args.offsets.partition(":")
        offsets = Offsets(int(out), int(err or 0))
    except ValueError:
        raise CliError(f"bad --offsets {args.offsets!r}: expected OUT:ERR") from None
    row = _row(http.sessions(endpoint), args.id)
    tty = bool(row["pty"]) and os.isatty(0) and not args.read_only
    stream = CommandStream(endpoint, args.id, offsets=offsets, watch=args.read_only)
    mode = Mode(
        stdin=not args.read_only and row["state"] == "running" and os.isatty(0),
        tty=tty,
        detach_keys=_detach_keys(args),
        read_only=args.read_only,
    )
    return follow(stream, mode)


def dispatch(args: argparse.Namespace) -> int:
    """Run the verb ``args`` names; its exit status."""
    endpoint = _endpoint(args)
    verb = args.verb
    if verb == "exec":
        argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
        if not argv:
            raise CliError("exec needs a command: sandboxd exec [OPTIONS] -- CMD [ARG...]")
        # `exec`: the shell becomes the program, so signals and the exit status are its own.
        command = "exec " + shlex.join(argv)
        return _exec(endpoint, args, command, args.interactive, args.tty, args.detach)
    if verb == "shell":
        return _exec(endpoint, args, SHELL_COMMAND, True, True, False)
    if verb == "attach":
        return _attach(endpoint, args)
    if verb in ("ps", "logs", "kill", "web"):
        from sandboxd.client import watching

        if verb == "ps":
            return watching.ps(endpoint, args.all, args.json, args.quiet)
        if verb == "logs":
            streams = {"stdout"} if args.stdout else {"stderr"} if args.stderr else None
            return watching.logs(
                endpoint, args.id, args.follow, args.tail, streams or {"stdout", "stderr"}
            )
        if verb == "kill":
            return watching.kill(endpoint, args.ids, args.signal)
        return watching.web(endpoint)
    if verb == "upgrade":
        from sandboxd.client.upgrade import upgrade

        return upgrade(endpoint, args.artifact)
    if verb == "cp":
        from sandboxd.client.copy import copy

        return copy(endpoint, args.src, args.dst, args.recursive)
    if verb == "port-forward":
        from sandboxd.client.forward import forward

        return forward(endpoint, args.address, args.ports)
    build_parser().print_help()
    return 0


def run(argv: Sequence[str]) -> int:
    """Parse ``argv`` and run it; the exit status (125 and one line for an error)."""
    args = build_parser().parse_args(list(argv))
    try:
        return dispatch(args)
    except CliError as exc:
        say(f"sandboxd: {exc.message}")
        return exc.code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        sys.stderr.close()
        return 141
