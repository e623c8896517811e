"""The ``sandboxd VERB`` client: the same WebSocket/HTTP protocol the SDKs speak.

It imports only the standard library on the path of ``exec``, ``attach``, ``ps``,
``logs`` and ``kill`` (no trio, no hypercorn, no psutil), so it starts fast.
``port-forward`` alone uses trio.
"""
