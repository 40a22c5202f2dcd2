"""The client's identity and defaults, apart so every module can read them."""

import httpx

__version__ = "0.1.0"
USER_AGENT = f"forced-aligner-client/{__version__}"
# Per attempt: connecting is quick or never; a 30-min clip's synchronous alignment may take minutes.
DEFAULT_TIMEOUT = httpx.Timeout(connect=10.0, read=600.0, write=300.0, pool=60.0)
