#!/usr/bin/env bash
# Boots the built image under qemu-system-aarch64 -M virt (Debian's kernel and initrd, taken from the
# image's boot partition), once per scenario, and checks it from the host.
#
# provisioned: provisioning files on the boot partition (a TOML with a LAN listener, passwords, ACL,
#   authorized_keys):
#   - the listener answers MQTT through a loopback port forward, with the provisioned credentials
#     (the safe default listens on the device's loopback only, so an answer proves provisioning),
#     and refuses a wrong password;
#   - over SSH (enabled by the provisioned authorized_keys, also through a loopback forward):
#     mqtt-uplink.service is active, /etc/mqtt-uplink has the right owners and modes, root is
#     locked, the firewall opens only the listener and SSH, the root filesystem grew to the disk;
#   - after a clean poweroff, reading the boot partition from the host: the provisioning folder and
#     authorized_keys are gone, the report is there and holds no secret.
# unprovisioned: the card as flashed, nothing added:
#   - systemd reports mqtt-uplink.service started (READY=1: config valid, listener bound) on the
#     serial console, and the provisioning unit says the firewall opens nothing;
#   - from the LAN side nothing answers: no SSH banner (sshd off without keys), no MQTT (the safe
#     default listens on loopback only);
#   - after power-off, the boot partition holds a report saying nothing was provisioned.
# package: the arm64 Debian package on a live systemd (only authorized_keys provisioned, for SSH):
#   the image's own copy is removed, `apt install ./mqtt-uplink_*_arm64.deb` creates the user, the
#   files with their owners and modes and starts the service; `mqtt-uplink status` answers;
#   `apt purge` stops it and removes the unit, the secrets and the state. The package is
#   $BOOT_DEB, or the newest target/debian/mqtt-uplink_*_arm64.deb (debian/build-deb.sh arm64).
# Field updates (A/B root slots, RAUC bundles, health gate). The test bundles are made here from the
# build's bundle (image/out/*.raucb, or BOOT_BUNDLE): its root filesystem with another version stamped
# in (and, for bad-release, an mqtt-uplink that exits at start), signed with the build's TEST key
# (image/out/test-keys, made by build.sh when no RAUC_KEY is given), which the image trusts.
# update: a cloud broker (mosquitto on 127.0.0.1, the guest reaches it as 10.0.2.100) is stopped,
#   messages are queued in the outbox, `mqtt-uplink-update install` of the next version (the outbox
#   does not drain: it says so and goes on), the device reboots into slot B on trial; the cloud is back;
#   the health gate commits B; the version changed, the config, machine id and SSH host key are the
#   same, every queued message reaches the cloud, and a later boot stays on B.
# bad-bundle: a bundle signed by a key the device does not trust, one for another architecture
#   (compatible string) and one older than the running version are refused, each saying why, and
#   nothing changes (slot state, slot B's content).
# bad-release: a bundle whose mqtt-uplink exits at start boots once in slot B, is not committed, and the
#   device comes back on slot A by itself; the reason is in the boot partition's report, the journal
#   and the status file.
# power-cut: qemu is killed (SIGKILL) at three points: during `rauc install`, early in the first boot
#   of the new slot, and during its health check; each time the device comes back on slot A, working,
#   with what happened recorded.
# The Pi firmware's slot choice is EMULATED here (qemu has no Pi firmware): before each boot the
# launcher reads the boot partition as the firmware would: tryboot.txt's os_prefix= when the device
# asked for a tryboot (the file mqtt-uplink-tryboot, written by `mqtt-uplink-update` next to its
# `reboot "0 tryboot"`, deleted here at once: one boot only, as the firmware's flag), else
# config.txt's; then it boots that slot folder's vmlinuz, initrd.img and cmdline.txt (root= and
# rauc.slot=) with qemu's -kernel. A reboot of the guest ends qemu (-no-reboot); the launcher starts it
# again, like the firmware on the next power-on. The kernel command line adds one thing to the slot's
# own: systemd.default_timeout_start_sec=900. Under TCG on a loaded host, udev took longer than
# systemd's default 90 s to announce the disks once, and the boot stopped in emergency mode waiting
# for RASPIDATA; a Pi finds its SD card in well under a second.
# Forwards use qemu user networking on 127.0.0.1 with host port 0 (the kernel picks a free port;
# read back with the monitor's `info usernet`): never a fixed port, loopback only.
#
# Usage: image/test/boot.sh [--scenario NAME] [IMAGE]   NAME: provisioned, unprovisioned, package,
#        update, bad-bundle, bad-release, power-cut (default: every scenario, one after the other,
#        package only when there is a package; IMAGE: .img or .img.xz; default: the newest in image/out)
# Environment: BOOT_TIMEOUT (seconds to service ready, default 600), QEMU_SMP (default 2),
#              BOOT_BUNDLE (the build's bundle; default the newest image/out/*.raucb).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
image_dir=$(dirname "$here")
BOOT_TIMEOUT=${BOOT_TIMEOUT:-600}
QEMU_SMP=${QEMU_SMP:-2}

log() { printf '[boot %s %(%H:%M:%S)T] %s\n' "$scenario" -1 "$*" >&2; }
fail() { printf 'boot.sh: %s: FAIL: %s\n' "$scenario" "$*" >&2; exit 1; }
pass() { printf 'boot.sh: %s: ok: %s\n' "$scenario" "$*" >&2; }

scenario=
if [ "${1:-}" = --scenario ]; then scenario=$2; shift 2; fi
# Every stop says why: a command that fails outside an explicit check names itself and its line.
trap 'rc=$?; printf "boot.sh: %s: FAIL: line %s: \"%s\" exited %s\n" "${scenario:-all}" "$LINENO" "$BASH_COMMAND" "$rc" >&2' ERR
# No target/debian/ (a fresh checkout) is no package, not an error.
newest_deb() {
  local dir
  dir="$(dirname "$image_dir")/target/debian"
  [ -d "$dir" ] || return 0
  find "$dir" -maxdepth 1 -name 'mqtt-uplink_*_arm64.deb' -printf '%T@ %p\n' | sort -rn | head -n1 | cut -d' ' -f2-
}
deb=${BOOT_DEB:-$(newest_deb)}
case $scenario in
  "")
    for s in provisioned unprovisioned update bad-bundle bad-release power-cut; do "$0" --scenario "$s" "$@"; done
    if [ -n "$deb" ]; then exec "$0" --scenario package "$@"; fi
    echo "boot.sh: package scenario skipped: no arm64 package (debian/build-deb.sh arm64, or BOOT_DEB=)" >&2
    exit 0
    ;;
  provisioned|unprovisioned|update|bad-bundle|bad-release|power-cut) ;;
  package) { [ -n "$deb" ] && [ -f "$deb" ]; } || fail "no arm64 package: build one with debian/build-deb.sh arm64 or set BOOT_DEB" ;;
  *) echo "boot.sh: unknown scenario: $scenario (provisioned, unprovisioned, package, update, bad-bundle, bad-release, power-cut)" >&2; exit 64 ;;
esac
updates=0
case $scenario in update|bad-bundle|bad-release|power-cut) updates=1 ;; esac

missing=$("$image_dir/deps.sh" --check boot) || fail "missing tools; install them with: $image_dir/deps.sh boot  (packages: $missing)"

