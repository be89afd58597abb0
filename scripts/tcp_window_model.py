#!/usr/bin/env python3
"""A model of the replication connection's TCP on loopback (docs/benchmarks.md, "What the
clamp does"): a sender writes 115-byte messages with TCP_NODELAY, as a walsender writes its
changes; a receiver with TCP_WINDOW_CLAMP set before connecting sleeps, then drains its
socket, as the engine naps and reads. Prints the sender's rate, TCP segments per 1,000
messages (whole machine, /proc/net/snmp), bytes per read, and the receiving socket's clamp,
rcv_mss and window scale at the end.

usage: tcp_window_model.py CLAMP SLEEP_MS SPIN [RECLAMP]
  CLAMP    TCP_WINDOW_CLAMP before connecting (0: none)
  SLEEP_MS the receiver's sleep before each drain
  SPIN     busy iterations after each message (slows the sender)
  RECLAMP  set TCP_WINDOW_CLAMP to this after each drain (0: never)
"""
import multiprocessing as mp
import os
import socket
import struct
import sys
import time

TCP_WINDOW_CLAMP = 10
SECONDS = 2.0


def out_segments():
    lines = open("/proc/net/snmp").read().split("\n")
    for i, line in enumerate(lines):
        if line.startswith("Tcp:") and "OutSegs" in line:
            return int(lines[i + 1].split()[line.split().index("OutSegs")])
    raise SystemExit("no Tcp OutSegs in /proc/net/snmp")


def sender(listener, spin):
    conn, _ = listener.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    msg = b"x" * 115
    end = time.time() + SECONDS
    while time.time() < end:
        for _ in range(100):
            conn.send(msg)
            for _ in range(spin):
                pass
    conn.close()


def main():
    if len(sys.argv) < 4:
        raise SystemExit(__doc__)
    clamp, sleep_ms, spin = int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
    reclamp = int(sys.argv[4]) if len(sys.argv) > 4 else 0
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    port = listener.getsockname()[1]
    p = mp.Process(target=sender, args=(listener, spin))
    p.start()
    r = socket.socket()
    if clamp:
        r.setsockopt(socket.IPPROTO_TCP, TCP_WINDOW_CLAMP, clamp)
    r.connect(("127.0.0.1", port))
    r.setblocking(False)
    segs0, t0, total, reads = out_segments(), time.time(), 0, 0
    deadline = t0 + SECONDS + 30
    done = False
    while not done and time.time() < deadline:
        time.sleep(sleep_ms / 1000)
        while True:
            try:
                b = r.recv(1 << 20)
            except BlockingIOError:
                break
            if not b:
                done = True
                break
            total += len(b)
            reads += 1
        if reclamp and not done:
            r.setsockopt(socket.IPPROTO_TCP, TCP_WINDOW_CLAMP, reclamp)
    dt = time.time() - t0
    segs = out_segments() - segs0
    info = r.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
    rcv_mss = struct.unpack_from("I", info, 20)[0]
    rcv_wscale = info[6] >> 4
    wc = r.getsockopt(socket.IPPROTO_TCP, TCP_WINDOW_CLAMP)
    msgs = max(total / 115, 1)
    print(
        f"clamp={clamp} sleep={sleep_ms}ms spin={spin} reclamp={reclamp}: "
        f"{msgs / dt / 1e3:.0f}k messages/s, {segs / msgs * 1000:.1f} segments per 1,000 messages, "
        f"{total / max(reads, 1):.0f} bytes a read{'' if done else ', sender not finished after 30 s'}; "
        f"at the end window_clamp={wc} rcv_mss={rcv_mss} rcv_wscale={rcv_wscale}"
    )
    p.terminate()
    p.join()


if __name__ == "__main__":
    main()
