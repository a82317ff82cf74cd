/* maps.h: every map of the datapath, declared once.
 *
 * Each program file in bpf/progs/ is compiled by bcc as its own object; all of
 * them include this file, so they all name the same maps. Every map is pinned
 * under MB_PIN_DIR (-DMB_PIN_DIR="..." from bpf/loader.py): the first object
 * to load creates and pins a map, later objects (and a restarted daemon) reuse
 * the pin. Names are mirrored as constants in bpf/types.py. Ambient mode's
 * maps are in ambient_maps.h, included at the end.
 *
 * Map accesses (m.lookup(&k), m.update(...)) may stand in any header of
 * bpf/include/: bcc rewrites them only in the text it compiles, so the loader
 * writes every header a program includes into that text (bpf/csource.py).
 */
#ifndef MERBRIDGE_MAPS_H
#define MERBRIDGE_MAPS_H

#include "merbridge.h"

#ifndef MB_PIN_DIR
#error "MB_PIN_DIR must be given as -DMB_PIN_DIR=\"/sys/fs/bpf/...\""
#endif

#define MB_PIN(name) MB_PIN_DIR "/" #name

/* bcc's BPF_SOCKHASH cannot be pinned; this is the same table layout with the
 * "type:pin path" section that BPF_TABLE_PINNED uses. The member names are
 * what bcc's rewriter keys on (sock_hash_update, msg_redirect_hash). */
#define MB_SOCKHASH_PINNED(_name, _key_type, _max_entries)                                        \
	struct _name##_table_t {                                                                  \
		_key_type key;                                                                    \
		int leaf;                                                                         \
		int (*update)(_key_type *, int *);                                                \
		int (*delete)(_key_type *);                                                       \
		int (*sock_hash_update)(void *, void *, u64);                                     \
		int (*msg_redirect_hash)(void *, void *, u64);                                    \
		int (*sk_redirect_hash)(void *, void *, u64);                                     \
		u32 max_entries;                                                                  \
	};                                                                                        \
	__attribute__((section("maps/sockhash:" MB_PIN(_name)))) struct _name##_table_t _name = { \
		.max_entries = (_max_entries)                                                     \
	};                                                                                        \
	BPF_ANNOTATE_KV_PAIR(_name, _key_type, int)

/* A socket -> where its connection was really going, kept in the socket
 * itself (sk_storage: the kernel frees it with the socket, so nothing has to
 * clean up after a closed socket and no program runs at release).
 * Written by connect4/6 and ambient4/6 for a connect they rewrote (flag
 * REDIRECT, plus INBOUND for the proxy's) or that should teach the netns its
 * IP (legacy, flag LEARN), and by dns.c for a DNS socket (flag DNS: a TCP or
 * connected UDP one, or the last query an unconnected UDP socket sent).
 * Read by sockops when the connection is established (the original
 * destination moves to mb_pair_orig_dst, keyed by the final 4-tuple), by
 * peername.c (getpeername answers the original destination, getsockname the
 * pod IP, as under iptables' NAT) and by dns.c's recvmsg (a reply from the
 * DNS proxy comes from the server the app asked). A connect that is left
 * alone clears the entry of an earlier, failed one. Pinned: the sockets'
 * views survive a daemon restart. */
BPF_TABLE_PINNED("sk_storage", int, struct mb_origin, mb_sock_origin, 0, MB_PIN(mb_sock_origin),
		 BPF_F_NO_PREALLOC);

/* The mb_sock_origin entry of a socket (sk: a struct bpf_sock the program
 * may pass to bpf_sk_storage_get; 0: none). */
static __always_inline struct mb_origin *mb_origin_of(struct bpf_sock *sk)
{
	return mb_sock_origin.sk_storage_get(sk, 0, 0);
}

/* Record in sk where the calling process was really going (port in network
 * order, flags MB_ORIGIN_F_*). Without memory for the entry nothing is
 * recorded: the app then sees the rewritten address, and the proxy gets no
 * SO_ORIGINAL_DST for the connection. */
static __always_inline void mb_origin_record(struct bpf_sock *sk, const struct mb_addr *addr,
					     u16 port, u16 flags)
{
	struct mb_origin *o = mb_sock_origin.sk_storage_get(sk, 0, BPF_SK_STORAGE_GET_F_CREATE);

	if (!o)
		return;
	o->addr = *addr;
	o->port = port;
	o->flags = flags;
	o->pid = bpf_get_current_pid_tgid() >> 32;
}

/* 4-tuple of the connecting socket -> original destination.
 * Written by sockops (ACTIVE_ESTABLISHED, from mb_sock_origin) and by the
 * inbound datapath, bpf/progs/inbound.c (key {client ip, client port, pod ip,
 * MB_IN_PORT}, flag XDP), only for an established flow (the client's ACK
 * matched the pod's SYN-ACK) and never over an entry without the flag.
 * Read by getsockopt (SO_ORIGINAL_DST, reversed tuple of the accepted socket)
 * and the inbound datapath. Deleted by sockops when the accepting socket
 * closes (both kinds; an inbound flow going to TIME_WAIT moves to
 * mb_in_pending), by the inbound datapath on the pod's RST, by the daemon
 * (maps.pair_orig_dst.delete_ip) when a pod goes. */
BPF_TABLE_PINNED("lru_hash", struct mb_pair, struct mb_origin, mb_pair_orig_dst, MB_MAX_CONNS,
		 MB_PIN(mb_pair_orig_dst));

