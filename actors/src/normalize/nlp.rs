//! Understanding inbound messages: intent, programme entities and sentiment.
//!
//! Deliberately a transparent rule engine (configurable phrases and a lexicon) rather than a
//! model: admissions staff can read and change why a message was labelled, and opt-outs — a
//! legal matter — are recognised by an explicit list.

use super::options::NormalizeOptions;
use std::collections::HashMap;
use std::sync::OnceLock;
use unicode_normalization::char::is_combining_mark;
use unicode_normalization::UnicodeNormalization;

/// What a message is about.
#[derive(Debug, Clone, PartialEq)]
pub struct TextAnalysis {
    /// The first matching intent rule, or the fallback intent.
    pub intent: String,
    /// Catalogue names of the programmes mentioned, in order of first mention.
    pub entities: Vec<String>,
    /// From -1 (negative) to 1 (positive); 0 when no sentiment word occurs.
    pub sentiment: f64,
}

/// Folds text for matching: lower case, accents removed (ä → a), ß → ss, apostrophes dropped
/// ("don't" → "dont", "MBA's" → "mba").
pub(crate) fn fold(text: &str) -> String {
    let chars: Vec<char> = text.nfkd().filter(|c| !is_combining_mark(*c)).flat_map(char::to_lowercase).collect();
    let mut out = String::with_capacity(chars.len());
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if matches!(c, '\'' | '’' | '‘' | '`' | '´') {
            let possessive = chars.get(i + 1) == Some(&'s') && !chars.get(i + 2).is_some_and(|c| c.is_alphanumeric());
            i += if possessive { 2 } else { 1 };
            continue;
        }
        // Letters Unicode does not decompose into a base letter and a mark.
        match c {
            'ß' => out.push_str("ss"),
            'ł' => out.push('l'),
            'ø' => out.push('o'),
            'đ' => out.push('d'),
            'æ' => out.push_str("ae"),
            'œ' => out.push_str("oe"),
            _ => out.push(c),
        }
        i += 1;
    }
    out
}

/// Pictographs count as words of their own, so 👍 can carry sentiment.
fn is_pictograph(c: char) -> bool {
    matches!(c as u32, 0x1F300..=0x1FAFF | 0x2600..=0x27BF)
}

/// Splits folded text into words (letters and digits) and pictographs.
pub(crate) fn tokenize(text: &str) -> Vec<String> {
    let mut tokens = Vec::new();
    let mut word = String::new();
    for c in fold(text).chars() {
        if c.is_alphanumeric() {
            word.push(c);
            continue;
        }
        if !word.is_empty() {
            tokens.push(std::mem::take(&mut word));
        }
        if is_pictograph(c) {
            tokens.push(c.to_string());
        }
    }
    if !word.is_empty() {
        tokens.push(word);
    }
    tokens
}

#[derive(Debug, Clone)]
enum TokPat {
    Exact(String),
    Prefix(String),
    Suffix(String),
    Contains(String),
}

impl TokPat {
    fn matches(&self, token: &str) -> bool {
        match self {
            TokPat::Exact(s) => token == s,
            TokPat::Prefix(s) => token.starts_with(s.as_str()),
            TokPat::Suffix(s) => token.ends_with(s.as_str()),
            TokPat::Contains(s) => token.contains(s.as_str()),
        }
    }
}

/// A phrase of word patterns, matched on consecutive tokens.
#[derive(Debug, Clone)]
pub(crate) struct Phrase(Vec<TokPat>);

impl Phrase {
    /// Compiles `"*frist"`, `"deadline*"`, `"bis wann"`; `None` for a phrase with no words.
    pub(crate) fn compile(phrase: &str) -> Option<Phrase> {
        let mut pats = Vec::new();
        for word in phrase.split_whitespace() {
            let lead = word.starts_with('*');
            let trail = word.len() > 1 && word.ends_with('*');
            let sub = tokenize(word.trim_matches('*'));
            let last = sub.len().saturating_sub(1);
            for (j, t) in sub.into_iter().enumerate() {
                let (l, r) = (lead && j == 0, trail && j == last);
                pats.push(match (l, r) {
                    (true, true) => TokPat::Contains(t),
                    (true, false) => TokPat::Suffix(t),
                    (false, true) => TokPat::Prefix(t),
                    (false, false) => TokPat::Exact(t),
                });
            }
        }
        (!pats.is_empty()).then_some(Phrase(pats))
    }

