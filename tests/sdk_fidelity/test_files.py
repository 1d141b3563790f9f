"""Agent behaviours as E2B's envd, through the real SDK (the test compares
what the SDK parses with the sandbox's own view of the same files, read by
a python3 inside it): remove of a missing path, entry fields (mode,
permissions, owner, group, size, modified time, symlink target), gzip both
ways."""

import datetime
import gzip
import hashlib
import json
import os
import shlex
import stat
import uuid

import httpx
import pytest

from novita_sandbox.core.sandbox.filesystem.filesystem import FileType
from sandbox_servers import envd_request


def go_mode_string(st_mode):
    """Go's FileMode.String() of an lstat mode (what envd reports)."""
    out = ""
    fmt = stat.S_IFMT(st_mode)
    if fmt == stat.S_IFDIR:
        out += "d"
    if fmt == stat.S_IFLNK:
        out += "L"
    if fmt in (stat.S_IFBLK, stat.S_IFCHR):
        out += "D"
    if fmt == stat.S_IFIFO:
        out += "p"
    if fmt == stat.S_IFSOCK:
        out += "S"
    if st_mode & stat.S_ISUID:
        out += "u"
    if st_mode & stat.S_ISGID:
        out += "g"
    if fmt == stat.S_IFCHR:
        out += "c"
    if st_mode & stat.S_ISVTX:
        out += "t"
    out = out or "-"
    return out + "".join(c if st_mode & (1 << (8 - i)) else "-" for i, c in enumerate("rwxrwxrwx"))


BOX_STAT = r"""
import grp, hashlib, json, os, pwd, stat, sys
out = {}
for p in sys.argv[1:]:
    if not os.path.lexists(p):
        out[p] = None
        continue
    l = os.lstat(p)
    t = os.stat(p)
    out[p] = {
        "size": l.st_size, "lmode": l.st_mode, "tmode": t.st_mode, "mtime": l.st_mtime,
        "owner": pwd.getpwuid(l.st_uid).pw_name, "group": grp.getgrgid(l.st_gid).gr_name,
        "real": os.path.realpath(p),
        "sha256": hashlib.sha256(open(p, "rb").read()).hexdigest() if stat.S_ISREG(t.st_mode) else None,
    }
print(json.dumps(out))
"""


def box_stats(sandbox, paths):
    """lstat/stat, owner and group names, realpath and content hash of each
    path, as seen inside the sandbox (None: it does not exist)."""
    r = sandbox.commands.run("python3 -c " + shlex.quote(BOX_STAT) + " " + " ".join(map(shlex.quote, paths)))
    assert r.exit_code == 0, r.stderr
    return json.loads(r.stdout)


def test_remove_of_a_missing_path_succeeds(sandbox):
    sandbox.files.remove("no/such/file")
    sandbox.files.remove("/definitely/not/here")
    sandbox.files.write("gone.txt", "x")
    sandbox.files.remove("gone.txt")
    sandbox.files.remove("gone.txt")
    assert not sandbox.files.exists("gone.txt")


def test_entry_fields_match_the_filesystem(sandbox, root):
    assert sandbox.commands.run(
        "mkdir -p d/sub && chmod 755 d && chmod 700 d/sub && printf hello > d/f.txt && chmod 640 d/f.txt"
        " && ln -s f.txt d/link && ln -s sub d/dirlink && ln -s missing d/broken && chmod 1777 d/sub"
    ).exit_code == 0
    d = os.path.join(root, "d")
    info = sandbox.files.get_info("d")
    assert info.type == FileType.DIR
    assert info.mode == 0o755, oct(info.mode)
    assert info.permissions == "drwxr-xr-x"

    entries = {e.name: e for e in sandbox.files.list("d")}
    # The SDK drops entries of unspecified type (a dangling symlink), as with E2B.
    assert set(entries) == {"f.txt", "sub", "link", "dirlink"}, set(entries)
    seen = box_stats(sandbox, [os.path.join(d, name) for name in entries])
    for name, e in entries.items():
        p = os.path.join(d, name)
        box = seen[p]
        assert e.path == p
        assert e.size == box["size"], name
        assert e.mode == stat.S_IMODE(box["tmode"]) & 0o777, (name, oct(e.mode))
        assert e.permissions == go_mode_string(box["lmode"]), (name, e.permissions)
        assert e.owner == box["owner"] and e.group == box["group"], (name, e.owner, e.group)
        mtime = datetime.datetime.fromtimestamp(box["mtime"], datetime.timezone.utc).replace(tzinfo=None)
        assert abs((e.modified_time - mtime).total_seconds()) < 1e-3, (name, e.modified_time, mtime)
        if stat.S_ISLNK(box["lmode"]):
            assert e.symlink_target == box["real"]
        else:
            assert e.symlink_target is None
    assert entries["f.txt"].mode == 0o640 and entries["f.txt"].type == FileType.FILE
    assert entries["sub"].permissions == "dtrwxrwxrwx" and entries["sub"].mode == 0o777
    assert entries["link"].type == FileType.FILE and entries["link"].permissions == "Lrwxrwxrwx"
    assert entries["dirlink"].type == FileType.DIR


