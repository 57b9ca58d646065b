//! What the normalizers can be told: embedded in the config under `[normalize]`.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Options of every source normalizer. All fields have defaults, so an empty `[normalize]`
/// table is valid; a list or map given in config replaces its default wholesale.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NormalizeOptions {
    /// Region for phone numbers written without a country code (ISO 3166 alpha-2).
    pub default_region: String,
    /// Segment HTTP API limits.
    pub segment: SegmentLimits,
    /// Largest webhook body (Twilio, SendGrid, Salesforce CDC), in bytes.
    pub max_webhook_bytes: usize,
    /// Largest Salesforce CSV chunk, in bytes.
    pub max_csv_bytes: usize,
    /// Programmes recognised in free text (WhatsApp); entities are reported by `name`.
    pub programmes: Vec<Programme>,
    /// Word (or phrase, or `prefix*`) → sentiment weight in [-1, 1]; matched case- and
    /// accent-insensitively.
    pub sentiment_lexicon: BTreeMap<String, f64>,
    /// Words that flip the sentiment of the next few words ("not good", "nicht gut").
    pub negations: Vec<String>,
    /// Words that strengthen the next sentiment word ("very good", "sehr gut").
    pub intensifiers: Vec<String>,
    /// Intent rules in priority order: the first rule that matches names the message.
    pub intents: Vec<IntentRule>,
    /// Intent of a message no rule matches.
    pub fallback_intent: String,
    /// Salesforce field API name → canonical trait. Compound CDC fields use dotted names
    /// (`Name.FirstName`); fields not listed are kept under their API names.
    pub salesforce_fields: BTreeMap<String, String>,
    /// Mailbox-provider rules for the email *identifier* (the trait keeps the address as given):
    /// `max.mustermann+news@googlemail.com` and `maxmustermann@gmail.com` are one mailbox.
    pub email_rules: Vec<EmailRule>,
    /// How `03/04/2001` in a date of birth is read: `day_first` (3 April) or `month_first`.
    pub date_order: super::person::DateOrder,
    /// Connectors compiled in (not configuration: set by the binary).
    #[serde(skip)]
    pub connectors: super::connector::ConnectorSet,
    /// The intent, programme and lexicon rules above, compiled on first use (not configuration).
    #[serde(skip)]
    pub text_rules: super::nlp::CompiledText,
}

/// How one mailbox provider reads addresses.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmailRule {
    /// Domains the rule applies to (lower case).
    pub domains: Vec<String>,
    /// The domain every one of them is written as, when they are aliases of one another.
    #[serde(default)]
    pub canonical_domain: Option<String>,
    /// Dots in the local part are ignored by the provider.
    #[serde(default)]
    pub ignore_dots: bool,
    /// `local+tag@` delivers to `local@`.
    #[serde(default)]
    pub strip_plus_tags: bool,
}

fn default_email_rules() -> Vec<EmailRule> {
    let rule = |domains: &[&str], canonical: Option<&str>, ignore_dots| EmailRule {
        domains: domains.iter().map(|d| d.to_string()).collect(),
        canonical_domain: canonical.map(String::from),
        ignore_dots,
        strip_plus_tags: true,
    };
    vec![
        rule(&["gmail.com", "googlemail.com"], Some("gmail.com"), true),
        rule(&["outlook.com", "hotmail.com", "live.com", "outlook.de", "hotmail.de"], None, false),
        rule(&["icloud.com", "me.com", "mac.com"], Some("icloud.com"), false),
        rule(&["proton.me", "protonmail.com"], None, false),
        rule(&["fastmail.com"], None, false),
    ]
}

/// Segment's published limits (HTTP Tracking API).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SegmentLimits {
    /// Largest single call, or single event inside a batch, in bytes.
    pub max_event_bytes: usize,
    /// Largest `/v1/batch` request body, in bytes.
    pub max_batch_bytes: usize,
    /// Most events in one batch.
    pub max_batch_events: usize,
}

impl Default for SegmentLimits {
    fn default() -> Self {
        Self { max_event_bytes: 32 * 1024, max_batch_bytes: 500 * 1024, max_batch_events: 2_500 }
    }
}

/// A programme of the catalogue, with the other ways students write it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Programme {
    pub name: String,
    #[serde(default)]
    pub aliases: Vec<String>,
}

