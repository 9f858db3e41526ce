//! The `mqtt-uplink` binary: parse the command line, hand over to the library.

#![forbid(unsafe_code)]

fn main() {
    std::process::exit(mqtt_uplink::cli::main());
}
