//! Contact identifiers in one canonical form, so the same student found by two sources links.

use phonenumber::country;

use super::options::EmailRule;

/// Trims and lower-cases an email address; `None` unless it has exactly one `@` with non-empty
/// parts and no spaces or mail-header punctuation (`Max <max@x.de>` is not an address).
pub fn normalize_email(raw: &str) -> Option<String> {
    let s = raw.trim();
    let s = s.strip_prefix("mailto:").unwrap_or(s);
    if s.is_empty() || s.len() > 254 {
        return None;
    }
    if s.chars().any(|c| c.is_whitespace() || c.is_control() || "<>,;\"()[]\\".contains(c)) {
        return None;
    }
    let (local, domain) = s.split_once('@')?;
    if local.is_empty() || domain.is_empty() || domain.contains('@') || domain.starts_with('.') || domain.ends_with('.')
    {
        return None;
    }
    Some(s.to_lowercase())
}

/// The identity of a mailbox: a [`normalize_email`]ed address with its provider's rules applied
/// (dots and `+tags` where the provider ignores them, alias domains folded). Addresses of other
/// domains are returned unchanged: most providers treat dots and `+` as part of the name.
pub fn email_key(email: &str, rules: &[EmailRule]) -> String {
    let Some((local, domain)) = email.rsplit_once('@') else { return email.to_string() };
    let Some(rule) = rules.iter().find(|r| r.domains.iter().any(|d| d == domain)) else {
        return email.to_string();
    };
    let mut local = local;
    if rule.strip_plus_tags {
        if let Some((base, _tag)) = local.split_once('+') {
            if !base.is_empty() {
                local = base;
            }
        }
    }
    let local: String = if rule.ignore_dots { local.chars().filter(|c| *c != '.').collect() } else { local.into() };
    let domain = rule.canonical_domain.as_deref().unwrap_or(domain);
    if local.is_empty() {
        return email.to_string();
    }
    format!("{local}@{domain}")
}

/// Strips the channel prefixes sources put in front of numbers (`whatsapp:+49...`, `tel:`).
fn strip_channel_prefix(raw: &str) -> &str {
    let s = raw.trim();
    for prefix in ["whatsapp:", "tel:", "sms:"] {
        if s.len() >= prefix.len() && s.is_char_boundary(prefix.len()) && s[..prefix.len()].eq_ignore_ascii_case(prefix)
        {
            return s[prefix.len()..].trim();
        }
    }
    s
}

/// A phone number in E.164 (`+4915123456789`), parsed with `region` (ISO 3166 alpha-2, e.g.
/// `DE`) for numbers written nationally; `None` unless libphonenumber's metadata says the
/// number is valid. Accepts a `whatsapp:` prefix as Twilio sends it.
pub fn normalize_phone(raw: &str, region: &str) -> Option<String> {
    let s = strip_channel_prefix(raw);
    // Cheap syntax gate before the parser: phone punctuation only, a plausible digit count.
    if s.is_empty() || s.len() > 40 {
        return None;
    }
    if !s.chars().all(|c| c.is_ascii_digit() || " +-().-/\u{a0}".contains(c)) {
        return None;
    }
    let digits = s.chars().filter(char::is_ascii_digit).count();
    if !(4..=17).contains(&digits) || s.rfind('+').is_some_and(|p| p != 0) {
        return None;
    }
    // A number in international form names its country itself. The default region must not
    // matter then, and with some regions the parser rejects such numbers (`+33 1 …` with `US`).
    let region: Option<country::Id> =
        if s.starts_with('+') { None } else { region.trim().to_ascii_uppercase().parse().ok() };
    let input = s.to_string();
    // The parser has internal unwraps on some inputs; no input may bring ingest down.
    std::panic::catch_unwind(move || {
        let n = phonenumber::parse(region, &input).ok()?;
        if !n.is_valid() {
            return None;
        }
        Some(format!("+{}{}", n.code().value(), n.national()))
    })
    .ok()
    .flatten()
}

/// A number the sender guarantees to be E.164 (Twilio's `From`, WhatsApp's `WaId` digits):
/// validated when the metadata knows it, otherwise accepted on syntax (`+` and 8-15 digits).
pub fn trusted_e164(raw: &str, region: &str) -> Option<String> {
    let s = strip_channel_prefix(raw);
    let with_plus = if s.starts_with('+') { s.to_string() } else { format!("+{s}") };
    if let Some(n) = normalize_phone(&with_plus, region) {
        return Some(n);
    }
    let digits = &with_plus[1..];
    ((8..=15).contains(&digits.len()) && digits.bytes().all(|b| b.is_ascii_digit()) && !digits.starts_with('0'))
        .then_some(with_plus)
}

