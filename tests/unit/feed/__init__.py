"""Unit tests of the feed application layer and its stores."""
