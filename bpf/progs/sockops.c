/* sockops.c: cgroup/sock_ops (BPF_CGROUP_SOCK_OPS), program mb_sockops.
 *
 * Attach point: the cgroup v2 directory holding the pods (Datapath.attach).
 * Reads:   mb_cookie_orig_dst (what connect4/6 decided for this socket),
 *          mb_settings (MB_SET_SKMSG_OFF: keep new connections out of the
 *          sockhash, so sk_msg never touches them; MB_SET_SKMSG_MAX_QUEUE:
 *          the sk_msg byte budget of a new socket).
 * Writes:  mb_pair_orig_dst (4-tuple -> original destination, for
 *          getsockopt), mb_sock_pair (both local ends, for sk_msg) and
 *          their mb_skmsg_budget entries,
 *          mb_netns_ip (legacy feedback), mb_counters; deletes the
 *          mb_cookie_orig_dst entry it consumed and, when an accepting
 *          socket closes, the mb_pair_orig_dst entry it was answered from.
 * Why: connect only knows a socket cookie; the proxy that accepts the
 * connection only knows its 4-tuple. Once established, the connecting side's
 * tuple is final, so the original destination moves from the cookie to the
 * tuple. Putting both local ends into the sockhash lets redir.c hand data
 * from one socket straight to its peer.
 */
#include "helpers.h"
#include "maps.h"

static __always_inline void mb_count(u32 idx)
{
	u64 *v = mb_counters.lookup(&idx);

	if (v)
		*v += 1;
}

int mb_sockops(struct bpf_sock_ops *skops)
{
	u32 op = skops->op;
	struct mb_pair p = {}, r = {};
	struct mb_origin *o, origin;
	int insert = 0;
	u64 cookie;

	if (op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB &&
	    op != BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB && op != BPF_SOCK_OPS_STATE_CB)
		return 1;
	if (skops->family != AF_INET && skops->family != AF_INET6)
		return 1;
	mb_pair_from_ctx(&p, skops);

	if (op == BPF_SOCK_OPS_STATE_CB) {
		/* an accepting socket of ours closed: nobody will ask for its
		 * original destination again (XDP entries are XDP's to remove) */
		if (skops->args[1] != BPF_TCP_CLOSE)
			return 1;
		mb_pair_reverse(&p, &r);
		o = mb_pair_orig_dst.lookup(&r);
		if (o && !(o->flags & MB_ORIGIN_F_XDP)) {
			mb_pair_orig_dst.delete(&r);
			mb_count(MB_C_PAIR_DELETED);
		}
		return 1;
	}

	if (op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB) {
		cookie = bpf_get_socket_cookie(skops);
		o = mb_cookie_orig_dst.lookup(&cookie);
		if (o) {
			origin = *o;
			mb_cookie_orig_dst.delete(&cookie);
			if (origin.flags & MB_ORIGIN_F_LEARN) {
				/* legacy: a non-rewritten connection of a mesh pod
				 * shows the pod's own address as its source */
				if (!mb_addr_is_loopback(&p.sip)) {
					u64 netns = bpf_get_netns_cookie(skops);

					mb_netns_ip.update(&netns, &p.sip);
					mb_count(MB_C_LEARNED_IP);
				}
				return 1;
			}
			mb_pair_orig_dst.update(&p, &origin);
			mb_count(MB_C_PAIR_RECORDED);
			insert = 1;
		} else if (mb_addr_is_passthrough(&p.sip)) {
			insert = 1;   /* the proxy's inbound passthrough to the app */
		}
	} else {
		/* accepted by the proxy's listeners, or by the app from the
		 * proxy's passthrough source */
		if (p.sport == bpf_htons(MB_OUT_PORT) || p.sport == bpf_htons(MB_IN_PORT)) {
			insert = 1;
			bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags |
							 BPF_SOCK_OPS_STATE_CB_FLAG);
		} else if (mb_addr_is_passthrough(&p.dip)) {
			insert = 1;
		}
	}
	if (!insert)
		return 1;
	u32 idx = MB_SET_SKMSG_OFF;
	u64 *set = mb_settings.lookup(&idx);

	if (set && *set)
		return 1;
	/* the sk_msg budget first: redir.c treats a socket without one as
	 * "normal path", so the order only matters for the first message */
	u64 budget = MB_SKMSG_MAX_QUEUE_DEFAULT;

	idx = MB_SET_SKMSG_MAX_QUEUE;
	set = mb_settings.lookup(&idx);
	if (set && *set)
		budget = *set;
	mb_skmsg_budget.update(&p, &budget);
	int ret = mb_sock_pair.sock_hash_update(skops, &p, BPF_NOEXIST);
	mb_count(ret == 0 ? MB_C_SOCKHASH_ADD : MB_C_SOCKHASH_FAILED);
	return 1;
}
