"""HTTP and WebSocket plumbing: accepting connections (``listener``), the ASGI app that routes
requests (``app``), bounded bodies and responses (``asgi``), the token gate (``auth``) and
WebSocket options (``wsoptions``)."""
