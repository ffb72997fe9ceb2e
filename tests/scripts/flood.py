"""Load for the fairness tests.

  flood.py udp SRC DST SECONDS
      send 1-byte UDP datagrams from SRC to DST on ever new ports, as fast
      as one process can, for SECONDS; print how many were sent
  flood.py trickle ADDR PORT RATE SECONDS
      serve one TCP client with RATE bytes a second for SECONDS
  flood.py watch DST PORT SECONDS
      read from DST:PORT for SECONDS; print the bytes and the longest gap
      between two reads, in milliseconds
"""
import socket
import sys
import time


def udp(src, dst, seconds):
    socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(8)]
    for s in socks:
        s.bind((src, 0))
        s.setblocking(False)
    sent, port, end = 0, 1024, time.monotonic() + seconds
    while time.monotonic() < end:
        for _ in range(256):
            port = port + 1 if port < 65000 else 1024
            try:
                socks[port % 8].sendto(b"x", (dst, port))
                sent += 1
            except BlockingIOError:
                pass
    print(sent)


def trickle(addr, port, rate, seconds):
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((addr, port))
    srv.listen(1)
    conn, _ = srv.accept()
    chunk = b"d" * (rate // 50)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        conn.sendall(chunk)
        time.sleep(0.02)
    conn.close()


def watch(dst, port, seconds):
    s = socket.create_connection((dst, port), timeout=5)
    s.settimeout(seconds)
    total, worst, last = 0, 0.0, time.monotonic()
    end = last + seconds
    while time.monotonic() < end:
        data = s.recv(65536)
        if not data:
            break
        now = time.monotonic()
        worst, last = max(worst, now - last), now
        total += len(data)
    print(total, int(worst * 1000))


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "udp":
        udp(args[0], args[1], float(args[2]))
    elif cmd == "trickle":
        trickle(args[0], int(args[1]), int(args[2]), float(args[3]))
    else:
        watch(args[0], int(args[1]), float(args[2]))