img_src=${1:-$(find "$image_dir/out" -maxdepth 1 \( -name 'mqtt-uplink-*-rpi-arm64.img.xz' -o -name 'mqtt-uplink-*-rpi-arm64.img' \) \
  -printf '%T@ %p\n' 2>/dev/null | sort -rn | head -n1 | cut -d' ' -f2- || true)}
{ [ -n "$img_src" ] && [ -f "$img_src" ]; } || fail "no image: build one with image/build.sh or pass its path"
if [ "$updates" = 1 ]; then
  bundle_src=${BOOT_BUNDLE:-$(find "$image_dir/out" -maxdepth 1 -name 'mqtt-uplink-*-rpi-arm64.raucb' -printf '%T@ %p\n' 2>/dev/null | sort -rn | head -n1 | cut -d' ' -f2- || true)}
  { [ -n "$bundle_src" ] && [ -f "$bundle_src" ]; } || fail "no update bundle: image/build.sh writes image/out/mqtt-uplink-<version>-rpi-arm64.raucb (or set BOOT_BUNDLE)"
  keys=$image_dir/out/test-keys
  { [ -s "$keys/signing.key.pem" ] && [ -s "$keys/signing.cert.pem" ]; } \
    || fail "no test signing key in $keys: build the image without RAUC_KEY (build.sh makes it) to run the update scenarios"
  command -v mosquitto >/dev/null || [ -x /usr/sbin/mosquitto ] || fail "no mosquitto (the cloud broker of the update scenario): apt install mosquitto"
fi

work=$(mktemp -d /var/tmp/mqtt-uplink-boot.XXXXXX)
qemu_pid=
ssh_ok=0
cleanup() {
  local rc=$?
  if [ "$rc" -ne 0 ] && [ "$ssh_ok" = 1 ] && kill -0 "$qemu_pid" 2>/dev/null; then
    echo "---- the guest's journal for our units ----" >&2
    guest journalctl -b --no-pager -o cat -u mqtt-uplink-provision -u mqtt-uplink-growroot -u nftables -u mqtt-uplink-data -u mqtt-uplink-commit -u rauc \
      -u mqtt-uplink 2>&1 | tail -n 80 >&2 || true
  fi
  if [ -n "${cloud_pid:-}" ]; then kill "$cloud_pid" 2>/dev/null || true; fi
  jobs -p | xargs -r kill 2>/dev/null || true
  if [ -n "$qemu_pid" ] && kill -0 "$qemu_pid" 2>/dev/null; then
    kill "$qemu_pid" 2>/dev/null || true
    wait "$qemu_pid" 2>/dev/null || true
  fi
  if [ -f "$work/console.log" ]; then
    mkdir -p "$image_dir/out"
    cp "$work/console.log" "$image_dir/out/boot-test-console.log" || true
    if [ "$rc" -ne 0 ]; then
      echo "---- last 60 lines of the serial console (all: image/out/boot-test-console.log) ----" >&2
      tail -n 60 "$work/console.log" >&2 || true
    fi
  fi
  rm -rf "$work"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- the disk: a copy of the image, 1 GiB larger so the first boot has something to grow ----------
log "image: $img_src"
if [ -f "$img_src.sha256" ]; then
  (cd "$(dirname "$img_src")" && sha256sum --quiet -c "$(basename "$img_src").sha256") || fail "sha256 mismatch for $img_src"
  pass "sha256 matches"
fi
disk=$work/disk.img
case $img_src in
  *.xz) xz -dc -T0 "$img_src" | dd of="$disk" bs=4M conv=sparse status=none ;;
  *) cp --sparse=always "$img_src" "$disk" ;;
esac
image_bytes=$(stat -c %s "$disk")
truncate -s $(( image_bytes + 1024 * 1024 * 1024 )) "$disk"

part_start() { sfdisk -d "$disk" | awk -v p="$disk$1" '$1 == p { gsub(/[^0-9]/, "", $4); print $4 }'; }
part_size() { sfdisk -d "$disk" | awk -v p="$disk$1" '$1 == p { gsub(/[^0-9]/, "", $6); print $6 }'; }
# 1 boot (FAT), 2 root slot A, 3 root slot B, 4 data.
boot_off=$(( $(part_start 1) * 512 ))
data_start=$(part_start 4)
{ [ "$boot_off" -gt 0 ] && [ -n "$data_start" ] && [ -n "$(part_start 3)" ]; } || fail "unexpected partition table (want boot, slot A, slot B, data): $(sfdisk -d "$disk")"
fat="$disk@@$boot_off"
data_sectors_before=$(part_size 4)

# --- provisioning files ---------------------------------------------------------------------------
if [ "$scenario" = provisioned ]; then
  prov=$work/prov
  mkdir -p "$prov/mqtt-uplink"
  mqtt_user=boot-device
  mqtt_pass="Boot-Test-$(od -An -N8 -tx8 /dev/urandom | tr -d ' ')"
  cat > "$prov/mqtt-uplink/mqtt-uplink.toml" <<'EOF'
[site]
id = "boot-test"
state_dir = "/var/lib/mqtt-uplink"

[[listener]]
bind = "0.0.0.0:1883"
allow_plaintext = true

[auth]
password_file = "passwords"
acl_file = "acl"
EOF
  printf 'user %s\ntopic readwrite boot/#\n' "$mqtt_user" > "$prov/mqtt-uplink/acl"
  touch "$prov/mqtt-uplink/passwords"
  mosquitto_passwd -b "$prov/mqtt-uplink/passwords" "$mqtt_user" "$mqtt_pass"
  ssh-keygen -q -t ed25519 -N '' -C boot-test -f "$work/id_ed25519"
  cp "$work/id_ed25519.pub" "$prov/authorized_keys"
  mcopy -s -i "$fat" "$prov/mqtt-uplink" "$prov/authorized_keys" ::/
fi

if [ "$scenario" = package ]; then
  ssh-keygen -q -t ed25519 -N '' -C boot-test -f "$work/id_ed25519"
  cp "$work/id_ed25519.pub" "$work/authorized_keys"
  mcopy -i "$fat" "$work/authorized_keys" ::/
fi

# The update scenarios: SSH, a device listener, an uplink to the test's cloud broker (10.0.2.100 in the
# guest, relayed to the broker's port on the host's loopback: see start_vm), and the health gate's
# settings.
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
if [ "$updates" = 1 ]; then
  cloud_port=$(free_port)
  prov=$work/prov
  mkdir -p "$prov/mqtt-uplink"
  mqtt_user=boot-device
  mqtt_pass="Boot-Test-$(od -An -N8 -tx8 /dev/urandom | tr -d ' ')"
  cat > "$prov/mqtt-uplink/mqtt-uplink.toml" <<EOF
[site]
id = "boot-test"
state_dir = "/var/lib/mqtt-uplink"

[[listener]]
bind = "0.0.0.0:1883"
allow_plaintext = true

[auth]
password_file = "passwords"
acl_file = "acl"

[uplink]
broker = "mqtt://10.0.2.100:$cloud_port"
client_id = "boot-test-uplink"

[[map]]
direction = "out"
topic = "boot/#"
local_prefix = ""
remote_prefix = "sites/boot-test/"
qos = 1
EOF
  printf 'user %s\ntopic readwrite boot/#\n' "$mqtt_user" > "$prov/mqtt-uplink/acl"
  touch "$prov/mqtt-uplink/passwords"
  mosquitto_passwd -b "$prov/mqtt-uplink/passwords" "$mqtt_user" "$mqtt_pass"
  # TCG on a shared machine is slow: the health gate waits longer than on a Pi, except where the test
  # wants it to give up.
  health_timeout=300
  [ "$scenario" = bad-release ] && health_timeout=90
  printf 'HEALTH_TIMEOUT=%s\nDRAIN_TIMEOUT=10\n' "$health_timeout" > "$prov/mqtt-uplink/update.conf"
  ssh-keygen -q -t ed25519 -N '' -C boot-test -f "$work/id_ed25519"
  cp "$work/id_ed25519.pub" "$prov/authorized_keys"
  mcopy -s -i "$fat" "$prov/mqtt-uplink" "$prov/authorized_keys" ::/
