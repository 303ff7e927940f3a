//! Topic names. A namespace prefix lets several independent dfos
//! deployments (or tests) share one Kafka cluster without seeing each
//! other's traffic.

/// The topic names of one dfos deployment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topics {
    prefix: String,
}

/// Partitions of `dfos.requests` (and `dfos.events`) when storaged creates them.
pub const DEFAULT_REQUEST_PARTITIONS: i32 = 12;
/// Every per-mount reply topic starts with this, after the namespace prefix.
const REPLY_STEM: &str = "dfos.reply.";

impl Topics {
    /// `namespace` empty gives the plain names of DESIGN.md (`dfos.requests`).
    pub fn new(namespace: &str) -> Self {
        let prefix = if namespace.is_empty() { String::new() } else { format!("{namespace}.") };
        Topics { prefix }
    }

    pub fn requests(&self) -> String {
        format!("{}dfos.requests", self.prefix)
    }

    pub fn events(&self) -> String {
        format!("{}dfos.events", self.prefix)
    }

    pub fn reply(&self, mount_id: &str) -> String {
        format!("{}{REPLY_STEM}{mount_id}", self.prefix)
    }

    /// storaged only produces to topics that are reply topics of its own
    /// namespace, so a forged envelope cannot make it write elsewhere.
    pub fn is_reply_topic(&self, topic: &str) -> bool {
        topic.strip_prefix(&self.prefix).and_then(|rest| rest.strip_prefix(REPLY_STEM)).is_some_and(|id| {
            !id.is_empty() && id.len() <= 200 && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
    }
}

/// What to check when brokers reached over TLS do not answer, for the
/// daemons' errors: `options` are the librdkafka settings a daemon was
/// given (the last `security.protocol` wins, as in librdkafka). The
/// handshake's own failure is reported on a queue that the admin clients
/// probing the brokers never poll, so its reason cannot be quoted.
pub fn tls_unreachable_hint(options: &[(String, String)]) -> Option<&'static str> {
    let (_, protocol) = options.iter().rev().find(|(key, _)| key == "security.protocol")?;
    protocol.to_ascii_lowercase().contains("ssl").then_some(
        "; over TLS, check that --brokers names the brokers' TLS listener and that ssl.ca.location holds the CA \
         that signed their certificate",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_design() {
        let t = Topics::new("");
        assert_eq!(t.requests(), "dfos.requests");
        assert_eq!(t.reply("m1"), "dfos.reply.m1");
        let t = Topics::new("test7");
        assert_eq!(t.events(), "test7.dfos.events");
        assert!(t.is_reply_topic("test7.dfos.reply.abc-1"));
    }

    #[test]
    fn only_own_reply_topics_are_accepted() {
        let t = Topics::new("ns");
        assert!(!t.is_reply_topic("ns.dfos.requests"));
        assert!(!t.is_reply_topic("dfos.reply.x"));
        assert!(!t.is_reply_topic("ns.dfos.reply."));
        assert!(!t.is_reply_topic("ns.dfos.reply.a/b"));
        assert!(!t.is_reply_topic("ns.dfos.reply.a.b"));
    }
}
