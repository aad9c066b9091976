"""Unit tests of the users application layer."""