fi

# systemd's status lines on the serial console (unit names, see systemd.status_unit_format= below,
# wrapped in colour codes).
console_has() { grep -aqE "$1" "$work/console.log" 2>/dev/null; }
service_failed='Failed to start .{0,16}mqtt-uplink\.service'
# A command on the guest as root, over SSH; GUEST_TIMEOUT seconds at most (apt under TCG is slow).
guest() {
  timeout "${GUEST_TIMEOUT:-30}" ssh -q -p "$ssh_port" -i "$work/id_ed25519" -o IdentitiesOnly=yes \
    -o BatchMode=yes -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o ConnectTimeout=10 \
    root@127.0.0.1 "$@"
}

# --- boot: the launcher emulates the Pi firmware's slot choice (see the top of this file) -----------
mkfifo "$work/mon.in" "$work/mon.out"
boots=0
fwd_port() { printf '%s\n' "$usernet" | tr -d '\r' | awk -v g="$1" '/HOST_FORWARD/ && $6 == g { print $4 }'; }
start_vm() {
  local cfg=config.txt prefix cmdline root_arg slot_arg
  boots=$(( boots + 1 ))
  if [ -f "$work/console.log" ]; then mv "$work/console.log" "$work/console-$(( boots - 1 )).log"; fi
  if mtype -i "$fat" ::/mqtt-uplink-tryboot >/dev/null 2>&1; then
    cfg=tryboot.txt
    mdel -i "$fat" ::/mqtt-uplink-tryboot   # the firmware's tryboot flag lasts one boot
  fi
  prefix=$(mtype -i "$fat" "::/$cfg" 2>/dev/null | tr -d '\r' | sed -n 's/^os_prefix=//p' | tail -n1)
  [ -n "$prefix" ] || fail "boot $boots: no os_prefix= in the boot partition's $cfg"
  mcopy -o -i "$fat" "::/${prefix}vmlinuz" "$work/vmlinuz" || fail "boot $boots: no ${prefix}vmlinuz on the boot partition"
  mcopy -o -i "$fat" "::/${prefix}initrd.img" "$work/initrd" || fail "boot $boots: no ${prefix}initrd.img on the boot partition"
  cmdline=$(mtype -i "$fat" "::/${prefix}cmdline.txt" | tr -d '\r\n') || fail "boot $boots: no ${prefix}cmdline.txt"
  root_arg=$(tr ' ' '\n' <<< "$cmdline" | grep -m1 '^root=' || true)
  slot_arg=$(tr ' ' '\n' <<< "$cmdline" | grep -m1 '^rauc\.slot=' || true)
  { [ -n "$root_arg" ] && [ -n "$slot_arg" ]; } || fail "boot $boots: ${prefix}cmdline.txt has no root= or rauc.slot=: $cmdline"
  booted=${slot_arg#rauc.slot=}
  log "boot $boots: firmware emulation: $cfg -> $prefix ($root_arg $slot_arg)"
  # The guest reaches nothing but what is forwarded (restrict=on): without it, qemu's user networking
  # routes the guest's packets out through the host (the image's NTP and DNS would leave the machine).
  # The cloud broker of the update scenarios is one forward: each connection the guest opens to
  # 10.0.2.100:PORT is relayed by socat to 127.0.0.1:PORT.
  local cloud_fwd=
  if [ -n "${cloud_port:-}" ]; then cloud_fwd=",guestfwd=tcp:10.0.2.100:$cloud_port-cmd:socat - TCP:127.0.0.1:$cloud_port"; fi
  t_start=$(date +%s)
  qemu-system-aarch64 -M virt -cpu cortex-a53 -smp "$QEMU_SMP" -m 1024 \
    -display none -nodefaults -no-reboot \
    -serial "file:$work/console.log" \
    -chardev "pipe,id=mon,path=$work/mon" -mon chardev=mon,mode=readline \
    -kernel "$work/vmlinuz" -initrd "$work/initrd" \
    -append "$root_arg $slot_arg rw console=ttyAMA0 rootwait panic=10 net.ifnames=1 systemd.status_unit_format=name systemd.default_timeout_start_sec=900" \
    -drive "file=$disk,format=raw,if=none,id=d0,cache=writeback" -device virtio-blk-pci,drive=d0 \
    -netdev "user,id=n0,restrict=on,hostfwd=tcp:127.0.0.1:0-:1883,hostfwd=tcp:127.0.0.1:0-:22$cloud_fwd" \
    -device virtio-net-pci,netdev=n0,romfile= \
    -device virtio-rng-pci \
    2> "$work/qemu.err" &
  qemu_pid=$!
  exec 3> "$work/mon.in" 4< "$work/mon.out"
  echo "info usernet" >&3
  usernet=$(timeout 5 cat <&4 || true)
  mqtt_port=$(fwd_port 1883)
  ssh_port=$(fwd_port 22)
  { [ -n "$mqtt_port" ] && [ -n "$ssh_port" ]; } || fail "no port forwards from qemu: $usernet $(cat "$work/qemu.err")"
  log "qemu pid $qemu_pid; 127.0.0.1:$mqtt_port -> guest 1883, 127.0.0.1:$ssh_port -> guest 22"
}
# The guest powered off or rebooted (qemu ends either way: -no-reboot), within $1 seconds.
wait_vm_exit() {
  for _ in $(seq 1 "$1"); do kill -0 "$qemu_pid" 2>/dev/null || break; sleep 1; done
  if kill -0 "$qemu_pid" 2>/dev/null; then return 1; fi
  wait "$qemu_pid" 2>/dev/null || true
  exec 3>&- 4<&-
  qemu_pid=
}
# A power cut: qemu killed at once (the disk image keeps what the guest had written to it).
power_cut() {
  kill -KILL "$qemu_pid"
  wait "$qemu_pid" 2>/dev/null || true
  exec 3>&- 4<&-
  qemu_pid=
}
start_vm

if [ "$updates" = 1 ]; then
  # --- field updates ----------------------------------------------------------------------------------
  # The cloud broker (mosquitto on host loopback, an ephemeral port; the guest sees it as 10.0.2.100).
  cloud_start() {
    printf 'listener %s 127.0.0.1\nallow_anonymous true\npersistence false\n' "$cloud_port" > "$work/cloud.conf"
    mosquitto -c "$work/cloud.conf" > "$work/cloud.log" 2>&1 &
    cloud_pid=$!
    for _ in $(seq 1 50); do timeout 2 mosquitto_pub -h 127.0.0.1 -p "$cloud_port" -t probe -m x 2>/dev/null && return 0; sleep 0.2; done
    fail "the test's cloud broker did not start: $(cat "$work/cloud.log")"
  }
  cloud_stop() { if [ -n "${cloud_pid:-}" ]; then kill "$cloud_pid" 2>/dev/null || true; wait "$cloud_pid" 2>/dev/null || true; cloud_pid=; fi; }
  wait_ssh() {
    local deadline=$(( $(date +%s) + BOOT_TIMEOUT ))
    until guest true; do
      kill -0 "$qemu_pid" 2>/dev/null || fail "boot $boots: qemu exited before SSH answered: $(cat "$work/qemu.err")"
      [ "$(date +%s)" -lt "$deadline" ] || fail "boot $boots: no SSH login within ${BOOT_TIMEOUT}s"
      sleep 3
    done
    ssh_ok=1
  }
  # The slot the device runs (its kernel command line) and the slot state on its boot partition.
  guest_slot() { guest "tr ' ' '\\n' < /proc/cmdline | sed -n 's/^rauc\\.slot=//p'"; }
  # A file of the boot partition: through the guest while it runs (the host's mtools view of a FAT
  # the guest has mounted and writes can be stale or torn: it came back empty in two runs), from the
  # disk image when qemu is off.
  boot_file() {
    if [ -n "$qemu_pid" ] && kill -0 "$qemu_pid" 2>/dev/null; then
      guest "cat /boot/firmware/$1" 2>/dev/null
    else
      mtype -i "$fat" "::/$1" 2>/dev/null
    fi | tr -d '\r' || true
  }
  slot_state() { boot_file mqtt-uplink-slots.txt | grep -v '^#' | paste -sd' '; }
  fat_report() { boot_file mqtt-uplink-update.txt; }
  # The service up, from the device (mqtt-uplink status: /healthz answers; uplink may be down).
  wait_service() {
    for _ in $(seq 1 60); do
      [ "$(guest systemctl is-active mqtt-uplink.service)" = active ] && return 0
      sleep 3
    done
    fail "mqtt-uplink.service not active on slot $(guest_slot) after 180s (boot $boots)"
  }
  # make_bundle OUT VERSION [failing|older|armhf|untrusted]: the build's root filesystem with VERSION
  # stamped in, repacked and signed.
  make_bundle() {
    local out=$1 version=$2 kind=${3:-} d=$work/bundle-src compat=mqtt-uplink-rpi-arm64 key=$keys/signing.key.pem cert=$keys/signing.cert.pem
    rm -rf "$d"; mkdir -p "$d"
    printf '%s\n' "$version" > "$work/release"
    case $kind in
      untrusted|armhf|older)
        # Refused before anything is written: a small filesystem holding only the version does, and
        # packs in a second (mksquashfs of the whole root took minutes per bundle on a loaded host).
        rm -rf "$work/tiny"; mkdir -p "$work/tiny/usr/share/mqtt-uplink-image"
        cp "$work/release" "$work/tiny/usr/share/mqtt-uplink-image/release"
        mkfs.ext4 -q -d "$work/tiny" "$d/rootfs.ext4" 8M || fail "mkfs.ext4 of the small test filesystem failed"
        ;;
      *)
        if [ ! -f "$work/rootfs.ext4" ]; then
          rm -rf "$work/extract"
          rauc extract --keyring="$keys/signing.cert.pem" "$bundle_src" "$work/extract" >/dev/null 2>&1 \
            || fail "cannot extract $bundle_src with the test key (was it built with RAUC_KEY?)"
          mv "$work/extract/rootfs.ext4" "$work/rootfs.ext4"
          rm -rf "$work/extract"
        fi
        cp --sparse=always "$work/rootfs.ext4" "$d/rootfs.ext4"
        {
          echo "rm /usr/share/mqtt-uplink-image/release"
          echo "write $work/release /usr/share/mqtt-uplink-image/release"
          echo "sif /usr/share/mqtt-uplink-image/release mode 0100644"
        } > "$work/debugfs.cmd"
        if [ "$kind" = failing ]; then
          printf '#!/bin/sh\necho "mqtt-uplink (bad release for the boot test): exiting at start" >&2\nexit 1\n' > "$work/bad-binary"
          { echo "rm /usr/bin/mqtt-uplink"; echo "write $work/bad-binary /usr/bin/mqtt-uplink"; echo "sif /usr/bin/mqtt-uplink mode 0100755"; } >> "$work/debugfs.cmd"
        fi
        debugfs -w -f "$work/debugfs.cmd" "$d/rootfs.ext4" >/dev/null 2>&1 || fail "debugfs could not stamp $version into the root filesystem"
        ;;
    esac
    [ "$kind" = armhf ] && compat=mqtt-uplink-rpi-armhf
    if [ "$kind" = untrusted ]; then
      openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 30 -subj "/CN=untrusted test key" \
        -keyout "$work/untrusted.key" -out "$work/untrusted.cert" 2>/dev/null
      key=$work/untrusted.key cert=$work/untrusted.cert
    fi
    printf '[update]\ncompatible=%s\nversion=%s\n\n[bundle]\nformat=plain\n\n[image.rootfs]\nfilename=rootfs.ext4\n' "$compat" "$version" > "$d/manifest.raucm"
    rm -f "$out"
    rauc bundle --cert="$cert" --key="$key" --keyring="$cert" "$d" "$out" >/dev/null 2>&1 || fail "rauc bundle $out failed"
    rm -rf "$d"
  }

  # install_on_device BUNDLE [ARGS...]: copies it to the data partition and runs mqtt-uplink-update.
  copy_bundle() { GUEST_TIMEOUT=600 guest "cat > /data/test.raucb" < "$1" || fail "copying $(basename "$1") to the device"; }

  cur_version=$(sed -n 's/^version=//p' <(rauc info --keyring="$keys/signing.cert.pem" --output-format=shell "$bundle_src" 2>/dev/null | sed "s/'//g; s/^RAUC_MF_VERSION=/version=/"))
  [ -n "$cur_version" ] || fail "cannot read the version of $bundle_src with the test key"
  next_version="$cur_version+boottest1"

  # The cloud is up for bad-release too: its new slot must fail the health check for its own reason
  # (the service exits), not for an uplink with nowhere to go.
  if [ "$scenario" = update ] || [ "$scenario" = bad-release ]; then cloud_start; fi
  wait_ssh
  [ "$(guest_slot)" = A ] || fail "the first boot is not on slot A: $(guest_slot)"
  wait_service
  machine_id=$(guest cat /etc/machine-id)
  host_key=$(guest cat /data/ssh/etc/ssh/ssh_host_ed25519_key.pub)
  [ "$(guest cat /data/machine-id)" = "$machine_id" ] || fail "the machine id is not kept on the data partition"
  pass "first boot on slot A ($cur_version): service active, machine id and SSH host key on the data partition"
