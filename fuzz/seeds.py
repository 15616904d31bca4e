#!/usr/bin/env python3
"""Writes the seed corpora in fuzz/corpus/<target>/ (run from anywhere).

Each seed is a small valid input of its target, so mutations start from
the shapes the parsers accept. AFL adds what it finds in its own output
directory; copy interesting finds here to keep them.
"""
import gzip, io, json, os, struct, tarfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def put(target, name, data):
    d = os.path.join(HERE, "corpus", target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data if isinstance(data, bytes) else data.encode())


# vmstate.bin: the 1.0 fixture whole, and its JSON body alone (the target
# also feeds its input as a body behind a valid header).
vm = open(os.path.join(ROOT, "tests/fixtures/vmstate-1.0.bin"), "rb").read()
put("vmstate", "fixture-1.0.bin", vm)
put("vmstate", "fixture-1.0-body.json", vm[56:])
put("manifest", "fixture-1.0.json", open(os.path.join(ROOT, "tests/fixtures/manifest-1.0.json"), "rb").read())

for op in ["status", "pause", "resume", "halt", "snapshot", "freeze_disk"]:
    put("control", op, json.dumps({"v": 2, "op": op}))
put("control", "old-version", '{"v":1,"op":"status"}')


def frame(kind, payload):
    payload = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return struct.pack("<I", len(payload) + 1) + bytes([kind]) + payload


HELLO, REQUEST, STDIN, STDOUT, STDERR, EXIT, SIGNAL, RESIZE, ERROR, RESPONSE = range(1, 11)
put("agent_frames", "exec", frame(HELLO, {"version": 1, "role": "host"})
    + frame(REQUEST, {"type": "exec", "argv": ["sh", "-c", "echo hi"], "env": [["A", "b"]], "tty": False, "stdin": True})
    + frame(STDIN, b"input") + frame(STDOUT, b"hi\n") + frame(EXIT, {"code": 0}))
put("agent_frames", "secrets", frame(REQUEST, {"type": "secrets_put", "secrets": [{"key": "API_TOKEN", "len": 5}], "replace": True})
    + frame(RESPONSE, {"ok": True, "message": "", "hostname": "w", "uptime_ms": 5}))
put("agent_frames", "refresh", frame(REQUEST, {"type": "refresh", "hostname": "f", "unix_time_ns": 1, "entropy_hex": "00ff", "machine_id": "0" * 32})
    + frame(ERROR, {"message": "no"}) + frame(SIGNAL, {"signal": 15}) + frame(RESIZE, {"rows": 24, "cols": 80}))

digest = "sha256:" + "ab" * 32
put("oci", "reference", "127.0.0.1:5000/test/debian:12\n")
put("oci", "reference-digest", "registry.example/a/b@" + digest + "\n")
put("oci", "manifest", json.dumps({
    "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
    "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": digest, "size": 10},
    "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": digest, "size": 20}]}))
put("oci", "index", json.dumps({
    "schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
    "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": digest, "size": 30,
                   "platform": {"architecture": "amd64", "os": "linux"}}]}))
put("oci", "config", json.dumps({
    "architecture": "amd64", "os": "linux",
    "config": {"Env": ["PATH=/bin"], "Entrypoint": ["/bin/sh"], "Cmd": ["-c", "true"], "WorkingDir": "/", "User": "0"},
    "rootfs": {"type": "layers", "diff_ids": [digest]}}))


def tar_bytes(entries):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        for name, kind, data in entries:
            info = tarfile.TarInfo(name)
            info.mtime = 0
            if kind == "dir":
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                t.addfile(info)
            elif kind == "file":
                info.size, info.mode = len(data), 0o644
                t.addfile(info, io.BytesIO(data))
            elif kind == "sym":
                info.type, info.linkname = tarfile.SYMTYPE, data
                t.addfile(info)
            elif kind == "link":
                info.type, info.linkname = tarfile.LNKTYPE, data
                t.addfile(info)
    return buf.getvalue()


layer = tar_bytes([("etc/", "dir", None), ("etc/hosts", "file", b"127.0.0.1 x\n"),
                   ("etc/alias", "link", "etc/hosts"), ("bin/", "dir", None),
                   ("bin/sh", "sym", "busybox"), ("opt/", "dir", None),
                   ("opt/.wh.gone", "file", b""), ("opt/d/", "dir", None),
                   ("opt/d/.wh..wh..opq", "file", b"")])
# The first byte (a tar's first name) picks the form: odd unpacks in
# overlay form ("etc/", "a/"), even applies whiteouts ("x").
put("tar_layer", "layer.tar", layer)
put("tar_layer", "layer-overlay.tar", tar_bytes([("a/", "dir", None), ("a/.wh.b", "file", b"")]))
put("tar_layer", "layer.tar.gz", gzip.compress(layer, mtime=0))
put("tar_layer", "escape.tar", tar_bytes([("x", "sym", "/etc"), ("x/passwd", "file", b"pwned"), ("../up", "file", b"up")]))

