"""Benchmarks: the same workload against both topologies, and single-call microbenchmarks."""