    fn len(&self) -> usize {
        self.0.len()
    }

    fn matches_at(&self, tokens: &[String], at: usize) -> bool {
        at + self.0.len() <= tokens.len() && self.0.iter().zip(&tokens[at..]).all(|(p, t)| p.matches(t))
    }

    fn matches_anywhere(&self, tokens: &[String]) -> bool {
        (0..tokens.len()).any(|i| self.matches_at(tokens, i))
    }

    fn matches_whole(&self, tokens: &[String]) -> bool {
        self.0.len() == tokens.len() && self.matches_at(tokens, 0)
    }
}

/// A `NormalizeOptions`' text rules, compiled on first use. Compiling every phrase, programme
/// and lexicon word again for each message was nine tenths of a WhatsApp message's cost (about
/// 150 µs of CPU). A clone compiles again, so a copy whose rules are then changed never uses
/// the original's; change a used value's rules only through a clone.
#[derive(Default)]
pub struct CompiledText(OnceLock<TextRules>);

impl Clone for CompiledText {
    fn clone(&self) -> Self {
        Self::default()
    }
}

/// Derived from the other fields, so never a difference of its own.
impl PartialEq for CompiledText {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl std::fmt::Debug for CompiledText {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.get().is_some() { "CompiledText(compiled)" } else { "CompiledText(pending)" })
    }
}

/// Intent rules, programme names and the sentiment lexicon as phrases and folded words.
struct TextRules {
    /// Per rule in priority order: the intent, its whole-message phrases and its keywords.
    intents: Vec<(String, Vec<Phrase>, Vec<Phrase>)>,
    fallback_intent: String,
    /// Every programme name and alias, with the name it reports.
    programmes: Vec<(Phrase, String)>,
    /// Lexicon entries that are one plain word, by folded word.
    single: HashMap<String, f64>,
    /// The other lexicon entries: phrases and wildcards.
    patterns: Vec<(Phrase, f64)>,
    negators: Vec<String>,
    intensifiers: Vec<String>,
}

impl TextRules {
    fn of(opts: &NormalizeOptions) -> &Self {
        opts.text_rules.0.get_or_init(|| Self::compile(opts))
    }

    fn compile(opts: &NormalizeOptions) -> Self {
        let phrases = |list: &[String]| list.iter().filter_map(|p| Phrase::compile(p)).collect::<Vec<_>>();
        let intents =
            opts.intents.iter().map(|r| (r.intent.clone(), phrases(&r.exact), phrases(&r.keywords))).collect();
        let programmes = opts
            .programmes
            .iter()
            .flat_map(|p| {
                std::iter::once(&p.name).chain(&p.aliases).filter_map(|s| Some((Phrase::compile(s)?, p.name.clone())))
            })
            .collect();
        let mut single = HashMap::new();
        let mut patterns = Vec::new();
        for (k, w) in &opts.sentiment_lexicon {
            if !w.is_finite() {
                continue;
            }
            let w = w.clamp(-1.0, 1.0);
            let simple = !k.contains('*') && !k.contains(char::is_whitespace);
            match (simple, tokenize(k).as_slice()) {
                (true, [one]) => {
                    single.insert(one.clone(), w);
                }
                _ => {
                    if let Some(p) = Phrase::compile(k) {
                        patterns.push((p, w));
                    }
                }
            }
        }
        Self {
            intents,
            fallback_intent: opts.fallback_intent.clone(),
            programmes,
            single,
            patterns,
            negators: opts.negations.iter().flat_map(|n| tokenize(n)).collect(),
            intensifiers: opts.intensifiers.iter().flat_map(|n| tokenize(n)).collect(),
        }
    }

