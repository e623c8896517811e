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
