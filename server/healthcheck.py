"""`python -m server.healthcheck [PID]`: the Docker HEALTHCHECK. Exits 0 when the server's /health says 200, else 1.

The server's flags follow the image name, so the port is known only to the running server: this reads the command
line of process PID (1 by default: the server, or an init such as `docker run --init`'s that runs it) and parses the
flags after `-m server` with the server's own parser, defaults and all."""
import sys
import urllib.request
from pathlib import Path

from server.flags import parse_args

SERVER = ["-m", "server"]
LOOPBACK = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}  # where a server listening everywhere answers


def server_flags(argv: list[str]) -> list[str]:
    """The flags after `-m server` in a command line (a ValueError when it does not run the server)."""
    starts = [i for i in range(len(argv) - 1) if argv[i:i + 2] == SERVER]
    if not starts:
        raise ValueError(f"not a `python -m server` command line: {argv}")
    return argv[starts[0] + 2:]


def health_url(argv: list[str]) -> str:
    args = parse_args(server_flags(argv))
    host = LOOPBACK.get(args.host, args.host)
    return f"http://{f'[{host}]' if ':' in host else host}:{args.port}/health"


def command_line(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")[:-1]


def main(argv: list[str]) -> int:
    url = health_url(command_line(int(argv[0]) if argv else 1))
    try:
        with urllib.request.urlopen(url, timeout=4) as response:
            return 0 if response.status == 200 else 1
    except OSError as exc:  # refused, timed out, or an HTTP error status (503 while loading, or a hung engine)
        print(f"{url}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
