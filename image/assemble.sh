#!/usr/bin/env bash
# Our layer on an extracted copy of the base root, from the host (no emulation, seconds):
# the binary, the repo's unit, the overlay, the service user, /etc/mqtt-uplink, enabled services,
# locked root, no baked-in identity (machine-id, SSH host keys), fstab and the Pi boot files.
# The root is one A/B slot: what must survive an update (/etc/mqtt-uplink, /var/lib/mqtt-uplink,
# root's .ssh) moves to DATA, the data partition's initial tree, and is bind-mounted back at boot; the
# slot's kernel, initrd, device trees and cmdline.txt template go to /usr/lib/mqtt-uplink-image/boot
# (copied to the boot partition's slot folder by the image build and by RAUC's post-install handler).
# Usage: assemble.sh ROOT DATA BINARY UNIT VERSION KEYRING
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=${1:?root}; data=${2:?data tree}; binary=${3:?binary}; unit=${4:?unit}; version=${5:?version}
keyring=${6:?RAUC keyring (PEM)}
umask 022

install -D -m 0755 "$binary" "$root/usr/bin/mqtt-uplink"
install -D -m 0644 "$unit" "$root/usr/lib/systemd/system/mqtt-uplink.service"
cp -a --no-preserve=ownership "$here/overlay/." "$root/"
install -D -m 0644 "$here/README.md" "$root/usr/share/doc/mqtt-uplink-image/README.md"
printf 'mqtt-uplink %s, Raspberry Pi image built %s\n' "$version" "$(date -u +%FT%TZ)" \
  > "$root/usr/share/mqtt-uplink-image/version"
# The version RAUC bundles are compared with (newer only, unless forced).
printf '%s\n' "$version" > "$root/usr/share/mqtt-uplink-image/release"
install -D -m 0644 "$keyring" "$root/etc/rauc/keyring.pem"

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
  systemd-timesyncd.service mqtt-uplink-data.service mqtt-uplink-commit.service \
  mqtt-uplink-update-pull.timer
ln -sf ../run/systemd/resolve/stub-resolv.conf "$root/etc/resolv.conf"

# Root is locked (no password login anywhere); SSH is key-only and only when provisioned.
sed -i -E 's/^root:[^:]*:/root:!*:/' "$root/etc/shadow"
# Every card gets its own identity on first boot.
rm -f "$root"/etc/ssh/ssh_host_*
: > "$root/etc/machine-id"
rm -f "$root/var/lib/dbus/machine-id"
echo mqtt-uplink > "$root/etc/hostname"
printf '127.0.0.1\tlocalhost\n127.0.1.1\tmqtt-uplink\n::1\tlocalhost ip6-localhost ip6-loopback\n' > "$root/etc/hosts"

# Filesystems: the boot and data partitions by label; the root is whichever slot the kernel was given
# (root=PARTUUID=... on the slot's cmdline.txt), so it has no line here. What must survive an update
# is bind-mounted from the data partition.
cat > "$root/etc/fstab" <<'FSTAB'
# <file system>          <mount point>         <type> <options>                                      <dump> <pass>
LABEL=RASPIFIRM          /boot/firmware        vfat   rw,noatime,umask=0077                           0      2
LABEL=RASPIDATA          /data                 ext4   rw,noatime,errors=remount-ro                    0      2
/data/etc/mqtt-uplink    /etc/mqtt-uplink      none   bind,x-systemd.requires-mounts-for=/data        0      0
/data/lib/mqtt-uplink    /var/lib/mqtt-uplink  none   bind,x-systemd.requires-mounts-for=/data        0      0
/data/root-ssh           /root/.ssh            none   bind,x-systemd.requires-mounts-for=/data        0      0
FSTAB

