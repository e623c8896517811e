"""How a shell command is started: as ``shell -c COMMAND``, or through a loader when the
command is too long to be one argument.

Linux refuses any single ``execve`` argument of ``MAX_ARG_STRLEN`` (32 pages: 131,072
bytes with 4 KiB pages, its NUL included) or more with ``E2BIG``. A longer command is put
in a file descriptor instead, and a short fixed ``-c`` loader reads it and ``eval``s it:
``eval`` and ``-c`` both run their text through bash's ``parse_and_execute``, so ``$0``,
``$@``, the exit status, stdin and the terminal are those of ``shell -c COMMAND``. A
command that fits keeps the plain ``-c`` path (no loader, nothing added to its start).

Pure: the shell creates the file descriptor and writes the command into it.
"""

from __future__ import annotations

from collections.abc import Sequence

#: The shortest argument Linux refuses (``MAX_ARG_STRLEN`` with 4 KiB pages), NUL included.
ARGUMENT_LIMIT_BYTES = 32 * 4096

#: The loader's variable; unset again before the command runs.
_VARIABLE = "__sandboxd_command"

#: bash: ``mapfile`` reads a seekable fd in blocks (``read -d ''`` is half as fast). The
#: command lands in [1], ``$_`` as bash started with it in [0]; the fd is closed, then the
#: variable is unset and ``$_`` restored inside the eval'd text, before the command's first
#: word. ``BASH_EXECUTION_STRING`` is set to the command, as ``-c`` would have set it.
#: (VAR and FD are placeholders.)
_BASH_LOADER = (
    'VAR=("$_"); mapfile -d "" -O 1 VAR <&FD; exec FD<&-; '
    "BASH_EXECUTION_STRING=${VAR[1]}; "
    'eval "unset -v VAR; : ${VAR[0]@Q};${VAR[1]}"'
)

#: Any other POSIX shell (dash, ash, ksh, zsh): ``cat`` reads the fd; the ``.`` keeps the
#: trailing newlines that command substitution would strip.
_POSIX_LOADER = 'VAR=$(cat <&FD; echo .); exec FD<&-; eval "unset VAR; ${VAR%.}"'


def encoded(command: str) -> bytes:
    """The bytes ``execve`` (and so the loader) gets for ``command``."""
    return command.encode("utf-8", "surrogateescape")


def is_shell_command(argv: Sequence[str]) -> bool:
    """Whether ``argv`` is ``[shell, "-c", command]``."""
    return len(argv) == 3 and argv[1] == "-c"


def needs_loader(argv: Sequence[str]) -> bool:
    """Whether ``argv`` is a shell command too long to pass as an argument."""
    return is_shell_command(argv) and len(encoded(argv[2])) + 1 > ARGUMENT_LIMIT_BYTES


def loader_argv(shell: str, fd: int) -> list[str]:
    """``[shell, "-c", LOADER]``: run the command the child finds open on ``fd``.

    bash gets a loader that keeps ``$_`` and ``BASH_EXECUTION_STRING`` as ``-c`` sets them;
    any other shell a POSIX one that needs ``cat`` on the ``PATH``.
    """
    is_bash = shell.rsplit("/", 1)[-1] == "bash"
    loader = _BASH_LOADER if is_bash else _POSIX_LOADER
    return [shell, "-c", loader.replace("VAR", _VARIABLE).replace("FD", str(fd))]
