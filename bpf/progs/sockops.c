/* sockops.c: cgroup/sock_ops (BPF_CGROUP_SOCK_OPS), program mb_sockops.
 *
 * Attach point: the cgroup v2 directory holding the pods (Datapath.attach).
 * Reads:   mb_sock_origin (what connect4/6 decided for this socket),
 *          mb_netns_ip (legacy: the pod IPs learned so far),
 *          mb_settings (MB_SET_SKMSG_OFF: keep new connections out of the
 *          sockhash, so sk_msg never touches them; MB_SET_SKMSG_MAX_QUEUE:
 *          the sk_msg byte budget of a new socket; MB_SET_NODE_NETNS and
 *          MB_SET_ZTUNNEL_*),
 *          mb_netns_pod + mb_mark_pod_ips (CNI mode: is an accepting
 *          socket's netns the pod whose pair entry it matches?).
 * Writes:  mb_pair_orig_dst (4-tuple -> original destination, for
 *          getsockopt), mb_sock_pair (both local ends, for sk_msg) and
 *          their mb_skmsg_budget entries,
 *          mb_netns_ip (legacy feedback: the pod IP of the learning
 *          connection's family, the other family's kept), mb_counters;
 *          when an accepting socket closes, deletes the mb_pair_orig_dst
 *          entry it was
 *          answered from (an inbound flow of inbound.c going to
 *          TIME_WAIT moves to mb_in_pending instead).
 * Why: connect only knows its socket; the proxy that accepts the connection
 * only knows its 4-tuple. Once established, the connecting side's tuple is
 * final, so the original destination is copied from the socket to the
 * tuple. Putting both local ends into the sockhash lets redir.c hand data
 * from one socket straight to its peer.
 */
#include "pod.h"

/* An established socket of an intercepted connection enters the sockhash,
 * with its sk_msg budget (redir.c), unless MB_SET_SKMSG_OFF. 1: added. */
static __always_inline int mb_sockhash_add(struct bpf_sock_ops *skops, struct mb_pair *p)
{
	if (mb_setting(MB_SET_SKMSG_OFF))
		return 0;
	/* the sk_msg budget first: redir.c treats a socket without one as
	 * "normal path", so the order only matters for the first message */
	u64 budget = mb_setting(MB_SET_SKMSG_MAX_QUEUE);

	if (!budget)
		budget = MB_SKMSG_MAX_QUEUE_DEFAULT;
	if (mb_skmsg_budget.update(p, &budget)) {
		/* budget map full (leaked entries): no shortcut, still correct */
		mb_count(MB_C_SOCKHASH_FAILED);
		return 0;
	}
	int ret = mb_sock_pair.sock_hash_update(skops, p, BPF_NOEXIST);
	if (ret) {
		mb_skmsg_budget.delete(p);
		mb_count(MB_C_SOCKHASH_FAILED);
		return 0;
	}
	mb_count(MB_C_SOCKHASH_ADD);
	return 1;
}

/* STATE_CB on a passive socket of ours: its close cleans up after both ends
 * (mb_state_change). Set only where needed, since every state change of
 * such a socket then runs this program. */
static __always_inline void mb_watch_close(struct bpf_sock_ops *skops)
{
	bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags | BPF_SOCK_OPS_STATE_CB_FLAG);
}

static __always_inline void mb_active_established(struct bpf_sock_ops *skops)
{
	struct mb_pair p = {};
	struct mb_origin *o = 0, origin;
	struct bpf_sock *sk = skops->sk;

	mb_pair_from_ctx(&p, skops);
	if (sk)
		o = mb_origin_of(sk);
	if (!o || !(o->flags & (MB_ORIGIN_F_REDIRECT | MB_ORIGIN_F_LEARN))) {
		/* the proxy's inbound passthrough to the app */
		if (mb_addr_is_passthrough(&p.sip))
			mb_sockhash_add(skops, &p);
		return;
	}
	origin = *o;
	if (origin.flags & MB_ORIGIN_F_LEARN) {
		/* legacy: a non-rewritten connection of a mesh pod shows the
		 * pod's own address of its family as its source. It fills that
		 * family's slot and keeps the other one (a dual-stack pod learns
		 * its two addresses from two connections). Two CPUs learning the
		 * two families at once may lose one slot: connect4/6 keep
		 * marking LEARN until it is filled again. */
		if (!mb_addr_is_loopback(&p.sip) && !mb_addr_is_link_local(&p.sip)) {
			u64 netns = bpf_get_netns_cookie(skops);
			struct mb_pod_ips ips = {};
			struct mb_pod_ips *known = mb_netns_ip.lookup(&netns);

			if (known)
				ips = *known;
			mb_pod_ips_set(&ips, &p.sip);
			mb_netns_ip.update(&netns, &ips);
			mb_count(MB_C_LEARNED_IP);
		}
		return;
	}
	mb_pair_orig_dst.update(&p, &origin);
	mb_count(MB_C_PAIR_RECORDED);
	mb_sockhash_add(skops, &p);
}

