//! Cloud profiles (`[uplink] profile`): what a managed cloud requires of the uplink beyond plain
//! MQTT. `generic` (the default) adds nothing; `aws-iot` ([`aws`]) is AWS IoT Core: mutual TLS, ALPN
//! `x-amzn-mqtt-ca` on port 443, and its published limits on client ids, topics and payloads;
//! `azure-iot-hub` ([`azure`]) is Azure IoT Hub: its username, a SAS token (renewed before it lapses)
//! or an X.509 certificate, and its fixed topic shapes. `check` applies the limits
//! (src/config/validate/profile.rs), the bridge the topic limits per message, the uplink the rest.
//! Below config and the bridge and uplink, which all read it.

pub mod aws;
pub mod azure;

/// `[uplink] profile`, validated.
#[derive(Debug, Clone, PartialEq, Default)]
pub enum Profile {
    #[default]
    Generic,
    AwsIot,
    AzureIotHub(azure::AzureConfig),
}

impl Profile {
    /// The name as written in the config.
    pub fn name(&self) -> &'static str {
        match self {
            Profile::Generic => "generic",
            Profile::AwsIot => "aws-iot",
            Profile::AzureIotHub(_) => "azure-iot-hub",
        }
    }

    /// The Azure settings of an `azure-iot-hub` profile.
    pub fn azure(&self) -> Option<&azure::AzureConfig> {
        match self {
            Profile::AzureIotHub(a) => Some(a),
            _ => None,
        }
    }
}

/// A cloud's limits on the topic names it takes (the `aws-iot` profile: 256 bytes, 7 slashes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CloudTopicLimits {
    pub max_bytes: usize,
    pub max_slashes: usize,
}

/// The limits on cloud topic names the bridge enforces per message (deep `#` mappings can make
/// topics `check` cannot see): AWS IoT Core's 256 bytes and 7 slashes. Azure IoT Hub's topics are
/// fixed by the mappings `check` allows.
pub fn cloud_topic_limits(profile: &Profile) -> Option<CloudTopicLimits> {
    (*profile == Profile::AwsIot).then_some(CloudTopicLimits {
        max_bytes: aws::MAX_TOPIC_BYTES,
        max_slashes: aws::MAX_SLASHES,
    })
}

/// The ALPN protocols the uplink offers in TLS to a broker on `port`: `alpn` when the config sets it
/// (any profile); otherwise `x-amzn-mqtt-ca` for `aws-iot` on port 443 (AWS IoT Core serves HTTPS
/// there too and picks MQTT with client-certificate authentication by this name); otherwise none.
pub fn alpn_for(profile: &Profile, alpn: Option<&[String]>, port: u16) -> Vec<String> {
    match alpn {
        Some(list) => list.to_vec(),
        None if *profile == Profile::AwsIot && port == 443 => vec![aws::ALPN.to_string()],
        None => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alpn_is_amazons_on_443_for_aws_only_unless_set() {
        assert_eq!(alpn_for(&Profile::AwsIot, None, 443), vec!["x-amzn-mqtt-ca"]);
        assert!(alpn_for(&Profile::AwsIot, None, 8883).is_empty());
        assert!(alpn_for(&Profile::Generic, None, 443).is_empty());
        let set = vec!["x-amzn-mqtt-ca".to_string()];
        assert_eq!(alpn_for(&Profile::AwsIot, Some(&set), 18883), set);
        assert_eq!(alpn_for(&Profile::Generic, Some(&set), 8883), set);
        assert!(alpn_for(&Profile::AwsIot, Some(&[]), 443).is_empty());
    }
}
