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
# Forwards use qemu user networking on 127.0.0.1 with host port 0 (the kernel picks a free port;
# read back with the monitor's `info usernet`): never a fixed port, loopback only.
#
# Usage: image/test/boot.sh [--scenario provisioned|unprovisioned|package] [IMAGE]
#        (default: every scenario, one after the other, package only when there is a package; IMAGE:
#        .img or .img.xz; default: the newest in image/out)
# Environment: BOOT_TIMEOUT (seconds to service ready, default 600), QEMU_SMP (default 2).
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
    "$0" --scenario provisioned "$@"
    "$0" --scenario unprovisioned "$@"
    if [ -n "$deb" ]; then exec "$0" --scenario package "$@"; fi
    echo "boot.sh: package scenario skipped: no arm64 package (debian/build-deb.sh arm64, or BOOT_DEB=)" >&2
    exit 0
    ;;
  provisioned|unprovisioned) ;;
  package) { [ -n "$deb" ] && [ -f "$deb" ]; } || fail "no arm64 package: build one with debian/build-deb.sh arm64 or set BOOT_DEB" ;;
  *) echo "boot.sh: unknown scenario: $scenario (provisioned, unprovisioned or package)" >&2; exit 64 ;;
esac

missing=$("$image_dir/deps.sh" --check boot) || fail "missing tools; install them with: $image_dir/deps.sh boot  (packages: $missing)"

img_src=${1:-$(find "$image_dir/out" -maxdepth 1 \( -name 'mqtt-uplink-*-rpi-arm64.img.xz' -o -name 'mqtt-uplink-*-rpi-arm64.img' \) \
  -printf '%T@ %p\n' 2>/dev/null | sort -rn | head -n1 | cut -d' ' -f2-)}
{ [ -n "$img_src" ] && [ -f "$img_src" ]; } || fail "no image: build one with image/build.sh or pass its path"

work=$(mktemp -d /var/tmp/mqtt-uplink-boot.XXXXXX)
qemu_pid=
ssh_ok=0
cleanup() {
  local rc=$?
  if [ "$rc" -ne 0 ] && [ "$ssh_ok" = 1 ] && kill -0 "$qemu_pid" 2>/dev/null; then
    echo "---- the guest's journal for our units ----" >&2
    guest journalctl -b --no-pager -o cat -u mqtt-uplink-provision -u mqtt-uplink-growroot -u nftables \
      -u mqtt-uplink 2>&1 | tail -n 80 >&2 || true
  fi
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
boot_off=$(( $(part_start 1) * 512 ))
root_start=$(part_start 2)
{ [ "$boot_off" -gt 0 ] && [ -n "$root_start" ]; } || fail "unexpected partition table: $(sfdisk -d "$disk")"
fat="$disk@@$boot_off"
root_sectors_before=$(sfdisk -d "$disk" | awk -v p="${disk}2" '$1 == p { gsub(/[^0-9]/, "", $6); print $6 }')

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

# The kernel and initrd raspi-firmware put on the boot partition.
mapfile -t fat_files < <(mdir -b -i "$fat" ::/ | sed -e 's|^::/||' -e 's|/$||')
kernel=$(printf '%s\n' "${fat_files[@]}" | grep -m1 '^vmlinuz-' || true)
initrd=$(printf '%s\n' "${fat_files[@]}" | grep -m1 '^initrd.img-' || true)
{ [ -n "$kernel" ] && [ -n "$initrd" ]; } || fail "no vmlinuz-*/initrd.img-* on the boot partition: ${fat_files[*]}"
mcopy -i "$fat" "::/$kernel" "$work/vmlinuz"
mcopy -i "$fat" "::/$initrd" "$work/initrd"
log "kernel $kernel, initrd $initrd"

# --- boot ---------------------------------------------------------------------------------------
mkfifo "$work/mon.in" "$work/mon.out"
t_start=$(date +%s)
qemu-system-aarch64 -M virt -cpu cortex-a53 -smp "$QEMU_SMP" -m 1024 \
  -display none -nodefaults -no-reboot \
  -serial "file:$work/console.log" \
  -chardev "pipe,id=mon,path=$work/mon" -mon chardev=mon,mode=readline \
  -kernel "$work/vmlinuz" -initrd "$work/initrd" \
  -append "root=LABEL=RASPIROOT rw console=ttyAMA0 rootwait net.ifnames=1 systemd.status_unit_format=name" \
  -drive "file=$disk,format=raw,if=none,id=d0,cache=writeback" -device virtio-blk-pci,drive=d0 \
  -netdev "user,id=n0,hostfwd=tcp:127.0.0.1:0-:1883,hostfwd=tcp:127.0.0.1:0-:22" \
  -device virtio-net-pci,netdev=n0,romfile= \
  -device virtio-rng-pci \
  2> "$work/qemu.err" &
qemu_pid=$!
exec 3> "$work/mon.in" 4< "$work/mon.out"
echo "info usernet" >&3
usernet=$(timeout 5 cat <&4 || true)
fwd_port() { printf '%s\n' "$usernet" | tr -d '\r' | awk -v g="$1" '/HOST_FORWARD/ && $6 == g { print $4 }'; }
mqtt_port=$(fwd_port 1883)
ssh_port=$(fwd_port 22)
{ [ -n "$mqtt_port" ] && [ -n "$ssh_port" ]; } || fail "no port forwards from qemu: $usernet $(cat "$work/qemu.err")"
log "qemu pid $qemu_pid; 127.0.0.1:$mqtt_port -> guest 1883, 127.0.0.1:$ssh_port -> guest 22"
# systemd's status lines on the serial console (unit names, see systemd.status_unit_format= above,
# wrapped in colour codes).
console_has() { grep -aqE "$1" "$work/console.log" 2>/dev/null; }
service_failed='Failed to start .{0,16}mqtt-uplink\.service'
# A command on the guest as root, over SSH; GUEST_TIMEOUT seconds at most (apt under TCG is slow).
guest() {
  timeout "${GUEST_TIMEOUT:-30}" ssh -q -p "$ssh_port" -i "$work/id_ed25519" -o IdentitiesOnly=yes \
    -o BatchMode=yes -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o ConnectTimeout=10 \
    root@127.0.0.1 "$@"
}

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
  guest 'systemctl disable --now mqtt-uplink.service >/dev/null 2>&1; rm -rf /usr/bin/mqtt-uplink \
    /usr/lib/systemd/system/mqtt-uplink.service /etc/mqtt-uplink /var/lib/mqtt-uplink && systemctl daemon-reload' \
    || fail "removing the image's copy"
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

root_sectors_after=$(guest "cat /sys/class/block/\$(basename \$(readlink -f \$(findmnt -no SOURCE /)))/size")
[ "$root_sectors_after" -gt $(( root_sectors_before + 1024 * 2048 * 9 / 10 )) ] \
  || fail "root partition did not grow: $root_sectors_before -> $root_sectors_after sectors"
fs_mib=$(guest "df -BM --output=size / | tail -n1 | tr -dc 0-9")
[ "$fs_mib" -gt $(( root_sectors_before / 2048 + 800 )) ] || fail "root filesystem did not grow: ${fs_mib} MiB"
pass "root partition and filesystem grew to the disk ($(( root_sectors_before / 2048 )) -> ${fs_mib} MiB)"

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
