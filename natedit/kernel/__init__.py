"""The tc-BPF kernel datapath: its program (gre.bpf.c), libbpf bindings (libbpf),
and building, loading, attaching and removing it (loader)."""
