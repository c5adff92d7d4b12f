"""A fresh process that round-trips one large encrypted file; prints its peak memory.

    python -m tests.integration.attachment_memory_process URL TOKEN USER DEVICE DIR MEGABYTES

Writes MEGABYTES of random data to DIR/plain, uploads it with ``upload_encrypted``,
downloads it with ``download_decrypted`` to DIR/back, and prints one JSON line:
the two files' SHA-256 and the process's peak resident memory in MB (ru_maxrss).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import resource
import sys
from pathlib import Path

from olmstead import Client, Session

MB = 1024 * 1024


def digest(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(MB):
            sha.update(chunk)
    return sha.hexdigest()


async def main(url: str, token: str, user: str, device: str, where: Path, megabytes: int) -> None:
    plain, back = where / "plain", where / "back"
    with open(plain, "wb") as out:
        for _ in range(megabytes):
            out.write(os.urandom(MB))
    client = Client(url)
    client.restore(Session(url, user, device, token))
    try:
        info = await client.upload_encrypted(plain)
        await client.download_decrypted(info, back)
    finally:
        await client.close()
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB on Linux
    print(
        json.dumps(
            {
                "sent": digest(plain),
                "got": digest(back),
                "size": back.stat().st_size,
                "peak_mb": round(peak_mb, 1),
            }
        )
    )


if __name__ == "__main__":
    url, token, user, device, where, megabytes = sys.argv[1:]
    asyncio.run(main(url, token, user, device, Path(where), int(megabytes)))