/// One intent: phrases that reveal it anywhere in a message, and phrases that reveal it only
/// as the whole message (so "STOP" opts out but "when does enrolment stop?" does not).
///
/// Phrases are matched on words, case- and accent-insensitively; `*` at the start or end of a
/// word matches any suffix or prefix (`*frist` matches "Bewerbungsfrist").
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IntentRule {
    pub intent: String,
    #[serde(default)]
    pub keywords: Vec<String>,
    #[serde(default)]
    pub exact: Vec<String>,
}

fn strings(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| s.to_string()).collect()
}

fn programme(name: &str, aliases: &[&str]) -> Programme {
    Programme { name: name.to_string(), aliases: strings(aliases) }
}

fn rule(intent: &str, keywords: &[&str], exact: &[&str]) -> IntentRule {
    IntentRule { intent: intent.to_string(), keywords: strings(keywords), exact: strings(exact) }
}

/// The intents the activation side reacts to, in priority order: consent first (legally
/// binding), then complaints (a human should look), then the questions.
pub fn default_intents() -> Vec<IntentRule> {
    vec![
        rule(
            "opt_out",
            &[
                "unsubscribe",
                "opt out",
                "optout",
                "abmelden",
                "abbestellen",
                "austragen",
                "stop messaging",
                "stop sending",
                "stop texting",
                "stop contacting",
                "no more messages",
                "don't message me",
                "dont contact me",
                "do not contact me",
                "keine nachrichten mehr",
                "keine werbung",
                "nicht mehr kontaktieren",
                "nicht mehr schreiben",
                "bitte stopp",
                "stopp bitte",
            ],
            &[
                "stop",
                "stopp",
                "stopall",
                "stop all",
                "unsubscribe",
                "cancel",
                "end",
                "quit",
                "abmelden",
                "austragen",
                "ende",
            ],
        ),
        rule(
            "opt_in",
            &["resubscribe", "opt in", "opt back in"],
            &["start", "unstop", "subscribe", "anmelden newsletter"],
        ),
        rule(
            "complaint",
            &[
                "complaint",
                "complain*",
                "unacceptable",
                "disappointed",
                "disappointing",
                "frustrat*",
                "terrible",
                "awful",
                "horrible",
                "worst",
                "ridiculous",
                "not happy",
                "unhappy",
                "no response",
                "no one answered",
                "nobody answered",
                "nobody replied",
                "still waiting",
                "never got",
                "beschwer*",
                "unzufrieden",
                "enttausch*",
                "frechheit",
                "unverschamt",
                "katastroph*",
                "argerlich",
                "verargert",
                "keine antwort",
                "niemand antwortet",
                "warte immer noch",
                "warte seit",
            ],
            &[],
        ),
        rule(
            "deadline_question",
            &[
                "deadline*",
                "due date",
                "closing date",
                "last day to",
                "last date",
                "cut off",
                "cutoff",
                "until when",
                "how long can i",
                "*frist",
                "*fristen",
                "stichtag",
                "bis wann",
                "bewerbungsschluss",
                "anmeldeschluss",
                "einsendeschluss",
                "letzter tag",
            ],
            &[],
        ),
        rule(
            "payment",
            &[
                "payment*",
                "pay",
                "paid",
                "paying",
                "fee",
                "fees",
                "tuition",
                "invoice*",
                "installment*",
                "instalment*",
                "refund*",
                "bank transfer",
                "credit card",
                "how much",
                "cost",
                "costs",
                "price",
                "scholarship*",
                "*zahlung*",
                "bezahl*",
                "zahlen",
                "*gebuhr*",
                "rechnung*",
                "uberweis*",
                "kosten",
                "preis",
                "wie viel",
                "wieviel",
                "stipendi*",
            ],
            &[],
        ),
        rule(
            "enrollment_inquiry",
            &[
                "enrol*",
                "apply",
                "applying",
                "application*",
                "admission*",
                "register",
                "registration",
                "sign up",
                "interested in",
                "requirements",
                "entry requirement*",
                "start date",
                "intake",
                "study",
                "studying",
                "bewerb*",
                "einschreib*",
                "immatrikul*",
                "zulassung*",
                "anmelden",
                "anmeldung",
                "studienplatz",
                "interesse an",
                "interessiere",
                "voraussetzung*",
                "studieren",
                "studienbeginn",
            ],
            &[],
        ),
        rule("help", &[], &["help", "info", "hilfe"]),
    ]
}

