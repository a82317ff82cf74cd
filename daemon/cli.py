"""The ``merbridge`` command line (the only click import).

    merbridge run --mode=istio --cni-mode=true --node-name=$(NODE_NAME) ...
    merbridge status | maps dump | doctor [--json]
    merbridge install-cni | uninstall-cni
    merbridge drain                       (the DaemonSet's preStop)

Boolean flags take the upstream (Go) syntax ``--cni-mode=true|false``; a bare
``--cni-mode`` means true.  The DaemonSet is switched between modes with
``sed 's/--cni-mode=false/--cni-mode=true/'``, so that exact spelling is part
of the interface.  Logs are logfmt lines on stderr.  Modules that need root
or bcc (runtime, loader) are imported inside their commands, so ``--help``,
``doctor`` and the tests work without them.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Any

import click

from merbridge.bpf import mesh as meshes
from merbridge.daemon import config as cfgmod

log = logging.getLogger("merbridge")


# ----------------------------------------------------------------- logging

class LogfmtFormatter(logging.Formatter):
    """``ts=... level=info logger=merbridge.daemon.pods msg="..."`` (+ exc="...")."""

    @staticmethod
    def _quote(value: str) -> str:
        if value and not any(ch in value for ch in ' "=\\\n\t'):
            return value
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'

    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        ts += f".{int(record.msecs):03d}Z"
        line = (f"ts={ts} level={record.levelname.lower()} logger={record.name} "
                f"msg={self._quote(record.getMessage())}")
        if record.exc_info:
            line += " exc=" + self._quote(self.formatException(record.exc_info))
        return line


def configure_logging(debug: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(LogfmtFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    if not debug:
        # the HTTP client logs every request at DEBUG; keep INFO for warnings
        logging.getLogger("urllib3").setLevel(logging.WARNING)


# ----------------------------------------------------------------- options

def bool_option(name: str, help: str) -> Any:
    return click.option(name, type=click.BOOL, default=False, is_flag=False, flag_value=True,
                        metavar="true|false", show_default=True, help=help)


def path_option(name: str, default: str | None, help: str, envvar: str | None = None) -> Any:
    return click.option(name, default=default, envvar=envvar, show_default=default is not None,
                        metavar="PATH", help=help)


mode_option = click.option("-m", "--mode", type=click.Choice(sorted(meshes.MESHES)), default="istio",
                           show_default=True, help="Service mesh whose sidecars are intercepted.")
bpffs_option = path_option("--bpffs-path", cfgmod.DEFAULT_BPFFS_PATH, "Where maps are pinned (bpffs).")
cgroup_option = path_option("--cgroup-path", None,
                            "cgroup v2 directory the programs attach to [default: the cgroup2 mount "
                            "found in /proc/mounts].")
bin_dir_option = path_option("--cni-bin-dir", cfgmod.DEFAULT_CNI_BIN_DIR, "CNI plugin directory.")
conf_dir_option = path_option("--cni-conf-dir", cfgmod.DEFAULT_CNI_CONF_DIR, "CNI config directory.")
socket_option = path_option("--socket-path", cfgmod.DEFAULT_SOCKET_PATH,
                            "Unix socket the merbridge-cni plugin talks to.")
state_option = path_option("--state-dir", cfgmod.DEFAULT_STATE_DIR,
                           "Daemon state (enrolled containers, lock, plugin build).")


def fail(message: str, code: int = 1) -> None:
    click.echo(f"merbridge: {message}", err=True)
    sys.exit(code)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
def main() -> None:
    """eBPF replacement for a service mesh's iptables sidecar interception."""


# ----------------------------------------------------------------- run

@main.command()
@mode_option
@bool_option("--cni-mode", "Chain merbridge-cni into the CNI config and enrol pods at CNI ADD.")
@bool_option("--hardware-checksum", "Leave checksums to the NIC on XDP-rewritten packets "
             "(--inbound-hook=xdp only; tc keeps offload on anyway).")
