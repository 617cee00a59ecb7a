#!/usr/bin/env python3
"""Assemble a one-layer OCI image archive from host files, with the standard library only.

    oci-image.py --name fathom.local/pause:1 --out pause.tar --entrypoint /pause ./pause:/pause:0755
    oci-image.py --name fathom.local/busybox:1 --out busybox.tar --cmd /bin/sh \\
        /bin/busybox:/bin/busybox:0755 @busybox:/bin/sh --dir /tmp:1777

FILE_SPEC is SRC:DEST[:MODE]: the host file SRC goes into the layer at the absolute path
DEST, with the octal MODE or else the source's permission bits. @TARGET:DEST makes DEST a
symlink to TARGET. Parent directories are created 0755. Owners are 0:0 and every mtime is
SOURCE_DATE_EPOCH (0 when unset), so the same inputs always give the same digests.

The output is an OCI image layout in a tar (oci-layout, index.json, blobs/sha256/...) whose
index names the image with io.containerd.image.name (the full name) and
org.opencontainers.image.ref.name (the tag), as `ctr -n k8s.io images import` expects.
--entrypoint and --cmd may be repeated, one argument each (--cmd=-c for one that starts
with a dash). Bad arguments exit 2 with a message naming the argument.
"""

import argparse
import datetime
import gzip
import hashlib
import io
import json
import os
import re
import stat
import sys
import tarfile

MEDIA_INDEX = "application/vnd.oci.image.index.v1+json"
MEDIA_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
MEDIA_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"


class SpecError(Exception):
    """A bad argument: the message names it."""


def fail(message):
    print(f"oci-image.py: {message}", file=sys.stderr)
    sys.exit(2)


def split_name(name):
    """'registry/repo:tag' -> (full name with tag, tag); the tag defaults to 'latest'."""
    if not name or any(c.isspace() for c in name) or "@" in name:
        raise SpecError(f"--name {name!r}: expected REPOSITORY[:TAG], e.g. fathom.local/pause:1")
    last = name.rsplit("/", 1)[-1]
    if ":" in last:
        repo, tag = name.rsplit(":", 1)
    else:
        repo, tag = name, "latest"
    if not repo or not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}", tag):
        raise SpecError(f"--name {name!r}: expected REPOSITORY[:TAG], e.g. fathom.local/pause:1")
    if repo != repo.lower():
        raise SpecError(f"--name {name!r}: the repository must be lower case")
    return f"{repo}:{tag}", tag


def clean_dest(dest, what):
    if not dest.startswith("/"):
        raise SpecError(f"{what}: DEST {dest!r} must be an absolute path")
    parts = [p for p in dest.split("/") if p not in ("", ".")]
    if not parts or ".." in parts:
        raise SpecError(f"{what}: DEST {dest!r} must name a path below / without '..'")
    return "/".join(parts)  # relative to the layer's root, as tar entries are


def parse_mode(text, what):
    if not re.fullmatch(r"0?[0-7]{3,4}", text):
        raise SpecError(f"{what}: MODE {text!r} must be octal, e.g. 0755")
    return int(text, 8)


