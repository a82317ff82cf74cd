/*
 * xdp.c - XDP on a CNI-mode pod's veth pair: inbound port rewrite.
 *
 * Attach points (both XDP, attached by the daemon when a pod is enrolled):
 *   mb_xdp_ingress  the pod's interface (CNI_IFNAME, inside the pod netns).
 *                   Sees packets arriving at the pod from other nodes (and
 *                   from the node itself).
 *   mb_xdp_egress   the host-side veth peer of that interface. XDP only runs
 *                   on receive, and the peer "receives" what the pod sends, so
 *                   this is where the pod's replies can be rewritten back.
 *
 * Why: iptables' ISTIO_INBOUND REDIRECTs every inbound TCP connection to the
 * sidecar's inbound port. The cgroup connect hooks only see connects made on
 * this node; a connection from another node never calls connect() here, so
 * its packets are NATed here instead:
 *   ingress: client:c -> pod:X  becomes  client:c -> pod:MB_IN_PORT
 *   egress:  pod:MB_IN_PORT -> client:c  becomes  pod:X -> client:c
 * and the original destination pod:X is recorded in mb_pair_orig_dst under
 * {client, pod, c, MB_IN_PORT}, which is exactly the reversed tuple of the
 * socket the sidecar accepts, so cgroup/getsockopt(SO_ORIGINAL_DST) answers
 * pod:X for it.
 *
 * Maps: reads mb_local_pods (the destination pod's inbound policy); reads and
 * writes mb_pair_orig_dst (entries carry MB_ORIGIN_F_XDP; entries without it
 * belong to sockops and are never touched here); counts in mb_counters.
 *
 * Checksums: ports are patched with RFC 1624 incremental updates. That is only
 * right when the TCP checksum field holds a complete checksum, so the daemon
 * turns tx checksum offload off on the pod interface (a CHECKSUM_PARTIAL
 * packet carries only the pseudo-header seed, which must NOT change with the
 * ports). Only ports change, so IPv4's header checksum and IPv6's pseudo
 * header are untouched.
 *
 * Packets we cannot parse (VLAN tags, IPv4 fragments, IPv6 extension headers,
 * truncated headers) pass untouched.
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/in.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/ipv6.h>
#include <uapi/linux/tcp.h>

#include "helpers.h"
#include "maps.h"

/* Per-flow events only: a per-packet counter would cost a lookup per packet. */
static __always_inline void mb_xdp_count(__u32 idx)
{
    __u64 *v = mb_counters.lookup(&idx);

    if (v)
        *v += 1;  /* per-CPU slot */
}

/* A TCP segment's addresses (16-byte, IPv4-mapped for IPv4). */
struct mb_xdp_pkt {
    struct mb_addr saddr;
    struct mb_addr daddr;
};

/*
 * Fill pkt from an Ethernet frame and return the TCP header's offset, or -1
 * for "not ours, pass". The caller re-derives the header pointer from the
 * offset and checks it against data_end itself: a packet pointer kept in a
 * struct loses the verifier's range information.
 */
