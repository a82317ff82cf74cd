/* redir.c: sk_msg (BPF_SK_MSG_VERDICT on mb_sock_pair), program mb_msg_redir.
 *
 * Attach point: the sockhash mb_sock_pair (Datapath.attach), so it runs for
 * every sendmsg on a socket that sockops put into the sockhash.
 * Reads:   mb_sock_pair (the peer, by the reversed 4-tuple).
 * Writes:  mb_skmsg_budget (bytes this socket may still redirect),
 *          mb_counters.
 * Why: both ends of an intercepted local connection (app <-> sidecar,
 * sidecar <-> sidecar on one node, sidecar <-> app) are on this host, so the
 * payload can go straight onto the peer's receive queue (BPF_F_INGRESS)
 * instead of through the loopback TCP stack.
 *
 * Bounded queueing: a redirected message is charged to the receiver only
 * against tcp_mem, never its sk_rcvbuf, and the sender never waits, so a slow
 * reader would let the sender queue without limit. Each socket therefore has
 * a byte budget (sockops sets it when the socket enters the sockhash). A
 * message that does not fit, or whose redirect fails, sends the socket to the
 * normal TCP path (flow control, rcvbuf) for good: the budget becomes 0 and
 * is never raised again. Redirect -> normal is order-safe because the
 * receiver drains its psock queue (the older, redirected bytes) before its
 * receive queue; normal -> redirect would reorder, so it never happens.
 */
#include "helpers.h"
#include "maps.h"

int mb_msg_redir(struct sk_msg_md *msg)
{
	struct mb_pair p = {}, peer = {};
	u64 *left;
	u32 size;

	if (msg->family != AF_INET && msg->family != AF_INET6)
		return SK_PASS;
	mb_pair_from_ctx(&p, msg);
	left = mb_skmsg_budget.lookup(&p);
	if (!left || *left == 0) {
		/* evicted, never set, or already on the normal path */
		mb_count(MB_C_MSG_PASS);
		return SK_PASS;
	}
	size = msg->size;
	/* "<=": the message that would use up the budget already takes the
	 * normal path, so every socket that leaves the shortcut is counted */
	if (*left <= size) {
		*left = 0;
		mb_count(MB_C_MSG_BACKPRESSURE);
		mb_count(MB_C_MSG_PASS);
		return SK_PASS;
	}
	mb_pair_reverse(&p, &peer);
	long ret = mb_sock_pair.msg_redirect_hash(msg, &peer, BPF_F_INGRESS);
	if (ret != SK_PASS) {
		/* no peer (yet, or any more): this message takes the normal
		 * path, so every later one must too */
		*left = 0;
		mb_count(MB_C_MSG_PEER_MISSING);
		mb_count(MB_C_MSG_PASS);
		return SK_PASS;
	}
	/* sendmsg on one socket is serialized by its lock; atomic anyway */
	__sync_fetch_and_add(left, -(u64)size);
	mb_count(MB_C_MSG_REDIRECT);
	return SK_PASS;
}
