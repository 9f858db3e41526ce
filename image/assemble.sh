#!/usr/bin/env bash
# Our layer on an extracted copy of the base root, from the host (no emulation, seconds):
# the binary, the repo's unit, the overlay, the service user, /etc/mqtt-uplink, enabled services,
# locked root, no baked-in identity (machine-id, SSH host keys), fstab and the Pi boot command line.
# Usage: assemble.sh ROOT BINARY UNIT VERSION
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=${1:?root}; binary=${2:?binary}; unit=${3:?unit}; version=${4:?version}
umask 022

install -D -m 0755 "$binary" "$root/usr/bin/mqtt-uplink"
install -D -m 0644 "$unit" "$root/usr/lib/systemd/system/mqtt-uplink.service"
cp -a --no-preserve=ownership "$here/overlay/." "$root/"
install -D -m 0644 "$here/README.md" "$root/usr/share/doc/mqtt-uplink-image/README.md"
printf 'mqtt-uplink %s, Raspberry Pi image built %s\n' "$version" "$(date -u +%FT%TZ)" \
  > "$root/usr/share/mqtt-uplink-image/version"

# The service user (static, so /etc/mqtt-uplink can belong to it; see sysusers.d/mqtt-uplink.conf).
systemd-sysusers --root="$root" "$root/usr/lib/sysusers.d/mqtt-uplink.conf"
gid=$(awk -F: '$1 == "mqtt-uplink" { print $3 }' "$root/etc/group")
[ -n "$gid" ] || { echo "assemble.sh: no mqtt-uplink group in the image" >&2; exit 1; }
chown -R "0:$gid" "$root/etc/mqtt-uplink"
chmod 0750 "$root/etc/mqtt-uplink"
chmod 0640 "$root/etc/mqtt-uplink/mqtt-uplink.toml" "$root/etc/mqtt-uplink/acl"

# Services. ssh.service stays enabled as Debian ships it; its drop-in keeps it off without keys.
systemctl --root="$root" --quiet enable mqtt-uplink.service mqtt-uplink-provision.service \
  mqtt-uplink-growroot.service nftables.service systemd-networkd.service systemd-resolved.service \
  systemd-timesyncd.service
ln -sf ../run/systemd/resolve/stub-resolv.conf "$root/etc/resolv.conf"

# Root is locked (no password login anywhere); SSH is key-only and only when provisioned.
sed -i -E 's/^root:[^:]*:/root:!*:/' "$root/etc/shadow"
# Every card gets its own identity on first boot.
rm -f "$root"/etc/ssh/ssh_host_*
: > "$root/etc/machine-id"
rm -f "$root/var/lib/dbus/machine-id"
echo mqtt-uplink > "$root/etc/hostname"
printf '127.0.0.1\tlocalhost\n127.0.1.1\tmqtt-uplink\n::1\tlocalhost ip6-localhost ip6-loopback\n' > "$root/etc/hosts"

# Filesystems by label: the same image boots from any SD card reader, USB, or virtio in qemu.
cat > "$root/etc/fstab" <<'FSTAB'
# <file system>    <mount point>   <type>  <options>                   <dump> <pass>
LABEL=RASPIROOT    /               ext4    rw,noatime,errors=remount-ro  0      1
LABEL=RASPIFIRM    /boot/firmware  vfat    rw,noatime,umask=0077         0      2
FSTAB

# raspi-firmware writes cmdline.txt from /etc/default/raspi-firmware at every kernel update; point it at
# the label, then write the current one the same way.
# Consoles: HDMI and the GPIO serial port (ttyS1 on the Pi 3, Pi 4 and Zero 2 W; enable_uart=1).
defaults=$root/etc/default/raspi-firmware
sed -i -E -e 's|^#?ROOTPART=.*|ROOTPART=LABEL=RASPIROOT|' -e 's|^#?CONSOLES=.*|CONSOLES="tty0 ttyS1,115200"|' "$defaults"
grep -qx 'ROOTPART=LABEL=RASPIROOT' "$defaults" || { echo "assemble.sh: cannot set ROOTPART in $defaults" >&2; exit 1; }
grep -qx 'CONSOLES="tty0 ttyS1,115200"' "$defaults" || { echo "assemble.sh: cannot set CONSOLES in $defaults" >&2; exit 1; }
cmdline=$root/boot/firmware/cmdline.txt
[ -f "$cmdline" ] || { echo "assemble.sh: raspi-firmware wrote no $cmdline" >&2; exit 1; }
sed -i -E -e 's|root=[^ ]*|root=LABEL=RASPIROOT|' -e 's|console=[^ ]* ?||g' -e 's|^|console=tty0 console=ttyS1,115200 |' "$cmdline"
grep -q 'root=LABEL=RASPIROOT' "$cmdline" || { echo "assemble.sh: no root= in $cmdline" >&2; exit 1; }

rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/cache/apt/archives/*.deb
