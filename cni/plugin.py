"""The plugin's commands: parse, forward to the daemon, pass prevResult through.

ADD   needs a prevResult (we are a chained plugin). Pods named in CNI_ARGS and
      not in ``excludeNamespaces`` are forwarded. If the daemon cannot be
      reached, or answers code 11 (try again later), then with ``failOpen``
      (the default) the ADD succeeds and is remembered in ``pendingDir``
      (``pending.py``), which the daemon replays when it is back -- the pod is
      never blocked by merbridge, and Istio's own iptables rules intercept it
      meanwhile; without ``failOpen`` it fails with code 11, so a pod that
      should be meshed never starts without merbridge. The output is
      prevResult, unchanged, with the config's cniVersion.
DEL   always succeeds: repeated, daemon down, netns gone, even a bad config.
      It forgets a remembered ADD of the container.
      Problems are logged on stderr; the daemon reconciles from pod events
      and its GC.
CHECK forwards; fails when the daemon is down or has no state for the pod.
STATUS asks the daemon whether it can service ADD; code 50 when it cannot.
GC    forwards the still-valid attachments; the daemon drops the rest.

A daemon error reply carries a CNI code, which is re-emitted as is.
"""
from __future__ import annotations

import json

from merbridge.cni import errors, netconf, pending, protocol, skel
from merbridge.cni.errors import CniError


def passthrough(prev: dict, cni_version: str) -> dict:
    """prevResult with ``cniVersion`` set; every other key and its order untouched."""
    if "cniVersion" in prev:
        out = dict(prev)
        out["cniVersion"] = cni_version
        return out
    return {"cniVersion": cni_version, **prev}


def default_client(conf: netconf.NetConf):
    from merbridge.cni.client import DaemonClient  # imported only when a daemon is needed
    return DaemonClient(conf.socket_path, conf.timeout)


def _unavailable():
    from merbridge.cni.client import DaemonUnavailable
    return DaemonUnavailable


def invocation(cmd: skel.CmdArgs) -> protocol.ExecRequest:
    """The invocation ``cmd`` came from, as the wire record (env as bytes, stdin)."""
    values = {"CNI_COMMAND": cmd.command, "CNI_CONTAINERID": cmd.container_id,
              "CNI_NETNS": cmd.netns, "CNI_IFNAME": cmd.ifname, "CNI_ARGS": cmd.args,
              "CNI_PATH": cmd.path, "CNI_NETNS_OVERRIDE": cmd.netns_override}
    return protocol.ExecRequest({k: v.encode("utf-8", "surrogateescape")
                                 for k, v in values.items() if v}, cmd.stdin_data)