def parse_file_spec(spec):
    """-> (kind, dest, source-or-target, mode); kind is 'file' or 'symlink'."""
    what = f"FILE_SPEC {spec!r}"
    parts = spec.split(":")
    if len(parts) not in (2, 3) or not parts[0] or not parts[1]:
        raise SpecError(f"{what}: expected SRC:DEST[:MODE] or @TARGET:DEST")
    src, dest = parts[0], clean_dest(parts[1], what)
    if src.startswith("@"):
        if len(parts) != 2 or len(src) < 2:
            raise SpecError(f"{what}: a symlink is @TARGET:DEST, with no MODE")
        return "symlink", dest, src[1:], 0o777
    mode = parse_mode(parts[2], what) if len(parts) == 3 else None
    try:
        st = os.stat(src)
    except FileNotFoundError:
        raise SpecError(f"{what}: source file {src!r} does not exist") from None
    except OSError as e:
        raise SpecError(f"{what}: cannot read source file {src!r}: {e.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise SpecError(f"{what}: source {src!r} is not a regular file")
    if not os.access(src, os.R_OK):
        raise SpecError(f"{what}: source file {src!r} is not readable")
    if mode is None:
        mode = stat.S_IMODE(st.st_mode)
    return "file", dest, src, mode


def parse_dir_spec(spec):
    what = f"--dir {spec!r}"
    parts = spec.split(":")
    if len(parts) not in (1, 2) or not parts[0]:
        raise SpecError(f"{what}: expected DEST[:MODE]")
    mode = parse_mode(parts[1], what) if len(parts) == 2 else 0o755
    return "dir", clean_dest(parts[0], what), None, mode


def tar_info(name, kind, mode, mtime, size=0, target=""):
    info = tarfile.TarInfo(name)
    info.type = {"file": tarfile.REGTYPE, "dir": tarfile.DIRTYPE, "symlink": tarfile.SYMTYPE}[kind]
    info.mode = mode
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    info.mtime = mtime
    info.size = size
    info.linkname = target
    return info


def build_layer(entries, mtime):
    """The layer tar's bytes: every entry, its parent directories first, in path order."""
    items = {}
    for kind, dest, source, mode in entries:
        if dest in items and not (kind == "dir" and items[dest][0] == "dir"):
            raise SpecError(f"DEST /{dest} is given twice")
        items[dest] = (kind, source, mode)
    for dest in list(items):
        parts = dest.split("/")
        for i in range(1, len(parts)):
            parent = "/".join(parts[:i])
            if parent not in items:
                items[parent] = ("dir", None, 0o755)
            elif items[parent][0] != "dir":
                raise SpecError(f"/{parent} is a file or symlink but /{dest} is to go below it")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for dest in sorted(items, key=lambda p: p.split("/")):
            kind, source, mode = items[dest]
            if kind == "file":
                with open(source, "rb") as f:
                    data = f.read()
                tar.addfile(tar_info(dest, kind, mode, mtime, size=len(data)), io.BytesIO(data))
            elif kind == "symlink":
                tar.addfile(tar_info(dest, kind, mode, mtime, target=source))
            else:
                tar.addfile(tar_info(dest + "/", kind, mode, mtime))
    return buf.getvalue()


def gzip_bytes(data):
    out = io.BytesIO()
    # mtime=0 and no file name in the header: the same layer always compresses the same.
    with gzip.GzipFile(filename="", mode="wb", fileobj=out, mtime=0, compresslevel=9) as gz:
        gz.write(data)
    return out.getvalue()


def digest(data):
    return "sha256:" + hashlib.sha256(data).hexdigest()


def canonical_json(obj):
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def build_archive(args, entries):
    mtime = int(os.environ.get("SOURCE_DATE_EPOCH", "0") or 0)
    full_name, tag = split_name(args.name)
    layer_tar = build_layer(entries, mtime)
    layer = layer_tar if args.uncompressed else gzip_bytes(layer_tar)
    blobs = {}

    def add_blob(data, media_type, annotations=None):
        d = digest(data)
        blobs[d] = data
        desc = {"mediaType": media_type, "digest": d, "size": len(data)}
        if annotations:
            desc["annotations"] = annotations
        return desc

    layer_desc = add_blob(layer, MEDIA_LAYER_TAR if args.uncompressed else MEDIA_LAYER_GZIP)
    container_config = {}
    if args.entrypoint:
        container_config["Entrypoint"] = args.entrypoint
    if args.cmd:
        container_config["Cmd"] = args.cmd
    container_config["Env"] = args.env or ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]
    container_config["WorkingDir"] = args.workdir
    if args.user:
        if not re.fullmatch(r"[0-9]+(:[0-9]+)?", args.user):
            raise SpecError(f"--user {args.user!r}: expected UID[:GID], numeric")
        container_config["User"] = args.user
    created = datetime.datetime.fromtimestamp(mtime, datetime.timezone.utc)
    config = {
        "architecture": args.arch,
        "os": "linux",
        "created": created.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "config": container_config,
        "rootfs": {"type": "layers", "diff_ids": [digest(layer_tar)]},
        "history": [{"created": created.strftime("%Y-%m-%dT%H:%M:%SZ"), "created_by": "oci-image.py"}],
    }
    config_desc = add_blob(canonical_json(config), MEDIA_CONFIG)
    manifest = {
        "schemaVersion": 2,
        "mediaType": MEDIA_MANIFEST,
        "config": config_desc,
        "layers": [layer_desc],
    }
    manifest_desc = add_blob(canonical_json(manifest), MEDIA_MANIFEST, {
        "io.containerd.image.name": full_name,
        "org.opencontainers.image.ref.name": tag,
    })
    manifest_desc["platform"] = {"architecture": args.arch, "os": "linux"}
    index = {"schemaVersion": 2, "mediaType": MEDIA_INDEX, "manifests": [manifest_desc]}

    files = [("oci-layout", canonical_json({"imageLayoutVersion": "1.0.0"})),
             ("index.json", canonical_json(index))]
    files += [("blobs/sha256/" + d.split(":", 1)[1], blobs[d]) for d in sorted(blobs)]
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name in ("blobs/", "blobs/sha256/"):
            tar.addfile(tar_info(name, "dir", 0o755, mtime))
        for name, data in files:
            tar.addfile(tar_info(name, "file", 0o644, mtime, size=len(data)), io.BytesIO(data))
    return out.getvalue(), full_name, manifest_desc["digest"]


