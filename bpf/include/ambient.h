/* ambient.h: what the daemon and the kernel share for Istio ambient mode
 * (docs/ambient.md): constants and the one struct, declared here and nowhere
 * else. Included by ambient_maps.h (so by every program) and by the host gcc
 * in tests/unit/test_layout.py, which checks it against its ctypes mirror in
 * bpf/types.py.
 *
 * A pod in Istio's ambient mesh has no sidecar: its app's connects go to the
 * node's ztunnel, whose address the daemon keeps in mb_settings. Pods are
 * recognised by their cgroup (bpf_get_current_cgroup_id, cgroup v2), not by a
 * listener in their netns, because joining or leaving ambient happens by a
 * label change on a running pod, with no CNI call. The programs
 * (bpf/progs/ambient4.c, ambient6.c) are loaded only with --ambient; the maps
 * (ambient_maps.h) exist in every build.
 */
#ifndef MERBRIDGE_AMBIENT_H
#define MERBRIDGE_AMBIENT_H

#include "merbridge.h"

#define MB_MAX_CGROUPS      4096  /* mb_cgroup_info: pod + container cgroups */
#define MB_AMBIENT_OUT_PORT 15001 /* ztunnel's outbound listener */
#define MB_AMBIENT_IN_PORT  15006 /* ztunnel's inbound (plaintext) listener */

/* struct mb_cgroup_info.flags */
#define MB_CG_F_ZTUNNEL 0x01 /* the node's ztunnel: never intercepted */

/* mb_settings indexes holding the node's ztunnel address (0: none) */
#define MB_SET_ZTUNNEL_IP4    12 /* IPv4, network order, in the low 32 bits */
#define MB_SET_ZTUNNEL_IP6_HI 13 /* IPv6 bytes 0..7, as they lie in memory */
#define MB_SET_ZTUNNEL_IP6_LO 14 /* IPv6 bytes 8..15 */

/* One cgroup of a pod on this node (the pod's cgroup and each container's).
 * Value of mb_cgroup_info, keyed by the u64 cgroup id (the inode of the
 * cgroup v2 directory). A pod outside ambient has an entry with in_mesh 0:
 * that tells "a pod" from "a host process". */
struct mb_cgroup_info {
	struct mb_addr ip4; /* the pod's IPv4 (::ffff:a.b.c.d); 0s: none */
	struct mb_addr ip6; /* the pod's IPv6; 0s: none */
	__u32 in_mesh;      /* 1: ambient, the app's connects go to ztunnel */
	__u32 flags;        /* MB_CG_F_* */
};

#endif /* MERBRIDGE_AMBIENT_H */
