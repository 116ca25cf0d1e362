//! The login phase (RFC 7143 sections 6 and 11.12-11.13): security stage
//! with CHAP (one-way or mutual) or none, then the operational stage with
//! real negotiation (see [`super::text`]), until the target moves us to the
//! full feature phase. Every login PDU gets a fresh task tag, continued
//! (C bit) responses are collected across PDUs, and login status classes
//! become typed errors. Also: the plain PDU reader used during login and
//! the discovery (SendTargets) exchange.

use rand::RngCore;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tracing::{debug, info};

use super::chap;
use super::error::IscsiError;
use super::pdu::*;
use super::spec::Chap;
use super::text::{self, Negotiated, Negotiation, Offer};

const STAGE_SECURITY: u8 = 0;
const STAGE_OPERATIONAL: u8 = 1;
const STAGE_FULL_FEATURE: u8 = 3;
const TRANSIT: u8 = 0x80;
const CONTINUE: u8 = 0x40;
/// Refuse text exchanges larger than this (a broken or hostile target).
const MAX_TEXT: usize = 1 << 20;

/// What a login needs.
pub struct LoginParams<'a> {
    pub initiator: &'a str,
    /// The target to log into; `None` for a discovery session.
    pub target: Option<&'a str>,
    pub chap: Option<&'a Chap>,
    pub mutual: Option<&'a Chap>,
    pub isid: [u8; 6],
    pub offer: Offer,
}

/// A session in full feature phase.
#[derive(Debug, Clone)]
pub struct LoginResult {
    pub tsih: u16,
    pub negotiated: Negotiated,
    /// CmdSN of the first command.
    pub cmdsn: u32,
    pub exp_statsn: u32,
    pub exp_cmdsn: u32,
    pub max_cmdsn: u32,
    /// Next task tag to use.
    pub next_itt: u32,
}

/// One PDU read during login or discovery (no digests there).
pub struct Pdu {
    pub bhs: Bhs,
    pub data: Vec<u8>,
}

/// Reads one PDU without digests.
pub async fn read_pdu<S: AsyncRead + Unpin>(s: &mut S) -> Result<Pdu, IscsiError> {
    let mut bhs = Bhs::default();
    s.read_exact(&mut bhs.0).await?;
    let ahs = bhs.ahs_len();
    let n = bhs.data_len();
    if n > MAX_TEXT {
        return Err(IscsiError::Protocol(format!(
            "{n}-byte data segment during login"
        )));
    }
    let mut data = vec![0u8; ahs + n + pad4(n)];
    s.read_exact(&mut data).await?;
    data.drain(..ahs);
    data.truncate(n);
    Ok(Pdu { bhs, data })
}

/// Writes one PDU without digests.
pub async fn write_pdu<S: AsyncWrite + Unpin>(
    s: &mut S,
    bhs: &Bhs,
    data: &[u8],
) -> Result<(), IscsiError> {
    let mut buf = Vec::with_capacity(BHS_LEN + data.len() + 3);
    buf.extend_from_slice(&bhs.0);
    buf.extend_from_slice(data);
    buf.resize(buf.len() + pad4(data.len()), 0);
    s.write_all(&buf).await?;
    s.flush().await?;
    Ok(())
}

/// A random ISID of the "random" type (T=10b), fixed for a device's life so
/// that a re-login replaces its old session at the target.
pub fn random_isid() -> [u8; 6] {
    let mut isid = [0u8; 6];
    rand::thread_rng().fill_bytes(&mut isid[1..]);
    isid[0] = 0x80;
    isid
}

struct Login<'a, S> {
    s: &'a mut S,
    p: &'a LoginParams<'a>,
    itt: u32,
    cmdsn: u32,
    exp_statsn: u32,
    tsih: u16,
    exp_cmdsn: u32,
    max_cmdsn: u32,
}

/// One login response, all continuations collected.
struct Response {
    transit: bool,
    nsg: u8,
    pairs: Vec<(String, String)>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Login<'_, S> {
    fn fresh_itt(&mut self) -> u32 {
        let t = self.itt;
        self.itt = self.itt.wrapping_add(1);
        if self.itt == RESERVED_TAG {
            self.itt = 0;
        }
        t
    }

    fn target_name(&self) -> &str {
        self.p.target.unwrap_or("(discovery)")
    }

