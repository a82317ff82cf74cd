/* merbridge.h: every struct and constant that crosses the kernel/user boundary.
 *
 * Included by every program in bpf/progs/ (compiled by bcc) and by the host
 * gcc in tests/unit/test_layout.py, which checks it against the ctypes mirrors
 * in bpf/types.py. Declare a shared struct or constant here and nowhere else
 * (ambient mode's own are in ambient.h, checked the same way).
 *
 * Conventions:
 *  - every address is 16 bytes (struct mb_addr): IPv6 as is, IPv4 as the
 *    IPv4-mapped form ::ffff:a.b.c.d, so one map serves both families;
 *  - ports in mb_pair and mb_origin are in network byte order (they come
 *    straight from sockets and packets); ports in mb_pod_config are in host
 *    byte order (they come from annotations);
 *  - configuration arrives only as -D flags built by bpf/loader.py from
 *    bpf/mesh.py; the defaults below exist so gcc can compile the header.
 */
#ifndef MERBRIDGE_H
#define MERBRIDGE_H

#include <linux/types.h>

/* ---- configuration (-D flags, see loader.Datapath.cflags) ---------------- */
#ifndef MB_OUT_PORT
#define MB_OUT_PORT 15001 /* sidecar outbound listener */
#endif
#ifndef MB_IN_PORT
#define MB_IN_PORT 15006 /* sidecar inbound listener */
#endif
#ifndef MB_PROXY_UID
#define MB_PROXY_UID 1337
#endif
#ifndef MB_PROXY_GID
#define MB_PROXY_GID 1337
#endif
#ifndef MB_MESH
#define MB_MESH 1 /* mesh.Mesh.code: istio=1 linkerd=2 kuma=3 osm=4 */
#endif
#ifndef MB_CNI_MODE
#define MB_CNI_MODE 0 /* 1: pod identity from the marker listener */
#endif
#ifndef MB_DEBUG
#define MB_DEBUG 0 /* 1: bpf_trace_printk decisions */
#endif
#ifndef MB_MARK_PORT
#define MB_MARK_PORT 39807 /* mesh.MARK_LISTENER_PORT */
#endif
#ifndef MB_HBONE_PORT
#define MB_HBONE_PORT 15008 /* never redirected (Istio ISTIO_INBOUND/OUTPUT) */
#endif
#ifndef MB_DNS_PORT
#define MB_DNS_PORT 15053 /* mesh.Mesh.dns_port: the sidecar's DNS proxy (0: none) */
#endif
#define MB_DNS_SERVER_PORT 53 /* what DNS capture takes (UDP and TCP) */

/* ---- map sizes ----------------------------------------------------------- */
#define MB_MAX_CONNS  65535 /* cookie/pair/sockhash maps */
/* local pods (one entry per pod IP: 1,000 dual-stack pods need 2,000), marks,
 * learned netns IPs */
#define MB_MAX_PODS   4096
#define MB_N_SETTINGS 16
#define MB_N_COUNTERS 32

/* ---- per-pod policy list limits (enforced with a clear error in maps.py) -- */
#define MB_MAX_PORTS 32 /* per port list */
#define MB_MAX_CIDRS 16 /* per CIDR list */

/* ---- struct mb_origin.flags ---------------------------------------------- */
#define MB_ORIGIN_F_REDIRECT 0x01 /* connect rewrote this socket: register the pair */
#define MB_ORIGIN_F_LEARN    0x02 /* legacy: learn the netns' own IP in sockops */
#define MB_ORIGIN_F_INBOUND  0x04 /* proxy -> local pod, rewritten to MB_IN_PORT */
/* written by bpf/progs/inbound.c (tc or XDP), keyed {client ip, client port, pod
 * ip, MB_IN_PORT} */
#define MB_ORIGIN_F_XDP      0x08
/* mb_sock_peer: a DNS query sent to MB_DNS_PORT (bpf/progs/dns.c) */
#define MB_ORIGIN_F_DNS      0x10

/* ---- struct mb_pod_config.flags ------------------------------------------ */
#define MB_POD_F_INCLUDE_IN_ALL  0x01 /* includeInboundPorts="*" */
#define MB_POD_F_INCLUDE_OUT_ALL 0x02 /* includeOutboundIPRanges="*" */
#define MB_POD_F_DNS_CAPTURE     0x04 /* ISTIO_META_DNS_CAPTURE: port 53 -> MB_DNS_PORT */

