"""Topologies: which components (the services and the gateway) share an OS process."""

from dataclasses import dataclass

__all__ = ["GATEWAY", "SERVICES", "Topology", "TopologyError", "parse_topology"]

GATEWAY = "gateway"

# Every service Threadline has; bootstrap.py maps each name to how it is built and reached.
SERVICES: tuple[str, ...] = ("users", "posts", "threads", "feed", "payments")


class TopologyError(ValueError):
    """A topology string that names unknown components or names one twice."""


@dataclass(frozen=True)
class Topology:
    """A named grouping of components into processes, each process a tuple of component names."""

    name: str
    processes: tuple[tuple[str, ...], ...]

    def process_of(self, component: str) -> tuple[str, ...]:
        """The process group that runs `component`."""
        for group in self.processes:
            if component in group:
                return group
        raise TopologyError(f"{component} is not part of topology {self.name}")

    @property
    def single_process(self) -> bool:
        """Whether everything runs in one process (then events never leave it)."""
        return len(self.processes) == 1

    @staticmethod
    def process_name(group: tuple[str, ...]) -> str:
        """The name a process is known by, e.g. `users+posts`."""
        return "+".join(group)


def parse_topology(text: str, services: tuple[str, ...]) -> Topology:
    """Parse `microservices`, `monolith` or groups such as `users+posts,gateway`.

    In a group list, components left unnamed each run in a process of their own.
    """
    components = (GATEWAY, *services)
    spec = text.strip()
    if spec == "microservices":
        return Topology(spec, tuple((c,) for c in components))
    if spec == "monolith":
        return Topology(spec, (components,))
    groups: list[tuple[str, ...]] = []
    seen: set[str] = set()
    for part in spec.split(","):
        group = tuple(name.strip() for name in part.split("+") if name.strip())
        if not group:
            raise TopologyError(f"empty process group in topology {text!r}")
        for name in group:
            if name not in components:
                raise TopologyError(
                    f"unknown component {name!r} in topology {text!r}; known: {', '.join(components)}"
                )
            if name in seen:
                raise TopologyError(f"{name!r} appears twice in topology {text!r}")
            seen.add(name)
        groups.append(group)
    groups.extend((c,) for c in components if c not in seen)
    return Topology(spec, tuple(groups))
