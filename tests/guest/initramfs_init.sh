#!/bin/busybox sh
# Stage 1 (/init of the guest's initramfs): load virtio + 9p + overlay, mount the host's / read-only under a
# tmpfs overlay, mount the writable results share, then switch_root into the repo's stage-2 script.
# The kernel hands unknown `key=value` boot parameters to init as environment: kproxyd_stage2 is one.
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for module in $(cat /modules/order); do insmod "/modules/$module" || echo "guest: insmod $module failed"; done
mkdir -p /lower /rw /newroot
opts=trans=virtio,version=9p2000.L,cache=loose,msize=512000
mount -t 9p -o "ro,$opts" hostroot /lower || { echo "guest: cannot mount the host root"; poweroff -f; }
mount -t tmpfs -o mode=0755 tmpfs /rw
mkdir -p /rw/upper /rw/work
mount -t overlay overlay -o lowerdir=/lower,upperdir=/rw/upper,workdir=/rw/work /newroot
mount -t tmpfs -o mode=0755 tmpfs /newroot/run
mkdir -p /newroot/run/guest/results
mount -t 9p -o "$opts" results /newroot/run/guest/results
cp /bin/busybox /newroot/run/guest/busybox
for fs in proc sys dev; do mount --move "/$fs" "/newroot/$fs"; done
exec switch_root /newroot /run/guest/busybox sh "$kproxyd_stage2"
