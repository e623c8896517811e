"""The process runtime: spawning, the reaper and tree kill (``process``), the session
registry that applies the core's decisions and pumps each child's output (``supervisor``),
systemd notification (``notify``), heap trimming (``memory``) and log formatting (``logs``)."""
