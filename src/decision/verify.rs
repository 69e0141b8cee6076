//! Verify: the TIC callback signature (contract §1).
//!
//! `sign = lowercase_hex(md5(TicKey + expire_time))`. A signature is expired
//! when `expire_time` is earlier than the moment TIC *sent* the callback (its
//! `timestamp`, else the AMQP `timestamp` property) — never compared with "now":
//! a genuine message may wait in the queue for hours.

use std::collections::BTreeMap;
use std::fmt;

use md5::{Digest, Md5};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;

use crate::decision::reason::{ReasonCode, Rejection};

/// When a signature is demanded.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SignatureMode {
    /// Every message must carry a valid `x-tic-sign`.
    Required,
    /// Verify whenever `x-tic-sign` is present (default).
    #[default]
    IfPresent,
    /// Never verify.
    Off,
}

impl std::str::FromStr for SignatureMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "required" => Ok(SignatureMode::Required),
            "if-present" => Ok(SignatureMode::IfPresent),
            "off" => Ok(SignatureMode::Off),
            other => Err(format!(
                "unknown signature mode {other:?} (required, if-present, off)"
            )),
        }
    }
}

/// TicKeys by sdkappid. Its `Debug` never shows a key.
#[derive(Clone, Default)]
pub struct TicKeys(BTreeMap<i64, SecretString>);

impl fmt::Debug for TicKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map()
            .entries(self.0.keys().map(|k| (k, "[REDACTED]")))
            .finish()
    }
}

impl TicKeys {
    pub fn insert(&mut self, sdkappid: i64, key: SecretString) {
        self.0.insert(sdkappid, key);
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// The key of `sdkappid`.
    pub fn get(&self, sdkappid: i64) -> Option<&SecretString> {
        self.0.get(&sdkappid)
    }

    /// The sdkappids that have a key.
    pub fn ids(&self) -> impl Iterator<Item = i64> + '_ {
        self.0.keys().copied()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Parse `1400042982=KEY,1400000001=KEY2` (the environment-variable form).
    /// An error names the entry by its position, never by its text: an entry
    /// written the wrong way round would otherwise print the key.
    pub fn parse_list(list: &str) -> Result<Self, String> {
        let mut keys = TicKeys::default();
        let entries = list.split(',').map(str::trim).filter(|e| !e.is_empty());
        for (n, entry) in entries.enumerate() {
            let n = n + 1;
            let (id, key) = entry.split_once('=').ok_or_else(|| {
                format!(
                    "tic_keys entry {n}: expected SDKAPPID=TICKEY (entries separated by commas)"
                )
            })?;
            let id: i64 = id
                .trim()
                .parse()
                .ok()
                .filter(|id| *id > 0)
                .ok_or_else(|| {
                    format!("tic_keys entry {n}: the part before '=' is not an sdkappid (a positive integer)")
                })?;
            if key.trim().is_empty() {
                return Err(format!("tic_keys entry {n}: the TicKey after '=' is empty"));
            }
            keys.insert(id, SecretString::from(key.trim().to_owned()));
        }
        Ok(keys)
    }
}

/// What the callback carried next to its body.
#[derive(Debug, Clone, Copy, Default)]
pub struct SignedFields<'a> {
    pub sdkappid: Option<i64>,
    pub sign: Option<&'a str>,
    pub expire_time: Option<i64>,
    /// When TIC sent the callback, Unix seconds.
    pub sent_at: Option<i64>,
}

/// `lowercase_hex(md5(TicKey + expire_time))`.
pub fn compute_sign(tic_key: &str, expire_time: i64) -> String {
    let mut md5 = Md5::new();
    md5.update(tic_key.as_bytes());
    md5.update(expire_time.to_string().as_bytes());
    hex::encode(md5.finalize())
}

