"""Helper for test_inbound_flows.py, run under /usr/bin/python3 in a test netns.

echo PORT...       listen on every PORT (IPv4); each connection gets a line
                   with its local address and SO_ORIGINAL_DST, then every line
                   it sends is echoed back; "bye" makes the server close first.
                   Prints "ready".
idle HOST PORT     connect, read the greeting and one echo, print them as JSON,
                   then wait for a line on stdin; send one more line after it,
                   print the echo (or the error) as JSON and exit.
synflood SRC DST SPORT0 N PORTS
                   send N TCP SYNs SRC:sport -> DST:port from a raw socket
                   (IP_HDRINCL), sport counting up from SPORT0 within
                   1024..65535 and cycling over the comma-separated PORTS, so
                   every SYN is a new tuple. Prints {"sent": N, "secs": ...}.
"""
import json
import socket
import struct
import sys
import threading
import time


def orig_dst(c):
    try:
        raw = c.getsockopt(socket.SOL_IP, 80, 16)
        return [socket.inet_ntop(socket.AF_INET, raw[4:8]), struct.unpack("!H", raw[2:4])[0]]
    except OSError as e:
        return ["error", e.errno]


def echo(ports):
    def serve(c):
        with c:
            f = c.makefile("rwb", buffering=0)
            f.write((json.dumps({"sock": list(c.getsockname()), "orig": orig_dst(c)}) + "\n").encode())
            for line in f:
                if line == b"bye\n":     # the pod closes first (TIME_WAIT on its side)
                    break
                f.write(line)

    def accept(s):
        while True:
            c, _ = s.accept()
            threading.Thread(target=serve, args=(c,), daemon=True).start()

    for p in ports:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("0.0.0.0", p))
        s.listen(128)
        threading.Thread(target=accept, args=(s,), daemon=True).start()
    print("ready", flush=True)
    threading.Event().wait()


def idle(host, port):
    c = socket.create_connection((host, port), timeout=5)
    f = c.makefile("rwb", buffering=0)
    hello = json.loads(f.readline())
    f.write(b"first\n")
    hello["echo"] = f.readline().decode().strip()
    hello["client_peer"] = list(c.getpeername())
    hello["client_sock"] = list(c.getsockname())
    print(json.dumps(hello), flush=True)
    sys.stdin.readline()
    try:
        f.write(b"again\n")
        line = f.readline()
        print(json.dumps({"echo": line.decode().strip()}), flush=True)
    except OSError as e:
        print(json.dumps({"error": str(e)}), flush=True)


def csum(data):
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack("!%dH" % (len(data) // 2), data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return s


def synflood(src, dst, sport0, n, ports):
    s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    s.setsockopt(socket.IPPROTO_IP, socket.IP_HDRINCL, 1)
    saddr, daddr = socket.inet_aton(src), socket.inet_aton(dst)
    # TCP header without ports and checksum: seq, ack, offset 5, SYN, window
    rest = struct.pack("!IIBBHHH", 0x12345678, 0, 5 << 4, 0x02, 64240, 0, 0)
    base = csum(saddr + daddr + struct.pack("!BBH", 0, socket.IPPROTO_TCP, 20) + rest)
    iphdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 40, 0, 0, 64, socket.IPPROTO_TCP, 0, saddr, daddr)
    send, pack = s.sendto, struct.pack
    start = time.monotonic()
    span = 65536 - 1024
    for i in range(n):
        sport = 1024 + (sport0 - 1024 + i // len(ports)) % span
        dport = ports[i % len(ports)]
        c = base + sport + dport
        c = (c & 0xFFFF) + (c >> 16)
        c = (c & 0xFFFF) + (c >> 16)
        send(iphdr + pack("!HH", sport, dport) + rest[:12] + pack("!H", ~c & 0xFFFF) + rest[14:],
             (dst, 0))
    print(json.dumps({"sent": n, "secs": time.monotonic() - start}), flush=True)


if __name__ == "__main__":
    cmd = sys.argv[1]
    if cmd == "echo":
        echo([int(p) for p in sys.argv[2:]])
    elif cmd == "idle":
        idle(sys.argv[2], int(sys.argv[3]))
    else:
        synflood(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]),
                 [int(p) for p in sys.argv[6].split(",")])
