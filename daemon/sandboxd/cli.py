"""The ``sandboxd`` command: ``sandboxd serve`` runs the daemon, ``sandboxd VERB`` is a client.

    sandboxd [serve] [--listen HOST:PORT] [...]      the daemon (server_cli.py)
    sandboxd [--url URL] [--token T] VERB [...]     a client of a daemon (client/)

No verb, or a first argument that is a daemon flag, means ``serve``, as before the client
existed. The client path imports neither the daemon (hypercorn, psutil) nor trio: this
module imports nothing heavy itself, so ``sandboxd exec -- true`` starts fast.
"""

from __future__ import annotations

import gc
import sys
import time
from collections.abc import Sequence

#: When this process reached sandboxd's code (a live upgrade's new image times its start).
STARTED_NS = time.monotonic_ns()

#: The client's verbs (``sandboxd VERB --help`` for each).
VERBS = frozenset(
    {
        "exec",
        "shell",
        "attach",
        "ps",
        "logs",
        "kill",
        "cp",
        "port-forward",
        "web",
        "upgrade",
        "help",
    }
)
#: Client options that may come before the verb, each with a value.
_GLOBAL_OPTIONS = ("--url", "--token")


def client_verb(args: Sequence[str]) -> str | None:
    """The verb ``args`` asks the client for; None when they are the daemon's."""
    items = iter(args)
    for arg in items:
        if arg in _GLOBAL_OPTIONS:
            next(items, None)
        elif arg.startswith(tuple(option + "=" for option in _GLOBAL_OPTIONS)):
            continue
        else:
            return arg if arg in VERBS else None
    return None


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``sandboxd`` console script and ``python -m sandboxd``."""
    args = list(sys.argv[1:] if argv is None else argv)
    if client_verb(args) is not None:
        from sandboxd.client.main import run

        sys.exit(run(args))
    # No cyclic collection while the daemon's modules are imported (they are never
    # garbage; the collector only walks them, several times): a live upgrade's new
    # image waits for these imports before it serves. ``settle_gc`` turns it back on.
    gc.disable()
    from sandboxd import server_cli

    if args[:1] == ["serve"]:
        args = args[1:]
    server_cli.main(args, may_reexec=argv is None)
