"""``merbridge run``: wire the datapath, the pod source, the registry and the CNI
server together, and take them apart again on SIGTERM.

Start-up order (each step only when the previous one succeeded):

1. lock the pin dir and the state dir (flock): a second daemon on the same pins
   refuses to start instead of fighting the first over attachments;
2. load the datapath, reusing pins left by a previous (maybe killed) daemon,
   and attach it to the cgroup (the loader never attaches twice);
3. metrics/health endpoint;
4. the pod source (Kubernetes informer, or ``--pods-dir`` manifests) and its
   first full listing;
5. legacy mode: ``mb_local_pods`` := the in-mesh pods of that listing.
   CNI mode: the CNI server, then ``restore`` (re-open the marker listeners and
   re-check XDP of every container in the state file; drop those whose netns is
   gone) and, after a clean stop, ``adopt`` (enrol in-mesh pods that started
   while no daemon ran, found by pod IP in ``--netns-dir``) -- CNI commands
   wait until both are done -- then install the plugin into the CNI config;
6. only then ready (health and the CNI STATUS command say so). From here a
   trimmer hands malloc's idle pages back to the kernel a moment after each
   burst of pod work (daemon/memory.py).

Shutdown (SIGTERM/SIGINT): not ready; remove our conflist entry, then the
plugin binary (a config naming a missing plugin breaks every pod on the node);
detach the cgroup programs; close the marker listeners and detach XDP; remove
the pins; close the CNI socket. The state file stays, so the next daemon
re-enrols pods that are still running. After ``kill -9`` nothing of this runs:
pins, attachments and XDP stay in the kernel and keep intercepting, and the next
start adopts them.

Drain (``merbridge drain``, the DaemonSet's preStop, over the CNI socket):
not ready; stop the CNI installer and remove our conflist entry (the original
bytes come back) and the plugin binary, while the daemon keeps running, so
that neither its inotify re-installer nor anything else chains the plugin in
again. Pods created from then on start without merbridge (the mesh's iptables
take over); the SIGTERM that follows does the rest of the shutdown.
"""
from __future__ import annotations

import errno
import fcntl
import logging
import os
import signal
import threading
from contextlib import ExitStack
from typing import TYPE_CHECKING, Any, Callable, Protocol

from merbridge.bpf import mesh as meshes
from merbridge.cni import errors
from merbridge.cni.errors import CniError
from merbridge.daemon import config as cfgmod
from merbridge.daemon import memory
from merbridge.daemon import pods as podreg
from merbridge.daemon.state import StateStore

if TYPE_CHECKING:   # imported where they are used, as start-up reaches them
    from merbridge.bpf.loader import Datapath
    from merbridge.daemon.ambient import AmbientController
    from merbridge.daemon.cniserver import CniServer
    from merbridge.daemon.install import Installer
    from merbridge.daemon.metrics import Metrics, MetricsServer
    from merbridge.daemon.reconcile import Reconciler

log = logging.getLogger(__name__)

LOCK_FILE = "daemon.lock"
#: the installer's record of the CNI config it changed (original bytes included),
#: so a daemon restarted after kill -9 still restores the file byte for byte;
#: the same name ``merbridge install-cni``/``uninstall-cni`` use (cli.INSTALL_STATE)
INSTALL_STATE = "cni-install.json"


def _import_the_rest(cfg: Any) -> None:
    """Import the modules the start needs after the datapath, while bcc
    compiles it: clang runs without the GIL, so these imports (the kubernetes
    client 1.4 s, pyroute2 0.35 s, prometheus_client 0.2 s on the test
    machine) overlap the compile instead of following it. A failing import
    is left to the real one, which reports it."""
    try:
        from merbridge.daemon import metrics  # noqa: F401
        if cfg.pods_dir:
            from merbridge.daemon import podsdir  # noqa: F401
        else:
            from merbridge.daemon import k8s  # noqa: F401
        if cfg.cni_mode:
            from merbridge.daemon import cniserver, install, podnet  # noqa: F401
        else:
            from merbridge.daemon import netns  # noqa: F401
    except Exception:
        pass


