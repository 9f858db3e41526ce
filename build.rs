//! Links the `mqtt-uplink` binary with packed relative relocations (DT_RELR) on GNU/Linux.
//!
//! A position-independent executable carries one 24-byte relocation entry per pointer in its
//! read-only data; ld.so reads them all at every start, so they stay resident: 700 KiB of the
//! appliance's idle RSS. Packed, they take 8 KiB. Needs GNU ld 2.38 or later to link and glibc 2.36
//! (Debian 12, Raspberry Pi OS bookworm) or later to run; the Debian package's `$auto` dependencies
//! say so (libc6 >= 2.36). Only the binary: the library, tests and benchmarks link as before.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    let var = |k: &str| std::env::var(k).unwrap_or_default();
    if var("CARGO_CFG_TARGET_OS") == "linux" && var("CARGO_CFG_TARGET_ENV") == "gnu" {
        println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
    }
}
