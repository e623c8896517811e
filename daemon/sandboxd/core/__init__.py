"""The sans-IO core: what sandboxd decides, with no I/O of its own.

Every module here imports only the standard library, msgspec and its siblings; none reads a
clock, opens a socket or file descriptor, or starts a process. Functions that need the time
take ``now``. ``tests/test_layering.py`` holds every file in this folder to that rule.
"""