@click.option("--inbound-hook", type=click.Choice(["tc", "xdp"]), default="tc", show_default=True,
              help="CNI mode: where other nodes' connections to a pod are rewritten to the "
              "sidecar's inbound port (tc keeps the pod's tx checksum offload and TSO).")
@bool_option("--ambient", "Istio ambient mode: pods labelled istio.io/dataplane-mode=ambient "
             "(or in such a namespace) send their traffic to the node's ztunnel.")
@click.option("--ztunnel-namespace", default=cfgmod.DEFAULT_ZTUNNEL_NAMESPACE, show_default=True,
              metavar="NS", help="Ambient mode: only an app=ztunnel pod here is the node's ztunnel.")
@click.option("--node-name", envvar="NODE_NAME", default="", metavar="NAME",
              help="This node's Kubernetes name [default: $NODE_NAME; never the hostname].")
@path_option("--kubeconfig", None, "kubeconfig file [default: in-cluster service account].")
@path_option("--pods-dir", None, "Take pods from manifests in this directory instead of Kubernetes.")
@cgroup_option
@bpffs_option
@bin_dir_option
@conf_dir_option
@socket_option
@click.option("--metrics-addr", default=cfgmod.DEFAULT_METRICS_ADDR, show_default=True,
              metavar="HOST:PORT", help="/metrics, /healthz and /readyz ('' disables).")
@state_option
@path_option("--netns-dir", cfgmod.DEFAULT_NETNS_DIR, "Where pod network namespaces are. CNI "
             "mode: searched at start for pods that started while no daemon ran; legacy mode: "
             "for pods whose proxy runs as its own UID/GID.")
@click.option("--exclude-namespaces", default=",".join(cfgmod.DEFAULT_EXCLUDE_NAMESPACES),
              show_default=True, metavar="NS,...", help="Namespaces never intercepted.")
@path_option("--cni-plugin", None, "CNI mode: the merbridge-cni executable to install "
             "(scripts/build-cni) [default: the first of "
             + ", ".join(cfgmod.DEFAULT_CNI_PLUGIN_PATHS) + "].", envvar="MERBRIDGE_CNI_PLUGIN")
@click.option("--cni-fail-open", type=click.BOOL, default=True, is_flag=False, flag_value=True,
              metavar="true|false", show_default=True,
              help="CNI mode: an ADD while the daemon is down or cannot serve it succeeds "
              "(Istio's iptables intercept the pod meanwhile) and the daemon enrols the pod when "
              "back; false: it fails with code 11 (try again later).")
@path_option("--proc-path", cfgmod.DEFAULT_PROC_PATH, "CNI mode: the node's /proc, searched "
             "for the network namespaces of pods started while no daemon ran ('' : only "
             "--netns-dir is searched).")
@click.option("-d", "--debug", is_flag=True, help="Verbose logs.")
def run(mode: str, cni_mode: bool, hardware_checksum: bool, node_name: str, kubeconfig: str | None,
        pods_dir: str | None, cgroup_path: str | None, bpffs_path: str, cni_bin_dir: str,
        cni_conf_dir: str, socket_path: str, metrics_addr: str, state_dir: str,
        exclude_namespaces: str, debug: bool, ambient: bool = False,
        netns_dir: str = cfgmod.DEFAULT_NETNS_DIR,
        ztunnel_namespace: str = cfgmod.DEFAULT_ZTUNNEL_NAMESPACE, cni_plugin: str | None = None,
        cni_fail_open: bool = True, proc_path: str = cfgmod.DEFAULT_PROC_PATH,
        inbound_hook: str = "tc") -> None:
    """Run the node daemon until SIGTERM."""
    configure_logging(debug)
    config = cfgmod.DaemonConfig(
        mesh=mode, cni_mode=cni_mode, hardware_checksum=hardware_checksum,
        inbound_hook=inbound_hook, node_name=node_name,
        kubeconfig=kubeconfig, pods_dir=pods_dir, cgroup_path=cgroup_path or "",
        bpffs_path=bpffs_path, cni_bin_dir=cni_bin_dir, cni_conf_dir=cni_conf_dir,
        socket_path=socket_path, metrics_addr=metrics_addr, state_dir=state_dir,
        exclude_namespaces=tuple(n.strip() for n in exclude_namespaces.split(",") if n.strip()),
        debug=debug, ambient=ambient, netns_dir=netns_dir, ztunnel_namespace=ztunnel_namespace,
        cni_plugin=cni_plugin or "", fail_open=cni_fail_open, proc_path=proc_path or "")
    try:
        config = config.validate()
    except cfgmod.ConfigError as exc:
        raise click.UsageError(str(exc)) from None
    refuse_old_kernel()
    try:
        from merbridge.daemon import runtime
    except ImportError as exc:
        fail(f"the daemon runtime is not available: {exc}")
    sys.exit(runtime.run(config))


