//! The Standard Webhooks signature: HMAC-SHA256 of `{id}.{timestamp}.{body}`
//! with the endpoint's secret, base64, prefixed `v1,`; one per secret,
//! separated by spaces, so that a secret can be rotated without a gap (the
//! receiver accepts any one it knows).

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, KeyInit, Mac};
use secrecy::{ExposeSecret, SecretSlice};
use sha2::Sha256;

/// The prefix of a secret's text.
pub const SECRET_PREFIX: &str = "whsec_";

/// A secret's length in bytes, as the specification bounds it.
const SECRET_BYTES: std::ops::RangeInclusive<usize> = 24..=64;

/// One endpoint secret: its bytes, never shown.
#[derive(Clone)]
pub struct Secret(SecretSlice<u8>);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret([REDACTED])")
    }
}

impl Secret {
    /// A secret from its text, `whsec_` + base64 of 24 to 64 bytes. The
    /// error never repeats the text.
    pub fn parse(text: &str) -> Result<Secret, String> {
        let encoded = text.trim().strip_prefix(SECRET_PREFIX).ok_or_else(|| {
            format!("a webhook secret starts with {SECRET_PREFIX} (its value is not shown)")
        })?;
        let bytes = STANDARD
            .decode(encoded)
            .or_else(|_| base64::engine::general_purpose::STANDARD_NO_PAD.decode(encoded))
            .map_err(|_| {
                format!("a webhook secret is {SECRET_PREFIX} then base64 (its value is not shown)")
            })?;
        if !SECRET_BYTES.contains(&bytes.len()) {
            return Err(format!(
                "a webhook secret holds {} to {} random bytes; this one holds {}",
                SECRET_BYTES.start(),
                SECRET_BYTES.end(),
                bytes.len()
            ));
        }
        Ok(Secret(bytes.into()))
    }
}

/// The `webhook-signature` header of `body` sent as message `id` at
/// `timestamp` (Unix seconds): `v1,<base64>` for each secret, space-separated.
pub fn signature(secrets: &[Secret], id: &str, timestamp: i64, body: &[u8]) -> String {
    secrets
        .iter()
        .map(|secret| {
            let mut mac = Hmac::<Sha256>::new_from_slice(secret.0.expose_secret())
                .expect("HMAC takes a key of any length");
            mac.update(id.as_bytes());
            mac.update(b".");
            mac.update(timestamp.to_string().as_bytes());
            mac.update(b".");
            mac.update(body);
            format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()))
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The example of the specification's reference libraries.
    #[test]
    fn signs_the_specification_s_example() {
        let secret = Secret::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let signed = signature(
            &[secret],
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1614265330,
            br#"{"test": 2432232314}"#,
        );
        assert_eq!(signed, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    }

    #[test]
    fn every_secret_signs_once_for_rotation() {
        let a = Secret::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let b = Secret::parse(&format!("whsec_{}", STANDARD.encode([7u8; 32]))).unwrap();
        let both = signature(&[a.clone(), b.clone()], "msg_1", 1, b"{}");
        let parts: Vec<&str> = both.split(' ').collect();
        assert_eq!(parts.len(), 2);
        assert_eq!(parts[0], signature(&[a], "msg_1", 1, b"{}"));
        assert_eq!(parts[1], signature(&[b], "msg_1", 1, b"{}"));
        assert_ne!(parts[0], parts[1]);
    }

    #[test]
    fn bad_secrets_are_refused_without_their_value() {
        for bad in [
            "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
            "whsec_not*base64!",
            "whsec_c2hvcnQ=",
            &format!("whsec_{}", STANDARD.encode([1u8; 65])),
        ] {
            let error = Secret::parse(bad).unwrap_err();
            assert!(!error.contains(bad.trim_start_matches("whsec_")), "{error}");
        }
        assert!(
            format!(
                "{:?}",
                Secret::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
            )
            .contains("REDACTED")
        );
    }
}
