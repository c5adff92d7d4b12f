"""A fresh process that round-trips one large encrypted file; prints its peak memory.

    python -m tests.integration.attachment_memory_process URL TOKEN USER DEVICE DIR MEGABYTES

Writes MEGABYTES of random data to DIR/plain, uploads it with ``upload_encrypted``,
downloads it with ``download_decrypted`` to DIR/back, and prints one JSON line:
the two files' SHA-256 and the process's peak resident memory in MB: ``VmHWM`` of
/proc/self/status, the high-water mark of this program's own memory. (Not
``ru_maxrss``: it survives ``exec``, so a child of a large pytest process would report
the parent's size.)
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
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


def peak_resident_kb() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])  # kB
    raise RuntimeError("no VmHWM in /proc/self/status")


async def main(url: str, token: str, user: str, device: str, where: Path, megabytes: int) -> None:
    baseline_mb = peak_resident_kb() / 1024  # the interpreter and its imports
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
    peak_mb = peak_resident_kb() / 1024
    print(
        json.dumps(
            {
                "sent": digest(plain),
                "got": digest(back),
                "size": back.stat().st_size,
                "peak_mb": round(peak_mb, 1),
                "baseline_mb": round(baseline_mb, 1),
            }
        )
    )


if __name__ == "__main__":
    url, token, user, device, where, megabytes = sys.argv[1:]
    asyncio.run(main(url, token, user, device, Path(where), int(megabytes)))
