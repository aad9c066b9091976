"""Runs `threadline.runner.run` over fake processes, for tests of signals and orphans.

Usage: fake_up.py DATA_DIR NATS_URL MODE; the processes are `fake_process.py MODE NAME`.
"""

import sys
from pathlib import Path

from threadline.platform.settings import Settings
from threadline.runner import ProcessSpec, Runner, RunnerError, run
from threadline.topology import parse_topology

FAKE_PROCESS = Path(__file__).with_name("fake_process.py")
data_dir, nats_url, mode = sys.argv[1:4]


def command(spec: ProcessSpec) -> list[str]:
    """A fake process named like the real one."""
    return [sys.executable, str(FAKE_PROCESS), mode, spec.name]


settings = Settings(data_dir=Path(data_dir), port=0, nats_url=nats_url)
try:
    sys.exit(run(Runner(parse_topology("microservices", ("users", "posts")), settings, command=command)))
except RunnerError as e:
    print(e, flush=True)
    sys.exit(e.exit_code)
