"""What a command's environment is made of: the daemon's own, minus what is private to it.

Pure: the shell passes ``os.environ`` in.
"""

from __future__ import annotations

from collections.abc import Mapping

#: Variables of the daemon's environment that never reach a command. ``_PYI_`` is what the
#: single-file build's PyInstaller bootloader leaves for its own use.
_PRIVATE_ENV_PREFIXES = ("SANDBOXD_", "LISTEN_", "WATCHDOG_", "_PYI_")
_PRIVATE_ENV_NAMES = frozenset({"NOTIFY_SOCKET", "INVOCATION_ID", "JOURNAL_STREAM"})


def clean_environment(environ: Mapping[str, str], *, frozen: bool = False) -> dict[str, str]:
    """The daemon's environment minus what is private to it (systemd, sandboxd).

    ``frozen``: the daemon is the single-file build, whose bootloader pointed
    ``LD_LIBRARY_PATH`` at the bundle's own libraries (OpenSSL, zlib, ...) and kept the
    original in ``LD_LIBRARY_PATH_ORIG``; a command gets the original back, or none,
    so that its programs load the image's libraries, not the daemon's.
    """
    env = {
        name: value
        for name, value in environ.items()
        if name not in _PRIVATE_ENV_NAMES and not name.startswith(_PRIVATE_ENV_PREFIXES)
    }
    if frozen:
        env.pop("LD_LIBRARY_PATH", None)
        original = env.pop("LD_LIBRARY_PATH_ORIG", None)
        if original is not None:
            env["LD_LIBRARY_PATH"] = original
    return env


def with_identity(
    env: Mapping[str, str],
    request_env: Mapping[str, str],
    *,
    home: str,
    user_name: str | None = None,
) -> dict[str, str]:
    """``env`` with ``HOME`` set to ``home`` (and, for a named user, ``USER`` and
    ``LOGNAME`` to its name), then the request's own variables, which win.

    ``home`` is ``--home`` for the daemon's own user and the password database's home
    directory for ``run_config.user``: never the daemon's own ``HOME`` (Docker sets one,
    ``/root``), which would send tools that keep state under ``~`` out of the workspace.
    """
    result = dict(env)
    result["HOME"] = home
    if user_name:
        result["USER"] = result["LOGNAME"] = user_name
    result.update(request_env)
    return result
