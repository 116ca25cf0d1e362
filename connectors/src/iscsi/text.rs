//! Text keys (`key=value` pairs separated by NUL, RFC 7143 section 6) and the
//! operational-parameter negotiation of the login's operational stage.
//!
//! Each key follows its own rule (RFC 7143 section 13): list keys take the
//! first of our values the target supports, numerical keys the minimum (or
//! maximum for DefaultTime2Wait), boolean keys OR or AND, and
//! MaxRecvDataSegmentLength is *declarative*: each side states what it can
//! receive, so the target's value limits what we send and ours what it sends.
//! `NotUnderstood`, `Irrelevant` and `Reject` answers leave a key at its
//! RFC default.

use std::collections::HashMap;

/// Parses a text data segment into its pairs, in order.
pub fn parse(data: &[u8]) -> Vec<(String, String)> {
    data.split(|&b| b == 0)
        .filter(|kv| !kv.is_empty())
        .filter_map(|kv| {
            let s = String::from_utf8_lossy(kv);
            let (k, v) = s.split_once('=')?;
            Some((k.to_string(), v.to_string()))
        })
        .collect()
}

/// Encodes pairs as a text data segment (each pair NUL terminated).
pub fn encode<K: AsRef<str>, V: AsRef<str>>(pairs: &[(K, V)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (k, v) in pairs {
        out.extend_from_slice(k.as_ref().as_bytes());
        out.push(b'=');
        out.extend_from_slice(v.as_ref().as_bytes());
        out.push(0);
    }
    out
}

/// How a key's outcome is computed from the two sides' values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rule {
    /// The responder picks the first value of the offer's list it supports.
    List,
    Min,
    Max,
    Or,
    And,
    /// Each side declares its own value; nothing is negotiated.
    Declarative,
}

fn rule(key: &str) -> Option<Rule> {
    Some(match key {
        "HeaderDigest" | "DataDigest" | "AuthMethod" => Rule::List,
        "MaxBurstLength" | "FirstBurstLength" | "MaxOutstandingR2T" | "MaxConnections"
        | "ErrorRecoveryLevel" | "DefaultTime2Retain" => Rule::Min,
        "DefaultTime2Wait" => Rule::Max,
        "InitialR2T" | "DataPDUInOrder" | "DataSequenceInOrder" => Rule::Or,
        "ImmediateData" | "IFMarker" | "OFMarker" => Rule::And,
        "MaxRecvDataSegmentLength"
        | "TargetAlias"
        | "TargetPortalGroupTag"
        | "TargetAddress"
        | "TargetName"
        | "InitiatorAlias" => Rule::Declarative,
        _ => return None,
    })
}

/// RFC 7143 defaults, used when a key is not negotiated.
fn default(key: &str) -> Option<&'static str> {
    Some(match key {
        "HeaderDigest" | "DataDigest" => "None",
        "MaxRecvDataSegmentLength" => "8192",
        "MaxBurstLength" => "262144",
        "FirstBurstLength" => "65536",
        "InitialR2T" | "ImmediateData" | "DataPDUInOrder" | "DataSequenceInOrder" => "Yes",
        "MaxOutstandingR2T" | "MaxConnections" => "1",
        "ErrorRecoveryLevel" => "0",
        "DefaultTime2Wait" => "2",
        "DefaultTime2Retain" => "20",
        "IFMarker" | "OFMarker" => "No",
        _ => return None,
    })
}

/// The operational values we offer.
#[derive(Debug, Clone)]
pub struct Offer {
    pub header_digest: bool,
    pub data_digest: bool,
    pub max_recv_data_segment_length: u32,
    pub max_burst_length: u32,
    pub first_burst_length: u32,
    pub discovery: bool,
}

impl Offer {
    /// The keys of the operational stage, in the order they are sent.
    pub fn pairs(&self) -> Vec<(String, String)> {
        let digest = |on: bool| if on { "CRC32C,None" } else { "None" };
        let mut v: Vec<(&str, String)> = vec![
            ("HeaderDigest", digest(self.header_digest).into()),
            ("DataDigest", digest(self.data_digest).into()),
            (
                "MaxRecvDataSegmentLength",
                self.max_recv_data_segment_length.to_string(),
            ),
        ];
        if !self.discovery {
            v.extend([
                ("DefaultTime2Wait", "2".into()),
                ("DefaultTime2Retain", "0".into()),
                ("IFMarker", "No".into()),
                ("OFMarker", "No".into()),
                ("ErrorRecoveryLevel", "0".into()),
                ("InitialR2T", "No".into()),
                ("ImmediateData", "Yes".into()),
                ("MaxBurstLength", self.max_burst_length.to_string()),
                ("FirstBurstLength", self.first_burst_length.to_string()),
                ("MaxOutstandingR2T", "1".into()),
                ("MaxConnections", "1".into()),
                ("DataPDUInOrder", "Yes".into()),
                ("DataSequenceInOrder", "Yes".into()),
            ]);
        }
        v.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
    }
}