def test_gzip_uploads_both_forms_and_gzip_downloads(sandbox, root):
    data = (b"stasis gzip round trip " * 5000) + bytes(range(256))
    sandbox.files.write("gz/octet.bin", data, gzip=True, use_octet_stream=True)
    assert bytes(sandbox.files.read("gz/octet.bin", format="bytes")) == data
    assert bytes(sandbox.files.read("gz/octet.bin", format="bytes", gzip=True)) == data

    # The whole multipart body gzip-compressed (the SDK's multipart writer
    # doesn't compress, other clients do): the same request, by hand.
    url, headers = envd_request(sandbox)
    boundary = uuid.uuid4().hex
    mp = (
        f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"gz/multi.bin\"\r\n"
        f"Content-Type: application/octet-stream\r\n\r\n"
    ).encode() + data + f"\r\n--{boundary}--\r\n".encode()
    r = httpx.post(
        f"{url}/files",
        content=gzip.compress(mp),
        headers={**headers, "Content-Type": f"multipart/form-data; boundary={boundary}", "Content-Encoding": "gzip"},
    )
    assert r.status_code == 200, r.text
    multi = os.path.join(root, "gz/multi.bin")
    assert r.json()[0]["path"] == multi
    assert box_stats(sandbox, [multi])[multi]["sha256"] == hashlib.sha256(data).hexdigest()

    # Downloads: gzip when asked, identity otherwise.
    r = httpx.get(f"{url}/files", params={"path": "gz/octet.bin"}, headers={**headers, "Accept-Encoding": "gzip"})
    assert r.status_code == 200
    assert r.headers["content-encoding"] == "gzip"
    assert "content-length" not in r.headers or int(r.headers["content-length"]) < len(data)
    assert r.content == data  # httpx decodes it
    r = httpx.get(f"{url}/files", params={"path": "gz/octet.bin"}, headers={**headers, "Accept-Encoding": "identity"})
    assert "content-encoding" not in r.headers and int(r.headers["content-length"]) == len(data)
    assert r.content == data
    r = httpx.get(
        f"{url}/files", params={"path": "gz/octet.bin"}, headers={**headers, "Accept-Encoding": "br, identity;q=0"}
    )
    assert r.status_code == 406, r.text


@pytest.mark.parametrize("form", ["octet", "multipart"])
def test_malformed_gzip_upload_is_400_and_leaves_no_file(sandbox, root, form):
    url, headers = envd_request(sandbox)
    good = gzip.compress(b"x" * 200000)
    bad_bodies = {
        "not gzip": b"this is not gzip at all",
        "truncated": good[: len(good) // 2],
        "bad crc": good[:-8] + bytes(8),
    }
    for why, body in bad_bodies.items():
        target = f"bad/{form}-{why.replace(' ', '-')}.bin"
        if form == "octet":
            content = body
            ctype = "application/octet-stream"
        else:
            # A gzip body that breaks inside the multipart stream.
            boundary = "b0undary"
            inner = (
                f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{target}\"\r\n\r\n"
            ).encode() + b"x" * 200000 + f"\r\n--{boundary}--\r\n".encode()
            z = gzip.compress(inner)
            content = {"not gzip": body, "truncated": z[: len(z) // 2], "bad crc": z[:-8] + bytes(8)}[why]
            ctype = f"multipart/form-data; boundary={boundary}"
        r = httpx.post(
            f"{url}/files",
            params={"path": target} if form == "octet" else {},
            content=content,
            headers={**headers, "Content-Type": ctype, "Content-Encoding": "gzip"},
        )
        assert r.status_code == 400, (why, r.status_code, r.text)
        assert r.json()["code"] == 400 and "gzip" in r.json()["message"], r.text
        left = os.path.join(root, target)
        assert box_stats(sandbox, [left])[left] is None, f"{why}: partial file left"
    # An unknown coding is refused outright.
    r = httpx.post(
        f"{url}/files",
        params={"path": "bad/br.bin"},
        content=b"x",
        headers={**headers, "Content-Type": "application/octet-stream", "Content-Encoding": "br"},
    )
    assert r.status_code == 415, r.text
