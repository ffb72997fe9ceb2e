"""Ping with a chosen ICMP echo identifier through a ping socket.

  ping_id.py SRC DST ID COUNT INTERVAL_S
      send COUNT echo requests from SRC to DST with identifier ID (a
      SOCK_DGRAM ICMP socket bound to port ID; needs
      net.ipv4.ping_group_range), then print how many distinct ones were
      answered
"""
import socket
import struct
import sys
import time

src, dst, ident, count, interval = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_ICMP)
s.bind((src, ident))
s.settimeout(0.05)
answered = set()
end = time.monotonic() + count * interval + 2
seq = 0
next_send = time.monotonic()
while time.monotonic() < end:
    if seq < count and time.monotonic() >= next_send:
        s.sendto(struct.pack("!BBHHH", 8, 0, 0, ident, seq) + b"multihome-ping", (dst, 0))
        seq += 1
        next_send += interval
    try:
        data, _ = s.recvfrom(2048)
    except socket.timeout:
        continue
    if data[0] == 0:
        answered.add(struct.unpack("!H", data[6:8])[0])
print(len(answered))
