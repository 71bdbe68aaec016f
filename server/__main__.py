import os
import signal

# Until the server takes the signals over (importing torch and the engine takes seconds), a signal ends the process at
# once with 0, as one while the model loads does: nothing was admitted yet.
for _sig in (signal.SIGTERM, signal.SIGINT):
    signal.signal(_sig, lambda *_: os._exit(0))

from server.cli import main  # noqa: E402 - after the handlers, which the imports take seconds to reach

main()
