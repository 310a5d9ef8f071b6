# Stage 2 of the guest (PID 1, run by busybox sh from the host's tree): finish the system mounts, make
# modules autoload from the cached kernel tree, run the job from /run/guest/results/job.env, write its exit
# status to /run/guest/results/rc and power off. Everything here runs inside the throwaway guest.
bb=/run/guest/busybox
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
. /run/guest/results/job.env
# A fresh /tmp, unless the repository itself lives there (a CI clone): the overlay keeps it writable anyway.
case "$GUEST_CWD" in /tmp/*) ;; *) $bb mount -t tmpfs -o mode=1777 tmpfs /tmp ;; esac
$bb mount -t devpts devpts /dev/pts 2>/dev/null
$bb mount -t tmpfs tmpfs /dev/shm 2>/dev/null
$bb mount -t cgroup2 cgroup2 /sys/fs/cgroup
$bb mount -t bpf bpf /sys/fs/bpf
$bb mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null
$bb mount --make-rshared /
# Modules: /lib/modules/VERSION must be the cached tree for busybox modprobe, in the overlay root.
release=$($bb uname -r)
$bb rm -rf "/lib/modules/$release"
$bb mkdir -p /lib/modules
$bb ln -s "$GUEST_MODULES" "/lib/modules/$release"
printf '#!/run/guest/busybox sh\nexec /run/guest/busybox modprobe "$@"\n' > /run/guest/modprobe
$bb chmod 755 /run/guest/modprobe
echo /run/guest/modprobe > /proc/sys/kernel/modprobe
for module in $GUEST_PRELOAD; do /run/guest/modprobe "$module" || echo "guest: modprobe $module failed"; done
$bb hostname kproxyd-guest
$bb ip link set lo up
export HOME=/tmp/home TMPDIR=/tmp PYTHONUNBUFFERED=1 KPROXYD_GUEST=1
$bb mkdir -p "$HOME"
echo "guest: kernel $release ready after $($bb cut -d' ' -f1 /proc/uptime) s"
# /usr/bin/env execs the real programs: this busybox sh would otherwise prefer its own applets (ip, sh).
cd "$GUEST_CWD" && eval "/usr/bin/env $GUEST_COMMAND"
echo $? > /run/guest/results/rc.tmp
$bb mv /run/guest/results/rc.tmp /run/guest/results/rc
$bb sync
echo "guest: done after $($bb cut -d' ' -f1 /proc/uptime) s"
$bb poweroff -f
