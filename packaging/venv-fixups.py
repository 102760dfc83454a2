"""Make the freshly built venv relocatable to its final prefix and free of build paths.

Run by debian/rules (with /usr/bin/python3.11 -I) after every distribution is installed:

    venv-fixups.py VENV_IN_BUILD_TREE FINAL_PREFIX BUILD_DIR

* console scripts: shebang "#!FINAL_PREFIX/bin/python -I" (isolated: PYTHONPATH & co. and the
  host's dist-packages never leak in), and their lines in the dist-info RECORD files updated
  to the new hash and size, so the venv stays consistent and the build is reproducible;
* pyvenv.cfg: drop the "command = ..." line, which names the build directory;
* direct_url.json (pip's record of the build-time source path): deleted, and its RECORD line;
* activate scripts: deleted (they hard-code paths and are of no use to a service);
* finally: fail if any file still contains BUILD_DIR.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import sys
from pathlib import Path


def record_hash(data: bytes) -> str:
    digest = hashlib.sha256(data).digest()
    return "sha256=" + base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def main() -> int:
    venv, prefix, build_dir = Path(sys.argv[1]), sys.argv[2].rstrip("/"), sys.argv[3]
    bindir = venv / "bin"
    site = next((venv / "lib").glob("python3*/site-packages"))

    for name in ("activate", "activate.csh", "activate.fish", "Activate.ps1"):
        (bindir / name).unlink(missing_ok=True)

    rewritten: dict[str, bytes] = {}
    for f in sorted(bindir.iterdir()):
        if f.is_symlink() or not f.is_file():
            continue
        data = f.read_bytes()
        first, sep, rest = data.partition(b"\n")
        if first.startswith(b"#!") and b"python" in first:
            new = f"#!{prefix}/bin/python -I".encode() + sep + rest
            f.write_bytes(new)
            rewritten[f.name] = new

    cfg = venv / "pyvenv.cfg"
    lines = [ln for ln in cfg.read_text().splitlines() if not ln.startswith("command =")]
    cfg.write_text("\n".join(lines) + "\n")

    for direct in site.glob("*.dist-info/direct_url.json"):
        direct.unlink()

    for record in site.glob("*.dist-info/RECORD"):
        rows = list(csv.reader(io.StringIO(record.read_text())))
        out = []
        changed = False
        for row in rows:
            if not row:
                continue
            path = row[0]
            if path.endswith("direct_url.json"):
                changed = True
                continue
            name = Path(path).name
            if path.startswith("../../../bin/") and name in rewritten:
                data = rewritten[name]
                row = [path, record_hash(data), str(len(data))]
                changed = True
            out.append(row)
        if changed:
            buf = io.StringIO()
            csv.writer(buf, lineterminator="\n").writerows(out)
            record.write_text(buf.getvalue())

    leaks = []
    needle = build_dir.encode()
    for f in venv.rglob("*"):
        if f.is_file() and not f.is_symlink() and needle in f.read_bytes():
            leaks.append(str(f))
    if leaks:
        print("venv-fixups: the build directory leaks into:", *leaks[:20], sep="\n  ", file=sys.stderr)
        return 1
    print(f"venv-fixups: {len(rewritten)} console scripts rewritten for {prefix}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
