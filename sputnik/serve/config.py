"""The settings of `sputnik serve`: one dataclass whose field names are the command's flags."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path

from sputnik.checkpoint.args import DTYPE_HELP, ModelArgs
from sputnik.checkpoint.registry import sputnik_home
from sputnik.device import DTYPES
from sputnik.serve.protocol import Limits
from sputnik.settings import option


def default_keys_path() -> Path:
    """Where API keys live unless --keys says otherwise."""
    return sputnik_home() / "keys.db"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass
class ServeConfig(ModelArgs):
    """Everything `sputnik serve` takes; the defaults serve the default model on loopback. The model, its dtype,
    device and quantization are ModelArgs, loaded as generate, chat and eval load theirs."""

    dtype: str = option("auto", DTYPE_HELP, choices=["auto", *DTYPES])
    upstream: str | None = option(None, "serve an OpenAI-compatible base URL (e.g. vLLM) instead of the engine")
    upstream_key: str | None = option(None, "API key for --upstream")
    served_name: str | None = option(None, "the model id clients see (default: the model's name)")
    host: str = option("127.0.0.1", "address to listen on")
    port: int = option(8000, "port to listen on")
    no_auth: bool = option(False, "no API keys (allowed only on a loopback host)")
    keys: Path | None = option(None, "API key store (default: SPUTNIK_HOME/keys.db)")
    rate_limit: float = option(120.0, "requests per minute per API key (per client address without auth); 0: off")
    cors_origin: list[str] = option([], "an allowed browser origin (repeatable)")
    max_body_bytes: int = option(1 << 20, "largest request body; larger ones get 413")
    max_queue: int = option(64, "queued requests before 503")
    max_batch: int = option(32, "sequences decoded together")
    prefix_cache_mb: float = option(256.0, "memory for cached prompt prefixes (MB)")
    max_prompt_tokens: int = option(8192, "the longest prompt a request may send (tokens)")
    max_tokens_limit: int = option(4096, "the largest max_tokens a request may ask")
    max_n: int = option(16, "the most completions one request may ask")
    compile: bool = option(False, "decode with a compiled graph (torch.compile), compiled at start-up and cached")
    keepalive_s: float = option(10.0, "SSE comment this often while a stream waits in the queue (seconds)")
    no_web: bool = option(False, "only the API: no chat page, accounts or database")
    database_url: str | None = option(None, "the web chat's database (default: $DATABASE_URL, else SQLite under "
                                            "$SPUTNIK_DATA_DIR)")
    oidc: list | None = option(None, "OIDCProviders for 'Sign in with …' (default: from SPUTNIK_OIDC_* variables)",
                               cli=False)
    public_url: str | None = option(None, "the address users reach, e.g. https://chat.example.org (fixes OIDC "
                                          "redirects behind a proxy)")
    log_level: str = option("info", "uvicorn's log level: critical, error, warning, info, debug or trace")

    def __post_init__(self) -> None:
        if self.no_auth and not is_loopback(self.host):
            raise ValueError(f"--no-auth is allowed only on a loopback address, not {self.host!r}: "
                             "create a key with `sputnik keys create NAME` instead")

    @property
    def limits(self) -> Limits:
        """What one request may ask of this server."""
        return Limits(max_prompt_tokens=self.max_prompt_tokens, max_tokens=self.max_tokens_limit, max_n=self.max_n)

    @property
    def keys_path(self) -> Path:
        return self.keys or default_keys_path()