fi

if [ "$scenario" = update ]; then
  # The cloud reachable: the uplink is up and a message goes through.
  for _ in $(seq 1 60); do guest 'curl -s -o /dev/null -w "%{http_code}" http://127.0.0.1:9883/healthz' | grep -qx 200 && break; sleep 3; done
  timeout 60 mosquitto_sub -h 127.0.0.1 -p "$cloud_port" -t 'sites/boot-test/#' -C 1 -W 50 > "$work/first.out" 2>&1 &
  sub=$!
  sleep 1
  timeout 10 mosquitto_pub -h 127.0.0.1 -p "$mqtt_port" -u "$mqtt_user" -P "$mqtt_pass" -i boot-pub -t boot/first -m first -q 1 || fail "publish to the device failed"
  wait "$sub" || fail "the uplink did not carry a message to the cloud: $(cat "$work/first.out")"
  pass "uplink up: a device message reached the cloud broker"
  # The cloud goes away; messages queue in the outbox.
  cloud_stop
  n=20
  # One connection for all of them (-l: a message per line): under TCG on a loaded host a login per
  # message took longer than a per-message timeout.
  seq 1 "$n" | sed 's/^/queued-/' | timeout 180 mosquitto_pub -h 127.0.0.1 -p "$mqtt_port" -u "$mqtt_user" -P "$mqtt_pass" \
    -i boot-queue -t "boot/queued" -l -q 1 || fail "publishing the $n messages to the device failed"
  depth=$(guest "curl -s http://127.0.0.1:9883/metrics | awk '\$1 == \"mqtt_uplink_outbox_depth\" { print \$2 }'")
  [ "${depth%.*}" -ge "$n" ] 2>/dev/null || fail "the outbox does not hold the $n queued messages: depth '$depth'"
  pass "cloud down: $n messages queued in the outbox (depth $depth)"
  make_bundle "$work/next.raucb" "$next_version"
  bundle_mib=$(( $(stat -c %s "$work/next.raucb") / 1048576 ))
  copy_bundle "$work/next.raucb"
  t_install=$(date +%s)
  out=$(GUEST_TIMEOUT=900 guest "mqtt-uplink-update install --no-reboot /data/test.raucb 2>&1") || fail "install refused or failed: $out"
  t_install=$(( $(date +%s) - t_install ))
  printf '%s\n' "$out" | grep -q "outbox still holds" || fail "the install did not report the queued outbox: $out"
  case "$(slot_state)" in "committed=A trial=B "*) ;; *) fail "after install, slot state: $(slot_state)" ;; esac
  pass "installed $next_version (${bundle_mib} MiB bundle) into slot B in ${t_install}s; B on trial, A still committed; outbox not drained, said so"
  guest "mqtt-uplink-update reboot" >/dev/null 2>&1 || true
  wait_vm_exit 180 || fail "the device did not reboot within 180s"
  # The cloud comes back while the device is down; a subscriber waits for the queued messages.
  cloud_start
  timeout 900 mosquitto_sub -h 127.0.0.1 -p "$cloud_port" -t 'sites/boot-test/boot/queued' -C "$n" -W 890 > "$work/queued.out" 2>&1 &
  sub=$!
  t_reboot=$(date +%s)
  start_vm
  [ "$booted" = B ] || fail "the tryboot did not start slot B (booted $booted)"
  pass "firmware emulation: tryboot.txt -> slot B, once"
  wait_ssh
  [ "$(guest cat /usr/share/mqtt-uplink-image/release)" = "$next_version" ] || fail "slot B does not run $next_version"
  for _ in $(seq 1 120); do
    [ "$(guest systemctl is-active mqtt-uplink-commit.service)" = active ] && break
    sleep 3
  done
  [ "$(slot_state)" = "committed=B trial= state_A=good state_B=good" ] || fail "slot B not committed: $(slot_state); report: $(fat_report | tail -n 5)"
  guest mqtt-uplink-update status > "$work/update-status" 2>&1 || fail "mqtt-uplink-update status failed: $(cat "$work/update-status")"
  grep -q "running: slot B" "$work/update-status" || fail "mqtt-uplink-update status does not say slot B: $(cat "$work/update-status")"
  t_commit=$(( $(date +%s) - t_reboot ))
  fat_report | grep -q "COMMITTED slot B ($next_version)" || fail "the report does not say B was committed: $(fat_report | tail -n 5)"
  pass "slot B committed after /healthz 200, ${t_commit}s after the reboot; the report says so"
  [ "$(guest cat /etc/machine-id)" = "$machine_id" ] || fail "the machine id changed"
  [ "$(guest cat /data/ssh/etc/ssh/ssh_host_ed25519_key.pub)" = "$host_key" ] || fail "the SSH host key changed"
  guest "grep -qx 'id = \"boot-test\"' /etc/mqtt-uplink/mqtt-uplink.toml" || fail "the config is not the provisioned one"
  pass "same config, machine id and SSH host key on slot B"
  wait "$sub" || fail "the cloud got $(wc -l < "$work/queued.out") of the $n queued messages"
  [ "$(sort -u "$work/queued.out" | wc -l)" = "$n" ] || fail "queued messages not all distinct: $(sort "$work/queued.out" | uniq -c | head)"
  pass "all $n messages queued before the update reached the cloud from the new version (same outbox)"
  guest systemctl poweroff >/dev/null 2>&1 || true
  wait_vm_exit 180 || fail "no power-off within 180s"
  start_vm
  [ "$booted" = B ] || fail "the next boot is not on the committed slot B: $booted"
  wait_ssh
  pass "the next boot stays on slot B (config.txt names it)"
  echo "boot.sh: update: PASS: $cur_version -> $next_version; bundle ${bundle_mib} MiB; install ${t_install}s, reboot to commit ${t_commit}s (qemu TCG, $QEMU_SMP vCPUs)"
  exit 0
