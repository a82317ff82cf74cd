"""The cluster manifests under deploy/: schema-valid, consistent, complete.

Every manifest (deploy/all-in-one.yaml and each kustomize overlay, rendered
with the real ``kubectl kustomize``; no cluster is contacted) is validated
offline with kubernetes-validate in strict mode against the oldest and the
newest Kubernetes schema that package bundles. The rest pins down what the
node daemon needs from its DaemonSet (mounts, identity, probes, privileges),
that the documented ``sed`` switch to CNI mode yields exactly the cni overlay,
that the arguments are accepted by the real ``merbridge run`` command line,
and that the Dockerfile keeps the essentials that cannot be tested by
building it here.
"""
from __future__ import annotations

import copy
import functools
import importlib.resources
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import click
import kubernetes_validate
import pytest
import yaml

TOP = Path(__file__).resolve().parents[2]
DEPLOY = TOP / "deploy"
OVERLAYS = ("legacy", "cni", "hardware-checksum")
SED = "s/--cni-mode=false/--cni-mode=true/g"


# --- helpers --------------------------------------------------------------

def _schema_versions() -> list[str]:
    """Kubernetes versions with a bundled strict schema, oldest first."""
    root = importlib.resources.files("kubernetes_validate") / "kubernetes-json-schema"
    found = set()
    for entry in root.iterdir():
        m = re.fullmatch(r"v(\d+)\.(\d+)\.(\d+)-local-strict", entry.name)
        if m:
            found.add(tuple(int(x) for x in m.groups()))
    assert found, f"no strict schemas bundled under {root}"
    return [".".join(map(str, v)) for v in sorted(found)]


VERSIONS = _schema_versions()
EDGE_VERSIONS = sorted({VERSIONS[0], VERSIONS[-1]}, key=VERSIONS.index)


def _kubectl() -> str:
    path = shutil.which("kubectl")
    if path is None:
        pytest.fail("kubectl (with built-in kustomize) is required to render deploy/kustomize")
    return path


