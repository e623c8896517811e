"""What an ``execute`` asks to run, as the ``SpawnRequest`` that ``spawn.py`` starts."""

from __future__ import annotations

import os

from sandboxd.core.config import Config
from sandboxd.core.environment import with_identity
from sandboxd.core.messages import Execute
from sandboxd.runtime import process, spawn


def spawn_request(
    config: Config, base_env: dict[str, str], msg: Execute, command_id: str
) -> spawn.SpawnRequest:
    """``msg`` run by its shell in the clean ``base_env``, with the request's variables,
    the identity (``HOME`` is ``--home``, not the daemon's own) and the session's tag."""
    # The home may appear later (an upload creates it): look each time.
    home = config.home if os.path.isdir(config.home) else "/"
    env = dict(base_env)
    run_config = msg.run_config
    extra = (run_config.env_vars if run_config else msg.env) or {}
    work_dir = (run_config.work_dir if run_config else msg.cwd) or home
    if msg.pty:
        env["TERM"] = config.term
    env = with_identity(env, extra, home=home)
    env[process.COMMAND_ID_VARIABLE] = command_id
    return spawn.SpawnRequest(
        argv=[msg.shell, "-c", msg.command],
        env=env,
        cwd=work_dir,
        user=run_config.user if run_config else None,
        request_env_names=frozenset(extra),
        pty=msg.pty,
        close_stdin=msg.close_stdin,
        cols=msg.cols or config.pty_cols,
        rows=msg.rows or config.pty_rows,
    )
