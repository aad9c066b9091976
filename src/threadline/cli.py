"""The `threadline` command: `up` runs a topology on this machine, `serve` runs one of its processes."""

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from pydantic_settings import SettingsError

from threadline.platform.settings import Settings
from threadline.runner import Runner, RunnerError, run
from threadline.topology import SERVICES, TopologyError, parse_topology

__all__ = ["main"]

_USAGE_ERROR = 2
_INTERRUPTED = 130
_UP_OPTIONS = ("topology", "port", "host", "data_dir", "nats_url")


class UsageError(Exception):
    """A mistake in the command line or the environment; the message says what to do."""


def main(argv: Sequence[str] | None = None) -> int:
    """Run the `threadline` command; returns the exit code (2 for anything the user can fix)."""
    args = _parser().parse_args(argv)
    try:
        code: int = args.command(args)
        return code
    except RunnerError as e:
        _error(str(e))
        return e.exit_code
    except (UsageError, TopologyError) as e:
        _error(str(e))
        return _USAGE_ERROR
    except ValidationError as e:
        _error(_settings_problem(e))
        return _USAGE_ERROR
    except SettingsError as e:
        _error(f"{e} — fix that THREADLINE_* environment variable")
        return _USAGE_ERROR
    except KeyboardInterrupt:
        return _INTERRUPTED


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="threadline",
        description="Threadline: run it as microservices, as a monolith, or any grouping in between.",
    )
    commands = parser.add_subparsers(title="commands", required=True, metavar="COMMAND")

    up = commands.add_parser(
        "up",
        help="start every process of a topology on this machine (Ctrl-C stops them)",
        description="Start the gateway and every service, health-gated, then show a status table. "
        "Settings not given here come from THREADLINE_* environment variables.",
    )
    up.add_argument(
        "--topology",
        help="microservices (default), monolith, or groups such as users+posts,gateway",
    )
    up.add_argument("--port", type=_port, help="the gateway's port (default 8000; 0 picks a free one)")
    up.add_argument("--host", help="the gateway's address (default 127.0.0.1)")
    up.add_argument("--data-dir", type=Path, help="where data and logs live (default .threadline)")
    up.add_argument(
        "--nats-url",
        help="an existing NATS server to use instead of starting an embedded one",
    )
    up.set_defaults(command=_up)

    serve = commands.add_parser(
        "serve",
        help="run one process of a topology (what `up` starts for each)",
        description="Run the components of one process group, configured by THREADLINE_* variables.",
    )
    serve.add_argument("group", metavar="GROUP", help="the components to run, e.g. users+posts")
    serve.add_argument("--port", type=_port, help="the port to listen on")
    serve.set_defaults(command=_serve)
    return parser


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number (0-65535)")
    return port


def _up(args: argparse.Namespace) -> int:
    overrides: dict[str, Any] = {
        name: getattr(args, name) for name in _UP_OPTIONS if getattr(args, name) is not None
    }
    settings = Settings(**overrides)
    topology = parse_topology(settings.topology, SERVICES)
    return run(Runner(topology, settings))


def _serve(args: argparse.Namespace) -> int:
    from threadline.bootstrap import serve

    group = _process_group(args.group, SERVICES)
    settings = Settings(**({} if args.port is None else {"port": args.port}))
    serve(group, settings)
    return 0


def _process_group(text: str, services: tuple[str, ...]) -> tuple[str, ...]:
    """The components of one process group such as `users+posts`."""
    if "," in text or text.strip() in ("microservices", "monolith"):
        raise UsageError(
            f"serve runs one process group, such as users+posts, not a topology ({text!r}); "
            "use `threadline up --topology ...` to run a whole topology"
        )
    return parse_topology(text, services).processes[0]


def _settings_problem(error: ValidationError) -> str:
    """One line per invalid setting, naming the variable (or option) that set it."""
    lines = []
    for problem in error.errors():
        field = str(problem["loc"][0]) if problem["loc"] else ""
        if not field:
            lines.append(f"invalid settings: {problem['msg']}")
            continue
        source = f"THREADLINE_{field.upper()}"
        if field in _UP_OPTIONS:
            source += f" or --{field.replace('_', '-')}"
        lines.append(f"invalid setting {field} ({source}): {problem['msg']}")
    return "\n".join(lines)


def _error(message: str) -> None:
    print(f"threadline: {message}", file=sys.stderr)