def refuse_old_kernel() -> None:
    """Exit before touching anything when the kernel lacks a feature the
    datapath needs, with doctor's "kernel floor" message."""
    from merbridge.daemon import doctor as doc
    message = doc.kernel_refusal()
    if message:
        log.error("%s", message)
        fail(message)


# ----------------------------------------------------------------- inspection

def _loader() -> Any:
    try:
        from merbridge.bpf import loader
    except ImportError as exc:
        fail(f"the BPF loader is not available ({exc}); is python3-bpfcc installed?")
    return loader


@main.command()
@bpffs_option
@cgroup_option
@state_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def status(bpffs_path: str, cgroup_path: str | None, state_dir: str, as_json: bool) -> None:
    """Show programs attached, pods enrolled with their policies, and map sizes."""
    loader = _loader()
    cgroup, why = _attach_point(loader, cgroup_path)
    out: dict[str, Any] = {"bpffs_path": bpffs_path, "cgroup_path": cgroup, "cgroup_reason": why}
    try:
        out["attached"] = sorted(a.name for a in loader.attached(cgroup)) if cgroup else []
    except (OSError, loader.DatapathError) as exc:
        out["attached_error"] = str(exc)
    try:   # the daemon's installer keeps why the CNI install fails here
        with open(os.path.join(state_dir, INSTALL_ERROR), encoding="utf-8") as f:
            out["cni_install_error"] = f.read().strip()
    except OSError:
        pass
    try:
        maps = loader.open_maps(bpffs_path)
    except (OSError, loader.DatapathError) as exc:
        out["maps_error"] = str(exc)
    else:
        try:
            dump = maps.dump()
            out["map_entries"] = {name: len(v) if hasattr(v, "__len__") else v
                                  for name, v in dump.items()}
            out["pods"] = _enrolled_pods(maps, state_dir)
            out["dns_queries_captured"] = maps.counters().get("dns_captured", 0)
        finally:
            maps.close()
    try:  # CNI mode: what the reconciler brought in and what it still looks for
        with open(os.path.join(state_dir, "reconcile.json")) as f:
            out["reconcile"] = json.load(f)
    except (OSError, ValueError):
        pass
    if as_json:
        click.echo(json.dumps(out, indent=2))
        return
    click.echo(f"pins:     {bpffs_path}: " + ("not installed: " + out["maps_error"]
                                               if "maps_error" in out else "installed"))
    attached = out.get("attached")
    click.echo(f"attached: {cgroup}: " + (", ".join(attached) if attached else
                                          out.get("attached_error", "nothing")))
    click.echo(f"          ({why})")
    if "cni_install_error" in out:
        click.echo(f"cni:      install failed (not ready): {out['cni_install_error']}")
    pods = out.get("pods", [])
    click.echo(f"pods:     {len(pods)} in mb_local_pods")
    for pod in pods:
        who = f"{pod['namespace']}/{pod['name']}" if pod.get("name") else "(from the pod source)"
        mark = f" mark={pod['mark']}" if pod.get("mark") else ""
        click.echo(f"  {pod['ip']:<39} {who}{mark}")
        click.echo(f"    {pod['policy']}")
    if "dns_queries_captured" in out:
        click.echo(f"dns:      {out['dns_queries_captured']} queries captured to the "
                   "sidecar's DNS proxy (pods marked 'dns captured')")
    rec = out.get("reconcile")
    if isinstance(rec, dict):
        ago = time.time() - float(rec.get("time", 0))
        click.echo(f"reconciled: {ago:.0f}s ago: {rec.get('replayed', 0)} replayed, "
                   f"{rec.get('adopted', 0)} adopted, {rec.get('dropped', 0)} dropped; "
                   f"pending ADDs: {', '.join(rec.get('pending') or []) or 'none'}; "
                   f"in the mesh but not enrolled: "
                   f"{', '.join(rec.get('unenrolled') or []) or 'none'}")
    click.echo("maps:")
    for name, n in sorted(out.get("map_entries", {}).items()):
        click.echo(f"  {name}: {n}")
    if "maps_error" in out:
        sys.exit(1)


