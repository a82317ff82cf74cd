#!/bin/sh
# Runs inside the virtme-ng guest (see run.py): guest.sh OUT
# OUT is a directory shared with the host. Prepares what a node has and
# virtme's minimal init does not (bpffs, an open-file limit fit for haproxy
# sidecars), runs the NUL-separated command in OUT/argv, and leaves its output,
# exit status and the guest's kernel release in OUT.
out=$1
exec >"$out/log" 2>&1
uname -r >"$out/uname"
mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf
ulimit -n 65536
export TMPDIR=/tmp PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 MERBRIDGE_TEST_READY_SCALE=8
echo "guest: $(uname -r), $(nproc) CPUs, $(awk '/MemTotal/{print $2" kB"}' /proc/meminfo)"
xargs -0 -a "$out/argv" sh -c '"$@" -p no:cacheprovider --durations=15; echo $? >"$0/rc"' "$out"