fi

if [ "$scenario" = bad-bundle ]; then
  before_state=$(slot_state)
  slot_b_sum=$(guest "head -c 16777216 /dev/disk/by-partuuid/6d717475-03 | sha256sum")
  refuse() { # refuse BUNDLE PATTERN WHAT
    copy_bundle "$1"
    local out
    if out=$(GUEST_TIMEOUT=600 guest "mqtt-uplink-update install --no-reboot /data/test.raucb 2>&1"); then fail "$3 was installed: $out"; fi
    printf '%s\n' "$out" | grep -qiE "$2" || fail "$3: refused, but not saying why ($2): $out"
    pass "$3 refused: $(printf '%s\n' "$out" | grep -m1 refused | cut -c1-160)"
  }
  make_bundle "$work/untrusted.raucb" "$next_version" untrusted
  refuse "$work/untrusted.raucb" 'signature|verif|certificate|signer' "a bundle signed by a key the device does not trust"
  make_bundle "$work/armhf.raucb" "$next_version" armhf
  refuse "$work/armhf.raucb" 'wrong board or architecture' "a bundle for another architecture (compatible mqtt-uplink-rpi-armhf)"
  make_bundle "$work/older.raucb" "0.0.1" older
  refuse "$work/older.raucb" 'not newer' "an older version (0.0.1)"
  # The pre-install handler stops an older bundle given to rauc itself, too.
  if guest "rauc install /data/test.raucb" >/dev/null 2>&1; then fail "rauc install of an older bundle was not stopped by the pre-install handler"; fi
  # ... for the right reason (a handler that fails on anything would stop it too).
  # (Read on the device: the host's view of the mounted FAT, through mtools, came back empty there once.)
  guest "grep -q 'refused bundle 0.0.1: not newer' /boot/firmware/mqtt-uplink-update.txt" \
    || fail "the pre-install handler did not record why: $(guest 'tail -n 3 /boot/firmware/mqtt-uplink-update.txt')"
  pass "rauc install of the older bundle, bypassing mqtt-uplink-update, is stopped by the pre-install handler"
  [ "$(slot_state)" = "$before_state" ] || fail "the slot state changed: $before_state -> $(slot_state)"
  [ "$(guest "head -c 16777216 /dev/disk/by-partuuid/6d717475-03 | sha256sum")" = "$slot_b_sum" ] || fail "slot B was written"
  fat_report | grep -q 'refused' || fail "the boot partition's report does not list the refusals"
  pass "nothing changed: slot state ($before_state) and slot B as before; the refusals are in the report"
  echo "boot.sh: bad-bundle: PASS: untrusted signature, wrong architecture and older version refused, nothing changed"
  exit 0
fi

