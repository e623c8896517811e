"""Copy the browser terminal's npm files into the package (``make web`` runs this).

``packaging/web/package.json`` and its lockfile pin ``@xterm/xterm`` and the add-ons;
after ``npm ci`` there, this copies the ES-module builds, the stylesheet and each
package's licence into ``daemon/sandboxd/web/vendor/`` (not committed), from where the
wheel (package-data) and the single-file build (``--add-data``) pick them up. The ES
modules import nothing, so no bundler is needed.
"""

from __future__ import annotations

import json
import pathlib
import shutil
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
NODE_MODULES = ROOT / "packaging" / "web" / "node_modules"
VENDOR = ROOT / "daemon" / "sandboxd" / "web" / "vendor"

#: (npm package, file inside it, name in vendor/)
FILES = (
    ("@xterm/xterm", "lib/xterm.mjs", "xterm.mjs"),
    ("@xterm/xterm", "css/xterm.css", "xterm.css"),
    ("@xterm/addon-fit", "lib/addon-fit.mjs", "addon-fit.mjs"),
    ("@xterm/addon-search", "lib/addon-search.mjs", "addon-search.mjs"),
    ("@xterm/addon-web-links", "lib/addon-web-links.mjs", "addon-web-links.mjs"),
    ("@xterm/addon-webgl", "lib/addon-webgl.mjs", "addon-webgl.mjs"),
)


def main() -> int:
    """Copy the files; a missing one (``npm ci`` not run) is an error that says so."""
    missing = [
        f"{pkg}/{path}" for pkg, path, _ in FILES if not (NODE_MODULES / pkg / path).is_file()
    ]
    if missing:
        print(
            f"vendor_web: run `npm ci` in packaging/web first; missing {missing}", file=sys.stderr
        )
        return 1
    staging = VENDOR.with_name("vendor.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    versions = {}
    for pkg, path, name in FILES:
        source = NODE_MODULES / pkg
        data = (source / path).read_bytes()
        # The source maps are not shipped: drop the last line's pointer to them, so no
        # browser asks. Everything else is copied byte for byte.
        head, sep, last = data.rstrip(b"\n").rpartition(b"\n")
        if last.startswith(b"//# sourceMappingURL="):
            data = head + sep
        (staging / name).write_bytes(data)
        short = pkg.split("/")[-1]
        shutil.copyfile(source / "LICENSE", staging / f"LICENSE.{short}")
        versions[pkg] = json.loads((source / "package.json").read_text())["version"]
    (staging / "VERSIONS.json").write_text(json.dumps(versions, indent=2, sort_keys=True) + "\n")
    shutil.rmtree(VENDOR, ignore_errors=True)
    staging.rename(VENDOR)
    print(f"vendor_web: {', '.join(f'{k}@{v}' for k, v in sorted(versions.items()))} -> {VENDOR}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
