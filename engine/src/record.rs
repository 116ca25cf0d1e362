//! Backup records that travel: `backup export` prints one, `backup import`
//! on another installation (sharing the backup storage) takes it back.
//!
//! Cinder's format is base64 of the backup's fields as JSON. Ours is the
//! same shape with three additions: a format tag and version, the target
//! pool's identity, and a SHA-256 of the canonical payload, so a record that
//! was cut, garbled or edited is refused before anything is created. Import
//! then checks the data itself against the record's checksum.

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::catalog::BackupRecord;

const FORMAT: &str = "volback-backup-record";
const VERSION: u32 = 1;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Payload {
    pub backup: BackupRecord,
    /// Driver kind of the target backend ("file").
    pub target_driver: String,
    /// Identity of the pool holding the data when the record was made.
    pub target_pool_identity: String,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Envelope {
    format: String,
    version: u32,
    payload: Payload,
    sha256: String,
}

fn digest(p: &Payload) -> String {
    let canonical = serde_json::to_vec(p).expect("payload serializes");
    let h = Sha256::digest(&canonical);
    h.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn encode(payload: Payload) -> String {
    let sha256 = digest(&payload);
    let env = Envelope {
        format: FORMAT.into(),
        version: VERSION,
        payload,
        sha256,
    };
    base64::engine::general_purpose::STANDARD
        .encode(serde_json::to_vec(&env).expect("record serializes"))
}

/// Decodes and checks a record; the error says what is wrong with it.
pub fn decode(text: &str) -> Result<Payload, String> {
    let compact: String = text.chars().filter(|c| !c.is_whitespace()).collect();
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(compact.as_bytes())
        .map_err(|e| format!("not base64 ({e})"))?;
    let env: Envelope =
        serde_json::from_slice(&bytes).map_err(|e| format!("malformed record: {e}"))?;
    if env.format != FORMAT {
        return Err(format!(
            "not a volback backup record (format '{}')",
            env.format
        ));
    }
    if env.version != VERSION {
        return Err(format!(
            "record version {} is not supported (this volback reads version {VERSION})",
            env.version
        ));
    }
    if digest(&env.payload) != env.sha256 {
        return Err("record checksum does not match its contents (the record was altered)".into());
    }
    let b = &env.payload.backup;
    if b.checksum
        .as_deref()
        .is_none_or(|c| !c.starts_with("map-xxh3-128:"))
    {
        return Err("record has no data checksum".into());
    }
    if b.volume_size == 0 || b.id.is_empty() || b.target_volume_id.is_empty() {
        return Err("record lacks a backup id, a size or a target volume".into());
    }
    Ok(env.payload)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::BackupState;

    fn payload() -> Payload {
        Payload {
            backup: BackupRecord {
                id: "b".into(),
                state: BackupState::Available,
                volume_id: "v".into(),
                volume_name: "n".into(),
                volume_size: 4096,
                volume_backend: "p".into(),
                volume_pool: "g".into(),
                volume_metadata: Default::default(),
                target_backend: "bk".into(),
                target_pool: "vault".into(),
                target_volume_id: "t".into(),
                target_snapshot_id: Some("ts".into()),
                source_snapshot_id: None,
                mode: "full".into(),
                change_tracking: "full".into(),
                note: None,
                map_block_size: 4096,
                parent_id: None,
                from_snapshot: false,
                checksum: Some("map-xxh3-128:4096:00".into()),
                bytes_read: 1,
                bytes_written: 1,
                created_at: 1,
                completed_at: Some(2),
                error: None,
            },
            target_driver: "file".into(),
            target_pool_identity: "file:dev=1:ino=2".into(),
        }
    }

    #[test]
    fn round_trip_and_tamper_detection() {
        let text = encode(payload());
        assert_eq!(decode(&text).unwrap().backup.id, "b");
        // Edit a field inside the JSON and re-encode without fixing the hash.
        let json = String::from_utf8(
            base64::engine::general_purpose::STANDARD
                .decode(&text)
                .unwrap(),
        )
        .unwrap();
        let edited = json.replace("\"volume_size\":4096", "\"volume_size\":8192");
        assert_ne!(json, edited);
        let tampered = base64::engine::general_purpose::STANDARD.encode(edited);
        assert!(decode(&tampered).unwrap_err().contains("altered"));
        assert!(decode("!!!").unwrap_err().contains("not base64"));
        assert!(decode(&text[..text.len() / 2]).is_err());
    }
}