/// The default programme catalogue of the demo university.
pub fn default_programmes() -> Vec<Programme> {
    vec![
        programme("MBA", &["Master of Business Administration", "M.B.A.", "Executive MBA", "Business MBA"]),
        programme(
            "MSc Data Science",
            &["Data Science", "M.Sc. Data Science", "Master Data Science", "Datenwissenschaft"],
        ),
        programme(
            "BSc Computer Science",
            &["Computer Science", "B.Sc. Computer Science", "Informatik", "B.Sc. Informatik", "Bachelor Informatik"],
        ),
        programme("Psychology", &["Psychologie", "BSc Psychology", "MSc Psychology", "Psych"]),
        programme(
            "BA Business Administration",
            &["Business Administration", "BWL", "Betriebswirtschaftslehre", "Betriebswirtschaft"],
        ),
        programme("MA International Management", &["International Management", "Internationales Management"]),
        programme(
            "MSc Artificial Intelligence",
            &["Artificial Intelligence", "Künstliche Intelligenz", "Machine Learning"],
        ),
        programme("BSc Nursing", &["Nursing", "Pflege", "Pflegewissenschaft"]),
    ]
}

/// English and German sentiment words. Keys are folded like messages (case, accents), so
/// "enttäuscht" and "enttauscht" are one entry.
pub fn default_sentiment_lexicon() -> BTreeMap<String, f64> {
    let words: &[(&str, f64)] = &[
        // English, positive
        ("good", 0.6),
        ("great", 0.8),
        ("excellent", 0.9),
        ("amazing", 0.9),
        ("awesome", 0.8),
        ("fantastic", 0.9),
        ("wonderful", 0.9),
        ("perfect", 0.9),
        ("love", 0.8),
        ("loved", 0.8),
        ("like", 0.3),
        ("nice", 0.5),
        ("happy", 0.7),
        ("glad", 0.6),
        ("pleased", 0.6),
        ("satisfied", 0.6),
        ("helpful", 0.6),
        ("thanks", 0.4),
        ("thank", 0.4),
        ("excited", 0.7),
        ("interested", 0.3),
        ("recommend", 0.6),
        ("easy", 0.4),
        ("fast", 0.3),
        ("best", 0.8),
        ("brilliant", 0.9),
        ("cool", 0.4),
        ("appreciate", 0.5),
        // English, negative
        ("bad", -0.6),
        ("terrible", -0.9),
        ("awful", -0.9),
        ("horrible", -0.9),
        ("hate", -0.9),
        ("worst", -1.0),
        ("poor", -0.5),
        ("disappointed", -0.7),
        ("disappointing", -0.7),
        ("frustrated", -0.7),
        ("frustrating", -0.7),
        ("angry", -0.8),
        ("annoyed", -0.6),
        ("annoying", -0.6),
        ("unhappy", -0.7),
        ("useless", -0.8),
        ("problem", -0.4),
        ("problems", -0.4),
        ("issue", -0.3),
        ("confused", -0.4),
        ("confusing", -0.4),
        ("complaint", -0.6),
        ("unacceptable", -0.9),
        ("ridiculous", -0.7),
        ("wrong", -0.5),
        ("expensive", -0.3),
        ("slow", -0.4),
        ("sad", -0.6),
        ("worried", -0.4),
        ("rude", -0.8),
        ("waste", -0.7),
        ("scam", -1.0),
        ("difficult", -0.3),
        // German, positive
        ("gut", 0.6),
        ("gute", 0.6),
        ("guter", 0.6),
        ("gutes", 0.6),
        ("guten", 0.4),
        ("super", 0.8),
        ("toll", 0.8),
        ("tolle", 0.8),
        ("toller", 0.8),
        ("prima", 0.7),
        ("klasse", 0.7),
        ("wunderbar", 0.9),
        ("hervorragend", 0.9),
        ("ausgezeichnet", 0.9),
        ("perfekt", 0.9),
        ("danke", 0.4),
        ("dankeschön", 0.5),
        ("freue", 0.6),
        ("froh", 0.6),
        ("zufrieden", 0.6),
        ("hilfreich", 0.6),
        ("spitze", 0.8),
        ("genial", 0.8),
        ("begeistert", 0.8),
        ("interessiert", 0.3),
        ("schön", 0.6),
        ("schöne", 0.6),
        ("empfehlen", 0.6),
        ("liebe", 0.6),
        // German, negative
        ("schlecht", -0.6),
        ("schlechte", -0.6),
        ("schlechter", -0.6),
        ("schrecklich", -0.9),
        ("furchtbar", -0.9),
        ("enttäuscht", -0.7),
        ("enttäuschend", -0.7),
        ("ärgerlich", -0.7),
        ("verärgert", -0.7),
        ("wütend", -0.8),
        ("sauer", -0.6),
        ("unzufrieden", -0.7),
        ("katastrophe", -0.9),
        ("katastrophal", -0.9),
        ("nervig", -0.6),
        ("problem", -0.4),
        ("probleme", -0.4),
        ("leider", -0.3),
        ("frechheit", -0.9),
        ("unverschämt", -0.9),
        ("teuer", -0.3),
        ("traurig", -0.6),
        ("mies", -0.7),
        ("schade", -0.4),
        ("beschwerde", -0.6),
        ("falsch", -0.5),
        ("verwirrt", -0.4),
        ("unfreundlich", -0.7),
        ("kompliziert", -0.4),
        // emoji
        ("👍", 0.6),
        ("😊", 0.6),
        ("🙂", 0.4),
        ("😀", 0.6),
        ("😍", 0.8),
        ("❤", 0.7),
        ("🙏", 0.3),
        ("👎", -0.6),
        ("😡", -0.8),
        ("😠", -0.7),
        ("😞", -0.6),
        ("😢", -0.6),
        ("🙁", -0.4),
    ];
    words.iter().map(|(w, s)| (w.to_string(), *s)).collect()
}