/// Check the signature of one message according to `mode`.
pub fn verify(mode: SignatureMode, keys: &TicKeys, fields: SignedFields) -> Result<(), Rejection> {
    let sign = match (mode, fields.sign) {
        (SignatureMode::Off, _) | (SignatureMode::IfPresent, None) => return Ok(()),
        (SignatureMode::Required, None) => {
            return Err(Rejection::new(
                ReasonCode::SignatureMissing,
                "signature required but the message has no x-tic-sign header",
            ));
        }
        (_, Some(sign)) => sign,
    };
    let invalid = |why: String| Err(Rejection::new(ReasonCode::SignatureInvalid, why));
    let Some(sdkappid) = fields.sdkappid else {
        return invalid("sdkappid unknown (neither in the body nor in x-tic-sdkappid)".into());
    };
    let Some(key) = keys.0.get(&sdkappid) else {
        return Err(Rejection::new(
            ReasonCode::NoKey,
            format!(
                "signed, but sdkappid {sdkappid} has no TicKey in tic_keys: the signature cannot be checked"
            ),
        ));
    };
    let Some(expire_time) = fields.expire_time else {
        return invalid("x-tic-sign present but the body has no expire_time".into());
    };
    let expected = compute_sign(key.expose_secret(), expire_time);
    let given = sign.trim().to_ascii_lowercase();
    if !bool::from(expected.as_bytes().ct_eq(given.as_bytes())) {
        return invalid(format!("x-tic-sign does not match for sdkappid {sdkappid}"));
    }
    if let Some(sent_at) = fields.sent_at
        && expire_time < sent_at
    {
        return Err(Rejection::new(
            ReasonCode::SignatureExpired,
            format!("expire_time {expire_time} is earlier than the send time {sent_at}"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "9016607A382749C69D4F4B00C61DD083";

    fn keys() -> TicKeys {
        TicKeys::parse_list(&format!("1400042982={KEY}")).unwrap()
    }

    fn signed(sign: Option<&str>, expire_time: i64, sent_at: Option<i64>) -> SignedFields<'_> {
        SignedFields {
            sdkappid: Some(1400042982),
            sign,
            expire_time: Some(expire_time),
            sent_at,
        }
    }

    #[test]
    fn contract_test_vector() {
        assert_eq!(
            compute_sign(KEY, 1548247837),
            "5400bac77ba6467a8f8ac056f1769f45"
        );
    }

    #[test]
    fn valid_signature_passes_in_every_mode() {
        let good = signed(
            Some("5400bac77ba6467a8f8ac056f1769f45"),
            1548247837,
            Some(1548247717),
        );
        for mode in [
            SignatureMode::Required,
            SignatureMode::IfPresent,
            SignatureMode::Off,
        ] {
            assert_eq!(verify(mode, &keys(), good), Ok(()), "{mode:?}");
        }
        let upper = signed(Some("5400BAC77BA6467A8F8AC056F1769F45"), 1548247837, None);
        assert_eq!(verify(SignatureMode::Required, &keys(), upper), Ok(()));
    }

    #[test]
    fn wrong_signature_is_invalid() {
        let bad = signed(Some("5400bac77ba6467a8f8ac056f1769f46"), 1548247837, None);
        let err = verify(SignatureMode::IfPresent, &keys(), bad).unwrap_err();
        assert_eq!(err.code, ReasonCode::SignatureInvalid);
        assert!(!err.message.contains(KEY));
        assert_eq!(verify(SignatureMode::Off, &keys(), bad), Ok(()));
    }

    #[test]
    fn missing_signature_depends_on_mode() {
        let none = signed(None, 1548247837, None);
        assert_eq!(
            verify(SignatureMode::Required, &keys(), none)
                .unwrap_err()
                .code,
            ReasonCode::SignatureMissing
        );
        assert_eq!(verify(SignatureMode::IfPresent, &keys(), none), Ok(()));
    }

    #[test]
    fn expiry_is_judged_against_the_send_time_not_now() {
        let sign = compute_sign(KEY, 1548247837);
        // Sent before it expired: genuine, even though "now" is years later.
        let ok = signed(Some(&sign), 1548247837, Some(1548247800));
        assert_eq!(verify(SignatureMode::Required, &keys(), ok), Ok(()));
        let late = signed(Some(&sign), 1548247837, Some(1548247838));
        assert_eq!(
            verify(SignatureMode::Required, &keys(), late)
                .unwrap_err()
                .code,
            ReasonCode::SignatureExpired
        );
    }

    #[test]
    fn unknown_key_or_missing_expire_time_cannot_verify() {
        // An app without a key: a reason of its own, naming the app.
        let mut other = signed(Some("00"), 1, None);
        other.sdkappid = Some(1);
        let refused = verify(SignatureMode::IfPresent, &keys(), other).unwrap_err();
        assert_eq!(refused.code, ReasonCode::NoKey);
        assert!(
            refused.message.contains("sdkappid 1 "),
            "{}",
            refused.message
        );
        let mut no_expiry = signed(Some("00"), 1, None);
        no_expiry.expire_time = None;
        assert_eq!(
            verify(SignatureMode::IfPresent, &keys(), no_expiry)
                .unwrap_err()
                .code,
            ReasonCode::SignatureInvalid
        );
    }

    #[test]
    fn keys_never_show_in_debug() {
        let shown = format!("{:?}", keys());
        assert!(!shown.contains(KEY), "{shown}");
        assert!(shown.contains("1400042982"));
    }
}