    /// Sends one request (fresh ITT) and reads the answer, asking for the
    /// rest as long as the target sets the C bit.
    async fn exchange(
        &mut self,
        csg: u8,
        nsg: u8,
        transit: bool,
        pairs: &[(String, String)],
    ) -> Result<Response, IscsiError> {
        let mut data = text::encode(pairs);
        let mut collected = Vec::new();
        let mut transit = transit;
        loop {
            let mut b = Bhs::new(OP_LOGIN_REQ, true);
            let mut flags = csg << 2;
            if transit {
                flags |= TRANSIT | nsg;
            }
            b.set_flags(flags);
            b.set_data_len(data.len());
            b.0[8..14].copy_from_slice(&self.p.isid);
            b.0[14..16].copy_from_slice(&self.tsih.to_be_bytes());
            let itt = self.fresh_itt();
            b.set_itt(itt);
            b.set_u32(OFF_SN, self.cmdsn);
            b.set_u32(OFF_EXP_SN, self.exp_statsn);
            debug!(itt, csg, nsg, transit, keys = pairs.len(), "login request");
            write_pdu(self.s, &b, &data).await?;
            let r = read_pdu(self.s).await?;
            let h = r.bhs;
            if h.opcode() != OP_LOGIN_RESP {
                return Err(IscsiError::Protocol(format!(
                    "expected a login response, got opcode {:#04x}",
                    h.opcode()
                )));
            }
            if h.itt() != itt {
                return Err(IscsiError::Protocol(
                    "login response for another task tag".into(),
                ));
            }
            let (class, detail) = (h.byte(36), h.byte(37));
            self.exp_statsn = h.u32_at(OFF_SN).wrapping_add(1);
            self.exp_cmdsn = h.u32_at(OFF_EXP_SN);
            self.max_cmdsn = h.u32_at(OFF_MAX_CMDSN);
            if class != 0 {
                let pairs = text::parse(&r.data);
                if class == 1 {
                    if let Some((_, addr)) = pairs.iter().find(|(k, _)| k == "TargetAddress") {
                        return Err(IscsiError::Redirected(addr.clone()));
                    }
                }
                return Err(IscsiError::from_login_status(
                    class,
                    detail,
                    self.target_name(),
                ));
            }
            if h.byte(2) != 0 {
                return Err(IscsiError::Protocol(format!(
                    "unsupported iSCSI version {}",
                    h.byte(3)
                )));
            }
            let tsih = u16::from_be_bytes([h.byte(14), h.byte(15)]);
            if tsih != 0 {
                self.tsih = tsih;
            }
            collected.extend_from_slice(&r.data);
            if collected.len() > MAX_TEXT {
                return Err(IscsiError::Protocol("login text too long".into()));
            }
            let flags = h.flags();
            if flags & CONTINUE != 0 {
                if flags & TRANSIT != 0 {
                    return Err(IscsiError::Protocol(
                        "login response with both T and C bits".into(),
                    ));
                }
                // Ask for the rest with an empty request, no transit: we
                // have not seen every key yet.
                data.clear();
                transit = false;
                continue;
            }
            let transit = flags & TRANSIT != 0;
            return Ok(Response {
                transit,
                nsg: flags & 3,
                pairs: text::parse(&collected),
            });
        }
    }

