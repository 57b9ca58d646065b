//! Probabilistic matching (slide 7): how likely two profiles are one student, explained field by
//! field.
//!
//! A Fellegi–Sunter model: each field has `m` (the chance it agrees when the two are one
//! person) and `u` (the chance it agrees by coincidence). Agreement adds `log2(m/u)` to the
//! match weight, disagreement adds `log2((1-m)/(1-u))`, a missing value adds nothing. The score
//! is the posterior probability of a match given a prior (the share of true matches among the
//! pairs compared), so every score can be traced back to the comparisons that produced it.

use chrono::NaiveDate;
use cohort_messages::{IdentifierKind, LinkedIdentifier, ProfileRecord, TraitValue};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;

use crate::normalize::{compare_given_names, normalize_name, parse_date_of_birth, DateOrder, GivenNames};

/// The fields compared, as folded comparison keys.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MatchRecord {
    pub first_name: Option<String>,
    pub last_name: Option<String>,
    pub date_of_birth: Option<NaiveDate>,
    pub email: Option<String>,
    pub phone: Option<String>,
    pub postal_code: Option<String>,
    pub city: Option<String>,
    pub street: Option<String>,
    /// A national or student id, when a file carries one: equal ids settle the match.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub national_id: Option<String>,
}

impl MatchRecord {
    /// The golden record's values, folded for comparison (emails and phones come from the
    /// profile's identifiers, which are already canonical).
    pub fn from_profile(p: &ProfileRecord) -> Self {
        Self::from_parts(&p.traits, &p.identifiers)
    }

    /// From a golden record's traits and linked identifiers (a record or a live view).
    pub fn from_parts(traits: &BTreeMap<String, TraitValue>, identifiers: &[LinkedIdentifier]) -> Self {
        let text = |k: &str| traits.get(k).and_then(|t| scalar(&t.value));
        let identifier = |kind: IdentifierKind| {
            identifiers.iter().find(|l| l.identifier.kind == kind).map(|l| l.identifier.value.clone())
        };
        let nested = |k: &str| traits.get("address").and_then(|t| t.value.get(k)).and_then(scalar);
        let street = text("street").or_else(|| nested("street"));
        let city = text("city").or_else(|| nested("city"));
        Self {
            first_name: text("first_name").as_deref().and_then(normalize_name),
            last_name: text("last_name").as_deref().and_then(normalize_name),
            date_of_birth: text("date_of_birth").and_then(|d| parse_date_of_birth(&d, DateOrder::DayFirst)),
            email: identifier(IdentifierKind::Email),
            phone: identifier(IdentifierKind::Phone),
            postal_code: text("postal_code")
                .or_else(|| nested("postalCode"))
                .or_else(|| nested("postal_code"))
                .map(|s| s.replace(' ', "").to_uppercase()),
            city: city.as_deref().and_then(normalize_name),
            street: street.as_deref().and_then(normalize_name),
            national_id: text("national_id").map(|n| fold_national_id(&n)),
        }
    }

    /// Keys that put likely duplicates in the same block: only records sharing a key are
    /// compared. Name keys use a prefix of the folded name (Müller and Mueller share `mul`),
    /// swapped names share a key, and exact identifiers (email, phone, national id) are keys.
    pub fn blocking_keys(&self) -> Vec<String> {
        let mut keys = Vec::new();
        let prefix = |s: &String| s.chars().take(3).collect::<String>();
        let initial = |s: &Option<String>| s.as_ref().and_then(|v| v.chars().next());
        if let (Some(last), Some(dob)) = (&self.last_name, self.date_of_birth) {
            keys.push(format!("ln-dob:{}:{dob}", prefix(last)));
        }
        if let (Some(first), Some(dob)) = (&self.first_name, self.date_of_birth) {
            keys.push(format!("fn-dob:{}:{dob}", prefix(first)));
        }
        if let (Some(pc), Some(i)) = (&self.postal_code, initial(&self.last_name)) {
            keys.push(format!("pc-ln:{pc}:{i}"));
        }
        // Names that sound alike (Meier, Mayer, Maier; a typo in the first letters) meet here.
        if let Some(sound) = self.last_name.as_deref().and_then(phonetic) {
            if let Some(dob) = self.date_of_birth {
                keys.push(format!("ph-dob:{sound}:{dob}"));
            }
            if let Some(pc) = &self.postal_code {
                keys.push(format!("ph-pc:{sound}:{pc}"));
            }
        }
        if let (Some(first), Some(last)) = (&self.first_name, &self.last_name) {
            let (a, b) = if first <= last { (first, last) } else { (last, first) };
            keys.push(format!("names:{a}:{b}"));
        }
        if let Some(e) = &self.email {
            keys.push(format!("email:{e}"));
        }
        if let Some(ph) = &self.phone {
            keys.push(format!("phone:{ph}"));
        }
        if let Some(n) = &self.national_id {
            keys.push(format!("nid:{n}"));
        }
        keys
    }
}

