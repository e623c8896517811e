"""Tests of the ``sandboxd VERB`` client (daemon/sandboxd/client/)."""