NEXT, WRITE = 1, 2


def desc(addr, length, flags, nxt=0):
    return struct.pack("<QIHH", addr, length, flags, nxt)


def memory(queues, buffers, size=0x1800):
    """queues: {index: [descriptors]}, each queue's chain heads all offered."""
    mem = bytearray(size)
    for i, descs in queues.items():
        base = i * 0x200
        for j, d in enumerate(descs):
            mem[base + 16 * j: base + 16 * j + 16] = d
        heads = [j for j, d in enumerate(descs) if j == 0 or not (struct.unpack("<QIHH", descs[j - 1])[2] & NEXT)]
        avail = struct.pack("<HH", 0, len(heads)) + b"".join(struct.pack("<H", h) for h in heads)
        mem[base + 0x80: base + 0x80 + len(avail)] = avail
    for addr, data in buffers.items():
        mem[addr: addr + len(data)] = data
    return bytes(mem)


# virtio-blk: a read of sector 1, then a write of sector 2.
put("virtio_block", "read-write", memory(
    {0: [desc(0x1000, 16, NEXT, 1), desc(0x1100, 512, NEXT | WRITE, 2), desc(0x13f0, 1, WRITE),
         desc(0x1010, 16, NEXT, 4), desc(0x1400, 512, NEXT, 5), desc(0x13f8, 1, WRITE)]},
    {0x1000: struct.pack("<IIQ", 0, 0, 1), 0x1010: struct.pack("<IIQ", 1, 0, 2), 0x1400: b"w" * 512}, size=0x1600))


def vsock_hdr(op, length=0, src_port=1234, dst_port=52):
    return struct.pack("<QQIIIHHIII", 3, 2, src_port, dst_port, length, 1, op, 0, 65536, 0)


# virtio-vsock: an RX buffer, then a connection request and data on TX.
put("virtio_vsock", "request-rw", memory(
    {0: [desc(0x1000, 0x400, WRITE)],
     1: [desc(0x1400, 44, 0), desc(0x1440, 49, 0)]},
    {0x1400: vsock_hdr(1), 0x1440: vsock_hdr(5, 5) + b"hello"}))

# virtio-net: guest memory (16 KiB: an RX buffer, a TX header and frame),
# then what passt sends: one length-prefixed frame for the RX buffer.
rx_frame = b"\xff" * 6 + b"passts" + b"\x08\x06" + b"RX-payload"
put("virtio_net", "frames-both-ways", memory(
    {0: [desc(0x1000, 0x400, WRITE)],
     1: [desc(0x1400, 12, NEXT, 1), desc(0x1440, 13, 0)]},
    {0x1440: b"guestTX-frame"}, size=0x4000) + struct.pack(">I", len(rx_frame)) + rx_frame)

# A snapshot artifact's manifest and its config (what `snapshot pull`
# reads from a registry before fetching anything else).
chunk = "cd" * 32
put("snapshot_artifact", "manifest", json.dumps({
    "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
    "artifactType": "application/vnd.microagent.snapshot.v1",
    "config": {"mediaType": "application/vnd.microagent.snapshot.config.v1+json", "digest": digest, "size": 900},
    "layers": [{"mediaType": "application/vnd.microagent.snapshot.chunk.v1+zstd", "digest": "sha256:" + chunk, "size": 300}]}))
chunked = lambda name, size, extents, chunks: {"name": name, "size": size, "extents": extents, "chunks": chunks}
put("snapshot_artifact", "config", json.dumps({
    "version": 1, "chunk_size": 4 << 20,
    "run": {"image": "localhost/busybox:latest", "image_config": {"cmd": ["/bin/sh"]}, "cmdline": "quiet",
            "init": None, "cpu_template": "pvm-safe", "network": "user"},
    "manifest": {"digest": digest, "size": 2000, "media_type": "application/vnd.microagent.snapshot.manifest.v1+json"},
    "vmstate": {"digest": digest, "size": 30000, "media_type": "application/vnd.microagent.snapshot.vmstate.v1"},
    "image": None,
    "kernel": chunked("vmlinux", 5 << 20, [[0, 5 << 20]],
                      [{"index": 0, "sha256": chunk, "size": 300, "len": 4 << 20},
                       {"index": 1, "sha256": chunk, "size": 300, "len": 1 << 20}]),
    "boot_disk": None,
    "files": [chunked("memory.bin", 256 << 20, [[0, 8192], [16 << 20, (16 << 20) + 4096]],
                      [{"index": 0, "sha256": chunk, "size": 300, "len": 8192}]),
              chunked("disk/chain.json", 200, [[0, 200]], [{"index": 0, "sha256": chunk, "size": 150, "len": 200}])]}))
