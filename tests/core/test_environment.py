"""The environment a command starts from."""

from __future__ import annotations

from sandboxd.core.environment import clean_environment, with_identity


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


def test_home_is_the_one_given_not_the_daemons_own() -> None:
    daemon = {"HOME": "/root", "USER": "root", "LOGNAME": "root", "PATH": "/bin"}
    assert with_identity(daemon, {}, home="/home/user") == {**daemon, "HOME": "/home/user"}
    assert with_identity({"PATH": "/bin"}, {}, home="/home/user") == {
        "PATH": "/bin",
        "HOME": "/home/user",
    }


def test_another_user_gets_its_home_and_names_unless_the_request_sets_them() -> None:
    daemon = {"HOME": "/root", "USER": "root", "LOGNAME": "root"}
    assert with_identity(daemon, {}, home="/home/alice", user_name="alice") == {
        "HOME": "/home/alice",
        "USER": "alice",
        "LOGNAME": "alice",
    }
    chosen = with_identity(daemon, {"HOME": "/w", "USER": "me"}, home="/h", user_name="alice")
    assert chosen == {"HOME": "/w", "USER": "me", "LOGNAME": "alice"}
    assert with_identity(daemon, {}, home="/h", user_name=None)["USER"] == "root"
