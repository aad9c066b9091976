"""Which processes a topology becomes, and where each listens."""

import contextlib
import socket
from pathlib import Path
from typing import Any

from threadline.platform.settings import Settings
from threadline.runner import free_ports, plan, service_urls
from threadline.topology import parse_topology

SERVICES = ("users", "posts")


def _settings(**overrides: Any) -> Settings:
    return Settings(data_dir=Path("unused"), **overrides)


def test_microservices_is_one_process_per_component_with_the_gateway_on_the_given_port() -> None:
    """Microservices: gateway on settings.port, every service alone on its own free loopback port."""
    specs = plan(parse_topology("microservices", SERVICES), _settings(port=8123))

    assert [s.name for s in specs] == ["gateway", "users", "posts"]
    assert [s.components for s in specs] == [("gateway",), ("users",), ("posts",)]
    gateway, *others = specs
    assert (gateway.host, gateway.port, gateway.url) == ("127.0.0.1", 8123, "http://127.0.0.1:8123")
    ports = [s.port for s in others]
    assert len(set(ports)) == len(ports)
    assert 8123 not in ports
    assert all(p > 0 for p in ports)
    assert all(s.host == "127.0.0.1" and s.url == f"http://127.0.0.1:{s.port}" for s in others)


def test_monolith_is_one_process_named_after_all_its_components() -> None:
    """Monolith: a single process, running everything, on the gateway's port."""
    specs = plan(parse_topology("monolith", SERVICES), _settings(port=8124))

    assert len(specs) == 1
    assert specs[0].name == "gateway+users+posts"
    assert specs[0].components == ("gateway", "users", "posts")
    assert specs[0].port == 8124


def test_groups_share_a_process_and_the_rest_run_alone() -> None:
    """`users+posts`: users and posts in one process, the gateway in another."""
    specs = plan(parse_topology("users+posts", SERVICES), _settings(port=8125))

    assert [(s.name, s.components) for s in specs] == [
        ("users+posts", ("users", "posts")),
        ("gateway", ("gateway",)),
    ]
    assert specs[1].port == 8125
    assert specs[0].port != 8125


def test_service_urls_map_every_component_to_its_process_url() -> None:
    """service_urls: each service and the gateway -> base URL of the process that runs it."""
    specs = plan(parse_topology("users+posts,gateway", SERVICES), _settings(port=8126))

    urls = service_urls(specs)

    assert urls["gateway"] == "http://127.0.0.1:8126"
    assert urls["users"] == urls["posts"] == specs[0].url
    assert set(urls) == {"gateway", "users", "posts"}


def test_port_zero_gives_the_gateway_a_free_port() -> None:
    """Port 0 means any free port, for the gateway as for the others."""
    specs = plan(parse_topology("microservices", SERVICES), _settings(port=0))

    ports = [s.port for s in specs]
    assert all(p > 0 for p in ports)
    assert len(set(ports)) == len(ports)


def test_a_gateway_on_all_addresses_is_reached_through_loopback_and_services_stay_on_loopback() -> None:
    """--host 0.0.0.0 exposes only the gateway; its URL for local callers is still loopback."""
    specs = plan(parse_topology("microservices", SERVICES), _settings(host="0.0.0.0", port=8127))

    assert (specs[0].host, specs[0].url) == ("0.0.0.0", "http://127.0.0.1:8127")
    assert all(s.host == "127.0.0.1" for s in specs[1:])


def _outgoing_ports_start() -> int:
    return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])


def test_chosen_ports_are_distinct_free_and_below_the_ports_of_outgoing_connections() -> None:
    """Ports chosen for services cannot be taken by a connection opened before the service binds them."""
    ports = free_ports("127.0.0.1", 20)
    assert len(set(ports)) == 20
    assert all(10_000 <= port < _outgoing_ports_start() for port in ports)
    for port in ports:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))


def test_a_port_something_listens_on_is_never_chosen() -> None:
    """Every port free but one listened on: only the free one can come back."""
    with contextlib.ExitStack() as stack:
        taken = []
        for port in free_ports("127.0.0.1", 2):
            sock = stack.enter_context(socket.socket())
            sock.bind(("127.0.0.1", port))
            sock.listen()
            taken.append(port)
        chosen = free_ports("127.0.0.1", 50)
        assert not set(taken) & set(chosen)


def test_services_of_a_topology_get_ports_below_the_ports_of_outgoing_connections() -> None:
    """The runner's plan chooses its services' ports that way too."""
    specs = plan(parse_topology("microservices", SERVICES), _settings(port=0))
    assert all(10_000 <= spec.port < _outgoing_ports_start() for spec in specs)