@functools.cache
def _render_text(overlay: str) -> str:
    res = subprocess.run(
        [_kubectl(), "kustomize", str(DEPLOY / "kustomize" / "overlays" / overlay)],
        capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, f"kubectl kustomize {overlay} failed:\n{res.stderr}"
    return res.stdout


def rendered(overlay: str) -> list[dict]:
    return list(yaml.safe_load_all(_render_text(overlay)))


def all_in_one_text() -> str:
    return (DEPLOY / "all-in-one.yaml").read_text()


def all_in_one() -> list[dict]:
    return [d for d in yaml.safe_load_all(all_in_one_text()) if d is not None]


def sources() -> dict[str, list[dict]]:
    out = {"all-in-one": all_in_one()}
    out.update({f"overlay/{o}": rendered(o) for o in OVERLAYS})
    return out


def one(docs: list[dict], kind: str) -> dict:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def container(docs: list[dict]) -> dict:
    spec = one(docs, "DaemonSet")["spec"]["template"]["spec"]
    assert len(spec["containers"]) == 1
    return spec["containers"][0]


def flags(args: list[str]) -> dict[str, str]:
    """``--name=value`` arguments as a dict (every flag in the manifests uses '=')."""
    out = {}
    for a in args:
        if a.startswith("--"):
            name, sep, value = a.partition("=")
            assert sep, f"flag {a!r} should be written as --name=value"
            assert name not in out, f"flag {name} given twice"
            out[name] = value
    return out


def mounts(docs: list[dict]) -> dict[str, dict]:
    """mountPath -> {hostPath, propagation, readOnly} for the daemon container."""
    spec = one(docs, "DaemonSet")["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    out = {}
    for m in container(docs)["volumeMounts"]:
        vol = volumes[m["name"]]
        assert "hostPath" in vol, f"volume {m['name']} is not a hostPath"
        assert "subPath" not in m, "subPath mounts do not receive mount propagation"
        out[m["mountPath"]] = {
            "hostPath": vol["hostPath"]["path"],
            "propagation": m.get("mountPropagation", "None"),
            "readOnly": m.get("readOnly", False),
        }
    return out


def host_path_of(docs: list[dict], path: str) -> str:
    """Translate a path inside the container to the host path it shows."""
    best = None
    for mpath, m in mounts(docs).items():
        if path == mpath or path.startswith(mpath.rstrip("/") + "/"):
            if best is None or len(mpath) > len(best[0]):
                best = (mpath, m["hostPath"])
    assert best is not None, f"{path} is not on any host mount"
    return best[1] + path[len(best[0]):]


# --- schema validation ------------------------------------------------------

def test_schema_versions_are_discovered():
    assert len(VERSIONS) >= 2
    assert EDGE_VERSIONS == [VERSIONS[0], VERSIONS[-1]]


@pytest.mark.parametrize("version", EDGE_VERSIONS)
@pytest.mark.parametrize("source", ["all-in-one"] + [f"overlay/{o}" for o in OVERLAYS])
def test_manifest_is_schema_valid_strict(source, version):
    docs = sources()[source]
    assert [d["kind"] for d in docs] == [
        "Namespace", "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "DaemonSet"]
    for doc in docs:
        used = kubernetes_validate.validate(doc, version, strict=True)
        # the schema of exactly this version was used, not an older fallback
        assert used == ".".join(version.split(".")[:2])


@pytest.mark.parametrize("mutate, message", [
    (lambda ds: ds["spec"]["template"]["spec"].__setitem__("hostNetwork", "yes"), "boolean"),
    (lambda ds: ds["spec"].__setitem__("replicas", 1), "replicas"),
    (lambda ds: ds["spec"].pop("selector"), "selector"),
])
def test_validator_rejects_a_broken_daemonset(mutate, message):
    # proves the validation above can fail: strict mode catches unknown
    # fields, types and missing required fields on our own DaemonSet
    ds = copy.deepcopy(one(all_in_one(), "DaemonSet"))
    mutate(ds)
    with pytest.raises(kubernetes_validate.ValidationError) as err:
        kubernetes_validate.validate(ds, VERSIONS[-1], strict=True)
    assert message in str(err.value.message)


# --- generation and mode switches -----------------------------------------

def test_all_in_one_is_the_rendered_legacy_overlay():
    assert all_in_one() == rendered("legacy")
    text = all_in_one_text()
    assert text.startswith("# merbridge, legacy mode. GENERATED by deploy/render")
    # nothing but the header precedes the rendered YAML (compared as data
    # above, so another kubectl's formatting cannot fail this test)
    header, _, _ = text.partition("apiVersion:")
    assert all(line.startswith("#") for line in header.splitlines())


def test_readme_documents_the_real_switches():
    readme = (DEPLOY / "README.md").read_text()
    assert f"sed '{SED}' deploy/all-in-one.yaml | kubectl apply -f -" in readme
    assert f"sed '{SED}' deploy/all-in-one.yaml | kubectl apply -f -" in all_in_one_text()
    for overlay in re.findall(r"deploy/kustomize/overlays/([\w-]+)", readme):
        assert overlay in OVERLAYS, overlay
    assert "kubectl delete -f deploy/all-in-one.yaml" in readme


def test_sed_switch_yields_exactly_the_cni_overlay():
    text = all_in_one_text()
    body = [ln for ln in text.splitlines() if not ln.lstrip().startswith("#")]
    assert sum(ln.count("--cni-mode=false") for ln in body) == 1
    res = subprocess.run(["sed", SED], input=text, capture_output=True, text=True, check=True)
    switched = [d for d in yaml.safe_load_all(res.stdout) if d is not None]
    assert switched == rendered("cni")
    assert switched != all_in_one()


def test_overlays_differ_only_in_mode_flags():
    base = rendered("legacy")
    want = {
        "legacy": {"--cni-mode": "false", "--hardware-checksum": "false"},
        "cni": {"--cni-mode": "true", "--hardware-checksum": "false"},
        "hardware-checksum": {"--cni-mode": "true", "--hardware-checksum": "true",
                              "--inbound-hook": "xdp"},
    }
    common = None
    for overlay, mode in want.items():
        docs = rendered(overlay)
        f = flags(container(docs)["args"])
        assert {k: f[k] for k in mode} == mode
        rest = [a for a in container(docs)["args"]
                if a.partition("=")[0] not in mode and a.partition("=")[0] != "--inbound-hook"]
        common = common or rest
        assert rest == common
        # outside the args, identical to the legacy rendering
        stripped = copy.deepcopy(docs)
        container(stripped)["args"] = container(base)["args"]
        assert stripped == base


# --- what the daemon needs from its pod ---------------------------------

@pytest.fixture(scope="module")
def docs() -> list[dict]:
    return all_in_one()


def test_daemonset_pod_identity_and_placement(docs):
    ds = one(docs, "DaemonSet")
    spec = ds["spec"]["template"]["spec"]
    assert spec["hostNetwork"] is True
    assert spec.get("hostPID", False) is False
    assert spec["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert spec["priorityClassName"] == "system-node-critical"
    assert spec["nodeSelector"] == {"kubernetes.io/os": "linux"}
    # a toleration without key and with operator Exists tolerates every taint
    assert {"operator": "Exists"} in spec["tolerations"]
    assert spec["terminationGracePeriodSeconds"] >= 30
    assert ds["spec"]["updateStrategy"] == {
        "type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1}}
    c = container(docs)
    assert c["securityContext"]["privileged"] is True
    assert c["resources"]["requests"] and c["resources"]["limits"]["memory"]


def test_daemonset_mounts(docs):
    m = mounts(docs)
    assert m["/sys/fs/cgroup"]["hostPath"] == "/sys/fs/cgroup"
    assert m["/sys/fs/bpf"] == {"hostPath": "/sys/fs/bpf", "propagation": "Bidirectional",
                                "readOnly": False}
    assert m["/host/proc"]["hostPath"] == "/proc"
    assert m["/lib/modules"] == {"hostPath": "/lib/modules", "propagation": "None",
                                 "readOnly": True}
    assert m["/usr/src"] == {"hostPath": "/usr/src", "propagation": "None", "readOnly": True}
    assert m["/host/opt/cni/bin"]["hostPath"] == "/opt/cni/bin"
    assert m["/host/etc/cni/net.d"]["hostPath"] == "/etc/cni/net.d"
    # pod netns bind mounts appear after the daemon started: they must
    # propagate from the host, at the very path CNI_NETNS names
    assert m["/var/run/netns"]["hostPath"] == "/var/run/netns"
    assert m["/var/run/netns"]["propagation"] in ("HostToContainer", "Bidirectional")
    # never all of /var/run (or /run): the service-account token is mounted
    # below /var/run/secrets and would end up on the host
    assert not {"/var/run", "/run"} & set(m)


def test_path_flags_point_at_host_mounts(docs):
    f = flags(container(docs)["args"])
    # no --cgroup-path: the daemon finds the cgroup2 mount (the host's, below)
    # and attaches to the kubelet's pods cgroup in it (docs/security.md)
    assert "--cgroup-path" not in f
    assert host_path_of(docs, f["--bpffs-path"]).startswith("/sys/fs/bpf/")
    assert host_path_of(docs, f["--cni-bin-dir"]) == "/opt/cni/bin"
    assert host_path_of(docs, f["--cni-conf-dir"]) == "/etc/cni/net.d"
    # the host-side plugin dials the socket by the same path the daemon binds
    assert host_path_of(docs, f["--socket-path"]) == f["--socket-path"]
    # the state file must outlive the pod, or a restarted daemon cannot undo
    # or re-enrol what the previous one did
    assert host_path_of(docs, f["--state-dir"]) == "/var/run/merbridge"


def test_node_name_comes_from_the_downward_api(docs):
    c = container(docs)
    env = {e["name"]: e for e in c["env"]}
    assert env["NODE_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}
    assert flags(c["args"])["--node-name"] == "$(NODE_NAME)"


def test_metrics_only_on_the_nodes_loopback_and_probes_follow(docs):
    """With hostNetwork, a 0.0.0.0 metrics address would serve every node
    address: the manifests use the node's loopback, which the kubelet's
    probes reach, and declare no port."""
    c = container(docs)
    host, port = flags(c["args"])["--metrics-addr"].rsplit(":", 1)
    assert host == "127.0.0.1"
    assert "ports" not in c
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    for kind in ("livenessProbe", "readinessProbe", "startupProbe"):
        assert c[kind]["httpGet"]["host"] == "127.0.0.1", kind
        assert c[kind]["httpGet"]["port"] == int(port), kind


def test_rbac_matches_the_daemonset(docs):
    ns = one(docs, "Namespace")["metadata"]["name"]
    ds = one(docs, "DaemonSet")
    sa = one(docs, "ServiceAccount")
    assert ds["metadata"]["namespace"] == sa["metadata"]["namespace"] == ns
    assert ds["spec"]["template"]["spec"]["serviceAccountName"] == sa["metadata"]["name"]
    binding = one(docs, "ClusterRoleBinding")
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": sa["metadata"]["name"], "namespace": ns}]
    role = one(docs, "ClusterRole")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    granted = {(res, verb) for r in role["rules"] if r["apiGroups"] == [""]
               for res in r["resources"] for verb in r["verbs"]}
    for res, verbs in {"pods": "get list watch", "nodes": "get",
                       "namespaces": "get list watch"}.items():
        for verb in verbs.split():
            assert (res, verb) in granted
    # read-only
    assert not {v for _, v in granted} - {"get", "list", "watch"}
    # privileged pods must be admitted in our namespace
    labels = one(docs, "Namespace")["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "privileged"


# --- the args against the real command line -----------------------------

def _run_command() -> click.Command:
    from merbridge.daemon import cli
    group = cli.main if isinstance(cli.main, click.Group) else cli.cli
    assert isinstance(group, click.Group)
    return group.commands["run"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_args_are_accepted_by_merbridge_run(overlay):
    c = container(rendered(overlay))
    assert c["command"] == ["merbridge"]
    args = [a.replace("$(NODE_NAME)", "node-1") for a in c["args"]]
    assert args[0] == "run"
    cmd = _run_command()
    # make_context parses and converts every option exactly as `merbridge run`
    # would, without invoking it; a rejected flag raises a click error
    with cmd.make_context("run", args[1:]) as ctx:
        params = ctx.params
    want = flags(c["args"])
    by_opt = {opt: p.name for p in cmd.params for opt in getattr(p, "opts", [])}
    assert params[by_opt["--cni-mode"]] is (want["--cni-mode"] == "true")
    assert params[by_opt["--hardware-checksum"]] is (want["--hardware-checksum"] == "true")
    assert params[by_opt["--node-name"]] == "node-1"
    assert params[by_opt["--mode"]] == "istio"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_prestop_drains_the_daemon_within_the_grace_period(overlay):
    docs = rendered(overlay)
    c = container(docs)
    argv = c["lifecycle"]["preStop"]["exec"]["command"]
    assert argv[:2] == ["merbridge", "drain"]
    from merbridge.daemon import cli
    cmd = cli.main.commands["drain"]
    with cmd.make_context("drain", argv[2:]) as ctx:
        params = ctx.params
    # it dials the socket the daemon serves, and gives up before the kubelet's SIGKILL
    assert params["socket_path"] == flags(c["args"])["--socket-path"]
    grace = one(docs, "DaemonSet")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert params["timeout"] + 20 <= grace


# --- the image ------------------------------------------------------------

def _dockerfile() -> list[list[str]]:
    """Dockerfile instructions as [KEYWORD, rest] with continuations joined."""
    text = (DEPLOY / "Dockerfile").read_text()
    text = re.sub(r"\\\n", " ", text)
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append([word.upper(), rest.strip()])
    return out


def test_dockerfile_essentials():
    ins = _dockerfile()
    froms = [rest for word, rest in ins if word == "FROM"]
    assert froms and all(re.match(r"debian:bookworm(-slim)?(@\S+)?( AS \w+)?$", f)
                         for f in froms)
    runs = " ; ".join(rest for word, rest in ins if word == "RUN")
    apts = re.findall(r"apt-get install ([^;&]*)", runs)
    assert apts, "no apt-get install"
    pkgs = set(shlex.split(apts[-1]))             # the final stage's
    assert {"python3", "python3-venv", "python3-bpfcc", "bpftool", "iproute2", "ethtool",
            "ca-certificates"} <= pkgs
    # bcc is importable only from Debian's site packages
    assert re.search(r"/usr/bin/python3 -m venv --system-site-packages (\S+)", runs)
    venv = re.search(r"--system-site-packages (\S+)", runs).group(1)
    copies = [rest.split() for word, rest in ins if word == "COPY"]
    assert any(c[0] == "." for c in copies), "the build context is not copied"
    src = next(c[1] for c in copies if c[0] == ".")
    assert f"{venv}/bin/pip install" in runs and src in runs
    # the node's merbridge-cni: static, built in its own stage (no Go in the
    # image), shipped where the daemon looks for it first
    from merbridge.daemon.config import DEFAULT_CNI_PLUGIN_PATHS
    assert "scripts/build-cni" in runs and "golang-go" in shlex.split(apts[0])
    assert ["--from=cni", "/out/merbridge-cni", DEFAULT_CNI_PLUGIN_PATHS[0]] in copies
    entry = [rest for word, rest in ins if word == "ENTRYPOINT"]
    assert entry == ['["merbridge"]']
    env = " ".join(rest for word, rest in ins if word == "ENV")
    assert f"PATH={venv}/bin:" in env
    # the DaemonSet runs the same entry point, which setup.cfg installs
    assert container(all_in_one())["command"] == ["merbridge"]
    assert re.search(r"^\s*merbridge = merbridge\.daemon\.cli:main", (TOP / "setup.cfg").read_text(),
                     re.M)


def test_dockerignore_keeps_local_state_out():
    ignored = {ln.strip() for ln in (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
               if ln.strip() and not ln.startswith("#")}
    assert {".git", ".venv", ".tox"} <= ignored
