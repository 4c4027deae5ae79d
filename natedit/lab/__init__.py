"""A throw-away PPTP gateway in network namespaces, with real peers.

``natedit lab`` (:mod:`natedit.lab.demo`) and the real-peer tests build the
same thing: :mod:`~natedit.lab.topology` (N client namespaces behind a
gateway namespace, a server namespace, everything named with a per-run
prefix and removed on exit), :mod:`~natedit.lab.peers` (Debian's ``pptpd``
with an echo stand-in for pppd, ``pptp-linux`` clients, optionally forced
onto one Call ID), :mod:`~natedit.lab.hdlc` (the async-HDLC framing both
speak to their local PPP side) and :mod:`~natedit.lab.pump` (unique frames
per call, echoes classified as own or foreign).
"""