#[cfg(test)]
mod email_key_tests {
    use crate::normalize::NormalizeOptions;

    #[test]
    fn provider_rules_find_one_mailbox() {
        let o = NormalizeOptions::default();
        for same in ["max.mustermann@gmail.com", "maxmustermann+news@googlemail.com", "m.a.x.mustermann+a+b@gmail.com"]
        {
            assert_eq!(o.email_key(same), "maxmustermann@gmail.com", "{same}");
        }
        assert_eq!(o.email_key("anna.schmidt+uni@outlook.com"), "anna.schmidt@outlook.com", "outlook keeps dots");
        assert_eq!(o.email_key("anna@me.com"), "anna@icloud.com");
        // Other domains: dots and plus are part of the name.
        assert_eq!(o.email_key("max.m+x@uni-hamburg.de"), "max.m+x@uni-hamburg.de");
        // Nothing left before the tag: kept as is rather than made empty.
        assert_eq!(o.email_key("+tag@gmail.com"), "+tag@gmail.com");
        assert_eq!(o.email_key("...@gmail.com"), "...@gmail.com");
    }

    #[test]
    fn rules_are_configurable_and_checked() {
        let mut table = serde_json::Map::new();
        table
            .insert("email_rules".into(), serde_json::json!([{ "domains": ["uni.example"], "strip_plus_tags": true }]));
        let o = NormalizeOptions::from_config(&table).unwrap();
        assert_eq!(o.email_key("a.b+c@uni.example"), "a.b@uni.example");
        assert_eq!(o.email_key("a.b+c@gmail.com"), "a.b+c@gmail.com", "a list given in config replaces the defaults");
        table.insert("email_rules".into(), serde_json::json!([{ "domains": ["Gmail.com"] }]));
        assert!(NormalizeOptions::from_config(&table).unwrap_err().contains("email_rules"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emails() {
        assert_eq!(normalize_email("  Max.Mustermann@GMAIL.com "), Some("max.mustermann@gmail.com".into()));
        assert_eq!(normalize_email("mailto:a@b.de"), Some("a@b.de".into()));
        for bad in ["", "max", "@gmail.com", "max@", "a@b@c", "Max <max@x.de>", "max @x.de", "a@.de", "a@de."] {
            assert_eq!(normalize_email(bad), None, "{bad}");
        }
    }

    #[test]
    fn phones() {
        let want = Some("+4915123456789".to_string());
        assert_eq!(normalize_phone("+49 1512 3456789", "DE"), want);
        assert_eq!(normalize_phone("01512 3456789", "DE"), want);
        assert_eq!(normalize_phone("0049 151 23456789", "DE"), want);
        assert_eq!(normalize_phone("whatsapp:+4915123456789", "DE"), want);
        assert_eq!(normalize_phone("WhatsApp:+49 (151) 234-56789", "de"), want);
        assert_eq!(normalize_phone("+49 30 12345678", "DE"), Some("+493012345678".into()));
        assert_eq!(normalize_phone("030 12345678", "DE"), Some("+493012345678".into()));
        for bad in ["", "abc", "+49", "12", "+49 1512 3456789 ext. 5", "++4915123456789", "1+2", "0"] {
            assert_eq!(normalize_phone(bad, "DE"), None, "{bad}");
        }
        // without a usable region only international numbers parse
        assert_eq!(normalize_phone("01512 3456789", "??"), None);
        assert_eq!(normalize_phone("+4915123456789", "??"), want);
        // an international number is the same whatever the default region (found by the
        // property test: the parser refused this one with `US`)
        for region in ["FR", "US", "DE", "GB", "NO"] {
            assert_eq!(normalize_phone("+33 1 00 00 00 00", region).as_deref(), Some("+33100000000"), "{region}");
        }
        assert_eq!(normalize_phone("100000000", "FR").as_deref(), Some("+33100000000"));
    }

    #[test]
    fn trusted_numbers() {
        assert_eq!(trusted_e164("4915123456789", "DE"), Some("+4915123456789".into()));
        assert_eq!(trusted_e164("whatsapp:+4915000000001", "DE").as_deref().map(|s| s.starts_with("+49")), Some(true));
        assert_eq!(trusted_e164("whatsapp:hello", "DE"), None);
    }

    #[test]
    fn hostile_phone_inputs_never_panic() {
        for s in [
            "+",
            "+0",
            "+00000000000000000",
            "+999999999999999",
            "(((((",
            "+1 (",
            "00",
            "+80012345678",
            "+8",
            "+979123456789",
        ] {
            let _ = normalize_phone(s, "DE");
            let _ = normalize_phone(s, "US");
            let _ = normalize_phone(s, "");
        }
    }
}