# The data partition's first contents: the config (owners and modes as set above), the empty state
# folder, root's .ssh; the slot keeps empty mount points.
mkdir -p "$data/etc" "$data/lib" "$data/mqtt-uplink-image" "$data/rauc" "$data/ssh/etc/ssh"
cp -a "$root/etc/mqtt-uplink" "$data/etc/mqtt-uplink"
find "$root/etc/mqtt-uplink" -mindepth 1 -delete
install -d -m 0700 -o "$(awk -F: '$1 == "mqtt-uplink" { print $3 }' "$root/etc/passwd")" -g "$gid" "$data/lib/mqtt-uplink"
install -d -m 0700 "$data/root-ssh"
mkdir -p "$root/data" "$root/var/lib/mqtt-uplink" "$root/root/.ssh"
chmod 0700 "$root/root/.ssh"

# Boot files. raspi-firmware's hooks wrote the firmware, config.txt, cmdline.txt, the kernel, initrd
# and device trees into /boot/firmware. They stop here: the boot partition is shared by both slots, and
# a kernel reaches a device only inside a bundle (its slot folder is written by RAUC's post-install
# handler), never by apt rewriting the partition under the running slot.
rm -f "$root/etc/kernel/postinst.d/z50-raspi-firmware" "$root/etc/kernel/postrm.d/z50-raspi-firmware" \
  "$root/etc/initramfs/post-update.d/z50-raspi-firmware"
fw=$root/boot/firmware
slotboot=$root/usr/lib/mqtt-uplink-image/boot
mkdir -p "$slotboot"
kernel=$(find "$fw" -maxdepth 1 -name 'vmlinuz-*' | sort -V | tail -n1)
initrd=$(find "$fw" -maxdepth 1 -name 'initrd.img-*' | sort -V | tail -n1)
{ [ -n "$kernel" ] && [ -n "$initrd" ]; } || { echo "assemble.sh: raspi-firmware wrote no vmlinuz-*/initrd.img-* in $fw" >&2; exit 1; }
mv "$kernel" "$slotboot/vmlinuz"
mv "$initrd" "$slotboot/initrd.img"
find "$fw" -maxdepth 1 \( -name 'vmlinuz-*' -o -name 'initrd.img-*' \) -delete
find "$fw" -maxdepth 1 -name '*.dtb' -exec mv -t "$slotboot/" {} +
if [ -d "$fw/overlays" ]; then mv "$fw/overlays" "$slotboot/overlays"; fi
# Consoles: HDMI and the GPIO serial port (ttyS1 on the Pi 3, Pi 4 and Zero 2 W; enable_uart=1).
# root= and rauc.slot= are filled in per slot; panic=10 reboots a crashing trial slot (back to the
# committed one: tryboot is one-shot).
cmdline=$fw/cmdline.txt
[ -f "$cmdline" ] || { echo "assemble.sh: raspi-firmware wrote no $cmdline" >&2; exit 1; }
sed -E -e 's/ *root=[^ ]*//; s/ *console=[^ ]*//g; s/ *rauc\.slot=[^ ]*//; s/ *panic=[^ ]*//; s/ *rw( |$)/ /' \
  -e 's/^ *//; s/ *$//' -e 's|^|console=tty0 console=ttyS1,115200 root=@ROOT@ rw rauc.slot=@SLOT@ panic=10 |' \
  "$cmdline" > "$slotboot/cmdline.txt"
rm -f "$cmdline"
grep -q 'root=@ROOT@ .*rauc.slot=@SLOT@' "$slotboot/cmdline.txt" || { echo "assemble.sh: bad cmdline template $slotboot/cmdline.txt" >&2; exit 1; }
# config.txt: the kernel and initrd by their slot-folder names, and the folder (os_prefix) of the
# committed slot; tryboot.txt is written on the device when a slot goes on trial.
config=$fw/config.txt
[ -f "$config" ] || { echo "assemble.sh: raspi-firmware wrote no $config" >&2; exit 1; }
sed -i -E -e '/^(kernel=|initramfs |os_prefix=)/d' "$config"
cat >> "$config" <<'CONFIG'

[all]
# mqtt-uplink A/B root slots: the committed slot's folder (kernel, initrd, device trees, overlays,
# cmdline.txt). tryboot.txt, the same with the other folder, is read instead for one boot after
# `reboot "0 tryboot"` (an update on trial). Written by the device: do not edit.
os_prefix=slot-a/
kernel=vmlinuz
initramfs initrd.img followkernel
CONFIG

rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/cache/apt/archives/*.deb
