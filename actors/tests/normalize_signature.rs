//! Webhook signatures: Twilio HMAC-SHA1 and SendGrid ECDSA P-256.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers outside #[test] fns

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use cohort_actors::normalize::signature::{
    parse_sendgrid_public_key, sign_sendgrid, sign_twilio, verify_sendgrid, verify_twilio,
};
use p256::ecdsa::SigningKey;
use p256::pkcs8::{EncodePublicKey, LineEnding};

fn params(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

fn docs_params(phone: &str) -> Vec<(String, String)> {
    params(&[
        ("CallSid", "CA1234567890ABCDE"),
        ("Caller", phone),
        ("Digits", "1234"),
        ("From", phone),
        ("To", "+18005551212"),
    ])
}

const DOCS_URL: &str = "https://mycompany.com/myapp.php?foo=1&bar=2";

#[test]
fn twilio_public_documentation_examples() {
    // Twilio's webhook-security page and its api-snippets.
    assert!(verify_twilio("12345", DOCS_URL, &docs_params("+12349013030"), "0/KCTR6DLpKmkAf8muzZqo1nDgQ="));
    assert_eq!(sign_twilio("12345", DOCS_URL, &docs_params("+12349013030")), "0/KCTR6DLpKmkAf8muzZqo1nDgQ=");
    assert!(verify_twilio("12345", DOCS_URL, &docs_params("+14158675310"), "GvWf1cFY/Q7PnoempGyD5oXAezc="));
    assert!(verify_twilio("12345", DOCS_URL, &docs_params("+14158675309"), "RSOYDt4T1cUTdK1PDd93/VVr8B8="));
    // parameter order on the wire does not matter
    let mut shuffled = docs_params("+12349013030");
    shuffled.reverse();
    assert!(verify_twilio("12345", DOCS_URL, &shuffled, "0/KCTR6DLpKmkAf8muzZqo1nDgQ="));
}

fn whatsapp_form() -> Vec<(String, String)> {
    params(&[
        ("MessageSid", "SM8f1b6c1e2d3a4b5c6d7e8f9a0b1c2d3e"),
        ("AccountSid", "ACae1f2b3c4d5e6f708192a3b4c5d6e7f8"),
        ("From", "whatsapp:+4915123456789"),
        ("To", "whatsapp:+493012345678"),
        ("Body", "Hi, when is the deadline for MBA?"),
        ("ProfileName", "Max Mustermann"),
        ("WaId", "4915123456789"),
        ("NumMedia", "0"),
    ])
}

#[test]
fn twilio_valid_and_tampered() {
    let token = "f3c1d2e4a5b6978877665544332211aa";
    let url = "https://cohort.example-university.de/webhooks/twilio/whatsapp";
    let form = whatsapp_form();
    let sig = sign_twilio(token, url, &form);
    assert!(verify_twilio(token, url, &form, &sig));
    assert!(verify_twilio(token, url, &form, &format!("  {sig}\n")), "surrounding whitespace is tolerated");
    // tampered parameter, added parameter, removed parameter
    let mut tampered = form.clone();
    tampered[4].1 = "STOP".into();
    assert!(!verify_twilio(token, url, &tampered, &sig));
    let mut added = form.clone();
    added.push(("Extra".into(), "1".into()));
    assert!(!verify_twilio(token, url, &added, &sig));
    assert!(!verify_twilio(token, url, &form[1..], &sig));
    // wrong token, wrong URL, other query string
    assert!(!verify_twilio("another-auth-token", url, &form, &sig));
    assert!(!verify_twilio(token, "https://evil.example.com/webhooks/twilio/whatsapp", &form, &sig));
    assert!(!verify_twilio(token, &format!("{url}?x=1"), &form, &sig));
}

#[test]
fn twilio_missing_or_garbage_signatures() {
    let token = "tok";
    let url = "https://example.de/hook";
    let form = whatsapp_form();
    for bad in ["", "   ", "bm90IGEgc2lnbmF0dXJl", "%%%not base64%%%", "0/KCTR6DLpKmkAf8muzZqo1nDgQ=", "AAAA", "😀"] {
        assert!(!verify_twilio(token, url, &form, bad), "{bad:?}");
    }
}

#[test]
fn twilio_url_with_and_without_port() {
    let token = "tok";
    let form = whatsapp_form();
    // Twilio signed the URL with the default port; our URL has none.
    let with_port = sign_twilio(token, "https://cohort.example.de:443/webhooks/twilio/whatsapp?src=wa", &form);
    assert!(verify_twilio(token, "https://cohort.example.de/webhooks/twilio/whatsapp?src=wa", &form, &with_port));
    // Twilio signed without the port; our URL (behind a proxy) has one.
    let without_port = sign_twilio(token, "https://cohort.example.de/webhooks/twilio/whatsapp", &form);
    assert!(verify_twilio(token, "https://cohort.example.de:8443/webhooks/twilio/whatsapp", &form, &without_port));
    // http defaults to 80
    let http = sign_twilio(token, "http://localhost:80/hook", &form);
    assert!(verify_twilio(token, "http://localhost/hook", &form, &http));
    // but a different host is never accepted
    assert!(!verify_twilio(token, "https://other.example.de/webhooks/twilio/whatsapp", &form, &without_port));
}

#[test]
fn twilio_repeated_parameters_sort_by_value() {
    let token = "tok";
    let url = "https://example.de/hook";
    let a = params(&[("To", "b"), ("Media", "2"), ("Media", "1")]);
    let b = params(&[("Media", "1"), ("To", "b"), ("Media", "2")]);
    // HMAC-SHA1("tok", "https://example.de/hook" + "Media1" + "Media2" + "Tob"), computed independently
    assert_eq!(sign_twilio(token, url, &a), "X1FSOmpFGw0tGotdTLqFmJYAiO4=");
    assert_eq!(sign_twilio(token, url, &b), "X1FSOmpFGw0tGotdTLqFmJYAiO4=");
    // identical repeated values count once, as in twilio-node
    let dup = params(&[("Media", "1"), ("Media", "2"), ("Media", "2"), ("To", "b")]);
    assert!(verify_twilio(token, url, &dup, "X1FSOmpFGw0tGotdTLqFmJYAiO4="));
}

// SendGrid's own test vector (sendgrid-nodejs packages/eventwebhook).
const SG_PUBLIC_KEY: &str = "MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEEDr2LjtURuePQzplybdC+u4CwrqDqBaWjcMMsTbhdbcwHBcepxo7yAQGhHPTnlvFYPAZFceEu/1FwCM/QmGUhA==";
const SG_SIGNATURE: &str =
    "MEUCIQCtIHJeH93Y+qpYeWrySphQgpNGNr/U+UyUlBkU6n7RAwIgJTz2C+8a8xonZGi6BpSzoQsbVRamr2nlxFDWYNH2j/0=";
const SG_TIMESTAMP: &str = "1588788367";
const SG_PAYLOAD: &str = r#"{"category":"example_payload","event":"test_event","message_id":"message_id"}"#;

#[test]
fn sendgrid_public_test_vector() {
    let key = parse_sendgrid_public_key(SG_PUBLIC_KEY).unwrap();
    assert!(verify_sendgrid(&key, SG_PAYLOAD.as_bytes(), SG_SIGNATURE, SG_TIMESTAMP));
    assert!(!verify_sendgrid(&key, b"payload", SG_SIGNATURE, SG_TIMESTAMP));
    assert!(!verify_sendgrid(&key, SG_PAYLOAD.as_bytes(), SG_SIGNATURE, "timestamp"));
    let bad_sig = "MEUCIQCtIHJeH93Y+qpYeWrySphQgpNGNr/U+UyUlBkU6n7RAwIgJTz2C+8a8xonZGi6BpSzoQsbVRamr2nlxFDWYNH3j/0=";
    assert!(!verify_sendgrid(&key, SG_PAYLOAD.as_bytes(), bad_sig, SG_TIMESTAMP));
    let other = parse_sendgrid_public_key(
        "MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEqTxd43gyp8IOEto2LdIfjRQrIbsd4SXZkLW6jDutdhXSJCWHw8REntlo7aNDthvj+y7GjUuFDb/R1NGe1OPzpA==",
    )
    .unwrap();
    assert!(!verify_sendgrid(&other, SG_PAYLOAD.as_bytes(), SG_SIGNATURE, SG_TIMESTAMP));
}

fn signing_key() -> SigningKey {
    SigningKey::from_slice(&[0x42; 32]).unwrap()
}

#[test]
fn sendgrid_sign_verify_and_tamper() {
    let sk = signing_key();
    let vk = *sk.verifying_key();
    let body = br#"[{"email":"max.mustermann@gmail.com","timestamp":1793604600,"event":"open","sg_event_id":"FOTFFO0ecsBE-zxFXfs6WA=="}]"#;
    let ts = "1793604601";
    let sig = sign_sendgrid(&sk, body, ts);
    assert!(verify_sendgrid(&vk, body, &sig, ts));
    let mut tampered = body.to_vec();
    tampered[20] ^= 1;
    assert!(!verify_sendgrid(&vk, &tampered, &sig, ts));
    assert!(!verify_sendgrid(&vk, body, &sig, "1793604602"), "the timestamp is signed too");
    let other = *SigningKey::from_slice(&[0x43; 32]).unwrap().verifying_key();
    assert!(!verify_sendgrid(&other, body, &sig, ts));
}

#[test]
fn sendgrid_missing_or_garbage_signatures() {
    let sk = signing_key();
    let vk = *sk.verifying_key();
    for bad in
        ["", "  ", "%%%", "AAAA", "bm90IGEgc2lnbmF0dXJl", &STANDARD.encode([0u8; 64]), &STANDARD.encode([0x30u8; 72])]
    {
        assert!(!verify_sendgrid(&vk, b"[]", bad, "1"), "{bad:?}");
    }
}

#[test]
fn sendgrid_keys_as_base64_der_pem_or_garbage() {
    let vk = *signing_key().verifying_key();
    let der = vk.to_public_key_der().unwrap();
    let b64 = STANDARD.encode(der.as_bytes());
    assert_eq!(parse_sendgrid_public_key(&b64).unwrap(), vk);
    assert_eq!(parse_sendgrid_public_key(&format!("\n  {b64}\n")).unwrap(), vk);
    let pem = vk.to_public_key_pem(LineEnding::LF).unwrap();
    assert_eq!(parse_sendgrid_public_key(&pem).unwrap(), vk);
    for bad in ["", "not a key", "AAAA", "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n"] {
        assert!(parse_sendgrid_public_key(bad).is_err(), "{bad:?}");
    }
}