def _attach_point(loader: Any, cgroup_path: str | None) -> tuple[str | None, str]:
    """Where the daemon attaches (or attached) and why: --cgroup-path, else
    the default (config.default_attach_point), else the cgroup2 root when
    our programs are found there (--ambient, or an older daemon)."""
    if cgroup_path:
        return cgroup_path, "--cgroup-path"
    mount = cfgmod.find_cgroup2_mount()
    if not mount:
        return None, "no cgroup2 mount"
    cgroup, why = cfgmod.default_attach_point(mount)
    if cgroup != mount:
        try:
            if not loader.attached(cgroup) and loader.attached(mount):
                return mount, "programs found on the cgroup2 root (--ambient or --cgroup-path)"
        except (OSError, loader.DatapathError):
            pass
    return cgroup, why


def _enrolled_pods(maps: Any, state_dir: str) -> list[dict[str, Any]]:
    """Every pod IP with a policy in mb_local_pods, joined with the CNI state file
    (which container, which mark) where the daemon runs in CNI mode."""
    from merbridge.bpf.policy import describe
    from merbridge.daemon import state

    by_ip: dict[str, state.Record] = {}
    try:  # read-only: StateStore.load() would move a corrupt file aside
        with open(os.path.join(state_dir, state.STATE_FILE)) as f:
            records = [state.Record.from_json(r) for r in json.load(f).get("containers", [])]
    except (OSError, ValueError, TypeError, AttributeError):
        records = []  # legacy mode or no state yet: the map alone is the truth
    for rec in records:
        for ip in rec.ips:
            by_ip[ip.split("/", 1)[0]] = rec
    pods = []
    for ip, policy in sorted(maps.local_pods.items()):
        owner = by_ip.get(ip)
        pods.append({"ip": ip, "policy": describe(policy),
                     "namespace": owner.namespace if owner else None,
                     "name": owner.name if owner else None,
                     "container_id": owner.container_id if owner else None,
                     "mark": owner.key if owner else None})
    return pods


@main.group()
def maps() -> None:
    """Inspect the pinned maps."""


@maps.command("dump")
@bpffs_option
def maps_dump(bpffs_path: str) -> None:
    """Print every pinned map's entries as JSON."""
    loader = _loader()
    try:
        handle = loader.open_maps(bpffs_path)
    except (OSError, loader.DatapathError) as exc:
        fail(str(exc))
    try:
        click.echo(json.dumps(handle.dump(), indent=2, default=str))
    finally:
        handle.close()


@main.command()
@bpffs_option
@cgroup_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def doctor(bpffs_path: str, cgroup_path: str | None, as_json: bool) -> None:
    """Check that this node can run merbridge; says how to fix what is missing."""
    from merbridge.daemon import doctor as doc
    checks = doc.run_checks(bpffs_path=bpffs_path, cgroup_path=cgroup_path)
    click.echo(doc.render_json(checks) if as_json else doc.render_text(checks), nl=False)
    sys.exit(0 if doc.passed(checks) else 1)


