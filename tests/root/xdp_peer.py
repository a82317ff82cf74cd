"""Helper for test_xdp.py, run under /usr/bin/python3 inside a test netns.

server PORT...   listen on every PORT (IPv4 and IPv6 sockets); for each
                 connection read to EOF and answer one JSON line: local and
                 peer address, SO_ORIGINAL_DST (or the errno), sha256, bytes.
client HOST PORT SIZE TIMEOUT
                 send SIZE random bytes, half-close, print the server's JSON
                 plus the address the client saw and the sha256 it sent.
                 SIZE -1 sends "RST": the server aborts the connection.
"""
import hashlib
import json
import os
import socket
import struct
import sys

def orig_dst(c):
    try:
        if c.family == socket.AF_INET:
            raw = c.getsockopt(socket.SOL_IP, 80, 16)
            return [socket.inet_ntop(socket.AF_INET, raw[4:8]), struct.unpack("!H", raw[2:4])[0]]
        raw = c.getsockopt(socket.IPPROTO_IPV6, 80, 28)
        return [socket.inet_ntop(socket.AF_INET6, raw[8:24]), struct.unpack("!H", raw[2:4])[0]]
    except OSError as e:
        return ["error", e.errno]

def server(ports):
    import selectors
    sel = selectors.DefaultSelector()
    for p in ports:
        for fam, addr in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
            s = socket.socket(fam, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if fam == socket.AF_INET6:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            s.bind((addr, p))
            s.listen(64)
            sel.register(s, selectors.EVENT_READ)
    print("ready", flush=True)
    while True:
        for key, _ in sel.select():
            c, peer = key.fileobj.accept()
            c.settimeout(20)
            h, n, head = hashlib.sha256(), 0, b""
            while True:
                b = c.recv(1 << 16)
                if not b:
                    break
                h.update(b)
                n += len(b)
                head = (head + b)[:3]
            if head == b"RST" and n == 3:   # abort: the kernel answers with a RST
                c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                c.close()
                continue
            rep = {"sock": list(c.getsockname()[:2]), "peer": list(peer[:2]), "orig": orig_dst(c),
                   "sha": h.hexdigest(), "n": n}
            c.sendall(json.dumps(rep).encode())
            c.close()

def client(host, port, size, timeout):
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    c = socket.socket(fam, socket.SOCK_STREAM)
    c.settimeout(timeout)
    try:
        c.connect((host, port))
    except OSError as e:
        print(json.dumps({"error": str(e)}))
        return
    data = b"RST" if size < 0 else os.urandom(size)
    peer = list(c.getpeername()[:2])
    c.sendall(data)
    c.shutdown(socket.SHUT_WR)
    rep = b""
    try:
        while True:
            b = c.recv(65536)
            if not b:
                break
            rep += b
    except OSError as e:
        print(json.dumps({"error": str(e), "client_peer": peer}))
        return
    out = json.loads(rep) if rep else {}
    out["client_peer"] = peer
    out["sent_sha"] = hashlib.sha256(data).hexdigest()
    print(json.dumps(out))

if __name__ == "__main__":
    if sys.argv[1] == "server":
        server([int(p) for p in sys.argv[2:]])
    else:
        client(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5]))
