//! Person fields in comparable form: names folded so spellings of one name compare equal, and
//! dates of birth read from the formats schools' systems export.

use chrono::{Datelike, NaiveDate, Utc};

use super::nlp::fold;

/// Honorifics and academic titles dropped from names (compared after folding, without dots).
const TITLES: &[&str] = &[
    "mr",
    "mrs",
    "ms",
    "miss",
    "mx",
    "dr",
    "prof",
    "professor",
    "sir",
    "dame",
    "herr",
    "frau",
    "fr",
    "hr",
    "dipl",
    "ing",
    "mag",
    "phd",
    "md",
    "jr",
    "sr",
    "mme",
    "mlle",
    "m",
    "sig",
    "sra",
    "don",
    "dona",
];

/// German umlauts are often written as two letters (Mueller, Goethe); folded names keep one
/// form so Müller, Mueller and MULLER compare equal.
const DIGRAPHS: &[(&str, &str)] = &[("ae", "a"), ("oe", "o"), ("ue", "u")];

/// A date-of-birth trait value as `YYYY-MM-DD`, if it reads as one.
pub fn date_of_birth_trait(value: &serde_json::Value, order: DateOrder) -> Option<serde_json::Value> {
    let date = parse_date_of_birth(value.as_str()?, order)?;
    Some(serde_json::Value::String(date.format("%Y-%m-%d").to_string()))
}

/// A name as a comparison key: lower case, accents and ß folded (ß → ss), umlaut digraphs
/// folded, titles and punctuation removed, single spaces. `None` when nothing is left.
///
/// The key is for matching only (the profile keeps the name as written): folding `ue` also
/// turns Manuel into `manul`, the same on both sides of every comparison.
pub fn normalize_name(raw: &str) -> Option<String> {
    let folded = fold(raw);
    let words: Vec<String> = folded
        .split(|c: char| c.is_whitespace() || matches!(c, ',' | '.' | ';' | '(' | ')' | '"'))
        .map(|w| w.trim_matches(|c: char| !c.is_alphanumeric() && c != '-'))
        .filter(|w| !w.is_empty() && !TITLES.contains(w))
        .map(|w| {
            let mut w = w.to_string();
            for (from, to) in DIGRAPHS {
                w = w.replace(from, to);
            }
            w
        })
        .collect();
    let name = words.join(" ");
    (!name.is_empty()).then_some(name)
}

/// How a date with slashes is read when both numbers could be the month.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DateOrder {
    /// 03/04/2001 is 3 April (Europe, the default).
    #[default]
    DayFirst,
    /// 03/04/2001 is 4 March (United States).
    MonthFirst,
}

/// A date of birth from ISO (`2001-04-03`), German (`03.04.2001`), slashed (`03/04/2001`, read
/// per `order` unless one number is above 12), compact (`20010403`), and written-out forms
/// (`3 April 2001`, `April 3, 2001`, `3 Apr 2001`), with or without a time part (Salesforce
/// sends `2001-04-03T00:00:00.000Z`). Two-digit years are read as the most recent past year
/// (`03.04.01` → 2001, `03.04.99` → 1999). `None` for anything else, for dates in the future
/// or before 1900.
pub fn parse_date_of_birth(raw: &str, order: DateOrder) -> Option<NaiveDate> {
    let s = raw.trim();
    let s = s.split_once('T').map_or(s, |(d, _)| d);
    let date = parse_numeric(s, order).or_else(|| parse_written(s))?;
    let today = Utc::now().date_naive();
    (date.year() >= 1900 && date <= today).then_some(date)
}

fn parse_numeric(s: &str, order: DateOrder) -> Option<NaiveDate> {
    if s.len() == 8 && s.bytes().all(|b| b.is_ascii_digit()) {
        return NaiveDate::parse_from_str(s, "%Y%m%d").ok();
    }
    let sep = ['-', '.', '/'].into_iter().find(|c| s.contains(*c))?;
    let parts: Vec<&str> = s.split(sep).map(str::trim).collect();
    let [a, b, c] = parts.as_slice() else { return None };
    let num = |p: &str| {
        (!p.is_empty() && p.len() <= 4 && p.bytes().all(|b| b.is_ascii_digit()))
            .then(|| p.parse::<u32>().ok())
            .flatten()
    };
    let (a_n, b_n, c_n) = (num(a)?, num(b)?, num(c)?);
    if a.len() == 4 {
        return NaiveDate::from_ymd_opt(i32::try_from(a_n).ok()?, b_n, c_n);
    }
    let year = full_year(c, c_n)?;
    let (day, month) = match (sep, order) {
        ('/', _) if a_n > 12 => (a_n, b_n),
        ('/', _) if b_n > 12 => (b_n, a_n),
        ('/', DateOrder::MonthFirst) => (b_n, a_n),
        _ => (a_n, b_n),
    };
    NaiveDate::from_ymd_opt(year, month, day)
}