# ----------------------------------------------------------------- CNI install

#: what install-cni changed, so uninstall-cni can restore it byte for byte
INSTALL_STATE = "cni-install.json"
#: the installer's last failure, beside its state (install.Installer.problem_file)
INSTALL_ERROR = "cni-install.error"


def _installer(mode: str, cni_bin_dir: str, cni_conf_dir: str, socket_path: str,
               plugin: str | None, state_dir: str) -> Any:
    from merbridge.daemon import install
    plugin = cfgmod.cni_plugin_path(plugin or "")
    if plugin is None:
        from merbridge.cni import zipapp
        click.echo("merbridge: no static merbridge-cni built (scripts/build-cni); installing the "
                   "Python one, which needs python3 on the node", err=True)
        os.makedirs(state_dir, exist_ok=True)
        plugin = zipapp.build_zipapp(os.path.join(state_dir, "merbridge-cni"))
    return install.Installer(cni_bin_dir, cni_conf_dir, plugin,
                             install.plugin_entry(socket_path, mode),
                             state_file=os.path.join(state_dir, INSTALL_STATE))


@main.command("install-cni")
@mode_option
@bin_dir_option
@conf_dir_option
@socket_option
@state_option
@path_option("--plugin", None, "merbridge-cni executable to copy [default: the static build, "
             "see run --cni-plugin].", envvar="MERBRIDGE_CNI_PLUGIN")
def install_cni(mode: str, cni_bin_dir: str, cni_conf_dir: str, socket_path: str, state_dir: str,
                plugin: str | None) -> None:
    """Copy merbridge-cni and chain it into the primary CNI config (once; `run` keeps it there)."""
    from merbridge.daemon import install
    inst = _installer(mode, cni_bin_dir, cni_conf_dir, socket_path, plugin, state_dir)
    try:
        path = inst.install()
    except (OSError, ValueError, install.InstallError) as exc:
        fail(f"install failed: {exc}")
    if path is None:
        fail(f"no CNI config in {cni_conf_dir} yet (the primary CNI writes one); "
             "the binary is installed, run again later", code=2)
    click.echo(f"merbridge-cni chained into {path}")


@main.command("uninstall-cni")
@bin_dir_option
@conf_dir_option
@state_option
def uninstall_cni(cni_bin_dir: str, cni_conf_dir: str, state_dir: str) -> None:
    """Remove merbridge-cni from the CNI config, then its binary."""
    from merbridge.daemon import install
    inst = install.Installer(cni_bin_dir, cni_conf_dir, "", install.plugin_entry(""),
                             state_file=os.path.join(state_dir, INSTALL_STATE))
    try:
        inst.uninstall()
    except (OSError, ValueError) as exc:
        fail(f"uninstall failed: {exc}")
    click.echo("merbridge-cni removed")


# ----------------------------------------------------------------- preStop

@main.command()
@socket_option
@click.option("--timeout", type=click.FloatRange(min=1), default=45.0, show_default=True,
              metavar="SECONDS", help="Give up (exit 1) after this long; keep it below the "
              "pod's terminationGracePeriodSeconds.")
def drain(socket_path: str, timeout: float) -> None:
    """Tell the running daemon to take merbridge-cni out of the CNI config for good
    (the original bytes come back) and report not ready; waits until that is done.
    The daemon's SIGTERM does the rest. Exits 0 when no daemon serves the socket
    (legacy mode, or not running): there is nothing to drain."""
    from merbridge.daemon import drain as client
    try:
        detail = client.request_drain(socket_path, timeout)
    except client.NotServing as exc:
        click.echo(f"merbridge: nothing to drain: {exc}")
        return
    except client.DrainError as exc:
        fail(f"drain failed: {exc}")
    click.echo(f"merbridge drained: {detail}")


if __name__ == "__main__":  # pragma: no cover
    main()
