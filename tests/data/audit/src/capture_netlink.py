"""Write every datagram of the audit multicast group to a file until SIGTERM or SIGINT.

Each datagram is stored as a 4-byte little-endian length and the datagram
as received (netlink messages with their headers). Usage:
capture_netlink.py OUTPUT
"""

import signal
import socket
import struct
import sys

NETLINK_AUDIT = 9
SO_RCVBUFFORCE = 33

stopping = False


def stop(signum, frame):
    global stopping
    stopping = True


signal.signal(signal.SIGTERM, stop)
signal.signal(signal.SIGINT, stop)
sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_AUDIT)
sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 64 << 20)
sock.bind((0, 1))
sock.settimeout(0.2)
with open(sys.argv[1], "wb") as output:
    print("capturing", flush=True)
    while not stopping:
        try:
            data = sock.recv(65536)
        except (TimeoutError, InterruptedError):
            continue
        output.write(struct.pack("<I", len(data)) + data)
