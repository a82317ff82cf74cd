/*
 * inbound.c - the inbound port rewrite of CNI mode, on a pod's veth pair, in
 * either of two hooks (--inbound-hook): tc (cls_bpf, direct action, clsact;
 * the default) or XDP. One source, so both hooks run the same flow logic
 * (bcc rewrites map calls only in the main file, so it cannot live in a
 * header).
 *
 * Why: iptables' ISTIO_INBOUND REDIRECTs every inbound TCP connection to the
 * sidecar's inbound port. The cgroup connect hooks only see connects made on
 * this node; a connection from another node never calls connect() here, so
 * its packets are NATed here instead:
 *   to the pod:   client:c -> pod:X          becomes client:c -> pod:MB_IN_PORT
 *   from the pod: pod:MB_IN_PORT -> client:c becomes pod:X -> client:c
 *
 * Attach points (by the daemon when a pod is enrolled, daemon/netns.py):
 *   tc:  mb_tc_to_pod    clsact egress of the pod's host-side veth peer
 *        mb_tc_from_pod  clsact ingress of that peer (what the pod sends)
 *   XDP: mb_xdp_ingress  the pod's interface (CNI_IFNAME, in the pod netns)
 *        mb_xdp_egress   its host-side veth peer (XDP runs on receive only,
 *                        and the peer "receives" what the pod sends)
 *
 * Checksums: only ports change, so IPv4's header checksum and IPv6's pseudo
 * header are untouched. tc patches the TCP checksum with
 * bpf_l4_csum_replace, which leaves a CHECKSUM_PARTIAL packet's
 * pseudo-header seed alone (as it must for a port): the pod keeps tx checksum
 * offload and with it TSO/GSO, and a GSO super-packet is rewritten once. XDP
 * sees no skb and patches with RFC 1624 by hand, which is only right for a
 * finished checksum, so with XDP the daemon turns tx checksum offload off on
 * the pod interface (which also turns off TSO) unless --hardware-checksum.
 *
 * Flow state, key {client, pod, c, MB_IN_PORT} (the reversed tuple of the
 * socket the sidecar accepts, so getsockopt(SO_ORIGINAL_DST) finds it):
 *
 *   SYN to a captured port        -> mb_in_pending, HALF_OPEN (LRU of its own)
 *   the pod's SYN-ACK             -> arms it: ack = SYN-ACK seq + 1
 *   the client's ACK == ack       -> mb_pair_orig_dst, flag XDP (BPF_NOEXIST:
 *                                    a connect/sockops entry is never replaced)
 *   the pod's socket closes       -> sockops deletes it (TIME_WAIT: moves it
 *                                    back to mb_in_pending, CLOSING, so the
 *                                    last ACKs still get their port)
 *   the pod sends a RST           -> deleted
 *
 * A spoofed SYN costs one entry of mb_in_pending and cannot complete the
 * handshake without seeing the pod's SYN-ACK, so a SYN flood only evicts
 * other pending flows: established flows live in mb_pair_orig_dst until their
 * socket closes.
 *
 * Maps: reads mb_local_pods (the destination pod's inbound policy); reads and
 * writes mb_in_pending and mb_pair_orig_dst (entries carry MB_ORIGIN_F_XDP,
 * whichever hook wrote them; entries without it belong to sockops and are
 * never touched here); counts in mb_counters.
 *
 * Packets we cannot parse (VLAN tags, IPv4 fragments, IPv6 extension headers,
 * truncated headers) pass untouched.
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/pkt_cls.h>
#include <linux/stddef.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/in.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/ipv6.h>
#include <uapi/linux/tcp.h>

#include "helpers.h"
#include "maps.h"

/* Counters (mb_count) are per flow event only: a per-packet counter would
 * cost a lookup per packet. */

/* A TCP segment's addresses (16-byte, IPv4-mapped for IPv4). */
struct mb_in_pkt {
	struct mb_addr saddr;
	struct mb_addr daddr;
};

