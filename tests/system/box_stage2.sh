#!/bin/bash
# Stage 2 of the test box (see box.py): runs as PID 1 of a fresh pid namespace, inside fresh
# mount/net/uts/ipc/cgroup namespaces, still seeing the host's root. It builds the box's root
# file system and replaces itself with systemd:
#
#   overlay: lower = BOX_LOWER (default: the host's "/"), upper/work = DIR/upper, DIR/work
#   /proc (own pid ns; /proc/sys read-only except net), /sys read-only, /sys/fs/cgroup =
#   cgroup2 of our cgroup namespace, a minimal /dev, tmpfs /run and /tmp, own machine-id and
#   hostname, a boot target that starts nothing but sysinit + sockets, runtime masks for
#   host services and timers, loopback up, pivot_root, exec systemd with a reduced
#   capability bounding set.
#
# Usage (only from box.py): box_stage2.sh DIR
# Environment: BOX_LOWER (":"-separated lower dirs, top first; empty = "/"), BOX_MASK (extra
# units to mask), BOX_KEEP_POLICY_RC=1 (keep /usr/sbin/policy-rc.d).
set -euo pipefail
exec 2>&1
DIR=$1
R=$DIR/root
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
LOWER=${BOX_LOWER:-/}

# Capabilities that act on host-global kernel state which namespaces do not isolate.
DROP_CAPS=-sys_module,-sys_time,-sys_rawio,-syslog,-audit_control,-audit_read,-wake_alarm,-block_suspend,-mac_admin,-mac_override,-sys_pacct

# Units that must not run in a test box: logins, host daemons, timers that take the dpkg lock,
# units that would write host kernel state.
MASK=(
  getty@.service serial-getty@.service console-getty.service container-getty@.service getty-static.service
  postgresql.service postgresql@.service redis-server.service nginx.service apache2.service
  systemd-timesyncd.service systemd-time-wait-sync.service
  apt-daily.timer apt-daily-upgrade.timer apt-daily.service apt-daily-upgrade.service
  dpkg-db-backup.timer dpkg-db-backup.service man-db.timer man-db.service
  e2scrub_all.timer e2scrub_all.service e2scrub_reap.service fstrim.timer fstrim.service logrotate.timer
  systemd-modules-load.service kmod-static-nodes.service systemd-sysctl.service
  systemd-binfmt.service proc-sys-fs-binfmt_misc.automount proc-sys-fs-binfmt_misc.mount
  systemd-pstore.service systemd-hwdb-update.service systemd-remount-fs.service
  systemd-machine-id-commit.service systemd-firstboot.service systemd-journald-audit.socket
  sys-kernel-debug.mount sys-kernel-tracing.mount sys-kernel-config.mount sys-fs-fuse-connections.mount
)

echo "box[stage2]: root $R on lower $LOWER"
mkdir -p "$DIR/upper" "$DIR/work" "$R"
mount -t overlay appliance-box -o "lowerdir=$LOWER,upperdir=$DIR/upper,workdir=$DIR/work" "$R"
mkdir -p "$R/proc" "$R/sys" "$R/dev" "$R/run" "$R/tmp" "$R/etc"

# API file systems
mount -t proc -o nosuid,nodev,noexec proc "$R/proc"
mount --bind "$R/proc/sys" "$R/proc/sys"
mount -o remount,bind,ro,nosuid,nodev,noexec "$R/proc/sys"
mount --bind "$R/proc/sys/net" "$R/proc/sys/net"
mount -o remount,bind,rw,nosuid,nodev,noexec "$R/proc/sys/net"
if [ -e "$R/proc/sysrq-trigger" ]; then
  mount --bind "$R/proc/sysrq-trigger" "$R/proc/sysrq-trigger"
  mount -o remount,bind,ro "$R/proc/sysrq-trigger"
fi
mount -t sysfs -o ro,nosuid,nodev,noexec sysfs "$R/sys"
mount -t cgroup2 -o nosuid,nodev,noexec cgroup2 "$R/sys/fs/cgroup"

mount -t tmpfs -o mode=0755,nosuid,size=4m box-dev "$R/dev"
for spec in "null 1 3" "zero 1 5" "full 1 7" "random 1 8" "urandom 1 9" "tty 5 0"; do
  set -- $spec
  mknod -m 0666 "$R/dev/$1" c "$2" "$3"
done
mkdir -m 0755 "$R/dev/pts" "$R/dev/shm" "$R/dev/mqueue" "$R/dev/hugepages"
mount -t devpts -o newinstance,ptmxmode=0666,mode=0620,gid=5,nosuid,noexec devpts "$R/dev/pts"
ln -s pts/ptmx "$R/dev/ptmx"
mount -t tmpfs -o mode=1777,nosuid,nodev shm "$R/dev/shm"
ln -s /proc/self/fd "$R/dev/fd"
ln -s /proc/self/fd/0 "$R/dev/stdin"
ln -s /proc/self/fd/1 "$R/dev/stdout"
ln -s /proc/self/fd/2 "$R/dev/stderr"
: > "$R/dev/console"
mount --bind /dev/null "$R/dev/console"

mount -t tmpfs -o mode=0755,nosuid,nodev box-run "$R/run"
mkdir -p "$R/run/lock" "$R/run/systemd/system"
mount -t tmpfs -o mode=1777,nosuid,nodev box-tmp "$R/tmp"

# identity (written to the upper layer only)
systemd-id128 new > "$R/etc/machine-id"
echo appliance-box > "$R/etc/hostname"
hostname appliance-box
# A container image's policy-rc.d ("exit 101") would stop maintainer scripts from starting
# and stopping units; the box is a booted system, so remove it (in the overlay only).
if [ -e "$R/usr/sbin/policy-rc.d" ] && [ -z "${BOX_KEEP_POLICY_RC:-}" ]; then
  rm -f "$R/usr/sbin/policy-rc.d"
fi

cat > "$R/run/systemd/system/appliance-box.target" <<'EOF'
[Unit]
Description=test box: sysinit and sockets only
Requires=sysinit.target
Wants=sockets.target
After=sysinit.target sockets.target
AllowIsolate=yes
EOF
for u in "${MASK[@]}" ${BOX_MASK:-}; do
  ln -sf /dev/null "$R/run/systemd/system/$u"
done

ip link set lo up 2>/dev/null || true

mkdir "$R/run/box-oldroot"
cd "$R"
pivot_root . run/box-oldroot
cd /
umount -l /run/box-oldroot
rmdir /run/box-oldroot
mount --make-rshared /

echo "box[stage2]: exec systemd"
exec setpriv --bounding-set "$DROP_CAPS" -- \
  env -i container=appliance-box TERM=linux PATH="$PATH" LANG=C.UTF-8 \
  /lib/systemd/systemd --system --unit=appliance-box.target
