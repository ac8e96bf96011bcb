"""A hostile corpus of our own: malicious and malformed checkpoints, written fresh by the tests."""