/// What both sides agreed on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Negotiated {
    pub header_digest: bool,
    pub data_digest: bool,
    /// What the target can receive: the limit of every data segment we send.
    pub target_max_recv_data_segment_length: u32,
    /// What we declared: the limit of every data segment the target sends.
    pub initiator_max_recv_data_segment_length: u32,
    pub max_burst_length: u32,
    pub first_burst_length: u32,
    pub initial_r2t: bool,
    pub immediate_data: bool,
    pub max_outstanding_r2t: u32,
    pub data_pdu_in_order: bool,
    pub data_sequence_in_order: bool,
    pub error_recovery_level: u32,
    pub max_connections: u32,
    pub default_time2wait: u32,
    pub default_time2retain: u32,
}

/// A key whose answer we cannot accept.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("negotiation of {key} failed: {why}")]
pub struct NegotiationError {
    pub key: String,
    pub why: String,
}

/// Tracks one operational-stage negotiation: our offers, the target's
/// answers and offers, and the replies we owe it.
#[derive(Debug)]
pub struct Negotiation {
    ours: HashMap<String, String>,
    /// Outcome per key.
    result: HashMap<String, String>,
    /// The target's declared MaxRecvDataSegmentLength.
    target_mrdsl: Option<u32>,
    initiator_mrdsl: u32,
    discovery: bool,
}

fn bad(key: &str, why: impl Into<String>) -> NegotiationError {
    NegotiationError {
        key: key.into(),
        why: why.into(),
    }
}

fn num(key: &str, v: &str) -> Result<u64, NegotiationError> {
    v.parse::<u64>()
        .map_err(|_| bad(key, format!("not a number: {v:?}")))
}

fn boolean(key: &str, v: &str) -> Result<bool, NegotiationError> {
    match v {
        "Yes" => Ok(true),
        "No" => Ok(false),
        _ => Err(bad(key, format!("not Yes or No: {v:?}"))),
    }
}

fn yes_no(b: bool) -> String {
    if b { "Yes" } else { "No" }.to_string()
}

impl Negotiation {
    pub fn new(offer: &Offer) -> Self {
        Self {
            ours: offer.pairs().into_iter().collect(),
            result: HashMap::new(),
            target_mrdsl: None,
            initiator_mrdsl: offer.max_recv_data_segment_length,
            discovery: offer.discovery,
        }
    }

    /// Takes one pair from the target. Returns the reply we must send when
    /// the target offered a key itself (rather than answering ours).
    pub fn apply(
        &mut self,
        key: &str,
        value: &str,
    ) -> Result<Option<(String, String)>, NegotiationError> {
        let rule = rule(key);
        if rule == Some(Rule::Declarative) {
            if key == "MaxRecvDataSegmentLength" {
                let v = num(key, value)?;
                if !(512..=16_777_215).contains(&v) {
                    return Err(bad(key, format!("{v} is out of range")));
                }
                self.target_mrdsl = Some(v as u32);
            }
            return Ok(None);
        }
        let Some(ours) = self.ours.get(key).cloned() else {
            // The target offers a key we did not: answer it.
            return Ok(Some(self.answer_offer(key, value)?));
        };
        if matches!(value, "NotUnderstood" | "Irrelevant" | "Reject") {
            // The key stays at its default (or does not matter).
            if let Some(d) = default(key) {
                self.result.insert(key.into(), d.into());
            }
            return Ok(None);
        }
        let rule = rule.expect("we only offer keys we know");
        let outcome = match rule {
            Rule::List => {
                if !ours.split(',').any(|o| o == value) {
                    return Err(bad(key, format!("{value:?} is not one of {ours:?}")));
                }
                value.to_string()
            }
            Rule::Min => {
                let (o, t) = (num(key, &ours)?, num(key, value)?);
                if t > o {
                    return Err(bad(key, format!("answer {t} exceeds our offer {o}")));
                }
                t.to_string()
            }
            Rule::Max => {
                let (o, t) = (num(key, &ours)?, num(key, value)?);
                if t < o {
                    return Err(bad(key, format!("answer {t} is below our offer {o}")));
                }
                t.to_string()
            }
            Rule::Or => {
                let (o, t) = (boolean(key, &ours)?, boolean(key, value)?);
                if o && !t {
                    return Err(bad(key, "answered No to an OR key offered Yes"));
                }
                yes_no(o || t)
            }
            Rule::And => {
                let (o, t) = (boolean(key, &ours)?, boolean(key, value)?);
                if !o && t {
                    return Err(bad(key, "answered Yes to an AND key offered No"));
                }
                yes_no(o && t)
            }
            Rule::Declarative => unreachable!(),
        };
        self.result.insert(key.into(), outcome);
        Ok(None)
    }

