"""Unit tests of the payments application layer."""