if [ "$scenario" = bad-release ]; then
  make_bundle "$work/bad.raucb" "$next_version" failing
  copy_bundle "$work/bad.raucb"
  out=$(GUEST_TIMEOUT=900 guest "mqtt-uplink-update install --no-reboot /data/test.raucb 2>&1") || fail "install failed: $out"
  pass "a release whose mqtt-uplink exits at start installed into slot B"
  guest "mqtt-uplink-update reboot" >/dev/null 2>&1 || true
  wait_vm_exit 180 || fail "the device did not reboot within 180s"
  t_reboot=$(date +%s)
  start_vm
  [ "$booted" = B ] || fail "the tryboot did not start slot B (booted $booted)"
  # The health gate gives up after HEALTH_TIMEOUT and reboots: qemu ends.
  wait_vm_exit $(( BOOT_TIMEOUT + health_timeout )) || fail "slot B did not give up and reboot"
  pass "slot B booted once and rebooted by itself after its health check failed ($(( $(date +%s) - t_reboot ))s)"
  start_vm
  [ "$booted" = A ] || fail "the boot after the failed trial is not on slot A: $booted"
  wait_ssh
  wait_service
  [ "$(guest cat /usr/share/mqtt-uplink-image/release)" = "$cur_version" ] || fail "slot A does not run $cur_version"
  [ "$(slot_state)" = "committed=A trial= state_A=good state_B=bad" ] || fail "slot state: $(slot_state)"
  pass "back on slot A ($cur_version), service active; B marked bad"
  fat_report | grep -q "ROLLBACK: slot B ($next_version) not committed: no /healthz 200" || fail "no rollback reason in the report: $(fat_report | tail -n 5)"
  guest "cat /data/mqtt-uplink-image/update-status" > "$work/why" 2>&1 || true
  grep -q "ROLLBACK: slot B" "$work/why" || fail "the status file on the data partition does not hold the rollback: $(cat "$work/why")"
  fat_report | grep "ROLLBACK" | grep -qE 'mqtt-uplink.service: (failed|activating)' || fail "the reason does not say the service was not running: $(fat_report | grep -m1 ROLLBACK)"
  pass "reason recorded on the boot partition: $(fat_report | grep -m1 ROLLBACK | cut -c1-200)"
  echo "boot.sh: bad-release: PASS: $next_version not committed, back on A by itself, reason recorded"
  exit 0
fi

if [ "$scenario" = power-cut ]; then
  make_bundle "$work/next.raucb" "$next_version"
  back_on_a() { # after a cut: the next power-on is on A, working, and $1 is recorded
    start_vm
    [ "$booted" = A ] || fail "after the power cut ($2) the device booted slot $booted"
    wait_ssh
    wait_service
    timeout 10 mosquitto_pub -h 127.0.0.1 -p "$mqtt_port" -u "$mqtt_user" -P "$mqtt_pass" -i boot-pub -t boot/after -m x -q 1 \
      || fail "after the power cut ($2) the broker does not answer"
    for _ in $(seq 1 40); do guest "systemctl is-active mqtt-uplink-commit.service" | grep -qx active && break; sleep 3; done
    # Only what was recorded after the cut counts (cuts 2 and 3 record the same words). Lines are told
    # by their time (the guest's clock is the host's, from qemu's RTC), not by their count: after a
    # cut while the trial slot was writing the boot partition, fsck.fat on the next boot may leave the
    # report with fewer lines than before the cut.
    fat_report | awk -v t="$cut_at" '$1 >= t' | grep -q "$1" \
      || fail "after the power cut ($2) the report does not say '$1' (lines since $cut_at: $(fat_report | awk -v t="$cut_at" '$1 >= t' | paste -sd'|'))"
    [ "$(slot_state)" = "committed=A trial= state_A=good state_B=bad" ] || fail "after the power cut ($2) slot state: $(slot_state)"
    pass "power cut $2: back on slot A, MQTT answers, recorded: $(fat_report | grep "$1" | tail -n1 | cut -c1-140)"
  }
  # 1. During rauc install.
  copy_bundle "$work/next.raucb"
  guest "setsid nohup mqtt-uplink-update install --no-reboot /data/test.raucb < /dev/null > /data/install.log 2>&1 &" || true
  # Cut while RAUC writes slot B (its progress says "Copying image").
  for _ in $(seq 1 300); do guest "grep -q 'Copying image' /run/mqtt-uplink-image/install.log" 2>/dev/null && break; sleep 1; done
  guest "grep -q 'Copying image' /run/mqtt-uplink-image/install.log" \
    || fail "RAUC did not start writing slot B within 300s: $(guest 'cat /data/install.log /run/mqtt-uplink-image/install.log')"
  sleep 3
  guest "test -e /data/mqtt-uplink-image/installing" || fail "the install finished before the cut (nothing cut): $(guest cat /data/install.log)"
  cut_at=$(date -u +%FT%TZ)
  power_cut
  back_on_a "install was cut off" "during rauc install"
  # 2. Early in the first boot of the new slot.
  copy_bundle "$work/next.raucb"
  GUEST_TIMEOUT=900 guest "mqtt-uplink-update install --no-reboot /data/test.raucb" >/dev/null 2>&1 || fail "install failed"
  guest "mqtt-uplink-update reboot" >/dev/null 2>&1 || true
  wait_vm_exit 180 || fail "no reboot within 180s"
  start_vm
  [ "$booted" = B ] || fail "the tryboot did not start slot B"
  for _ in $(seq 1 120); do console_has 'Linux version|Booting Linux' && break; sleep 1; done
  sleep 2
  cut_at=$(date -u +%FT%TZ)
  power_cut
  back_on_a "ROLLBACK: slot B was installed but did not come up" "early in slot B's first boot"
  # 3. During the health check of the new slot's first boot: the gate is pointed at a port nothing
  #    answers on, so the cut surely falls inside its wait.
  guest "echo HEALTH_URL=http://127.0.0.1:9/healthz >> /etc/mqtt-uplink/update.conf"
  copy_bundle "$work/next.raucb"
  GUEST_TIMEOUT=900 guest "mqtt-uplink-update install --no-reboot /data/test.raucb" >/dev/null 2>&1 || fail "install failed"
  guest "mqtt-uplink-update reboot" >/dev/null 2>&1 || true
  wait_vm_exit 180 || fail "no reboot within 180s"
  start_vm
  [ "$booted" = B ] || fail "the tryboot did not start slot B"
  deadline=$(( $(date +%s) + BOOT_TIMEOUT ))
  until console_has 'trial boot of slot B'; do
    [ "$(date +%s)" -lt "$deadline" ] || fail "slot B's health check did not start within ${BOOT_TIMEOUT}s"
    sleep 2
  done
  sleep 5
  cut_at=$(date -u +%FT%TZ)
  power_cut
  back_on_a "ROLLBACK: slot B was installed but did not come up" "during slot B's health check"
  echo "boot.sh: power-cut: PASS: cut during install, early in the new slot's first boot and during its health check: back on slot A each time"
  exit 0
fi

