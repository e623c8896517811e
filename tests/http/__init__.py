"""Tests of ``sandboxd.http``, one file per module."""
