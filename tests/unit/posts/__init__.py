"""Unit tests of the posts application layer."""
