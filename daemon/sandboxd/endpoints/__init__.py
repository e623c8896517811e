"""The dataplane endpoints, one module each: commands over WebSocket (``exec_ws``), over SSE
and blocking HTTP (``sse``), file upload and download (``files``), glob and grep
(``search``), and TCP tunnels over yamux (``tunnel``)."""