/* Inbound flows (bpf/progs/inbound.c) that are not established: half-open (a SYN
 * seen, the handshake not complete) or closing (the pod's socket in
 * TIME_WAIT). Same key as mb_pair_orig_dst. Written and read by the inbound
 * datapath (a SYN creates, the pod's SYN-ACK arms, the client's matching ACK
 * moves the flow to mb_pair_orig_dst), by sockops (a closing flow moves
 * here). LRU of its own: a SYN flood only evicts other half-open or closing
 * flows, never an established one, and never a connect/sockops entry. */
BPF_TABLE_PINNED("lru_hash", struct mb_pair, struct mb_in_flow, mb_in_pending, MB_MAX_CONNS,
		 MB_PIN(mb_in_pending));

/* 4-tuple -> local socket, for sk_msg shortcuts between two local sockets.
 * Written by sockops (both ends of an intercepted local connection); read by
 * redir.c (sk_msg, attached to this map). The kernel drops closed sockets. */
MB_SOCKHASH_PINNED(mb_sock_pair, struct mb_pair, MB_MAX_CONNS);

/* 4-tuple of a socket in mb_sock_pair -> bytes it may still hand to its
 * peer through sk_msg. Written by sockops (BPF_ANY, when the socket enters
 * the sockhash: a reused tuple starts with a fresh budget); decremented by
 * redir.c, which sets it to 0 for good once a message does not fit or the
 * redirect fails. 0 or no entry means the normal TCP path: a connection may
 * go from redirect to normal once, never back, because the receiver drains
 * its psock queue (older, redirected bytes) before its receive queue (newer,
 * normal-path bytes). Both ends' entries are deleted by sockops when the
 * passive end closes. A plain hash, not LRU: an LRU insert cost ~600 ns here
 * against ~160 ns (docs/datapath.md); if leaked entries ever fill it,
 * sockops skips the shortcut, which is slower but correct. */
BPF_TABLE_PINNED("hash", struct mb_pair, u64, mb_skmsg_budget, MB_MAX_CONNS,
		 MB_PIN(mb_skmsg_budget));

/* Pod IP -> interception policy of a mesh pod on this node.
 * Written by the daemon (maps.local_pods); read by connect4/6 (the own pod's
 * outbound policy, a target pod's inbound policy) and XDP. */
BPF_TABLE_PINNED("hash", struct mb_addr, struct mb_pod_config, mb_local_pods, MB_MAX_PODS,
		 MB_PIN(mb_local_pods));

/* SO_MARK of a pod's marker listener (port MB_MARK_PORT) -> pod IPs (one
 * per family). Written by the daemon on CNI ADD (maps.mark_pod_ips); read by
 * connect4/6 in CNI mode to learn the caller's pod IPs. */
BPF_TABLE_PINNED("hash", u32, struct mb_pod_ips, mb_mark_pod_ips, MB_MAX_PODS,
		 MB_PIN(mb_mark_pod_ips));

/* Legacy mode feedback: network namespace cookie -> that netns' pod IPs,
 * one per family (0s: not learned yet). Written by sockops when a connection
 * of a mesh netns that connect4/6 marked LEARN establishes with a local
 * address that can be a pod IP: it fills that address's family and keeps the
 * other (read-modify-write). Read by connect4/6, which mark LEARN while the
 * pod IP of the connection's family is unknown, so a dual-stack pod learns
 * both. Keyed by netns (not by pid as upstream's process_ip) so every process
 * of the pod benefits from one learned connection per family. */
BPF_TABLE_PINNED("lru_hash", u64, struct mb_pod_ips, mb_netns_ip, MB_MAX_PODS, MB_PIN(mb_netns_ip));

/* CNI mode: network namespace cookie -> {pod IPs, marker SO_MARK}: the
 * daemon's record of a pod netns, written at CNI ADD from the SO_NETNS_COOKIE
 * of the marker socket it opened there, deleted at DEL. The only way
 * connect4/6 and getsockopt know a netns is a pod: no listener or SO_MARK is
 * trusted (docs/security.md). Read by connect4/6 and getsockopt, which look
 * the mark up in mb_mark_pod_ips on every use (a withdrawn mark: no pod).
 * Nothing but the daemon writes it, so it holds at most one entry per pod; a
 * plain hash, not LRU: an LRU map may evict before it is full (per-CPU free
 * lists), and an evicted record would be a pod silently left uncaptured. */
BPF_TABLE_PINNED("hash", u64, struct mb_netns_pod, mb_netns_pod, MB_MAX_PODS, MB_PIN(mb_netns_pod));

/* Runtime settings, index MB_SET_*. Written by the daemon (maps.settings);
 * read by sockops (MB_SET_SKMSG_OFF, MB_SET_SKMSG_MAX_QUEUE). Index
 * MB_SET_LEGACY_SEQ is connect4/6's 127.128.x.y sequence (atomic add). */
BPF_TABLE_PINNED("array", u32, u64, mb_settings, MB_N_SETTINGS, MB_PIN(mb_settings));

/* The value of setting idx (0: not set). */
static __always_inline u64 mb_setting(u32 idx)
{
	u64 *v = mb_settings.lookup(&idx);

	return v ? *v : 0;
}

/* Per-CPU event counters, index MB_C_*. Written by every program; read by
 * maps.counters() (status, metrics, tests). */
BPF_TABLE_PINNED("percpu_array", u32, u64, mb_counters, MB_N_COUNTERS, MB_PIN(mb_counters));

static __always_inline void mb_count(u32 idx)
{
	u64 *v = mb_counters.lookup(&idx);

	if (v)
		*v += 1;
}

#include "ambient_maps.h"

#endif /* MERBRIDGE_MAPS_H */