if [ "$scenario" = package ]; then
  # --- the Debian package on a live systemd ---------------------------------------------------------
  deadline=$(( t_start + BOOT_TIMEOUT ))
  until guest true; do
    kill -0 "$qemu_pid" 2>/dev/null || fail "qemu exited: $(cat "$work/qemu.err")"
    [ "$(date +%s)" -lt "$deadline" ] || fail "no SSH login within ${BOOT_TIMEOUT}s"
    sleep 2
  done
  ssh_ok=1
  log "package: $deb"
  # A plain Debian with systemd: the image's own copy goes (its user stays, as sysusers would make it).
  # (On the A/B image /etc/mqtt-uplink and /var/lib/mqtt-uplink are bind mounts of the data partition:
  # unmounted and taken out of fstab first, so the package meets plain folders, as on any Debian; left
  # in fstab, systemd mounted them again when the package started the service, whose StateDirectory=
  # requires its mounts, and the package's files were hidden.)
  out=$(GUEST_TIMEOUT=300 guest 'systemctl disable --now mqtt-uplink.service 2>&1; umount /etc/mqtt-uplink /var/lib/mqtt-uplink 2>&1; \
    sed -i "\#^/data/etc/mqtt-uplink #d; \#^/data/lib/mqtt-uplink #d" /etc/fstab && rm -rf /usr/bin/mqtt-uplink \
    /usr/lib/systemd/system/mqtt-uplink.service /etc/mqtt-uplink /var/lib/mqtt-uplink 2>&1 && systemctl daemon-reload 2>&1') \
    || fail "removing the image's copy: $out"
  guest 'cat > /tmp/mqtt-uplink.deb' < "$deb" || fail "copying the package"
  out=$(GUEST_TIMEOUT=300 guest 'DEBIAN_FRONTEND=noninteractive apt-get install -y /tmp/mqtt-uplink.deb 2>&1') \
    || fail "apt install ./$(basename "$deb") failed: $out"
  pass "apt install ./$(basename "$deb")"
  for _ in $(seq 1 30); do [ "$(guest systemctl is-active mqtt-uplink.service)" = active ] && break; sleep 2; done
  [ "$(guest systemctl is-active mqtt-uplink.service)" = active ] || fail "the package's service is not active: $(guest systemctl status mqtt-uplink.service --no-pager)"
  [ "$(guest systemctl is-enabled mqtt-uplink.service)" = enabled ] || fail "the package's service is not enabled"
  pass "the service is enabled and active (READY=1) after the install"
  perms=$(guest 'stat -c "%n %U:%G %a" /etc/mqtt-uplink /etc/mqtt-uplink/mqtt-uplink.toml /etc/mqtt-uplink/acl /etc/mqtt-uplink/passwords /etc/mqtt-uplink/credentials /etc/mqtt-uplink/credentials/uplink-password')
  expected="/etc/mqtt-uplink root:mqtt-uplink 750
/etc/mqtt-uplink/mqtt-uplink.toml root:mqtt-uplink 640
/etc/mqtt-uplink/acl root:mqtt-uplink 640
/etc/mqtt-uplink/passwords mqtt-uplink:mqtt-uplink 600
/etc/mqtt-uplink/credentials root:root 700
/etc/mqtt-uplink/credentials/uplink-password root:root 600"
  [ "$perms" = "$expected" ] || fail "owners/modes after install: got
$perms
expected
$expected"
  pass "owners and modes in /etc/mqtt-uplink"
  status=$(guest mqtt-uplink status 2>&1) || fail "mqtt-uplink status failed: $status"
  printf '%s\n' "$status" | grep -q '127.0.0.1:9883  health: ok' || fail "status does not report a healthy service: $status"
  pass "mqtt-uplink status answers from the running service"
  out=$(GUEST_TIMEOUT=300 guest 'DEBIAN_FRONTEND=noninteractive apt-get purge -y mqtt-uplink 2>&1') \
    || fail "apt purge failed: $out"
  left=$(guest 'ls -d /etc/mqtt-uplink /var/lib/mqtt-uplink /usr/bin/mqtt-uplink /usr/lib/systemd/system/mqtt-uplink.service /lib/systemd/system/mqtt-uplink.service 2>/dev/null; systemctl is-active mqtt-uplink.service' || true)
  [ "$left" = inactive ] || fail "left after apt purge: $left"
  pass "apt purge stops the service and removes the binary, unit, config, secrets and state"
  guest systemctl poweroff >/dev/null 2>&1 || true
  for _ in $(seq 1 120); do kill -0 "$qemu_pid" 2>/dev/null || break; sleep 1; done
  echo "boot.sh: package: PASS: $(basename "$deb") installed, running and purged on the image's systemd"
  exit 0
fi

if [ "$scenario" = unprovisioned ]; then
  # --- the flashed card as it is: ready on the console, nothing reachable from the LAN ------------
  deadline=$(( t_start + BOOT_TIMEOUT ))
  until console_has 'Started .{0,16}mqtt-uplink\.service'; do
    kill -0 "$qemu_pid" 2>/dev/null || fail "qemu exited: $(cat "$work/qemu.err")"
    if console_has "$service_failed"; then fail "mqtt-uplink.service failed to start (see the console below)"; fi
    [ "$(date +%s)" -lt "$deadline" ] || fail "mqtt-uplink.service not started within ${BOOT_TIMEOUT}s"
    sleep 2
  done
  t_ready=$(( $(date +%s) - t_start ))
  pass "mqtt-uplink.service started on the safe default (READY=1), ${t_ready}s after power-on"
  console_has 'mqtt-uplink-provision: firewall: inbound tcp none from the LAN' \
    || fail "the provisioning unit did not report a closed firewall: $(grep mqtt-uplink-provision "$work/console.log")"
  console_has 'nothing to provision on the boot partition' || fail "no 'nothing to provision' line on the console"
  pass "console: nothing to provision, firewall opens no port"
  # Let the rest of the boot settle (sshd would start after the service), then knock from outside.
  for _ in $(seq 1 60); do console_has 'login:' && break; sleep 1; done
  banner=$(timeout 10 bash -c "exec 3<>/dev/tcp/127.0.0.1/$ssh_port && timeout 5 head -c 4 <&3" 2>/dev/null || true)
  [ -z "$banner" ] || fail "something answers on the SSH port without authorized_keys: $banner"
  pass "no SSH banner from the LAN (sshd off without authorized_keys)"
  if timeout 15 mosquitto_pub -h 127.0.0.1 -p "$mqtt_port" -i boot-probe -t boot/probe -m x -q 1 >/dev/null 2>&1; then
    fail "the safe default's broker answered from the LAN"
  fi
  pass "no MQTT from the LAN (the safe default listens on loopback only)"
  # Power button (the virt machine's GPIO key, handled by systemd-logind); a hard stop after 120 s.
  echo system_powerdown >&3
  for _ in $(seq 1 120); do kill -0 "$qemu_pid" 2>/dev/null || break; sleep 1; done
  if kill -0 "$qemu_pid" 2>/dev/null; then
    log "no power-off within 120s of the power button; stopping qemu (the report was synced at boot)"
    kill "$qemu_pid"
  fi
  wait "$qemu_pid" 2>/dev/null || true
  qemu_pid=
  mcopy -i "$fat" ::/mqtt-uplink-provisioned.txt "$work/report.txt" 2>/dev/null || fail "no report on the boot partition"
  grep -q 'nothing to provision' "$work/report.txt" || fail "the report does not say nothing was provisioned: $(cat "$work/report.txt")"
  pass "after power-off: the boot partition holds a report saying nothing was provisioned"
  echo "boot.sh: unprovisioned: PASS: image $(basename "$img_src"); power-on to service ready ${t_ready}s (qemu TCG, $QEMU_SMP vCPUs)"
  exit 0
fi

# --- service ready: an authenticated MQTT round trip through the forward ----------------------------
mqtt_ok() {
  timeout 10 mosquitto_pub -h 127.0.0.1 -p "$mqtt_port" -u "$mqtt_user" -P "$mqtt_pass" -i boot-probe \
    -t boot/probe -m ready -q 1 >/dev/null 2>&1
}
deadline=$(( t_start + BOOT_TIMEOUT ))
until mqtt_ok; do
  kill -0 "$qemu_pid" 2>/dev/null || fail "qemu exited: $(cat "$work/qemu.err")"
  if console_has "$service_failed"; then
    for _ in 1 2 3; do guest true && { ssh_ok=1; break; }; sleep 2; done
    fail "mqtt-uplink.service failed to start (its journal follows when SSH answers)"
  fi
  [ "$(date +%s)" -lt "$deadline" ] || fail "no MQTT answer within ${BOOT_TIMEOUT}s"
  sleep 2
