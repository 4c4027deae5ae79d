// SPDX-License-Identifier: GPL-2.0
/*
 * natedit's kernel datapath: enhanced GRE (PPTP) of established calls,
 * translated and forwarded at tc ingress (clsact, cls_bpf direct-action).
 *
 * One program, attached to the inside and the outside interfaces; one set of
 * maps, pinned by the worker (natedit/kernel/loader.py) and kept equal to its
 * call table (natedit/fastpath.py):
 *
 *   natedit_in   (public address, server, public Call ID) -> client, client Call ID
 *   natedit_out  (client, server, server Call ID)         -> public address
 *
 * A GRE packet is looked up in natedit_in by (destination, source, Call ID):
 * found, it is inbound GRE of a call on that public address (one gateway may
 * have several); else in natedit_out by (source, destination, Call ID). A
 * packet found gets its address (and, inbound, its Call ID)
 * rewritten with an incremental IP header checksum (PPTP's GRE has none), its
 * TTL decremented, the call's packet and byte counters raised, and is sent
 * out of the interface the routing table names (bpf_fib_lookup, bpf_redirect).
 * Anything else goes on unchanged (TC_ACT_UNSPEC: to the next tc filter if
 * any, then the IP stack and natedit's queue rules, which stay the
 * authority): not IPv4, IP options, a fragment, TTL <= 1, not enhanced GRE
 * v1, a key in no map, no route or no neighbour, larger than the egress MTU.
 *
 * Built from this source on the target (clang -target bpf), never shipped
 * as a binary.
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#define MAX_CALLS 65536
#define AF_INET 2
#define GRE_FLAGS_MASK 0xe007 /* C R K ... Ver: what must be exactly ... */
#define GRE_FLAGS_PPTP 0x2001 /* C=0 R=0 K=1, version 1 (S, A free) */
#define GRE_PROTO_PPP 0x880b
#define NOT_OURS TC_ACT_UNSPEC

struct in_key {
	__be32 public_addr;
	__be32 server;
	__be16 call_id;
	__u16 pad;
};

struct out_key {
	__be32 client;
	__be32 server;
	__be16 call_id;
	__u16 pad;
};

struct route {
	__be32 addr;     /* inbound: the client; outbound: the public address */
	__be16 call_id;  /* inbound: the client's Call ID; outbound: unchanged */
	__u16 pad;
	__u64 packets;
	__u64 bytes;     /* IP length */
};

struct gre_hdr {
	__be16 flags;
	__be16 proto;
	__be16 length;
	__be16 call_id;
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_CALLS);
	__type(key, struct in_key);
	__type(value, struct route);
} natedit_in SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_CALLS);
	__type(key, struct out_key);
	__type(value, struct route);
} natedit_out SEC(".maps");

/* RFC 1624: the checksum after one 32-bit word changed from old to new. */
static __always_inline __u16 csum_replace4(__u16 check, __be32 old, __be32 new)
{
	__u32 sum = (__u16)~check;

	sum += (__u16)~(old & 0xffff);
	sum += (__u16)~(old >> 16);
	sum += (new & 0xffff);
	sum += (new >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	return (__u16)~sum;
}

SEC("tc")
int natedit_gre(struct __sk_buff *skb)
{
	const __u32 headers = sizeof(struct ethhdr) + sizeof(struct iphdr) + sizeof(struct gre_hdr);
	struct bpf_fib_lookup fib = {};
	struct route *route;
	__be32 saddr, daddr;
	__u16 tot_len;
	int rc;

	if (skb->protocol != bpf_htons(ETH_P_IP))
		return NOT_OURS;
	/* skbs from veth and packet sockets are often non-linear: headers first */
	if (skb->len < headers || bpf_skb_pull_data(skb, headers) < 0)
		return NOT_OURS;

	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct iphdr *ip = (void *)(eth + 1);
	struct gre_hdr *gre = (void *)(ip + 1);

	if ((void *)(gre + 1) > data_end)
		return NOT_OURS;
	if (eth->h_proto != bpf_htons(ETH_P_IP) || ip->version != 4 || ip->ihl != 5)
		return NOT_OURS;
	if (ip->protocol != IPPROTO_GRE || (ip->frag_off & bpf_htons(0x3fff)) || ip->ttl <= 1)
		return NOT_OURS;
	if ((gre->flags & bpf_htons(GRE_FLAGS_MASK)) != bpf_htons(GRE_FLAGS_PPTP) ||
	    gre->proto != bpf_htons(GRE_PROTO_PPP))
		return NOT_OURS;
	saddr = ip->saddr;
	daddr = ip->daddr;
	{
		struct in_key key = { .public_addr = daddr, .server = saddr, .call_id = gre->call_id };

		route = bpf_map_lookup_elem(&natedit_in, &key);
	}
	if (route) {
		daddr = route->addr;
	} else {
		struct out_key key = { .client = saddr, .server = daddr, .call_id = gre->call_id };

		route = bpf_map_lookup_elem(&natedit_out, &key);
		if (!route)
			return NOT_OURS;
		saddr = route->addr;
	}

	tot_len = bpf_ntohs(ip->tot_len);
	fib.family = AF_INET;
	fib.tos = ip->tos;
	fib.l4_protocol = IPPROTO_GRE;
	fib.tot_len = tot_len; /* checked against the egress MTU: FRAG_NEEDED */
	fib.ipv4_src = saddr;
	fib.ipv4_dst = daddr;
	fib.ifindex = skb->ingress_ifindex;
	rc = bpf_fib_lookup(skb, &fib, sizeof(fib), 0);
	if (rc != BPF_FIB_LKUP_RET_SUCCESS)
		return NOT_OURS; /* no route, no neighbour, too big, forwarding off ... */

	if (ip->saddr != saddr) {
		ip->check = csum_replace4(ip->check, ip->saddr, saddr);
		ip->saddr = saddr;
	}
	if (ip->daddr != daddr) {
		ip->check = csum_replace4(ip->check, ip->daddr, daddr);
		ip->daddr = daddr;
		gre->call_id = route->call_id;
	}
	/* TTL: the high byte of its 16-bit word, as ip_decrease_ttl() does */
	{
		__u32 check = ip->check;

		check += bpf_htons(0x0100);
		ip->check = (__u16)(check + (check >= 0xFFFF));
		ip->ttl--;
	}
	__builtin_memcpy(eth->h_dest, fib.dmac, ETH_ALEN);
	__builtin_memcpy(eth->h_source, fib.smac, ETH_ALEN);
	__sync_fetch_and_add(&route->packets, 1);
	__sync_fetch_and_add(&route->bytes, tot_len);
	return bpf_redirect(fib.ifindex, 0);
}

char LICENSE[] SEC("license") = "GPL";
