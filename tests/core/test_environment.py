"""The environment a command starts from."""

from __future__ import annotations

from sandboxd.core.environment import clean_environment


def test_private_variables_never_reach_a_command() -> None:
    env = clean_environment(
        {
            "PATH": "/bin",
            "NOTIFY_SOCKET": "/run/notify",
            "LISTEN_FDS": "1",
            "LISTEN_PID": "1",
            "WATCHDOG_USEC": "1",
            "SANDBOXD_TOKEN": "secret",
            "_PYI_ARCHIVE_FILE": "/tmp/sandboxd-1/sandboxd",
            "LD_LIBRARY_PATH": "/opt/lib",
            "KEEP": "me",
        }
    )
    assert env == {"PATH": "/bin", "LD_LIBRARY_PATH": "/opt/lib", "KEEP": "me"}


def test_a_frozen_daemon_gives_commands_the_library_path_it_was_started_with() -> None:
    bundle = "/tmp/sandboxd-1/_internal"
    restored = {"LD_LIBRARY_PATH": f"{bundle}:/opt/lib", "LD_LIBRARY_PATH_ORIG": "/opt/lib"}
    assert clean_environment(restored, frozen=True) == {"LD_LIBRARY_PATH": "/opt/lib"}
    assert clean_environment({"LD_LIBRARY_PATH": bundle}, frozen=True) == {}
