"""Unit tests: each application layer over hand-written fake ports."""
