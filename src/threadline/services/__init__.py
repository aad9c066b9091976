"""The business services; each may import only the others' `api` modules."""
