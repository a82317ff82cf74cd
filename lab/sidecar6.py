"""The IPv6 half of the lab's sidecar stand-in (stdlib only, run as UID 1337).

haproxy 2.6 asks the kernel for the original destination (SO_ORIGINAL_DST)
only on IPv4 sockets, so IPv6 connections would fall back to getsockname and
be refused by the self-loop guard. This small threaded TCP proxy does for
IPv6 what haproxy does for IPv4: outbound on [::1]:OUT, inbound on [::]:IN,
getsockopt(SOL_IPV6, IP6T_SO_ORIGINAL_DST) per connection, inbound
passthrough from ::6, refuse connections made straight to its own port, and
one log line per connection in the same format as the haproxy sidecar.

Usage: python3 sidecar6.py OUT_PORT IN_PORT PASSTHROUGH_SOURCE
"""
import socket
import struct
import sys
import threading

IP6T_SO_ORIGINAL_DST = 80
_print_lock = threading.Lock()


def _log(**fields):
    line = "mb " + " ".join(f"{k}={v}" for k, v in fields.items())
    with _print_lock:
        print(line, flush=True)


def original_dst(conn):
    """The pre-redirect destination, or getsockname() when nobody redirected."""
    try:
        raw = conn.getsockopt(socket.IPPROTO_IPV6, IP6T_SO_ORIGINAL_DST, 28)
        port = struct.unpack("!H", raw[2:4])[0]
        return socket.inet_ntop(socket.AF_INET6, raw[8:24]), port
    except OSError:
        return conn.getsockname()[:2]


def _pipe(src, dst):
    try:
        while True:
            data = src.recv(65536)
            if not data:
                break
            dst.sendall(data)
    except OSError:
        pass
    finally:
        try:
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass


def _handle(fe, conn, peer, listen_port, source):
    up = None
    try:
        dst, dport = original_dst(conn)
        if dport == listen_port:
            # A direct connection to the proxy: no original destination. Relaying
            # it would connect to ourselves forever (the self-loop haproxy guards
            # against with "tcp-request connection reject").
            _log(fe=fe, src=peer[0], sport=peer[1], dst=dst, dport=dport, bsrc="-",
                 bsport="-", server="-", sdport="-", term="reject")
            return
        up = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        up.settimeout(5)
        if source:
            up.bind((source, 0))
        up.connect((dst, dport))
        up.settimeout(None)
        b = up.getsockname()
        _log(fe=fe, src=peer[0], sport=peer[1], dst=dst, dport=dport, bsrc=b[0],
             bsport=b[1], server=dst, sdport=dport, term="--")
        t = threading.Thread(target=_pipe, args=(conn, up), daemon=True)
        t.start()
        _pipe(up, conn)
        t.join()
    except OSError as e:
        _log(fe=fe, src=peer[0], sport=peer[1], dst="-", dport="-", bsrc="-", bsport="-",
             server="-", sdport="-", term=f"error:{e.errno}")
    finally:
        conn.close()
        if up is not None:
            up.close()


def _serve(fe, addr, port, source):
    ls = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    ls.bind((addr, port))
    ls.listen(512)
    return ls, lambda: _accept_loop(fe, ls, port, source)


def _accept_loop(fe, ls, port, source):
    while True:
        conn, peer = ls.accept()
        threading.Thread(target=_handle, args=(fe, conn, peer, port, source),
                         daemon=True).start()


def main(argv):
    out_port, in_port, source = int(argv[1]), int(argv[2]), argv[3]
    # Bind both before serving, so "listening" means fully ready.
    _, out_loop = _serve("outbound6", "::", out_port, None)
    _, in_loop = _serve("inbound6", "::", in_port, source)
    threading.Thread(target=out_loop, daemon=True).start()
    in_loop()


if __name__ == "__main__":
    main(sys.argv)
