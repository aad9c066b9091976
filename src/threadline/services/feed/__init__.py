"""feed: home timelines by fan-out on write, built only from other services' events and APIs."""