done
t_ready=$(( $(date +%s) - t_start ))
pass "MQTT listener answers with the provisioned credentials, ${t_ready}s after power-on"

if timeout 10 mosquitto_pub -h 127.0.0.1 -p "$mqtt_port" -u "$mqtt_user" -P wrong-password -i boot-bad \
  -t boot/probe -m x -q 1 >/dev/null 2>&1; then
  fail "a wrong password was accepted"
fi
pass "a wrong password is refused"

sub_out=$work/sub.out
timeout 20 mosquitto_sub -h 127.0.0.1 -p "$mqtt_port" -u "$mqtt_user" -P "$mqtt_pass" -i boot-sub \
  -t 'boot/#' -C 1 -W 15 > "$sub_out" 2>&1 &
sub_pid=$!
got=0
for _ in $(seq 1 10); do
  timeout 10 mosquitto_pub -h 127.0.0.1 -p "$mqtt_port" -u "$mqtt_user" -P "$mqtt_pass" -i boot-pub \
    -t boot/echo -m round-trip -q 1 >/dev/null 2>&1 || true
  if ! kill -0 "$sub_pid" 2>/dev/null; then break; fi
  sleep 1
done
wait "$sub_pid" 2>/dev/null || true
grep -qx round-trip "$sub_out" && got=1
[ "$got" = 1 ] || fail "publish/subscribe round trip through the broker failed: $(cat "$sub_out")"
pass "publish -> subscribe round trip through the appliance's broker"

# --- inside, over SSH ------------------------------------------------------------------------------
for _ in $(seq 1 30); do guest true && break; sleep 2; done
guest true || fail "no SSH login with the provisioned authorized_keys"
ssh_ok=1
pass "SSH login with the provisioned key"

[ "$(guest systemctl is-active mqtt-uplink.service)" = active ] || fail "mqtt-uplink.service is not active"
pass "mqtt-uplink.service is active"
[ "$(guest systemctl is-active mqtt-uplink-provision.service)" = active ] || fail "provisioning unit did not succeed"

perms=$(guest 'stat -c "%n %U:%G %a" /etc/mqtt-uplink /etc/mqtt-uplink/mqtt-uplink.toml /etc/mqtt-uplink/passwords /etc/mqtt-uplink/acl')
expected="/etc/mqtt-uplink root:mqtt-uplink 750
/etc/mqtt-uplink/mqtt-uplink.toml root:mqtt-uplink 640
/etc/mqtt-uplink/passwords mqtt-uplink:mqtt-uplink 600
/etc/mqtt-uplink/acl mqtt-uplink:mqtt-uplink 600"
[ "$perms" = "$expected" ] || fail "owners/modes in /etc/mqtt-uplink: got
$perms
expected
$expected"
guest "grep -qx 'id = \"boot-test\"' /etc/mqtt-uplink/mqtt-uplink.toml" || fail "the provisioned TOML is not installed"
pass "provisioned config installed with the right owners and modes"

guest 'ls -A /boot/firmware' > "$work/fat-live"
if grep -qx -e mqtt-uplink -e authorized_keys "$work/fat-live"; then fail "secrets still on the boot partition: $(cat "$work/fat-live")"; fi
pass "secrets removed from the boot partition (seen from the device)"

[ "$(guest 'passwd -S root | cut -d" " -f2')" = L ] || fail "root is not locked"
pass "root is locked"

ruleset=$(guest nft list ruleset)
printf '%s\n' "$ruleset" | grep -q 'policy drop' || fail "firewall input policy is not drop: $ruleset"
printf '%s\n' "$ruleset" | grep -q 'tcp dport { 22, 1883 } accept' || fail "firewall does not open exactly 1883 and 22: $ruleset"
opened=$(printf '%s\n' "$ruleset" | grep -c 'tcp dport .* accept' || true)
[ "$opened" = 2 ] || fail "unexpected accept rules (want 2 tcp rules: ip and ip6 for 22,1883): $ruleset"
pass "firewall: input policy drop, only tcp 22 and 1883 from the LAN"

data_sectors_after=$(guest "cat /sys/class/block/\$(basename \$(readlink -f \$(findmnt -no SOURCE /data)))/size")
[ "$data_sectors_after" -gt $(( data_sectors_before + 1024 * 2048 * 9 / 10 )) ] \
  || fail "data partition did not grow: $data_sectors_before -> $data_sectors_after sectors"
fs_mib=$(guest "df -BM --output=size /data | tail -n1 | tr -dc 0-9")
[ "$fs_mib" -gt $(( data_sectors_before / 2048 + 800 )) ] || fail "data filesystem did not grow: ${fs_mib} MiB"
[ "$(guest 'findmnt -no SOURCE /etc/mqtt-uplink; findmnt -no SOURCE /var/lib/mqtt-uplink' | grep -c '\[/')" = 2 ] \
  || fail "/etc/mqtt-uplink and /var/lib/mqtt-uplink are not bind mounts of the data partition: $(guest findmnt -l)"
pass "the data partition (config, outbox) grew to the disk ($(( data_sectors_before / 2048 )) -> ${fs_mib} MiB); config and state are bound from it"

guest systemd-analyze > "$work/analyze" 2>&1 || true
log "guest: $(head -n1 "$work/analyze")"
# The running service at rest (no clients): resident memory, and CPU time over 30 s (under TCG
# emulation a tick costs far more host time than on a Pi, so any busy loop would show).
pid=$(guest systemctl show -p MainPID --value mqtt-uplink.service)
rss_kib=$(guest "awk '/^VmRSS/ { print \$2 }' /proc/$pid/status")
ticks0=$(guest "awk '{ print \$14 + \$15 }' /proc/$pid/stat")
sleep 30
ticks1=$(guest "awk '{ print \$14 + \$15 }' /proc/$pid/stat")
log "service at rest: RSS ${rss_kib} KiB, CPU $(( ticks1 - ticks0 )) ticks (1/100 s) in 30 s"

# --- clean poweroff, then the boot partition from the host --------------------------------------------
guest systemctl poweroff >/dev/null 2>&1 || true
for _ in $(seq 1 120); do kill -0 "$qemu_pid" 2>/dev/null || break; sleep 1; done
if kill -0 "$qemu_pid" 2>/dev/null; then fail "the guest did not power off within 120s"; fi
wait "$qemu_pid" 2>/dev/null || true
qemu_pid=

mdir -b -i "$fat" ::/ | sed -e 's|^::/||' -e 's|/$||' > "$work/fat-after"
if grep -qix -e mqtt-uplink -e authorized_keys "$work/fat-after"; then fail "secrets still on the boot partition after poweroff"; fi
grep -qix 'mqtt-uplink-provisioned.txt' "$work/fat-after" || fail "no provisioning report on the boot partition"
mcopy -i "$fat" ::/mqtt-uplink-provisioned.txt "$work/report.txt"
grep -q 'installed as /etc/mqtt-uplink' "$work/report.txt" || fail "report does not say the config was installed: $(cat "$work/report.txt")"
if grep -qF "$mqtt_pass" "$work/report.txt"; then fail "the provisioning report contains the password"; fi
if grep -qF "$(cut -d' ' -f2 "$work/id_ed25519.pub")" "$work/report.txt"; then fail "the report contains the key"; fi
pass "after poweroff: boot partition holds the report, no secrets"

echo "boot.sh: provisioned: PASS: image $(basename "$img_src"), $(( image_bytes / 1048576 )) MiB raw; power-on to MQTT ready ${t_ready}s (qemu TCG, $QEMU_SMP vCPUs)"