/* Fill pkt from the Ethernet frame in [data, data_end) and return the TCP
 * header's offset, or -1 for "not ours, pass". The caller re-derives the
 * header pointer from the offset (mb_in_tcp): a packet pointer kept in a
 * struct loses the verifier's range information. */
static __always_inline int mb_in_parse(void *data, void *data_end, struct mb_in_pkt *pkt)
{
	struct ethhdr *eth = data;
	int off;

	if ((void *)(eth + 1) > data_end)
		return -1;
	if (eth->h_proto == bpf_htons(ETH_P_IP)) {
		struct iphdr *ip = (void *)(eth + 1);
		__u32 ihl;

		if ((void *)(ip + 1) > data_end)
			return -1;
		/* fragments: only the first carries the ports; leave them all */
		if (ip->protocol != IPPROTO_TCP || (ip->frag_off & bpf_htons(0x3fff)))
			return -1;
		ihl = ip->ihl * 4;
		if (ihl < sizeof(*ip))
			return -1;
		off = sizeof(*eth) + ihl;
		pkt->saddr.ip[2] = bpf_htonl(0xffff);
		pkt->saddr.ip[3] = ip->saddr;
		pkt->daddr.ip[2] = bpf_htonl(0xffff);
		pkt->daddr.ip[3] = ip->daddr;
	} else if (eth->h_proto == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr *ip6 = (void *)(eth + 1);

		if ((void *)(ip6 + 1) > data_end)
			return -1;
		if (ip6->nexthdr != IPPROTO_TCP)
			return -1;
		off = sizeof(*eth) + sizeof(*ip6);
		__builtin_memcpy(&pkt->saddr, &ip6->saddr, 16);
		__builtin_memcpy(&pkt->daddr, &ip6->daddr, 16);
	} else {
		return -1;
	}
	return off;
}

/* The TCP header at off, or NULL if it is not all inside the packet. */
static __always_inline struct tcphdr *mb_in_tcp(void *data, void *data_end, int off)
{
	struct tcphdr *tcp;

	if (off < 0 || off > 128)
		return NULL;
	tcp = data + off;
	if ((void *)(tcp + 1) > data_end)
		return NULL;
	return tcp;
}

/* mb_pair_orig_dst / mb_in_pending key of the flow client:c -> pod:MB_IN_PORT. */
static __always_inline void mb_in_key(struct mb_pair *key, const struct mb_addr *client,
				      const struct mb_addr *pod, __u16 client_port)
{
	key->sip = *client;
	key->dip = *pod;
	key->sport = client_port;
	key->dport = bpf_htons(MB_IN_PORT);
}

/* The client's ACK completed the handshake of a half-open flow: record it
 * where getsockopt and the established path look. Never over an entry of
 * the connect/sockops path (no XDP flag): a spoofed handshake on a local
 * connection's tuple must not change that connection. */
static __always_inline void mb_in_establish(struct mb_pair *key, const struct mb_addr *pod,
					    __u16 port)
{
	struct mb_origin orig = {};
	struct mb_origin *old;

	orig.addr = *pod;
	orig.port = port;
	orig.flags = MB_ORIGIN_F_XDP;
	if (mb_pair_orig_dst.insert(key, &orig)) {
		old = mb_pair_orig_dst.lookup(key);
		if (!old || !(old->flags & MB_ORIGIN_F_XDP)) {
			mb_count(MB_C_IN_CONFLICT);
			return;
		}
		/* an older inbound flow on a reused tuple */
		old->port = port;
		old->addr = *pod;
	}
	mb_in_pending.delete(key);
	mb_count(MB_C_IN_ESTABLISHED);
}

/* A packet towards a pod (client:c -> pod:X). Returns the destination port
 * to write (network order), or 0 to leave the packet alone. */
