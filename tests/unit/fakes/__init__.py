"""Tests of the fakes themselves: the transaction semantics the unit tests rely on."""