def main(argv):
    parser = argparse.ArgumentParser(
        prog="oci-image.py",
        description="Assemble a one-layer OCI image archive (for ctr images import) from host files.",
        epilog="FILE_SPEC: SRC:DEST[:MODE] copies a host file; @TARGET:DEST makes a symlink.")
    parser.add_argument("--name", required=True, help="image name, REPOSITORY[:TAG] (tag default latest)")
    parser.add_argument("--out", required=True, help="the archive to write")
    parser.add_argument("--entrypoint", action="append", default=[], metavar="ARG",
                        help="config Entrypoint, one argument per use")
    parser.add_argument("--cmd", action="append", default=[], metavar="ARG",
                        help="config Cmd, one argument per use (--cmd=-c for a leading dash)")
    parser.add_argument("--env", action="append", default=[], metavar="K=V",
                        help="config Env, one per use (default: a standard PATH)")
    parser.add_argument("--workdir", default="/", help="config WorkingDir (default /)")
    parser.add_argument("--user", default="", help="config User, e.g. 65532:65532 (default: none, root)")
    parser.add_argument("--dir", action="append", default=[], metavar="DEST[:MODE]",
                        help="an empty directory in the layer (default mode 0755)")
    parser.add_argument("--arch", default="amd64", help="config architecture (default amd64)")
    parser.add_argument("--uncompressed", action="store_true", help="store the layer as plain tar, not gzip")
    parser.add_argument("specs", nargs="*", metavar="FILE_SPEC")
    args = parser.parse_args(argv)
    try:
        for env in args.env:
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", env, re.S):
                raise SpecError(f"--env {env!r}: expected K=V")
        if not args.workdir.startswith("/"):
            raise SpecError(f"--workdir {args.workdir!r}: must be an absolute path")
        if not args.specs and not args.dir:
            raise SpecError("no FILE_SPEC given: the image would be empty")
        entries = [parse_file_spec(s) for s in args.specs] + [parse_dir_spec(d) for d in args.dir]
        out_dir = os.path.dirname(os.path.abspath(args.out))
        if not os.path.isdir(out_dir):
            raise SpecError(f"--out {args.out!r}: directory {out_dir!r} does not exist")
        data, full_name, manifest_digest = build_archive(args, entries)
    except SpecError as e:
        fail(str(e))
    tmp = f"{args.out}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, args.out)
    except OSError as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        fail(f"--out {args.out!r}: {e.strerror}")
    print(f"oci-image.py: wrote {args.out}: {full_name} manifest {manifest_digest}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