static __always_inline int mb_xdp_parse(struct xdp_md *ctx, struct mb_xdp_pkt *pkt)
{
    void *data = (void *)(long)ctx->data;
    void *data_end = (void *)(long)ctx->data_end;
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
static __always_inline struct tcphdr *mb_xdp_tcp(struct xdp_md *ctx, int off)
{
    void *data = (void *)(long)ctx->data;
    void *data_end = (void *)(long)ctx->data_end;
    struct tcphdr *tcp;

    if (off < 0 || off > 128)
        return NULL;
    tcp = data + off;
    if ((void *)(tcp + 1) > data_end)
        return NULL;
    return tcp;
}

/*
 * Replace one 16-bit word covered by the TCP checksum, RFC 1624 eqn. 3:
 * HC' = ~(~HC + ~m + m'). Works on the words as stored (network order) since
 * one's complement sums are byte-order independent. Not called
 * csum_replace2: that name belongs to the kernel headers.
 */
static __always_inline void mb_xdp_set_port(__u16 *check, __u16 *field, __u16 val)
{
    __u32 sum = (__u16)~*check;

    sum += (__u16)~*field;
    sum += val;
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    *check = ~(__u16)sum;
    *field = val;
}

/*
 * Would istio-iptables' ISTIO_INBOUND redirect a connection to this port?
 * Never the sidecar's own listeners; otherwise the pod's inbound policy,
 * helpers.h mb_policy_in (the same code connect4/6 use for a proxy's connect
 * to a local pod).
 */
static __always_inline int mb_xdp_captured(const struct mb_pod_config *pc, __u16 port)
{
    if (port == MB_IN_PORT || port == MB_OUT_PORT)
        return 0;
    return mb_policy_in(pc, port);
}

/* mb_pair_orig_dst key of the flow client:c -> pod:MB_IN_PORT. */
static __always_inline void mb_xdp_key(struct mb_pair *key, const struct mb_addr *client,
                                       const struct mb_addr *pod, __u16 client_port)
{
    key->sip = *client;
    key->dip = *pod;
    key->sport = client_port;
    key->dport = bpf_htons(MB_IN_PORT);
}

int mb_xdp_ingress(struct xdp_md *ctx)
{
    struct mb_xdp_pkt pkt = {};
    struct mb_pair key = {};
    struct tcphdr *tcp;

    tcp = mb_xdp_tcp(ctx, mb_xdp_parse(ctx, &pkt));
    if (!tcp)
        return XDP_PASS;
    /* already at the inbound port: a same-node sidecar's connect that
     * connect4/6 rewrote; its record is sockops' business */
    if (tcp->dest == bpf_htons(MB_IN_PORT))
        return XDP_PASS;
    mb_xdp_key(&key, &pkt.saddr, &pkt.daddr, tcp->source);

    if (tcp->syn && !tcp->ack) {
        struct mb_pod_config *cfg = mb_local_pods.lookup(&pkt.daddr);
        struct mb_origin orig = {};

        if (!cfg)
            return XDP_PASS;
        if (!mb_xdp_captured(cfg, bpf_ntohs(tcp->dest))) {
            mb_xdp_count(MB_C_XDP_BYPASS_POLICY);
            return XDP_PASS;
        }
        orig.addr = pkt.daddr;
        orig.port = tcp->dest;
        orig.flags = MB_ORIGIN_F_XDP;
        /* BPF_ANY: a new SYN on a reused tuple replaces the stale flow */
        if (mb_pair_orig_dst.update(&key, &orig)) {
            mb_xdp_count(MB_C_XDP_FLOW_FAIL);
            return XDP_PASS;
        }
        mb_xdp_count(MB_C_XDP_NEW_FLOW);
    } else {
        struct mb_origin *orig = mb_pair_orig_dst.lookup(&key);

        /* also require the port to match: a client may use one source port
         * towards two ports of the pod at once; only one can be redirected */
        if (!orig || !(orig->flags & MB_ORIGIN_F_XDP) || orig->port != tcp->dest)
            return XDP_PASS;
    }
    mb_xdp_set_port(&tcp->check, &tcp->dest, bpf_htons(MB_IN_PORT));
    return XDP_PASS;
}

int mb_xdp_egress(struct xdp_md *ctx)
{
    struct mb_xdp_pkt pkt = {};
    struct mb_origin *orig;
    struct mb_pair key = {};
    struct tcphdr *tcp;

    tcp = mb_xdp_tcp(ctx, mb_xdp_parse(ctx, &pkt));
    if (!tcp)
        return XDP_PASS;
    if (tcp->source != bpf_htons(MB_IN_PORT))
        return XDP_PASS;
    /* the reply's reversed tuple is the key the ingress side wrote */
    mb_xdp_key(&key, &pkt.daddr, &pkt.saddr, tcp->dest);
    orig = mb_pair_orig_dst.lookup(&key);
    if (!orig || !(orig->flags & MB_ORIGIN_F_XDP))
        return XDP_PASS;
    mb_xdp_set_port(&tcp->check, &tcp->source, orig->port);
    /*
     * Cleanup. A RST from the pod means its socket is gone: forget the flow.
     * A received RST is not trusted for this (an out-of-window one is answered
     * with a challenge ACK and the connection lives on). FIN never deletes:
     * the peer's last ACK and any retransmitted FIN still need the mapping;
     * closed flows age out of the LRU or are replaced by the next SYN.
     */
    if (tcp->rst) {
        mb_pair_orig_dst.delete(&key);
        mb_xdp_count(MB_C_XDP_RST_DELETE);
    }
    return XDP_PASS;
}