/// The Double Metaphone code of a folded name's letters (none for a name without Latin letters).
pub fn phonetic(folded: &str) -> Option<String> {
    use rphonetic::Encoder;
    static ENCODER: std::sync::LazyLock<rphonetic::DoubleMetaphone> =
        std::sync::LazyLock::new(rphonetic::DoubleMetaphone::default);
    let letters: String = folded.chars().filter(char::is_ascii_alphabetic).collect();
    if letters.is_empty() {
        return None;
    }
    let code = ENCODER.encode(&letters);
    (!code.is_empty()).then_some(code)
}

/// National ids compare without spaces, dashes and case.
pub fn fold_national_id(raw: &str) -> String {
    raw.replace([' ', '-'], "").to_uppercase()
}

/// The match score of two records: 1 when they carry the same national id, else the model's.
pub fn match_score(a: &MatchRecord, b: &MatchRecord, model: &MatchModel) -> f64 {
    match (&a.national_id, &b.national_id) {
        (Some(x), Some(y)) if x == y => 1.0,
        _ => compare(a, b, model).score,
    }
}

fn scalar(v: &Value) -> Option<String> {
    match v {
        Value::String(s) if !s.trim().is_empty() => Some(s.trim().to_string()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// `m` and `u` of one field.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct FieldModel {
    pub m: f64,
    pub u: f64,
}

impl FieldModel {
    fn agree(self) -> f64 {
        (self.m / self.u).log2()
    }
    fn disagree(self) -> f64 {
        ((1.0 - self.m) / (1.0 - self.u)).log2()
    }
}

/// The model's parameters; the defaults are documented in ARCHITECTURE.md.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MatchModel {
    pub first_name: FieldModel,
    pub last_name: FieldModel,
    pub date_of_birth: FieldModel,
    pub email: FieldModel,
    pub phone: FieldModel,
    pub postal_code: FieldModel,
    pub city: FieldModel,
    pub street: FieldModel,
    /// Share of true matches among compared pairs (after blocking).
    pub prior: f64,
    /// Jaro-Winkler similarity from which names agree fully; between `partial_from` and this,
    /// they earn a share of the agreement weight.
    pub agree_from: f64,
    pub partial_from: f64,
    pub national_id: FieldModel,
    /// Most bits the household fields (last name, street, postal code, city, phone) may add
    /// together. Siblings share all of them, so beyond "same family" they say nothing about the
    /// person; counting them as independent evidence would merge brothers and sisters.
    pub household_cap: f64,
    /// Most bits the household fields may take away together: a move changes all of them at
    /// once, and is one event, not three.
    pub moved_cap: f64,
}

impl Default for MatchModel {
    fn default() -> Self {
        let f = |m, u| FieldModel { m, u };
        Self {
            first_name: f(0.95, 0.01),
            last_name: f(0.95, 0.005),
            date_of_birth: f(0.99, 0.0003),
            // Students use several addresses: a different one is weak evidence.
            email: f(0.70, 0.000_01),
            phone: f(0.90, 0.000_1),
            postal_code: f(0.90, 0.01),
            city: f(0.90, 0.05),
            street: f(0.85, 0.001),
            national_id: f(0.99, 0.000_000_1),
            prior: 0.000_1,
            agree_from: 0.94,
            household_cap: 12.0,
            moved_cap: 4.0,
            partial_from: 0.85,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Agree,
    Partial,
    Disagree,
    Missing,
}

/// One field's comparison: what was compared (folded keys, never raw values) and what it weighed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FieldComparison {
    pub field: String,
    pub outcome: Outcome,
    pub similarity: Option<f64>,
    pub weight: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MatchExplanation {
    pub comparisons: Vec<FieldComparison>,
    /// Sum of the field weights (bits of evidence).
    pub weight: f64,
    /// Posterior probability of one student, in [0, 1].
    pub score: f64,
}

/// Compares two records under `model`.
pub fn compare(a: &MatchRecord, b: &MatchRecord, model: &MatchModel) -> MatchExplanation {
    let mut out = Vec::new();
    // Swapped first and last names (common in forms) count as agreeing names; all four must be
    // there (two missing names are not two agreeing ones).
    let swapped = a.first_name.is_some()
        && a.last_name.is_some()
        && a.first_name == b.last_name
        && a.last_name == b.first_name
        && a.first_name != a.last_name;
    if swapped {
        out.push(FieldComparison {
            field: "first_name".into(),
            outcome: Outcome::Agree,
            similarity: Some(1.0),
            weight: model.first_name.agree(),
        });
        out.push(FieldComparison {
            field: "last_name".into(),
            outcome: Outcome::Agree,
            similarity: Some(1.0),
            weight: model.last_name.agree(),
        });
    } else {
        out.push(given_name(&a.first_name, &b.first_name, model));
        out.push(fuzzy("last_name", &a.last_name, &b.last_name, model.last_name, model));
    }
    out.push(dates(&a.date_of_birth, &b.date_of_birth, model.date_of_birth));
    out.push(exact("email", &a.email, &b.email, model.email));
    out.push(exact("phone", &a.phone, &b.phone, model.phone));
    out.push(exact("postal_code", &a.postal_code, &b.postal_code, model.postal_code));
    out.push(fuzzy("city", &a.city, &b.city, model.city, model));
    out.push(street(&a.street, &b.street, model));
    out.push(exact("national_id", &a.national_id, &b.national_id, model.national_id));
    cap_group(&mut out, HOUSEHOLD, |w| w > 0.0, model.household_cap);
    cap_group(&mut out, HOME, |w| w < 0.0, model.moved_cap);
    let weight: f64 = out.iter().map(|c| c.weight).sum();
    let prior = (model.prior / (1.0 - model.prior)).log2();
    let score = 1.0 / (1.0 + (-(weight + prior)).exp2());
    MatchExplanation { comparisons: out, weight, score }
}

/// Fields a family shares (see [`MatchModel::household_cap`]).
const HOUSEHOLD: &[&str] = &["last_name", "street", "postal_code", "city", "phone"];
/// Fields a move changes together (see [`MatchModel::moved_cap`]).
const HOME: &[&str] = &["street", "postal_code", "city", "phone"];

/// Scales the weights of `fields` of one sign so their magnitude adds up to at most `cap`.
fn cap_group(out: &mut [FieldComparison], fields: &[&str], sign: impl Fn(f64) -> bool, cap: f64) {
    let chosen = |c: &FieldComparison| fields.contains(&c.field.as_str()) && sign(c.weight);
    let total: f64 = out.iter().filter(|c| chosen(c)).map(|c| c.weight.abs()).sum();
    if total > cap {
        let scale = cap / total;
        for c in out.iter_mut().filter(|c| chosen(c)) {
            c.weight *= scale;
        }
    }
}

fn missing(field: &str) -> FieldComparison {
    FieldComparison { field: field.into(), outcome: Outcome::Missing, similarity: None, weight: 0.0 }
}

fn exact(field: &str, a: &Option<String>, b: &Option<String>, m: FieldModel) -> FieldComparison {
    let (Some(a), Some(b)) = (a, b) else { return missing(field) };
    let (outcome, weight) = if a == b { (Outcome::Agree, m.agree()) } else { (Outcome::Disagree, m.disagree()) };
    FieldComparison { field: field.into(), outcome, similarity: Some(if a == b { 1.0 } else { 0.0 }), weight }
}

fn fuzzy(field: &str, a: &Option<String>, b: &Option<String>, m: FieldModel, model: &MatchModel) -> FieldComparison {
    let (Some(a), Some(b)) = (a, b) else { return missing(field) };
    let sim = strsim::jaro_winkler(a, b);
    let (outcome, weight) = if sim >= model.agree_from {
        (Outcome::Agree, m.agree())
    } else if sim >= model.partial_from {
        let share = (sim - model.partial_from) / (model.agree_from - model.partial_from);
        (Outcome::Partial, m.disagree() + share * (m.agree() - m.disagree()))
    } else {
        (Outcome::Disagree, m.disagree())
    };
    FieldComparison { field: field.into(), outcome, similarity: Some(sim), weight }
}

/// Given names: a nickname agrees (a little less than the same name); two different known
/// names disagree however alike they look (Christina, Christian); anything else is fuzzy, as
/// one of them may be mistyped.
fn given_name(a: &Option<String>, b: &Option<String>, model: &MatchModel) -> FieldComparison {
    let (Some(x), Some(y)) = (a, b) else { return missing("first_name") };
    let m = model.first_name;
    let sim = Some(strsim::jaro_winkler(x, y));
    match compare_given_names(x, y) {
        GivenNames::Same => fuzzy("first_name", a, b, m, model),
        GivenNames::Nickname => FieldComparison {
            field: "first_name".into(),
            outcome: Outcome::Agree,
            similarity: sim,
            weight: m.agree() - 3.0,
        },
        GivenNames::Different => FieldComparison {
            field: "first_name".into(),
            outcome: Outcome::Disagree,
            similarity: sim,
            weight: m.disagree(),
        },
        GivenNames::Unknown => fuzzy("first_name", a, b, m, model),
    }
}

/// Streets compare by name (fuzzy) and house number (exact when both have one): the same
/// street is many households.
fn street(a: &Option<String>, b: &Option<String>, model: &MatchModel) -> FieldComparison {
    let (Some(a), Some(b)) = (a, b) else { return missing("street") };
    let split = |s: &str| {
        let number: String = s.split_whitespace().filter(|w| w.chars().any(|c| c.is_ascii_digit())).collect();
        let name: Vec<&str> = s.split_whitespace().filter(|w| !w.chars().any(|c| c.is_ascii_digit())).collect();
        (name.join(" "), number)
    };
    let ((name_a, number_a), (name_b, number_b)) = (split(a), split(b));
    if !number_a.is_empty() && !number_b.is_empty() && number_a != number_b {
        return FieldComparison {
            field: "street".into(),
            outcome: Outcome::Disagree,
            similarity: Some(0.0),
            weight: model.street.disagree(),
        };
    }
    fuzzy("street", &Some(name_a), &Some(name_b), model.street, model)
}

fn dates(a: &Option<NaiveDate>, b: &Option<NaiveDate>, m: FieldModel) -> FieldComparison {
    use chrono::Datelike;
    let (Some(a), Some(b)) = (a, b) else { return missing("date_of_birth") };
    if a == b {
        return FieldComparison {
            field: "date_of_birth".into(),
            outcome: Outcome::Agree,
            similarity: Some(1.0),
            weight: m.agree(),
        };
    }
    // Day and month swapped (a US-style entry), or one digit off in the day: likely typos.
    let swapped = a.year() == b.year() && a.day() == b.month() && a.month() == b.day();
    let near = a.year() == b.year() && a.month() == b.month() && a.day().abs_diff(b.day()) <= 1;
    if swapped || near {
        let weight = (m.agree() + m.disagree()) / 2.0;
        return FieldComparison {
            field: "date_of_birth".into(),
            outcome: Outcome::Partial,
            similarity: Some(0.5),
            weight,
        };
    }
    FieldComparison {
        field: "date_of_birth".into(),
        outcome: Outcome::Disagree,
        similarity: Some(0.0),
        weight: m.disagree(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(first: &str, last: &str, dob: Option<(i32, u32, u32)>, postal: Option<&str>) -> MatchRecord {
        MatchRecord {
            first_name: normalize_name(first),
            last_name: normalize_name(last),
            date_of_birth: dob.and_then(|(y, m, d)| NaiveDate::from_ymd_opt(y, m, d)),
            postal_code: postal.map(String::from),
            ..MatchRecord::default()
        }
    }

    #[test]
    fn spelling_variants_with_the_same_birthday_score_above_review() {
        let m = MatchModel::default();
        let a = rec("Lena", "Müller", Some((2001, 4, 3)), Some("20146"));
        let b = rec("Lena", "Mueller", Some((2001, 4, 3)), Some("20146"));
        let e = compare(&a, &b, &m);
        assert!(e.score > 0.99, "{e:?}");
        let c = rec("Müller", "Lena", Some((2001, 4, 3)), None);
        assert!(compare(&a, &c, &m).score > 0.85, "swapped names still match");
    }

    /// A first name alone and the same word as a last name alone are not swapped names.
    #[test]
    fn a_lone_first_name_equal_to_a_lone_last_name_is_not_a_swap() {
        let m = MatchModel::default();
        let phone = Some("+4915112345678".to_string());
        let a = MatchRecord { first_name: normalize_name("Thomas"), phone: phone.clone(), ..MatchRecord::default() };
        let b = MatchRecord { last_name: normalize_name("Thomas"), phone, ..MatchRecord::default() };
        let e = compare(&a, &b, &m);
        let first = e.comparisons.iter().find(|c| c.field == "first_name").unwrap();
        assert_eq!(first.outcome, Outcome::Missing, "{e:?}");
        assert!(e.score < 0.85, "{e:?}");
    }

    #[test]
    fn same_name_different_birthday_and_place_is_not_a_match() {
        let m = MatchModel::default();
        let a = rec("Anna", "Schmidt", Some((2000, 1, 10)), Some("10115"));
        let b = rec("Anna", "Schmidt", Some((1987, 7, 22)), Some("80331"));
        let e = compare(&a, &b, &m);
        assert!(e.score < 0.05, "{e:?}");
        let dob = e.comparisons.iter().find(|c| c.field == "date_of_birth").unwrap();
        assert_eq!(dob.outcome, Outcome::Disagree);
        assert!(dob.weight < 0.0);
    }

    #[test]
    fn missing_fields_weigh_nothing_and_weights_add_up() {
        let m = MatchModel::default();
        let a = rec("Jonas", "Weber", None, None);
        let b = rec("Jonas", "Weber", None, None);
        let e = compare(&a, &b, &m);
        let missing = e.comparisons.iter().filter(|c| c.outcome == Outcome::Missing).count();
        assert_eq!(missing, 7);
        let sum: f64 = e.comparisons.iter().map(|c| c.weight).sum();
        assert!((sum - e.weight).abs() < 1e-9);
        assert!(e.score > 0.0 && e.score < 1.0);
        // Names alone (common ones) are not enough to pass a review threshold of 0.85.
        assert!(e.score < 0.85, "{e:?}");
    }

    #[test]
    fn typo_in_a_name_is_partial_evidence() {
        let m = MatchModel::default();
        let e = compare(&rec("Katharina", "Fischer", None, None), &rec("Katarina", "Fischer", None, None), &m);
        let first = e.comparisons.iter().find(|c| c.field == "first_name").unwrap();
        assert!(matches!(first.outcome, Outcome::Agree | Outcome::Partial), "{first:?}");
        assert!(first.weight > 0.0);
    }

    #[test]
    fn siblings_sharing_a_home_and_phone_are_not_one_student() {
        let m = MatchModel::default();
        let home = |first: &str, dob| MatchRecord {
            street: normalize_name("Gartenstraße 44"),
            city: normalize_name("Frankfurt am Main"),
            phone: Some("+4915335624587".into()),
            ..rec(first, "Heinrich", dob, Some("60894"))
        };
        let sister = compare(&home("Christina", Some((2001, 5, 19))), &home("Christian", Some((2004, 2, 12))), &m);
        assert!(sister.score < 0.1, "{sister:?}");
        let first = sister.comparisons.iter().find(|c| c.field == "first_name").unwrap();
        assert_eq!(first.outcome, Outcome::Disagree, "two known names, not a typo");
        // Household fields together add at most the cap.
        let household: f64 = sister
            .comparisons
            .iter()
            .filter(|c| ["last_name", "street", "postal_code", "city", "phone"].contains(&c.field.as_str()))
            .map(|c| c.weight)
            .sum();
        assert!((household - m.household_cap).abs() < 1e-9, "{household}");
        // The same student after a move, with a nickname: still a match.
        let moved = MatchRecord {
            street: normalize_name("Schillerplatz 141"),
            city: normalize_name("Freiburg"),
            ..home("Max", Some((2001, 5, 19)))
        };
        let before = home("Maximilian", Some((2001, 5, 19)));
        let before = MatchRecord { postal_code: Some("79043".into()), ..before };
        assert!(compare(&before, &moved, &m).score > 0.99);
    }

    #[test]
    fn a_different_house_number_is_a_different_address() {
        let m = MatchModel::default();
        let at = |street: &str| MatchRecord { street: normalize_name(street), ..MatchRecord::default() };
        let e = compare(&at("Gran Vía 27"), &at("Gran Via 90"), &m);
        assert_eq!(e.comparisons.iter().find(|c| c.field == "street").unwrap().outcome, Outcome::Disagree);
        let e = compare(&at("Gran Vía 27"), &at("Grna Via 27"), &m);
        assert_ne!(e.comparisons.iter().find(|c| c.field == "street").unwrap().outcome, Outcome::Disagree);
    }

    #[test]
    fn names_that_sound_alike_share_a_blocking_key() {
        let dob = Some((2001, 4, 3));
        let keys = |last: &str| rec("Lena", last, dob, Some("20146")).blocking_keys();
        let shared = |a: &str, b: &str| keys(a).iter().filter(|k| k.starts_with("ph-")).any(|k| keys(b).contains(k));
        assert!(shared("Meier", "Mayer"));
        assert!(shared("Schmidt", "Schmitt"));
        assert!(shared("Kowalczyk", "Cowalczyk"), "a typo in the first letter");
        assert!(!shared("Meier", "Schulz"));
        assert_eq!(phonetic("Ωμέγα"), None);
    }
}