/// A four-digit year as is; two digits as the latest year not after this one.
fn full_year(text: &str, n: u32) -> Option<i32> {
    let n = i32::try_from(n).ok()?;
    match text.len() {
        4 => Some(n),
        2 => {
            let this = Utc::now().year();
            let century = this - this % 100;
            Some(if century + n <= this { century + n } else { century - 100 + n })
        }
        _ => None,
    }
}

const MONTHS: &[(&str, u32)] = &[
    ("january", 1),
    ("jan", 1),
    ("januar", 1),
    ("february", 2),
    ("feb", 2),
    ("februar", 2),
    ("march", 3),
    ("mar", 3),
    ("marz", 3),
    ("april", 4),
    ("apr", 4),
    ("may", 5),
    ("mai", 5),
    ("june", 6),
    ("jun", 6),
    ("juni", 6),
    ("july", 7),
    ("jul", 7),
    ("juli", 7),
    ("august", 8),
    ("aug", 8),
    ("september", 9),
    ("sep", 9),
    ("sept", 9),
    ("october", 10),
    ("oct", 10),
    ("oktober", 10),
    ("okt", 10),
    ("november", 11),
    ("nov", 11),
    ("december", 12),
    ("dec", 12),
    ("dezember", 12),
    ("dez", 12),
];

/// `3 April 2001`, `3. April 2001`, `April 3, 2001`, `3 Apr 2001`, `3 März 2001`.
fn parse_written(s: &str) -> Option<NaiveDate> {
    let folded = fold(s);
    let words: Vec<&str> =
        folded.split(|c: char| c.is_whitespace() || c == ',' || c == '.').filter(|w| !w.is_empty()).collect();
    let [x, y, z] = words.as_slice() else { return None };
    let month = |w: &str| MONTHS.iter().find(|(name, _)| *name == w).map(|(_, m)| *m);
    let day = |w: &str| w.parse::<u32>().ok();
    let year = |w: &str| (w.len() == 4).then(|| w.parse::<i32>().ok()).flatten();
    if let (Some(d), Some(m), Some(y)) = (day(x), month(y), year(z)) {
        return NaiveDate::from_ymd_opt(y, m, d);
    }
    if let (Some(m), Some(d), Some(y)) = (month(x), day(y), year(z)) {
        return NaiveDate::from_ymd_opt(y, m, d);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(y: i32, m: u32, day: u32) -> Option<NaiveDate> {
        NaiveDate::from_ymd_opt(y, m, day)
    }

    #[test]
    fn spellings_of_one_name_fold_to_one_key() {
        for same in ["Müller", "Mueller", "MULLER", "  muller ", "Dr. Müller", "Prof. Dr. MÜLLER"] {
            assert_eq!(normalize_name(same).as_deref(), Some("muller"), "{same}");
        }
        // Zoë and Zoe both become `zo`: keys compare, they are not for display.
        assert_eq!(normalize_name("Frau  Zoë   Weiß-Schäfer").as_deref(), Some("zo weiss-schafer"));
        assert_eq!(normalize_name("Zoe"), normalize_name("Zoë"));
        assert_eq!(normalize_name("José Ñúñez").as_deref(), Some("jose nunez"));
        assert_eq!(normalize_name("O'Brien").as_deref(), Some("obrien"));
        assert_eq!(normalize_name("Goethe"), normalize_name("Göthe"));
        assert_eq!(normalize_name("  Dr. "), None);
        assert_eq!(normalize_name(""), None);
    }

    #[test]
    fn dates_of_birth_in_the_formats_schools_export() {
        let want = d(2001, 4, 3);
        for s in [
            "2001-04-03",
            "03.04.2001",
            "3.4.2001",
            "03/04/2001",
            "20010403",
            "2001/04/03",
            "03-04-2001",
            "3 April 2001",
            "3. April 2001",
            "April 3, 2001",
            "3 Apr 2001",
            "2001-04-03T00:00:00.000Z",
            "03.04.01",
        ] {
            assert_eq!(parse_date_of_birth(s, DateOrder::DayFirst), want, "{s}");
        }
        assert_eq!(parse_date_of_birth("14. März 1999", DateOrder::DayFirst), d(1999, 3, 14));
        assert_eq!(parse_date_of_birth("03/04/2001", DateOrder::MonthFirst), d(2001, 3, 4));
        // Unambiguous slashes are read right whatever the order.
        assert_eq!(parse_date_of_birth("04/13/2001", DateOrder::DayFirst), d(2001, 4, 13));
        assert_eq!(parse_date_of_birth("13/04/2001", DateOrder::MonthFirst), d(2001, 4, 13));
        assert_eq!(parse_date_of_birth("14.03.99", DateOrder::DayFirst), d(1999, 3, 14));
    }

    #[test]
    fn impossible_dates_of_birth_are_refused() {
        for bad in ["31.02.2001", "2001-13-01", "1899-12-31", "3000-01-01", "yesterday", "12/2001", "", "1.2.3.4"] {
            assert_eq!(parse_date_of_birth(bad, DateOrder::DayFirst), None, "{bad}");
        }
    }
}
