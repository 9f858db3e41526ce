# shellcheck shell=bash
# mqtt-uplink image: the A/B root slots, shared by the RAUC bootloader backend, the install hooks, the
# health gate and mqtt-uplink-update. Sourced, not run.
#
# Slot choice on a Raspberry Pi (firmware, no U-Boot): the FAT boot partition holds one folder per
# slot (slot-a/, slot-b/: the slot's kernel, initrd, device trees, overlays and cmdline.txt with
# root=PARTUUID=...-02 or -03 and rauc.slot=A or B). config.txt names the committed slot
# (os_prefix=slot-a/); tryboot.txt names the slot on trial. `reboot "0 tryboot"` makes the firmware
# read tryboot.txt instead of config.txt for that one boot only: any later boot (a power cut, a hang
# reset by the watchdog, a failed health check's reboot) is back on config.txt, the committed slot.
# The state RAUC asks about (primary, good/bad) is kept in mqtt-uplink-slots.txt on the same
# partition. Under qemu there is no Pi firmware: image/test/boot.sh reads the same files and emulates
# the firmware's choice (the one-shot tryboot flag is the file mqtt-uplink-tryboot, which a Pi ignores
# and mqtt-uplink-data.service removes).
# shellcheck disable=SC2034 # used by the scripts that source this
BOOT=${BOOT:-/boot/firmware}
SLOT_STATE=$BOOT/mqtt-uplink-slots.txt
TRYBOOT_FLAG=$BOOT/mqtt-uplink-tryboot
REPORT_FILE=$BOOT/mqtt-uplink-update.txt
DATA_IMAGE=/data/mqtt-uplink-image
STATUS_FILE=$DATA_IMAGE/update-status
DISK_ID=6d717475   # the image's MBR disk identifier: root slots are PARTUUID=$DISK_ID-02 and -03

slot_lower() { tr 'AB' 'ab' <<< "$1"; }
slot_partuuid() { case $1 in A) echo "$DISK_ID-02" ;; B) echo "$DISK_ID-03" ;; *) return 1 ;; esac; }
other_slot() { case $1 in A) echo B ;; B) echo A ;; *) return 1 ;; esac; }
booted_slot() { tr ' ' '\n' < "${PROC_CMDLINE:-/proc/cmdline}" | sed -n 's/^rauc\.slot=//p' | tail -n1; }
current_version() { cat /usr/share/mqtt-uplink-image/release 2>/dev/null || echo unknown; }

# slot_get KEY: a value from the state file (defaults: A committed and good, B bad, no trial). The
# committed slot is the one config.txt boots (its os_prefix=): that file is what the firmware reads, so
# a power cut between its rewrite and the state file's cannot make the two disagree.
slot_get() {
  local v=
  if [ "$1" = committed ]; then
    v=$(sed -n 's|^os_prefix=slot-\([ab]\)/[[:space:]]*$|\1|p' "$BOOT/config.txt" 2>/dev/null | tail -n1 | tr ab AB)
  fi
  [ -n "$v" ] || v=$(sed -n "s/^$1=//p" "$SLOT_STATE" 2>/dev/null | tail -n1)
  if [ -z "$v" ]; then
    case $1 in committed) v=A ;; state_A) v=good ;; state_B) v=bad ;; esac
  fi
  printf '%s\n' "$v"
}

# Writes a file on FAT as safely as FAT allows: a temporary file, synced, renamed, synced.
fat_write() {
  local dest=$1 tmp
  tmp=$(dirname "$dest")/.$(basename "$dest").tmp
  cat > "$tmp"
  sync "$tmp"
  mv -f "$tmp" "$dest"
  sync "$(dirname "$dest")"
}

# slot_set KEY=VALUE...: rewrites the state file with the given keys changed.
slot_set() {
  local committed trial state_A state_B kv
  committed=$(slot_get committed); trial=$(slot_get trial)
  state_A=$(slot_get state_A); state_B=$(slot_get state_B)
  for kv in "$@"; do
    case ${kv%%=*} in
      committed) committed=${kv#*=} ;; trial) trial=${kv#*=} ;;
      state_A) state_A=${kv#*=} ;; state_B) state_B=${kv#*=} ;;
      *) echo "slot_set: unknown key $kv" >&2; return 1 ;;
    esac
  done
  printf '# mqtt-uplink A/B root slots (written by the device; see /usr/lib/mqtt-uplink-image/slots.sh)\ncommitted=%s\ntrial=%s\nstate_A=%s\nstate_B=%s\n' \
    "$committed" "$trial" "$state_A" "$state_B" | fat_write "$SLOT_STATE"
}

# set_os_prefix FILE SLOT: config.txt or tryboot.txt boots SLOT's folder.
set_os_prefix() {
  local file=$1 slot=$2
  sed -e "s|^os_prefix=.*|os_prefix=slot-$(slot_lower "$slot")/|" "$BOOT/config.txt" | fat_write "$file"
  grep -qx "os_prefix=slot-$(slot_lower "$slot")/" "$file" || { echo "no os_prefix line in $file" >&2; return 1; }
}

# record MESSAGE: where the operator looks: the journal (stdout of our units, or logger), the boot
# partition's report (the last 200 lines kept) and the status file read by `mqtt-uplink-update status`
# and by a node-exporter textfile collector (/run/mqtt-uplink-image/update.prom).
record() {
  local line
  line="$(date -u +%FT%TZ) slot $(booted_slot) $(current_version): $*"
  logger -t mqtt-uplink-update -- "$*" 2>/dev/null || true
  echo "mqtt-uplink-update: $*" >&2
  { tail -n 199 "$REPORT_FILE" 2>/dev/null; printf '%s\n' "$line"; } | fat_write "$REPORT_FILE" || true
  if [ -d "$DATA_IMAGE" ]; then printf '%s\n' "$line" > "$STATUS_FILE.tmp" && mv -f "$STATUS_FILE.tmp" "$STATUS_FILE"; fi
}

# metric NAME VALUE HELP: the gauge file for a node-exporter textfile collector.
metric() {
  mkdir -p /run/mqtt-uplink-image
  local f=/run/mqtt-uplink-image/update.prom
  { grep -v "^$1[ {]" "$f" 2>/dev/null | grep -v "^# [A-Z]* $1 " || true
    printf '# HELP %s %s\n# TYPE %s gauge\n%s %s\n' "$1" "$3" "$1" "$1" "$2"; } > "$f.tmp"
  mv -f "$f.tmp" "$f"
}
