"""Threadline: a Threads-style social platform that runs as microservices or as a monolith."""
