"""A throw-away PPTP gateway in network namespaces, with real peers.

``natedit lab`` (:mod:`natedit.lab.demo`) and the real-peer tests build the
same thing, one room per concern: :mod:`~natedit.lab.netns` (the one namespace
builder: a topology as data, namespaces named with a per-run prefix, removed
whole), :mod:`~natedit.lab.procs` (the process supervisor: start, log, stop by
PID), :mod:`~natedit.lab.mounts` (private /dev and /run for the peers, the
Call ID FIFO, the syslog sink), :mod:`~natedit.lab.gateway` (masquerade only,
the kernel helper, natedit's worker), :mod:`~natedit.lab.topology` (the lab
itself: N clients behind a gateway, one server), :mod:`~natedit.lab.peers`
(Debian's ``pptpd`` with an echo stand-in for pppd, ``pptp-linux`` clients,
optionally forced onto one Call ID), :mod:`~natedit.lab.hdlc` (the
async-HDLC framing both speak to their local PPP side) and
:mod:`~natedit.lab.pump` (unique frames per call, echoes classified as own or
foreign) and :mod:`~natedit.lab.coexist` (other PPTP on and through the gateway:
outside clients behind an Internet router, a remote NAT, an inside server published
by a port forward). ``bench/`` and ``tests/scratch_ns.py`` build their namespaces with
:mod:`~natedit.lab.netns` too.
"""
