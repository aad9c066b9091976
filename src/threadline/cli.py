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

_FAILED = 1
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
    up.add_argument(
        "--ready-timeout",
        type=_positive,
        default=60,
        help="seconds each process may take to become ready, migrating its database included (default 60)",
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

    bench = commands.add_parser(
        "bench",
        help="measure both topologies side by side with the same workload",
        description="Start every topology on a fresh data directory and seed each through the API; measure "
        "the CPU of one operation of each kind; offer the social mix at rising fixed rates (open loop), the "
        "topologies taking turns rate by rate, and report throughput, latency, CPU and memory; then (with "
        "--scale-posts) feed reads before and after bulk-loading the data set to that many posts; then "
        "time one service-to-service call every way. With --target, measure systems running already "
        "instead of starting topologies. Writes latest.json and latency.png.",
    )
    bench.add_argument("--users", type=_positive, default=1000, help="accounts to seed (default 1000)")
    bench.add_argument("--posts", type=_positive, default=50_000, help="posts to seed (default 50000)")
    bench.add_argument(
        "--rates",
        type=_rates,
        default=None,
        help="offered rates in requests/s, comma-separated (default: 12 steps from 25 to 1200, then "
        "rising by a quarter a step until one is not sustained)",
    )
    bench.add_argument(
        "--refine",
        type=_count,
        default=None,
        help="rates tried halfway between the highest sustainable and the lowest unsustainable one, "
        "to narrow the gap (default 2)",
    )
    bench.add_argument("--duration", type=float, default=10.0, help="seconds per rate (default 10)")
    bench.add_argument("--warmup", type=float, default=3.0, help="warm-up seconds per topology (default 3)")
    bench.add_argument("--p99-bound", type=float, default=200.0, help="p99 bound in ms (default 200)")
    bench.add_argument(
        "--topologies", help="which to start here, comma-separated (default monolith,microservices)"
    )
    bench.add_argument(
        "--target",
        action="append",
        metavar="[NAME=]URL",
        help="measure a Threadline already running at this gateway URL instead of starting topologies "
        "(repeatable; NAME defaults to the topology it reports); it is seeded and offered the rates, while "
        "CPU, memory, the cost per operation and bulk loading (needing processes started here) are left out",
    )
    bench.add_argument("--thread-reads", action="store_true", help="half the composes become thread reads")
    bench.add_argument("--micro-calls", type=int, default=5000, help="calls per microbenchmark (0 skips)")
    bench.add_argument(
        "--op-calls", type=int, default=500, help="calls per operation kind for CPU per operation (0 skips)"
    )
    bench.add_argument(
        "--op-rounds",
        type=_positive,
        default=None,
        help="rounds the calls per operation kind are made in, the kinds taking turns; "
        "the table gives the rounds' range (default 5)",
    )
    bench.add_argument(
        "--scale-posts",
        type=_count,
        default=0,
        help="bulk-load each topology to this many posts and compare its feed reads (default 0: skip)",
    )
    bench.add_argument(
        "--scale-calls",
        type=_positive,
        default=1000,
        help="sequential feed reads at each size (default 1000)",
    )
    bench.add_argument("--out", type=Path, default=Path("bench/results"), help="where to write results")
    bench.set_defaults(command=_bench)
    return parser


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive whole number")
    return value


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number (0 or more)")
    return value


def _rates(text: str) -> list[float]:
    try:
        rates = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        rates = []
    if not rates or any(rate <= 0 for rate in rates):
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of positive rates such as 50,100,200")
    return sorted(rates)


def _bench(args: argparse.Namespace) -> int:
    from threadline.bench.compare import BenchConfig, BenchError, Target, run_bench
    from threadline.bench.workload import SeedingError

    if args.target and args.topologies:
        raise UsageError("give --topologies (started here) or --target (running already), not both")
    try:
        targets = [Target.parse(text) for text in args.target or ()]
    except BenchError as e:
        raise UsageError(str(e)) from e
    topologies = args.topologies or "monolith,microservices"
    config = BenchConfig(
        users=args.users,
        posts=args.posts,
        duration_s=args.duration,
        warmup_s=args.warmup,
        p99_bound_ms=args.p99_bound,
        topologies=tuple(parse_topology(t, SERVICES).name for t in topologies.split(",")),
        targets=targets,
        thread_reads=args.thread_reads,
        micro_calls=args.micro_calls,
        op_calls=args.op_calls,
        scale_posts=args.scale_posts,
        scale_calls=args.scale_calls,
        out_dir=args.out,
    )
    if args.rates is not None:
        config.rates = args.rates
        config.climb_past_rates = False
    if args.refine is not None:
        config.refine_steps = args.refine
    if args.op_rounds is not None:
        config.op_rounds = args.op_rounds
    if 0 < config.op_calls < config.op_rounds:
        raise UsageError(
            f"--op-calls {config.op_calls} cannot be split into {config.op_rounds} rounds; "
            "give at least as many calls as rounds, or fewer --op-rounds"
        )
    try:
        run_bench(config)
    except BenchError as e:
        raise UsageError(str(e)) from e
    except SeedingError as e:
        _error(f"seeding failed, so nothing was measured: {e}")
        return _FAILED
    return 0


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
    return run(Runner(topology, settings, ready_timeout=args.ready_timeout))


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