static __always_inline __u16 mb_in_to_pod(const struct mb_in_pkt *pkt, const struct tcphdr *tcp)
{
	struct mb_pair key = {};
	struct mb_origin *o;
	struct mb_in_flow *f;

	mb_in_key(&key, &pkt->saddr, &pkt->daddr, tcp->source);
	if (tcp->dest == bpf_htons(MB_IN_PORT)) {
		/* a same-node sidecar's connect that connect4/6 rewrote: its
		 * record is sockops' business. Its SYN also clears a pending
		 * flow someone spoofed on that tuple, so the pod's SYN-ACK is
		 * not rewritten for it. */
		if (tcp->syn && !tcp->ack)
			mb_in_pending.delete(&key);
		return 0;
	}
	if (tcp->syn && !tcp->ack) {
		struct mb_pod_config *cfg = mb_local_pods.lookup((struct mb_addr *)&pkt->daddr);
		struct mb_in_flow nf = {};

		if (!cfg)
			return 0;
		if (tcp->dest == bpf_htons(MB_OUT_PORT) ||
		    !mb_policy_in(cfg, bpf_ntohs(tcp->dest))) {
			mb_count(MB_C_XDP_BYPASS_POLICY);
			return 0;
		}
		/* a SYN never touches mb_pair_orig_dst; BPF_ANY here: a new
		 * SYN on a reused tuple starts a fresh handshake */
		nf.port = tcp->dest;
		nf.flags = MB_IN_F_HALF_OPEN;
		if (mb_in_pending.update(&key, &nf)) {
			mb_count(MB_C_XDP_FLOW_FAIL);
			return 0;
		}
		mb_count(MB_C_XDP_NEW_FLOW);
		return bpf_htons(MB_IN_PORT);
	}
	o = mb_pair_orig_dst.lookup(&key);
	if (o) {
		if (!(o->flags & MB_ORIGIN_F_XDP))
			return 0;
		/* a client may use one source port towards two ports of the
		 * pod at once; only one can be redirected */
		if (o->port == tcp->dest)
			return bpf_htons(MB_IN_PORT);
	}
	f = mb_in_pending.lookup(&key);
	if (!f || f->port != tcp->dest)
		return 0;
	if ((f->flags & MB_IN_F_HALF_OPEN) && f->ack && tcp->ack && !tcp->syn && !tcp->rst &&
	    tcp->ack_seq == f->ack)
		mb_in_establish(&key, &pkt->daddr, f->port);
	return bpf_htons(MB_IN_PORT);
}

/* A packet from a pod (pod:MB_IN_PORT -> client:c). Returns the source port
 * to write (network order), or 0 to leave the packet alone. */
static __always_inline __u16 mb_in_from_pod(const struct mb_in_pkt *pkt, const struct tcphdr *tcp)
{
	struct mb_pair key = {};
	struct mb_origin *o;
	struct mb_in_flow *f;
	__u16 port;

	if (tcp->source != bpf_htons(MB_IN_PORT))
		return 0;
	/* the reply's reversed tuple is the key the way in wrote */
	mb_in_key(&key, &pkt->daddr, &pkt->saddr, tcp->dest);
	if (!tcp->syn) {
		o = mb_pair_orig_dst.lookup(&key);
		if (o) {
			if (!(o->flags & MB_ORIGIN_F_XDP))
				return 0;
			port = o->port;
			/* The pod's RST means its socket is gone. A received
			 * RST is not trusted for this (an out-of-window one is
			 * answered with a challenge ACK). */
			if (tcp->rst) {
				mb_pair_orig_dst.delete(&key);
				mb_count(MB_C_XDP_RST_DELETE);
			}
			return port;
		}
	}
	f = mb_in_pending.lookup(&key);
	if (!f)
		return 0;
	port = f->port;
	if (tcp->syn && tcp->ack && (f->flags & MB_IN_F_HALF_OPEN))
		f->ack = bpf_htonl(bpf_ntohl(tcp->seq) + 1);
	if (tcp->rst) {
		mb_in_pending.delete(&key);
		mb_count(MB_C_XDP_RST_DELETE);
	}
	return port;
}

/* ==== XDP ================================================================ */

/*
 * Replace one 16-bit word covered by the TCP checksum, RFC 1624 eqn. 3:
 * HC' = ~(~HC + ~m + m'). Works on the words as stored (network order) since
 * one's complement sums are byte-order independent. Not called
 * csum_replace2: that name belongs to the kernel headers.
 */