    /// Our answer to a key the target offered, recording the outcome.
    fn answer_offer(
        &mut self,
        key: &str,
        value: &str,
    ) -> Result<(String, String), NegotiationError> {
        let reply = |v: &str| Ok((key.to_string(), v.to_string()));
        let Some(rule) = rule(key) else {
            return reply("NotUnderstood");
        };
        let outcome = match (rule, key) {
            (Rule::List, "HeaderDigest" | "DataDigest") => {
                // We can do both; take the target's first choice.
                value.split(',').next().unwrap_or("None").to_string()
            }
            (Rule::List, _) => return reply("Reject"),
            (Rule::Min, _) => num(key, value)?.to_string(),
            (Rule::Max, _) => num(key, value)?.to_string(),
            // We accept the target's value for booleans only where the
            // result function lets the responder choose freely.
            (Rule::Or, _) => yes_no(boolean(key, value)?),
            (Rule::And, _) => yes_no(boolean(key, value)? && key == "ImmediateData"),
            (Rule::Declarative, _) => unreachable!(),
        };
        if self.discovery && !matches!(key, "HeaderDigest" | "DataDigest") {
            return reply("Irrelevant");
        }
        self.result.insert(key.into(), outcome.clone());
        reply(&outcome)
    }

    /// The outcome, with defaults for everything not negotiated.
    pub fn finish(&self) -> Result<Negotiated, NegotiationError> {
        let get = |k: &str| -> String {
            self.result
                .get(k)
                .cloned()
                .or_else(|| default(k).map(String::from))
                .unwrap_or_default()
        };
        let n = |k: &str| -> Result<u32, NegotiationError> {
            let v = num(k, &get(k))?;
            u32::try_from(v).map_err(|_| bad(k, "too large"))
        };
        let b = |k: &str| boolean(k, &get(k));
        let max_burst = n("MaxBurstLength")?;
        let r = Negotiated {
            header_digest: get("HeaderDigest") == "CRC32C",
            data_digest: get("DataDigest") == "CRC32C",
            target_max_recv_data_segment_length: self.target_mrdsl.unwrap_or(8192),
            initiator_max_recv_data_segment_length: self.initiator_mrdsl,
            max_burst_length: max_burst,
            first_burst_length: n("FirstBurstLength")?.min(max_burst),
            initial_r2t: b("InitialR2T")?,
            immediate_data: b("ImmediateData")?,
            max_outstanding_r2t: n("MaxOutstandingR2T")?.max(1),
            data_pdu_in_order: b("DataPDUInOrder")?,
            data_sequence_in_order: b("DataSequenceInOrder")?,
            error_recovery_level: n("ErrorRecoveryLevel")?,
            max_connections: n("MaxConnections")?,
            default_time2wait: n("DefaultTime2Wait")?,
            default_time2retain: n("DefaultTime2Retain")?,
        };
        if r.max_burst_length < 512 {
            return Err(bad("MaxBurstLength", "below 512"));
        }
        Ok(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn offer() -> Offer {
        Offer {
            header_digest: true,
            data_digest: false,
            max_recv_data_segment_length: 262_144,
            max_burst_length: 1 << 20,
            first_burst_length: 262_144,
            discovery: false,
        }
    }

    fn run(
        answers: &[(&str, &str)],
    ) -> (Result<Negotiated, NegotiationError>, Vec<(String, String)>) {
        let mut n = Negotiation::new(&offer());
        let mut replies = Vec::new();
        for (k, v) in answers {
            match n.apply(k, v) {
                Ok(Some(r)) => replies.push(r),
                Ok(None) => {}
                Err(e) => return (Err(e), replies),
            }
        }
        (n.finish(), replies)
    }

    #[test]
    fn parse_and_encode() {
        let data = encode(&[("A", "1"), ("TargetName", "iqn.x:y=z")]);
        assert_eq!(data, b"A=1\0TargetName=iqn.x:y=z\0");
        let p = parse(&data);
        assert_eq!(p[1], ("TargetName".to_string(), "iqn.x:y=z".to_string()));
        assert_eq!(
            parse(b"A=1\0\0B=2"),
            vec![("A".into(), "1".into()), ("B".into(), "2".into())]
        );
    }

    #[test]
    fn offer_lists_every_key() {
        let p = offer().pairs();
        let get = |k: &str| p.iter().find(|(a, _)| a == k).map(|(_, v)| v.as_str());
        assert_eq!(get("HeaderDigest"), Some("CRC32C,None"));
        assert_eq!(get("DataDigest"), Some("None"));
        assert_eq!(get("InitialR2T"), Some("No"));
        assert_eq!(get("ImmediateData"), Some("Yes"));
        assert_eq!(get("MaxBurstLength"), Some("1048576"));
        assert_eq!(get("IFMarker"), Some("No"));
        assert_eq!(get("MaxConnections"), Some("1"));
        let d = Offer {
            discovery: true,
            ..offer()
        }
        .pairs();
        assert_eq!(d.len(), 3);
    }

    #[test]
    fn target_answers_are_applied_by_rule() {
        let (r, replies) = run(&[
            ("HeaderDigest", "CRC32C"),
            ("DataDigest", "None"),
            ("MaxRecvDataSegmentLength", "8192"),
            ("MaxBurstLength", "262144"),
            ("FirstBurstLength", "65536"),
            ("InitialR2T", "Yes"),
            ("ImmediateData", "No"),
            ("MaxOutstandingR2T", "1"),
            ("DefaultTime2Wait", "2"),
            ("DefaultTime2Retain", "0"),
            ("TargetPortalGroupTag", "1"),
        ]);
        assert!(replies.is_empty());
        let r = r.unwrap();
        assert!(r.header_digest);
        assert!(!r.data_digest);
        assert_eq!(r.target_max_recv_data_segment_length, 8192);
        assert_eq!(r.initiator_max_recv_data_segment_length, 262_144);
        assert_eq!(r.max_burst_length, 262_144, "smaller answer wins");
        assert_eq!(r.first_burst_length, 65536);
        assert!(r.initial_r2t, "OR: the target's Yes wins");
        assert!(!r.immediate_data, "AND: the target's No wins");
        assert_eq!(r.error_recovery_level, 0);
    }

    #[test]
    fn irrelevant_and_not_understood_keep_defaults() {
        let (r, _) = run(&[
            ("FirstBurstLength", "Irrelevant"),
            ("MaxBurstLength", "NotUnderstood"),
            ("InitialR2T", "No"),
            ("ImmediateData", "Yes"),
        ]);
        let r = r.unwrap();
        assert_eq!(r.first_burst_length, 65536);
        assert_eq!(r.max_burst_length, 262_144);
        assert!(!r.initial_r2t);
        assert!(r.immediate_data);
        // No MaxRecvDataSegmentLength declared: the default limits us.
        assert_eq!(r.target_max_recv_data_segment_length, 8192);
    }

    #[test]
    fn bad_answers_fail() {
        let (r, _) = run(&[("MaxBurstLength", "2097152")]);
        assert_eq!(r.unwrap_err().key, "MaxBurstLength");
        let (r, _) = run(&[("HeaderDigest", "MD5")]);
        assert_eq!(r.unwrap_err().key, "HeaderDigest");
        let (r, _) = run(&[("ImmediateData", "maybe")]);
        assert!(r.is_err());
        let (r, _) = run(&[("MaxRecvDataSegmentLength", "12")]);
        assert!(r.is_err());
    }

    #[test]
    fn target_offers_get_answers() {
        let (r, replies) = run(&[
            ("X-com.example.Foo", "1"),
            ("MaxRecvDataSegmentLength", "65536"),
        ]);
        assert_eq!(
            replies,
            vec![("X-com.example.Foo".into(), "NotUnderstood".into())]
        );
        assert_eq!(r.unwrap().target_max_recv_data_segment_length, 65536);
        let mut n = Negotiation::new(&Offer {
            discovery: true,
            ..offer()
        });
        let reply = n.apply("MaxBurstLength", "65536").unwrap();
        assert_eq!(reply, Some(("MaxBurstLength".into(), "Irrelevant".into())));
    }
}
