"""Tests of ``sandboxd.runtime``, one file per module."""