static __always_inline void mb_passive_established(struct bpf_sock_ops *skops)
{
	struct mb_pair p = {}, r = {};
	struct mb_origin *o;

	mb_pair_from_ctx(&p, skops);
	if (p.sport == bpf_htons(MB_OUT_PORT) || p.sport == bpf_htons(MB_IN_PORT)) {
		/* accepted by the proxy: only a connection connect4/6 rewrote
		 * (its connecting side, established first on this host, left
		 * the pair entry) has a local peer worth a sockhash entry and
		 * an entry to clean up at close. A direct connect to the port
		 * or XDP's inbound flow from another node has neither. */
		mb_pair_reverse(&p, &r);
		o = mb_pair_orig_dst.lookup(&r);
		if (!o)
			return;
		/* another netns that rebuilt a pod's tuple neither joins its
		 * sk_msg shortcut nor deletes its entry at close */
		if (!mb_pair_mine(bpf_get_netns_cookie(skops), &r))
			return;
		/* both kinds free their entry when this socket closes */
		mb_watch_close(skops);
		if (!(o->flags & MB_ORIGIN_F_XDP))
			mb_sockhash_add(skops, &p);
	} else if (mb_addr_is_passthrough(&p.dip)) {
		/* the app accepting the proxy's inbound passthrough */
		if (mb_sockhash_add(skops, &p))
			mb_watch_close(skops);
	}
}

/* The pod's socket of an inbound flow (bpf/progs/inbound.c, tc or XDP)
 * closed: the flow is no longer established. Closed from FIN_WAIT2 or
 * CLOSING, the socket went on to TIME_WAIT, whose last ACKs (and its answer
 * to a retransmitted FIN) still need the original port: the flow moves to
 * the LRU mb_in_pending as CLOSING, where only pending flows compete with
 * it. Otherwise nothing will be sent any more: it is deleted. */
static __always_inline void mb_inbound_closed(struct bpf_sock_ops *skops, struct mb_pair *r,
					      struct mb_origin *o)
{
	__u32 old = skops->args[0];

	if (old == BPF_TCP_FIN_WAIT2 || old == BPF_TCP_CLOSING) {
		struct mb_in_flow f = {};

		f.port = o->port;
		f.flags = MB_IN_F_CLOSING;
		mb_in_pending.update(r, &f);
	}
	mb_pair_orig_dst.delete(r);
	mb_count(MB_C_IN_CLOSED);
}

/* A passive socket of ours closed (only those enable STATE_CB). Nobody will
 * ask for its original destination again, and neither end of the
 * connection sends any more: drop the pair entry (not XDP's) and both ends'
 * sk_msg budgets, so these LRU maps never fill up with dead connections
 * (a full LRU map makes every insert evict). */
static __always_inline void mb_state_change(struct bpf_sock_ops *skops)
{
	struct mb_pair p = {}, r = {};
	struct mb_origin *o;

	mb_pair_from_ctx(&p, skops);
	mb_pair_reverse(&p, &r);
	o = mb_pair_orig_dst.lookup(&r);
	if (o && (o->flags & MB_ORIGIN_F_XDP)) {
		mb_inbound_closed(skops, &r, o); /* never had sk_msg budgets */
		return;
	}
	mb_skmsg_budget.delete(&p);
	mb_skmsg_budget.delete(&r);
	if (o) {
		mb_pair_orig_dst.delete(&r);
		mb_count(MB_C_PAIR_DELETED);
	}
}

/* sock_ops runs for every event of every TCP socket in the cgroup (about a
 * dozen per connection over both ends: TCP_CONNECT, TIMEOUT_INIT, RWND_INIT,
 * NEEDS_ECN, BASE_RTT, ...). Everything but the three events below leaves at
 * the first compare, before any context field, helper or map. No other
 * callback flag is ever set. */
int mb_sockops(struct bpf_sock_ops *skops)
{
	switch (skops->op) {
	case BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB:
		if (skops->family == AF_INET || skops->family == AF_INET6)
			mb_active_established(skops);
		return 1;
	case BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB:
		if (skops->family == AF_INET || skops->family == AF_INET6)
			mb_passive_established(skops);
		return 1;
	case BPF_SOCK_OPS_STATE_CB:
		if (skops->args[1] == BPF_TCP_CLOSE &&
		    (skops->family == AF_INET || skops->family == AF_INET6))
			mb_state_change(skops);
		return 1;
	default:
		return 1;
	}
}
