"""The model-based test of ``/execute/ws`` (tests/test_model.py): its client, its
deterministic programs, and the checks that say what every socket must have seen."""
