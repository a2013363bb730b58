"""HEALTHCHECK of the sink image: exit 0 when the HTTP health endpoint answers 2xx, else 1.

The URL is ``CLOUDTRAIL_HEALTHCHECK_URL`` when set (the emulator service sets its own), else
``http://<CLOUDTRAIL_SINK_LISTEN>/healthz`` with a wildcard host (0.0.0.0, ::, empty) replaced by
the loopback address. Standard library only, so it runs on a read-only root filesystem.
"""

import os
import sys
import urllib.request


def health_url(environ=os.environ) -> str:
    url = environ.get("CLOUDTRAIL_HEALTHCHECK_URL")
    if url:
        return url
    host, _, port = environ.get("CLOUDTRAIL_SINK_LISTEN", "127.0.0.1:9464").rpartition(":")
    host = host.strip("[]")
    if host in ("", "0.0.0.0", "::"):
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}/healthz"


def main() -> int:
    url = health_url()
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return 0 if 200 <= resp.status < 300 else 1
    except Exception as exc:  # any failure is "unhealthy"; say why for `docker inspect`
        print(f"healthcheck {url}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