    async fn run(mut self) -> Result<LoginResult, IscsiError> {
        let p = self.p;
        let mut first: Vec<(String, String)> = vec![
            ("InitiatorName".into(), p.initiator.into()),
            (
                "SessionType".into(),
                if p.target.is_some() {
                    "Normal"
                } else {
                    "Discovery"
                }
                .into(),
            ),
        ];
        if let Some(t) = p.target {
            first.push(("TargetName".into(), t.into()));
        }
        let mut stage = STAGE_SECURITY;
        // ---- security stage
        let method = if p.chap.is_some() {
            "CHAP,None"
        } else {
            "None"
        };
        first.push(("AuthMethod".into(), method.into()));
        let r = self
            .exchange(STAGE_SECURITY, STAGE_OPERATIONAL, p.chap.is_none(), &first)
            .await?;
        let auth = r
            .pairs
            .iter()
            .find(|(k, _)| k == "AuthMethod")
            .map(|(_, v)| v.clone());
        let mut resp = r;
        match auth.as_deref() {
            Some("CHAP") => {
                let chap = p.chap.ok_or_else(|| {
                    IscsiError::Protocol("target chose CHAP, which we did not offer".into())
                })?;
                resp = self.chap(chap).await?;
            }
            Some("None") | None => {
                if p.mutual.is_some() {
                    // We asked the target to prove itself; it did not.
                    return Err(IscsiError::TargetAuthenticationFailed);
                }
                if !resp.transit {
                    resp = self
                        .exchange(STAGE_SECURITY, STAGE_OPERATIONAL, true, &[])
                        .await?;
                }
            }
            Some(other) => {
                return Err(IscsiError::Protocol(format!(
                    "target chose AuthMethod={other}"
                )));
            }
        }
        if !resp.transit {
            return Err(IscsiError::Protocol(
                "target did not leave the security stage".into(),
            ));
        }
        stage = match resp.nsg {
            STAGE_OPERATIONAL => STAGE_OPERATIONAL,
            STAGE_FULL_FEATURE => STAGE_FULL_FEATURE,
            n => return Err(IscsiError::Protocol(format!("bad next stage {n}"))),
        }
        .max(stage);
        info!(target = self.target_name(), "login: security stage done");
        // ---- operational stage
        let mut neg = Negotiation::new(&p.offer);
        if stage == STAGE_OPERATIONAL {
            let mut send = p.offer.pairs();
            loop {
                let r = self
                    .exchange(STAGE_OPERATIONAL, STAGE_FULL_FEATURE, true, &send)
                    .await?;
                send.clear();
                for (k, v) in &r.pairs {
                    if let Some(reply) = neg.apply(k, v)? {
                        send.push(reply);
                    }
                }
                if r.transit && r.nsg == STAGE_FULL_FEATURE {
                    break;
                }
                if r.transit {
                    return Err(IscsiError::Protocol(format!(
                        "unexpected next stage {}",
                        r.nsg
                    )));
                }
            }
        }
        let negotiated = neg.finish()?;
        info!(
            target = self.target_name(),
            tsih = self.tsih,
            ?negotiated,
            "login: full feature phase"
        );
        Ok(LoginResult {
            tsih: self.tsih,
            negotiated,
            cmdsn: self.cmdsn,
            exp_statsn: self.exp_statsn,
            exp_cmdsn: self.exp_cmdsn,
            max_cmdsn: self.max_cmdsn,
            next_itt: self.itt,
        })
    }

    /// CHAP_A, then CHAP_N/CHAP_R (and our challenge for mutual CHAP);
    /// returns the response that should transit to the next stage.
    async fn chap(&mut self, chap: &Chap) -> Result<Response, IscsiError> {
        let r = self
            .exchange(
                STAGE_SECURITY,
                STAGE_OPERATIONAL,
                false,
                &[("CHAP_A".into(), chap::ALGORITHM_MD5.into())],
            )
            .await?;
        let get = |k: &str| r.pairs.iter().find(|(a, _)| a == k).map(|(_, v)| v.clone());
        if get("CHAP_A").as_deref() != Some(chap::ALGORITHM_MD5) {
            return Err(IscsiError::Protocol(
                "target did not accept CHAP with MD5".into(),
            ));
        }
        let id: u8 = get("CHAP_I")
            .and_then(|i| i.parse::<u16>().ok())
            .filter(|&i| i < 256)
            .ok_or_else(|| IscsiError::Protocol("bad CHAP_I".into()))? as u8;
        let challenge = get("CHAP_C")
            .and_then(|c| chap::decode_binary(&c))
            .filter(|c| !c.is_empty())
            .ok_or_else(|| IscsiError::Protocol("bad CHAP_C".into()))?;
        let answer = chap::response(id, chap.secret.expose().as_bytes(), &challenge);
        let mut send: Vec<(String, String)> = vec![
            ("CHAP_N".into(), chap.user.clone()),
            ("CHAP_R".into(), chap::encode_hex(&answer)),
        ];
        let mut ours = None;
        if self.p.mutual.is_some() {
            let mut c = [0u8; 16];
            rand::thread_rng().fill_bytes(&mut c);
            let my_id = (rand::thread_rng().next_u32() & 0xff) as u8;
            if c[..] == challenge[..] {
                return Err(IscsiError::Protocol("CHAP challenge reflected".into()));
            }
            send.push(("CHAP_I".into(), my_id.to_string()));
            send.push(("CHAP_C".into(), chap::encode_hex(&c)));
            ours = Some((my_id, c));
        }
        debug!(user = %chap.user, mutual = ours.is_some(), "login: CHAP response");
        let r = self
            .exchange(STAGE_SECURITY, STAGE_OPERATIONAL, true, &send)
            .await?;
        if let (Some((my_id, c)), Some(m)) = (ours, self.p.mutual) {
            let get = |k: &str| r.pairs.iter().find(|(a, _)| a == k).map(|(_, v)| v.clone());
            let expected = chap::response(my_id, m.secret.expose().as_bytes(), &c);
            let ok = get("CHAP_N").as_deref() == Some(m.user.as_str())
                && get("CHAP_R")
                    .and_then(|v| chap::decode_binary(&v))
                    .as_deref()
                    == Some(&expected[..]);
            if !ok {
                return Err(IscsiError::TargetAuthenticationFailed);
            }
        }
        if r.transit {
            return Ok(r);
        }
        self.exchange(STAGE_SECURITY, STAGE_OPERATIONAL, true, &[])
            .await
    }
}