class DaemonError(RuntimeError):
    """Start-up cannot continue; the message says why and what to do."""


class Interrupted(Exception):
    """SIGTERM/SIGINT arrived while start() was still waiting."""


def _dir_lock(path: str, what: str, pid_file: str | None = None) -> int:
    """flock(LOCK_EX|LOCK_NB) on a directory (bpffs allows no regular files)."""
    os.makedirs(path, exist_ok=True)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise
        holder = ""
        if pid_file:
            try:
                with open(pid_file) as f:
                    holder = f" (pid {f.read().strip()})"
            except OSError:
                pass
        raise DaemonError(f"another merbridge daemon{holder} is running with {what} {path}; "
                          "stop it first, or give this one other --bpffs-path/--state-dir "
                          "directories") from None
    return fd


class PodSource(Protocol):
    """Where pods come from: ``k8s.KubernetesPodSource`` or ``podsdir.PodsDirSource``."""

    def start(self) -> None: ...
    def stop(self) -> None: ...
    def wait_synced(self, timeout: float | None = None) -> bool: ...
    def snapshot(self) -> list[dict]: ...
    def namespaces(self) -> list[dict]: ...
    def get(self, namespace: str, name: str) -> dict | None: ...


class Daemon:
    """One daemon instance; ``start()`` returns when it is ready, ``stop()`` undoes it."""

    def __init__(self, config: Any, stopping: threading.Event | None = None):
        self.cfg = config
        self.stopping = stopping or threading.Event()
        self._created_pins = False
        self.mesh = meshes.get(getattr(config, "mesh", None) or config.mode)
        self.ready = threading.Event()
        self.stack = ExitStack()
        self.registry: podreg.Registry | None = None
        self.datapath: Datapath | None = None
        self.source: PodSource | None = None
        self.server: CniServer | None = None
        self.installer: Installer | None = None
        self.metrics: Metrics | None = None
        self.metrics_server: MetricsServer | None = None
        self.reconciler: Reconciler | None = None
        self._installer_thread: threading.Thread | None = None
        self.ambient: AmbientController | None = None   # ambient mode (docs/ambient.md)
        self.trimmer = memory.Trimmer()
        self._drain_lock = threading.Lock()
        self._drained = False

    # -- start -----------------------------------------------------------
    def start(self) -> None:
        try:
            self._start()
        except Interrupted:
            self.stop()
            raise
        except BaseException:
            # pins that were there before us keep running pods intercepted: keep them
            self.stop(unpin=self._created_pins)
            raise

    def is_ready(self) -> bool:
        """Started, and (CNI mode) the plugin chained into a valid CNI config."""
        return self.ready.is_set() and (self.installer is None or self.installer.problem is None)

    def why_not_ready(self) -> str | None:
        """A reason for /readyz's 503 when there is one to give."""
        if self.installer is not None and self.installer.problem is not None:
            return f"CNI install: {self.installer.problem}"
        return None

    def _wait(self, event: threading.Event, what: str) -> None:
        while not event.wait(0.2):
            if self.stopping.is_set():
                raise Interrupted(f"stopped while waiting for {what}")

    def _start(self) -> None:
        cfg = self.cfg
        pid_file = os.path.join(cfg.state_dir, LOCK_FILE)
        for path, what in ((cfg.state_dir, "state dir"), (cfg.bpffs_path, "pin dir")):
            fd = _dir_lock(path, what, pid_file)
            self.stack.callback(os.close, fd)
        with open(pid_file, "w") as f:
            f.write(f"{os.getpid()}\n")

        from merbridge.bpf import loader
        self._created_pins = not any(os.scandir(cfg.bpffs_path))
        self.datapath = loader.Datapath(cfg.bpffs_path, self.mesh, cni_mode=cfg.cni_mode,
                                        ambient=getattr(cfg, "ambient", False))
        warm = threading.Thread(target=_import_the_rest, args=(cfg,), name="warm-imports",
                                daemon=True)
        warm.start()
        self.datapath.load()
        warm.join()
        if cfg.cni_mode:
            # verify the inbound hook's programs now, before we say ready, not in
            # the first pod's ADD (load() compiled both hooks' with the rest)
            if cfg.inbound_hook == "tc":
                self.datapath.tc_programs()
            else:
                self.datapath.xdp_programs()
        self.datapath.attach(cfg.cgroup_path)
        log.info("datapath loaded and attached pins=%s cgroup=%s (%s)", cfg.bpffs_path,
                 cfg.cgroup_path, getattr(cfg, "cgroup_reason", "") or "--cgroup-path")
        # every program is compiled and verified: the compiler's code can go
        paged = memory.page_out_code()
        log.debug("paged out %d bytes of compiler code", paged)

        from merbridge.daemon import metrics
        self.metrics = metrics.Metrics()
        self.metrics.set_heap(self.trimmer.stats)
        self.metrics.set_map_occupancy(self.datapath.maps.occupancy)
        self.metrics.set_datapath_counters(self.datapath.maps.counters)
        self.stack.callback(self.metrics.count_logged_errors(logging.getLogger("merbridge")))
        if cfg.metrics_addr:
            self.metrics_server = metrics.MetricsServer(cfg.metrics_addr, self.metrics,
                                                        ready=self.is_ready,
                                                        why_not_ready=self.why_not_ready)
            self.metrics_server.start()
            log.info("metrics and health on %s:%d", *self.metrics_server.address)
        else:
            log.info("metrics and health endpoint disabled (--metrics-addr '')")

        store = StateStore(cfg.state_dir)
        podnet = None
        if cfg.cni_mode:
            from merbridge.daemon import podnet as podnet_mod
            podnet = podnet_mod.PodNet(self.datapath.xdp_programs,
                                       xdp_mode=getattr(cfg, "xdp_mode", "auto"),
                                       hardware_checksum=cfg.hardware_checksum,
                                       inbound_hook=cfg.inbound_hook,
                                       tc_programs=self.datapath.tc_programs)
        if getattr(cfg, "ambient", False):   # ambient mode (docs/ambient.md)
            from merbridge.daemon import ambient
            self.ambient = ambient.AmbientController(
                self.datapath.maps, cfg.cgroup_path, exclude_namespaces=cfg.exclude_namespaces,
                ztunnel_namespace=cfg.ztunnel_namespace)
        self.source = source = self._pod_source(self._on_pod_event)
        self.registry = registry = podreg.Registry(
            mesh=self.mesh, maps=self.datapath.maps, podnet=podnet, lookup=source.get,
            store=store, cni_mode=cfg.cni_mode, exclude_namespaces=cfg.exclude_namespaces,
            hardware_checksum=cfg.hardware_checksum, metrics=self.metrics)
        if not cfg.cni_mode:
            self.metrics.set_pods_enrolled_source(lambda: len(registry.legacy))
            # pods whose proxy runs as its own UID/GID: their netns by pod IP
            from merbridge.daemon import netns as netns_mod
            netns_dir = cfg.netns_dir
            self.registry.legacy.find_netns_cookie = (
                lambda ips: netns_mod.find_netns_cookie(netns_dir, ips))
        self.source.start()
        while not self.source.wait_synced(0.2):
            if self.stopping.is_set():
                raise Interrupted("stopped while waiting for the first pod listing")
        if cfg.cni_mode:
            self._start_cni(store, registry, source)
        else:
            self.registry.resync_legacy(self.source.snapshot())
        if self.ambient is not None:   # ambient mode
            self.ambient.resync(self.source.snapshot(), self.source.namespaces())
            self.ambient.start()
        self.registry.ready = True
        self.trimmer.start()
        self.trimmer.poke()   # start-up's compile and listing garbage
        self.ready.set()
        log.info("merbridge ready mode=%s cni_mode=%s", self.mesh.name, cfg.cni_mode)

    def _on_pod_event(self, event: str, pod: dict) -> None:
        self.trimmer.poke()
        if self.registry is not None:
            self.registry.on_pod_event(event, pod)
        if self.ambient is not None:   # ambient mode
            self.ambient.on_pod_event(event, pod)

    def _pod_source(self, callback: Callable[[str, dict], None]) -> PodSource:
        cfg = self.cfg
        # ambient mode also follows namespace labels; only then are namespaces watched
        on_namespace = self.ambient.on_namespace if self.ambient is not None else None
        if cfg.pods_dir:
            from merbridge.daemon import podsdir
            return podsdir.PodsDirSource(callback, cfg.pods_dir, on_namespace=on_namespace)
        from merbridge.daemon import k8s
        return k8s.KubernetesPodSource(callback, cfg.node_name, kubeconfig=cfg.kubeconfig,
                                       on_namespace=on_namespace)

    def _start_cni(self, store: StateStore, registry: podreg.Registry,
                   source: PodSource) -> None:
        cfg = self.cfg
        from merbridge.daemon import cniserver, install
        # the registry is the server's handler: a CNI ADD goes socket -> registry -> enroller
        self.server = cniserver.CniServer(cfg.socket_path, registry, drain=self.drain,
                                          observe=self._cni_request)
        # CNI commands wait until the state file is restored and the pods that
        # started while no daemon ran are adopted (pods.py)
        with registry.restoring():
            self.server.start()
            registry.restore(store.load())
            # pods that started while no daemon ran: our plugin was out of the CNI
            # config (a clean stop, or never installed) or could not reach us
            adopted = registry.adopt(source.snapshot(), cfg.netns_dir,
                                     getattr(cfg, "proc_path", None) or None)
        from merbridge.daemon import reconcile
        self.reconciler = reconcile.Reconciler(
            registry, self.server, source.snapshot,
            pending_dir=os.path.join(cfg.state_dir, "pending"), netns_dir=cfg.netns_dir,
            proc_path=getattr(cfg, "proc_path", None) or None, state_dir=cfg.state_dir,
            interval=getattr(cfg, "reconcile_interval", 1.0), metrics=self.metrics)
        self.reconciler.count_adopted(adopted)
        self.reconciler.run_once()         # remembered fail-open ADDs, then unseen pods
        self.reconciler.start()
        self.installer = install.Installer(
            cni_bin_dir=cfg.cni_bin_dir, cni_conf_dir=cfg.cni_conf_dir,
            plugin_source_path=self._plugin_executable(),
            entry=install.plugin_entry(cfg.socket_path, self.mesh.name,
                                       exclude_namespaces=cfg.exclude_namespaces,
                                       fail_open=getattr(cfg, "fail_open", True),
                                       pending_dir=os.path.join(cfg.state_dir, "pending")),
            state_file=os.path.join(cfg.state_dir, INSTALL_STATE))
        self._installer_thread = threading.Thread(target=self.installer.watch,
                                                  name="cni-installer", daemon=True)
        self._installer_thread.start()
        # ready only once the plugin is chained in; a node without a primary CNI
        # config yet keeps us not-ready (and kubelet keeps the node NotReady too)
        self._wait(self.installer.ready, f"a primary CNI config in {cfg.cni_conf_dir}")

    def _plugin_executable(self) -> str:
        """The node's merbridge-cni: the static executable (``--cni-plugin``, or where
        the image and prepare-host put it), which needs nothing from the node. Without
        one, a zipapp of our own merbridge.cni built into the state dir, which needs
        the node's python3 (a warning says so)."""
        found = cfgmod.cni_plugin_path(getattr(self.cfg, "cni_plugin", ""))
        if found is not None:
            return found
        log.warning("no static merbridge-cni found (%s); installing the Python plugin, which "
                    "needs python3 on the node: build it with scripts/build-cni",
                    ", ".join(cfgmod.DEFAULT_CNI_PLUGIN_PATHS))
        from merbridge.cni import zipapp
        return zipapp.build_zipapp(os.path.join(self.cfg.state_dir, "merbridge-cni"))

    def _cni_request(self, command: str, result: str, seconds: float) -> None:
        """Each CNI request the server answered: counted, and a request that
        changes pods pokes the heap trimmer."""
        if self.metrics is not None:   # created before the server that calls this
            self.metrics.cni_request(command, result, seconds)
        if command in ("ADD", "DEL", "GC"):
            self.trimmer.poke()

    # -- stop ------------------------------------------------------------
    def stop(self, unpin: bool = True) -> None:
        """Undo start(), each step independent of the others' success."""
        self.ready.clear()
        if self.registry is not None:
            self.registry.ready = False
        steps = []
        if self.reconciler is not None:
            steps.append(("stop the reconciler", self.reconciler.stop))
        if self.installer is not None:
            steps += [("stop the CNI installer", self._stop_installer),
                      ("uninstall the CNI plugin", self.installer.uninstall)]
        if self.ambient is not None:   # ambient mode
            steps.append(("stop ambient mode", self.ambient.stop))
        if self.datapath is not None:
            steps.append(("detach the cgroup programs", self.datapath.detach))
        if self.registry is not None:
            steps.append(("close listeners and detach XDP", self.registry.shutdown))
        if self.source is not None:
            steps.append(("stop the pod source", self.source.stop))
        if self.datapath is not None and unpin:
            steps.append(("remove the pins", self.datapath.unpin))
        if self.datapath is not None:
            steps.append(("release the programs", self.datapath.close))
        if self.server is not None:
            steps.append(("close the CNI socket", self.server.stop))
        if self.metrics_server is not None:
            steps.append(("stop the metrics server", self.metrics_server.stop))
        steps.append(("stop the heap trimmer", self.trimmer.stop))
        for what, fn in steps:
            try:
                fn()
            except Exception:
                log.exception("shutdown: failed to %s", what)
        self.stack.close()
        log.info("merbridge stopped")

    def _stop_installer(self) -> None:
        if self.installer is not None:
            self.installer.stop()
        if self._installer_thread is not None:
            self._installer_thread.join(timeout=5)

    def drain(self) -> str:
        """preStop: not ready, and the CNI config as it was before us (see the module
        docstring). Idempotent; refused (try again) while starting or stopping."""
        with self._drain_lock:
            if self._drained:
                return "already drained"
            # (the installer, CNI mode's last piece, exists only with a registry)
            if not self.ready.is_set() or self.installer is None or self.registry is None:
                raise CniError(errors.TRY_AGAIN_LATER, "merbridge is not ready",
                               "starting or stopping; drain again in a moment")
            self._drained = True
            self.ready.clear()
            self.registry.ready = False
            self.registry.draining = True       # STATUS: "merbridge is draining"
            self._stop_installer()
            self.installer.uninstall()
        log.info("drained: merbridge-cni removed from %s; waiting for SIGTERM",
                 self.cfg.cni_conf_dir)
        return f"merbridge-cni removed from {self.cfg.cni_conf_dir}"


def run(config: Any) -> int:
    """Run until SIGTERM/SIGINT; the exit status for the CLI."""
    stopping = threading.Event()
    got: list[int] = []

    def on_signal(signum, _frame):
        got.append(signum)
        stopping.set()
    old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    daemon = Daemon(config, stopping)
    try:
        try:
            daemon.start()
        except Interrupted:
            log.info("stopped before becoming ready")
            return 0
        except DaemonError as exc:
            log.error("%s", exc)
            return 1
        except Exception as exc:
            log.debug("start-up failed", exc_info=True)
            log.error("cannot start: %s: %s", type(exc).__name__, exc)
            return 1
        while not stopping.wait(1):
            pass
        log.info("received %s, shutting down", signal.Signals(got[0]).name)
        daemon.stop()
        return 0
    finally:
        for s, h in old.items():
            signal.signal(s, h)
