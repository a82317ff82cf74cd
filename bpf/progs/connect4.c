/* connect4.c: cgroup/connect4 (BPF_CGROUP_INET4_CONNECT), program mb_connect4.
 *
 * Attach point: the cgroup v2 directory holding the pods (Datapath.attach).
 * Reads:   mb_netns_pod + mb_mark_pod_ips (CNI mode) or mb_netns_ip
 *          (legacy): the caller's pod IP; mb_local_pods: the caller's and the
 *          target's policy; mb_settings: the legacy destination sequence
 *          (atomic add), MB_SET_NODE_NETNS.
 * Writes:  mb_sock_origin (the socket's original destination, for sockops
 *          and peername.c), mb_counters.
 * Why: this replaces istio-iptables' nat OUTPUT chain for IPv4 TCP: an app's
 * connect from a mesh pod goes to the sidecar's outbound listener, the
 * proxy's to a local pod's inbound listener. The program is connect.h's
 * mb_connect (which says where each call goes) over IPv4 fields; the
 * decision is connect.h:mb_decide.
 */
#include "connect.h"

int mb_connect4(struct bpf_sock_addr *ctx)
{
	return mb_connect(ctx, 1);
}
