/* redir.c: sk_msg (BPF_SK_MSG_VERDICT on mb_sock_pair), program mb_msg_redir.
 *
 * Attach point: the sockhash mb_sock_pair (Datapath.attach), so it runs for
 * every sendmsg on a socket that sockops put into the sockhash.
 * Reads:   mb_sock_pair (the peer, by the reversed 4-tuple).
 * Writes:  mb_counters.
 * Why: both ends of an intercepted local connection (app <-> sidecar,
 * sidecar <-> sidecar on one node, sidecar <-> app) are on this host, so the
 * payload can go straight onto the peer's receive queue (BPF_F_INGRESS)
 * instead of through the loopback TCP stack. No peer: the normal path.
 */
#include "helpers.h"
#include "maps.h"

static __always_inline void mb_count(u32 idx)
{
	u64 *v = mb_counters.lookup(&idx);

	if (v)
		*v += 1;
}

int mb_msg_redir(struct sk_msg_md *msg)
{
	struct mb_pair p = {}, peer = {};

	/* No per-message on/off switch here: mixing redirected and normal-path
	 * data on one connection can reorder it (the receiver drains the psock
	 * queue first). The switch (MB_SET_SKMSG_OFF) acts in sockops, per
	 * connection. */
	if (msg->family != AF_INET && msg->family != AF_INET6)
		return SK_PASS;
	mb_pair_from_ctx(&p, msg);
	mb_pair_reverse(&p, &peer);
	long ret = mb_sock_pair.msg_redirect_hash(msg, &peer, BPF_F_INGRESS);
	mb_count(ret == SK_PASS ? MB_C_MSG_REDIRECT : MB_C_MSG_PASS);
	return SK_PASS;
}
