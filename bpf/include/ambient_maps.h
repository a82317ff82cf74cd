/* ambient_maps.h: the maps of Istio ambient mode (docs/ambient.md), and the
 * ztunnel address as the datapath reads it from mb_settings.
 *
 * Included by maps.h, so every program names these maps and every build pins
 * them (the daemon writes them only with --ambient): a daemon restarted with
 * or without --ambient, and `merbridge status`, find the same pins.
 */
#ifndef MERBRIDGE_AMBIENT_MAPS_H
#define MERBRIDGE_AMBIENT_MAPS_H

#include "ambient.h"
#include "helpers.h"
#include "maps.h"

/* cgroup id -> the pod owning that cgroup (ambient or not, pod IPs, ztunnel
 * flag). Written by the daemon (daemon/ambient.py, maps.cgroup_info) from pod
 * events and process events; read by ambient4.c/ambient6.c through
 * bpf_get_current_cgroup_id(). */
BPF_TABLE_PINNED("hash", u64, struct mb_cgroup_info, mb_cgroup_info, MB_MAX_CGROUPS,
		 MB_PIN(mb_cgroup_info));

/* IP of an ambient pod on this node -> 1. Written by the daemon
 * (maps.ambient_ips); read by ambient4.c/ambient6.c: a host process's
 * connect to such an address goes to ztunnel's inbound port. */
BPF_TABLE_PINNED("hash", struct mb_addr, u32, mb_ambient_ips, MB_MAX_PODS, MB_PIN(mb_ambient_ips));

/* The node's ztunnel address of dst's family into *zt, from the mb_settings
 * the daemon keeps (MB_SET_ZTUNNEL_*); 0 when it has none of that family. */
static __always_inline int mb_ztunnel_addr(const struct mb_addr *dst, struct mb_addr *zt)
{
	if (mb_addr_is_v4(dst)) {
		u64 v4 = mb_setting(MB_SET_ZTUNNEL_IP4);

		if (!(u32)v4)
			return 0;
		mb_addr_from_v4(zt, (u32)v4);
		return 1;
	}
	u64 v6hi = mb_setting(MB_SET_ZTUNNEL_IP6_HI);
	u64 v6lo = mb_setting(MB_SET_ZTUNNEL_IP6_LO);

	if (!v6hi && !v6lo)
		return 0;
	/* the daemon stored the 16 bytes as two u64 in memory order */
	zt->ip[0] = (u32)v6hi;
	zt->ip[1] = (u32)(v6hi >> 32);
	zt->ip[2] = (u32)v6lo;
	zt->ip[3] = (u32)(v6lo >> 32);
	return 1;
}

#endif /* MERBRIDGE_AMBIENT_MAPS_H */
