"""Tests of ``sandboxd.endpoints``, one file per module."""
