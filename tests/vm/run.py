"""Run root tests inside a second kernel: Debian's 6.1 LTS, booted by virtme-ng.

The guest is qemu (TCG: ``--disable-kvm``, since nested KVM is refused on
these machines) over the host's root filesystem, read-only, with copy-on-write
overlays on /etc, /tmp, /var...; the kernel image and its modules come from a
private directory that scripts/prepare-host unpacks from Debian's
``linux-image-<abi>-amd64-unsigned`` package (the host's /boot, grub and
/lib/modules are never touched); the guest sees those modules at
/lib/modules/<abi>, next to the build/ symlink to the matching headers, so bcc
compiles there as on a real 6.1 node (virtme-ng finds them from the image's
path: <dir>/boot/vmlinuz-<abi> -> <dir>/lib/modules/<abi>).

    python tests/vm/run.py                 # the tests listed in tests/vm/subset.txt
    python tests/vm/run.py -x -v           # the subset, with these pytest options
    python tests/vm/run.py tests/root/test_doctor.py -x   # other tests instead

Exit status: pytest's in the guest; 3 when the guest did not run the 6.1
kernel or did not report back (never a pass by accident on the host kernel).
"""
from __future__ import annotations

import glob
import os
import signal
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
TOP = os.path.dirname(os.path.dirname(HERE))
KERNEL_DIR = os.environ.get("MERBRIDGE_VM_KERNEL_DIR", "/usr/local/lib/merbridge/vm-kernel")
SUBSET = os.path.join(HERE, "subset.txt")
TIMEOUT = int(os.environ.get("MERBRIDGE_VM_TIMEOUT", "2700"))   # seconds, boot included
GUEST = os.path.join(HERE, "guest.sh")


def subset(path: str = SUBSET) -> list[str]:
    """The pytest node ids of the list file (comments and blank lines dropped)."""
    with open(path, encoding="utf-8") as f:
        return [line.split("#", 1)[0].strip() for line in f if line.split("#", 1)[0].strip()]


def find_kernel(kernel_dir: str = KERNEL_DIR) -> tuple[str, str, str]:
    """(vmlinuz path, kernel release, modules dir) of the unpacked package."""
    images = sorted(glob.glob(os.path.join(kernel_dir, "boot", "vmlinuz-*")))
    if not images:
        raise SystemExit(f"vm: no kernel under {kernel_dir}/boot: run scripts/prepare-host "
                         "(or set MERBRIDGE_VM_KERNEL_DIR)")
    image = images[-1]
    release = os.path.basename(image)[len("vmlinuz-"):]
    mods = os.path.join(kernel_dir, "lib", "modules", release)
    if not os.path.exists(os.path.join(mods, "modules.dep")):
        raise SystemExit(f"vm: {mods}/modules.dep is missing: run scripts/prepare-host")
    return image, release, mods


def main(argv: list[str]) -> int:
    image, release, mods = find_kernel()
    vng = shutil.which("vng")
    if vng is None:
        raise SystemExit("vm: vng (PyPI virtme-ng) is not on PATH: run through `tox -e vm`")
    args = argv if any(not a.startswith("-") for a in argv) else [*subset(), *argv]
    cpus = os.environ.get("MERBRIDGE_VM_CPUS", "2")
    memory = os.environ.get("MERBRIDGE_VM_MEMORY", "3G")
    out = tempfile.mkdtemp(prefix="merbridge-vm-")
    try:
        # the command travels in a file: virtme passes --exec on the kernel's
        # command line, which x86 truncates at 2048 bytes
        with open(os.path.join(out, "argv"), "w", encoding="utf-8") as f:
            f.write("\0".join([sys.executable, "-m", "pytest", *args]))
        cmd = [vng, "--run", image, "--disable-kvm", "--cpus", cpus, "--memory", memory,
               f"--rwdir={out}", "--cwd", TOP, "--exec", f"{GUEST} {out}"]
        print(f"vm: booting {release} ({image}) with {cpus} CPUs, {memory}; {len(args)} args",
              flush=True)
        started = time.monotonic()
        # the guest's output goes to its log (the console of a TCG guest without
        # udev has no script I/O ports); the tail runs while it is written
        log = os.path.join(out, "log")
        open(log, "w").close()
        with subprocess.Popen(["tail", "-n", "+1", "-F", log]) as tail, \
                subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True, start_new_session=True) as vm:
            try:
                console, _ = vm.communicate(timeout=TIMEOUT)
            except subprocess.TimeoutExpired:
                os.killpg(vm.pid, signal.SIGKILL)
                console, _ = vm.communicate()
                print(f"vm: killed the guest after {TIMEOUT} s", file=sys.stderr)
            finally:
                time.sleep(1)
                tail.terminate()
        took = time.monotonic() - started
        try:
            with open(os.path.join(out, "rc"), encoding="ascii") as f:
                rc = int(f.read().strip())
        except (OSError, ValueError):
            sys.stderr.write(console[-4000:])
            print(f"vm: the guest reported no exit status (vng exited {vm.returncode}) "
                  f"after {took:.0f} s", file=sys.stderr)
            return 3
        with open(os.path.join(out, "uname"), encoding="ascii") as f:
            seen = f.read().strip()
        if seen != release:
            print(f"vm: the guest ran {seen!r}, not {release!r}", file=sys.stderr)
            return 3
        print(f"vm: pytest in {release} exited {rc} after {took:.0f} s (boot included)")
        return rc
    finally:
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