class Plugin:
    """``replay``: this is the daemon replaying a remembered ADD, which is never
    remembered again (its code 11 goes back to the replayer)."""

    def __init__(self, client_factory=default_client, replay: bool = False) -> None:
        self.client_factory = client_factory
        self.replay = replay
        self.log = skel.Log(None, "error")

    def configure_log(self, cmd: skel.CmdArgs, log: skel.Log) -> None:
        self.log = log
        level = cmd.config.get("logLevel")
        if isinstance(level, str) and level in skel.LEVELS:
            log.level = skel.LEVELS[level]

    # -- helpers -----------------------------------------------------------
    def _target(self, cmd: skel.CmdArgs, conf: netconf.NetConf) -> netconf.Pod | None:
        """The pod to forward, or None to pass straight through."""
        pod = netconf.pod_from_args(cmd.args)
        if pod is None:
            self.log.info(f"{cmd.command} {cmd.container_id}: no K8S_POD_NAMESPACE/"
                          "K8S_POD_NAME in CNI_ARGS; not a pod, passing through")
            return None
        if pod.namespace in conf.exclude_namespaces:
            self.log.debug(f"{cmd.command} {pod}: namespace excluded, passing through")
            return None
        return pod

    def _request(self, cmd: skel.CmdArgs, conf: netconf.NetConf,
                 pod: netconf.Pod) -> protocol.CniRequest:
        prev = conf.prev_result or {}
        try:
            return protocol.CniRequest(
                command=cmd.command, container_id=cmd.container_id, netns=cmd.netns,
                ifname=cmd.ifname, pod_namespace=pod.namespace, pod_name=pod.name,
                pod_uid=pod.uid,
                ips=tuple(protocol.normalize_ip(ip) for ip in netconf.prev_result_ips(prev)),
                interfaces=tuple(protocol.Interface(n, s)
                                 for n, s in netconf.prev_result_interfaces(prev)),
                cni_version=cmd.cni_version, network=conf.name)
        except protocol.ProtocolError as e:
            raise CniError(errors.INVALID_NETWORK_CONFIG, "cannot forward this call", str(e)) \
                from None

    def _call(self, conf: netconf.NetConf, req: protocol.CniRequest) -> dict:
        try:
            return self.client_factory(conf).call(req)
        except _unavailable() as e:
            raise CniError(errors.TRY_AGAIN_LATER,
                           "merbridge daemon unavailable, try again later", str(e)) from None

    # -- commands ----------------------------------------------------------
    def add(self, cmd: skel.CmdArgs) -> dict:
        conf = netconf.parse_netconf(cmd.config)
        if conf.prev_result is None:
            raise CniError(errors.INVALID_NETWORK_CONFIG,
                           "must be called as a chained plugin",
                           "no prevResult: list merbridge-cni after the main plugin")
        out = passthrough(conf.prev_result, cmd.cni_version)
        self.log.debug(f"ADD {cmd.container_id} prevResult: {json.dumps(conf.prev_result)}")
        pod = self._target(cmd, conf)
        if pod is not None:
            req = self._request(cmd, conf, pod)
            try:
                extras = self._call(conf, req)
            except CniError as e:
                if e.code != errors.TRY_AGAIN_LATER or not conf.fail_open or self.replay:
                    raise
                self._remember(cmd, conf, pod, e)
                return out
            self.log.info(f"ADD {pod} {cmd.container_id} {list(req.ips)}: enrolled {extras}")
        return out

    def _remember(self, cmd: skel.CmdArgs, conf: netconf.NetConf, pod: netconf.Pod,
                  why: CniError) -> None:
        """failOpen: the pod starts now; the daemon enrols it from the record later."""
        try:
            where = pending.remember(conf.pending_dir, cmd.container_id,
                                     invocation(cmd).to_json())
        except (OSError, protocol.ProtocolError) as e:
            where = f"nowhere ({e}); the daemon finds the pod by its IP"
        self.log.warning(f"ADD {pod} {cmd.container_id}: {why}; passing through (failOpen), "
                         f"remembered in {where}")

    def delete(self, cmd: skel.CmdArgs) -> None:
        try:
            conf = netconf.parse_netconf(cmd.config)
            try:
                pending.forget(conf.pending_dir, cmd.container_id)
            except OSError as e:
                self.log.warning(f"DEL {cmd.container_id}: cannot forget its ADD: {e}")
            pod = self._target(cmd, conf)
            if pod is None:
                return None
            try:
                req = self._request(cmd, conf, pod)
            except CniError as e:  # a broken prevResult must not stop the teardown
                self.log.warning(f"DEL {cmd.container_id}: {e}; forwarding without "
                                 "prevResult, reporting success anyway")
                conf.prev_result = None
                req = self._request(cmd, conf, pod)
            self._call(conf, req)
            self.log.info(f"DEL {pod} {cmd.container_id}: withdrawn")
        except Exception as e:  # DEL must succeed; the daemon reconciles later
            self.log.warning(f"DEL {cmd.container_id}: {e}; reporting success anyway")
        return None

    def check(self, cmd: skel.CmdArgs) -> None:
        conf = netconf.parse_netconf(cmd.config)
        if conf.prev_result is None:
            raise CniError(errors.INVALID_NETWORK_CONFIG,
                           "must be called as a chained plugin", "no prevResult on CHECK")
        pod = self._target(cmd, conf)
        if pod is not None:
            self._call(conf, self._request(cmd, conf, pod))
        return None

    def status(self, cmd: skel.CmdArgs) -> None:
        conf = netconf.parse_netconf(cmd.config)
        try:
            reply = self.client_factory(conf).status()
        except _unavailable() as e:
            raise CniError(errors.PLUGIN_NOT_AVAILABLE, "merbridge daemon is not available",
                           str(e)) from None
        if not reply.ready:
            raise CniError(errors.PLUGIN_NOT_AVAILABLE, "merbridge daemon is not ready",
                           reply.detail)
        return None

    def gc(self, cmd: skel.CmdArgs) -> None:
        conf = netconf.parse_netconf(cmd.config)
        try:
            atts = tuple(protocol.Attachment(c, i) for c, i in netconf.gc_attachments(cmd.config))
            req = protocol.CniRequest(command="GC", cni_version=cmd.cni_version,
                                      network=conf.name, attachments=atts)
        except protocol.ProtocolError as e:
            raise CniError(errors.INVALID_NETWORK_CONFIG, "invalid GC attachments", str(e)) \
                from None
        self._call(conf, req)
        return None