/// Negators, English and German (apostrophes are dropped: "don't" is "dont").
pub fn default_negations() -> Vec<String> {
    strings(&[
        "not", "no", "never", "dont", "doesnt", "didnt", "isnt", "wasnt", "arent", "werent", "cant", "cannot",
        "couldnt", "wont", "wouldnt", "hardly", "nothing", "without", "nicht", "kein", "keine", "keinen", "keinem",
        "keiner", "keines", "nie", "niemals", "nichts", "kaum", "ohne",
    ])
}

/// Intensifiers, English and German.
pub fn default_intensifiers() -> Vec<String> {
    strings(&[
        "very",
        "really",
        "so",
        "extremely",
        "super",
        "totally",
        "absolutely",
        "incredibly",
        "sehr",
        "echt",
        "wirklich",
        "total",
        "extrem",
        "richtig",
        "besonders",
        "voll",
    ])
}

/// Salesforce Contact fields (standard, EDA `hed__`, and the brief's custom ones) → traits.
pub fn default_salesforce_fields() -> BTreeMap<String, String> {
    let pairs: &[(&str, &str)] = &[
        ("Email", "email"),
        ("Phone", "phone"),
        ("MobilePhone", "mobile_phone"),
        ("HomePhone", "home_phone"),
        ("FirstName", "first_name"),
        ("LastName", "last_name"),
        ("MiddleName", "middle_name"),
        ("Salutation", "salutation"),
        ("Name", "name"),
        ("Name.FirstName", "first_name"),
        ("Name.LastName", "last_name"),
        ("Name.MiddleName", "middle_name"),
        ("Name.Salutation", "salutation"),
        ("Title", "title"),
        ("Birthdate", "date_of_birth"),
        ("hed__Preferred_Email__c", "preferred_email"),
        ("hed__UniversityEmail__c", "university_email"),
        ("hed__AlternateEmail__c", "alternate_email"),
        ("hed__WorkEmail__c", "work_email"),
        ("Enrollment_Status__c", "enrollment_status"),
        ("Application_Stage__c", "application_stage"),
        ("Programme__c", "programme"),
        ("Program__c", "programme"),
        ("HasOptedOutOfEmail", "has_opted_out_of_email"),
        ("DoNotCall", "do_not_call"),
        ("LeadSource", "lead_source"),
        ("AccountId", "account_id"),
        ("OwnerId", "owner_id"),
        ("IndividualId", "individual_id"),
        ("MailingStreet", "street"),
        ("MailingCity", "city"),
        ("MailingState", "state"),
        ("MailingPostalCode", "postal_code"),
        ("MailingCountry", "country"),
        ("MailingAddress.Street", "street"),
        ("MailingAddress.City", "city"),
        ("MailingAddress.State", "state"),
        ("MailingAddress.PostalCode", "postal_code"),
        ("MailingAddress.Country", "country"),
    ];
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

impl Default for NormalizeOptions {
    fn default() -> Self {
        Self {
            default_region: "DE".into(),
            segment: SegmentLimits::default(),
            max_webhook_bytes: 4 * 1024 * 1024,
            max_csv_bytes: 64 * 1024 * 1024,
            programmes: default_programmes(),
            sentiment_lexicon: default_sentiment_lexicon(),
            negations: default_negations(),
            intensifiers: default_intensifiers(),
            intents: default_intents(),
            fallback_intent: "other".into(),
            salesforce_fields: default_salesforce_fields(),
            email_rules: default_email_rules(),
            date_order: super::person::DateOrder::DayFirst,
            connectors: super::connector::ConnectorSet::default(),
            text_rules: super::nlp::CompiledText::default(),
        }
    }
}

impl NormalizeOptions {
    /// Reads the `[normalize]` config table and validates it, so a typo fails at start.
    pub fn from_config(table: &serde_json::Map<String, serde_json::Value>) -> Result<Self, String> {
        let opts: Self =
            serde_path_to_error::deserialize(serde_json::Value::Object(table.clone())).map_err(|e| {
                match e.path().to_string().as_str() {
                    "." => format!("normalize: {}", e.inner()),
                    path => format!("normalize.{path}: {}", e.inner()),
                }
            })?;
        opts.validate()?;
        Ok(opts)
    }

    /// Checks what serde cannot: a known region, weights in range, non-zero limits.
    pub fn validate(&self) -> Result<(), String> {
        if self.default_region.trim().to_ascii_uppercase().parse::<phonenumber::country::Id>().is_err() {
            return Err(format!(
                "normalize.default_region `{}` is not an ISO 3166 alpha-2 region",
                self.default_region
            ));
        }
        let s = &self.segment;
        if s.max_event_bytes == 0 || s.max_batch_bytes == 0 || s.max_batch_events == 0 {
            return Err("normalize.segment limits must be greater than zero".into());
        }
        if self.max_webhook_bytes == 0 || self.max_csv_bytes == 0 {
            return Err("normalize.max_webhook_bytes and max_csv_bytes must be greater than zero".into());
        }
        for (word, w) in &self.sentiment_lexicon {
            if !w.is_finite() || !(-1.0..=1.0).contains(w) {
                return Err(format!("normalize.sentiment_lexicon `{word}`: weight {w} is outside [-1, 1]"));
            }
        }
        if let Some(p) = self.programmes.iter().find(|p| p.name.trim().is_empty()) {
            return Err(format!("normalize.programmes: a programme has an empty name (aliases {:?})", p.aliases));
        }
        if self.intents.iter().any(|r| r.intent.trim().is_empty()) || self.fallback_intent.trim().is_empty() {
            return Err("normalize.intents: intent names must not be empty".into());
        }
        if let Some((k, _)) = self.salesforce_fields.iter().find(|(k, v)| k.trim().is_empty() || v.trim().is_empty()) {
            return Err(format!("normalize.salesforce_fields: empty name in mapping of `{k}`"));
        }
        for rule in &self.email_rules {
            let bad = |d: &str| d.is_empty() || d != d.trim().to_lowercase() || !d.contains('.') || d.contains('@');
            if rule.domains.is_empty() || rule.domains.iter().any(|d| bad(d)) {
                return Err(format!(
                    "normalize.email_rules: domains must be non-empty lower-case domain names, got {:?}",
                    rule.domains
                ));
            }
            if rule.canonical_domain.as_deref().is_some_and(bad) {
                return Err(format!("normalize.email_rules: bad canonical_domain {:?}", rule.canonical_domain));
            }
        }
        Ok(())
    }

    /// The email identifier of a normalized address under [`NormalizeOptions::email_rules`].
    pub fn email_key(&self, email: &str) -> String {
        super::contact::email_key(email, &self.email_rules)
    }
}