/// Logs in on a connected stream. `itt` is the first task tag to use.
pub async fn login<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    p: &LoginParams<'_>,
    itt: u32,
    cmdsn: u32,
) -> Result<LoginResult, IscsiError> {
    Login {
        s,
        p,
        itt,
        cmdsn,
        exp_statsn: 0,
        tsih: 0,
        exp_cmdsn: cmdsn,
        max_cmdsn: cmdsn,
    }
    .run()
    .await
}

/// One target found by discovery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiscoveredTarget {
    pub name: String,
    /// `HOST:PORT,TPGT` addresses, as the target gave them.
    pub addresses: Vec<String>,
}

/// After a discovery login: SendTargets=All, then logout.
pub async fn send_targets<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    l: &LoginResult,
) -> Result<Vec<DiscoveredTarget>, IscsiError> {
    let itt = l.next_itt;
    let cmdsn = l.cmdsn;
    let mut exp_statsn = l.exp_statsn;
    let mut ttt = RESERVED_TAG;
    let mut data = text::encode(&[("SendTargets", "All")]);
    let mut collected = Vec::new();
    loop {
        let mut b = Bhs::new(OP_TEXT_REQ, true);
        b.set_flags(FINAL);
        b.set_data_len(data.len());
        b.set_itt(itt);
        b.set_u32(OFF_TTT, ttt);
        b.set_u32(OFF_SN, cmdsn);
        b.set_u32(OFF_EXP_SN, exp_statsn);
        write_pdu(s, &b, &data).await?;
        let r = loop {
            let r = read_pdu(s).await?;
            if r.bhs.opcode() == OP_NOP_IN && r.bhs.itt() == RESERVED_TAG {
                continue; // a ping we may ignore during discovery
            }
            break r;
        };
        if r.bhs.opcode() != OP_TEXT_RESP || r.bhs.itt() != itt {
            return Err(IscsiError::Protocol(format!(
                "expected a text response, got opcode {:#04x}",
                r.bhs.opcode()
            )));
        }
        exp_statsn = r.bhs.u32_at(OFF_SN).wrapping_add(1);
        collected.extend_from_slice(&r.data);
        if collected.len() > MAX_TEXT {
            return Err(IscsiError::Protocol("SendTargets answer too long".into()));
        }
        if r.bhs.flags() & CONTINUE == 0 {
            break;
        }
        ttt = r.bhs.u32_at(OFF_TTT);
        data.clear();
    }
    let mut out: Vec<DiscoveredTarget> = Vec::new();
    for (k, v) in text::parse(&collected) {
        match k.as_str() {
            "TargetName" => out.push(DiscoveredTarget {
                name: v,
                addresses: Vec::new(),
            }),
            "TargetAddress" => {
                if let Some(t) = out.last_mut() {
                    t.addresses.push(v);
                }
            }
            _ => {}
        }
    }
    // Close the session.
    let mut b = Bhs::new(OP_LOGOUT_REQ, true);
    b.set_flags(FINAL);
    b.set_itt(itt.wrapping_add(1));
    b.set_u32(OFF_SN, cmdsn);
    b.set_u32(OFF_EXP_SN, exp_statsn);
    write_pdu(s, &b, &[]).await?;
    let r = read_pdu(s).await?;
    if r.bhs.opcode() != OP_LOGOUT_RESP {
        debug!(
            opcode = r.bhs.opcode(),
            "discovery: unexpected answer to logout"
        );
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::DuplexStream;

    fn keys(data: &[u8]) -> std::collections::HashMap<String, String> {
        text::parse(data).into_iter().collect()
    }

    async fn respond(
        s: &mut DuplexStream,
        req: &Bhs,
        flags: u8,
        tsih: u16,
        statsn: u32,
        status: u16,
        data: &[u8],
    ) {
        let mut b = Bhs::new(OP_LOGIN_RESP, false);
        b.set_flags(flags);
        b.set_data_len(data.len());
        b.0[8..14].copy_from_slice(&req.0[8..14]);
        b.0[14..16].copy_from_slice(&tsih.to_be_bytes());
        b.set_itt(req.itt());
        b.set_u32(OFF_SN, statsn);
        b.set_u32(OFF_EXP_SN, 1);
        b.set_u32(OFF_MAX_CMDSN, 32);
        b.0[36..38].copy_from_slice(&status.to_be_bytes());
        write_pdu(s, &b, data).await.unwrap();
    }

    /// A scripted target: CHAP (mutual), then an operational answer split
    /// over two PDUs with the C bit, in the middle of a key. Returns the
    /// task tags it saw.
    async fn fake_target(mut s: DuplexStream, secret: &str) -> Vec<u32> {
        let mut itts = Vec::new();
        // 1: security stage, AuthMethod offer.
        let r = read_pdu(&mut s).await.unwrap();
        itts.push(r.bhs.itt());
        let k = keys(&r.data);
        assert_eq!(k["AuthMethod"], "CHAP,None");
        assert_eq!(k["SessionType"], "Normal");
        assert_eq!(r.bhs.flags() & TRANSIT, 0);
        respond(
            &mut s,
            &r.bhs,
            0,
            0,
            100,
            0,
            &text::encode(&[("AuthMethod", "CHAP")]),
        )
        .await;
        // 2: CHAP_A.
        let r = read_pdu(&mut s).await.unwrap();
        itts.push(r.bhs.itt());
        assert_eq!(keys(&r.data)["CHAP_A"], "5");
        let challenge: Vec<u8> = (1..=16).collect();
        let c = chap::encode_hex(&challenge);
        respond(
            &mut s,
            &r.bhs,
            0,
            0,
            101,
            0,
            &text::encode(&[("CHAP_A", "5"), ("CHAP_I", "7"), ("CHAP_C", c.as_str())]),
        )
        .await;
        // 3: CHAP_N/CHAP_R plus the initiator's challenge.
        let r = read_pdu(&mut s).await.unwrap();
        itts.push(r.bhs.itt());
        let k = keys(&r.data);
        assert_eq!(k["CHAP_N"], "alice");
        let want = chap::response(7, secret.as_bytes(), &challenge);
        if chap::decode_binary(&k["CHAP_R"]).unwrap() != want {
            respond(&mut s, &r.bhs, 0, 0, 102, 0x0201, &[]).await;
            return itts;
        }
        let id: u8 = k["CHAP_I"].parse().unwrap();
        let theirs = chap::decode_binary(&k["CHAP_C"]).unwrap();
        let answer = chap::encode_hex(&chap::response(id, b"targetsecret", &theirs));
        let flags = TRANSIT | STAGE_OPERATIONAL;
        respond(
            &mut s,
            &r.bhs,
            flags,
            0,
            102,
            0,
            &text::encode(&[("CHAP_N", "tgt"), ("CHAP_R", answer.as_str())]),
        )
        .await;
        // 4: operational offers; the answer comes in two parts.
        let r = read_pdu(&mut s).await.unwrap();
        itts.push(r.bhs.itt());
        assert_eq!(
            r.bhs.flags(),
            TRANSIT | (STAGE_OPERATIONAL << 2) | STAGE_FULL_FEATURE
        );
        let k = keys(&r.data);
        assert_eq!(k["InitialR2T"], "No");
        assert_eq!(k["MaxBurstLength"], "1048576");
        let answer = text::encode(&[
            ("HeaderDigest", "None"),
            ("DataDigest", "CRC32C"),
            ("MaxRecvDataSegmentLength", "16384"),
            ("MaxBurstLength", "65536"),
            ("InitialR2T", "Yes"),
            ("ImmediateData", "No"),
            ("FirstBurstLength", "Irrelevant"),
            ("X-vendor.key", "1"),
        ]);
        let split = 40; // inside "MaxRecvDataSegmentLength"
        respond(
            &mut s,
            &r.bhs,
            (STAGE_OPERATIONAL << 2) | CONTINUE,
            0,
            103,
            0,
            &answer[..split],
        )
        .await;
        let r = read_pdu(&mut s).await.unwrap();
        itts.push(r.bhs.itt());
        assert!(r.data.is_empty());
        assert_eq!(
            r.bhs.flags() & TRANSIT,
            0,
            "no transit while the target continues"
        );
        respond(
            &mut s,
            &r.bhs,
            STAGE_OPERATIONAL << 2,
            0,
            104,
            0,
            &answer[split..],
        )
        .await;
        // 5: our NotUnderstood for the vendor key; now transit.
        let r = read_pdu(&mut s).await.unwrap();
        itts.push(r.bhs.itt());
        assert_eq!(keys(&r.data)["X-vendor.key"], "NotUnderstood");
        let flags = TRANSIT | (STAGE_OPERATIONAL << 2) | STAGE_FULL_FEATURE;
        respond(&mut s, &r.bhs, flags, 0x0005, 105, 0, &[]).await;
        itts
    }

    fn params<'a>(chap: &'a Chap, mutual: &'a Chap) -> LoginParams<'a> {
        LoginParams {
            initiator: "iqn.2026-01.io.volback:test",
            target: Some("iqn.2026-01.test:t"),
            chap: Some(chap),
            mutual: Some(mutual),
            isid: random_isid(),
            offer: Offer {
                header_digest: true,
                data_digest: true,
                max_recv_data_segment_length: 262_144,
                max_burst_length: 1 << 20,
                first_burst_length: 262_144,
                discovery: false,
            },
        }
    }

    #[tokio::test]
    async fn login_with_mutual_chap_and_continued_text() {
        let (mut ours, theirs) = tokio::io::duplex(1 << 16);
        let target = tokio::spawn(fake_target(theirs, "alicesecret12"));
        let chap = Chap::new("alice", "alicesecret12");
        let mutual = Chap::new("tgt", "targetsecret");
        let r = login(&mut ours, &params(&chap, &mutual), 10, 1)
            .await
            .unwrap();
        let itts = target.await.unwrap();
        assert_eq!(itts.len(), 6);
        let mut unique = itts.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(
            unique.len(),
            itts.len(),
            "a fresh task tag per login PDU: {itts:?}"
        );
        assert_eq!(r.tsih, 5);
        assert_eq!(r.exp_statsn, 106);
        assert_eq!((r.exp_cmdsn, r.max_cmdsn, r.cmdsn), (1, 32, 1));
        let n = r.negotiated;
        assert!(!n.header_digest && n.data_digest);
        assert_eq!(n.target_max_recv_data_segment_length, 16384);
        assert_eq!(n.max_burst_length, 65536);
        assert_eq!(
            n.first_burst_length, 65536,
            "default, capped by MaxBurstLength"
        );
        assert!(n.initial_r2t && !n.immediate_data);
    }

    #[tokio::test]
    async fn wrong_secrets_fail_typed() {
        let (mut ours, theirs) = tokio::io::duplex(1 << 16);
        let target = tokio::spawn(fake_target(theirs, "alicesecret12"));
        let chap = Chap::new("alice", "not-it");
        let mutual = Chap::new("tgt", "targetsecret");
        let e = login(&mut ours, &params(&chap, &mutual), 10, 1)
            .await
            .unwrap_err();
        assert!(matches!(e, IscsiError::AuthenticationFailed), "{e}");
        assert!(!e.to_string().contains("not-it"));
        target.await.unwrap();

        let (mut ours, theirs) = tokio::io::duplex(1 << 16);
        let target = tokio::spawn(fake_target(theirs, "alicesecret12"));
        let chap = Chap::new("alice", "alicesecret12");
        let mutual = Chap::new("tgt", "wrong-target-secret");
        let e = login(&mut ours, &params(&chap, &mutual), 10, 1)
            .await
            .unwrap_err();
        assert!(matches!(e, IscsiError::TargetAuthenticationFailed), "{e}");
        drop(ours);
        let _ = target.await;
    }

    #[test]
    fn isid_is_random_type() {
        let a = random_isid();
        let b = random_isid();
        assert_eq!(a[0], 0x80);
        assert_ne!(a, b);
    }
}
