//! Webhook signature verification: Twilio (HMAC-SHA1) and SendGrid (ECDSA P-256).
//!
//! Verification answers only yes or no: why a signature failed helps an attacker, not an
//! operator. Comparisons are constant-time.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use hmac::{Hmac, Mac};
use p256::ecdsa::signature::{Signer, Verifier};
use p256::ecdsa::{Signature, SigningKey, VerifyingKey};
use p256::pkcs8::DecodePublicKey;
use sha1::Sha1;
use subtle::ConstantTimeEq;

type HmacSha1 = Hmac<Sha1>;

/// Why a SendGrid verification key could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("the key is neither PEM nor base64")]
    Encoding,
    #[error("the key is not a P-256 public key")]
    NotP256,
}

/// Decodes standard base64, tolerating surrounding whitespace and missing padding.
fn decode_b64(s: &str) -> Option<Vec<u8>> {
    let s: String = s.chars().filter(|c| !c.is_whitespace()).collect();
    if s.is_empty() {
        return None;
    }
    STANDARD
        .decode(&s)
        .ok()
        .or_else(|| base64::engine::general_purpose::STANDARD_NO_PAD.decode(s.trim_end_matches('=')).ok())
}

/// The string Twilio signs: the URL, then each parameter name followed by its value, sorted by
/// name; repeated names contribute each distinct value, sorted (as twilio-node does).
fn twilio_data(url: &str, params: &[(String, String)]) -> String {
    let mut sorted: Vec<(&str, &str)> = params.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    sorted.sort_unstable();
    sorted.dedup();
    let mut data = String::with_capacity(url.len() + sorted.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>());
    data.push_str(url);
    for (k, v) in sorted {
        data.push_str(k);
        data.push_str(v);
    }
    data
}

fn twilio_mac(auth_token: &str, data: &str) -> Option<Vec<u8>> {
    let mut mac = HmacSha1::new_from_slice(auth_token.as_bytes()).ok()?;
    mac.update(data.as_bytes());
    Some(mac.finalize().into_bytes().to_vec())
}

/// The `X-Twilio-Signature` Twilio would send for this URL and form parameters.
pub fn sign_twilio(auth_token: &str, url: &str, params: &[(String, String)]) -> String {
    twilio_mac(auth_token, &twilio_data(url, params)).map(|m| STANDARD.encode(m)).unwrap_or_default()
}

/// Splits `scheme://authority/rest` into (scheme, host part, port, rest); `None` if not a URL.
fn split_url(url: &str) -> Option<(&str, &str, Option<&str>, &str)> {
    let (scheme, after) = url.split_once("://")?;
    let end = after.find(['/', '?', '#']).unwrap_or(after.len());
    let (authority, rest) = after.split_at(end);
    let host_start = authority.rfind('@').map_or(0, |i| i + 1);
    let hostport = &authority[host_start..];
    // The port follows the last `:` outside an IPv6 literal.
    let port_colon = match hostport.rfind(']') {
        Some(close) => hostport[close..].find(':').map(|i| close + i),
        None => hostport.rfind(':'),
    };
    match port_colon {
        Some(i) if hostport[i + 1..].bytes().all(|b| b.is_ascii_digit()) => {
            let host_end = host_start + i;
            Some((scheme, &after[..host_end], Some(&hostport[i + 1..]), rest))
        }
        _ => Some((scheme, authority, None, rest)),
    }
}

/// The URL as given, plus the variant Twilio may have signed: without the port if it has one,
/// with the scheme's default port if it has none.
fn twilio_url_variants(url: &str) -> Vec<String> {
    let mut urls = vec![url.to_string()];
    if let Some((scheme, host, port, rest)) = split_url(url) {
        match port {
            Some(_) => urls.push(format!("{scheme}://{host}{rest}")),
            None => {
                let default = if scheme.eq_ignore_ascii_case("https") { "443" } else { "80" };
                urls.push(format!("{scheme}://{host}:{default}{rest}"));
            }
        }
    }
    urls
}

/// Checks an `X-Twilio-Signature` (HMAC-SHA1 with the account's Auth Token, base64) against the
/// request URL and its POST parameters, with and without the port as Twilio's validators do.
pub fn verify_twilio(auth_token: &str, url: &str, params: &[(String, String)], signature_b64: &str) -> bool {
    let Some(given) = decode_b64(signature_b64) else {
        return false;
    };
    let mut ok = subtle::Choice::from(0u8);
    for candidate in twilio_url_variants(url) {
        if let Some(expected) = twilio_mac(auth_token, &twilio_data(&candidate, params)) {
            ok |= expected.ct_eq(&given);
        }
    }
    ok.into()
}

/// Reads the Event Webhook verification key as SendGrid's mail settings show it (base64 DER
/// SubjectPublicKeyInfo), or as PEM, or as a raw SEC1 point.
pub fn parse_sendgrid_public_key(s: &str) -> Result<VerifyingKey, KeyError> {
    let s = s.trim();
    if s.starts_with("-----BEGIN") {
        return VerifyingKey::from_public_key_pem(s).map_err(|_| KeyError::NotP256);
    }
    let der = decode_b64(s).ok_or(KeyError::Encoding)?;
    VerifyingKey::from_public_key_der(&der)
        .or_else(|_| VerifyingKey::from_sec1_bytes(&der))
        .map_err(|_| KeyError::NotP256)
}

fn sendgrid_message(payload: &[u8], timestamp: &str) -> Vec<u8> {
    let mut msg = Vec::with_capacity(timestamp.len() + payload.len());
    msg.extend_from_slice(timestamp.as_bytes());
    msg.extend_from_slice(payload);
    msg
}

/// Checks `X-Twilio-Email-Event-Webhook-Signature` (base64 DER ECDSA P-256 / SHA-256) over the
/// `X-Twilio-Email-Event-Webhook-Timestamp` value followed by the raw body.
pub fn verify_sendgrid(public_key: &VerifyingKey, payload: &[u8], signature_b64: &str, timestamp: &str) -> bool {
    let Some(der) = decode_b64(signature_b64) else {
        return false;
    };
    let Ok(signature) = Signature::from_der(&der) else {
        return false;
    };
    public_key.verify(&sendgrid_message(payload, timestamp.trim()), &signature).is_ok()
}

/// The signature SendGrid would send (base64 DER), for tests, the demo and load generation.
pub fn sign_sendgrid(signing_key: &SigningKey, payload: &[u8], timestamp: &str) -> String {
    let signature: Signature = signing_key.sign(&sendgrid_message(payload, timestamp));
    STANDARD.encode(signature.to_der().as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_variants() {
        assert_eq!(
            twilio_url_variants("https://cohort.example.de/webhooks/twilio/whatsapp?x=1"),
            vec![
                "https://cohort.example.de/webhooks/twilio/whatsapp?x=1".to_string(),
                "https://cohort.example.de:443/webhooks/twilio/whatsapp?x=1".to_string()
            ]
        );
        assert_eq!(
            twilio_url_variants("http://127.0.0.1:8080/hook"),
            vec!["http://127.0.0.1:8080/hook".to_string(), "http://127.0.0.1/hook".to_string()]
        );
        assert_eq!(twilio_url_variants("http://[::1]:9/h")[1], "http://[::1]/h");
        assert_eq!(twilio_url_variants("http://[::1]/h")[1], "http://[::1]:80/h");
        assert_eq!(twilio_url_variants("http://user:pw@host:81/h")[1], "http://user:pw@host/h");
        assert_eq!(twilio_url_variants("not a url"), vec!["not a url".to_string()]);
    }
}