/* ---- mb_settings indexes (u64 values; 0 = default) ----------------------- */
/* 1: connections established from now on are not put into mb_sock_pair (no
 * sk_msg) */
#define MB_SET_SKMSG_OFF       0
/* bytes one socket may hand to its peer through sk_msg before it moves to the
 * normal path for good (0: the default; read by sockops when the connection is
 * established; docs/datapath.md) */
#define MB_SET_SKMSG_MAX_QUEUE 1
#define MB_SET_LEGACY_SEQ      2 /* legacy 127.128.x.y destination sequence */
/* netns cookie of the node (the daemon's own netns): no hook ever acts there,
 * nor in the initial netns (docs/security.md) */
#define MB_SET_NODE_NETNS      3

#define MB_SKMSG_MAX_QUEUE_DEFAULT (4u << 20) /* 4 MiB, docs/datapath.md */

/* ---- mb_counters indexes -------------------------------------------------- */
#define MB_C_REDIRECT_OUT       0 /* app connect -> outbound listener */
#define MB_C_REDIRECT_IN        1 /* proxy connect -> local pod's inbound listener */
#define MB_C_BYPASS_NOT_MESH    2
#define MB_C_BYPASS_PROXY       3 /* proxy UID or GID, not towards a local pod */
#define MB_C_BYPASS_LOOPBACK    4
#define MB_C_BYPASS_POLICY      5 /* own pod's outbound policy, or the target pod's inbound policy */
#define MB_C_BYPASS_PASSTHROUGH 6 /* source bound to 127.0.0.6 / ::6, or port 15008 */
#define MB_C_BIND_POD_IP        7 /* source bound to the pod IP */
#define MB_C_BIND_FAILED        8
#define MB_C_LEGACY_DST         9  /* 127.128.x.y destination used */
#define MB_C_PAIR_RECORDED      10 /* sockops: pair -> origin written */
#define MB_C_SOCKHASH_ADD       11
#define MB_C_SOCKHASH_FAILED    12
#define MB_C_LEARNED_IP         13 /* legacy feedback: netns IP learned */
#define MB_C_GETSOCKOPT_ANSWER  14
#define MB_C_GETSOCKOPT_MISS    15 /* SO_ORIGINAL_DST asked, no pair entry */
#define MB_C_GETSOCKOPT_LARGE   16 /* result > PAGE_SIZE passed through */
#define MB_C_MSG_REDIRECT       17
#define MB_C_MSG_PASS           18 /* no peer in the sockhash */
/* a socket's sk_msg budget ran out: normal path from now on (once per socket) */
#define MB_C_MSG_BACKPRESSURE   19
#define MB_C_PAIR_DELETED       20 /* passive socket closed: pair entry removed */
/* redirect failed (peer not in the sockhash): normal path from now on (once per
 * socket) */
#define MB_C_MSG_PEER_MISSING   21
/* SO_ORIGINAL_DST: conntrack's NAT answer kept (iptables redirected that
 * connection) */
#define MB_C_GETSOCKOPT_NAT     22
/* a DNS query (UDP datagram or TCP/UDP connect to port 53) sent to MB_DNS_PORT
 * (dns.c) */
#define MB_C_DNS_CAPTURED       23
#define MB_C_XDP_FIRST          24 /* 24..31: bpf/progs/inbound.c (tc or XDP) */
#define MB_C_XDP_NEW_FLOW       24 /* SYN redirected to MB_IN_PORT, flow recorded */
#define MB_C_XDP_BYPASS_POLICY  25 /* SYN to a local pod, its inbound policy says no */
#define MB_C_XDP_FLOW_FAIL      26 /* flow record could not be written */
#define MB_C_XDP_RST_DELETE     27 /* pod sent RST: flow forgotten */
/* handshake completed (the client's ACK acked the pod's SYN-ACK): flow moved to
 * mb_pair_orig_dst */
#define MB_C_IN_ESTABLISHED     28
/* handshake completed on a tuple that holds a connect/sockops entry: that entry
 * kept */
#define MB_C_IN_CONFLICT        29
/* the pod's socket of an inbound flow closed (sockops): flow state freed */
#define MB_C_IN_CLOSED          30

