"""Server configuration: one frozen dataclass whose fields the server's flags map to one to one."""
from dataclasses import dataclass

# Seconds one engine step may run before the engine counts as hung. Chunked prefill bounds a step by the token budget
# (512 tokens on the CPU), and the longest such step with the defaults is a 512-token chunk at the end of the default
# model's 8,192-token context: measured at 8.8 s on the 2-core CI VM with another benchmark taking a core and a half
# (steps of 3.5 to 8.6 s over the whole prompt in a second run; about 1 s at 2,048 tokens on an idle machine). 60 s
# (vLLM's engine iteration timeout too) leaves a factor of about 7 for slower or busier CPUs; a larger budget, or no
# chunked prefill (a whole prompt in one step), needs a larger timeout.
ENGINE_STALL_TIMEOUT = 60.0


@dataclass(frozen=True)
class ServerConfig:
    model_name: str  # the name clients use
    api_keys: tuple[str, ...] = ()  # none: no authentication
    chat_template: str | None = None  # a file or a built-in name; None: the model's own, else by architecture
    max_queued_requests: int = 1024  # sequences (prompts times n) admitted but not started; beyond it, 429
    max_n: int = 16  # choices one request may ask for; beyond it, 400
    request_timeout: float | None = None  # seconds a request may wait and run; None: no deadline
    drain_timeout: float = 30.0  # seconds in-flight requests get to finish after SIGTERM
    sse_ping_interval: float = 15.0  # seconds of silence on a stream before a `: ping` comment
    max_request_body_mib: float = 8.0  # larger bodies get 413
    request_body_timeout: float = 30.0  # seconds a request body may take to arrive; then 408
    engine_stall_timeout: float = ENGINE_STALL_TIMEOUT  # seconds one engine step may run; past it, the engine is hung
    special_tokens_in_messages: bool = False  # True: special tokens written in message text are parsed as such
    # CORS, as vLLM's flags: which browser pages (origins) may call the API, with which methods and headers.
    allowed_origins: tuple[str, ...] = ("*",)
    allowed_methods: tuple[str, ...] = ("*",)
    allowed_headers: tuple[str, ...] = ("*",)
    allow_credentials: bool = False  # True: browsers may send cookies and HTTP authentication along
    tool_call_parser: str | None = None  # the model's tool-call format (server/tool_parsers.py); None: by its template

    def __post_init__(self):
        checks = [(self.max_queued_requests >= 1, "max_queued_requests must be at least 1"),
                  (self.max_n >= 1, "max_n must be at least 1"),
                  (self.request_timeout is None or self.request_timeout > 0, "request_timeout must be positive"),
                  (self.drain_timeout >= 0, "drain_timeout must not be negative"),
                  (self.sse_ping_interval > 0, "sse_ping_interval must be positive"),
                  (self.max_request_body_mib > 0, "max_request_body_mib must be positive"),
                  (self.request_body_timeout > 0, "request_body_timeout must be positive"),
                  (self.engine_stall_timeout > 0, "engine_stall_timeout must be positive")]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_request_body_mib * 2**20)
