"""Tests of ``sandboxd.core``, one file per module."""