/* ---- getsockopt ---------------------------------------------------------- */
#define MB_SO_ORIGINAL_DST 80 /* SO_ORIGINAL_DST (SOL_IP) == IP6T_SO_ORIGINAL_DST (SOL_IPV6) */
#define MB_PAGE_SIZE       4096

/* A 16-byte address; words in network byte order. */
struct mb_addr {
	__u32 ip[4];
};

/* Where a connection was really going. Value of mb_cookie_orig_dst and
 * mb_pair_orig_dst. */
struct mb_origin {
	struct mb_addr addr;
	__u32 pid;   /* tgid of the connecting process (0 from XDP) */
	__u16 port;  /* network byte order */
	__u16 flags; /* MB_ORIGIN_F_* */
};

/* An inbound flow the datapath (bpf/progs/inbound.c) redirects but that is not
 * established (yet, or any more). Value of mb_in_pending, keyed like
 * mb_pair_orig_dst ({client, pod, client port, MB_IN_PORT}). */
struct mb_in_flow {
	/* half-open: the ACK number that completes the handshake (pod's SYN-ACK
	 * seq + 1, network order); 0 until the SYN-ACK is seen */
	__u32 ack;
	__u16 port;  /* the original destination port (network order) */
	__u16 flags; /* MB_IN_F_* */
};
#define MB_IN_F_HALF_OPEN 0x01 /* SYN seen, handshake not complete */
#define MB_IN_F_CLOSING   0x02 /* the pod's socket is in TIME_WAIT */

/* A TCP 4-tuple as seen from the socket that owns it (s = local, d = remote).
 * Key of mb_pair_orig_dst and mb_sock_pair. */
struct mb_pair {
	struct mb_addr sip;
	struct mb_addr dip;
	__u16 sport; /* network byte order */
	__u16 dport; /* network byte order */
};

/* A pod's addresses, one per family (all zero: the pod has none of that
 * family, or legacy mode has not learned it yet). Value of mb_mark_pod_ips
 * (CNI mode) and mb_netns_ip (legacy mode): a dual-stack pod's connects are
 * bound to its pod IP of the connection's family, so its rewritten 4-tuples
 * are unique on the node in both families. */
struct mb_pod_ips {
	struct mb_addr ip4; /* ::ffff:a.b.c.d */
	struct mb_addr ip6;
};

/* CNI mode: the daemon's record of a pod's network namespace (value of
 * mb_netns_pod, keyed by the netns cookie), written at ADD; each use looks
 * mb_mark_pod_ips[mark] up (a withdrawn mark: no pod). */
struct mb_netns_pod {
	struct mb_pod_ips ips;
	__u32 mark;
	__u32 pad;
};

struct mb_cidr {
	struct mb_addr net; /* host bits zero */
	__u8 prefixlen;     /* 0..128 over the 16-byte form (IPv4: 96 + n) */
	__u8 pad[3];
};

/* One local pod's interception policy: bpf/policy.py PodPolicy, encoded by
 * bpf/maps.py. Lists hold the first n_* entries; ports in host order. */
struct mb_pod_config {
	__u16 status_port; /* never redirected inbound (0: none) */
	__u8 flags;        /* MB_POD_F_* */
	__u8 n_include_in_ports;
	__u8 n_exclude_in_ports;
	__u8 n_include_out_ports;
	__u8 n_exclude_out_ports;
	__u8 n_include_out_cidrs;
	__u8 n_exclude_out_cidrs;
	__u8 pad[3];
	__u16 include_in_ports[MB_MAX_PORTS];
	__u16 exclude_in_ports[MB_MAX_PORTS];
	__u16 include_out_ports[MB_MAX_PORTS];
	__u16 exclude_out_ports[MB_MAX_PORTS];
	struct mb_cidr include_out_cidrs[MB_MAX_CIDRS];
	struct mb_cidr exclude_out_cidrs[MB_MAX_CIDRS];
	/* the pod's proxy identity, never intercepted (istio-cni: the
	 * istio-proxy container's runAsUser / runAsGroup); 0: the mesh's
	 * MB_PROXY_UID / MB_PROXY_GID */
	__u32 proxy_uid;
	__u32 proxy_gid;
};

#endif /* MERBRIDGE_H */
