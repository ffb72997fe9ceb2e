"""UDP echo of datagrams larger than the MTU, fragmented on the wire.

  frag_echo.py serve ADDR PORT SECONDS [reverse]
      echo every datagram to ADDR:PORT back to its sender; with `reverse`,
      the echo's fragments are crafted with scapy and sent last first
  frag_echo.py ask SRC DST PORT SIZE
      send SIZE bytes from SRC to DST:PORT; print "ok" if the same bytes
      come back within 5 s

Both sides turn path MTU discovery off (IP_PMTUDISC_DONT), so the kernel
fragments instead of refusing. Needs Debian's python3-scapy for `reverse`.
"""
import socket
import sys
import time

IP_MTU_DISCOVER = 10
IP_PMTUDISC_DONT = 0


def udp(addr, port):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.IPPROTO_IP, IP_MTU_DISCOVER, IP_PMTUDISC_DONT)
    s.bind((addr, port))
    return s


def serve(addr, port, seconds, reverse):
    s = udp(addr, port)
    s.settimeout(0.2)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            data, peer = s.recvfrom(65535)
        except socket.timeout:
            continue
        print(peer[0], len(data), flush=True)
        if not reverse:
            s.sendto(data, peer)
            continue
        from scapy.all import IP, UDP, fragment, send
        pkt = IP(src=addr, dst=peer[0], id=0x5eed) / UDP(sport=port, dport=peer[1]) / data
        send(fragment(pkt, fragsize=1200)[::-1], verbose=0)


def ask(src, dst, port, size):
    s = udp(src, 0)
    s.settimeout(5)
    body = bytes((i * 7 + i // 251) & 0xFF for i in range(size))
    s.sendto(body, (dst, port))
    try:
        data, _ = s.recvfrom(65535)
    except socket.timeout:
        print("timeout")
        return
    print("ok" if data == body else "differs (%d bytes)" % len(data))


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), sys.argv[5:] == ["reverse"])
    else:
        ask(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
