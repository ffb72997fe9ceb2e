"""Raw IP echo for protocols this kernel has no driver for.

  proto_echo.py serve SECONDS ADDR PROTO...
                                         answer every packet of PROTO to ADDR
                                         with the same bytes, from ADDR back
                                         to its sender; print "PROTO SOURCE"
                                         for each
  proto_echo.py ask SRC DST PROTO...     send one packet of each PROTO from
                                         SRC to DST, with a valid header
                                         (scapy), and print the protocols
                                         whose echo came back, one a line

A raw socket per protocol also keeps the kernel from answering "protocol
unreachable". Needs Debian's python3-scapy for `ask`.
"""
import select
import socket
import sys
import time


def raw(proto):
    return socket.socket(socket.AF_INET, socket.SOCK_RAW, proto)


def payload(proto, token):
    from scapy.all import GRE, IP, IPv6, ICMPv6EchoRequest, SCTP, SCTPChunkData, Raw
    from scapy.layers.ipsec import ESP
    if proto == 47:
        inner = IP(src="198.18.200.1", dst="198.18.200.2") / Raw(token)
        return bytes(GRE(proto=0x0800) / inner)
    if proto == 50:
        return bytes(ESP(spi=0x1001, seq=1, data=token))
    if proto == 132:
        return bytes(SCTP(sport=5000, dport=5001, tag=7) / SCTPChunkData(data=token))
    if proto == 41:
        return bytes(IPv6(src="2001:db8::1", dst="2001:db8::2") / ICMPv6EchoRequest(data=token))
    return b"\xfd" + token  # 253: RFC 3692 experiments


def serve(seconds, addr, protos):
    socks = {}
    for p in protos:
        s = raw(p)
        s.bind((addr, 0))
        socks[s] = p
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        ready, _, _ = select.select(list(socks), [], [], 0.2)
        for s in ready:
            data, (src, _) = s.recvfrom(65535)
            ihl = (data[0] & 0x0F) * 4
            s.sendto(data[ihl:], (src, 0))
            print(socks[s], src, flush=True)


def ask(src, dst, protos):
    for proto in protos:
        s = raw(proto)
        s.bind((src, 0))
        body = payload(proto, b"multihome-%d-%s" % (proto, src.encode()))
        s.sendto(body, (dst, 0))
        end = time.monotonic() + 3
        while time.monotonic() < end:
            ready, _, _ = select.select([s], [], [], 0.2)
            if not ready:
                continue
            data, (peer, _) = s.recvfrom(65535)
            ihl = (data[0] & 0x0F) * 4
            if peer == dst and data[ihl:] == body:
                print(proto, flush=True)
                break


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(float(sys.argv[2]), sys.argv[3], [int(p) for p in sys.argv[4:]])
    else:
        ask(sys.argv[2], sys.argv[3], [int(p) for p in sys.argv[4:]])