static __always_inline void mb_xdp_set_port(__u16 *check, __u16 *field, __u16 val)
{
	__u32 sum = (__u16)(~*check);

	sum += (__u16)(~*field);
	sum += val;
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	*check = ~(__u16)sum;
	*field = val;
}

/* Both directions: ingress (to the pod) is a constant per program. */
static __always_inline int mb_xdp_rewrite(struct xdp_md *ctx, const int ingress)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct mb_in_pkt pkt = {};
	struct tcphdr *tcp;
	__u16 port;

	tcp = mb_in_tcp(data, data_end, mb_in_parse(data, data_end, &pkt));
	if (!tcp)
		return XDP_PASS;
	port = ingress ? mb_in_to_pod(&pkt, tcp) : mb_in_from_pod(&pkt, tcp);
	if (port)
		mb_xdp_set_port(&tcp->check, ingress ? &tcp->dest : &tcp->source, port);
	return XDP_PASS;
}

int mb_xdp_ingress(struct xdp_md *ctx)
{
	return mb_xdp_rewrite(ctx, 1);
}

int mb_xdp_egress(struct xdp_md *ctx)
{
	return mb_xdp_rewrite(ctx, 0);
}

/* ==== tc ================================================================= */

/* Headers as far as the TCP header's end (IPv6 + TCP without options). */
#define MB_TC_HEADERS (sizeof(struct ethhdr) + sizeof(struct ipv6hdr) + sizeof(struct tcphdr))

/* The TCP header's offset and the addresses, pulling the headers into the
 * linear area if the skb does not have them there yet. */
static __always_inline int mb_tc_parse(struct __sk_buff *skb, struct mb_in_pkt *pkt)
{
	int off = mb_in_parse((void *)(long)skb->data, (void *)(long)skb->data_end, pkt);

	if (off >= 0 && mb_in_tcp((void *)(long)skb->data, (void *)(long)skb->data_end, off))
		return off;
	if (skb->protocol != bpf_htons(ETH_P_IP) && skb->protocol != bpf_htons(ETH_P_IPV6))
		return -1;
	if (skb->len < sizeof(struct ethhdr) + sizeof(struct iphdr) + sizeof(struct tcphdr))
		return -1;
	if (bpf_skb_pull_data(skb, skb->len < MB_TC_HEADERS ? skb->len : MB_TC_HEADERS))
		return -1;
	return mb_in_parse((void *)(long)skb->data, (void *)(long)skb->data_end, pkt);
}

/* Write a port at off (network order) and fix the TCP checksum; for a
 * CHECKSUM_PARTIAL skb the helper leaves the seed alone, as it must. */
static __always_inline void mb_tc_set_port(struct __sk_buff *skb, int off, int field, __u16 old,
					   __u16 val)
{
	bpf_l4_csum_replace(skb, off + offsetof(struct tcphdr, check), old, val, sizeof(val));
	bpf_skb_store_bytes(skb, off + field, &val, sizeof(val), 0);
}

/* Both directions: to_pod is a constant, so each program keeps one branch. */
static __always_inline int mb_tc_rewrite(struct __sk_buff *skb, const int to_pod)
{
	struct mb_in_pkt pkt = {};
	struct tcphdr *tcp;
	__u16 port, old;
	int off;

	off = mb_tc_parse(skb, &pkt);
	tcp = mb_in_tcp((void *)(long)skb->data, (void *)(long)skb->data_end, off);
	if (!tcp)
		return TC_ACT_OK;
	old = to_pod ? tcp->dest : tcp->source;
	port = to_pod ? mb_in_to_pod(&pkt, tcp) : mb_in_from_pod(&pkt, tcp);
	if (port)
		mb_tc_set_port(skb, off,
			       to_pod ? offsetof(struct tcphdr, dest)
				      : offsetof(struct tcphdr, source),
			       old, port);
	return TC_ACT_OK;
}

int mb_tc_to_pod(struct __sk_buff *skb)
{
	return mb_tc_rewrite(skb, 1);
}

int mb_tc_from_pod(struct __sk_buff *skb)
{
	return mb_tc_rewrite(skb, 0);
}
