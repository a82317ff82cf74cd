"""The kernel feature probes (bpf/features.py) on the running kernel: every
feature the datapath uses is there (this is also what the vm tier checks on
Debian's 6.1), a feature the kernel does not have in that program type is
reported missing (so a probe can fail), and the daemon refuses to start with
doctor's message when a feature is missing."""
import errno
import os
import platform

import pytest

from merbridge.bpf import features as F
from merbridge.daemon import doctor

pytestmark = pytest.mark.root


def test_every_feature_probes_present_on_this_kernel():
    results = F.probe_all()
    assert {f.name: why for f, why in results.items() if why is not None} == {}
    assert len(results) == len(F.FEATURES)
    assert doctor.kernel_refusal() == ""


@pytest.mark.parametrize("prog_type,attach,helper,name", [
    # bpf_bind exists, but only in the connect hooks
    (F.PROG_SOCK_OPS, 0, F.FUNC_BIND, "bpf_bind"),
    (F.PROG_CGROUP_SOCK_ADDR, F.ATTACH_UDP4_SENDMSG, F.FUNC_BIND, "bpf_bind"),
    # sockhash updates are sock_ops-only
    (F.PROG_SK_MSG, 0, F.FUNC_SOCK_HASH_UPDATE, "bpf_sock_hash_update"),
    # a helper id no kernel has
    (F.PROG_SOCK_OPS, 0, 100000, ""),
], ids=["bind-in-sockops", "bind-in-sendmsg", "hash-update-in-skmsg", "no-such-helper"])
def test_a_helper_the_program_type_lacks_is_missing(prog_type, attach, helper, name):
    f = F.Feature(f"probe {name}", (9, 9), "a test", prog_type, attach, helper)
    why = F.probe(f)
    assert why is not None and name in why, why


def test_an_attach_type_the_kernel_lacks_is_missing():
    f = F.Feature("attach type 250", (9, 9), "a test", F.PROG_CGROUP_SOCK_ADDR, 250)
    assert F.probe(f) == os.strerror(errno.EINVAL)


def test_a_missing_feature_fails_doctor_with_the_daemons_message():
    """The real probes, plus one feature this kernel cannot have: doctor's
    kernel floor check and the refusal name it with its release."""
    fake = F.Feature("bpf_bind in sock_ops programs", (9, 9), "a test", F.PROG_SOCK_OPS,
                     helper=F.FUNC_BIND)

    def kprobe():
        return {**F.probe_all(), fake: F.probe(fake)}
    checks = doctor.kernel_feature_checks(platform.release(), True, kprobe)
    failed = [c for c in checks if c.status == "fail"]
    assert [c.name for c in failed] == ["kernel feature bpf_bind in sock_ops programs",
                                        "kernel floor"]
    assert "Linux 9.9" in failed[0].detail and "bpf_bind" in failed[0].detail
    message = doctor.kernel_refusal(kprobe=kprobe)
    assert failed[1].detail == message
    assert message.startswith(f"kernel {platform.release()} lacks 1 feature merbridge needs: "
                              "bpf_bind in sock_ops programs (Linux 9.9), needed by a test")