    /// The intent of a tokenized message: the first rule (in priority order) that matches.
    fn intent(&self, tokens: &[String]) -> String {
        for (intent, exact, keywords) in &self.intents {
            if exact.iter().any(|p| p.matches_whole(tokens)) || keywords.iter().any(|p| p.matches_anywhere(tokens)) {
                return intent.clone();
            }
        }
        self.fallback_intent.clone()
    }

    /// Programmes mentioned, by longest match so "Master of Business Administration" is the
    /// MBA and not also "Business Administration".
    fn entities(&self, tokens: &[String]) -> Vec<String> {
        let mut found: Vec<String> = Vec::new();
        let mut i = 0;
        while i < tokens.len() {
            let best = self.programmes.iter().filter(|(p, _)| p.matches_at(tokens, i)).max_by_key(|(p, _)| p.len());
            match best {
                Some((p, name)) => {
                    if !found.iter().any(|f| f == name) {
                        found.push(name.clone());
                    }
                    i += p.len();
                }
                None => i += 1,
            }
        }
        found
    }

    /// Mean weight of the sentiment words, negated and intensified, clamped to [-1, 1].
    fn sentiment(&self, tokens: &[String]) -> f64 {
        let (mut sum, mut n) = (0.0_f64, 0_u32);
        let mut i = 0;
        while i < tokens.len() {
            let hit = match self.single.get(&tokens[i]) {
                Some(w) => Some((*w, 1)),
                None => self
                    .patterns
                    .iter()
                    .filter(|(p, _)| p.matches_at(tokens, i))
                    .max_by_key(|(p, _)| p.len())
                    .map(|(p, w)| (*w, p.len())),
            };
            let Some((mut w, len)) = hit else {
                i += 1;
                continue;
            };
            let window = &tokens[i.saturating_sub(NEGATION_WINDOW)..i];
            if window.iter().any(|t| self.negators.contains(t)) {
                w *= NEGATION_FACTOR;
            }
            if i > 0 && self.intensifiers.contains(&tokens[i - 1]) {
                w *= INTENSIFIER_FACTOR;
            }
            sum += w;
            n += 1;
            i += len;
        }
        if n == 0 {
            return 0.0;
        }
        let score = (sum / f64::from(n)).clamp(-1.0, 1.0);
        (score * 1000.0).round() / 1000.0
    }
}

/// How far back a negator reaches ("not very good", "nicht so gut").
const NEGATION_WINDOW: usize = 3;
/// A negated word keeps half its strength with the opposite sign: "not good" is mildly negative.
const NEGATION_FACTOR: f64 = -0.5;
const INTENSIFIER_FACTOR: f64 = 1.5;

/// Intent, programme entities and sentiment of a free-text message.
pub fn analyze_text(text: &str, opts: &NormalizeOptions) -> TextAnalysis {
    let tokens = tokenize(text);
    let rules = TextRules::of(opts);
    TextAnalysis {
        intent: rules.intent(&tokens),
        entities: rules.entities(&tokens),
        sentiment: rules.sentiment(&tokens),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folding_and_tokens() {
        assert_eq!(tokenize("Hi, when's the DEADLINE für's MBA?"), vec!["hi", "when", "the", "deadline", "fur", "mba"]);
        assert_eq!(tokenize("Straße enttäuscht 👍!"), vec!["strasse", "enttauscht", "👍"]);
        assert_eq!(tokenize("don't"), vec!["dont"]);
        assert_eq!(tokenize("Małgorzata Søren Œuvre"), vec!["malgorzata", "soren", "oeuvre"]);
        assert!(tokenize("  ...  ").is_empty());
    }

    #[test]
    fn wildcards() {
        let toks = tokenize("Wann ist die Bewerbungsfrist?");
        assert!(Phrase::compile("*frist").is_some_and(|p| p.matches_anywhere(&toks)));
        assert!(!Phrase::compile("frist").is_some_and(|p| p.matches_anywhere(&toks)));
        assert!(Phrase::compile("bewerb*").is_some_and(|p| p.matches_anywhere(&toks)));
        assert!(Phrase::compile("*werbungs*").is_some_and(|p| p.matches_anywhere(&toks)));
        assert!(Phrase::compile("   ").is_none());
        assert!(Phrase::compile("*").is_none());
    }
}
